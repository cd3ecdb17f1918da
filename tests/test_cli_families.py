"""新家族当教师（命令行）：极小的 Qwen3 / Qwen3-MoE 教师，Qwen 分词器，训练、逐位恢复、2 进程等于 1 进程；
学生也可以是 Qwen3 式（--preset student-qwen3-123m 的缩小版）。

教师检查点由我们的 save_pretrained 写出（与 transformers 的往返在 test_models_<family>.py 里逐位验证过），
词表是 Qwen2.5 的 151,936 行：离线分词器的 id 直接可用，填充行照旧遮住。
"""

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import write_teacher_and_data
from functional_lm import ModelConfig
from functional_lm.cli import main
from functional_lm.hf import load_pretrained

pytestmark = pytest.mark.usefixtures("qwen_tokenizer")

TEACHERS = {
    "qwen3": ModelConfig(
        family="qwen3", qkv_bias=False, attention_head_dim=12, hidden_size=32, num_layers=2, num_heads=4,
        num_kv_heads=2, intermediate_size=64, vocab_size=151936, max_seq_len=64, rope_theta=1e4,
        tie_word_embeddings=False,
    ),
    # 4 个专家取 2 个，第 1 层只用稠密 MLP（mlp_only_layers）：路由、分组专家与稠密层都走一遍
    "qwen3_moe": ModelConfig(
        family="qwen3_moe", qkv_bias=False, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
        intermediate_size=64, vocab_size=151936, max_seq_len=64, rope_theta=1e4, num_experts=4,
        num_experts_per_tok=2, moe_intermediate_size=16, mlp_only_layers=(1,),
    ),
}
FLAGS = [
    "--preset", "tiny", "--vocab-size", "151936", "--hidden-size", "16", "--num-heads", "2", "--num-kv-heads", "1",
    "--seq-len", "32", "--max-steps", "4", "--save-interval", "2", "--eval-interval", "2", "--log-interval", "1",
    "--keep-last", "5", "--learning-rate", "0.01", "--warmup-steps", "1", "--batch-size", "2", "--no-progress",
]


@pytest.fixture(scope="module", params=sorted(TEACHERS))
def root(request, tmp_path_factory):
    base = write_teacher_and_data(tmp_path_factory.mktemp(request.param), TEACHERS[request.param])
    return base


def _args(root, out, *extra):
    return ["distill", "--teacher", str(root / "teacher"), "--data", str(root / "data.jsonl"), *FLAGS,
            "--cache-dir", str(root / "cache"), "--output-dir", str(out), *extra]


def _losses(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if r["kind"] == "train"]


def _student(out):
    return load_pretrained(out / "student")[1]


@pytest.fixture(scope="module")
def full(root):
    out = root / "full"
    assert main(_args(root, out)) == 0
    return out


def test_the_teacher_is_loaded_as_its_family_and_the_student_learns(root, full):
    cfg, _ = load_pretrained(root / "teacher")
    assert cfg.family in TEACHERS
    losses = [loss for _, loss in _losses(full)]
    assert len(losses) == 4 and losses[-1] < losses[0]
    report = json.loads((full / "run.json").read_text())
    assert report["mode"] == "distill"


def _check_resume_is_bit_exact(full, tmp_path, last_checkpoint):
    """删掉最后一个检查点后从前一个继续：损失逐位相同，学生逐位相同。"""
    copy = tmp_path / "copy"
    shutil.copytree(full, copy)
    shutil.rmtree(copy / "checkpoints" / last_checkpoint)
    assert main(["distill", "--output-dir", str(copy), "--resume", "--no-progress"]) == 0
    assert _losses(copy) == _losses(full)
    a, b = _student(copy), _student(full)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_is_bit_exact(root, full, tmp_path):
    _check_resume_is_bit_exact(full, tmp_path, "step-00000004")


@pytest.mark.parametrize("sharding", ["replicate", "shard"])
def test_two_processes_equal_one(root, full, sharding):
    out = root / f"two-{sharding}"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "functional_lm", *_args(root, out, "--batch-size", "1", "--teacher-sharding", sharding)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for (s1, l1), (s2, l2) in zip(_losses(out), _losses(full), strict=True):
        assert s1 == s2 and l1 == pytest.approx(l2, rel=1e-5)  # float32 归约顺序不同：相对 1e-5
    a, b = _student(out), _student(full)
    for key in b:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)


def test_a_qwen3_student_distils_from_the_teacher(root, tmp_path):
    out = tmp_path / "qwen3-student"
    flags = ["--preset", "student-qwen3-123m", "--hidden-size", "16", "--num-layers", "1", "--num-heads", "2",
             "--num-kv-heads", "1", "--intermediate-size", "32"]
    assert main(_args(root, out, *flags)) == 0
    cfg, params = load_pretrained(out / "student")
    assert cfg.family == "qwen3" and "model.layers.0.self_attn.q_norm.weight" in params
    assert len(_losses(out)) == 4


DEEPSEEK = ModelConfig(
    family="deepseek_v3", qkv_bias=False, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=2,
    intermediate_size=64, vocab_size=129280, max_seq_len=64, num_experts=4, num_experts_per_tok=2,
    moe_intermediate_size=16, first_k_dense_replace=1, n_shared_experts=1, n_group=1, topk_group=1,
    kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, tie_word_embeddings=False,
)


def test_teacher_cache_without_the_teachers_tokenizer_is_one_paragraph(tmp_path, capsys):
    """DeepSeek 教师的目录里没有分词器：离线 Qwen 词表与它的 129,280 行对不上，一段话说给出 --teacher-tokenizer。"""
    root = write_teacher_and_data(tmp_path, DEEPSEEK)
    args = ["teacher-cache", "--teacher", str(root / "teacher"), "--data", str(root / "data.jsonl"),
            "--cache-dir", str(root / "cache"), "--output-dir", str(root / "out"), "--seq-len", "32", "--top-k", "4"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and "\n" not in err
    assert "129,280" in err and "151,665" in err and "--teacher-tokenizer deepseek" in err
    assert not (root / "out" / "train").exists()


XFLAGS = ["--preset", "tiny", "--vocab-size", "151936", "--hidden-size", "16", "--num-heads", "2", "--num-kv-heads",
          "1", "--seq-len", "32", "--max-steps", "3", "--eval-interval", "3", "--log-interval", "1", "--batch-size",
          "2", "--no-progress"]


@pytest.fixture(scope="module")
def deepseek_root(tmp_path_factory):
    return write_teacher_and_data(tmp_path_factory.mktemp("deepseek"), DEEPSEEK)


def _xargs(root, out, *extra):
    return ["distill", "--teacher", str(root / "teacher"), "--data", str(root / "data.jsonl"), *XFLAGS,
            "--cache-dir", str(root / "cache"), "--output-dir", str(out), *extra]


@pytest.fixture(scope="module")
def xfull(deepseek_root):
    out = deepseek_root / "x"
    assert main(_xargs(deepseek_root, out, "--teacher-tokenizer", "deepseek")) == 0
    return out


def test_a_deepseek_teacher_distils_across_tokenizers_and_reports_the_fractions(xfull):
    out = xfull
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    assert len(train) == 3
    for r in train:
        assert r["xtok_mapped"] + r["xtok_uld"] + r["xtok_none"] == pytest.approx(1.0)
        assert r["xtok_mapped"] > 0.5 and r["kd"] > 0
    assert any(r["kind"] == "eval" and "kl_cache_student" in r for r in rows)
    report = (out / "report.md").read_text()
    assert "cross_tokenizer" in report and "deepseek" in report
    cfg, _ = load_pretrained(out / "student")
    assert cfg.vocab_size == 151936  # 学生仍是 Qwen2.5 词表


@pytest.mark.parametrize("extra, words", [
    (["--teacher-tokenizer", "deepseek", "--cross-tokenizer", "off"], ["--cross-tokenizer off", "129,280", "151,665"]),
    ([], ["129,280", "151,665", "--teacher-tokenizer"]),  # 教师目录里没有分词器：离线 Qwen 词表与它的行数对不上
])
def test_bad_cross_tokenizer_settings_are_one_paragraph(deepseek_root, tmp_path, capsys, extra, words):
    assert main(_xargs(deepseek_root, tmp_path / "bad", *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and "\n" not in err
    for word in words:
        assert word in err


def test_two_processes_equal_one_across_tokenizers(deepseek_root, xfull):
    """2 个进程（gloo）各自对齐自己的行、各跑一份教师：损失与学生与 1 个进程相同（到 float32 的归约顺序）。"""
    out = deepseek_root / "x-two"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
               "functional_lm", *_xargs(deepseek_root, out, "--teacher-tokenizer", "deepseek", "--batch-size", "1")]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for (s1, l1), (s2, l2) in zip(_losses(out), _losses(xfull), strict=True):
        assert s1 == s2 and l1 == pytest.approx(l2, rel=1e-5)
    a, b = _student(out), _student(xfull)
    for key in b:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)
    fractions = [[r[k] for r in _train_rows(run) for k in ("xtok_mapped", "xtok_uld", "xtok_none")]
                 for run in (out, xfull)]
    assert fractions[0] == pytest.approx(fractions[1], abs=1e-12)  # 两个进程的计数相加：与一个进程的相同


def _train_rows(out):
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]


def test_a_cross_tokenizer_run_resumes_bit_exactly(deepseek_root, tmp_path):
    full = tmp_path / "full"
    assert main(_xargs(deepseek_root, full, "--teacher-tokenizer", "deepseek", "--save-interval", "2")) == 0
    _check_resume_is_bit_exact(full, tmp_path, "step-00000003")


def test_on_policy_grading_across_tokenizers_scores_the_students_continuations(deepseek_root, tmp_path):
    """λ = 1：每一步都由学生写续写（学生的 token），解码、由 DeepSeek 的分词器重新切分后教师打分；
    损失只有 KD（没有 CE），映射目标的比例是在生成的 token 上算的。"""
    out = tmp_path / "op"
    assert main(_xargs(deepseek_root, out, "--teacher-tokenizer", "deepseek", "--on-policy-fraction", "1",
                       "--prompt-length", "8", "--max-new-tokens", "8", "--generation-temperature", "1.0")) == 0
    train = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in train if r["kind"] == "train"]
    assert len(train) == 3
    for r in train:
        assert r["sources"] == {"student": 1} and r["ce"] is None and r["kd"] > 0
        assert r["xtok_mapped"] > 0.5 and r["xtok_mapped"] + r["xtok_uld"] + r["xtok_none"] == pytest.approx(1.0)


@pytest.mark.parametrize("extra, words", [
    (["--teacher-generated-fraction", "0.5"], ["teacher_generated_fraction=0.5", "functional-lm generate", "--data"]),
    (["--on-policy-fraction", "1", "--on-policy-estimator", "sampled"], ["sampled", "topk"]),
])
def test_cross_tokenizer_generation_it_cannot_do_is_one_paragraph(deepseek_root, tmp_path, capsys, extra, words):
    assert main(_xargs(deepseek_root, tmp_path / "bad", "--teacher-tokenizer", "deepseek", "--prompt-length", "8",
                       "--max-new-tokens", "8", *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and "\n" not in err
    for word in words:
        assert word in err


def test_a_deepseek_teacher_cache_is_built_across_tokenizers_and_trains_the_student(deepseek_root, tmp_path):
    """MLA + MoE 的 DeepSeek 教师：teacher-cache 按文本对齐后把目标存在学生的位置上，distill 从缓存训练。"""
    cache = tmp_path / "C"
    assert main(["teacher-cache", "--teacher", str(deepseek_root / "teacher"), "--teacher-tokenizer", "deepseek",
                 "--data", str(deepseek_root / "data.jsonl"), "--cache-dir", str(deepseek_root / "cache"),
                 "--output-dir", str(cache), "--seq-len", "32", "--top-k", "16", "--no-progress"]) == 0
    index = json.loads((cache / "train" / "index.json").read_text())
    assert index["fingerprint"]["cross_tokenizer"]["mode"] == "hybrid"
    assert index["fingerprint"]["teacher_config"]["family"] == "deepseek_v3"
    out = tmp_path / "s"
    assert main(["distill", "--teacher-cache", str(cache), "--data", str(deepseek_root / "data.jsonl"), *XFLAGS,
                 "--cache-dir", str(deepseek_root / "cache"), "--output-dir", str(out)]) == 0
    train = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in train if r["kind"] == "train"]
    assert len(train) == 3 and all(r["xtok_mapped"] > 0.5 and r["kd"] > 0 for r in train)


QWEN35 = dataclasses.replace(TEACHERS["qwen3"], vocab_size=248320)  # Qwen3.5 / 3.6 的嵌入行数（248,077 个 token 加填充）


def test_a_qwen35_teacher_distils_into_the_qwen25_vocabulary_student(tmp_path):
    """Qwen3.5 分词器（qwen-tokenizer 包里的 qwen3_6.tiktoken）的教师：缺省 hybrid，学生仍是 Qwen2.5 词表。"""
    root = write_teacher_and_data(tmp_path, QWEN35)
    out = tmp_path / "q35"
    assert main(_xargs(root, out, "--teacher-tokenizer", "qwen3.5")) == 0
    train = _train_rows(out)
    assert len(train) == 3 and all(r["xtok_mapped"] > 0.8 and r["kd"] > 0 for r in train)
    report = (out / "report.md").read_text()
    assert "qwen3.5" in report and "hybrid" in report
    assert load_pretrained(out / "student")[0].vocab_size == 151936


def test_chat_data_distils_from_a_deepseek_teacher_in_its_own_template(deepseek_root, tmp_path):
    """对话数据（messages）：学生按 ChatML、DeepSeek 教师按它自己的模板读同一段对话（kd/chat_bridge.py）；
    只在助手回合上计损失，比例照常报告。"""
    rows = [{"messages": [{"role": "user", "content": f"Question {i}: what is {i} plus {i}?"},
                          {"role": "assistant", "content": f"The answer is {2 * i}. " * 3}]} for i in range(30)]
    data = tmp_path / "chat.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "chat"
    args = _xargs(deepseek_root, out, "--teacher-tokenizer", "deepseek")
    args[args.index("--data") + 1] = str(data)
    assert main(args) == 0
    train = _train_rows(out)
    assert len(train) == 3 and all(r["kd"] > 0 and r["xtok_mapped"] > 0.5 for r in train)
    assert any(r["xtok_uld"] > 0 for r in train)  # 助手回合的 <|im_end|>（对教师 eos 的预测）用 ULD
