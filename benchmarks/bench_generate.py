"""生成速度基准：我们的 generate（eager 与编译解码步）对比 transformers 的 generate，同一次运行中测量。

同一个随机初始化的 student-123m 检查点：用 save_pretrained 写出，transformers 用 AutoModelForCausalLM 读入，
我们用 load_pretrained 读入。贪心解码，批 1 与 8，每条 128 个新 token（不设 eos，保证长度相同）。
指标为解码吞吐 tokens/s = b · new_tokens / 整次 generate 的墙钟时间（提示只有 16 个 token，prefill 可忽略），
各变体轮流测若干轮、取最好值；编译的预热不计时。最后打印一张比值表（比值 = 我们 / transformers），每个批大小 b
与变体（eager、compiled）三行：

    b<b>_<变体>          tok/s        解码吞吐，参照 transformers，比值
    b<b>_<变体>_sys      %user        100 · 系统态 / 用户态 CPU 秒（getrusage，计时的各轮合计），参照为
                                      transformers generate 同一次运行的值，无比值
    b<b>_<变体>_faults   faults/step  每个解码步（每个新 token 位置）的次缺页数，参照同上，无比值

两边在同一个进程、同样的 malloc 设置下测量（导入 _bench_common 即应用 tune_malloc，表前打印一行说明）。
随后是一行 JSON（含比值）；进度信息写到 stderr。main(argv) 返回 JSON 的内容，外加 "rows"（表中各行的
未取整数值，见 _bench_common.py）。

    python benchmarks/bench_generate.py [--batches 1,8] [--new-tokens 128] [--repeats 2] [--device cpu]
    python benchmarks/bench_generate.py --smoke   # 同一条路径、极小尺寸（1 层 smoke 模型，批 1，提示 4 + 新 8 个 token）
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time

import torch
from _bench_common import measured, model_config, parse_with_smoke, print_table, row, usage_rows

from functional_lm import init_params
from functional_lm.generate import generate
from functional_lm.hf import load_pretrained, save_pretrained
from functional_lm.typing import typecheck

# --smoke 的缺省值：同一条代码路径，极小尺寸（命令行上显式给出的参数仍然优先）。
SMOKE = dict(preset="smoke", batches="1", new_tokens=8, prompt_len=4, repeats=1)
QWEN_TEXT_VOCAB = 151643  # 提示 id 的上界：Qwen2.5 的普通 token 数（小词表的模型取自己的词表大小）


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _interleaved_best(fns: dict, repeats: int, device: str, batch: int, n: int) -> tuple[dict, dict]:
    """各变体轮流运行 repeats 轮，每个取最短墙钟时间；返回 ({变体: (秒数, 输出)}, {变体: 各轮合计的 Usage})。

    机器与别人共享、负载随时间波动：轮流测量让各变体经历相近的负载，比值更可信；最短值最接近真实能力。
    进程开销（Usage）按各轮合计，每轮记 n 个解码步。
    """
    best, usage = {name: (float("inf"), None) for name in fns}, {}
    for round_ in range(repeats):
        for name, fn in fns.items():
            _sync(device)
            with measured(usage, name, steps=n):
                start = time.perf_counter()
                out = fn()
                _sync(device)
                seconds = time.perf_counter() - start
            _log(f"[b={batch}] round {round_}: {name} {seconds:.2f}s, {batch * n / seconds:.1f} tok/s")
            if seconds < best[name][0]:
                best[name] = (seconds, out)
    return best, usage


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="student-123m", help="预设名；smoke 为 _bench_common.SMOKE_MODEL")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile-mode", default=None, help="torch.compile mode（CUDA 上可用 reduce-overhead）")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU 线程数（缺省用 torch 的设置）")
    return parse_with_smoke(parser, argv, SMOKE)


def _load_models(args, dtype):
    """同一个随机检查点：save_pretrained 写出，我们用 load_pretrained、transformers 用 AutoModelForCausalLM 读入。"""
    import transformers

    cfg = model_config(args.preset)
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(init_params(cfg, seed=0, dtype=dtype), cfg, tmp)
        cfg, params = load_pretrained(tmp, device=args.device)
        hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype).to(args.device).eval()
    return cfg, params, hf_model


def _install_compile_mode(mode):
    """--compile-mode：换掉 generate 模块里缓存的编译解码步（改的是本进程的全局状态）。"""
    from functional_lm import generate as gen_module

    gen_module.compiled_decode_step.cache_clear()
    compiled = torch.compile(gen_module.decode_step, fullgraph=True, dynamic=False, mode=mode)
    gen_module.compiled_decode_step = lambda mode=None: compiled  # type: ignore[assignment]


def _bench_batch(args, cfg, params, hf_model, batch):
    """一个批大小：预热后三个变体轮流测量，返回 (该批的结果字典, 计时, 各变体计时各轮的 Usage)。"""
    cache_len = args.prompt_len + args.new_tokens
    ids = torch.randint(0, min(QWEN_TEXT_VOCAB, cfg.vocab_size), (batch, args.prompt_len),
                        generator=torch.Generator().manual_seed(batch))
    ids = ids.to(args.device)
    mask = torch.ones_like(ids)
    n = args.new_tokens

    def ours(compile_step: bool, new: int = n):
        with typecheck(False), torch.no_grad():  # 生产用法：关闭运行时形状检查
            return generate(params, cfg, ids, new, max_cache_len=cache_len, compile=compile_step)

    def theirs(new: int = n):
        with torch.no_grad():
            return hf_model.generate(
                ids, attention_mask=mask, do_sample=False, max_new_tokens=new, min_new_tokens=new,
                pad_token_id=0, eos_token_id=None,
            )

    _log(f"[b={batch}] warm-up (includes compiling the decode step)")
    t0 = time.perf_counter()
    ours(True, 4)
    _log(f"[b={batch}] compile warm-up took {time.perf_counter() - t0:.1f}s")
    ours(False, 4)
    theirs(4)
    variants = {"hf": theirs, "eager": lambda: ours(False), "compiled": lambda: ours(True)}
    timings, usage = _interleaved_best(variants, args.repeats, args.device, batch, n)
    return _batch_result(batch, n, args.prompt_len, timings, usage), timings, usage


def _batch_result(batch, n, prompt_len, timings, usage):
    """一个批大小写进 JSON 的结果：各变体 tokens/s 与比值、进程开销、输出是否一致。"""
    tok_s = {name: batch * n / sec for name, (sec, _) in timings.items()}
    return {
        "hf_tok_s": round(tok_s["hf"], 2),
        "eager_tok_s": round(tok_s["eager"], 2),
        "compiled_tok_s": round(tok_s["compiled"], 2),
        "eager_vs_hf": round(tok_s["eager"] / tok_s["hf"], 3),
        "compiled_vs_hf": round(tok_s["compiled"] / tok_s["hf"], 3),
        "sys_pct_user": {name: round(u.sys_pct(), 2) for name, u in usage.items()},
        "faults_per_step": {name: round(u.faults_per_step(), 1) for name, u in usage.items()},
        # 随机初始化的 logits 几乎平坦，近似平局时 argmax 可能因浮点误差不同，这里只作参考
        "greedy_tokens_equal_hf": timings["hf"][1].tolist() == timings["eager"][1].tolist(),
        "compiled_equals_eager": timings["compiled"][1].tolist() == timings["eager"][1].tolist(),
        # 每个变体实际生成的新 token 数（吞吐的分子按 new_tokens 计，两者必须相等）
        "new_tokens_out": {name: out.shape[-1] - prompt_len for name, (_, out) in timings.items()},
    }


def _batch_rows(batch, n, timings, usage):
    """一个批大小的六行：eager 与编译解码步各一行 tokens/s（比值由墙钟时间直接算出）与两行进程开销，
    参照都是 transformers。"""
    hf_s, rows = timings["hf"][0], []
    for name in ("eager", "compiled"):
        rows.append(row(f"b{batch}_{name}", "tok/s", batch * n / timings[name][0], batch * n / hf_s,
                        hf_s / timings[name][0]))
        rows += usage_rows(f"b{batch}_{name}", usage[name], usage["hf"])
    return rows


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    import transformers

    dtype = getattr(torch, args.dtype)
    cfg, params, hf_model = _load_models(args, dtype)
    if args.compile_mode is not None:
        _install_compile_mode(args.compile_mode)

    results, rows = {}, []
    for batch in [int(b) for b in args.batches.split(",")]:
        results[f"batch_{batch}"], timings, usage = _bench_batch(args, cfg, params, hf_model, batch)
        rows += _batch_rows(batch, args.new_tokens, timings, usage)

    first = results[f"batch_{args.batches.split(',')[0]}"]
    record = {
        "benchmark": "generate",
        "preset": args.preset,
        "device": args.device,
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "new_tokens": args.new_tokens,
        "prompt_len": args.prompt_len,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "results": results,
        "target_compiled_vs_hf_batch_1": 2.0,
        "target_met": first["compiled_vs_hf"] >= 2.0,
    }
    print_table(f"greedy decoding, {args.preset}, {args.dtype}, {args.new_tokens} new tokens "
                "(ratio = ours / transformers generate)", rows, reference_label="transformers")
    print(json.dumps(record))
    return {**record, "rows": rows}


if __name__ == "__main__":
    main()
