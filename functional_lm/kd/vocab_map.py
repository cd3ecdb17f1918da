"""教师词表 → 学生词表的 id 映射：两个词表里字节串相同的 token 是同一个 token，建一次，训练中只查表。

    map_T→S[t] = s  当且仅当  bytes_T(t) = bytes_S(s)；没有对应时为 −1（这部分教师概率并进尾部桶）。
    特殊 token 先按字面串配对，再按角色补上一对：学生的文档分隔符（<|endoftext|>）↔ 教师的 eos
    （DeepSeek 的 <｜end▁of▁sentence｜>）；每个 id 至多配一次，映射是单射。
    两边是同一个分词器（指纹相同）时映射是恒等映射，``identity`` 为真。
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from functional_lm.data.tokenizer import Tokenizer

__all__ = ["VocabMap", "build_vocab_map", "same_vocabulary"]


@dataclass(frozen=True)
class VocabMap:
    """两个方向的 id 映射（int64，−1 = 没有对应）与一行说明用的统计。"""

    teacher_to_student: torch.Tensor  # (V_T,)
    student_to_teacher: torch.Tensor  # (V_S,)
    identity: bool  # 同一个分词器：恒等映射
    student_name: str
    teacher_name: str

    @property
    def shared(self) -> int:
        """两个词表共有的 token 数。"""
        return int((self.teacher_to_student >= 0).sum())

    def describe(self) -> str:
        vt, vs = self.teacher_to_student.numel(), self.student_to_teacher.numel()
        return (f"{self.shared:,} of the teacher's {vt:,} tokens ({self.teacher_name}) have the same bytes as a token "
                f"of the student's {vs:,} ({self.student_name})")


def _name(tok: Tokenizer) -> str:
    return str(tok.source or "offline Qwen2.5")


def same_vocabulary(a: Tokenizer, b: Tokenizer) -> bool:
    """两个分词器是同一个词表：指纹相同，或每个 id 的字节串逐一相同（一个来自 tokenizer.json、一个来自 tiktoken
    也算同一个）。"""
    return a.fingerprint == b.fingerprint or a.token_bytes() == b.token_bytes()


def build_vocab_map(student: Tokenizer, teacher: Tokenizer) -> VocabMap:
    """按字节串配对两个词表（见模块说明）。"""
    vs, vt = student.real_vocab_size, teacher.real_vocab_size
    if same_vocabulary(student, teacher):
        ids = torch.arange(vs, dtype=torch.int64)
        return VocabMap(ids, ids.clone(), True, _name(student), _name(teacher))
    by_bytes: dict[bytes, int] = {}
    for index, piece in enumerate(student.token_bytes()):
        if piece is not None:
            by_bytes.setdefault(piece, index)
    t2s, s2t = [-1] * vt, [-1] * vs
    for index, piece in enumerate(teacher.token_bytes()):
        s = by_bytes.get(piece) if piece is not None else None
        if s is not None and s2t[s] < 0:
            t2s[index], s2t[s] = s, index
    sep, eos = student.separator_token_id, teacher.eos_token_id
    if s2t[sep] < 0 and t2s[eos] < 0:  # 按角色：文档分隔符 ↔ 教师的 eos
        t2s[eos], s2t[sep] = sep, eos
    as_tensor = lambda ids: torch.tensor(ids, dtype=torch.int64)  # noqa: E731
    return VocabMap(as_tensor(t2s), as_tensor(s2t), False, _name(student), _name(teacher))
