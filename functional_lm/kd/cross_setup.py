"""``distill`` 的分词器选择：学生与教师各用哪个分词器、要不要跨分词器蒸馏（--cross-tokenizer）、哪些组合拒绝。

    教师的分词器 = --teacher-tokenizer（deepseek / qwen3.5 / 目录），否则教师目录里的 tokenizer.json，
                   否则离线 Qwen2.5 词表；没有教师目录（服务端教师、教师缓存）时缺省与学生的相同。
    学生的分词器 = --tokenizer；没给时，若教师是 Qwen 词表的（没有 --teacher-tokenizer、不是自带分词器的家族、
                   真实 token 数放得进学生的嵌入）就用教师的（与以前相同），否则离线 Qwen2.5 词表。
    两边“相同”指每个 id 的字节串逐一相同（同一个词表，哪怕一个来自 tokenizer.json、一个来自 tiktoken）。
    auto：不同 → hybrid，相同 → off；off 而两边不同 → 一段话拒绝；hybrid / uld 总是走跨分词器的路径
    （相同时对齐是恒等的，结果与同词表蒸馏相同）。
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Optional

from functional_lm.config import ModelConfig, TrainingConfig

if TYPE_CHECKING:
    from functional_lm.data.tokenizer import Tokenizer
    from functional_lm.distributed import Dist
    from functional_lm.kd.cross_teacher import CrossTokenizerTeacher
    from functional_lm.kd.objective import Model
    from functional_lm.kd.vocab_map import VocabMap

__all__ = ["TokenizerChoice", "choose_tokenizers", "refuse_cross_combinations", "check_cross_data", "open_cross_teacher", "DEFAULT_CROSS_TOP_K", "OWN_TOKENIZER_FAMILIES"]

DEFAULT_CROSS_TOP_K = 64  # 跨分词器蒸馏用教师的 top-k；没给 --top-k 时取 64
# 自带另一套分词器的家族：缺省时学生不用它们的分词器（学生是 Qwen2.5 词表）。
OWN_TOKENIZER_FAMILIES: dict[str, str] = {"deepseek_v3": "DeepSeek-V3"}
PADDING_SLACK = 2048  # 检查点的词表行数比分词器的真实 token 数多出这么多以上：多半配错了分词器


@dataclass
class TokenizerChoice:
    """选好的分词器：学生的（及其来源，供写进运行目录）、教师的、跨分词器的模式（off = 同词表蒸馏）。"""

    student: Tokenizer
    student_source: Optional[Path]
    teacher: Tokenizer
    mode: str  # off / hybrid / uld
    vocab_map: Optional[VocabMap] = None  # 跨分词器时的词表映射（check_cross_data 建好，open_cross_teacher 沿用）

    @property
    def cross(self) -> bool:
        return self.mode != "off"


def _teacher_tokenizer_source(run: Mapping[str, Any], teacher_dir: Optional[Path]) -> Any:
    if run.get("teacher_tokenizer"):
        return run["teacher_tokenizer"]
    if teacher_dir is not None and (teacher_dir / "tokenizer.json").is_file():
        return teacher_dir
    return None


def choose_tokenizers(run: Mapping[str, Any], teacher_dir: Optional[Path], teacher_cfg: Optional[ModelConfig],
                      student_cfg: ModelConfig) -> TokenizerChoice:
    """按模块说明选出两个分词器与模式；不相容的组合一段话拒绝。"""
    from functional_lm.data import load_tokenizer
    from functional_lm.data.vocab_bytes import load_teacher_tokenizer
    from functional_lm.kd.vocab_map import same_vocabulary

    mode = run.get("cross_tokenizer") or "auto"
    t_source = _teacher_tokenizer_source(run, teacher_dir)
    if t_source is None and teacher_dir is None:  # 服务端教师（或教师缓存）而没有 --teacher-tokenizer：与学生同一个
        s_path = Path(run["tokenizer"]) if run.get("tokenizer") else None
        student_tok = load_tokenizer(s_path)
        return TokenizerChoice(student_tok, s_path, student_tok, "off" if mode == "auto" else mode)
    teacher_tok = load_teacher_tokenizer(t_source)
    qwen_like = (not run.get("teacher_tokenizer") and teacher_tok.real_vocab_size <= student_cfg.vocab_size
                 and (teacher_cfg is None or teacher_cfg.family not in OWN_TOKENIZER_FAMILIES))
    s_source = Path(run["tokenizer"]) if run.get("tokenizer") else (t_source if qwen_like else None)
    student_tok = teacher_tok if s_source == t_source else load_tokenizer(s_source)
    if teacher_cfg is not None and (t_source is not None or teacher_cfg.family in OWN_TOKENIZER_FAMILIES):
        _check_teacher_rows(teacher_tok, teacher_cfg, t_source)  # 没有任何分词器的 Qwen 教师由词表契约核对
    same = same_vocabulary(student_tok, teacher_tok)
    if mode == "auto":
        mode = "off" if same else "hybrid"
    if mode == "off" and not same:
        t_name, s_name = teacher_tok.source or "offline Qwen2.5", student_tok.source or "offline Qwen2.5"
        raise ValueError(
            f"--cross-tokenizer off, but the teacher's tokenizer ({t_name}, {teacher_tok.real_vocab_size:,} tokens) "
            f"differs from the student's ({s_name}, {student_tok.real_vocab_size:,} tokens): same-vocabulary "
            f"distillation compares the two distributions id by id and needs one vocabulary; use --cross-tokenizer "
            f"hybrid or uld (or auto), or give the student the teacher's tokenizer with --tokenizer")
    return TokenizerChoice(student_tok, None if s_source is None else Path(str(s_source)), teacher_tok, mode)


def _check_teacher_rows(tok: Tokenizer, cfg: ModelConfig, source: Any) -> None:
    """教师检查点的词表行数与它的分词器要对得上：放得下全部 token，且多出的填充行不过 PADDING_SLACK。"""
    rows, real = cfg.vocab_size, tok.real_vocab_size
    if real > rows or rows - real > PADDING_SLACK:
        what = "fewer rows than" if real > rows else f"{rows - real:,} more rows than"
        raise ValueError(
            f"the teacher checkpoint's vocab_size ({rows:,} embedding rows) has {what} its tokenizer's "
            f"{real:,} tokens ({source or 'offline Qwen2.5'}): this is not the teacher's tokenizer; give the one it "
            f"was trained with (--teacher-tokenizer deepseek|qwen3.5|DIR, or a tokenizer.json in the teacher directory)")


def refuse_cross_combinations(run: Mapping[str, Any], tcfg: TrainingConfig, info: Dist) -> None:
    """跨分词器还不支持的组合：FSDP 切分的教师（一段话）。教师缓存与服务端教师都可以：跨分词器的缓存
    （kd/cross_cache.py）本身带着模式，服务端教师收到的是对齐后的教师流（kd/cross_served.py）。"""
    if info.enabled and tcfg.teacher_sharding == "shard":
        raise ValueError("teacher_sharding=shard with a cross-tokenizer teacher: each process aligns its own rows "
                         "and the teacher's token streams differ in length between processes, so layer-wise "
                         "all-gathers would not line up; use teacher_sharding=replicate")


def check_cross_data(choice: TokenizerChoice, data: Any) -> None:
    """加载教师权重之前：建词表映射，数据里有教师词表没有对应的学生特殊 token 时一段话拒绝（Aligner.check_data）。"""
    from functional_lm.kd.alignment import Aligner
    from functional_lm.kd.vocab_map import build_vocab_map

    if choice.vocab_map is None:
        choice.vocab_map = build_vocab_map(choice.student, choice.teacher)
    aligner = Aligner(choice.student, choice.teacher, choice.vocab_map, choice.mode)
    seen = set()
    for loader in (data.train_loader, data.val_loader):
        store = None if loader is None else loader.dataset.store
        if store is not None and id(store) not in seen:
            seen.add(id(store))
            aligner.check_data(store, "the training data")


def open_cross_teacher(teacher: Model, choice: TokenizerChoice, tcfg: TrainingConfig, info: Dist) -> CrossTokenizerTeacher:
    """教师放到设备上（与同词表蒸馏同样的 dtype 规则），建词表映射与对齐。"""
    from functional_lm.kd.cross_teacher import CrossTokenizerTeacher
    from functional_lm.kd.step import teacher_for_training
    from functional_lm.kd.vocab_map import build_vocab_map

    placed = teacher_for_training(teacher, tcfg.replace(teacher_sharding="replicate"), info)
    vocab_map = choice.vocab_map or build_vocab_map(choice.student, choice.teacher)
    return CrossTokenizerTeacher(placed, choice.student, choice.teacher, vocab_map, choice.mode, tcfg)
