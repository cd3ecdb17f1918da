"""稀疏教师目标（top-k + 尾部质量）：教师只以 top-k id 与温度 T 下的 log 概率（+ 尾部质量）给出，可缓存。

``teacher_topk`` 从教师 logits 生成这些目标；``sparse_distillation_loss`` 在"top-k 各一桶 + 其余并成一桶"的
k+1 桶划分上比较教师与学生::

    学生：(log Q_{id_1}, …, log Q_{id_k}, log Σ_{v∉topk} Q_v)        （尾部精确求得）
    教师：(log P_{id_1}, …, log P_{id_k}, log P_尾)                  （P_尾 = 给出的尾部质量，缺省时 1 − Σ_topk P）

由数据处理不等式，这个粗粒度散度 ≤ 稠密散度，k = V 时两者相等（没有尾部桶）。CE 项用学生的完整 logits；
其余约定见 ``common``。``check_topk`` 与 ``sparse_token_terms`` 也供分块版使用。
"""

import torch

from functional_lm.losses.common import (
    LossSpec,
    Number,
    check_ids,
    compute_dtype,
    cross_entropy,
    finish,
    resolve_real_vocab,
    student_log_probs,
    teacher_log_probs,
    token_divisor,
    valid_mask,
)
from functional_lm.losses.divergences import divergence_from_log_probs
from functional_lm.shapes import Bool, Float, Int, Integer, Tensor, typechecked

# ================================================================================================
# 稀疏教师目标（top-k + 尾部质量）
# ================================================================================================


@typechecked
def teacher_topk(
    teacher_logits: Float[Tensor, "*batch vt"],
    k: int,
    *,
    temperature: Number = 2.0,
    real_vocab_size: int | None = None,
) -> tuple[Int[Tensor, "*batch topk"], Float[Tensor, "*batch topk"], Float[Tensor, "*batch"]]:
    """把教师输出压成可缓存的稀疏目标：(top-k id, 温度 T 下的 log P, 尾部质量 1 − Σ_topk P)。

    注意 log 概率绑定了温度 T：缓存时的 T 必须与训练时相同。尾部质量由非 top-k 列的 logsumexp
    直接求得，而不是 1 − Σ，避免相减抵消。
    """
    spec = LossSpec(temperature=temperature)
    real = resolve_real_vocab(teacher_logits.shape[-1], None, real_vocab_size)
    if isinstance(k, bool) or not 1 <= k <= real:
        raise ValueError(f"k must be in [1, {real}] (the real vocabulary), got {k!r}")
    log_p = teacher_log_probs(teacher_logits, real, spec.temperature, compute_dtype(teacher_logits))
    top_log_p, ids = log_p.topk(k, dim=-1)
    tail = log_p.scatter(-1, ids, float("-inf")).logsumexp(dim=-1).exp()  # Σ_{v∉topk} P_v
    return ids, top_log_p, tail


def _logsumexp_or_neginf(x: Tensor) -> Tensor:
    """log Σ_v exp(x_v)（最后一维，keepdim）；整行都是 −∞ 时结果为 −∞ 且梯度为 0。

    torch.logsumexp 在整行 −∞ 时反向要算 exp(−∞ − (−∞)) = NaN，所以先把这些行换成 0（有限的安全值，
    masked_fill 与 torch.where 等价）再求，最后把结果换回 −∞：被换掉的位置只收到 0 梯度，乘以有限的 softmax 仍为 0。"""
    empty = torch.isneginf(x).all(dim=-1, keepdim=True)
    lse = x.masked_fill(empty, 0.0).logsumexp(dim=-1, keepdim=True)  # 即 torch.where(empty, 0, x)
    return lse.masked_fill(empty, float("-inf"))


def _coarse_student(log_q: Tensor, ids: Tensor) -> Tensor:
    """学生在"top-k 各一桶 + 其余并成一桶"划分上的 log 概率，形状 (..., k+1)。"""
    top = log_q.gather(-1, ids)
    rest = _logsumexp_or_neginf(log_q.scatter(-1, ids, float("-inf")))  # log Σ_{v∉topk} Q_v（可为 −∞）
    return torch.cat([top, rest], dim=-1)


def _coarse_teacher(top_log_p: Tensor, tail_mass: Tensor | None, dtype: torch.dtype) -> Tensor:
    """教师在同一划分上的 log 概率，与稠密教师同一约定：夹到 ≥ dtype 最小值（P = 0 时 log P 有限）。

    给出的尾部质量按原值取 log（恰为 0 → P_尾 = 0，学生尾部也为 0 时该桶贡献 0·log 0 = 0）；
    缺省时估计为 1 − Σ_topk P，这个差的舍入误差无法区分 0 与很小的质量，沿用夹到 ≥ 最小正规数的做法。
    教师屏蔽了列时请传 ``teacher_topk`` 给出的精确尾部质量。
    """
    finfo = torch.finfo(dtype)
    top_log_p = top_log_p.detach().to(dtype).clamp(min=finfo.min)
    if tail_mass is None:
        tail = (1.0 - top_log_p.exp().sum(dim=-1)).clamp(min=finfo.tiny)
    else:
        tail = tail_mass.detach().to(dtype).clamp(min=0.0)
    log_tail = tail.log().clamp(min=finfo.min)
    return torch.cat([top_log_p, log_tail.unsqueeze(-1)], dim=-1)


@typechecked
def sparse_distillation_loss(
    student_logits: Float[Tensor, "*batch vs"],
    teacher_topk_ids: Integer[Tensor, "*batch topk"],
    teacher_topk_log_probs: Float[Tensor, "*batch topk"],
    labels: Integer[Tensor, "*batch"],
    *,
    teacher_tail_mass: Float[Tensor, "*batch"] | None = None,
    alpha: Number = 0.5,
    temperature: Number = 2.0,
    divergence: str = "forward_kl",
    ignore_index: int = -100,
    beta: Number = 0.5,
    skew_lambda: Number = 0.1,
    real_vocab_size: int | None = None,
    loss_mask: Bool[Tensor, "*batch"] | None = None,
    num_tokens: int | Tensor | None = None,
    return_parts: bool = False,
) -> Float[Tensor, ""] | tuple[Float[Tensor, ""], dict[str, Tensor]]:
    """稀疏教师版蒸馏损失：教师只给 top-k id 与温度 T 下的 log 概率（可选尾部质量）。

    做法：把词表划分成 k 个单 token 桶加一个"尾部"桶，在这 k+1 个桶上比较教师与学生
    （学生尾部 = log Σ_{v∉topk} Q_v，精确求得）。由数据处理不等式，这个粗粒度散度 ≤ 稠密散度，
    k 增大（划分变细）时单调逼近，k = V 时两者相等（此时没有尾部桶）。其余约定与 ``distillation_loss`` 相同；
    CE 项用学生的完整 logits。
    """
    spec = LossSpec(divergence, temperature, alpha, beta, skew_lambda, ignore_index)
    real = resolve_real_vocab(student_logits.shape[-1], None, real_vocab_size)
    check_topk(teacher_topk_ids, real)
    valid = valid_mask(labels, loss_mask, ignore_index)
    check_ids(labels, valid, real, "labels")
    sparse = (teacher_topk_ids, teacher_topk_log_probs, teacher_tail_mass)
    kd, ce = sparse_token_terms(student_logits, sparse, labels, valid, spec, real)
    return finish(kd.sum(), ce.sum(), token_divisor(valid, num_tokens), spec, return_parts)


def check_topk(ids: Tensor, real: int) -> None:
    """top-k 的 k 不能超过真实词表，id 必须落在真实词表内。"""
    k = ids.shape[-1]
    if k > real:
        raise ValueError(f"teacher top-k has k={k} entries but the real vocabulary has only {real}")
    check_ids(ids, None, real, "teacher_topk_ids")


def sparse_token_terms(
    student_logits: Tensor, sparse: tuple[Tensor, Tensor, Tensor | None], labels: Tensor, valid: Tensor,
    spec: LossSpec, real: int,
) -> tuple[Tensor, Tensor]:
    """稀疏教师：逐 token 的 (D, CE)，无效 token 处恰为 0。普通版与分块版共用。

    sparse = (top-k id, 温度 T 下的 log P, 尾部质量或 None)；划分为 k 个单 token 桶 + 尾部桶（k = V 时无尾部）。
    """
    ids, top_log_p, tail_mass = sparse
    dtype = compute_dtype(student_logits)
    student_real = student_logits[..., :real].to(dtype)
    log_q = student_log_probs(student_real, spec.temperature)
    ids = ids.long()
    if ids.shape[-1] == real:  # 没有尾部：两边都是完整分布（只是列的顺序按 ids 重排）
        coarse_q = log_q.gather(-1, ids)
        coarse_p = top_log_p.detach().to(dtype).clamp(min=torch.finfo(dtype).min)
    else:
        coarse_q = _coarse_student(log_q, ids)
        coarse_p = _coarse_teacher(top_log_p, tail_mass, dtype)
    kd = torch.where(valid, divergence_from_log_probs(coarse_p, coarse_q, spec), 0.0)
    ce = torch.where(valid, cross_entropy(student_real, log_q, labels, valid, spec), 0.0)
    return kd, ce
