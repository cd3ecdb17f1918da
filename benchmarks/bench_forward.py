"""前向 + 反向吞吐基准：本项目的函数式模型 vs transformers 的 Qwen2ForCausalLM。

同一配置、同一批数据、同一次运行中交替测量（减少机器负载波动带来的偏差），
最后打印一行 JSON，包含各变体的 tokens/s 与比值：
    eager_vs_hf       本项目 eager（检查开启）/ transformers
    compiled_vs_hf    本项目 torch.compile / transformers
    check_overhead    检查开启相对关闭多花的时间比例（越小越好）

打印的 JSON 之前还有一张比值表（tokens/s，比值 = 本项目 / transformers）；main(argv) 返回 JSON 的内容，
外加 "rows"（表中各行的未取整数值，见 _bench_common.py）。

用法：python benchmarks/bench_forward.py [--preset student-123m] [--batch 2] [--seq 128] [--rounds 5]
      python benchmarks/bench_forward.py --smoke   # 同一条路径、极小尺寸（1 层的 smoke 模型，2×16，1 轮）
"""

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F
from _bench_common import model_config, parse_with_smoke, print_table, row

from functional_lm import forward, init_params
from functional_lm.typing import typecheck

# --smoke 的缺省值：同一条代码路径，极小尺寸（命令行上显式给出的参数仍然优先）。
SMOKE = dict(preset="smoke", batch=2, seq=16, rounds=1, warmup=1, check_calls=3)
VARIANT_ROWS = {"eager": "ours_eager", "eager_nocheck": "ours_eager_nocheck", "compiled": "ours_compiled"}


def _hf_model(cfg, params):
    import transformers

    hf_cfg = transformers.Qwen2Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads, max_position_embeddings=cfg.max_seq_len,
        rope_theta=cfg.rope_theta, rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_word_embeddings,
    )
    model = transformers.Qwen2ForCausalLM(hf_cfg)
    model.load_state_dict(params, strict=False)  # 同一组权重
    return model.train()


def _loss(logits, ids):
    """下一个 token 的交叉熵；两种实现共用。"""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="student-123m", help="预设名；smoke 为 _bench_common.SMOKE_MODEL")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5, help="每个变体测量的轮数（取最快一轮）")
    parser.add_argument("--warmup", type=int, default=2, help="每个变体预热（含编译）的次数")
    parser.add_argument("--check-calls", type=int, default=20, help="估计形状检查固定开销时交替计时的次数")
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


def _best_times(variants, params, hf, rounds):
    """各变体交替测量 rounds 轮，返回每个变体最快一轮的秒数。"""
    times = {name: [] for name in variants}
    for _ in range(rounds):  # 交替测量
        for name, fn in variants.items():
            for p in params.values():
                p.grad = None
            hf.zero_grad(set_to_none=True)
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    # 取每个变体的最快一轮：机器上其他负载只会让某一轮变慢，最小值最接近真实开销。
    return {name: min(ts) for name, ts in times.items()}


def _check_fixed_cost_ms(params, ids, cfg, calls):
    """检查开销的精确估计：只做前向、小输入、多次交替计时（与批大小无关的固定开销，单位毫秒）。"""
    small = ids[:1, :8]
    per_call = {True: [], False: []}
    with torch.no_grad():
        for _ in range(calls):
            for enabled in (True, False):
                with typecheck(enabled):
                    start = time.perf_counter()
                    forward(params, small, cfg)
                    per_call[enabled].append(time.perf_counter() - start)
    return (min(per_call[True]) - min(per_call[False])) * 1e3


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)

    cfg = model_config(args.preset)
    params = {k: v.requires_grad_(True) for k, v in init_params(cfg, seed=0).items()}
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    hf = _hf_model(cfg, params)
    variants = _variants(cfg, params, ids, hf)
    t0 = time.perf_counter()
    for fn in variants.values():  # 预热（含编译）
        for _ in range(args.warmup):
            fn()
    print(f"warm-up (incl. compile) {time.perf_counter() - t0:.1f}s", file=sys.stderr)

    median = _best_times(variants, params, hf, args.rounds)
    tokens = args.batch * args.seq
    result = {
        "bench": "forward_backward",
        "preset": args.preset,
        "batch": args.batch,
        "seq": args.seq,
        "threads": args.threads,
        "tokens_per_s": {name: round(tokens / t, 1) for name, t in median.items()},
        "eager_vs_hf": round(median["hf"] / median["ours_eager"], 3),
        "eager_nocheck_vs_hf": round(median["hf"] / median["ours_eager_nocheck"], 3),
        "compiled_vs_hf": round(median["hf"] / median["ours_compiled"], 3),
        "check_overhead": round(median["ours_eager"] / median["ours_eager_nocheck"] - 1.0, 4),
    }
    fixed_ms = _check_fixed_cost_ms(params, ids, cfg, args.check_calls)
    result["check_fixed_cost_ms_per_forward"] = round(fixed_ms, 2)
    result["check_overhead_estimate"] = round(fixed_ms / 1e3 / median["ours_eager_nocheck"], 4)
    rows = [
        row(name, "tok/s", tokens / median[key], tokens / median["hf"], median["hf"] / median[key])
        for name, key in VARIANT_ROWS.items()
    ]
    print_table(f"forward+backward, {args.preset}, {args.batch}x{args.seq} (ratio = ours / transformers)",
                rows, reference_label="transformers")
    print(json.dumps(result))
    return {**result, "rows": rows}


if __name__ == "__main__":
    main()
