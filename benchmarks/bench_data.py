"""数据流水线基准：分词吞吐（token/s）与打包批加载吞吐（token/s），并与同一次运行中测得的参照比较。

    python benchmarks/bench_data.py [--repeat 8] [--workers 2] [--seq-len 512] [--batch-size 8] [--student-step]
    python benchmarks/bench_data.py --smoke   # 同一条路径、极小尺寸（语料 1 遍、(4, 64) 的批 50 个、1 层 smoke 学生实测一步）

打印：
    * 分词：离线默认分词器（tiktoken）单进程 / 多进程缓存构建，对照 Hugging Face tokenizers（同一词表的
      tokenizer.json）的单进程吞吐，给出比值；
    * 加载：从 memmap 缓存取 (input_ids, labels, loss_mask) 批的吞吐；
    * 学生训练一步的吞吐（--student-step：在本机用 functional_lm.models.decoder 实测一次前向 + 反向；另给出按
      6·N·token 的 FLOP 估算在 H100 上的量级），以及“加载吞吐 / 训练吞吐”之比——大于 1 表示加载器跑在训练前面。
语料：内置默认语料（pydoc_data.topics）重复 --repeat 次。
最后打印一张表（有参照的行给出比值 = 我们 / 参照）；main(argv) 返回 {"rows": 表中各行的未取整数值, ...}，
见 _bench_common.py。有自然参照的两段计时另有进程开销行（getrusage，只算计时的那一段；无比值）：

    tokenize_sys / tokenize_faults   默认分词器逐篇 encode() vs HF tokenizers 逐篇 encode()；
                                     %user = 100 · 系统态 / 用户态 CPU 秒，faults/step = 每篇文档的次缺页数
    loader_sys / loader_faults       加载器取批 vs 本机实测的学生训练步（--student-step）；faults/step 为每个批 /
                                     每个训练步的次缺页数；没有实测训练步时参照为 None
两边在同一个进程、同样的 malloc 设置下测量（导入 _bench_common 即应用 tune_malloc，表前打印一行说明）。
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from _bench_common import Usage, measured, model_config, parse_with_smoke, print_table, row, usage_rows, write_result

from functional_lm.data import BatchLoader, DocumentSource, build_token_cache, default_corpus, load_tokenizer, pack
from functional_lm.data.sources import Document

# --smoke 的缺省值：同一条代码路径（含可选的学生训练步），极小尺寸；显式参数仍然优先。
SMOKE = dict(repeat=1, workers=2, seq_len=64, batch_size=4, max_batches=50, student_step=True, student_preset="smoke")
REAL_VOCAB = 151665


def _timed(fn, usage: dict | None = None, key: str = "", steps: int = 1):
    """计时一次 fn()，返回 (输出, 秒数)；给了 usage 就把这一段的进程开销（记 steps 步）累加到 usage[key]。"""
    with measured({} if usage is None else usage, key, steps):
        start = time.perf_counter()
        out = fn()
        seconds = time.perf_counter() - start
    return out, seconds


def _repeated_source(docs: list[str], repeat: int) -> DocumentSource:
    """默认语料重复 repeat 次（每次在文首加编号，使缓存键和内容都不同于原语料）。"""

    def read(skip_errors, stats):
        for r in range(repeat):
            for i, text in enumerate(docs):
                yield Document(f"[{r}] {text}", None, "bench", r * len(docs) + i + 1)

    return DocumentSource(f"bench-x{repeat}", f"bench-x{repeat}-{len(docs)}", read)


def bench_tokenize(docs: list[str], repeat: int, workers: int, cache_dir: Path) -> list[dict]:
    """分词吞吐：默认分词器 vs HF tokenizers（参照），以及单进程 / 多进程缓存构建；返回表中的行。"""
    tok = load_tokenizer(None)
    texts = [f"[{r}] {t}" for r in range(repeat) for t in docs]
    usage: dict = {}  # 两边逐篇 encode() 的进程开销，每篇文档记一步
    ids, dt = _timed(lambda: [tok.encode(t) for t in texts], usage, "ours", len(texts))
    n = sum(map(len, ids))
    print(f"corpus: {len(texts)} docs, {sum(map(len, texts)) / 1e6:.2f} M chars, {n / 1e6:.2f} M tokens")
    print(f"tokenize  tiktoken (default), 1 thread, encode()     : {n / dt / 1e6:7.2f} M tok/s")
    _, dt_b = _timed(lambda: tok.encode_batch(texts))
    print(f"tokenize  tiktoken (default), encode_batch (threads) : {n / dt_b / 1e6:7.2f} M tok/s")
    from functional_lm.data.tokenizer import save_default_tokenizer

    ref_dir = cache_dir / "hf-tokenizer"
    save_default_tokenizer(ref_dir)
    hf = load_tokenizer(ref_dir)
    hf_ids, dt_hf = _timed(lambda: [hf.encode(t) for t in texts], usage, "reference", len(texts))
    assert hf_ids == ids, "reference tokenizer disagrees"
    print(f"reference HF tokenizers, 1 thread, encode()          : {n / dt_hf / 1e6:7.2f} M tok/s"
          f"   (ours / reference = {dt_hf / dt:.2f}x)")
    rows = [row("tokenize", "tok/s", n / dt, n / dt_hf, dt_hf / dt),
            *usage_rows("tokenize", usage["ours"], usage["reference"]), row("tokenize_batch", "tok/s", n / dt_b)]
    for w in sorted({0, workers}):
        src = _repeated_source(docs, repeat)
        store, dt_c = _timed(
            lambda: build_token_cache([src], tok, cache_dir / f"w{w}", num_workers=w, progress=False)
        )
        assert store.num_tokens == n + store.num_documents
        print(f"build_token_cache, workers={w} (read+tokenize+write) : {store.num_tokens / dt_c / 1e6:7.2f} M tok/s")
        rows.append(row(f"cache_build_w{w}", "tok/s", store.num_tokens / dt_c))
    return rows


def bench_loader(cache_dir: Path, repeat: int, seq_len: int, batch_size: int,
                 max_batches: int = 400) -> tuple[float, Usage]:
    """从 memmap 缓存取打包批的吞吐（token/s），最多取 max_batches 个批；返回 (吞吐, 取批这一段的 Usage，每批一步)。"""
    tok = load_tokenizer(None)
    store = build_token_cache([_repeated_source(default_corpus(), repeat)], tok, cache_dir / "w0", progress=False)
    train, _ = pack(store, seq_len, val_fraction=0.01, seed=0)
    loader = BatchLoader(train, batch_size, seed=0)
    steps, usage = min(len(loader), max_batches), {}
    with measured(usage, "loader", steps):
        start = time.perf_counter()
        for _ in range(steps):
            batch = loader.next_batch()
        dt = time.perf_counter() - start
    rate = steps * batch_size * seq_len / dt
    print(f"loader    memmap → (b={batch_size}, t={seq_len}) int64 batches: {rate / 1e6:7.2f} M tok/s "
          f"({dt / steps * 1e3:.2f} ms/batch, {steps} batches)")
    assert batch.input_ids.shape == (batch_size, seq_len)
    return rate, usage["loader"]


def _student_params_estimate(cfg) -> int:
    d, f, L, v = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers, cfg.vocab_size
    kv = cfg.num_kv_heads * cfg.head_dim
    per_layer = d * d + 2 * d * kv + d * d + 3 * d * f + 2 * d + d + 2 * kv
    return v * d + L * per_layer + d


def bench_student(seq_len: int, batch_size: int, run_step: bool,
                  preset: str = "student-123m") -> tuple[float, list, Usage | None]:
    """学生训练一步的吞吐：H100 上的 FLOP 估算，--student-step 时再在本机实测一步；
    返回 (较快者, 表中的行, 实测那一步的 Usage；没有实测时为 None)。"""
    cfg = model_config(preset).replace(max_seq_len=max(seq_len, 512))
    n_params = _student_params_estimate(cfg)
    flops_per_token = 6 * n_params + 12 * cfg.num_layers * cfg.hidden_size * seq_len  # 前向+反向，含注意力
    h100 = 989e12 * 0.4 / flops_per_token  # H100 bf16 稠密峰值 × 40% MFU 的量级估算
    print(f"student   ~{n_params / 1e6:.1f}M params; estimated H100 train step (bf16, 40% MFU): "
          f"{h100 / 1e6:7.2f} M tok/s")
    rows = [row("student_h100_estimate", "tok/s", h100)]
    if not run_step:
        return h100, rows, None
    try:
        from functional_lm.models.decoder import forward, init_params
    except ImportError as err:  # 模型模块不可用时只给估算
        print(f"student   CPU step skipped ({err})")
        return h100, rows, None
    params = init_params(cfg, seed=0)
    params = {k: v.requires_grad_(True) for k, v in params.items()}
    ids = torch.randint(0, min(REAL_VOCAB, cfg.vocab_size), (1, seq_len))

    def step():
        logits = forward(params, ids, cfg)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), ids.flatten())
        loss.backward()

    step()  # 预热，不计入计时与进程开销
    usage: dict = {}
    _, dt = _timed(step, usage, "student")
    cpu = seq_len / dt
    print(f"student   measured CPU train step (b=1, t={seq_len}, fp32): {cpu:9.1f} tok/s")
    return max(cpu, h100), rows + [row("student_cpu_step", "tok/s", cpu)], usage["student"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=8, help="默认语料重复次数")
    parser.add_argument("--workers", type=int, default=2, help="多进程分词的进程数")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-batches", type=int, default=400, help="加载吞吐最多计时的批数")
    parser.add_argument("--student-step", action="store_true", help="在本机实测一次学生训练步（CPU 上较慢）")
    parser.add_argument("--student-preset", default="student-123m", help="学生的预设名；smoke 为 _bench_common.SMOKE_MODEL")
    return parse_with_smoke(parser, argv, SMOKE)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    print(f"torch {torch.__version__}, python {sys.version.split()[0]}")
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        tmp = Path(tmp)
        rows = bench_tokenize(default_corpus(), args.repeat, args.workers, tmp)
        load_rate, load_usage = bench_loader(tmp, args.repeat, args.seq_len, args.batch_size, args.max_batches)
    train_rate, student_rows, student_usage = bench_student(args.seq_len, args.batch_size, args.student_step,
                                                            args.student_preset)
    print(f"loader / fastest student step = {load_rate / train_rate:.1f}x  "
          f"({'ahead' if load_rate > train_rate else 'BEHIND'})")
    rows += [row("loader", "tok/s", load_rate), *student_rows,
             row("loader_vs_student_step", "tok/s", load_rate, train_rate, load_rate / train_rate),
             *usage_rows("loader", load_usage, student_usage)]
    print_table(f"data pipeline, corpus x{args.repeat}, batches ({args.batch_size}, {args.seq_len}) "
                "(ratio = ours / reference)", rows)
    record = {"bench": "data", "repeat": args.repeat, "seq_len": args.seq_len, "batch_size": args.batch_size}
    write_result(args, __file__, argv, record, rows)
    return {**record, "rows": rows}


if __name__ == "__main__":
    main()
