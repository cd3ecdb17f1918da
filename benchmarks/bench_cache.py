"""教师缓存基准（issue 14）：每 token 的磁盘字节、建缓存的吞吐、从缓存训练一步 vs 在线教师训练一步。

设定：学生 student-123m，教师为 Qwen2.5-0.5B 形状的随机模型（与 bench_train 的 TEACHER_SHAPE 相同），float32，CPU。
数据是合成的打包数据集：随机长度的文档、随机 id（< 真实词表），经 ``pack_documents`` 打包（不需要分词器），
块数恰为 --build-blocks（缺省 batch × 4）。缓存用 float16 存 log 概率，打开文档掩码（训练器的缺省）。

    bytes_per_token_k<K>  B/tok   对 --top-ks 中的每个 K 各建一个缓存（--batch 个块），三种分片文件（ids、
                                  logprobs、tail）在磁盘上的字节数 / 缓存的输入位置数；没有参照（应为 6·K + 4）。
                                  index.json 是每个缓存一份的固定开销（与块数无关），另记在 JSON 的 index_json_bytes
    build                 tok/s   ours = build_teacher_cache（教师前向 + top-k + 写分片并提交），
                                  reference = 同样的块、同样的 batch 大小只跑教师前向（forward_hidden + 输出投影，
                                  按同样的行块乘，不取 top-k、不写盘）；ratio = ours / reference（目标 ≥ 0.9）
    build_sys / _faults           两次遍历各自的进程开销（每批记为一个计时步）
    step_from_cache       tok/s   学生的一个蒸馏训练步，稀疏目标从缓存读（进程里没有教师） vs 在线教师的一步
                                  （教师前向 + 在线 top-k + 同样的稀疏损失，同一个学生、同一个 top_k）；
                                  ratio = ours / reference（目标：CPU 上 0.5B 形状的教师 ≥ 2）
    step_from_cache_sys / _faults 两个子进程计时各步（首步预热不计）的进程开销
    step_from_cache_peak_rss MiB  两个子进程各自的峰值 RSS，ratio = 缓存 / 在线

一个训练步 = 学生前向 + 稀疏损失 α·T²·KL(top-k 目标 ‖ 学生, T) + (1−α)·CE + 反向 + 梯度裁剪 + AdamW，与
functional_lm.kd.trainer 中的一步（_teacher_side → distill_loss）相同的组成。两个训练变体像 bench_train 一样各在
独立子进程中运行（峰值内存取子进程自身的 max RSS；缓存一侧的子进程从不构造教师），父进程先建好缓存、
放掉教师，再依次启动两个子进程。第 i 步用块 [i·batch, (i+1)·batch)（按块数回绕），与建缓存的批划分一致，
所以两边的稀疏目标逐位相同，首步损失也相同（JSON 里的 first_loss_rel_diff）。
main(argv) 返回 JSON 的内容，外加 "rows"（表中各行的未取整数值，见 _bench_common.py）。

    python benchmarks/bench_cache.py                         # 缺省 4 × 512，K = 16,64,256（字节）与 64（其余行）
    python benchmarks/bench_cache.py --teacher-layers 4      # 快速试跑：教师只取 4 层
    python benchmarks/bench_cache.py --smoke                 # 同一条路径、极小尺寸（1 层 smoke 学生与 1 层小教师、2×16）
"""

import argparse
import gc
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from _bench_common import (
    MALLOC_TUNED, Usage, measured, parse_with_smoke, print_table, row, run_workers, step_rows,
    usage_rows, write_result,
)
from bench_train import _configs, add_step_arguments

WORKERS = ("cache", "live")  # 从缓存训练（ours）与在线教师训练（reference），各一个子进程
TEACHER_SEED = 1  # 父进程建缓存与在线子进程用同一组随机教师权重
# --smoke 的缺省值（显式参数仍然优先）：分块 8 个 token，让 32 个 token 真的分成 4 块。
SMOKE = dict(batch=2, seq=16, steps=2, teacher_layers=1, student="smoke", real_vocab=250, top_ks="4,8", top_k=8,
             chunk_size=8)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_step_arguments(p)
    p.add_argument("--top-ks", default="16,64,256", help="测每 token 字节数的 K（逗号分隔）")
    p.add_argument("--top-k", type=int, default=64, help="建缓存吞吐与训练步两行用的 K")
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--build-blocks", type=int, default=None, help="建缓存那一行的块数（缺省 batch × 4）")
    p.add_argument("--worker", choices=WORKERS, help=argparse.SUPPRESS)
    p.add_argument("--cache-dir", help=argparse.SUPPRESS)  # 子进程读的缓存目录（父进程建好）
    args = parse_with_smoke(p, argv, SMOKE)
    if args.build_blocks is None:
        args.build_blocks = args.batch * 4
    return args


def _dataset(args, blocks: int, seed: int = 0):
    """恰好 blocks 个块的合成打包数据集：随机长度（seq/8 … 2·seq）的文档，id 取自 [0, real_vocab − 1)，
    分隔符为 real_vocab − 1；最后一篇截短，使 token 流正好填满 blocks 个长 seq + 1 的块（没有补齐）。"""
    from functional_lm.data import pack_documents

    rng = np.random.default_rng(seed)
    need, docs = blocks * (args.seq + 1), []
    while need > 0:
        n = min(int(rng.integers(max(1, args.seq // 8), 2 * args.seq + 1)), need - 1)  # 每篇另占一个分隔符
        docs.append(rng.integers(0, args.real_vocab - 1, size=n).tolist())
        need -= n + 1
    dataset = pack_documents(docs, args.seq, separator_id=args.real_vocab - 1)
    assert len(dataset) == blocks and dataset.num_tokens == blocks * (args.seq + 1)
    return dataset


def _fingerprint(dataset):
    """调用方的四个指纹字段：分词器用一个固定字符串，教师权重用随机初始化的种子。"""
    from functional_lm.kd.teacher_cache import make_fingerprint

    return make_fingerprint("bench-synthetic-ids", dataset.store, teacher_weights=f"random-init-seed-{TEACHER_SEED}")


def _build(args, teacher, teacher_cfg, dataset, out_dir, top_k):
    """建一个缓存（float16、文档掩码、批大小 --batch）。"""
    from functional_lm.kd.cache_build import build_teacher_cache

    return build_teacher_cache(
        teacher, teacher_cfg, dataset, out_dir, top_k=top_k, temperature=args.temperature,
        fingerprint=_fingerprint(dataset), real_vocab_size=args.real_vocab, document_mask=True,
        batch_size=args.batch, value_dtype="float16", progress=False,
    )


def _forward_only(args, teacher, teacher_cfg, dataset):
    """建缓存的参照：同样的块、同样的批划分与文档编号，只跑教师前向与输出投影（float32，按建缓存同样的
    行块相乘，每块至多 teacher_cache.LOGIT_BYTES），不取 top-k、不写盘。"""
    from functional_lm.models.decoder import forward_hidden, output_weight
    from functional_lm.kd.teacher_cache import LOGIT_BYTES

    weight = output_weight(teacher, teacher_cfg)
    weight32 = weight if weight.dtype == torch.float32 else weight.float()
    rows_per_chunk = max(1, LOGIT_BYTES // (4 * weight32.shape[0]))
    for first in range(0, len(dataset), args.batch):
        input_ids, _, _, segments = dataset.examples(range(first, min(first + args.batch, len(dataset))), True)
        with torch.no_grad():
            hidden = forward_hidden(teacher, torch.from_numpy(input_ids), teacher_cfg,
                                    segment_ids=torch.from_numpy(segments), check=False)
            flat = hidden.reshape(-1, hidden.shape[-1]).float()
            for r in range(0, flat.shape[0], rows_per_chunk):
                F.linear(flat[r : r + rows_per_chunk], weight32)


def _shard_bytes(directory: Path) -> int:
    """缓存目录里分片文件（ids-*.bin、logprobs-*.bin、tail-*.bin）的字节数，按磁盘上的文件大小。"""
    return sum(p.stat().st_size for p in directory.glob("*-[0-9][0-9][0-9][0-9][0-9].bin"))


def build_phase(args, root: Path):
    """父进程：每个 K 建一个小缓存量字节数（顺带预热），再依次计时“只跑教师前向”与“建缓存”各一遍。

    返回 (字节数 {"per_token": {K: 分片字节 / 位置}, "index_json": {K: 字节}}, 建缓存一行的测量, 供子进程读的缓存目录)。"""
    from functional_lm import init_params

    _, teacher_cfg = _configs(args)
    teacher = init_params(teacher_cfg, seed=TEACHER_SEED)
    small = _dataset(args, args.batch)
    bytes_per_token, index_bytes = {}, {}
    for k in (int(v) for v in args.top_ks.split(",")):
        out = root / f"bytes_k{k}"
        _build(args, teacher, teacher_cfg, small, out, k)
        bytes_per_token[str(k)] = _shard_bytes(out) / (len(small) * small.seq_len)
        index_bytes[str(k)] = (out / "index.json").stat().st_size

    dataset = _dataset(args, args.build_blocks)
    batches = -(-len(dataset) // args.batch)
    usage, seconds = {}, {}
    with measured(usage, "reference", steps=batches):
        start = time.perf_counter()
        _forward_only(args, teacher, teacher_cfg, dataset)
        seconds["reference"] = time.perf_counter() - start
    out = root / f"build_k{args.top_k}"
    with measured(usage, "build", steps=batches):
        start = time.perf_counter()
        status = _build(args, teacher, teacher_cfg, dataset, out, args.top_k)
        seconds["build"] = time.perf_counter() - start
    assert status.complete and status.shards_written == status.num_shards
    del teacher
    gc.collect()  # 子进程运行时父进程不再占着教师的内存
    tokens = len(dataset) * dataset.seq_len
    build = {"tokens": tokens, "batches": batches, "seconds": seconds, "usage": usage,
             "bytes_written": status.bytes_written}
    return {"per_token": bytes_per_token, "index_json": index_bytes}, build, out


# ---------------------------------------------------------------- 子进程：训练步
def _batch(dataset, step: int, batch_size: int):
    """第 step 步的批：块 [step·b, (step+1)·b)（按块数回绕），带文档编号与块号（缓存按块号取目标）。"""
    from functional_lm.data.loader import Batch

    blocks = [(step * batch_size + j) % len(dataset) for j in range(batch_size)]
    arrays = dataset.examples(blocks, True)
    return Batch(*(torch.from_numpy(a) for a in arrays), torch.tensor(blocks, dtype=torch.int64))


def _step_fn(args):
    """这个子进程的训练步函数（参数为步号）。cache：目标从 --cache-dir 读，进程里没有教师；
    live：构造教师（与建缓存同一个种子），每步跑教师前向与在线 top-k。两边之后的损失、反向与优化器一步相同。"""
    from functional_lm import TrainingConfig, init_params
    from functional_lm.kd.teacher_cache import TeacherCache
    from functional_lm.kd.step import build_optimizer
    from functional_lm.kd.objective import (
        Model,
        distill_loss,
        live_topk_targets,
        teacher_hidden_states,
    )

    scfg, teacher_cfg = _configs(args)
    tcfg = TrainingConfig(top_k=args.top_k, temperature=args.temperature, loss_chunk_size=args.chunk_size)
    params = {k: v.requires_grad_(True) for k, v in init_params(scfg, seed=0).items()}
    optimizer = build_optimizer(params, tcfg)
    dataset = _dataset(args, args.build_blocks)
    device = torch.device("cpu")
    if args.worker == "cache":
        cache = TeacherCache.open(args.cache_dir)

        def targets(batch):
            return cache.batch_targets(batch, device)
    else:
        teacher = Model(init_params(teacher_cfg, seed=TEACHER_SEED), teacher_cfg)

        def targets(batch):
            t_hidden = teacher_hidden_states(teacher, batch.input_ids, segment_ids=batch.segment_ids)
            return live_topk_targets(teacher, t_hidden, tcfg, args.real_vocab)

    def step(i):
        batch = _batch(dataset, i, args.batch)
        loss, _ = distill_loss(params, scfg, batch, None, None, tcfg, real_vocab_size=args.real_vocab,
                               sparse_targets=targets(batch))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(params.values()), tcfg.gradient_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def worker(args):
    """子进程：跑 --steps 步并计时，结果（含计时各步的进程开销、是否构造过教师）以一行 JSON 写到 stdout。"""
    torch.set_num_threads(args.threads)
    step = _step_fn(args)
    times, losses, usage = [], [], {}
    for i in range(args.steps):
        # 首步是预热，进程开销另记；只有一步时它也是计时步。
        with measured(usage, "timed" if i > 0 or args.steps == 1 else "warmup"):
            start = time.perf_counter()
            losses.append(step(i))
            times.append(time.perf_counter() - start)
    timed = times[1:] or times
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"step_s": min(timed), "all_step_s": times, "peak_rss_mib": peak_mib, "losses": losses,
                      "usage": usage.get("timed", Usage()).as_dict(), "malloc_tuned": MALLOC_TUNED}))


# ---------------------------------------------------------------- 汇总
def build_rows(args, sizes, build, results):
    """表中各行：每个 K 的字节数、建缓存吞吐与其进程开销、训练步吞吐与其进程开销和峰值内存。"""
    rows = [row(f"bytes_per_token_k{k}", "B/tok", float(v)) for k, v in sizes["per_token"].items()]
    tokens, sec = build["tokens"], build["seconds"]
    rows.append(row("build", "tok/s", tokens / sec["build"], tokens / sec["reference"],
                    sec["reference"] / sec["build"]))
    rows += usage_rows("build", build["usage"]["build"], build["usage"]["reference"])
    if all("step_s" in r for r in results.values()):
        rows += step_rows("step_from_cache", results["cache"], results["live"], args.batch * args.seq)
    return rows


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench_cache_") as tmp:
        sizes, build, cache_dir = build_phase(args, Path(tmp))
        results = run_workers(__file__, argv, WORKERS, ("--cache-dir", str(cache_dir)))
    rows = build_rows(args, sizes, build, results)
    teacher = "smoke-shaped" if args.smoke else "Qwen2.5-0.5B-shaped"
    layers = _configs(args)[1].num_layers
    tokens, sec = build["tokens"], build["seconds"]
    summary = {
        "bench": "teacher_cache", "device": "cpu", "threads": args.threads, "batch": args.batch, "seq": args.seq,
        "student": args.student, "teacher": f"{teacher} ({layers} layers), random", "top_k": args.top_k,
        "temperature": args.temperature, "real_vocab": args.real_vocab, "value_dtype": "float16",
        "bytes_per_token": {k: round(v, 3) for k, v in sizes["per_token"].items()},
        "index_json_bytes": sizes["index_json"],
        "build": {"blocks": args.build_blocks, "tokens": tokens, "seconds": {k: round(v, 5) for k, v in sec.items()},
                  "tokens_per_s": round(tokens / sec["build"], 1),
                  "reference_tokens_per_s": round(tokens / sec["reference"], 1),
                  "ratio": round(sec["reference"] / sec["build"], 3), "bytes_written": build["bytes_written"]},
        "results": results,
    }
    if all("step_s" in r for r in results.values()):
        mine, ref = results["cache"], results["live"]
        summary["step_from_cache"] = {
            "tokens_per_s": round(args.batch * args.seq / mine["step_s"], 1),
            "speed_ratio": round(ref["step_s"] / mine["step_s"], 3),
            "memory_ratio": round(mine["peak_rss_mib"] / ref["peak_rss_mib"], 3),
            # 两边的目标逐位相同：首步（同一组初始权重、同一批）的损失应当一致
            "first_loss_rel_diff": abs(mine["losses"][0] - ref["losses"][0]) / max(abs(ref["losses"][0]), 1e-12),
        }
    summary["targets"] = {"build_ratio_min": 0.9, "step_speed_ratio_min": 2.0}
    print_table(f"teacher cache on cpu, {args.student} <- {teacher} teacher ({layers} layers), "
                f"{args.batch}x{args.seq}, "
                f"top-k {args.top_k}, float16 values (build: ours = cache build, reference = teacher forward only; "
                f"step: ours = targets from the cache, reference = live teacher + top-k)", rows)
    print(json.dumps(summary))
    write_result(args, __file__, argv, summary, rows)
    return {**summary, "rows": rows}


if __name__ == "__main__":
    main()
