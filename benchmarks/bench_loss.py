"""蒸馏损失基准：普通版（物化整批 logits）对比分块版，前向 + 反向，CPU。

默认尺寸即 issue 的设定：8 × 512 个 token，词表 151,936 列（真实 151,665），学生隐藏 512，
教师隐藏 896（Qwen2.5-0.5B）。每个变体在独立子进程中运行，峰值内存取该子进程的 max RSS
（os.wait4 返回的 ru_maxrss），时间取若干次 "前向 + 反向" 的最小值；两个变体交替运行若干轮以抵消
机器负载的漂移。子进程还用 getrusage 测量计时的各次 "前向 + 反向"（不含建输入）的用户态 / 系统态 CPU 秒
与次缺页数，写进它的 JSON（"usage"），父进程把各轮加在一起。最后打印一张比值表（分块 / 普通）：

    peak_rss        MiB          峰值内存，比值
    fwd_bwd_time    s            最快一次 前向 + 反向 的耗时，比值
    fwd_bwd_sys     %user        100 · 系统态 / 用户态 CPU 秒（分块 vs 普通），无比值
    fwd_bwd_faults  faults/step  每次 前向 + 反向 的次缺页数（分块 vs 普通），无比值

两个子进程都导入 _bench_common（即应用 tune_malloc），在同样的 malloc 设置下运行（表前打印一行说明）。
随后是一行 JSON：绝对数值、比值，以及两者损失与梯度的相对差；main(argv) 返回 JSON 的内容，
外加 "rows"（表中各行的未取整数值，见 _bench_common.py）。

用法::

    python benchmarks/bench_loss.py                      # 完整尺寸（普通版峰值约十几 GB）
    python benchmarks/bench_loss.py --batch 1 --rounds 1 # 快速试跑
    python benchmarks/bench_loss.py --smoke              # 同一条路径、极小尺寸（2×16 个 token，词表 256），几秒钟
"""

import argparse
import json
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from _bench_common import MALLOC_TUNED, Usage, measured, parse_with_smoke, print_table, row, usage_rows, write_result

from functional_lm.losses import chunked_distillation_loss, distillation_loss

# --smoke 的缺省值：同一条代码路径，极小尺寸；分块 8 个 token，让分块版真的分成几块（显式参数仍然优先）。
SMOKE = dict(batch=2, seq=16, vocab=256, real_vocab=250, hidden=32, teacher_hidden=48, chunk_size=8,
             repeats=1, rounds=1)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--vocab", type=int, default=151936, help="学生与教师 logits 的列数")
    p.add_argument("--real-vocab", type=int, default=151665, help="真实词表大小（其后的列被排除）")
    p.add_argument("--hidden", type=int, default=512, help="学生隐藏维度")
    p.add_argument("--teacher-hidden", type=int, default=896, help="教师隐藏维度（Qwen2.5-0.5B）")
    p.add_argument("--chunk-size", type=int, default=256)
    p.add_argument("--divergence", default="forward_kl")
    p.add_argument("--repeats", type=int, default=2, help="每个子进程内的 前向+反向 次数")
    p.add_argument("--rounds", type=int, default=2, help="两个变体交替运行的轮数")
    p.add_argument("--worker", choices=["plain", "chunked"], help=argparse.SUPPRESS)
    return parse_with_smoke(p, argv, SMOKE)


def make_inputs(args):
    """固定种子的随机输入：学生隐藏状态与共享嵌入（需要梯度）、教师隐藏状态与输出权重、标签（约 10% 忽略）。"""
    g = torch.Generator().manual_seed(0)
    b, t = args.batch, args.seq
    hidden = torch.randn(b, t, args.hidden, generator=g).requires_grad_()
    weight = torch.randn(args.vocab, args.hidden, generator=g).mul_(0.05).requires_grad_()  # 原地缩放，不留临时副本
    teacher_hidden = torch.randn(b, t, args.teacher_hidden, generator=g)
    teacher_weight = torch.randn(args.vocab, args.teacher_hidden, generator=g).mul_(0.05)
    labels = torch.randint(0, args.real_vocab, (b, t), generator=g)
    labels[torch.rand(b, t, generator=g) < 0.1] = -100
    return hidden, weight, teacher_hidden, teacher_weight, labels


def step(variant, inputs, args):
    """一次前向 + 反向，返回损失值。"""
    hidden, weight, teacher_hidden, teacher_weight, labels = inputs
    kw = dict(divergence=args.divergence, real_vocab_size=args.real_vocab)
    if variant == "plain":
        student_logits = F.linear(hidden, weight)  # (b, t, v) 整批物化
        with torch.no_grad():
            teacher_logits = F.linear(teacher_hidden, teacher_weight)
        loss = distillation_loss(student_logits, teacher_logits, labels, **kw)
    else:
        loss = chunked_distillation_loss(
            hidden, weight, labels, teacher_hidden=teacher_hidden, teacher_weight=teacher_weight,
            chunk_size=args.chunk_size, **kw,
        )
    loss.backward()
    return loss.item()


def vm_hwm_mib():
    """当前进程到目前为止的峰值 RSS（/proc/self/status 的 VmHWM），MiB。"""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def worker(args):
    """子进程：建输入，记下建完输入后的内存，再跑 repeats 次并计时；结果以一行 JSON 写到 stdout。"""
    try:  # 普通版在完整尺寸下要十几 GB：万一内存不够，让内核优先结束这个基准进程，而不是别的进程
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("1000")
    except OSError:
        pass
    inputs = make_inputs(args)
    setup_mib = vm_hwm_mib()
    times, loss, usage = [], None, {}
    for _ in range(args.repeats):
        for x in inputs[:2]:
            x.grad = None
        with measured(usage, "timed"):
            start = time.perf_counter()
            loss = step(args.worker, inputs, args)
            times.append(time.perf_counter() - start)
    hidden, weight = inputs[:2]
    out = dict(times_s=times, loss=loss, setup_rss_mib=setup_mib, usage=usage["timed"].as_dict(),
               malloc_tuned=MALLOC_TUNED,
               grad_hidden=hidden.grad.double().norm().item(), grad_weight=weight.grad.double().norm().item(),
               grad_sample=weight.grad[:64, :8].flatten().tolist(),
               grad_hidden_sample=hidden.grad[0, :8, :8].flatten().tolist())
    print(json.dumps(out))


def run_worker(variant, argv):
    """在子进程里跑一个变体；峰值内存取该子进程的 ru_maxrss（Linux 上单位为 KiB）。"""
    proc = subprocess.Popen([sys.executable, __file__, *argv, "--worker", variant], stdout=subprocess.PIPE, text=True)
    stdout = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{variant} worker failed with exit code {proc.returncode}")
    result = json.loads(stdout.strip().splitlines()[-1])
    result["peak_rss_mib"] = usage.ru_maxrss / 1024
    return result


def rel(a, b):
    a, b = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    return ((a - b).norm() / b.norm()).item()


def _ratio(a, b):
    """a / b；分母不为正时（极小尺寸下两者的内存增量可能都是 0）为 None。"""
    return a / b if b > 0 else None


def summarize(results):
    """一个变体若干轮的结果：峰值内存取最大，时间取最快一次，进程开销各轮相加（未取整）。"""
    return dict(
        peak_rss_mib=max(r["peak_rss_mib"] for r in results),
        setup_rss_mib=max(r["setup_rss_mib"] for r in results),
        time_s=min(t for r in results for t in r["times_s"]),
        all_times_s=[t for r in results for t in r["times_s"]],
        loss=results[-1]["loss"],
        usage=sum((Usage.from_dict(r["usage"]) for r in results), Usage()),
    )


def _rounded(summary):
    """JSON 中的显示精度：内存 0.1 MiB，时间 1 µs，系统态占比 0.01%，缺页 0.1 次 / 步。"""
    return dict(
        peak_rss_mib=round(summary["peak_rss_mib"], 1), setup_rss_mib=round(summary["setup_rss_mib"], 1),
        time_s=round(summary["time_s"], 6), all_times_s=[round(t, 6) for t in summary["all_times_s"]],
        loss=summary["loss"], sys_pct_user=round(summary["usage"].sys_pct(), 2),
        faults_per_step=round(summary["usage"].faults_per_step(), 1),
    )


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    runs = {"plain": [], "chunked": []}
    for _ in range(args.rounds):
        for variant in ("plain", "chunked"):
            runs[variant].append(run_worker(variant, argv))
    p, c = summarize(runs["plain"]), summarize(runs["chunked"])
    plain, chunked = runs["plain"][-1], runs["chunked"][-1]
    loss_memory_ratio = _ratio(c["peak_rss_mib"] - c["setup_rss_mib"], p["peak_rss_mib"] - p["setup_rss_mib"])
    record = dict(
        benchmark="distillation_loss_plain_vs_chunked",
        tokens=args.batch * args.seq, batch=args.batch, seq=args.seq, vocab=args.vocab, real_vocab=args.real_vocab,
        hidden=args.hidden, teacher_hidden=args.teacher_hidden, chunk_size=args.chunk_size,
        divergence=args.divergence, threads=torch.get_num_threads(), device="cpu",
        plain=_rounded(p), chunked=_rounded(c),
        memory_ratio=round(c["peak_rss_mib"] / p["peak_rss_mib"], 4),
        loss_memory_ratio=None if loss_memory_ratio is None else round(loss_memory_ratio, 4),
        time_ratio=round(c["time_s"] / p["time_s"], 4),
        loss_rel_diff=abs(c["loss"] - p["loss"]) / abs(p["loss"]),
        grad_weight_norm_rel_diff=abs(chunked["grad_weight"] - plain["grad_weight"]) / plain["grad_weight"],
        grad_hidden_norm_rel_diff=abs(chunked["grad_hidden"] - plain["grad_hidden"]) / plain["grad_hidden"],
        grad_sample_rel_diff=rel(chunked["grad_sample"], plain["grad_sample"]),
        grad_hidden_sample_rel_diff=rel(chunked["grad_hidden_sample"], plain["grad_hidden_sample"]),
        targets=dict(memory_ratio_max=0.2, time_ratio_max=1.0),
    )
    rows = [
        row("peak_rss", "MiB", c["peak_rss_mib"], p["peak_rss_mib"], c["peak_rss_mib"] / p["peak_rss_mib"]),
        row("fwd_bwd_time", "s", c["time_s"], p["time_s"], c["time_s"] / p["time_s"]),
        *usage_rows("fwd_bwd", c["usage"], p["usage"]),
    ]
    print_table(f"distillation loss, {args.batch}x{args.seq} tokens, vocab {args.vocab} (ratio = chunked / plain)",
                rows, ours_label="chunked", reference_label="plain")
    print(json.dumps(record))
    write_result(args, __file__, argv, record, rows)
    return {**record, "rows": rows}


if __name__ == "__main__":
    main()
