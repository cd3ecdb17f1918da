"""在线蒸馏的采样估计（on_policy_estimator = "sampled"）：学生写的 token 上，逐 token 的反向 KL 估计。

学生从 q 采样续写 x_1 … x_N，教师只需给出实际 token 的 log 概率 log p(x_t | x_<t)（服务器只返回 top-1 时也够）：

    k_t = log q(x_t | x_<t) − log p(x_t | x_<t)          E_{x_t ~ q}[k_t] = KL(q ‖ p)（在这个前缀上）

损失取策略梯度的形式（k_t 当作不求导的“优势”）：

    L = (1/N) Σ_t sg(k_t) · log q(x_t | x_<t)            ∇L = (1/N) Σ_t k_t ∇log q(x_t)

因为 E_q[∇log q] = 0，E_q[k_t ∇log q(x_t)] = ∇ KL(q ‖ p)（对这一位置的分布求导），所以梯度是逐位置反向 KL
梯度的无偏估计；它不把后面位置的 KL 归功于前面的 token（与 on-policy 蒸馏的论文相同，按 token 折扣为 0），
因此相对整段序列的反向 KL 有偏。方差：单个样本的 k_t 可正可负、量级是 |log q − log p|，比 top-k 估计大得多；
top-k 估计（on_policy_estimator = "topk"）在教师的 top-k + 尾部上精确地算每个位置的散度，方差只来自采样的前缀，
偏差来自尾部的近似（尾部质量当作一个桶）。记录的 kd = (1/N) Σ_t k_t，即反向 KL 的蒙特卡洛估计。

采样必须来自 q 本身（generation_temperature = 1、generation_top_p = 1，配置核对）：否则 log q − log p 估计的
不是 KL(q ‖ p)。
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

__all__ = ["label_log_probs", "sampled_reverse_kl"]

IGNORE_INDEX = -100


def _chunk_label_log_probs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, real: int) -> torch.Tensor:
    """一块行的 log softmax(h·Wᵀ)[标签]（只在真实词表的列上取 softmax），float32。"""
    logits = F.linear(hidden, weight[:real]).float()
    return logits.log_softmax(dim=-1).gather(-1, labels[:, None])[:, 0]


def label_log_probs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, real_vocab_size: int,
                    chunk_size: int, recompute: bool = False) -> torch.Tensor:
    """(…, d) 的隐藏状态 → 每个位置给标签的 log 概率 (…)；标签为 IGNORE_INDEX 的位置是 0（调用方遮住）。

    按 chunk_size 行一块计算；recompute 时每块用 activation checkpointing（反向时重算，峰值内存一块的 logits）。"""
    flat_h = hidden.reshape(-1, hidden.shape[-1])
    flat_y = labels.reshape(-1)
    safe = flat_y.clamp(min=0)
    parts = []
    for start in range(0, flat_h.shape[0], chunk_size):
        rows = slice(start, start + chunk_size)
        args = (flat_h[rows], weight, safe[rows], real_vocab_size)
        parts.append(checkpoint(_chunk_label_log_probs, *args, use_reentrant=False) if recompute
                     else _chunk_label_log_probs(*args))
    out = torch.cat(parts) if parts else flat_h.new_zeros(0)
    return torch.where(flat_y == IGNORE_INDEX, torch.zeros_like(out), out).reshape(labels.shape)


def sampled_reverse_kl(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, teacher_log_p: torch.Tensor,
    loss_mask: torch.Tensor, *, real_vocab_size: int, chunk_size: int, num_tokens: int,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L = (1/N) Σ_t sg(k_t)·log q(x_t)，k_t = log q(x_t) − log p(x_t)（见模块说明）；返回 (L, {"kd": Σk/N, "ce": 0})。

    只在 loss_mask 为真的位置计；那里教师的 log P 必须有限（服务器在跨文档处给 NaN，那些位置不计损失）。"""
    keep = loss_mask & (labels != IGNORE_INDEX)
    log_q = label_log_probs(hidden[keep], weight, labels[keep], real_vocab_size=real_vocab_size,
                            chunk_size=chunk_size, recompute=True)
    log_p = teacher_log_p.to(log_q.device)[keep].float()
    if not torch.isfinite(log_p).all():
        raise ValueError("the teacher gave no finite log-probability for some sampled tokens that carry a loss")
    estimate = log_q.detach() - log_p
    n = max(int(num_tokens), 1)
    loss = (estimate * log_q).sum() / n
    return loss, {"kd": estimate.sum() / n, "ce": torch.zeros((), device=loss.device)}
