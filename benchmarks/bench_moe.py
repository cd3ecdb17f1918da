"""MoE 前馈块的吞吐基准：本项目按专家分组的 moe_ffn / deepseek_moe_ffn vs transformers 自己的 MoE 块
（Qwen3MoeSparseMoeBlock / DeepseekV3MoE），同一组权重、同一批隐藏状态、同一次运行中交替测量。

参照取 transformers 各个 CPU 上可用的专家实现（experts_implementation = eager / grouped_mm / batched_mm）中
最快的一个（“参照的最佳配置”）；每种实现的 tokens/s 都写进 JSON 的 hf_tokens_per_s。每一步是
“块的前向 + 对输出求和的反向”（梯度流到输入与全部专家权重），每个变体取各轮耗时的中位数。
计时前核对两边的输出（float32，最大绝对差写进 JSON 的 max_abs_diff；超过 1e-4 即报错：比的不是同一个计算）。

表中每个本项目变体三行（比值 = 本项目 / transformers 最佳实现）：
    <变体>            tok/s        eager（形状检查开启）与 torch.compile（分组专家是不透明的自定义算子）
    <变体>_sys        %user        100 · 系统态 / 用户态 CPU 秒，只算计时的各轮；参照为 transformers 最佳实现
    <变体>_faults     faults/step  每个计时步的次缺页数，参照同上
两边在同一个进程、同样的 malloc 设置下测量（导入 _bench_common 即应用 tune_malloc）。

用法：python benchmarks/bench_moe.py [--family qwen3_moe|deepseek_v3] [--batch 4] [--seq 128] [--rounds 7]
      python benchmarks/bench_moe.py --smoke   # 同一条路径、极小尺寸（2×16 个 token，1 轮）
"""

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

import torch
from _bench_common import (
    FAMILY_MODELS, hf_model_from_params, measured, parse_with_smoke, print_table, row, usage_rows, write_result,
)

from functional_lm import ModelConfig, init_params
from functional_lm.layers.moe import deepseek_moe_ffn, moe_ffn

SMOKE = dict(batch=2, seq=16, rounds=1, warmup=1)
MOE_FAMILIES = ("qwen3_moe", "deepseek_v3")
HF_IMPLEMENTATIONS = ("eager", "grouped_mm", "batched_mm")  # transformers 5 在 CPU 上能用的专家实现
VARIANT_ROWS = {"eager": "ours_eager", "compiled": "ours_compiled"}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=MOE_FAMILIES, default="qwen3_moe",
                        help="MoE 家族（_bench_common.FAMILY_MODELS 的形状）/ MoE family")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=7, help="每个变体测量的轮数（取中位数）")
    parser.add_argument("--warmup", type=int, default=2, help="每个变体预热（含编译）的次数")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    return parse_with_smoke(parser, argv, SMOKE)


def block_config(family: str) -> tuple[ModelConfig, int]:
    """家族的真实形状，只留到第一个 MoE 层为止（词表缩小：块与词表无关），返回 (配置, 该层的序号)。"""
    cfg = ModelConfig(**FAMILY_MODELS[family])
    layer = next(i for i in range(cfg.num_layers) if cfg.is_moe_layer(i))
    return dataclasses.replace(cfg, num_layers=layer + 1, vocab_size=256), layer


# batched_mm 为每个 (token, 专家) 对拷出一份专家权重：S·3f·d 个浮点数。超过这个字节数就不测（本机 24 GiB，
# 反向还要再存一份），在 JSON 的 hf_skipped 里写明原因。
BATCHED_MM_LIMIT = 2 * 2**30


def batched_mm_bytes(cfg: ModelConfig, tokens: int) -> int:
    """transformers batched_mm 在前向中为专家权重拷贝所占的字节数（float32）。"""
    return tokens * cfg.num_experts_per_tok * 3 * cfg.moe_intermediate_size * cfg.hidden_size * 4


def _hf_block(hf, layer: int, implementation: str):
    """transformers 模型第 layer 层的 MoE 块，专家实现切换为 implementation（不可用时返回 None）。"""
    try:
        hf.set_experts_implementation(implementation)
    except (ValueError, RuntimeError, ImportError):
        return None
    return hf.model.layers[layer].mlp


def _variants(cfg, mlp, x, hf, layer, implementations):
    """各变体各自是一次“块的前向 + 输出求和的反向”；transformers 的每种实现单独一个变体。"""
    ffn = deepseek_moe_ffn if cfg.family == "deepseek_v3" else moe_ffn
    compiled = torch.compile(lambda p, h: ffn(h, p, cfg))

    def hf_step(implementation):
        def step():
            hf.set_experts_implementation(implementation)
            out = hf.model.layers[layer].mlp(x)
            (out[0] if isinstance(out, tuple) else out).sum().backward()
        return step

    variants = {"ours_eager": lambda: ffn(x, mlp, cfg).sum().backward(),
                "ours_compiled": lambda: compiled(mlp, x).sum().backward()}
    for implementation in implementations:
        if _hf_block(hf, layer, implementation) is not None:
            variants[f"hf_{implementation}"] = hf_step(implementation)
    return variants


def _agreement(cfg, mlp, x, hf, layer, implementations) -> float:
    """两边输出的最大绝对差（transformers 的每种实现都比）；超过 1e-4 报错。"""
    ffn = deepseek_moe_ffn if cfg.family == "deepseek_v3" else moe_ffn
    with torch.no_grad():
        ours = ffn(x, mlp, cfg)
        gaps = []
        for implementation in implementations:
            block = _hf_block(hf, layer, implementation)
            if block is not None:
                out = block(x)
                gaps.append((ours - (out[0] if isinstance(out, tuple) else out)).abs().max().item())
    if max(gaps) > 1e-4:
        raise RuntimeError(f"the two MoE blocks disagree (max |diff| {max(gaps):.3g}): not the same computation")
    return max(gaps)


def _median_times(variants, tensors, rounds):
    """各变体交替测量 rounds 轮：(每个变体各轮秒数的中位数, 每个变体计时各轮的 Usage)。"""
    times, usage = {name: [] for name in variants}, {}
    for _ in range(rounds):
        for name, fn in variants.items():
            for t in tensors:
                t.grad = None
            with measured(usage, name):
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}, usage


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg, layer = block_config(args.family)
    params = {k: v.requires_grad_(True) for k, v in init_params(cfg, seed=0).items()}
    for key, value in params.items():  # 路由器放大：专家选择不再近乎均匀（真实检查点的路由是偏的）
        if key.endswith("mlp.gate.weight"):
            value.data.mul_(10.0)
    hf = hf_model_from_params(params, cfg, share=True).train()
    tokens = args.batch * args.seq
    implementations = [i for i in HF_IMPLEMENTATIONS
                       if i != "batched_mm" or batched_mm_bytes(cfg, tokens) <= BATCHED_MM_LIMIT]
    prefix = f"model.layers.{layer}.mlp."
    mlp = {k[len(prefix):]: v for k, v in params.items() if k.startswith(prefix)}
    x = torch.randn(args.batch, args.seq, cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    x.requires_grad_(True)
    gap = _agreement(cfg, mlp, x, hf, layer, implementations)
    variants = _variants(cfg, mlp, x, hf, layer, implementations)
    t0 = time.perf_counter()
    for fn in variants.values():
        for _ in range(args.warmup):
            fn()
    print(f"warm-up (incl. compile) {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    median, usage = _median_times(variants, [x, *mlp.values()], args.rounds)
    hf_names = [n for n in median if n.startswith("hf_")]
    best = min(hf_names, key=median.get)
    rows = []
    for name, key in VARIANT_ROWS.items():
        rows.append(row(name, "tok/s", tokens / median[key], tokens / median[best], median[best] / median[key]))
        rows += usage_rows(name, usage[key], usage[best])
    result = {
        "bench": "moe_block", "family": args.family, "layer": layer, "batch": args.batch, "seq": args.seq,
        "threads": args.threads, "rounds": args.rounds, "experts": cfg.num_experts, "top_k": cfg.num_experts_per_tok,
        "expert_width": cfg.moe_intermediate_size, "max_abs_diff": gap, "reference": best,
        "hf_tokens_per_s": {n[3:]: round(tokens / median[n], 1) for n in hf_names},
        "hf_skipped": {i: (f"would copy {batched_mm_bytes(cfg, tokens) / 2**30:.1f} GiB of expert weights"
                           if i not in implementations else "not available in this transformers")
                       for i in HF_IMPLEMENTATIONS if f"hf_{i}" not in median},
        "tokens_per_s": {n: round(tokens / median[n], 1) for n in VARIANT_ROWS.values()},
        "eager_vs_hf": round(median[best] / median["ours_eager"], 3),
        "compiled_vs_hf": round(median[best] / median["ours_compiled"], 3),
    }
    print_table(f"MoE block forward+backward, {args.family} layer {layer} ({cfg.num_experts} experts, top "
                f"{cfg.num_experts_per_tok}), {args.batch}x{args.seq}, median of {args.rounds} rounds "
                f"(ratio = ours / transformers {best[3:]})", rows, reference_label="transformers")
    print(json.dumps(result))
    write_result(args, __file__, argv, result, rows)
    return {**result, "rows": rows}


if __name__ == "__main__":
    main()
