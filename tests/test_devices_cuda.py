"""CUDA 上的检查（标记 cuda；没有 CUDA 时跳过——这是测试套件唯一允许的跳过）。

在 GPU 机器上由 ``benchmarks/gpu_check.sh`` 运行：前向与 CPU 一致、打包文档（FlexAttention）与各文档单独运行一致、
bf16 训练几步有限且损失下降、
贪心生成与 CPU 相同、编译的解码步与 eager 相同，在线蒸馏在 GPU 上编译与否采到相同的续写，
两块卡时 NCCL 上的 2 进程训练与 1 进程相同。
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import tiny_config, write_teacher_and_data
from functional_lm import ModelConfig, forward, init_params
from functional_lm.cli import main
from functional_lm.generate import generate
from functional_lm.hf import load_pretrained

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

CFG = tiny_config()
TEACHER = ModelConfig(
    hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64,
    vocab_size=151936, max_seq_len=64, rope_theta=1e4,
)


def test_forward_on_cuda_matches_cpu():
    params = init_params(CFG, seed=1)
    ids = torch.randint(0, CFG.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    on_gpu = forward({k: v.cuda() for k, v in params.items()}, ids.cuda(), CFG)
    torch.testing.assert_close(on_gpu.cpu(), forward(params, ids, CFG), atol=1e-4, rtol=1e-4)


def test_greedy_generation_on_cuda_matches_cpu_and_compiled_matches_eager():
    params = {k: v * 5 for k, v in init_params(CFG, seed=2).items()}
    gpu = {k: v.cuda() for k, v in params.items()}
    prompt = [[3, 4, 5, 6]]
    cpu_tokens = generate(params, CFG, prompt, max_new_tokens=8)
    assert generate(gpu, CFG, prompt, max_new_tokens=8).cpu().tolist() == cpu_tokens.tolist()
    assert generate(gpu, CFG, prompt, max_new_tokens=8, compile=True).cpu().tolist() == cpu_tokens.tolist()


def test_packed_documents_on_cuda_use_flex_attention_and_match_each_document_alone():
    # CUDA 上文档掩码走 FlexAttention（eager 调用编译好的 flex），前向与反向都要与各文档单独运行一致。
    from functional_lm.layers import BlockMask, build_attention_mask

    params = {k: v.cuda().requires_grad_(True) for k, v in init_params(CFG, seed=3).items()}
    lengths = (5, 9, 4)
    ids = torch.randint(0, CFG.vocab_size, (2, sum(lengths)), generator=torch.Generator().manual_seed(1)).cuda()
    seg = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)]).expand(2, -1).contiguous().cuda()
    assert isinstance(build_attention_mask(ids.shape[1], segment_ids=seg), BlockMask)
    packed = forward(params, ids, CFG, segment_ids=seg)
    alone = torch.cat([forward(params, doc, CFG) for doc in ids.split(lengths, dim=1)], dim=1)
    torch.testing.assert_close(packed, alone, atol=1e-4, rtol=1e-4)
    g_packed = torch.autograd.grad(packed.square().mean(), list(params.values()))
    g_alone = torch.autograd.grad(alone.square().mean(), list(params.values()))
    for a, b in zip(g_packed, g_alone):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return write_teacher_and_data(tmp_path_factory.mktemp("cuda"), TEACHER)


def _args(root, out, *extra):
    return [
        "distill", "--teacher", str(root / "teacher"), "--data", str(root / "data.jsonl"), "--preset", "tiny",
        "--vocab-size", "151936", "--hidden-size", "16", "--num-heads", "2", "--num-kv-heads", "1", "--seq-len", "32",
        "--max-steps", "6", "--save-interval", "3", "--eval-interval", "3", "--log-interval", "1",
        "--learning-rate", "0.01", "--warmup-steps", "1", "--cache-dir", str(root / "cache"), "--no-progress",
        "--output-dir", str(out), *extra,
    ]


def _records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_bf16_distillation_on_cuda_runs_and_learns(setup, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_args(setup, out, "--device", "cuda", "--bf16", "true", "--batch-size", "4")) == 0
    err = capsys.readouterr().err
    assert "[train] cuda" in err
    losses = [r["loss"] for r in _records(out) if r["kind"] == "train"]
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    cfg, params = load_pretrained(out / "student")
    assert cfg.hidden_size == 16 and all(torch.isfinite(v).all() for v in params.values())


def test_on_policy_distillation_on_cuda_is_deterministic_compiled_or_not(setup, tmp_path):
    # 学生在 GPU 上写续写（每行自己的 CUDA 生成器，种子由 (seed, step, 块号) 决定）、教师打分：编译的解码步与
    # eager 采到同样的续写（GPU 与 CPU 的随机数引擎不同，所以不与 CPU 比较）
    online = ("--device", "cuda", "--on-policy-fraction", "1", "--prompt-length", "8", "--max-new-tokens", "8",
              "--teacher-bf16", "false", "--batch-size", "4", "--max-steps", "2", "--eval-interval", "2")
    assert main(_args(setup, tmp_path / "compiled", "--compile", "true", *online)) == 0
    assert main(_args(setup, tmp_path / "eager", *online)) == 0
    compiled, eager = _records(tmp_path / "compiled"), _records(tmp_path / "eager")
    assert [r.get("sources") for r in compiled if r["kind"] == "train"] == [{"student": 1}, {"student": 1}]
    assert compiled[-1]["on_policy_tokens"] == eager[-1]["on_policy_tokens"] > 0
    assert compiled[-1]["on_policy_reverse_kl"] == pytest.approx(eager[-1]["on_policy_reverse_kl"], rel=1e-3)
    assert [r["loss"] for r in compiled if r["kind"] == "train"] == pytest.approx(
        [r["loss"] for r in eager if r["kind"] == "train"], rel=1e-3)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_two_gpus_with_nccl_match_one(setup, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(_args(setup, one, "--device", "cuda", "--batch-size", "4", "--teacher-bf16", "false")) == 0
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "functional_lm", *_args(setup, two, "--device", "cuda", "--batch-size", "2",
                                              "--teacher-bf16", "false")]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = load_pretrained(one / "student")[1], load_pretrained(two / "student")[1]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-3, atol=1e-4, msg=key)
