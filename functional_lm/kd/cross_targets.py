"""跨分词器的教师目标：教师在自己的 token 流上前向，每个学生位置从对齐给出的教师行取目标（kd/alignment.py）。

MAPPED 行（x_{i+1} 独自成组）：教师在温度 T 下的 log P_T（教师词表）映射到学生词表，

    log P̃(s) = log P_T(map⁻¹(s))（没有对应的学生 id 为 −∞），未映射的教师概率 U = Σ_{t: map(t) = −1} P_T(t)

组里有 m > 1 个教师 token t₁ … t_m 时（多对一），实际那段文本的概率按链式法则

    P(段) = P_T(t₁) · Π_{r=2..m} P_T(t_r | t₁ … t_{r−1})

整段归给学生 token x_{i+1}：P̃(x_{i+1}) += P(段)，同时从 t₁ 的质量里扣掉它（t₁ 有对应时 P̃(map(t₁)) −= P(段)，
否则 U −= P(段)）——“下一段文本以 t₁ 开头”的概率被拆成“正好是这一段”与“以 t₁ 开头的别的文本”，总和仍为 1。
然后取 top-k：(学生 id, log P̃, 尾部 = top-k 之外的 P̃ + U)，log P̃ 按教师缓存的存法（float16）取整，与同词表的
在线 top-k 是同一种数。两边是同一个分词器时映射是恒等的，这一步就是 ``teacher_topk`` 本身。

ULD 行：教师分布本身的 top-k（降序 log P_T 与尾部质量），不映射、不取整；学生 id 一栏填 0 … k−1 占位。
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F

from functional_lm.kd.alignment import KIND_MAPPED, KIND_ULD, CrossPlan
from functional_lm.kd.teacher_cache import LOGIT_BYTES, stored_log_probs
from functional_lm.losses import teacher_topk
from functional_lm.losses.common import teacher_log_probs

if TYPE_CHECKING:
    from functional_lm.kd.vocab_map import VocabMap

__all__ = ["CrossTargets", "cross_targets"]


class CrossTargets(NamedTuple):
    """一个微批的跨分词器目标，形状 (b, t, k) / (b, t, k) / (b, t) / (b, t)。"""

    ids: torch.Tensor  # 学生 id（MAPPED 行）；其余行为 0 … k−1 占位
    log_p: torch.Tensor  # MAPPED：log P̃；ULD：教师降序的 top-k log P_T
    tail: torch.Tensor  # top-k 之外的质量
    kind: torch.Tensor  # KIND_NONE / KIND_MAPPED / KIND_ULD


def _row_chunks(rows: torch.Tensor, vocab: int) -> list[torch.Tensor]:
    """教师行按块（每块 float32 logits 至多 LOGIT_BYTES，与建缓存的分块相同）。"""
    step = max(1, LOGIT_BYTES // (4 * vocab))
    return [rows[i : i + step] for i in range(0, rows.numel(), step)]


def _inner_log_probs(flat: torch.Tensor, weight: torch.Tensor, plan: CrossPlan, temperature: float, real: int) -> torch.Tensor:
    """链式法则的后几个因子之和：Σ_{r≥2} log P_T(t_r | …)，形状 (b, t)；没有 inner 行的位置为 0。"""
    out = torch.zeros(plan.inner_rows.shape, dtype=torch.float32, device=flat.device)
    present = plan.inner_rows >= 0
    rows, tokens = plan.inner_rows[present].to(flat.device), plan.inner_tokens[present].to(flat.device)
    parts = []
    for chunk in _row_chunks(torch.arange(rows.numel(), device=flat.device), weight.shape[0]):
        lp = teacher_log_probs(F.linear(flat[rows[chunk]], weight), real, temperature, torch.float32, inplace=True)
        parts.append(lp.gather(-1, tokens[chunk, None]).squeeze(-1))
    if parts:
        out[present.to(flat.device)] = torch.cat(parts)
    return out.sum(-1)


def _mapped_chunk(lp: torch.Tensor, vmap: VocabMap, first: torch.Tensor, label: torch.Tensor, extra: torch.Tensor,
                  chained: torch.Tensor, real_student: int) -> tuple[torch.Tensor, torch.Tensor]:
    """一块 MAPPED 行：教师 log P_T → 学生词表上的 log P̃ 与未映射质量 log U，已做链式法则的拆分（见模块说明）。"""
    s2t = vmap.student_to_teacher[:real_student].to(lp.device)
    t2s = vmap.teacher_to_student[: lp.shape[-1]].to(lp.device)
    mapped = lp[:, s2t.clamp(min=0)].masked_fill(s2t < 0, float("-inf"))
    unmapped = lp.masked_fill(t2s >= 0, float("-inf")).logsumexp(-1)
    if bool(chained.any()):
        rows = chained.nonzero().squeeze(1)
        lp_first = lp[rows].gather(-1, first[rows, None]).squeeze(-1)
        span = lp_first + extra[rows]  # log P(段)
        rest = lp_first + torch.log1p(-extra[rows].exp().clamp(max=1.0))  # log(P(t₁) − P(段))
        s = label[rows]
        mapped[rows, s] = torch.logaddexp(mapped[rows, s], span)
        a = t2s[first[rows]]
        has = a >= 0
        mapped[rows[has], a[has]] = rest[has]
        loose = rows[~has]  # t₁ 没有对应：从未映射质量里扣
        unmapped[loose] = unmapped[loose] + torch.log1p(-(span[~has] - unmapped[loose]).exp().clamp(max=1.0))
    return mapped, unmapped


def _topk_with_extra_tail(log_p: torch.Tensor, extra_tail: torch.Tensor, k: int) -> tuple[torch.Tensor, ...]:
    """log P̃ 的 top-k 与尾部质量 = top-k 之外的 P̃ + U（logsumexp 直接求得，不做 1 − Σ 的相减）。"""
    top, ids = log_p.topk(k, dim=-1)
    rest = log_p.scatter(-1, ids, float("-inf")).logsumexp(-1)
    return ids, top, torch.logaddexp(rest, extra_tail).exp()


@torch.no_grad()
def cross_targets(
    hidden: torch.Tensor, weight: torch.Tensor, plan: CrossPlan, vmap: VocabMap, labels: torch.Tensor, *,
    top_k: int, temperature: float, teacher_real_vocab: int, student_real_vocab: int,
) -> CrossTargets:
    """教师隐藏状态 (b, tt, d) + 对齐 → 每个学生位置的目标（见模块说明）。"""
    b, t = plan.kind.shape
    device = hidden.device
    flat, w32 = hidden.reshape(-1, hidden.shape[-1]).float(), weight.float()
    kind, pred = plan.kind.to(device), plan.pred_row.to(device)
    ids = torch.arange(top_k, device=device).expand(b * t, top_k).clone()
    log_p = torch.zeros((b * t, top_k), dtype=torch.float32, device=device)
    tail = torch.zeros(b * t, dtype=torch.float32, device=device)
    extra = _inner_log_probs(flat, w32, plan, temperature, teacher_real_vocab).reshape(-1)
    first, label = plan.first_token.to(device).reshape(-1), labels.to(device).reshape(-1).clamp(min=0)
    chained = (plan.inner_rows >= 0).any(-1).to(device).reshape(-1)
    for which in (KIND_MAPPED, KIND_ULD):
        positions = ((kind.reshape(-1) == which) & (pred.reshape(-1) >= 0)).nonzero().squeeze(1)
        for chunk in _row_chunks(positions, w32.shape[0]):
            logits = F.linear(flat[pred.reshape(-1)[chunk]], w32)
            if which == KIND_ULD or vmap.identity:  # 教师分布本身的 top-k（同一个分词器时即同词表的在线 top-k）
                out = teacher_topk(logits, top_k, temperature=temperature, real_vocab_size=teacher_real_vocab)
            else:
                lp = teacher_log_probs(logits, teacher_real_vocab, temperature, torch.float32, inplace=True)
                mapped, unmapped = _mapped_chunk(lp, vmap, first[chunk], label[chunk], extra[chunk], chained[chunk],
                                                 student_real_vocab)
                out = _topk_with_extra_tail(mapped, unmapped, top_k)
            if which == KIND_MAPPED:
                ids[chunk], log_p[chunk], tail[chunk] = out[0], stored_log_probs(out[1]), out[2]
            else:
                log_p[chunk], tail[chunk] = out[1], out[2]
    return CrossTargets(ids.reshape(b, t, top_k), log_p.reshape(b, t, top_k), tail.reshape(b, t), kind)
