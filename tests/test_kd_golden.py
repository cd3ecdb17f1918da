"""离线（λ = τ = 0）训练轨迹的金标准：一次极小的固定运行的逐步损失与最终参数的校验和，存成小 JSON。

“λ = τ = 0 与以前逐位相同”不能靠同一份代码跑两次来证明（两次都错也相同）。这里把一次固定运行的结果钉在
``tests/fixtures/golden_off_policy.json`` 里：任何改变离线训练轨迹的改动（损失、T²、分块、掩码、学习率表、
AdamW、梯度裁剪、数据顺序……）都会让本测试失败，必须有意识地重新生成金标准并在提交说明里承认：

    python tests/test_kd_golden.py --regenerate

比较的方式：金标准记下了生成它的 torch 版本与 CPU 指令集（``torch.backends.cpu.get_cpu_capability()``）；
两者都相同时要求逐位相同（每个损失的 float.hex、参数字节的 sha256）。换了 torch 版本或 CPU 指令集，矩阵乘的
内核不同，float32 的舍入会变：这时按相对 1e-4 比较损失与每个参数张量的和、绝对值和、平方和，并在失败信息里
说明金标准来自哪里——仍然是真实的检查，不是跳过。运行固定用 1 个线程（线程数会改变归约的分块，从而改变舍入）。

运行：学生 2 层（隐藏 32）、教师 2 层（隐藏 48、不共享嵌入）、词表 256，随机 id 的 24 篇文档（种子固定）打成
块长 16 的块，batch 2 × 累积 2，8 步，α = 0.5、T = 2、文档掩码、分块损失（块 8），第 4、8 步验证。
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from functional_lm import ModelConfig, TrainingConfig, init_params
from functional_lm.data import PackedDataset
from functional_lm.data.loader import BatchLoader
from functional_lm.data.pipeline import DataBundle
from functional_lm.data.store import TokenStore
from functional_lm.kd.trainer import train
from functional_lm.kd.objective import Model

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "golden_off_policy.json"
VOCAB, SEPARATOR = 256, 255
STUDENT = ModelConfig(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64,
                      vocab_size=VOCAB, max_seq_len=32, rope_theta=1e4)
TEACHER = STUDENT.replace(hidden_size=48, num_heads=6, intermediate_size=96, tie_word_embeddings=False)
TCFG = TrainingConfig(
    batch_size=2, gradient_accumulation_steps=2, learning_rate=1e-2, warmup_steps=2, max_steps=8, alpha=0.5,
    temperature=2.0, log_interval=1, eval_interval=4, save_interval=100, eval_batches=2, loss_chunk_size=8,
    document_mask=True, seed=0,
)
REL = 1e-4  # 换了 torch 版本或 CPU 指令集时的相对容差


def _data() -> DataBundle:
    """24 篇长 5–40 的随机文档，前 20 篇训练、后 4 篇验证，块长 16。"""
    rng = np.random.default_rng(2026)
    docs = [rng.integers(0, SEPARATOR, int(n)).tolist() for n in rng.integers(5, 41, 24)]
    store = TokenStore.from_documents(docs, separator_id=SEPARATOR)
    train_set, val_set = PackedDataset(store, 16, np.arange(20)), PackedDataset(store, 16, np.arange(20, 24))
    return DataBundle(None, store, train_set, val_set, BatchLoader(train_set, 2, seed=0),
                      BatchLoader(val_set, 2, shuffle=False, drop_last=False))


def golden_run(run_dir: Path) -> dict:
    """跑一次固定的运行，返回要钉住的值：逐步的 loss / kd / ce / grad_norm，每次验证的指标，最终参数。"""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    steps: list[dict] = []
    try:
        result = train(
            Model(init_params(STUDENT, seed=1), STUDENT), Model(init_params(TEACHER, seed=2), TEACHER), _data(),
            TCFG, run_dir, real_vocab_size=VOCAB, progress=False,
            on_step_end=lambda step, r: steps.append({k: r[k] for k in ("loss", "kd", "ce", "grad_norm")}),
        )
    finally:
        torch.set_num_threads(threads)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [{k: v for k, v in r.items() if isinstance(v, float)} for r in records if r["kind"] == "eval"]
    return {"steps": steps, "evals": evals, "params": result.params}


def _param_summary(params: dict) -> tuple[str, dict]:
    """参数的 sha256（按键名排序，逐张量的原始字节）与每个张量的 (和, 绝对值和, 平方和)（float64）。"""
    digest, sums = hashlib.sha256(), {}
    for key in sorted(params):
        value = params[key].detach().contiguous()
        digest.update(key.encode() + b"\0" + value.numpy().tobytes())
        x = value.double()
        sums[key] = [float(x.sum()), float(x.abs().sum()), float((x * x).sum())]
    return digest.hexdigest(), sums


def _machine() -> dict:
    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": 1}


def _hexed(rows: list[dict]) -> list[dict]:
    return [{k: float(v).hex() for k, v in row.items()} for row in rows]


def make_fixture(run_dir: Path) -> dict:
    got = golden_run(run_dir)
    sha, sums = _param_summary(got["params"])
    return {
        "about": "golden off-policy trajectory; regenerate on purpose with: python tests/test_kd_golden.py --regenerate",
        **_machine(), "steps": _hexed(got["steps"]), "evals": _hexed(got["evals"]),
        "params_sha256": sha, "param_sums": sums,
    }


def _unhex(rows: list[dict]) -> list[dict]:
    return [{k: float.fromhex(v) for k, v in row.items()} for row in rows]


def test_the_off_policy_trajectory_equals_the_golden_values(tmp_path):
    golden = json.loads(FIXTURE.read_text())
    now = make_fixture(tmp_path / "run")
    same_machine = all(golden[k] == now[k] for k in ("torch", "cpu_capability", "threads"))
    origin = (f"golden values made with torch {golden['torch']} on {golden['cpu_capability']}; this run: torch "
              f"{now['torch']} on {now['cpu_capability']}. If the trajectory changed on purpose, regenerate with "
              f"`python tests/test_kd_golden.py --regenerate` and say so in the commit")
    assert len(now["steps"]) == len(golden["steps"]) == TCFG.max_steps, origin
    assert len(now["evals"]) == len(golden["evals"]) == 2, origin
    if same_machine:  # 同一个 torch、同一种 CPU 内核：逐位相同
        assert now["steps"] == golden["steps"], origin
        assert now["evals"] == golden["evals"], origin
        assert now["params_sha256"] == golden["params_sha256"], origin
        return
    for a, b in zip(_unhex(now["steps"]) + _unhex(now["evals"]), _unhex(golden["steps"]) + _unhex(golden["evals"])):
        assert a.keys() == b.keys(), origin
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=REL, abs=1e-7), f"{key}: {origin}"
    assert now["param_sums"].keys() == golden["param_sums"].keys(), origin
    for key, values in now["param_sums"].items():
        assert values == pytest.approx(golden["param_sums"][key], rel=REL, abs=1e-5), f"{key}: {origin}"


def test_the_golden_run_is_not_trivial():
    # 金标准本身有分辨力：损失在下降、KD 与 CE 都不为 0、参数确实离开了初始值
    golden = json.loads(FIXTURE.read_text())
    steps = _unhex(golden["steps"])
    assert steps[-1]["loss"] < steps[0]["loss"]
    assert all(s["kd"] > 0 and s["ce"] > 0 and s["grad_norm"] > 0 for s in steps)
    _, initial = _param_summary(init_params(STUDENT, seed=1))
    moved = [k for k in initial if initial[k] != pytest.approx(golden["param_sums"][k], rel=1e-3)]
    assert len(moved) >= len(initial) // 2


if __name__ == "__main__":
    if sys.argv[1:] != ["--regenerate"]:
        sys.exit("usage: python tests/test_kd_golden.py --regenerate   (rewrites tests/fixtures/golden_off_policy.json)")
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        fixture = make_fixture(Path(tmp) / "run")
    FIXTURE.parent.mkdir(exist_ok=True)
    FIXTURE.write_text(json.dumps(fixture, indent=1, sort_keys=True) + "\n")
    print(f"wrote {FIXTURE} (torch {fixture['torch']}, {fixture['cpu_capability']})")
