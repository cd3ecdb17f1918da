"""跨分词器蒸馏有没有用：DeepSeek 分词器的演示教师教 Qwen2.5 词表的学生，四种做法在同一次运行里比较。

    1. 演示语料（CPython 自带的 pydoc_data.topics，按段落成文档）按文档划出 5% 验证集（划分种子 0）；
    2. 教师：demo-teacher 的形状（隐藏 128、3 层），词表换成 DeepSeek 的 129,280 行，用 DeepSeek 分词器切的训练集
       只以交叉熵训练 --teacher-steps 步（与离线演示的教师同一套设置）；
    3. 四个学生（demo-student 形状，Qwen2.5 词表 151,936 行），同样的初始化、步数、学习率表与批：
         ce_only  只有交叉熵（α = 0），原始训练文本
         seqkd    序列级蒸馏：教师按训练块的开头（前 --prompt-tokens 个学生 token 的文本）写续写（温度 0.8、top-k 50），
                  学生只以交叉熵学这些教师写的文本（没有 logits）
         uld      --cross-tokenizer uld：所有位置都用排序概率的 W₁（α = 0.5、T = 2、top-64）
         hybrid   --cross-tokenizer hybrid（缺省）：同字节串的 token 映射到学生词表后的前向 KL，其余 ULD
    4. 在同一个验证集上评估每个学生：学生 token 上的交叉熵（val_ce），与教师下一段文本预测的一致率（映射目标
       的位置上学生的 argmax 是否等于教师映射到学生词表后概率最大的 token，含链式法则的整段概率），以及 T = 1
       下与教师目标的散度（映射位置的 KL + 其余的 ULD，kl_to_teacher）。

每种做法跑 --seeds 个学生种子（0, 1, …），表里是均值，JSON 里有每个种子的值。比值一栏 = 该做法 / ce_only
（val_ce 越小越好，agreement 越大越好）。不断言谁更好：测到什么就报告什么。

    python benchmarks/evidence_cross_tokenizer.py --out benchmarks/results/evidence_cross_tokenizer-$(date +%F).json
    python benchmarks/evidence_cross_tokenizer.py --smoke     # 同一条路径、几步（tests/test_evidence.py 跑它）
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from _bench_common import parse_with_smoke, print_table, row, write_result

METHODS = ("ce_only", "seqkd", "uld", "hybrid")
DEEPSEEK_ROWS = 129280
SEQ_LEN = 64
SMOKE = dict(teacher_steps=2, student_steps=2, seeds=1, seqkd_prompts=8, eval_batches=2)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher-steps", type=int, default=200, help="教师的交叉熵训练步数 / teacher CE steps")
    p.add_argument("--student-steps", type=int, default=120, help="每个学生的训练步数 / steps per student")
    p.add_argument("--seeds", type=int, default=3, help="每种做法的学生种子数 / student seeds per method")
    p.add_argument("--seqkd-prompts", type=int, default=512, help="教师为 SeqKD 写续写的训练块数 / blocks the "
                   "teacher continues for SeqKD")
    p.add_argument("--prompt-tokens", type=int, default=16, help="SeqKD 提示的学生 token 数 / SeqKD prompt length")
    p.add_argument("--new-tokens", type=int, default=48, help="教师每段续写的 token 数 / teacher tokens per continuation")
    p.add_argument("--eval-batches", type=int, default=0, help="验证批数，0 = 全部 / validation batches, 0 = all")
    p.add_argument("--threads", type=int, default=None, help="torch CPU 线程数 / torch CPU threads")
    p.add_argument("--work-dir", default=None, help="运行目录（缺省为临时目录）/ run directory (default: a temporary one)")
    return parse_with_smoke(p, argv, SMOKE)


def _log(msg: str) -> None:
    print(f"[evidence] {msg}", file=sys.stderr, flush=True)


def _student_tcfg(steps: int, seed: int, **changes):
    from functional_lm import TrainingConfig

    settings = dict(batch_size=4, learning_rate=3e-3, warmup_steps=min(20, steps - 1), max_steps=steps,
                    log_interval=max(1, steps // 4), eval_interval=10**6, save_interval=steps, keep_last=1,
                    loss_chunk_size=256, top_k=64, alpha=0.5, temperature=2.0, seed=seed, split_seed=0,
                    val_fraction=0.05, compile=False, device="cpu")
    return TrainingConfig(**(settings | changes))


def _data(tok, work: Path, sources=None, val_fraction=0.05):
    from functional_lm.data import prepare_data

    return prepare_data(sources, tokenizer=tok, seq_len=SEQ_LEN, batch_size=4, val_fraction=val_fraction, seed=0,
                        split_seed=0, cache_dir=str(work / "tokens"), progress=False)


def _train_teacher(teacher_tok, work: Path, steps: int):
    """demo-teacher 的形状 + DeepSeek 词表，交叉熵训练（离线演示的教师设置，步数可改）。"""
    from functional_lm.config import get_preset
    from functional_lm.kd.demo import teacher_training_config
    from functional_lm.kd.objective import Model
    from functional_lm.kd.trainer import train
    from functional_lm.models.decoder import init_params

    cfg = dataclasses.replace(get_preset("demo-teacher"), vocab_size=DEEPSEEK_ROWS)
    data = _data(teacher_tok, work)
    tcfg = teacher_training_config().replace(max_steps=steps, warmup_steps=min(20, steps - 1), val_fraction=0.05,
                                             split_seed=0, eval_interval=steps)
    result = train(Model(init_params(cfg, seed=1), cfg), None, data, tcfg, work / "teacher", progress=False,
                   real_vocab_size=teacher_tok.real_vocab_size)
    return Model(result.params, cfg), data, result.final_eval


def _seqkd_texts(teacher, student_tok, teacher_tok, data, args) -> list[str]:
    """教师的续写：训练块的开头（学生 token 解码成文本）由 DeepSeek 分词器切分作提示，教师采样续写。"""
    from functional_lm.generate import generate

    texts = []
    count = min(args.seqkd_prompts, len(data.train))
    for first in range(0, count, 32):
        blocks = range(first, min(first + 32, count))
        prompts = [teacher_tok.encode(student_tok.decode(data.train.examples([b])[0][0, :args.prompt_tokens].tolist()))
                   for b in blocks]
        width = min(len(p) for p in prompts)  # 同一批的提示等长（截到最短的），不必填充
        out = generate(teacher.params, teacher.cfg, [p[:width] for p in prompts], args.new_tokens, temperature=0.8,
                       top_k=50, seed=first, eos_token_id=teacher_tok.eos_token_id,
                       vocab_limit=teacher_tok.real_vocab_size)
        for row_ids in out.tolist():
            ids = row_ids[: width + args.new_tokens]
            if teacher_tok.eos_token_id in ids[width:]:
                ids = ids[: width + ids[width:].index(teacher_tok.eos_token_id)]
            texts.append(teacher_tok.decode(ids))
    return texts


def _sources(teacher, student_tok, teacher_tok):
    from functional_lm import TrainingConfig
    from functional_lm.kd.cross_teacher import CrossTokenizerTeacher
    from functional_lm.kd.vocab_map import build_vocab_map

    vmap = build_vocab_map(student_tok, teacher_tok)
    make = lambda mode, temperature: CrossTokenizerTeacher(  # noqa: E731
        teacher, student_tok, teacher_tok, vmap, mode, TrainingConfig(top_k=64, temperature=temperature))
    return {"uld": make("uld", 2.0), "hybrid": make("hybrid", 2.0), "eval": make("hybrid", 1.0)}


def _train_student(method: str, seed: int, data, seqkd_data, sources, student_tok, work: Path, steps: int):
    from functional_lm.config import get_preset
    from functional_lm.kd.objective import Model
    from functional_lm.kd.trainer import train
    from functional_lm.models.decoder import init_params

    cfg = get_preset("demo-student")
    tcfg = _student_tcfg(steps, seed, alpha=0.0) if method in ("ce_only", "seqkd") else _student_tcfg(steps, seed)
    source = sources.get(method)
    result = train(Model(init_params(cfg, seed=seed), cfg), None, seqkd_data if method == "seqkd" else data, tcfg,
                   work / f"{method}-{seed}", progress=False, real_vocab_size=student_tok.real_vocab_size,
                   teacher_cache=source, val_teacher_cache=None)
    return Model(result.params, cfg), tcfg


def _evaluate(student, tcfg, data, sources, student_tok, eval_batches: int) -> dict:
    from functional_lm.kd.evaluate import evaluate

    scores = evaluate(student, None, data.val_loader, tcfg.replace(temperature=1.0), teacher_cache=sources["eval"],
                      real_vocab_size=student_tok.real_vocab_size, max_batches=eval_batches or None)
    return {"val_ce": scores["val_ce"], "agreement": scores["top1_agreement"],
            "kl_to_teacher": scores["kl_cache_student"]}


def _rows(results: dict) -> list[dict]:
    """每种做法的均值；ce_only 是参照（它自己的两行没有参照）。"""
    mean = {m: {k: statistics.fmean(r[k] for r in runs) for k in runs[0]} for m, runs in results.items()}
    rows = []
    for key, unit in (("val_ce", "nats"), ("agreement", "%")):
        scale = 100.0 if unit == "%" else 1.0
        base = mean["ce_only"][key] * scale
        rows.append(row(f"{key}_ce_only", unit, base))
        for m in METHODS[1:]:
            ours = mean[m][key] * scale
            rows.append(row(f"{key}_{m}", unit, ours, base, ours / base if base > 0 else None))
    rows += [row(f"kl_to_teacher_{m}", "nats", mean[m]["kl_to_teacher"]) for m in METHODS]
    return rows


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    from functional_lm.data import load_tokenizer
    from functional_lm.data.vocab_bytes import load_teacher_tokenizer

    started = time.perf_counter()
    work_ctx = tempfile.TemporaryDirectory(prefix="evidence-") if args.work_dir is None else None
    work = Path(args.work_dir or work_ctx.name)
    try:
        student_tok, teacher_tok = load_tokenizer(None), load_teacher_tokenizer("deepseek")
        _log(f"training the DeepSeek-tokenizer demo teacher ({args.teacher_steps} steps)")
        teacher, teacher_data, teacher_eval = _train_teacher(teacher_tok, work, args.teacher_steps)
        data = _data(student_tok, work)
        if data.store.num_documents != teacher_data.store.num_documents:
            raise RuntimeError("the two tokenizations see different documents; the splits would differ")
        texts = _seqkd_texts(teacher, student_tok, teacher_tok, data, args)
        (work / "seqkd.jsonl").write_text("\n".join(json.dumps({"text": t}, ensure_ascii=False) for t in texts),
                                          encoding="utf-8")
        seqkd_data = _data(student_tok, work, [str(work / "seqkd.jsonl")], val_fraction=0.0)
        _log(f"SeqKD: the teacher wrote {len(texts)} texts, {len(seqkd_data.train)} blocks of {SEQ_LEN}")
        sources = _sources(teacher, student_tok, teacher_tok)
        results: dict[str, list[dict]] = {m: [] for m in METHODS}
        for seed in range(args.seeds):
            for method in METHODS:
                student, tcfg = _train_student(method, seed, data, seqkd_data, sources, student_tok, work,
                                               args.student_steps)
                results[method].append(_evaluate(student, tcfg, data, sources, student_tok, args.eval_batches))
                _log(f"seed {seed} {method}: {results[method][-1]}")
    finally:
        if work_ctx is not None:
            work_ctx.cleanup()
    rows = _rows(results)
    record = {
        "benchmark": "evidence_cross_tokenizer", "teacher": "demo-teacher shape, DeepSeek tokenizer (129,280 rows)",
        "student": "demo-student", "teacher_steps": args.teacher_steps, "student_steps": args.student_steps,
        "seeds": args.seeds, "seq_len": SEQ_LEN, "train_blocks": len(data.train), "val_blocks": len(data.val),
        "seqkd_texts": len(texts), "seqkd_blocks": len(seqkd_data.train), "teacher_val_ce": teacher_eval.get("val_ce"),
        "per_seed": results, "fractions": sources["hybrid"].fractions(), "wall_s": round(time.perf_counter() - started, 1),
        "threads": torch.get_num_threads(), "torch": torch.__version__,
    }
    print_table(f"cross-tokenizer evidence: demo-student <- DeepSeek-tokenizer demo teacher, {args.student_steps} "
                f"steps, mean of {args.seeds} seed(s) (ratio = method / ce_only; val_ce lower is better, agreement "
                f"higher is better)", rows, ours_label="method", reference_label="ce_only")
    print(json.dumps(record))
    write_result(args, __file__, argv, record, rows)
    return {**record, "rows": rows}


if __name__ == "__main__":
    main()
