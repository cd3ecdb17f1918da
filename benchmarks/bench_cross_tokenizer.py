"""跨分词器蒸馏的基准：对齐的吞吐，以及 hybrid 损失一步比同词表蒸馏一步多花多少时间（同一次运行，CPU）。

数据：CPython 自带的 pydoc_data.topics（演示语料，真实英文文本），由离线 Qwen2.5 分词器切成 b 行 × t 个 token。

    align   kd/alignment.Aligner.plan 在这批上的吞吐（学生 token/s，取 --align-repeats 次中最快的一次）：
            拼回字节、解码、DeepSeek 分词器重新切分、按字节分组、建 CrossPlan。没有参照（比值一栏为 -）。
    step    训练器的一步（kd/step.optimizer_step：教师前向、目标、学生分块损失、反向、裁剪、AdamW），各步中位数：
              ours       跨分词器：教师用 DeepSeek 的分词器（词表 129,280 行），目标来源是
                         kd/cross_teacher.CrossTokenizerTeacher（对齐 + 教师在自己的 token 流上前向 + 映射目标
                         + chunked_cross_tokenizer_loss），--cross-tokenizer hybrid
              reference  同词表蒸馏：同一形状的教师、Qwen2.5 词表（151,936 行），在线 top-k（训练器 top_k > 0 的路径）
            两边 top-k 64、T = 1、α = 0.5、同一个学生初始权重与同一批文本；比值 = ours / reference（> 1 即跨分词器
            的额外开销）。两边的教师主干相同，输出投影的行数随各自的词表不同，教师的 token 流长度也随分词不同
            （JSON 里的 teacher_tokens）。
    step_sys / step_faults   两边计时各步的进程开销（见 _bench_common），无比值

两边在同一个进程、同样的 malloc 设置下轮流运行（先各预热一步，不计时）。表后是一行 JSON；main(argv) 返回它，
外加 "rows"。

    python benchmarks/bench_cross_tokenizer.py            # 缺省：student-123m，4×512，Qwen2.5-0.5B 形状的教师（随机）
    python benchmarks/bench_cross_tokenizer.py --out benchmarks/results/bench_cross_tokenizer-$(date +%F).json
    python benchmarks/bench_cross_tokenizer.py --smoke    # 同一条路径、极小的模型（词表仍是真实的两个）
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
from _bench_common import measured, model_config, parse_with_smoke, print_table, row, usage_rows, write_result

DEEPSEEK_ROWS = 129280  # DeepSeek-V3 的词表行数（分词器 128,815 个 token 加填充）
QWEN_ROWS = 151936
TEACHERS = {  # 教师主干形状；词表行数由两边各自的分词器决定
    "qwen2.5-0.5b": dict(hidden_size=896, num_layers=24, num_heads=14, num_kv_heads=2, intermediate_size=4864,
                         max_seq_len=32768, rope_theta=1e6, tie_word_embeddings=True),
    "smoke": dict(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64, max_seq_len=256,
                  rope_theta=1e4, tie_word_embeddings=True),
}
SMOKE_STUDENT = dict(hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=32,
                     vocab_size=QWEN_ROWS, max_seq_len=256, rope_theta=1e4, tie_word_embeddings=True)
SMOKE = dict(student="smoke", teacher="smoke", batch=1, seq=32, steps=1, align_repeats=1)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=4, help="行数 b / rows b")
    p.add_argument("--seq", type=int, default=512, help="每行的学生 token 数 t / student tokens per row t")
    p.add_argument("--student", default="student-123m", help="学生预设名（smoke 为极小的 Qwen2.5 词表学生）/ student preset")
    p.add_argument("--teacher", choices=sorted(TEACHERS), default="qwen2.5-0.5b", help="教师主干形状 / teacher backbone")
    p.add_argument("--top-k", type=int, default=64, help="教师的 top-k / teacher top-k")
    p.add_argument("--steps", type=int, default=2, help="每边计时的步数，取中位数（另有一步预热）/ timed steps per side")
    p.add_argument("--align-repeats", type=int, default=3, help="对齐计时的次数，取最快 / alignment timing repeats")
    p.add_argument("--threads", type=int, default=None, help="torch CPU 线程数 / torch CPU threads")
    return parse_with_smoke(p, argv, SMOKE)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _batch(tok, args):
    """演示语料的前 b·(t+1) 个学生 token → 一个训练批（全部计损失，没有文档编号）。"""
    from pydoc_data.topics import topics

    from functional_lm.data.loader import Batch

    need = args.batch * (args.seq + 1)
    ids: list[int] = []
    for key in sorted(topics):
        ids += tok.encode(topics[key])
        if len(ids) >= need:
            break
    x = torch.tensor(ids[:need]).reshape(args.batch, args.seq + 1)
    return Batch(x[:, :-1].contiguous(), x[:, 1:].contiguous(), torch.ones(args.batch, args.seq, dtype=torch.bool),
                 None, torch.arange(args.batch))


def _models(args):
    from functional_lm import ModelConfig, init_params
    from functional_lm.kd.objective import Model

    scfg = ModelConfig(**SMOKE_STUDENT) if args.student == "smoke" else model_config(args.student)
    shape = TEACHERS[args.teacher]
    cross_cfg, same_cfg = ModelConfig(**shape, vocab_size=DEEPSEEK_ROWS), ModelConfig(**shape, vocab_size=QWEN_ROWS)
    # 两个教师的主干是同一组权重（同一个种子），只有嵌入 / 输出矩阵的行数不同
    same = init_params(same_cfg, seed=1)
    cross = dict(same, **{"model.embed_tokens.weight": same["model.embed_tokens.weight"][:DEEPSEEK_ROWS].clone()})
    return Model(init_params(scfg, seed=0), scfg), Model(cross, cross_cfg), Model(same, same_cfg)


def _steppers(args, student, cross_teacher, same_teacher, student_tok, teacher_tok):
    from functional_lm import TrainingConfig
    from functional_lm.kd.cross_teacher import CrossTokenizerTeacher
    from functional_lm.kd.step import build_stepper
    from functional_lm.kd.vocab_map import build_vocab_map
    from functional_lm.distributed import SINGLE

    tcfg = TrainingConfig(top_k=args.top_k, temperature=1.0, alpha=0.5, batch_size=args.batch, compile=False,
                          device="cpu")
    real = student_tok.real_vocab_size
    vmap = build_vocab_map(student_tok, teacher_tok)
    source = CrossTokenizerTeacher(cross_teacher, student_tok, teacher_tok, vmap, "hybrid", tcfg)
    return {"ours": build_stepper(student, None, tcfg, real, SINGLE, source),
            "reference": build_stepper(student, same_teacher, tcfg, real, SINGLE)}, source


def _align_rate(aligner, batch, repeats: int) -> tuple[float, int]:
    """(最快一次的学生 token/s, 教师流的 token 数)。"""
    best, plan = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        plan = aligner.plan(batch.input_ids, batch.labels, None)
        best = min(best, time.perf_counter() - start)
    return batch.input_ids.numel() / best, int((plan.teacher_ids != aligner.teacher.pad_token_id).sum())


def _timed_steps(steppers: dict, batch, steps: int) -> tuple[dict, dict, dict]:
    """两边各预热一步，再轮流各跑 steps 步：(各边逐步秒数, 各边损失, 各边计时各步的 Usage)。"""
    from functional_lm.kd.step import optimizer_step

    times, losses, usage = {s: [] for s in steppers}, {s: [] for s in steppers}, {}
    for name, stepper in steppers.items():
        optimizer_step(stepper, [batch], 1e-4)
    for i in range(steps):
        for name, stepper in steppers.items():
            with measured(usage, name):
                start = time.perf_counter()
                stats = optimizer_step(stepper, [batch], 1e-4)
                times[name].append(time.perf_counter() - start)
            losses[name].append(stats.loss)
            _log(f"step {i} {name}: {times[name][-1]:.2f}s, loss {stats.loss:.4f}")
    return times, losses, usage


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    from functional_lm.data import load_tokenizer
    from functional_lm.data.vocab_bytes import load_teacher_tokenizer

    student_tok, teacher_tok = load_tokenizer(None), load_teacher_tokenizer("deepseek")
    batch = _batch(student_tok, args)
    student, cross_teacher, same_teacher = _models(args)
    steppers, source = _steppers(args, student, cross_teacher, same_teacher, student_tok, teacher_tok)
    rate, teacher_tokens = _align_rate(source.aligner, batch, args.align_repeats)
    times, losses, usage = _timed_steps(steppers, batch, args.steps)
    med = {s: float(statistics.median(v)) for s, v in times.items()}
    rows = [row("align", "tok/s", rate),
            row("step", "s", med["ours"], med["reference"], med["ours"] / med["reference"]),
            *usage_rows("step", usage["ours"], usage["reference"])]
    record = {
        "benchmark": "cross_tokenizer", "device": "cpu", "threads": torch.get_num_threads(), "batch": args.batch,
        "seq": args.seq, "student": args.student, "teacher": f"{args.teacher}-shaped (random)", "top_k": args.top_k,
        "student_tokens": batch.input_ids.numel(), "teacher_tokens": teacher_tokens,
        "align_tokens_per_s": round(rate, 1), "median_step_s": {k: round(v, 4) for k, v in med.items()},
        "overhead": round(med["ours"] / med["reference"], 4), "losses": losses,
        "fractions": source.summary(), "torch": torch.__version__,
    }
    record["fractions"].pop("vocabulary", None)
    print_table(f"cross-tokenizer distillation on cpu, {args.student} <- {args.teacher}-shaped teacher, "
                f"{args.batch}x{args.seq}, top-{args.top_k}, median of {args.steps} (step ratio = DeepSeek-tokenizer "
                f"hybrid / same-vocabulary top-k time: > 1 is the overhead)", rows, ours_label="hybrid",
                reference_label="same_vocab")
    print(json.dumps(record))
    write_result(args, __file__, argv, record, rows)
    return {**record, "rows": rows}


if __name__ == "__main__":
    main()
