"""一个优化步：优化器与学习率日程、微批 → 梯度 → 裁剪 → AdamW。

    * AdamW（torch.optim），范数权重与偏置不做权重衰减；线性预热 warmup_steps 步后余弦衰减到 0。
    * 梯度：用叶子张量上的 autograd，而不是 ``torch.func.grad_and_value``——分块蒸馏损失是一个在前向里逐块
      算好梯度的 ``autograd.Function``，它不能放进 torch.func 变换；AdamW 本来就在同一批叶子张量上读 ``.grad``。
    * 梯度累积与多进程时用全局有效 token 数 N 归一化：Σ_全局 ℓ / N_全局，结果与一次算大批相同。
    * 全局梯度范数裁剪；损失或梯度非有限时不更新参数，抛 NonFiniteLossError。
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

import torch

from functional_lm.config import ModelConfig, TrainingConfig
from functional_lm.distributed import SINGLE, Dist, ParamShell, all_reduce_sum, shard_teacher, wrap_student
from functional_lm.errors import NonFiniteLossError
from functional_lm.kd.objective import (
    Model,
    SampledLogProbs,
    count_valid_tokens,
    distill_loss,
    document_segments,
    is_sharded,
    live_topk_targets,
    no_checks_if_sharded,
    teacher_hidden_states,
    teacher_scope,
)
from functional_lm.kd.on_policy import SourceSettings, source_settings
from functional_lm.kd.sampled_kl import label_log_probs
from functional_lm.models.decoder import forward_hidden, output_weight, unique_tensors

if TYPE_CHECKING:
    from functional_lm.data.loader import Batch
    from functional_lm.kd.on_policy import Rollouts
    from functional_lm.kd.teacher_cache import TeacherCache

__all__ = [
    "no_weight_decay",
    "build_optimizer",
    "learning_rate",
    "total_training_steps",
    "StepStats",
    "Stepper",
    "optimizer_step",
    "teacher_dtype",
    "teacher_for_training",
    "build_stepper",
]


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
class Stepper:
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
    teacher_cache: Optional[TeacherCache] = None  # 目标来源（TeacherCache 或 served.ServedTeacher）：目标从它读，不跑教师
    rollouts: Optional[Rollouts] = None  # 在线蒸馏（on_policy.Rollouts）：把数据批换成学生或教师写的批
    source_settings: SourceSettings = field(default_factory=dict)  # 每个来源的损失设置（on_policy.source_settings）

    def no_sync(self, last: bool) -> contextlib.AbstractContextManager:
        """梯度累积：只在最后一个微批的反向里做 all-reduce（DDP 的 no_sync）。"""
        if last or not self.info.enabled:
            return contextlib.nullcontext()
        return self.student.no_sync()


def _teacher_side(
    stepper: Stepper, batch: Batch, tcfg: TrainingConfig
) -> tuple[Optional[torch.Tensor], Optional[tuple]]:
    """这一微批的教师一侧：(教师隐藏状态, 稀疏目标)。教师缓存 → 只有目标；top_k > 0 → 在线取 top-k；
    否则 → 隐藏状态（分块损失逐块乘输出投影）。α = 0 时两者都是 None。tcfg 是这一批来源的损失设置。"""
    if tcfg.on_policy_estimator == "sampled":  # 只有学生写的批带着它（on_policy.source_settings）
        return None, _sampled_targets(stepper, batch, tcfg)
    if stepper.teacher_cache is not None:  # 教师缓存或服务端教师：只有稀疏目标
        return None, stepper.teacher_cache.batch_targets(batch, stepper.info.device, document_segments(batch, tcfg))
    if stepper.teacher is None or tcfg.alpha == 0.0:
        return None, None
    with no_checks_if_sharded(stepper.teacher):
        t_hidden = teacher_hidden_states(
            stepper.teacher, batch.input_ids, stepper.teacher_fwd, document_segments(batch, tcfg)
        )
        if tcfg.top_k > 0:
            return None, live_topk_targets(stepper.teacher, t_hidden, stepper.tcfg, stepper.real_vocab_size)
    return t_hidden, None


def _sampled_targets(stepper: Stepper, batch: Batch, tcfg: TrainingConfig) -> SampledLogProbs:
    """教师给采样 token 的 log P：服务端教师直接返回实际 token 的 log P；本地教师由隐藏状态逐块算出。"""
    segments = document_segments(batch, tcfg)
    if stepper.teacher_cache is not None:
        return SampledLogProbs(stepper.teacher_cache.label_log_probs(batch, stepper.info.device, segments))
    with no_checks_if_sharded(stepper.teacher):
        hidden = teacher_hidden_states(stepper.teacher, batch.input_ids, stepper.teacher_fwd, segments)
        weight = output_weight(stepper.teacher.params, stepper.teacher.cfg)
        with torch.no_grad():
            return SampledLogProbs(label_log_probs(hidden, weight, batch.labels, real_vocab_size=stepper.real_vocab_size,
                                                   chunk_size=tcfg.loss_chunk_size))


def _micro_step(
    stepper: Stepper, batch: Batch, num_tokens: int, last: bool, tcfg: Optional[TrainingConfig] = None
) -> torch.Tensor:
    """一个微批：教师隐藏状态 → 学生的分块损失（经过参数壳的 forward）→ 反向。

    tcfg：这一批来源的损失设置（缺省为训练配置本身；生成批见 on_policy.source_settings）。
    返回本进程的 (损失, KD, CE) 三项（留在设备上，整步结束时才取回主机一次，不逐微批同步）。"""
    tcfg = tcfg or stepper.tcfg
    batch = batch.to(stepper.info.device, non_blocking=True)
    teacher = stepper.teacher if tcfg.alpha > 0.0 else None
    with stepper.no_sync(last), teacher_scope(stepper.teacher):
        t_hidden, targets = _teacher_side(stepper, batch, tcfg)
        loss, parts = stepper.student(
            distill_loss, stepper.cfg, batch, teacher, t_hidden, tcfg,
            real_vocab_size=stepper.real_vocab_size, num_tokens=num_tokens, forward_fn=stepper.student_fwd,
            sparse_targets=targets,
        )
        # DDP 对各进程的梯度求平均；本进程的损失先乘进程数，平均后正是 Σ_全局 ℓ / N_全局 的梯度。
        (loss * stepper.info.world_size).backward()
    return torch.stack([loss.detach(), parts["kd"].to(loss.device), parts["ce"].to(loss.device)]).float()


def optimizer_step(stepper: Stepper, micro: list[Batch], lr: float, source: str = "data") -> StepStats:
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
    tcfg = stepper.source_settings.get(source, stepper.tcfg)
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


def teacher_dtype(tcfg: TrainingConfig, device: torch.device) -> Optional[torch.dtype]:
    """教师的权重 dtype：teacher_bf16 为真（或 auto 且在 CUDA 上）时 bfloat16，否则 None（保持加载时的 dtype）。"""
    bf16 = tcfg.teacher_bf16 if tcfg.teacher_bf16 is not None else device.type == "cuda"
    return torch.bfloat16 if bf16 else None


def teacher_for_training(teacher: Optional[Model], tcfg: TrainingConfig, info: Dist) -> Optional[Model]:
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


def build_stepper(
    student: Model, teacher: Optional[Model], tcfg: TrainingConfig, real_vocab_size: int, info: Dist, cache: Optional[TeacherCache] = None,
    rollouts: Optional[Rollouts] = None,
) -> Stepper:
    """学生参数放进参数壳（多进程时包成 DDP）、优化器（CUDA 上 fused）、教师与前向函数。
    有教师缓存时训练目标来自缓存，不跑教师（教师若给了只用于验证）。rollouts：在线蒸馏的生成器（可无）。"""
    # 拷贝一份（放到设备上）：训练原地更新壳里的参数，调用方给的张量保持不变。
    shell = ParamShell({k: v.detach().to(info.device, copy=True) for k, v in student.params.items()})
    params = shell.params()
    optimizer = build_optimizer(params, tcfg, fused=info.device.type == "cuda")
    compiled = torch.compile(forward_hidden) if tcfg.compile else forward_hidden
    return Stepper(
        wrap_student(shell, info), params, {id(p): k for k, p in params.items()}, student.cfg, optimizer,
        teacher if (tcfg.alpha > 0.0 or tcfg.generates) and cache is None else None, tcfg, real_vocab_size, info,
        student_fwd=compiled, teacher_fwd=forward_hidden if is_sharded(teacher) else compiled,  # 切分的教师不编译
        teacher_cache=cache, rollouts=rollouts, source_settings=source_settings(tcfg),
    )

