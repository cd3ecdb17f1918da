"""蒸馏的目标：损失是 (学生参数, 批, 教师目标) 的纯函数，教师一侧给出隐藏状态或稀疏目标。

    L = α·T²·D(P_T ‖ P_S; T) + (1 − α)·CE(学生, 标签)，按有效 token 平均（N 为全局有效 token 数）

    * 教师在 ``torch.no_grad`` 下通过同一个 ``forward_hidden`` 运行，只给出最终隐藏状态；输出投影留给分块损失
      逐块去乘（峰值内存 O(chunk × vocab)）。
    * 在线 top-k（``top_k > 0``）与教师缓存给出稀疏目标 (top-k id, log P_T, 尾部质量)：同一个稀疏损失。
    * 没有教师时只训练交叉熵（α = 0）：预训练演示教师与“只用 CE”的对照学生。
    * 按层切分的教师（FSDP2）只在 ``teacher_scope`` 里可读。
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple, Optional

import torch

from functional_lm.config import ModelConfig, TrainingConfig
from functional_lm.distributed import GatheredParams
from functional_lm.losses import (
    chunked_cross_tokenizer_loss,
    chunked_distillation_loss,
    chunked_sparse_distillation_loss,
)
from functional_lm.models.decoder import forward_hidden, output_weight
from functional_lm.shapes import typecheck
from functional_lm.kd.cross_targets import CrossTargets
from functional_lm.kd.teacher_cache import stored_log_probs, teacher_targets

if TYPE_CHECKING:
    from functional_lm.data.loader import Batch

__all__ = [
    "Model",
    "SparseTargets",
    "SampledLogProbs",
    "count_valid_tokens",
    "document_segments",
    "teacher_hidden_states",
    "live_topk_targets",
    "distill_loss",
    "chunked_cross_entropy",
    "teacher_scope",
    "is_sharded",
    "no_checks_if_sharded",
]

SparseTargets = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (top-k id, log P_T, 尾部质量)：(b, t, k) / (b, t, k) / (b, t)


class SampledLogProbs(NamedTuple):
    """学生写的批、on_policy_estimator = "sampled"：教师给每个位置标签（采样的 token）的 log P (b, t)。"""

    log_p: torch.Tensor


@dataclass
class Model:
    """一个模型 = 参数字典 + 它的配置。"""

    params: dict[str, torch.Tensor]
    cfg: ModelConfig


def count_valid_tokens(batch: Batch, ignore_index: int = -100) -> int:
    """一批中计入损失的 token 数（标签不为 ignore_index 且 loss_mask 为真）。"""
    return int(((batch.labels != ignore_index) & batch.loss_mask).sum())


def document_segments(batch: Batch, tcfg: TrainingConfig) -> Optional[torch.Tensor]:
    """学生与教师前向用的文档编号：document_mask 打开且批里带着编号时是 batch.segment_ids，否则 None
    （None 时注意力跨文档，与以前的运行逐位相同）。"""
    return getattr(batch, "segment_ids", None) if tcfg.document_mask else None


def teacher_hidden_states(
    teacher: Model, input_ids: torch.Tensor, forward_fn: Callable = forward_hidden,
    segment_ids: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """教师最终隐藏状态（不求梯度）；输出投影留给分块损失逐块去乘。参数已在训练开始时核对过一次。"""
    with torch.no_grad():
        return forward_fn(teacher.params, input_ids, teacher.cfg, check=False, segment_ids=segment_ids)


def live_topk_targets(
    teacher: Model, teacher_hidden: torch.Tensor, tcfg: TrainingConfig, real_vocab_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """在线 top-k：教师隐藏状态 → (top-k id, log P_T, 尾部质量)，形状 (b, t, k) / (b, t, k) / (b, t)。

    与建教师缓存同一个函数（teacher_cache.teacher_targets），log 概率再按缓存的存法（float16）取整：
    从缓存训练与在线 top-k 训练因此是同一种计算。"""
    weight = output_weight(teacher.params, teacher.cfg)
    weight32 = weight if weight.dtype == torch.float32 else weight.float()
    ids, log_p, tail = teacher_targets(teacher_hidden, weight32, tcfg.top_k, tcfg.temperature, real_vocab_size)
    shape = tuple(teacher_hidden.shape[:-1])
    return ids.reshape(*shape, -1), stored_log_probs(log_p).reshape(*shape, -1), tail.reshape(shape)


def distill_loss(
    params: Mapping[str, torch.Tensor],
    cfg: ModelConfig,
    batch: Batch,
    teacher: Optional[Model],
    teacher_hidden: Optional[torch.Tensor],
    tcfg: TrainingConfig,
    *,
    real_vocab_size: int,
    num_tokens: Optional[int] = None,
    forward_fn: Callable = forward_hidden,
    sparse_targets: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """规格书的目标：α·T²·D(教师 ‖ 学生, T) + (1−α)·CE(学生, 标签)，按有效 token 平均。

    分块计算：学生 logits 与教师 logits 都只按 loss_chunk_size 个 token 一块临时生成。
    sparse_targets = (top-k id, 温度 T 下的 log P, 尾部质量)（在线 top-k 或教师缓存）时用稀疏损失，不需要教师。
    teacher 为 None 且没有稀疏目标时只训练交叉熵（要求 α = 0）：用于预训练演示教师与“只用 CE”的对照学生。
    """
    with torch.autocast(batch.input_ids.device.type, dtype=torch.bfloat16, enabled=tcfg.bf16):
        hidden = forward_fn(params, batch.input_ids, cfg, training=True, segment_ids=document_segments(batch, tcfg))
    if tcfg.bf16:
        hidden = hidden.float()  # 损失（softmax over vocab）始终在 float32 中计算
    if isinstance(sparse_targets, SampledLogProbs):  # 采样 token 上的反向 KL 估计（kd/sampled_kl.py）
        from functional_lm.kd.sampled_kl import sampled_reverse_kl

        count = num_tokens if num_tokens is not None else count_valid_tokens(batch)
        return sampled_reverse_kl(
            hidden, output_weight(params, cfg), batch.labels, sparse_targets.log_p, batch.loss_mask,
            real_vocab_size=real_vocab_size, chunk_size=tcfg.loss_chunk_size, num_tokens=count,
        )
    if isinstance(sparse_targets, CrossTargets):  # 跨分词器：映射目标 + ULD + CE（losses/cross_tokenizer.py）
        return chunked_cross_tokenizer_loss(
            hidden, output_weight(params, cfg), batch.labels, *sparse_targets, chunk_size=tcfg.loss_chunk_size,
            alpha=tcfg.alpha, temperature=tcfg.temperature, divergence=tcfg.divergence,
            real_vocab_size=real_vocab_size, loss_mask=batch.loss_mask, num_tokens=num_tokens, return_parts=True,
        )
    if sparse_targets is not None:
        ids, log_p, tail = sparse_targets
        return chunked_sparse_distillation_loss(
            hidden, output_weight(params, cfg), batch.labels, ids, log_p, teacher_tail_mass=tail,
            chunk_size=tcfg.loss_chunk_size, alpha=tcfg.alpha, temperature=tcfg.temperature,
            divergence=tcfg.divergence, real_vocab_size=real_vocab_size, loss_mask=batch.loss_mask,
            num_tokens=num_tokens, return_parts=True,
        )
    if teacher is None:
        if tcfg.alpha != 0.0:
            raise ValueError(f"training without a teacher needs alpha=0 (pure cross-entropy), got alpha={tcfg.alpha}")
        ce = chunked_cross_entropy(
            hidden, output_weight(params, cfg), batch.labels, batch.loss_mask,
            real_vocab_size=real_vocab_size, chunk_size=tcfg.loss_chunk_size, num_tokens=num_tokens,
        )
        return ce, {"kd": torch.zeros(()), "ce": ce.detach()}
    return chunked_distillation_loss(
        hidden,
        output_weight(params, cfg),
        batch.labels,
        teacher_hidden=teacher_hidden,
        teacher_weight=output_weight(teacher.params, teacher.cfg),
        chunk_size=tcfg.loss_chunk_size,
        alpha=tcfg.alpha,
        temperature=tcfg.temperature,
        divergence=tcfg.divergence,
        real_vocab_size=real_vocab_size,
        loss_mask=batch.loss_mask,
        num_tokens=num_tokens,
        return_parts=True,
        compile=tcfg.compile,
    )


def _chunk_ce_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, real_vocab_size: int) -> torch.Tensor:
    """一块 token 的交叉熵之和：logits 只在真实词表的列上取 softmax（填充行不分概率）。"""
    logits = (hidden @ weight[:real_vocab_size].T).float()
    return torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")


def chunked_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    real_vocab_size: int,
    chunk_size: int,
    num_tokens: Optional[int] = None,
) -> torch.Tensor:
    """纯交叉熵（α = 0 的训练：演示教师的预训练与“只用 CE”的对照），按 token 分块。

    每块的 logits 用 activation checkpointing：前向算完即丢，反向时重算，峰值内存 O(chunk × vocab)。
    归一化与蒸馏损失相同：Σ CE / N，N 为有效 token 数（或外部给出的全局计数）。
    """
    from torch.utils.checkpoint import checkpoint

    flat_h = hidden.reshape(-1, hidden.shape[-1])
    flat_y = torch.where(loss_mask, labels, torch.full_like(labels, -100)).reshape(-1)
    total = flat_h.new_zeros((), dtype=torch.float32)
    single = flat_h.shape[0] <= chunk_size  # 只有一块时没有必要重算：直接保留这一块的 logits
    for start in range(0, flat_h.shape[0], chunk_size):
        rows = slice(start, start + chunk_size)
        args = (flat_h[rows], weight, flat_y[rows], real_vocab_size)
        total = total + (_chunk_ce_sum(*args) if single else checkpoint(_chunk_ce_sum, *args, use_reentrant=False))
    count = num_tokens if num_tokens is not None else int((flat_y != -100).sum())
    return total / max(count, 1)


def teacher_scope(teacher: Optional[Model]) -> contextlib.AbstractContextManager:
    """切分的教师只在这个上下文里可读（逐层 all-gather）；普通字典的教师什么都不用做。"""
    if teacher is not None and isinstance(teacher.params, GatheredParams):
        return teacher.params.gathered()
    return contextlib.nullcontext()


def is_sharded(teacher: Optional[Model]) -> bool:
    return teacher is not None and isinstance(teacher.params, GatheredParams)


def no_checks_if_sharded(teacher: Optional[Model]) -> contextlib.AbstractContextManager:
    """切分的教师前向时关掉 beartype：它检查 Mapping 时会随机取一项，各进程取到不同的层，
    all-gather 就对不上了。其余情况不碰用户的检查开关。"""
    return typecheck(False) if is_sharded(teacher) else contextlib.nullcontext()

