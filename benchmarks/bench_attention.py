"""文档掩码（segment_ids）的代价：打包的 8 × 512 批，带文档编号 vs 不带，eager 与 torch.compile，前向 + 反向。

测的是一层注意力 ``gqa_attention``（q/k/v/o 投影 + RoPE + 注意力，学生 student-123m 的形状：隐藏 512、8 头、
2 个 KV 头），因为文档编号只改变这一层；整个模型里注意力之外的部分（前馈、输出投影）两边完全相同。

    without   纯因果注意力：SDPA 的 is_causal 路径（编译时 inductor 里同一个 SDPA）
    with      带文档编号：eager 下 SDPA + 布尔块对角掩码 (b, 1, t, t)；编译且不求梯度（推理、教师前向）时
              FlexAttention + BlockMask，全遮的 128×128 块跳过不算；编译且要反向时仍是 SDPA + 布尔掩码
              （torch 2.13 的 CPU FlexAttention 没有反向；CUDA 上训练也走 flex）

两种用法各测一遍：train = 前向 + 反向（学生），infer = no_grad 前向（教师）。

文档长度取几何分布（均值 --doc-lengths，缺省 64 与 256），按打包器的方式首尾相接切成 512 的块。
每一行（<eager|compiled>_<train|infer>_doc<均长>）：ours = 带编号的 tokens/s，reference = 不带编号的
tokens/s，ratio = ours / reference（issue 13 的目标：编译时 ≥ 1.0，即不慢于不带编号；eager ≥ 0.87，即耗时 ≤ 1.15 倍）。
同一进程里交替测量 --rounds 轮、取中位数；进程开销行（*_sys、*_faults）的含义见 _bench_common.py。

    python benchmarks/bench_attention.py            # 8 × 512，文档均长 64 与 256
    python benchmarks/bench_attention.py --smoke    # 同一条路径、极小尺寸（2 × 128，文档均长 16）
"""

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np
import torch
from _bench_common import measured, model_config, parse_with_smoke, print_table, row, usage_rows, write_result

from functional_lm.layers import gqa_attention, sub_params
from functional_lm.models.decoder import init_params
from functional_lm.shapes import typecheck

SMOKE = dict(preset="smoke", batch=2, seq=128, doc_lengths="16", rounds=1, warmup=1)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="student-123m", help="取注意力形状的预设；smoke 为 _bench_common.SMOKE_MODEL")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--doc-lengths", default="64,256", help="文档平均长度（逗号分隔）")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2, help="每个变体预热（含编译）的次数")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    return parse_with_smoke(p, argv, SMOKE)


def packed_segments(batch: int, seq: int, mean_length: int, seed: int = 0) -> torch.Tensor:
    """打包器那样首尾相接的文档流切成 (batch, seq) 的块，每个 token 的文档编号（每行从 0 起）。"""
    rng = np.random.default_rng(seed)
    lengths = rng.geometric(1.0 / mean_length, size=batch * seq)  # 足够多的文档
    doc = np.repeat(np.arange(len(lengths)), lengths)[: batch * seq].reshape(batch, seq)
    return torch.from_numpy(doc - doc[:, :1])


KINDS = ("eager_train", "compiled_train", "eager_infer", "compiled_infer")


def _variants(args, mean_length):
    """八个变体：{eager, 编译} × {训练（前向 + 反向）, 推理（no_grad 前向，如教师）} × {带, 不带文档编号}。

    返回 (变体, 需清零梯度的叶子, 文档编号)。"""
    cfg = model_config(args.preset)
    layer = sub_params(init_params(cfg.replace(num_layers=1)), "model.layers.0.self_attn.")
    attn = {k: v.requires_grad_(True) for k, v in layer.items()}
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, args.seq, cfg.hidden_size, generator=g).requires_grad_(True)
    seg = packed_segments(args.batch, args.seq, mean_length)
    compiled = torch.compile(lambda x_, a, c, **kw: gqa_attention(x_, a, c, **kw))

    def train(fn, **kw):
        return lambda: fn(x, attn, cfg, **kw).square().mean().backward()

    def infer(fn, **kw):
        def run():
            with torch.no_grad():
                fn(x, attn, cfg, **kw)
        return run

    variants = {}
    for kind, mode, fn in (("eager_train", train, gqa_attention), ("compiled_train", train, compiled),
                           ("eager_infer", infer, gqa_attention), ("compiled_infer", infer, compiled)):
        variants[f"{kind}_without"] = mode(fn)
        variants[f"{kind}_with"] = mode(fn, segment_ids=seg)
    return variants, [x, *attn.values()], seg


def _measure(variants, leaves, rounds):
    """交替测量 rounds 轮：每个变体各轮秒数的中位数，与计时各轮的进程开销。"""
    times, usage = {name: [] for name in variants}, {}
    for _ in range(rounds):
        for name, fn in variants.items():
            for leaf in leaves:
                leaf.grad = None
            with measured(usage, name):
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}, usage


def _rows(mean_length, median, usage, tokens):
    """每种文档长度、每个 KINDS 一行 tok/s 加各自的进程开销行：ours = 带编号，reference = 不带。"""
    rows = []
    for kind in KINDS:
        name = f"{kind}_doc{mean_length}"
        mine, ref = median[f"{kind}_with"], median[f"{kind}_without"]
        rows.append(row(name, "tok/s", tokens / mine, tokens / ref, ref / mine))
        rows += usage_rows(name, usage[f"{kind}_with"], usage[f"{kind}_without"])
    return rows


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    tokens = args.batch * args.seq
    rows, result = [], {"bench": "attention_segments", "preset": args.preset, "batch": args.batch, "seq": args.seq,
                        "threads": args.threads, "docs": {}}
    with typecheck(False):  # 两边同样关掉形状检查：只比注意力本身
        for mean_length in (int(v) for v in args.doc_lengths.split(",")):
            variants, leaves, seg = _variants(args, mean_length)
            for fn in variants.values():
                for _ in range(args.warmup):
                    fn()
            median, usage = _measure(variants, leaves, args.rounds)
            result["docs"][str(mean_length)] = {
                "documents_per_row": round(float(seg.max(dim=1).values.float().mean()) + 1, 1),
                "seconds": {k: round(v, 5) for k, v in median.items()},
            }
            rows += _rows(mean_length, median, usage, tokens)
    print_table(f"attention (train = fwd+bwd, infer = no_grad fwd), {args.preset} shape, {args.batch}x{args.seq}, median of {args.rounds} rounds "
                "(ratio = with segment ids / without)", rows, ours_label="with_segments", reference_label="without")
    print(json.dumps(result))
    write_result(args, __file__, argv, result, rows)
    return {**result, "rows": rows}


if __name__ == "__main__":
    main(sys.argv[1:])
