"""前向 + 反向吞吐基准：本项目的函数式模型 vs transformers 的同一家族（缺省 Qwen2ForCausalLM；--family 选 qwen3 /
qwen3_moe / deepseek_v3 的小型真实形状模型）。

同一配置、同一批数据、同一次运行中交替测量（减少机器负载波动带来的偏差），每个变体取各轮耗时的中位数
（机器上有别的负载，中位数比最快一轮更稳），最后打印一行 JSON，包含各变体的 tokens/s 与比值：
    eager_vs_hf       本项目 eager（检查开启）/ transformers
    compiled_vs_hf    本项目 torch.compile / transformers
    check_overhead    形状检查的开销：另一段 --check-rounds 对“检查开启、检查关闭”交替计时（与 eager 变体
                      同样的一步前向 + 反向），取每对耗时之比的中位数减 1（越小越好）；JSON 里另有各对比值的
                      最小 / 最大值（check_pair_ratio_min / _max）与对数（check_pairs）

打印的 JSON 之前还有一张比值表（比值 = 本项目 / transformers），每个本项目变体三行：
    <变体>            tok/s        本项目与 transformers 的吞吐，比值
    <变体>_sys        %user        100 · 系统态 / 用户态 CPU 秒，只算计时的各轮（不含预热、编译）；参照为
                                   transformers 同一次运行的值，无比值
    <变体>_faults     faults/step  每个计时步的次缺页数，参照同上，无比值
两边在同一个进程、同样的 malloc 设置下测量（导入 _bench_common 即应用 tune_malloc，表前打印一行说明）。
main(argv) 返回 JSON 的内容，外加 "rows"（表中各行的未取整数值，见 _bench_common.py）。

用法：python benchmarks/bench_forward.py [--preset student-123m | --family qwen3] [--batch 2] [--seq 128] [--rounds 5] [--check-rounds 10]
      python benchmarks/bench_forward.py --smoke   # 同一条路径、极小尺寸（1 层的 smoke 模型，2×16，1 轮，2 对检查计时）
"""

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from _bench_common import (
    FAMILY_MODELS, hf_model_from_params, measured, model_config, parse_with_smoke, print_table, row, usage_rows,
    write_result,
)

from functional_lm import forward, init_params
from functional_lm.shapes import typecheck

# --smoke 的缺省值：同一条代码路径，极小尺寸（命令行上显式给出的参数仍然优先）。
SMOKE = dict(preset="smoke", batch=2, seq=16, rounds=1, warmup=1, check_rounds=2)
VARIANT_ROWS = {"eager": "ours_eager", "eager_nocheck": "ours_eager_nocheck", "compiled": "ours_compiled"}


def _loss(logits, ids):
    """下一个 token 的交叉熵；两种实现共用。"""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="student-123m", help="预设名；smoke 为 _bench_common.SMOKE_MODEL")
    parser.add_argument("--family", choices=sorted(FAMILY_MODELS), default=None,
                        help="换成该家族的小型真实形状模型（_bench_common.FAMILY_MODELS），参照为 transformers 的同一家族")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5, help="每个变体测量的轮数（取中位数）")
    parser.add_argument("--warmup", type=int, default=2, help="每个变体预热（含编译）的次数")
    parser.add_argument("--check-rounds", type=int, default=10, help="测形状检查开销时“开启、关闭”交替计时的对数")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    return parse_with_smoke(parser, argv, SMOKE)


def _variants(cfg, params, ids, hf):
    """四个变体，各自是一次“前向 + 损失 + 反向”。"""

    def ours_step():
        _loss(forward(params, ids, cfg), ids).backward()

    def ours_nocheck_step():
        with typecheck(False):
            ours_step()

    # 编译整个“前向 + 损失”，让 inductor 能把 log-softmax 与交叉熵融合进同一个图。
    compiled_loss = torch.compile(lambda p, x: _loss(forward(p, x, cfg), x))

    def ours_compiled_step():
        compiled_loss(params, ids).backward()

    def hf_step():
        _loss(hf(ids).logits, ids).backward()

    return {
        "hf": hf_step,
        "ours_eager": ours_step,
        "ours_eager_nocheck": ours_nocheck_step,
        "ours_compiled": ours_compiled_step,
    }


def _time_step(fn, params, hf, usage: dict, key: str) -> float:
    """清零两边的梯度，计时一次 fn()（秒）；这一步的进程开销累加到 usage[key]。"""
    for p in params.values():
        p.grad = None
    hf.zero_grad(set_to_none=True)
    with measured(usage, key):
        start = time.perf_counter()
        fn()
        seconds = time.perf_counter() - start
    return seconds


def _median_times(variants, params, hf, rounds):
    """各变体交替测量 rounds 轮，返回 (每个变体各轮秒数的中位数, 每个变体计时各轮的 Usage)。"""
    times, usage = {name: [] for name in variants}, {}
    for _ in range(rounds):  # 交替测量
        for name, fn in variants.items():
            times[name].append(_time_step(fn, params, hf, usage, name))
    # 取中位数：机器上其他负载会让个别轮变慢（也可能偶有一轮特别快），中位数对两头都不敏感。
    return {name: statistics.median(ts) for name, ts in times.items()}, usage


def _check_overhead(variants, params, hf, pairs):
    """形状检查开销的直接测量：pairs 对“检查开启、检查关闭”交替计时，返回 JSON 字段（中位数比值减 1 等）。"""
    ratios, scratch = [], {}
    for _ in range(pairs):
        on = _time_step(variants["ours_eager"], params, hf, scratch, "on")
        off = _time_step(variants["ours_eager_nocheck"], params, hf, scratch, "off")
        ratios.append(on / off)
    return {
        "check_overhead": round(statistics.median(ratios) - 1.0, 4),
        "check_pair_ratio_min": round(min(ratios), 4),
        "check_pair_ratio_max": round(max(ratios), 4),
        "check_pairs": len(ratios),
    }


def _rows(median, usage, tokens):
    """每个本项目变体三行：tokens/s（参照 transformers，比值由耗时算出），以及两行进程开销。"""
    rows = []
    for name, key in VARIANT_ROWS.items():
        rows.append(row(name, "tok/s", tokens / median[key], tokens / median["hf"], median["hf"] / median[key]))
        rows += usage_rows(name, usage[key], usage["hf"])
    return rows


def _record(args, median, usage, tokens):
    """JSON 的主体：尺寸、各变体 tokens/s 与相对 transformers 的比值、各变体的进程开销（均已取整）。"""
    return {
        "bench": "forward_backward",
        "preset": args.preset,
        "family": args.family or "qwen2",
        "batch": args.batch,
        "seq": args.seq,
        "threads": args.threads,
        "rounds": args.rounds,
        "tokens_per_s": {name: round(tokens / t, 1) for name, t in median.items()},
        "eager_vs_hf": round(median["hf"] / median["ours_eager"], 3),
        "eager_nocheck_vs_hf": round(median["hf"] / median["ours_eager_nocheck"], 3),
        "compiled_vs_hf": round(median["hf"] / median["ours_compiled"], 3),
        "sys_pct_user": {name: round(u.sys_pct(), 2) for name, u in usage.items()},
        "faults_per_step": {name: round(u.faults_per_step(), 1) for name, u in usage.items()},
    }


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)

    cfg = model_config(args.preset, args.family)
    params = {k: v.requires_grad_(True) for k, v in init_params(cfg, seed=0).items()}
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    hf = hf_model_from_params(params, cfg).train()
    variants = _variants(cfg, params, ids, hf)
    t0 = time.perf_counter()
    for fn in variants.values():  # 预热（含编译），不计入计时与进程开销
        for _ in range(args.warmup):
            fn()
    print(f"warm-up (incl. compile) {time.perf_counter() - t0:.1f}s", file=sys.stderr)

    median, usage = _median_times(variants, params, hf, args.rounds)
    tokens = args.batch * args.seq
    result = {**_record(args, median, usage, tokens), **_check_overhead(variants, params, hf, args.check_rounds)}
    rows = _rows(median, usage, tokens)
    print(f"shape-check overhead (checks on vs typecheck(False), median of {result['check_pairs']} alternating pairs): "
          f"{result['check_overhead']:+.1%} (pair ratios {result['check_pair_ratio_min']:.3f}"
          f"..{result['check_pair_ratio_max']:.3f})")
    print_table(f"forward+backward, {args.family or args.preset}, {args.batch}x{args.seq}, median of {args.rounds} rounds "
                "(ratio = ours / transformers)", rows, reference_label="transformers")
    print(json.dumps(result))
    write_result(args, __file__, argv, result, rows)
    return {**result, "rows": rows}


if __name__ == "__main__":
    main()
