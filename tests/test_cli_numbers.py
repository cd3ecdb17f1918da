"""每个命令的数值参数：有限、在范围内、各命令同一套规则（config.Bounds），并且在导入 torch 之前就检查。"""

import dataclasses
import json
import subprocess
import sys

import pytest

from functional_lm.cli import main
from functional_lm.config import ModelConfig, TrainingConfig


def _one_line(err):
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err.strip()


def _distill(tmp_path, *extra):
    # 教师目录不存在：某个坏值没被早期检查拦下时，命令会因为找不到教师而失败，消息里不会有该选项。
    return ["distill", "--teacher", str(tmp_path / "missing"), "--output-dir", str(tmp_path / "o"), *extra]


def _generate(tmp_path, *extra):
    return ["generate", "--model", str(tmp_path / "missing"), "--prompt-ids", "1", *extra]


def _teacher_cache(tmp_path, *extra):
    return ["teacher-cache", "--import", str(tmp_path / "missing.jsonl"), "--output-dir", str(tmp_path / "C"),
            "--top-k", "2", *extra]


# 每个配置字段：浮点给 inf 与 nan，整数给 -1（所有整数字段的下界都 >= 0）。
_FIELD_CASES = [
    (cls.__name__, f.name, value)
    for cls in (ModelConfig, TrainingConfig)
    for f in dataclasses.fields(cls)
    if f.type in ("int", "float")
    for value in (("inf", "nan") if f.type == "float" else ("-1",))
]


@pytest.mark.parametrize("cls, name, value", _FIELD_CASES, ids=[f"{n}={v}" for _, n, v in _FIELD_CASES])
def test_distill_refuses_every_bad_number_naming_the_option(tmp_path, capsys, cls, name, value):
    flag = "--" + name.replace("_", "-")
    assert main(_distill(tmp_path, flag, value)) == 2
    line = _one_line(capsys.readouterr().err)
    got = "got -1" if value == "-1" else f"got {float(value)!r}"
    assert f"{flag}: {cls}.{name} must be " in line and line.endswith(got)
    assert not (tmp_path / "o").exists()


def test_distill_refuses_a_bad_number_in_the_config_file(tmp_path, capsys):
    config = tmp_path / "run.toml"
    config.write_text("[model]\nnorm_eps = inf\n")
    assert main(_distill(tmp_path, "--config", str(config))) == 2
    assert f"{config}: ModelConfig.norm_eps must be a finite number > 0, got inf" in _one_line(capsys.readouterr().err)


_GENERATE_CASES = [
    ("--temperature", "inf", "a finite number >= 0 (0 = greedy), got inf"),
    ("--temperature", "nan", "a finite number >= 0 (0 = greedy), got nan"),
    ("--temperature", "-1", "a finite number >= 0 (0 = greedy), got -1.0"),
    ("--top-p", "0", "in (0, 1] (1 = off), got 0.0"),
    ("--top-p", "nan", "in (0, 1] (1 = off), got nan"),
    ("--top-k", "0", "> 0, got 0"),
    ("--seed", "-1", "in [0, 4294967295], got -1"),
    ("--seed", str(2**32), f"in [0, 4294967295], got {2**32}"),
    ("--max-new-tokens", "0", "> 0, got 0"),
]


@pytest.mark.parametrize("flag, value, expected", _GENERATE_CASES, ids=[f"{f}={v}" for f, v, _ in _GENERATE_CASES])
def test_generate_refuses_bad_numbers(tmp_path, capsys, flag, value, expected):
    assert main(_generate(tmp_path, flag, value)) == 2
    assert f"{flag} must be {expected}" in _one_line(capsys.readouterr().err)


_CACHE_CASES = [
    ("--temperature", "inf", "a finite number > 0, got inf"),
    ("--temperature", "nan", "a finite number > 0, got nan"),
    ("--val-fraction", "nan", "in [0, 1), got nan"),
    ("--val-fraction", "1", "in [0, 1), got 1.0"),
    ("--seed", "-1", "in [0, 4294967295], got -1"),
]


@pytest.mark.parametrize("flag, value, expected", _CACHE_CASES, ids=[f"{f}={v}" for f, v, _ in _CACHE_CASES])
def test_teacher_cache_refuses_bad_numbers(tmp_path, capsys, flag, value, expected):
    assert main(_teacher_cache(tmp_path, flag, value)) == 2
    assert f"{flag} must be {expected}" in _one_line(capsys.readouterr().err)
    assert not (tmp_path / "C").exists()


@pytest.mark.parametrize("flag, value", [("--seed", "-1"), ("--seed", str(2**32)), ("--temperature", "inf")])
def test_the_same_option_is_checked_the_same_way_in_every_command(tmp_path, capsys, flag, value):
    """同名选项在三个命令里给出同一句范围说明（distill 的温度是蒸馏温度，与 teacher-cache 的相同）。"""
    texts = {}
    commands = {"distill": _distill, "teacher-cache": _teacher_cache}
    if flag == "--seed":
        commands["generate"] = _generate
    for name, build in commands.items():
        assert main(build(tmp_path, flag, value)) == 2
        line = _one_line(capsys.readouterr().err)
        texts[name] = line[line.index(" must be "):]
    assert len(set(texts.values())) == 1, texts


# ---------------------------------------------------------------- 在导入 torch 之前
_PROBE = """
import json, sys
from functional_lm.cli import main
rc = main(json.loads(sys.argv[1]))
print(json.dumps({"rc": rc, "heavy": [m for m in ("torch", "transformers") if m in sys.modules]}))
"""


def _probe(argv):
    """新的子进程里调用 main(argv)，返回 (退出码, 返回时已导入的重模块, stderr)。"""
    proc = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(argv)], capture_output=True, text=True, timeout=120)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return result["rc"], result["heavy"], proc.stderr


@pytest.mark.parametrize("build, extra, expected", [
    (_distill, ["--batch-size", "0"], "--batch-size: TrainingConfig.batch_size must be > 0, got 0"),
    (_distill, ["--norm-eps", "inf"], "--norm-eps: ModelConfig.norm_eps must be a finite number > 0, got inf"),
    (_distill, ["--num-kv-heads", "3"], "num_kv_heads=3"),  # 字段之间的约束：新运行时也在导入 torch 之前
    (_generate, ["--temperature", "-1"], "--temperature must be a finite number >= 0"),
    (_teacher_cache, ["--seed", "-1"], "--seed must be in [0, 4294967295], got -1"),
], ids=["distill-batch-size", "distill-norm-eps", "distill-kv-heads", "generate-temperature", "teacher-cache-seed"])
def test_bad_numbers_are_refused_before_torch_is_imported(tmp_path, build, extra, expected):
    rc, heavy, err = _probe(build(tmp_path, *extra))
    assert rc == 2 and expected in _one_line(err)
    assert heavy == []


def test_a_valid_command_still_imports_torch(tmp_path):
    # 对照：检查通过时照常导入 torch（探针真的看得见 torch）；这里在找教师时失败。
    rc, heavy, err = _probe(_distill(tmp_path, "--batch-size", "2"))
    assert rc == 2 and "missing" in _one_line(err) and "torch" in heavy
