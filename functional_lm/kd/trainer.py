"""蒸馏训练器：冻结的教师（Qwen2.5 / DeepSeek-R1-Distill-Qwen）→ 学生，JAX 风格的训练步。

训练步的结构：
    * 损失是 (学生参数, 批, 教师隐藏状态) 的纯函数 ``distill_loss``；教师在 ``torch.no_grad`` 下
      通过同一个 ``forward_hidden`` 运行（可选 bfloat16 权重）。
    * 梯度：用叶子张量上的 autograd，而不是 ``torch.func.grad_and_value``。原因：分块蒸馏损失是一个
      在前向里逐块算好梯度的 ``autograd.Function``（峰值内存 O(chunk × vocab) 的关键），它不能放进
      torch.func 变换；而 torch.optim.AdamW 本来就要在同一批叶子张量上读 ``.grad``，
      autograd 直接把梯度写到那里，省去一次梯度字典到 ``.grad`` 的拷贝。
    * AdamW（torch.optim），范数权重与偏置不做权重衰减；线性预热 warmup_steps 步后余弦衰减到 0；
      全局梯度范数裁剪；梯度累积时用全局有效 token 数归一化，结果与一次算大批相同。
    * 每 log_interval 步：进度条与 metrics.jsonl；每 eval_interval 步与结束时：验证；
      每 save_interval 步与结束时：原子保存检查点（HF 格式学生 + 训练器状态），只保留最近 keep_last 个。
    * 非有限的损失或梯度范数立即停止训练，报告步数与最后一个好的检查点；绝不写出含 NaN 的检查点。
    * SIGINT / SIGTERM：当前步结束后保存并干净退出；``resume=True`` 从最新检查点逐位一致地继续。
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from functional_lm.allocator import tune_malloc
from functional_lm.kd.cache_identity import data_fingerprint, describe, differences
from functional_lm.runs.checkpoint import (
    checkpoint_name,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    optimizer_from_tensors,
    restore_rng,
    rng_state,
    save_checkpoint,
)
from functional_lm.config import ModelConfig, TrainingConfig
from functional_lm.distributed import (
    SINGLE,
    Dist,
    GatheredParams,
    ParamShell,
    all_reduce_sum,
    gather_to_main,
    on_main,
    peer_loss_explained,
    setup,
    shard_teacher,
    wrap_student,
)
from functional_lm.losses import (
    chunked_distillation_loss,
    chunked_sparse_distillation_loss,
    distillation_loss,
    sparse_distillation_loss,
)
from functional_lm.models.qwen2 import check_params, forward_hidden, output_weight, unique_tensors
from functional_lm.kd.on_policy import batch_source, loss_configs, make_rollouts
from functional_lm.runs.monitor import (
    Metrics, NullMetrics, Progress, StopFlag, Window, progress_bar, say, stop_on_signals,
)
from functional_lm.kd.teacher_cache import stored_log_probs, teacher_targets
from functional_lm.errors import RunDirError, write_failure
from functional_lm.shapes import typecheck
from functional_lm.errors import NonFiniteLossError

__all__ = [
    "Model",
    "TrainResult",
    "no_weight_decay",
    "build_optimizer",
    "learning_rate",
    "count_valid_tokens",
    "distill_loss",
    "teacher_hidden_states",
    "evaluate",
    "evaluate_on_policy",
    "check_generation",
    "StepStats",
    "optimizer_step",
    "teacher_dtype",
    "total_training_steps",
    "train",
]


@dataclass
class Model:
    """一个模型 = 参数字典 + 它的配置。"""

    params: dict[str, torch.Tensor]
    cfg: ModelConfig


@dataclass
class TrainResult:
    """一次 train() 调用的结果。"""

    step: int  # 结束时完成的优化步数
    total_steps: int  # 计划的总步数
    interrupted: bool  # 是否因 SIGINT / SIGTERM 提前结束
    last_checkpoint: Optional[Path]
    final_eval: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)  # 每次记录的训练指标
    params: dict[str, torch.Tensor] = field(default_factory=dict)  # 训练后的学生参数（已 detach）


# ---------------------------------------------------------------- 优化器与学习率
def no_weight_decay(name: str) -> bool:
    """范数权重与偏置不做权重衰减（它们不是“容量”参数，衰减只会把它们拉向 0）。"""
    return name.endswith(".bias") or name.endswith("norm.weight")


def build_optimizer(params: Mapping[str, torch.Tensor], tcfg: TrainingConfig, *, fused: bool = False) -> torch.optim.AdamW:
    """AdamW，分两组：矩阵与嵌入衰减 weight_decay，范数与偏置不衰减；fused=True（CUDA）用融合内核。"""
    decay = [p for name, p in params.items() if not no_weight_decay(name)]
    keep = [p for name, p in params.items() if no_weight_decay(name)]
    groups = [
        {"params": decay, "weight_decay": tcfg.weight_decay},
        {"params": keep, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=tcfg.learning_rate, betas=(0.9, 0.95), eps=1e-8, fused=fused or None)


def learning_rate(step: int, tcfg: TrainingConfig, total_steps: int) -> float:
    """第 step 步（从 0 计）的学习率：线性预热，然后余弦衰减到 0。

    预热：lr·(step+1)/W（step < W）；之后 progress = (step − W)/(S − W)，lr·½(1 + cos(π·progress))。
    """
    warmup = min(tcfg.warmup_steps, max(total_steps - 1, 0))
    if step < warmup:
        return tcfg.learning_rate * (step + 1) / warmup
    progress = (step - warmup) / max(total_steps - warmup, 1)
    return tcfg.learning_rate * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def count_valid_tokens(batch: Any, ignore_index: int = -100) -> int:
    """一批中计入损失的 token 数（标签不为 ignore_index 且 loss_mask 为真）。"""
    return int(((batch.labels != ignore_index) & batch.loss_mask).sum())


# ---------------------------------------------------------------- 损失（纯函数）
def document_segments(batch: Any, tcfg: TrainingConfig) -> Optional[torch.Tensor]:
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


def cached_targets(cache: Any, batch: Any, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """从教师缓存按批的块号取目标，搬到设备上。"""
    if getattr(batch, "block_ids", None) is None:
        raise ValueError("training from a teacher cache needs batches that carry block_ids (BatchLoader gives them)")
    return tuple(x.to(device, non_blocking=True) for x in cache.targets(batch.block_ids.cpu()))  # type: ignore[return-value]


def distill_loss(
    params: Mapping[str, torch.Tensor],
    cfg: ModelConfig,
    batch: Any,
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


# ---------------------------------------------------------------- 验证
def _teacher_scope(teacher: Optional[Model]) -> contextlib.AbstractContextManager:
    """切分的教师只在这个上下文里可读（逐层 all-gather）；普通字典的教师什么都不用做。"""
    if teacher is not None and isinstance(teacher.params, GatheredParams):
        return teacher.params.gathered()
    return contextlib.nullcontext()


def _sharded(teacher: Optional[Model]) -> bool:
    return teacher is not None and isinstance(teacher.params, GatheredParams)


def _no_checks_if_sharded(teacher: Optional[Model]) -> contextlib.AbstractContextManager:
    """切分的教师前向时关掉 beartype：它检查 Mapping 时会随机取一项，各进程取到不同的层，
    all-gather 就对不上了。其余情况不碰用户的检查开关。"""
    return typecheck(False) if _sharded(teacher) else contextlib.nullcontext()


def _eval_row(
    student: Model, teacher: Optional[Model], one: Any, tcfg: TrainingConfig, real: int, cache: Any = None
) -> dict[str, float]:
    """一条验证序列的各项之和（乘以有效 token 数 n，便于跨序列、跨进程相加）；
    没有教师而有验证集的教师缓存时，KL 与一致率改按缓存目标计算（见 _cache_row）。"""
    n = count_valid_tokens(one)
    s_logits, t_logits = _row_logits(student, teacher, one.input_ids, document_segments(one, tcfg))
    common = dict(real_vocab_size=real, loss_mask=one.loss_mask, return_parts=True)
    loss, parts = distillation_loss(
        s_logits, t_logits, one.labels, alpha=tcfg.alpha, temperature=tcfg.temperature,
        divergence=tcfg.divergence, **common,
    )
    _, kl1 = distillation_loss(s_logits, t_logits, one.labels, alpha=1.0, temperature=1.0, **common)
    valid = (one.labels != -100) & one.loss_mask
    agree = s_logits[..., :real].argmax(-1) == t_logits[..., :real].argmax(-1)
    row = {
        "loss": float(loss) * n, "kd": float(parts["kd"]) * n, "ce": float(parts["ce"]) * n,
        "teacher_ce": _summed_ce(t_logits, one.labels, valid, real), "kl_t1": float(kl1["kd"]) * n, "agree": float(agree[valid].sum()),
        "tokens": float(n), "kl_cache": 0.0,
    }
    return row | _cache_row(s_logits, one, cache, real) if teacher is None and cache is not None else row


def _row_logits(
    student: Model, teacher: Optional[Model], input_ids: torch.Tensor, segment_ids: Optional[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """一条序列上学生与教师的完整 logits（教师的在 float32 中）；没有教师时教师一侧就是学生的
    （KD 相关的量恒为 0，最后不报告）。"""
    s_hidden = forward_hidden(student.params, input_ids, student.cfg, segment_ids=segment_ids)
    s_logits = s_hidden @ output_weight(student.params, student.cfg).T
    if teacher is None:
        return s_logits, s_logits
    with _teacher_scope(teacher), _no_checks_if_sharded(teacher):
        t_hidden = forward_hidden(teacher.params, input_ids, teacher.cfg, check=False, segment_ids=segment_ids)
        return s_logits, t_hidden.float() @ output_weight(teacher.params, teacher.cfg).float().T


def _cache_row(s_logits: torch.Tensor, one: Any, cache: Any, real: int) -> dict[str, float]:
    """没有教师、只有验证集的教师缓存时：与缓存目标的 KL（温度取缓存的 T，k 个单 token 桶 + 尾部桶）
    与 top-1 一致率（学生的 argmax 是否等于缓存里概率最大的 id），同样乘以有效 token 数。"""
    ids, log_p, tail = (x.to(s_logits.device) for x in cache.targets(one.block_ids.cpu()))
    _, parts = sparse_distillation_loss(
        s_logits, ids, log_p, one.labels, teacher_tail_mass=tail, alpha=1.0, temperature=cache.temperature,
        real_vocab_size=real, loss_mask=one.loss_mask, return_parts=True,
    )
    valid = (one.labels != -100) & one.loss_mask
    agree = s_logits[..., :real].argmax(-1) == ids[..., 0]
    return {"kl_cache": float(parts["kd"]) * count_valid_tokens(one), "agree": float(agree[valid].sum())}


def _scores(totals: Mapping[str, float], with_teacher: bool, with_cache: bool = False) -> dict[str, float]:
    """各项之和 → 按有效 token 的平均与困惑度。"""
    tokens = totals["tokens"]
    mean = {k: v / tokens for k, v in totals.items()}
    scores = {"val_ce": mean["ce"], "student_ppl": math.exp(min(mean["ce"], 50.0)), "val_tokens": tokens}
    if with_teacher:
        scores |= {
            "val_loss": mean["loss"],
            "val_kd": mean["kd"],
            "teacher_ce": mean["teacher_ce"],
            "teacher_ppl": math.exp(min(mean["teacher_ce"], 50.0)),
            "kl_teacher_student": mean["kl_t1"],
            "top1_agreement": mean["agree"],
        }
    elif with_cache:
        scores |= {"kl_cache_student": mean["kl_cache"], "top1_agreement": mean["agree"]}
    return scores


def _my_batches(loader: Any, max_batches: Optional[int], teacher: Optional[Model], info: Dist) -> tuple[bool, range]:
    """验证批怎样分给各进程：(是否轮流分担, 本进程算的批号)。多进程时第 i 批归第 i mod W 个进程；
    教师按层切分时每个进程都算全部批（all-gather 必须一一对上），结果相同、不再相加。"""
    count = min(max_batches if max_batches is not None else len(loader), len(loader))
    striped = info.enabled and not _sharded(teacher)
    return striped, range(info.rank, count, info.world_size) if striped else range(count)


@torch.no_grad()
def evaluate(
    student: Model,
    teacher: Optional[Model],
    loader: Any,
    tcfg: TrainingConfig,
    *,
    real_vocab_size: int,
    max_batches: Optional[int] = None,
    info: Dist = SINGLE,
    teacher_cache: Any = None,
) -> dict[str, float]:
    """验证：损失各部分、学生与教师困惑度、KL(教师 ‖ 学生)（T = 1）、top-1 与教师一致率。

    没有教师而给了验证集的教师缓存（teacher_cache）时，报告学生困惑度、与缓存目标的 KL（kl_cache_student）
    和与缓存 argmax 的 top-1 一致率。

    逐条序列计算完整 logits（一次只有 t × vocab 的张量），按有效 token 汇总。
    不改变 loader 的训练状态：验证加载器是独立的、不打乱的。teacher 为 None 时只报告学生的交叉熵与困惑度。
    多进程时各进程轮流分担验证批（第 i 批归第 i mod W 个进程），各项之和 all-reduce；
    教师按层切分时每个进程都算全部批（all-gather 必须一一对上），结果相同、不再相加。
    """
    if getattr(loader, "document_mask", tcfg.document_mask) != tcfg.document_mask:
        loader = loader.relayout(document_mask=tcfg.document_mask)  # 标签与注意力用同一个文档掩码设置
    keys = ("loss", "kd", "ce", "teacher_ce", "kl_t1", "agree", "tokens", "kl_cache")
    totals = dict.fromkeys(keys, 0.0)
    striped, mine = _my_batches(loader, max_batches, teacher, info)
    device = info.device
    for index in mine:
        batch = loader.batch_at(0, index).to(device)  # 固定的验证批，不推进任何状态
        for row in range(batch.input_ids.shape[0]):
            one = batch.rows(row, row + 1)
            if count_valid_tokens(one) == 0:
                continue
            for key, value in _eval_row(student, teacher, one, tcfg, real_vocab_size, teacher_cache).items():
                totals[key] += value
    if striped:
        totals = dict(zip(keys, all_reduce_sum([totals[k] for k in keys], info)))
    with_cache = teacher is None and teacher_cache is not None
    return _scores(totals, teacher is not None, with_cache) if totals["tokens"] > 0 else {}


@torch.no_grad()
def evaluate_on_policy(
    student: Model,
    teacher: Model,
    loader: Any,
    rollouts: Any,
    tcfg: TrainingConfig,
    *,
    real_vocab_size: int,
    max_batches: Optional[int] = None,
    info: Dist = SINGLE,
) -> dict[str, float]:
    """在线蒸馏所优化的量：学生在验证提示上采样续写（种子 (seed, "eval", 块号)，每次验证相同），
    在生成的 token 上报告教师的逐 token 反向 KL  KL(P_S ‖ P_T)（T = 1）与教师 NLL  −log P_T(y)。

    与 evaluate 一样逐条序列算完整 logits、按有效 token 汇总，多进程时轮流分担、all-reduce。"""
    totals = [0.0, 0.0, 0.0]  # Σ 反向 KL·n，Σ 教师 NLL·n，n
    striped, mine = _my_batches(loader, max_batches, teacher, info)
    for index in mine:
        gen = rollouts.generated(student.params, student.cfg, loader.batch_at(0, index), "eval", tcfg.seed)
        gen = gen.to(info.device)
        for row in range(gen.input_ids.shape[0]):
            for i, value in enumerate(_on_policy_row(student, teacher, gen.rows(row, row + 1), real_vocab_size)):
                totals[i] += value
    if striped:
        totals = all_reduce_sum(totals, info)
    if totals[2] == 0:
        return {}
    return {"on_policy_reverse_kl": totals[0] / totals[2], "on_policy_teacher_nll": totals[1] / totals[2],
            "on_policy_tokens": totals[2]}


def _on_policy_row(student: Model, teacher: Model, one: Any, real: int) -> tuple[float, float, float]:
    """一条生成序列：(反向 KL·n, 教师 NLL·n, n)，n 为生成的有效 token 数。词表大小的计算只在这 n 个位置上做
    （提示与填充约占一半的位置）。"""
    n = count_valid_tokens(one)
    if n == 0:
        return 0.0, 0.0, 0.0
    s_logits, t_logits = _row_logits(student, teacher, one.input_ids, one.segment_ids)
    valid = (one.labels != -100) & one.loss_mask
    s_logits, t_logits, labels = s_logits[valid], t_logits[valid], one.labels[valid]
    _, rkl = distillation_loss(s_logits, t_logits, labels, alpha=1.0, divergence="reverse_kl", temperature=1.0,
                               real_vocab_size=real, return_parts=True)
    return float(rkl["kd"]) * n, _summed_ce(t_logits, labels, torch.ones_like(labels, dtype=torch.bool), real), float(n)


def _summed_ce(logits: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor, real: int) -> float:
    """Σ 有效位置的交叉熵 lse(z) − z[label]（T = 1，只在真实词表的列上）：教师的 NLL / 困惑度用它，
    不必为一个交叉熵去算整套蒸馏损失。"""
    return float(torch.nn.functional.cross_entropy(logits[valid][:, :real].float(), labels[valid], reduction="sum"))


def check_generation(
    student: Model, teacher: Optional[Model], tcfg: TrainingConfig, cache: Any = None, info: Dist = SINGLE
) -> None:
    """在线蒸馏与教师生成（SeqKD）的一次性核对：要有教师模型、提示 + 续写放得进两边的 max_seq_len、
    切分的教师不能写续写（各进程的生成步数不同，逐层 all-gather 会对不上）。"""
    if not tcfg.generates:
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
    length = tcfg.prompt_length + tcfg.max_new_tokens
    limit = min(student.cfg.max_seq_len, teacher.cfg.max_seq_len)
    if length > limit:
        raise ValueError(
            f"prompt_length {tcfg.prompt_length} + max_new_tokens {tcfg.max_new_tokens} = {length} overflows "
            f"max_seq_len {limit} (student {student.cfg.max_seq_len}, teacher {teacher.cfg.max_seq_len}); "
            f"lower prompt_length or max_new_tokens"
        )
    if info.enabled and tcfg.teacher_sharding == "shard" and tcfg.teacher_generated_fraction > 0:
        raise ValueError("teacher_generated_fraction needs a whole teacher on every process to write with; "
                         "use teacher_sharding=replicate, or set teacher_generated_fraction to 0")


def _rollouts(data: Any, split: str, tcfg: TrainingConfig, real: int) -> Any:
    """训练集（有生成批时）或验证集（在线验证打开时）的 Rollouts（提示表；对话数据在这里核对每段对话）；
    用不到或没有这个划分时为 None。"""
    loader = data.train_loader if split == "train" else data.val_loader
    if loader is None or not (tcfg.generates if split == "train" else tcfg.evaluates_on_policy):
        return None
    return make_rollouts(loader.dataset, getattr(data, "tokenizer", None), tcfg, real)


# ---------------------------------------------------------------- 一个优化步
def total_training_steps(tcfg: TrainingConfig, batches_per_epoch: int) -> int:
    """计划的优化步数：max_steps（若给出）或 num_epochs 轮数据所能构成的步数。"""
    if tcfg.max_steps > 0:
        return tcfg.max_steps
    return max(1, tcfg.num_epochs * batches_per_epoch // tcfg.gradient_accumulation_steps)


@dataclass
class StepStats:
    """一个优化步的结果（各部分是全局有效 token 上的平均，所有进程相同）。"""

    loss: float
    kd: float
    ce: float
    grad_norm: float
    lr: float
    tokens: int  # 本步所有进程读入的 token 数（含不计损失的），用于吞吐
    source: str = "data"  # 这一步整批的来源：data / teacher / student（见 on_policy）


@dataclass
class _Stepper:
    """一个优化步所需的全部东西：学生（参数壳，多进程时包成 DDP）、优化器、（可选的）教师与前向函数。"""

    student: torch.nn.Module  # ParamShell，或包着它的 DDP
    params: dict[str, torch.Tensor]  # 壳里登记的参数（优化器与检查点看到的正是它们）
    names: dict[int, str]  # 参数张量的 id → 名字（优化器状态按名字存取）
    cfg: ModelConfig
    optimizer: torch.optim.Optimizer
    teacher: Optional[Model]  # α = 0 时为 None：训练不跑教师
    tcfg: TrainingConfig
    real_vocab_size: int
    info: Dist = SINGLE
    student_fwd: Callable = forward_hidden
    teacher_fwd: Callable = forward_hidden
    teacher_cache: Any = None  # 教师缓存（TeacherCache）：训练目标从它读，不跑教师
    rollouts: Any = None  # 在线蒸馏（on_policy.Rollouts）：把数据批换成学生或教师写的批
    loss_cfgs: dict[str, TrainingConfig] = field(default_factory=dict)  # 每个来源的损失设置（on_policy.loss_configs）

    def no_sync(self, last: bool) -> contextlib.AbstractContextManager:
        """梯度累积：只在最后一个微批的反向里做 all-reduce（DDP 的 no_sync）。"""
        if last or not self.info.enabled:
            return contextlib.nullcontext()
        return self.student.no_sync()


def _teacher_side(
    stepper: _Stepper, batch: Any, tcfg: TrainingConfig
) -> tuple[Optional[torch.Tensor], Optional[tuple]]:
    """这一微批的教师一侧：(教师隐藏状态, 稀疏目标)。教师缓存 → 只有目标；top_k > 0 → 在线取 top-k；
    否则 → 隐藏状态（分块损失逐块乘输出投影）。α = 0 时两者都是 None。tcfg 是这一批来源的损失设置。"""
    if stepper.teacher_cache is not None:
        return None, cached_targets(stepper.teacher_cache, batch, stepper.info.device)
    if stepper.teacher is None or tcfg.alpha == 0.0:
        return None, None
    with _no_checks_if_sharded(stepper.teacher):
        t_hidden = teacher_hidden_states(
            stepper.teacher, batch.input_ids, stepper.teacher_fwd, document_segments(batch, tcfg)
        )
        if tcfg.top_k > 0:
            return None, live_topk_targets(stepper.teacher, t_hidden, stepper.tcfg, stepper.real_vocab_size)
    return t_hidden, None


def _micro_step(
    stepper: _Stepper, batch: Any, num_tokens: int, last: bool, tcfg: Optional[TrainingConfig] = None
) -> torch.Tensor:
    """一个微批：教师隐藏状态 → 学生的分块损失（经过参数壳的 forward）→ 反向。

    tcfg：这一批来源的损失设置（缺省为训练配置本身；生成批见 on_policy.loss_configs）。
    返回本进程的 (损失, KD, CE) 三项（留在设备上，整步结束时才取回主机一次，不逐微批同步）。"""
    tcfg = tcfg or stepper.tcfg
    batch = batch.to(stepper.info.device, non_blocking=True)
    teacher = stepper.teacher if tcfg.alpha > 0.0 else None
    with stepper.no_sync(last), _teacher_scope(stepper.teacher):
        t_hidden, targets = _teacher_side(stepper, batch, tcfg)
        loss, parts = stepper.student(
            distill_loss, stepper.cfg, batch, teacher, t_hidden, tcfg,
            real_vocab_size=stepper.real_vocab_size, num_tokens=num_tokens, forward_fn=stepper.student_fwd,
            sparse_targets=targets,
        )
        # DDP 对各进程的梯度求平均；本进程的损失先乘进程数，平均后正是 Σ_全局 ℓ / N_全局 的梯度。
        (loss * stepper.info.world_size).backward()
    return torch.stack([loss.detach(), parts["kd"].to(loss.device), parts["ce"].to(loss.device)]).float()


def optimizer_step(stepper: _Stepper, micro: list[Any], lr: float, source: str = "data") -> StepStats:
    """微批 → 梯度（按全局有效 token 数归一化后逐微批累加）→ 全局范数裁剪 → AdamW 一步。

    单进程、多进程（DDP）与在线蒸馏共用这一个函数；source 是这一步整批的来源（"data" / "teacher" /
    "student"，见 on_policy），决定损失设置。全局有效 token 数 N 在所有进程、所有微批上
    求和（all-reduce）；损失或梯度范数非有限时不更新参数，抛 NonFiniteLossError（调用方补上最后一个好的检查点）。
    """
    info = stepper.info
    for group in stepper.optimizer.param_groups:
        group["lr"] = lr
    local = [float(sum(count_valid_tokens(b) for b in micro)), float(sum(b.input_ids.numel() for b in micro))]
    num_tokens, tokens = all_reduce_sum(local, info)
    tcfg = stepper.loss_cfgs.get(source, stepper.tcfg)
    sums = sum(
        _micro_step(stepper, batch, max(int(num_tokens), 1), last=index == len(micro) - 1, tcfg=tcfg)
        for index, batch in enumerate(micro)
    )
    loss_sum, kd_sum, ce_sum = all_reduce_sum(sums.tolist(), info)
    grad_norm = float(torch.nn.utils.clip_grad_norm_(unique_tensors(stepper.params), stepper.tcfg.gradient_clip))
    if not (math.isfinite(loss_sum) and math.isfinite(grad_norm)):
        stepper.optimizer.zero_grad(set_to_none=True)
        raise NonFiniteLossError(f"non-finite loss {loss_sum} (grad norm {grad_norm})")
    stepper.optimizer.step()
    stepper.optimizer.zero_grad(set_to_none=True)
    return StepStats(loss_sum, kd_sum, ce_sum, grad_norm, lr, int(tokens), source)


# ---------------------------------------------------------------- 训练主循环
def _check_models(
    student: Model, teacher: Optional[Model], tcfg: TrainingConfig, real_vocab_size: Optional[int],
    cache: Any = None, data: Any = None, info: Dist = SINGLE,
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
    if cache is not None:
        check_cache_matches(cache, tcfg, data.train_loader.dataset, real_vocab_size)
    check_generation(student, teacher, tcfg, cache, info)
    return real_vocab_size


def check_cache_matches(cache: Any, tcfg: TrainingConfig, dataset: Any, real_vocab_size: int) -> None:
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


def _refuse_foreign_run(run_dir: Path, ckpt_root: Path) -> None:
    """resume=False 却指向已有检查点或指标的目录：拒绝，免得新旧两次运行混在一起。"""
    found = [p.name for p in list_checkpoints(ckpt_root)]
    if found or (run_dir / "metrics.jsonl").is_file():
        what = f"checkpoints {found[-1]}…" if found else "metrics.jsonl"
        raise RunDirError(
            f"{run_dir} already holds a training run ({what}); resume it (resume=True, or --resume on the command "
            f"line) or train into a new directory (--overwrite clears it first)"
        )


def teacher_dtype(tcfg: TrainingConfig, device: torch.device) -> Optional[torch.dtype]:
    """教师的权重 dtype：teacher_bf16 为真（或 auto 且在 CUDA 上）时 bfloat16，否则 None（保持加载时的 dtype）。"""
    bf16 = tcfg.teacher_bf16 if tcfg.teacher_bf16 is not None else device.type == "cuda"
    return torch.bfloat16 if bf16 else None


def _teacher_for_training(teacher: Optional[Model], tcfg: TrainingConfig, info: Dist) -> Optional[Model]:
    """按配置与设备准备教师：bfloat16（teacher_bf16；auto = CUDA 上是），放到设备上，可选 FSDP2 按层切分。"""
    if teacher is None:
        return None
    dtype = teacher_dtype(tcfg, info.device) or next(iter(teacher.params.values())).dtype
    params = {k: v.to(device=info.device, dtype=dtype) for k, v in teacher.params.items()}
    if info.enabled and tcfg.teacher_sharding == "shard":
        return Model(shard_teacher(params, teacher.cfg.num_layers, info), teacher.cfg)
    if all(params[k] is v for k, v in teacher.params.items()):
        return teacher  # 设备与 dtype 都没变：沿用调用方的字典，不复制
    return Model(params, teacher.cfg)


def _build_stepper(
    student: Model, teacher: Optional[Model], tcfg: TrainingConfig, real: int, info: Dist, cache: Any = None,
    rollouts: Any = None,
) -> _Stepper:
    """学生参数放进参数壳（多进程时包成 DDP）、优化器（CUDA 上 fused）、教师与前向函数。
    有教师缓存时训练目标来自缓存，不跑教师（教师若给了只用于验证）。rollouts：在线蒸馏的生成器（可无）。"""
    # 拷贝一份（放到设备上）：训练原地更新壳里的参数，调用方给的张量保持不变。
    shell = ParamShell({k: v.detach().to(info.device, copy=True) for k, v in student.params.items()})
    params = shell.params()
    optimizer = build_optimizer(params, tcfg, fused=info.device.type == "cuda")
    compiled = torch.compile(forward_hidden) if tcfg.compile else forward_hidden
    return _Stepper(
        wrap_student(shell, info), params, {id(p): k for k, p in params.items()}, student.cfg, optimizer,
        teacher if (tcfg.alpha > 0.0 or tcfg.generates) and cache is None else None, tcfg, real, info,
        student_fwd=compiled, teacher_fwd=forward_hidden if _sharded(teacher) else compiled,  # 切分的教师不编译
        teacher_cache=cache, rollouts=rollouts, loss_cfgs=loss_configs(tcfg),
    )


def train(
    student: Model,
    teacher: Optional[Model],
    data: Any,
    tcfg: TrainingConfig,
    run_dir: str | Path,
    *,
    resume: bool = False,
    real_vocab_size: Optional[int] = None,
    tokenizer_dir: Optional[str | Path] = None,
    progress: bool = True,
    on_step_end: Optional[Callable[[int, dict[str, float]], None]] = None,
    info: Optional[Dist] = None,
    teacher_cache: Any = None,
    val_teacher_cache: Any = None,
) -> TrainResult:
    """把教师蒸馏进学生，返回 TrainResult。

    参数：
        student / teacher：参数字典与配置；教师参数不会被修改。teacher 为 None 时只训练交叉熵（α 须为 0）；
            teacher 给出而 α = 0 时，训练不跑教师（省下它的前向），验证仍报告与教师的比较。
        data：``functional_lm.data.prepare_data`` 的结果（train_loader / val_loader）。
        run_dir：运行目录；检查点在 ``run_dir/checkpoints``，指标在 ``run_dir/metrics.jsonl``。
        resume：从 ``run_dir/checkpoints`` 的最新检查点继续（没有检查点时从头开始）。为假而目录里已有
            检查点或指标时拒绝（RunDirError），免得两次运行混在一起。
        real_vocab_size：真实词表大小（分词器的 id 数）；两边 logits 在它之后的列被排除。
        tokenizer_dir：分词器目录，复制进每个检查点（学生因此可以独立使用）。
        on_step_end：每步结束时的回调 (step, 指标)，测试用它模拟崩溃。
        info：本进程在多进程运行中的位置（缺省按 torchrun 的环境变量与 tcfg.device 建立，见 distributed.setup）。
            多进程时每个进程都调用 train()；只有秩 0 显示进度、写指标与检查点。
        teacher_cache：训练集的教师缓存（``TeacherCache.open(C/train)``）：训练目标从它按块号读取，不跑教师
            （teacher 可以为 None；给了教师时只用于验证）。它的 top_k、温度、块长、文档掩码与块数必须与本次相同。
        val_teacher_cache：验证集的教师缓存（``C/val``）：没有教师时验证按它报告 KL 与 top-1 一致率。
    """
    tune_malloc()  # 大块临时张量留在进程里复用（见 allocator.py）；命令行在启动时已经做过
    info = info if info is not None else setup(tcfg.device)
    run_dir = Path(run_dir)
    ckpt_root = run_dir / tcfg.checkpoint_dir  # 绝对路径时就用它本身
    real = _check_models(student, teacher, tcfg, real_vocab_size, teacher_cache, data, info)
    if not resume:
        on_main(lambda: _refuse_foreign_run(run_dir, ckpt_root), info)
    loader, total = _training_loader(data, tcfg, info)
    _announce(run_dir, info, loader, tcfg, teacher)
    teacher_model = _teacher_for_training(teacher, tcfg, info)
    stepper = _build_stepper(student, teacher_model, tcfg, real, info, teacher_cache, _rollouts(data, "train", tcfg, real))
    result = _start(stepper, loader, total, ckpt_root if resume else None)
    metrics = _open_metrics(run_dir, info, result, resume)
    saver = _Saver(ckpt_root, stepper, loader, total, tokenizer_dir, result)
    evaluator = _Evaluator(stepper, teacher_model, data, metrics, val_teacher_cache)
    bar = _progress(total, result.step, progress, info)
    try:
        with stop_on_signals() as stop, peer_loss_explained(info, lambda: result.last_checkpoint):
            _loop(stepper, loader, total, result, metrics, saver, evaluator, bar, stop, on_step_end)
            if not result.interrupted:
                result.final_eval = evaluator(result.step, bar)
                saver.save(result.step, stop)
    finally:
        bar.close()
        result.params = {k: v.detach() for k, v in stepper.params.items()}
    return result


def _progress(total: int, step: int, progress: bool, info: Dist) -> Progress:
    """秩 0：有进度条时画进度条，没有时（--no-progress）每条记录打印一行；其余进程什么都不显示。"""
    return Progress(progress_bar(total, step, progress and info.is_main), total, not progress and info.is_main)


def _announce(run_dir: Path, info: Dist, loader: Any, tcfg: TrainingConfig, teacher: Optional[Model]) -> None:
    """秩 0：建运行目录，打印一行进程与全局批的布局。"""
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        say(_layout_line(info, loader, tcfg, teacher))


def _open_metrics(run_dir: Path, info: Dist, result: TrainResult, resume: bool) -> Any:
    """秩 0 写 metrics.jsonl（恢复时先截掉最后一个检查点之后的记录），其他进程什么都不写。"""
    if not info.is_main:
        return NullMetrics()
    metrics = Metrics(run_dir / "metrics.jsonl", lambda: result.last_checkpoint)
    if resume:
        metrics.truncate_after(result.step)
    return metrics


def _training_loader(data: Any, tcfg: TrainingConfig, info: Dist) -> tuple[Any, int]:
    """本进程的训练加载器（按全局批布局切分）与计划的总步数。"""
    loader = data.train_loader.relayout(
        rank=info.rank, world_size=info.world_size, accumulation=tcfg.gradient_accumulation_steps,
        pin_memory=info.device.type == "cuda", document_mask=tcfg.document_mask,
    )
    return loader, total_training_steps(tcfg, len(loader))


def _start(stepper: _Stepper, loader: Any, total: int, ckpt_root: Optional[Path]) -> TrainResult:
    """播种；给了检查点目录（恢复）且其中有检查点时从最新的一个装回。返回起点的 TrainResult。

    恢复哪一个检查点由秩 0 决定并广播：各进程绝不会装回不同的步。"""
    info = stepper.info
    torch.manual_seed(stepper.tcfg.seed + info.rank)
    result = TrainResult(step=0, total_steps=total, interrupted=False, last_checkpoint=None)
    found = on_main(lambda: latest_checkpoint(ckpt_root), info) if ckpt_root is not None else None
    if found is not None:
        result.step, result.last_checkpoint = _restore(found, stepper, loader)
        if info.is_main:
            say(f"resumed from step {result.step} of {total} ({found})")
    return result


def _layout_line(info: Dist, loader: Any, tcfg: TrainingConfig, teacher: Optional[Model]) -> str:
    """开始时的一行说明：设备、进程数、全局批怎样构成、教师怎样放置。"""
    procs = f"{info.world_size} processes" if info.enabled else "1 process"
    placement = ""
    if teacher is not None and info.enabled:
        placement = "; teacher sharded across processes (FSDP2)" if tcfg.teacher_sharding == "shard" else \
            "; teacher replicated on every process"
    return (
        f"[train] {info.device} × {procs}; global batch {loader.global_batch} sequences per step "
        f"(batch_size {loader.batch_size} × {info.world_size} × {loader.accumulation} accumulation){placement}"
    )


class _Evaluator:
    """按间隔验证（所有进程一起算，秩 0 写指标）；验证期间进度条上写着 “evaluating”，没有进度条时结果打印一行。"""

    def __init__(
        self, stepper: _Stepper, teacher: Optional[Model], data: Any, metrics: Any, val_cache: Any = None
    ) -> None:
        self.stepper, self.teacher, self.val_loader, self.metrics = stepper, teacher, data.val_loader, metrics
        self.val_cache = val_cache
        # 在线验证要教师给学生采样的续写打分：没有教师（只有教师缓存）时不做
        self.val_rollouts = _rollouts(data, "val", stepper.tcfg, stepper.real_vocab_size) if teacher is not None else None

    def __call__(self, step: int, bar: Any) -> dict[str, float]:
        if self.val_loader is None:
            return {}
        bar.describe("distill (evaluating)")
        s = self.stepper
        scores = evaluate(
            Model(s.params, s.cfg), self.teacher, self.val_loader, s.tcfg,
            real_vocab_size=s.real_vocab_size, max_batches=s.tcfg.eval_batches, info=s.info,
            teacher_cache=self.val_cache,
        )
        if self.val_rollouts is not None:
            scores |= evaluate_on_policy(
                Model(s.params, s.cfg), self.teacher, self.val_loader, self.val_rollouts, s.tcfg,
                real_vocab_size=s.real_vocab_size, max_batches=s.tcfg.eval_batches, info=s.info,
            )
        bar.describe("distill")
        record = {"kind": "eval", "step": step, **scores}
        self.metrics.write(record)
        bar.evaluated(record)
        return scores


def _stop_agreed(stop: StopFlag, info: Dist) -> bool:
    """任何一个进程收到 SIGINT / SIGTERM，所有进程在同一步一起停下（一次 all-reduce）。"""
    flag = 1.0 if stop.requested is not None else 0.0
    return all_reduce_sum([flag], info)[0] > 0 if info.enabled else flag > 0


def _loop(stepper, loader, total, result, metrics, saver, evaluator, bar, stop, on_step_end) -> None:
    """训练循环本身：取微批 → 一个优化步 → 记录 / 验证 / 保存 → 响应信号。"""
    tcfg = stepper.tcfg
    window = Window()
    while result.step < total:
        lr = learning_rate(result.step, tcfg, total)
        micro, source = _step_batches(stepper, loader, result.step)
        try:
            stats = optimizer_step(stepper, micro, lr, source)
        except NonFiniteLossError as err:
            where = result.last_checkpoint or "none (no checkpoint was written yet)"
            raise NonFiniteLossError(
                f"{err} at step {result.step + 1}; training stopped, nothing was saved for this step; "
                f"last good checkpoint: {where}"
            ) from None
        step = result.step = result.step + 1
        bar.step()
        window.add(stats)
        if step % tcfg.log_interval == 0 or step == total:
            logged = window.record(step, stats)
            metrics.write(logged)
            result.history.append(logged)
            bar.logged(logged)
        with window.paused():  # 验证与保存的时间不算进下一条记录的吞吐
            if step % tcfg.eval_interval == 0 and step != total:
                evaluator(step, bar)
            if step % tcfg.save_interval == 0 and step != total:
                saver.save(step, stop)
        if on_step_end is not None:
            on_step_end(step, {"loss": stats.loss, "kd": stats.kd, "ce": stats.ce, "lr": lr, "grad_norm": stats.grad_norm})
        if _stop_agreed(stop, stepper.info):
            saver.save(step, stop)
            result.interrupted = True
            if stepper.info.is_main:
                bar.write(f"{stop.requested or 'stop'} received: saved {result.last_checkpoint} at step {step}; "
                          f"resume with --resume")
            return


def _step_batches(stepper: _Stepper, loader: Any, step: int) -> tuple[list[Any], str]:
    """第 step 步（从 0 计）的微批与来源（on_policy.batch_source）：数据批原样；生成批由学生（当前参数）
    或教师为每个块写续写（on_policy.Rollouts）。数据位置照常前移，所以恢复与多进程的布局不受影响。"""
    micro = [loader.next_batch() for _ in range(stepper.tcfg.gradient_accumulation_steps)]
    source = batch_source(stepper.tcfg, step)
    if source == "data":
        return micro, source
    # 教师写续写时它是完整的一份（切分的教师不能写，check_generation 在开始时拒绝了）
    writer = Model(stepper.params, stepper.cfg) if source == "student" else stepper.teacher
    return [stepper.rollouts.generated(writer.params, writer.cfg, b, step, stepper.tcfg.seed) for b in micro], source


class _Saver:
    """原子保存检查点（秩 0 写；各进程交出自己的随机数状态）；同一步不重复保存，写盘失败说成一段话。"""

    def __init__(self, root, stepper, loader, total, tokenizer_dir, result) -> None:
        self.root, self.stepper, self.loader = root, stepper, loader
        self.total, self.tokenizer_dir, self.result = total, tokenizer_dir, result
        self.data = _data_identity(loader)  # 数据的内容指纹：开始时算一次，每个检查点都记下

    def save(self, step: int, stop: StopFlag) -> Optional[Path]:
        last = self.result.last_checkpoint
        if last is not None and last.name == checkpoint_name(step):
            return last  # 这一步已经存过了
        rng = gather_to_main(rng_state(), self.stepper.info)  # 各进程交出自己的随机数状态
        path = on_main(lambda: self._write(step, stop, rng, last), self.stepper.info)  # 秩 0 写；失败传给所有进程
        self.result.last_checkpoint = path
        return path

    def _write(self, step: int, stop: StopFlag, rng: Any, last: Optional[Path]) -> Path:
        s = self.stepper
        state = {
            "loader": self.loader.state_dict(), "training_config": s.tcfg.to_dict(), "total_steps": self.total,
            "real_vocab_size": s.real_vocab_size, "world_size": s.info.world_size, "data": self.data,
        }
        try:
            with stop.protect():
                return save_checkpoint(
                    self.root, step, s.params, s.cfg, s.optimizer, s.names, state,
                    keep_last=s.tcfg.keep_last, tokenizer_dir=self.tokenizer_dir, rng_states=rng,
                )
        except OSError as err:
            raise write_failure(err, f"the checkpoint of step {step}", self.root, last) from err


def _restore(path: Path, stepper: _Stepper, loader: Any) -> tuple[int, Path]:
    """把检查点装回：参数原地拷贝、优化器状态、数据位置、随机数。返回 (步数, 检查点路径)。

    检查点可以来自不同的进程数：参数与优化器状态是完整的（秩 0 写出），数据位置按“已消耗的块数”换算；
    随机数状态按秩恢复，新增的秩按 (seed, 步数, 秩) 播种。
    """
    saved_cfg, saved, tensors, state = load_checkpoint(path)
    if saved_cfg != stepper.cfg:
        changed = ", ".join(
            f"{k} {v} → {getattr(stepper.cfg, k)}" for k, v in saved_cfg.to_dict().items() if getattr(stepper.cfg, k) != v
        )
        raise ValueError(f"cannot resume from {path}: the student's model config changed ({changed})")
    _check_same_data(path, state, loader)  # 先于数据位置：内容换了时说“数据不同”，而不是块数对不上
    with torch.no_grad():
        for key, value in stepper.params.items():
            value.copy_(saved[key])
    optimizer_from_tensors(stepper.optimizer, tensors, state["optimizer_param_groups"], stepper.names)
    try:
        loader.load_state_dict(state["loader"])
    except ValueError as err:
        raise ValueError(f"cannot resume from {path}: {str(err).removeprefix('cannot resume: ')}") from None
    step = int(state["step"])
    if stepper.tcfg.document_mask and "document_mask" not in state.get("training_config", {"document_mask": None}):
        say(f"[train] note: {path} was written before document_mask existed (attention crossed documents); this "
            "run continues with document_mask=true, which changes the trajectory — pass document_mask=False to "
            "continue exactly as before")
    if not restore_rng(tensors, stepper.info.rank):
        torch.manual_seed(stepper.tcfg.seed * 1_000_003 + step * 1009 + stepper.info.rank)
    return step, path


def _data_identity(loader: Any) -> Optional[dict[str, Any]]:
    """加载器背后那份分词数据的内容指纹（cache_identity.data_fingerprint，与文件路径无关）；没有 TokenStore 时 None。"""
    store = getattr(getattr(loader, "dataset", None), "store", None)
    return data_fingerprint(store) if store is not None else None


def _check_same_data(path: Path, state: Mapping[str, Any], loader: Any) -> None:
    """恢复的数据必须与检查点训练过的内容相同（文件可以换了路径或被 touch 过）；旧检查点没有记录时不查。"""
    saved, now = state.get("data"), _data_identity(loader)
    if saved is None or now is None:
        return
    found = differences({"data": saved}, {"data": now})
    if found:
        words = "; ".join(describe(found, "this run", built="the checkpoint was trained on"))
        raise ValueError(
            f"cannot resume from {path}: {words}; resume with the data this run was trained on, or start a new "
            f"run (--overwrite or another --output-dir)"
        )
