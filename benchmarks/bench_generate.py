"""生成速度基准：我们的 generate（eager 与编译解码步）对比 transformers 的 generate，同一次运行中测量。

同一个随机初始化的 student-123m 检查点：用 save_pretrained 写出，transformers 用 AutoModelForCausalLM 读入，
我们用 load_pretrained 读入。贪心解码，批 1 与 8，每条 128 个新 token（不设 eos，保证长度相同）。
指标为解码吞吐 tokens/s = b · new_tokens / 整次 generate 的墙钟时间（提示只有 16 个 token，prefill 可忽略），
各变体轮流测若干轮、取最好值；编译的预热不计时。

transformers 一侧有两个参照：
    hf         普通的 ``model.generate``（动态 KV 缓存、eager），它的缺省用法；
    hf_static  transformers 文档（“Optimizing inference / Static kv-cache and torch.compile”）推荐的最快配置：
               ``generation_config.cache_implementation = "static"`` 加上
               ``model.forward = torch.compile(model.forward, fullgraph=True, ...)``。CPU 上 generate 不会自动编译
               （它的自动编译只对 CUDA 等设备打开），所以按文档直接编译 forward；编译设置与我们的解码步相同
               （``dynamic=False``，``mode`` 取 --compile-mode，文档写的是 reduce-overhead——它在 CPU 上不起作用，
               CUDA 上两边一起用 --compile-mode reduce-overhead）。prefill 与解码步各一张图；静态缓存按
               max_length 分配，所以预热用与计时相同的新 token 数（长度变了 transformers 会重建缓存、重新编译）。
我们的编译解码步对 hf_static 的比值才是“编译对编译”；对 hf 的比值是对 transformers 缺省用法。

核对（脚本自己的合理性检查，失败时不写结果、退出码非 0）：
    * 每个变体生成的 token 与 hf 逐位比较，我们的编译解码步还与 hf_static 比较。随机初始化的 logits 几乎
      平坦，两种实现的浮点舍入可能在近似平局处选出不同的 argmax：某行第一次不同处，用我们 eager 的 float32
      前向在参照的前缀上算出两个候选 token 的 logit 之差，差不超过 TIE_TOLERANCE 才算平局（之后两行已经
      分叉，不再比较），否则说明两边算的不是同一个东西，脚本报错。
    * 计时的各轮里 dynamo 不得再捕获新图（graphs_while_timed = 0）：两边的编译图都在预热里生成、计时中复用。
      预热里各自捕获了几张图记在 graphs_in_warmup（我们 ≥ 1，hf_static ≥ 1）。

最后打印一张比值表（比值 = 我们 / 参照），每个批大小 b 九行：

    b<b>_eager                  tok/s        我们 eager 对 hf，比值
    b<b>_compiled               tok/s        我们编译解码步对 hf，比值
    b<b>_compiled_vs_static     tok/s        我们编译解码步对 hf_static（编译对编译），比值
    b<b>_<上面三者>_sys          %user        100 · 系统态 / 用户态 CPU 秒（getrusage，计时的各轮合计），参照为
                                              同一行的参照，无比值
    b<b>_<上面三者>_faults       faults/step  每个解码步（每个新 token 位置）的次缺页数，参照同上，无比值

两边在同一个进程、同样的 malloc 设置下测量（导入 _bench_common 即应用 tune_malloc，表前打印一行说明）。
表前还有一行缓存占用：每个 token 在 KV 缓存里的字节数（所有层，本次的 dtype），本项目的缓存对每头存完整 k、v 的
缓存（transformers 的 DynamicCache 为同一模型存的量）；MLA（--family deepseek_v3）只存潜变量与 RoPE 键。
--family qwen3 | qwen3_moe | deepseek_v3 换成该家族缩小的真实形状模型（_bench_common.FAMILY_MODELS）。
随后是一行 JSON（含比值与核对结果）；进度信息写到 stderr。main(argv) 返回 JSON 的内容，外加 "rows"（表中各行的
未取整数值，见 _bench_common.py）。``--out FILE`` 另把结果与机器记录写成 JSON（见 benchmarks/results/README.md）。

    python benchmarks/bench_generate.py [--batches 1,8] [--new-tokens 128] [--repeats 2] [--device cpu] [--family F]
    python benchmarks/bench_generate.py --out benchmarks/results/bench_generate-$(date +%F).json
    python benchmarks/bench_generate.py --smoke   # 同一条路径、极小尺寸（1 层 smoke 模型，批 1，提示 4 + 新 8 个 token）
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time

import torch
from _bench_common import (
    FAMILY_MODELS, measured, model_config, parse_with_smoke, print_table, row, usage_rows, write_result,
)

from functional_lm import init_params
from functional_lm.generate import generate
from functional_lm.hf import load_pretrained, save_pretrained
from functional_lm.models.cache import cache_bytes_per_token
from functional_lm.shapes import typecheck

# --smoke 的缺省值：同一条代码路径，极小尺寸（命令行上显式给出的参数仍然优先）。
SMOKE = dict(preset="smoke", batches="1", new_tokens=8, prompt_len=4, repeats=1)
QWEN_TEXT_VOCAB = 151643  # 提示 id 的上界：Qwen2.5 的普通 token 数（小词表的模型取自己的词表大小）
# 近似平局的容差：两个候选 token 的 logit 之差不超过它时，两边选出不同的 argmax 只是浮点舍入（按参数 dtype）。
TIE_TOLERANCE = {"float32": 1e-3, "bfloat16": 1e-1}
VARIANTS = ("hf", "hf_static", "eager", "compiled")
# 表中每个批大小的三个比较：(行名后缀, 我们的变体, 参照变体)。
COMPARISONS = (("eager", "eager", "hf"), ("compiled", "compiled", "hf"), ("compiled_vs_static", "compiled", "hf_static"))


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
    parser.add_argument("--family", choices=sorted(FAMILY_MODELS), default=None,
                        help="换成该家族的小型真实形状模型（_bench_common.FAMILY_MODELS），参照为 transformers 的同一家族")
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
    """同一个随机检查点：save_pretrained 写出，我们用 load_pretrained、transformers 用 AutoModelForCausalLM 读入
    两份（hf 原样；hf_static 按文档设静态缓存并编译 forward）。"""
    import transformers

    cfg = model_config(args.preset, args.family)
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(init_params(cfg, seed=0, dtype=dtype), cfg, tmp)
        cfg, params = load_pretrained(tmp, device=args.device)
        hf_models = [transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype).to(args.device).eval()
                     for _ in range(2)]
    return cfg, params, hf_models[0], static_compiled(hf_models[1], args.compile_mode)


def static_compiled(model, mode=None):
    """transformers 文档的静态缓存 + torch.compile 配置：缓存实现设为 "static"，forward 换成编译版本
    （fullgraph=True 如文档；dynamic=False 与我们的解码步相同：prefill 与解码步各一张静态形状的图）。"""
    model.generation_config.cache_implementation = "static"
    model.forward = torch.compile(model.forward, fullgraph=True, dynamic=False, mode=mode)
    return model


def _install_compile_mode(mode):
    """--compile-mode：换掉 generate 模块里缓存的编译解码步（改的是本进程的全局状态）。"""
    from functional_lm import generate as gen_module

    gen_module.compiled_decode_step.cache_clear()
    compiled = torch.compile(gen_module.decode_step, fullgraph=True, dynamic=False, mode=mode)
    gen_module.compiled_decode_step = lambda mode=None: compiled  # type: ignore[assignment]


def _graphs() -> int:
    """本进程里 dynamo 到目前为止捕获的计算图个数。"""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _generators(args, cfg, params, hf_models, ids):
    """四个变体各自的一次 generate：new 为新 token 数（缺省 --new-tokens）。"""
    mask, cache_len = torch.ones_like(ids), args.prompt_len + args.new_tokens

    def ours(compile_step: bool, new: int = args.new_tokens):
        with typecheck(False), torch.no_grad():  # 生产用法：关闭运行时形状检查
            return generate(params, cfg, ids, new, max_cache_len=cache_len, compile=compile_step)

    def theirs(model, new: int = args.new_tokens):
        with torch.no_grad():
            return model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=new, min_new_tokens=new,
                                  pad_token_id=0, eos_token_id=None)

    hf, hf_static = hf_models
    return {"hf": lambda new=args.new_tokens: theirs(hf, new), "hf_static": lambda new=args.new_tokens: theirs(hf_static, new),
            "eager": lambda new=args.new_tokens: ours(False, new), "compiled": lambda new=args.new_tokens: ours(True, new)}


def _warm_up(fns: dict, batch: int, new_tokens: int) -> dict:
    """预热（不计时）：各变体先跑一次，记下各自捕获的图数。我们的缓存长度固定，4 个新 token 就编译了解码步；
    hf_static 的静态缓存按 max_length 分配，必须用计时时同样的新 token 数预热，否则计时时重建缓存、重新编译。"""
    graphs = {}
    for name, new in (("compiled", 4), ("hf_static", new_tokens), ("eager", 4), ("hf", 4)):
        before, t0 = _graphs(), time.perf_counter()
        fns[name](new)
        graphs[name] = _graphs() - before
        _log(f"[b={batch}] warm-up {name}: {time.perf_counter() - t0:.1f}s, {graphs[name]} graph(s) captured")
    return {"ours": graphs["compiled"], "hf_static": graphs["hf_static"]}


def _bench_batch(args, cfg, params, hf_models, batch):
    """一个批大小：预热后四个变体轮流测量，返回 (该批的结果字典, 计时, 各变体计时各轮的 Usage)。"""
    ids = torch.randint(0, min(QWEN_TEXT_VOCAB, cfg.vocab_size), (batch, args.prompt_len),
                        generator=torch.Generator().manual_seed(batch)).to(args.device)
    fns = _generators(args, cfg, params, hf_models, ids)
    warm = _warm_up(fns, batch, args.new_tokens)
    before = _graphs()
    timings, usage = _interleaved_best({name: fns[name] for name in VARIANTS}, args.repeats, args.device, batch,
                                       args.new_tokens)
    checks = token_checks(timings, params, cfg, args.prompt_len, TIE_TOLERANCE[args.dtype])
    result = _batch_result(batch, args.new_tokens, args.prompt_len, timings, usage)
    result.update(graphs_in_warmup=warm, graphs_while_timed=_graphs() - before, token_checks=checks)
    return result, timings, usage


def greedy_agreement(tokens, reference, params, cfg, prompt_len: int, tolerance: float) -> dict:
    """tokens 与 reference（(b, P+N) 的贪心输出）逐行比较。某行第一次不同（位置 j）时，用我们 eager 的前向在
    reference[:, :j] 上算位置 j 的 logits，两个候选（reference 的与 tokens 的）logit 之差 ≤ tolerance 才是
    近似平局。返回 {equal, rows_differing, first_differences: [[行, 位置, logit 差], ...], ok}。"""
    from functional_lm import forward

    diffs = []
    for r in range(tokens.shape[0]):
        unequal = (tokens[r, prompt_len:] != reference[r, prompt_len:]).nonzero()
        if len(unequal) == 0:
            continue
        j = prompt_len + int(unequal[0])
        with torch.no_grad():
            logits = forward(params, reference[r : r + 1, :j], cfg)[0, -1].double()
        gap = float((logits[reference[r, j]] - logits[tokens[r, j]]).abs())
        diffs.append([r, j, gap])
    return {"equal": not diffs, "rows_differing": len(diffs), "first_differences": diffs,
            "ok": all(gap <= tolerance for _, _, gap in diffs)}


def token_checks(timings, params, cfg, prompt_len: int, tolerance: float) -> dict:
    """各变体的输出对参照：eager、compiled、hf_static 对 hf；compiled 对 hf_static（编译对编译）。"""
    out = {name: value[1] for name, value in timings.items()}
    pairs = {"eager_vs_hf": ("eager", "hf"), "compiled_vs_hf": ("compiled", "hf"),
             "hf_static_vs_hf": ("hf_static", "hf"), "compiled_vs_hf_static": ("compiled", "hf_static")}
    return {key: greedy_agreement(out[a], out[b], params, cfg, prompt_len, tolerance) for key, (a, b) in pairs.items()}


def _batch_result(batch, n, prompt_len, timings, usage):
    """一个批大小写进 JSON 的结果：各变体 tokens/s 与比值、进程开销、每个变体实际生成的新 token 数。"""
    tok_s = {name: batch * n / sec for name, (sec, _) in timings.items()}
    return {
        **{f"{name}_tok_s": round(tok_s[name], 2) for name in VARIANTS},
        "eager_vs_hf": round(tok_s["eager"] / tok_s["hf"], 3),
        "compiled_vs_hf": round(tok_s["compiled"] / tok_s["hf"], 3),
        "compiled_vs_hf_static": round(tok_s["compiled"] / tok_s["hf_static"], 3),
        "hf_static_vs_hf": round(tok_s["hf_static"] / tok_s["hf"], 3),
        "sys_pct_user": {name: round(u.sys_pct(), 2) for name, u in usage.items()},
        "faults_per_step": {name: round(u.faults_per_step(), 1) for name, u in usage.items()},
        # 每个变体实际生成的新 token 数（吞吐的分子按 new_tokens 计，两者必须相等）
        "new_tokens_out": {name: out.shape[-1] - prompt_len for name, (_, out) in timings.items()},
    }


def _batch_rows(batch, n, timings, usage):
    """一个批大小的九行：三个比较（见 COMPARISONS）各一行 tokens/s（比值由墙钟时间直接算出）与两行进程开销。"""
    rows = []
    for suffix, mine, ref in COMPARISONS:
        ref_s, mine_s = timings[ref][0], timings[mine][0]
        rows.append(row(f"b{batch}_{suffix}", "tok/s", batch * n / mine_s, batch * n / ref_s, ref_s / mine_s))
        rows += usage_rows(f"b{batch}_{suffix}", usage[mine], usage[ref])
    return rows


def check_sanity(results: dict) -> None:
    """合理性检查（见模块说明）：token 不一致且不是近似平局、或计时中又编译了新图时报错（一段话，退出码 1）。"""
    problems = []
    for key, res in results.items():
        problems += [f"{key} {pair}: first differences (row, position, logit gap) {c['first_differences']}"
                     for pair, c in res["token_checks"].items() if not c["ok"]]
        if res["graphs_while_timed"]:
            problems.append(f"{key}: {res['graphs_while_timed']} graph(s) were compiled during the timed rounds")
        if res["graphs_in_warmup"]["hf_static"] < 1:
            problems.append(f"{key}: transformers' static-cache forward was not compiled")
    if problems:
        raise SystemExit("bench_generate: the sides did not compute the same thing, so no ratio is reported: "
                         + "; ".join(problems))


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    import transformers

    dtype = getattr(torch, args.dtype)
    cfg, params, hf_model, hf_static = _load_models(args, dtype)
    if args.compile_mode is not None:
        _install_compile_mode(args.compile_mode)

    results, rows = {}, []
    for batch in [int(b) for b in args.batches.split(",")]:
        results[f"batch_{batch}"], timings, usage = _bench_batch(args, cfg, params, (hf_model, hf_static), batch)
        rows += _batch_rows(batch, args.new_tokens, timings, usage)
    check_sanity(results)

    first = results[f"batch_{args.batches.split(',')[0]}"]
    record = {
        "benchmark": "generate",
        "preset": args.preset,
        "family": args.family or "qwen2",
        "device": args.device,
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "new_tokens": args.new_tokens,
        "prompt_len": args.prompt_len,
        "compile_mode": args.compile_mode,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "results": results,
        # 每个 token 的缓存字节数（所有层，本次的 dtype）：本项目的缓存；per_head_kv 是每头存完整 k、v 的缓存，
        # 即 transformers 的 DynamicCache 为同一模型存的量（MLA 时它存展开后的每头键值，GQA 时两者相同）
        "cache_bytes_per_token": cache_bytes_per_token(cfg, dtype),
        "target_compiled_vs_hf_batch_1": 2.0,
        "target_met": first["compiled_vs_hf"] >= 2.0,
    }
    cache = record["cache_bytes_per_token"]
    print(f"KV cache per token ({args.dtype}, all layers): ours {cache['cache']:,} B, per-head k/v as transformers "
          f"stores it {cache['per_head_kv']:,} B ({cache['per_head_kv'] / cache['cache']:.1f}x)")
    print_table(f"greedy decoding, {args.preset}, {args.dtype}, {args.new_tokens} new tokens (ratio = ours / "
                "reference: transformers generate, or for *_vs_static its static cache + torch.compile)", rows,
                reference_label="transformers")
    print(json.dumps(record))
    write_result(args, __file__, argv, record, rows)
    return {**record, "rows": rows}


if __name__ == "__main__":
    main()
