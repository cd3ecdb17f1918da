"""跨分词器蒸馏的逐 token 项：映射目标上的散度（同稀疏损失）与 ULD（排序后概率向量的 Wasserstein-1 距离）。

每个学生位置带一种目标（kd/alignment.py 的 kind）：

    MAPPED：教师分布已映射到学生词表（top-k 学生 id、log P、尾部质量，尾部含没有对应 token 的教师概率），
            D 与同词表的稀疏损失逐位相同（``sparse_token_terms``）；
    ULD：   教师分布与学生分布没有 id 对应，比较排序后的概率（Boizard et al. 2024, Universal Logit Distillation）：

                W₁ = Σ_{r=1..k} | q_(r) − p_(r) |  +  | (1 − Σ_r q_(r)) − p_尾 |

            q_(r) 是学生（温度 T）第 r 大的概率，p_(r) 是教师第 r 大的概率，p_尾 = 教师 top-k 之外的质量。
            完整的 ULD 对两个词表的全部排序概率求和（短的一边补 0）；这里教师只给 top-k，k 之后的各名次并成
            一个尾部项：由三角不等式它不大于完整的和，两分布相同时为 0；
    NONE：  只有交叉熵。

    L = [α·T²·(Σ_MAPPED D + Σ_ULD W₁) + (1 − α)·Σ_全部 CE] / N

每一行都是 MAPPED 时（同一个分词器、--cross-tokenizer hybrid）结果就是 ``sparse_token_terms``，逐位相同。
"""

from __future__ import annotations

import torch

from functional_lm.losses.common import LossSpec, compute_dtype, student_log_probs
from functional_lm.losses.sparse import sparse_token_terms
from functional_lm.shapes import Float, Tensor, typechecked

__all__ = ["KIND_NONE", "KIND_MAPPED", "KIND_ULD", "uld_distance", "cross_token_terms"]

KIND_NONE, KIND_MAPPED, KIND_ULD = 0, 1, 2  # 每个学生位置的目标种类（kd/alignment.py 按它们分类）


@typechecked
def uld_distance(
    student_log_q: Float[Tensor, "n v"], teacher_top_log_p: Float[Tensor, "n k"], teacher_tail: Float[Tensor, "n"]
) -> Float[Tensor, "n"]:
    """排序概率向量之间截到 top-k 的 W₁（见模块说明）：学生 log Q 是完整分布，教师只给降序的 top-k 与尾部。"""
    k = teacher_top_log_p.shape[-1]
    q_top = student_log_q.topk(k, dim=-1).values.exp()
    p_top = teacher_top_log_p.sort(dim=-1, descending=True).values.exp().to(q_top.dtype)
    q_tail = (1.0 - q_top.sum(-1)).clamp(min=0.0)
    return (q_top - p_top).abs().sum(-1) + (q_tail - teacher_tail.to(q_top.dtype)).abs()


def cross_token_terms(
    student_logits: Tensor, targets: tuple[Tensor, Tensor, Tensor, Tensor], labels: Tensor, valid: Tensor,
    spec: LossSpec, real: int,
) -> tuple[Tensor, Tensor]:
    """逐 token 的 (D, CE)：targets = (学生 id, log P, 尾部质量, kind)，无效 token 处恰为 0。分块引擎逐块调用它。"""
    ids, log_p, tail, kind = targets
    mapped, uld = kind == KIND_MAPPED, valid & (kind == KIND_ULD)
    kd, ce = sparse_token_terms(student_logits, (ids, log_p, tail), labels, valid, spec, real)
    if bool((mapped | ~valid).all()):  # 每个计损失的行都有映射目标：就是同词表的稀疏损失
        return kd, ce
    kd = torch.where(mapped, kd, 0.0)
    rows = uld.nonzero().squeeze(1)
    if rows.numel():
        student_real = student_logits[rows, :real].to(compute_dtype(student_logits))
        w1 = uld_distance(student_log_probs(student_real, spec.temperature), log_p[rows], tail[rows])
        kd = kd.index_add(0, rows, w1.to(kd.dtype))
    return kd, ce
