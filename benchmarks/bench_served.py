"""服务端教师的基准：同一个蒸馏（functional-lm distill，同一份数据、同一组权重、同一次运行），教师分别是
本地检查点（--teacher DIR）、服务器（--teacher-url，回环上的 vLLM 服务 DIR）与教师缓存（先用服务器建好）。

每种变体跑 --steps 步，每步记一条训练记录；吞吐取预热（前 --warmup 步）之后各步 tokens/s 的中位数。
服务端一行另记训练等服务器的时间比例（记录里的 server_wait_fraction，中位数）与服务器的 tokens/s。
比值 = 变体的 tokens/s / 本地教师的 tokens/s（> 1 即更快）：

    served          tok/s    服务端教师（下一步的目标在这一步计算时已经在取）对本地教师
    served_wait     frac     训练等服务器的时间占墙钟时间的比例（无参照）
    server          tok/s    服务器自己的吞吐（打分的 token / 请求在途的秒数；无参照）
    cache           tok/s    从教师缓存蒸馏对本地教师
    cache_build     tok/s    用服务器建缓存的吞吐（无参照）

需要一个正在服务 --teacher 的服务器（例如 ``python -m vllm.entrypoints.openai.api_server --model DIR
--skip-tokenizer-init --dtype float32 --max-logprobs 64``，见 docs/teachers.md）。
tests/test_kd_served_vllm.py 用真实的 vLLM 跑 --smoke。

用法：python benchmarks/bench_served.py --teacher DIR --teacher-url URL [--steps 8] [--batch 4] [--seq 128] [--top-k 16]
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _bench_common import parse_with_smoke, print_table, row, write_result

from functional_lm.cli import main as cli
from functional_lm.kd.teacher_cache import TeacherCache

SMOKE = dict(steps=3, warmup=1, batch=2, seq=32, documents=40)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", required=True, help="服务器服务的那个检查点目录 / the checkpoint the server serves")
    parser.add_argument("--teacher-url", required=True, help="服务器的根地址 / the server's base URL (…/v1)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2, help="不计入中位数的前几步")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--top-k", type=int, default=16)
    parser.add_argument("--documents", type=int, default=400, help="合成数据的文档数")
    return parse_with_smoke(parser, argv, SMOKE)


def _write_data(path: Path, documents: int) -> Path:
    rows = [{"text": f"Document {i}: " + " ".join(f"word{(i * 7 + j) % 97}" for j in range(60))} for i in range(documents)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def _common(args, work: Path) -> list[str]:
    return ["--data", str(work / "data.jsonl"), "--seq-len", str(args.seq), "--top-k", str(args.top_k),
            "--temperature", "1", "--cache-dir", str(work / "tokens"), "--no-progress"]


def _distill(args, work: Path, name: str, source: list[str]) -> list[dict]:
    out = work / name
    argv = ["distill", *source, *_common(args, work), "--preset", "tiny", "--vocab-size", "151936",
            "--max-steps", str(args.steps), "--batch-size", str(args.batch), "--log-interval", "1",
            "--eval-interval", str(10**6), "--save-interval", str(10**6), "--output-dir", str(out)]
    if cli(argv) != 0:
        raise RuntimeError(f"distill with {source} failed")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == "train"][args.warmup:]


def _median(records: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in records)


def main(argv=None):
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-served-") as tmp:
        work = Path(tmp)
        _write_data(work / "data.jsonl", args.documents)
        local = _distill(args, work, "local", ["--teacher", args.teacher])
        served = _distill(args, work, "served", ["--teacher-url", args.teacher_url])
        start = time.perf_counter()
        if cli(["teacher-cache", "--teacher-url", args.teacher_url, "--output-dir", str(work / "cache"),
                "--batch-size", str(args.batch), *_common(args, work)]) != 0:
            raise RuntimeError("teacher-cache --teacher-url failed")
        build_s = time.perf_counter() - start
        splits = [work / "cache" / s for s in ("train", "val") if (work / "cache" / s / "index.json").is_file()]
        cached_tokens = sum(TeacherCache.open(s).num_blocks for s in splits) * args.seq
        cache = _distill(args, work, "cache", ["--teacher-cache", str(work / "cache")])
    base = _median(local, "tokens_per_s")
    rows = [
        row("served", "tok/s", _median(served, "tokens_per_s"), base, _median(served, "tokens_per_s") / base),
        row("served_wait", "frac", _median(served, "server_wait_fraction")),
        row("server", "tok/s", _median(served, "server_tokens_per_s")),
        row("cache", "tok/s", _median(cache, "tokens_per_s"), base, _median(cache, "tokens_per_s") / base),
        row("cache_build", "tok/s", cached_tokens / build_s),
    ]
    record = {"bench": "served_teacher", "steps": args.steps, "warmup": args.warmup, "batch": args.batch,
              "seq": args.seq, "top_k": args.top_k, "teacher": args.teacher, "teacher_url": args.teacher_url,
              "local_tokens_per_s": round(base, 1), **{r["name"]: r["ours"] for r in rows}}
    print_table(f"distillation step, teacher local / served / cached, {args.batch}x{args.seq}, top-{args.top_k}, "
                f"median of steps {args.warmup + 1}..{args.steps} (ratio = variant / local teacher)", rows,
                reference_label="local")
    print(json.dumps(record))
    write_result(args, __file__, argv, record, rows)
    print("done", file=sys.stderr)
    return {**record, "rows": rows}


if __name__ == "__main__":
    main()
