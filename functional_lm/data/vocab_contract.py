"""词表契约：分词器的真实 token 数（Qwen2.5 为 151,665）≤ 学生 / 教师的嵌入行数；多出来的行是填充行，
损失函数把它们遮掉。``check_vocab_compat`` 在组合不一致时报错并写明冲突的尺寸。"""

from __future__ import annotations

from dataclasses import dataclass

from functional_lm.data.tokenizer import Tokenizer

__all__ = ["VocabContract", "check_vocab_compat"]

# 核对教师分词器与学生分词器是否切得一样的探针文本。
_PROBE_TEXTS = (
    "Hello world",
    "The quick brown fox jumps over the lazy dog; it's 3.14159!",
    "你好，世界！机器学习与知识蒸馏。",
    "def f(x):\n    return x ** 2  # square\n",
    "emoji 😀🎉 and tabs\t\tand  spaces\n\n",
)


# --------------------------------------------------------------------------------------------
# 词表契约
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VocabContract:
    """真实 token 数与学生 / 教师嵌入行数的约定：id ∈ [0, real_vocab_size)，其余行是填充。"""

    real_vocab_size: int  # 分词器能产生的 id 个数（Qwen2.5：151,665）
    student_vocab_rows: int  # 学生嵌入 / 输出层行数（ModelConfig.vocab_size）
    teacher_vocab_rows: int | None = None  # 教师的行数（Qwen2.5-0.5B 151936，7B 152064）

    def padding_mask(self, rows: int):
        """长度为 rows 的布尔向量：真实 token 行为 True，填充行为 False（损失里遮掉 False 的 logits）。"""
        import torch

        return torch.arange(rows) < self.real_vocab_size


def check_vocab_compat(
    tokenizer: "Tokenizer | int",
    student_vocab_size: int,
    teacher_vocab_size: int | None = None,
    *,
    teacher_tokenizer: "Tokenizer | None" = None,
) -> VocabContract:
    """检查分词器 / 学生 / 教师三者的词表是否相容，不相容时抛 ValueError 并写明冲突的尺寸。

    规则：真实 token 数 ≤ 学生行数，且 ≤ 教师行数；给了教师分词器时，其真实 token 数与
    一组探针文本的 id 必须与我们的分词器完全相同（蒸馏逐 id 对齐 logits）。
    """
    real = tokenizer if isinstance(tokenizer, int) else tokenizer.real_vocab_size
    if student_vocab_size < real:
        raise ValueError(
            f"vocabulary clash: the tokenizer produces {real} token ids but the student embedding has "
            f"only {student_vocab_size} rows (ModelConfig.vocab_size must be >= {real})"
        )
    if teacher_vocab_size is not None and teacher_vocab_size < real:
        raise ValueError(
            f"vocabulary clash: the tokenizer produces {real} token ids but the teacher embedding has "
            f"only {teacher_vocab_size} rows"
        )
    if teacher_tokenizer is not None:
        if teacher_tokenizer.real_vocab_size != real:
            raise ValueError(
                f"vocabulary clash: the teacher tokenizer has {teacher_tokenizer.real_vocab_size} real "
                f"tokens, ours has {real}"
            )
        if not isinstance(tokenizer, int):
            for text in _PROBE_TEXTS:
                ours, theirs = tokenizer.encode(text), teacher_tokenizer.encode(text)
                if ours != theirs:
                    raise ValueError(
                        f"teacher and student tokenizers disagree on {text!r}: {theirs} vs {ours} "
                        f"(same sizes, {real} real tokens, but different ids)"
                    )
    return VocabContract(real, student_vocab_size, teacher_vocab_size)
