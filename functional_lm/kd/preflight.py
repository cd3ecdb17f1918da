"""训练前的一次性核对：学生 / 教师的参数与词表、教师缓存与本次训练是否对得上、在线蒸馏的设置，
以及“不从头开始的运行不能写进已有运行的目录”。每个错误都是点名字段的一段话。"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

from functional_lm.config import TrainingConfig
from functional_lm.distributed import SINGLE, Dist
from functional_lm.errors import RunDirError
from functional_lm.kd.objective import Model
from functional_lm.models.decoder import check_params
from functional_lm.runs.checkpoint import list_checkpoints

if TYPE_CHECKING:
    from functional_lm.data.packing import PackedDataset
    from functional_lm.data.pipeline import DataBundle
    from functional_lm.kd.teacher_cache import TeacherCache

__all__ = ["check_models", "check_cache_matches", "check_generation", "check_rollout_length", "refuse_foreign_run"]


def check_models(
    student: Model, teacher: Optional[Model], tcfg: TrainingConfig, real_vocab_size: Optional[int],
    cache: Optional[TeacherCache] = None, data: Optional[DataBundle] = None, info: Dist = SINGLE,
) -> int:
    """训练前的一次性核对（含教师缓存与本次训练是否对得上、在线蒸馏的设置）；返回真实词表大小。"""
    if teacher is None and cache is None and tcfg.alpha != 0.0:
        raise ValueError(f"training without a teacher needs alpha=0 (pure cross-entropy), got alpha={tcfg.alpha}")
    vocab_rows = [student.cfg.vocab_size] + ([teacher.cfg.vocab_size] if teacher is not None else [])
    real_vocab_size = real_vocab_size or min(vocab_rows)
    if real_vocab_size > min(vocab_rows):
        raise ValueError(f"real_vocab_size={real_vocab_size} exceeds the embedding rows {vocab_rows}")
    check_params(student.params, student.cfg)
    if teacher is not None:
        check_params(teacher.params, teacher.cfg)
    if hasattr(cache, "check_run"):  # 服务端教师自己核对（温度、K、词表）
        cache.check_run(tcfg, real_vocab_size)
    elif cache is not None:
        check_cache_matches(cache, tcfg, data.train_loader.dataset, real_vocab_size)
    check_generation(student, teacher, tcfg, cache, info)
    return real_vocab_size


def check_cache_matches(cache: TeacherCache, tcfg: TrainingConfig, dataset: PackedDataset, real_vocab_size: int) -> None:
    """教师缓存与本次训练对得上：top_k、温度、块长、文档掩码、真实词表、块数逐项核对，不符的全部点名。"""
    fp = cache.fingerprint
    wanted = {"top_k": tcfg.top_k, "temperature": tcfg.temperature, "seq_len": dataset.seq_len,
              "document_mask": tcfg.document_mask, "real_vocab_size": real_vocab_size}
    problems = [f"{k}: the cache has {fp.get(k)!r}, this run uses {v!r}" for k, v in wanted.items() if fp.get(k) != v]
    if cache.num_blocks != len(dataset):
        problems.append(f"blocks: the cache holds {cache.num_blocks}, the training split has {len(dataset)}")
    if problems:
        raise ValueError(f"the teacher cache {cache.directory} does not match this run: " + "; ".join(problems)
                         + " (rebuild it with `functional-lm teacher-cache`, or change the run to match)")


def check_generation(
    student: Model, teacher: Optional[Model], tcfg: TrainingConfig, cache: Optional[TeacherCache] = None, info: Dist = SINGLE
) -> None:
    """在线蒸馏与教师生成（SeqKD）的一次性核对：要有教师模型、提示 + 续写放得进两边的 max_seq_len、
    切分的教师不能写续写（各进程的生成步数不同，逐层 all-gather 会对不上）。"""
    if not tcfg.generates:
        return
    if getattr(cache, "grades_generated", False):  # 服务端 / 跨分词器的教师给生成批打分，各自核对能做什么
        cache.check_generation(student, tcfg)
        return
    if teacher is None:
        where = "a teacher cache only holds targets for the data's own tokens" if cache is not None else "none was given"
        raise ValueError(
            f"on_policy_fraction / teacher_generated_fraction need the teacher model to grade (or write) every "
            f"generated token, but {where}; give the teacher, or set both fractions to 0"
        )
    if cache is not None:
        raise ValueError("a teacher cache cannot grade generated tokens; drop the teacher cache (train with the "
                         "teacher) or set on_policy_fraction and teacher_generated_fraction to 0")
    limit = min(student.cfg.max_seq_len, teacher.cfg.max_seq_len)
    check_rollout_length(tcfg, limit, f"max_seq_len {limit} (student {student.cfg.max_seq_len}, teacher "
                                      f"{teacher.cfg.max_seq_len})")
    if info.enabled and tcfg.teacher_sharding == "shard" and tcfg.teacher_generated_fraction > 0:
        raise ValueError("teacher_generated_fraction needs a whole teacher on every process to write with; "
                         "use teacher_sharding=replicate, or set teacher_generated_fraction to 0")


def check_rollout_length(tcfg: TrainingConfig, limit: int, where: str) -> None:
    """提示 + 续写（P + N）放得进 limit；where 写明 limit 从哪里来（本地教师、服务端教师、跨分词器的教师共用）。"""
    length = tcfg.prompt_length + tcfg.max_new_tokens
    if length > limit:
        raise ValueError(f"prompt_length {tcfg.prompt_length} + max_new_tokens {tcfg.max_new_tokens} = {length} "
                         f"overflows {where}; lower prompt_length or max_new_tokens")


def refuse_foreign_run(run_dir: Path, ckpt_root: Path) -> None:
    """resume=False 却指向已有检查点或指标的目录：拒绝，免得新旧两次运行混在一起。"""
    found = [p.name for p in list_checkpoints(ckpt_root)]
    if found or (run_dir / "metrics.jsonl").is_file():
        what = f"checkpoints {found[-1]}…" if found else "metrics.jsonl"
        raise RunDirError(
            f"{run_dir} already holds a training run ({what}); resume it (resume=True, or --resume on the command "
            f"line) or train into a new directory (--overwrite clears it first)"
        )

