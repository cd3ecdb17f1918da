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
import json
import math
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from functional_lm.checkpoint import (
    checkpoint_name,
    finite_or_none,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    optimizer_from_tensors,
    restore_rng,
    save_checkpoint,
)
from functional_lm.config import ModelConfig, TrainingConfig
from functional_lm.losses import chunked_distillation_loss, distillation_loss
from functional_lm.model import check_params, forward_hidden, output_weight, unique_tensors
from functional_lm.report import read_metrics_file
from functional_lm.rundir import Interrupted, RunDirError, write_failure, writing

__all__ = [
    "Model",
    "TrainResult",
    "NonFiniteLossError",
    "Interrupted",
    "no_weight_decay",
    "build_optimizer",
    "learning_rate",
    "count_valid_tokens",
    "distill_loss",
    "teacher_hidden_states",
    "evaluate",
    "StepStats",
    "optimizer_step",
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


class NonFiniteLossError(RuntimeError):
    """损失或梯度出现 NaN / inf：训练停止，消息中给出步数与最后一个好的检查点。"""


# ---------------------------------------------------------------- 优化器与学习率
def no_weight_decay(name: str) -> bool:
    """范数权重与偏置不做权重衰减（它们不是“容量”参数，衰减只会把它们拉向 0）。"""
    return name.endswith(".bias") or name.endswith("norm.weight")


def build_optimizer(params: Mapping[str, torch.Tensor], tcfg: TrainingConfig) -> torch.optim.AdamW:
    """AdamW，分两组：矩阵与嵌入衰减 weight_decay，范数与偏置不衰减。"""
    decay = [p for name, p in params.items() if not no_weight_decay(name)]
    keep = [p for name, p in params.items() if no_weight_decay(name)]
    groups = [
        {"params": decay, "weight_decay": tcfg.weight_decay},
        {"params": keep, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=tcfg.learning_rate, betas=(0.9, 0.95), eps=1e-8)


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
def teacher_hidden_states(teacher: Model, input_ids: torch.Tensor, forward_fn: Callable = forward_hidden) -> torch.Tensor:
    """教师最终隐藏状态（不求梯度）；输出投影留给分块损失逐块去乘。"""
    with torch.no_grad():
        return forward_fn(teacher.params, input_ids, teacher.cfg)


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
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """规格书的目标：α·T²·D(教师 ‖ 学生, T) + (1−α)·CE(学生, 标签)，按有效 token 平均。

    分块计算：学生 logits 与教师 logits 都只按 loss_chunk_size 个 token 一块临时生成。
    teacher 为 None 时只训练交叉熵（要求 α = 0）：用于预训练演示教师与“只用 CE”的对照学生。
    """
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=tcfg.bf16):
        hidden = forward_fn(params, batch.input_ids, cfg, training=True)
    if tcfg.bf16:
        hidden = hidden.float()  # 损失（softmax over vocab）始终在 float32 中计算
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
@torch.no_grad()
def evaluate(
    student: Model,
    teacher: Optional[Model],
    loader: Any,
    tcfg: TrainingConfig,
    *,
    real_vocab_size: int,
    max_batches: Optional[int] = None,
) -> dict[str, float]:
    """验证：损失各部分、学生与教师困惑度、KL(教师 ‖ 学生)（T = 1）、top-1 与教师一致率。

    逐条序列计算完整 logits（一次只有 t × vocab 的张量），按有效 token 汇总。
    不改变 loader 的训练状态：验证加载器是独立的、不打乱的。teacher 为 None 时只报告学生的交叉熵与困惑度。
    """
    totals = {"loss": 0.0, "kd": 0.0, "ce": 0.0, "teacher_ce": 0.0, "kl_t1": 0.0, "agree": 0.0}
    tokens = 0
    limit = max_batches if max_batches is not None else len(loader)
    for index in range(min(limit, len(loader))):
        batch = loader.batch_at(0, index)  # 固定的验证批，不推进任何状态
        for row in range(batch.input_ids.shape[0]):
            one = type(batch)(*(x[row : row + 1] for x in batch))
            n = count_valid_tokens(one)
            if n == 0:
                continue
            s_logits = forward_hidden(student.params, one.input_ids, student.cfg) @ output_weight(student.params, student.cfg).T
            if teacher is None:
                t_logits = s_logits  # 没有教师：KD 相关的量恒为 0，最后不报告
            else:
                t_logits = forward_hidden(teacher.params, one.input_ids, teacher.cfg).float() @ output_weight(
                    teacher.params, teacher.cfg
                ).float().T
            common = dict(real_vocab_size=real_vocab_size, loss_mask=one.loss_mask, return_parts=True)
            loss, parts = distillation_loss(
                s_logits, t_logits, one.labels, alpha=tcfg.alpha, temperature=tcfg.temperature,
                divergence=tcfg.divergence, **common,
            )
            _, kl1 = distillation_loss(s_logits, t_logits, one.labels, alpha=1.0, temperature=1.0, **common)
            _, tparts = distillation_loss(t_logits, t_logits, one.labels, alpha=0.0, temperature=1.0, **common)
            valid = (one.labels != -100) & one.loss_mask
            agree = (s_logits[..., :real_vocab_size].argmax(-1) == t_logits[..., :real_vocab_size].argmax(-1))
            totals["loss"] += float(loss) * n
            totals["kd"] += float(parts["kd"]) * n
            totals["ce"] += float(parts["ce"]) * n
            totals["teacher_ce"] += float(tparts["ce"]) * n
            totals["kl_t1"] += float(kl1["kd"]) * n
            totals["agree"] += float(agree[valid].sum())
            tokens += n
    if tokens == 0:
        return {}
    mean = {k: v / tokens for k, v in totals.items()}
    scores = {"val_ce": mean["ce"], "student_ppl": math.exp(min(mean["ce"], 50.0)), "val_tokens": float(tokens)}
    if teacher is not None:
        scores |= {
            "val_loss": mean["loss"],
            "val_kd": mean["kd"],
            "teacher_ce": mean["teacher_ce"],
            "teacher_ppl": math.exp(min(mean["teacher_ce"], 50.0)),
            "kl_teacher_student": mean["kl_t1"],
            "top1_agreement": mean["agree"],
        }
    return scores

# ---------------------------------------------------------------- 信号
class _StopFlag:
    """SIGINT / SIGTERM 只置位；训练循环在一步结束时检查它，保存后退出。

    第二次 Ctrl-C 立即中断（KeyboardInterrupt）——但保存进行中时不打断它：记下来，保存完成后再中断，
    这样磁盘上永远只有完整的检查点。
    """

    def __init__(self) -> None:
        self.requested: Optional[str] = None
        self.saving = False
        self.abort_after_save = False

    def __call__(self, signum: int, _frame: Any) -> None:
        if self.requested is not None and signum == signal.SIGINT:
            if self.saving:
                self.abort_after_save = True
                return
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name

    @contextlib.contextmanager
    def protect(self) -> Iterator[None]:
        """保存期间推迟第二次 Ctrl-C 的中断。"""
        self.saving = True
        try:
            yield
        finally:
            self.saving = False
        if self.abort_after_save:
            raise KeyboardInterrupt


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[_StopFlag]:
    flag = _StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag  # 只有主线程能装信号处理器
        return
    previous = {sig: signal.signal(sig, flag) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# ---------------------------------------------------------------- 日志
class _Metrics:
    """metrics.jsonl：每行一个 JSON 对象（训练记录与验证记录用 "kind" 区分），追加写入并立即落盘。"""

    def __init__(self, path: Path, last_good: Callable[[], Optional[Path]]) -> None:
        self.path = path
        self.last_good = last_good  # 写失败时报告最后一个完好的检查点

    def truncate_after(self, step: int) -> None:
        """恢复训练时丢掉检查点之后（崩溃前已写出、恢复后会重算）的记录，避免同一步出现两次。

        崩溃（例如磁盘满）时写了一半的最后一行也在这里丢掉，并给出点名文件的警告。
        """
        if not self.path.is_file():
            return
        records, torn = read_metrics_file(self.path)
        if torn:
            print(f"warning: {self.path}: dropped a cut-off last line (a crash while writing it)", file=sys.stderr)
        keep = [json.dumps(r) for r in records if r.get("step", 0) <= step]
        with writing("the training metrics", self.path, self.last_good()):
            self.path.write_text("".join(line + "\n" for line in keep), encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        clean = {k: (finite_or_none(v) if isinstance(v, float) else v) for k, v in record.items()}
        with writing("the training metrics", self.path, self.last_good()), open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(clean) + "\n")


class _Window:
    """两次记录之间的滑动统计：逐步累加损失各部分与 token 数，记录时取平均并清零。"""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.loss = self.kd = self.ce = 0.0
        self.tokens = self.steps = 0
        self.start = time.perf_counter()

    def add(self, stats: "StepStats") -> None:
        self.loss, self.kd, self.ce = self.loss + stats.loss, self.kd + stats.kd, self.ce + stats.ce
        self.tokens += stats.tokens
        self.steps += 1

    def record(self, step: int, stats: "StepStats") -> dict[str, Any]:
        """训练记录：窗口内的平均损失、最后一步的学习率与梯度范数、吞吐。"""
        elapsed = time.perf_counter() - self.start
        n = max(self.steps, 1)
        logged = {
            "kind": "train", "step": step, "loss": self.loss / n, "kd": self.kd / n, "ce": self.ce / n,
            "lr": stats.lr, "grad_norm": stats.grad_norm, "tokens_per_s": self.tokens / max(elapsed, 1e-9),
        }
        self.reset()
        return logged


def _progress(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc="distill", unit="step", dynamic_ncols=True)


def _say(message: str) -> None:
    """训练器对用户说的话（恢复位置、改动的设置）：写到 stderr。"""
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- 一个优化步
def _leaf_params(params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """拷贝成独立的 float 叶子张量（requires_grad），共享嵌入保持为同一个张量。"""
    out: dict[str, torch.Tensor] = {}
    seen: dict[int, torch.Tensor] = {}
    for key, value in params.items():
        if id(value) not in seen:
            seen[id(value)] = value.detach().clone().requires_grad_(True)
        out[key] = seen[id(value)]
    return out


def total_training_steps(tcfg: TrainingConfig, batches_per_epoch: int) -> int:
    """计划的优化步数：max_steps（若给出）或 num_epochs 轮数据所能构成的步数。"""
    if tcfg.max_steps > 0:
        return tcfg.max_steps
    return max(1, tcfg.num_epochs * batches_per_epoch // tcfg.gradient_accumulation_steps)


@dataclass
class StepStats:
    """一个优化步的结果（各部分是本步全部微批之和，即全局有效 token 上的平均）。"""

    loss: float
    kd: float
    ce: float
    grad_norm: float
    lr: float
    tokens: int  # 本步读入的 token 数（含不计损失的），用于吞吐


@dataclass
class _Stepper:
    """一个优化步所需的全部东西：学生叶子参数、优化器、（可选的）教师与两边的前向函数。"""

    params: dict[str, torch.Tensor]
    cfg: ModelConfig
    optimizer: torch.optim.Optimizer
    teacher: Optional[Model]  # α = 0 时为 None：训练不跑教师
    tcfg: TrainingConfig
    real_vocab_size: int
    student_fwd: Callable = forward_hidden
    teacher_fwd: Callable = forward_hidden


def optimizer_step(stepper: _Stepper, micro: list[Any], lr: float) -> StepStats:
    """微批 → 梯度（按全局有效 token 数归一化后逐微批累加）→ 全局范数裁剪 → AdamW 一步。

    损失或梯度范数非有限时不更新参数，抛 NonFiniteLossError（由调用方补上最后一个好的检查点）。
    """
    for group in stepper.optimizer.param_groups:
        group["lr"] = lr
    num_tokens = max(sum(count_valid_tokens(b) for b in micro), 1)
    loss_sum = kd_sum = ce_sum = 0.0
    for batch in micro:
        t_hidden = None
        if stepper.teacher is not None:
            t_hidden = teacher_hidden_states(stepper.teacher, batch.input_ids, stepper.teacher_fwd)
        loss, parts = distill_loss(
            stepper.params, stepper.cfg, batch, stepper.teacher, t_hidden, stepper.tcfg,
            real_vocab_size=stepper.real_vocab_size, num_tokens=num_tokens, forward_fn=stepper.student_fwd,
        )
        loss.backward()
        loss_sum += float(loss.detach())
        kd_sum += float(parts["kd"])
        ce_sum += float(parts["ce"])
    grad_norm = float(torch.nn.utils.clip_grad_norm_(unique_tensors(stepper.params), stepper.tcfg.gradient_clip))
    if not (math.isfinite(loss_sum) and math.isfinite(grad_norm)):
        stepper.optimizer.zero_grad(set_to_none=True)
        raise NonFiniteLossError(f"non-finite loss {loss_sum} (grad norm {grad_norm})")
    stepper.optimizer.step()
    stepper.optimizer.zero_grad(set_to_none=True)
    tokens = sum(b.input_ids.numel() for b in micro)
    return StepStats(loss_sum, kd_sum, ce_sum, grad_norm, lr, tokens)


# ---------------------------------------------------------------- 训练主循环
def _check_models(student: Model, teacher: Optional[Model], tcfg: TrainingConfig, real_vocab_size: Optional[int]) -> int:
    """训练前的一次性核对；返回真实词表大小。"""
    if teacher is None and tcfg.alpha != 0.0:
        raise ValueError(f"training without a teacher needs alpha=0 (pure cross-entropy), got alpha={tcfg.alpha}")
    vocab_rows = [student.cfg.vocab_size] + ([teacher.cfg.vocab_size] if teacher is not None else [])
    real_vocab_size = real_vocab_size or min(vocab_rows)
    if real_vocab_size > min(vocab_rows):
        raise ValueError(f"real_vocab_size={real_vocab_size} exceeds the embedding rows {vocab_rows}")
    check_params(student.params, student.cfg)
    if teacher is not None:
        check_params(teacher.params, teacher.cfg)
    return real_vocab_size


def _refuse_foreign_run(run_dir: Path, ckpt_root: Path) -> None:
    """resume=False 却指向已有检查点或指标的目录：拒绝，免得新旧两次运行混在一起。"""
    found = [p.name for p in list_checkpoints(ckpt_root)]
    if found or (run_dir / "metrics.jsonl").is_file():
        what = f"checkpoints {found[-1]}…" if found else "metrics.jsonl"
        raise RunDirError(
            f"{run_dir} already holds a training run ({what}); resume it (resume=True, or --resume on the command "
            f"line) or train into a new directory (--overwrite clears it first)"
        )


def _teacher_for_training(teacher: Optional[Model], tcfg: TrainingConfig) -> Optional[Model]:
    """按配置准备教师：可选 bfloat16 权重（只转换一次）。"""
    if teacher is not None and tcfg.teacher_bf16:
        return Model({k: v.to(torch.bfloat16) for k, v in teacher.params.items()}, teacher.cfg)
    return teacher


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
    """
    run_dir = Path(run_dir)
    ckpt_root = run_dir / tcfg.checkpoint_dir  # 绝对路径时就用它本身
    real_vocab_size = _check_models(student, teacher, tcfg, real_vocab_size)
    if not resume:
        _refuse_foreign_run(run_dir, ckpt_root)
    run_dir.mkdir(parents=True, exist_ok=True)
    loader = data.train_loader
    total = total_training_steps(tcfg, len(loader))
    params = _leaf_params(student.params)
    names = {id(p): k for k, p in params.items()}
    teacher_model = _teacher_for_training(teacher, tcfg)
    stepper = _Stepper(
        params, student.cfg, build_optimizer(params, tcfg), teacher_model if tcfg.alpha > 0.0 else None, tcfg,
        real_vocab_size,
        student_fwd=torch.compile(forward_hidden) if tcfg.compile else forward_hidden,
        teacher_fwd=torch.compile(forward_hidden) if tcfg.compile else forward_hidden,
    )
    torch.manual_seed(tcfg.seed)
    result = TrainResult(step=0, total_steps=total, interrupted=False, last_checkpoint=None)
    if resume and (found := latest_checkpoint(ckpt_root)) is not None:
        result.step, result.last_checkpoint = _restore(found, params, stepper.optimizer, names, loader, student.cfg)
        _say(f"resumed from step {result.step} of {total} ({found})")
    metrics = _Metrics(run_dir / "metrics.jsonl", lambda: result.last_checkpoint)
    if resume:
        metrics.truncate_after(result.step)
    saver = _Saver(ckpt_root, stepper, names, loader, student.cfg, tcfg, total, real_vocab_size, tokenizer_dir, result)

    def run_eval(at_step: int, bar: Any) -> dict[str, float]:
        if data.val_loader is None:
            return {}
        bar.set_description("distill (evaluating)")
        scores = evaluate(
            Model(params, student.cfg), teacher_model, data.val_loader, tcfg,
            real_vocab_size=real_vocab_size, max_batches=tcfg.eval_batches,
        )
        bar.set_description("distill")
        metrics.write({"kind": "eval", "step": at_step, **scores})
        return scores

    bar = _progress(total, result.step, progress)
    try:
        with _stop_on_signals() as stop:
            _loop(stepper, loader, total, result, metrics, saver, run_eval, bar, stop, on_step_end)
            if not result.interrupted:
                result.final_eval = run_eval(result.step, bar)
                saver.save(result.step, stop)
    finally:
        bar.close()
        result.params = {k: v.detach() for k, v in params.items()}
    return result


def _loop(stepper, loader, total, result, metrics, saver, run_eval, bar, stop, on_step_end) -> None:
    """训练循环本身：取微批 → 一个优化步 → 记录 / 验证 / 保存 → 响应信号。"""
    tcfg = stepper.tcfg
    window = _Window()
    while result.step < total:
        lr = learning_rate(result.step, tcfg, total)
        micro = [loader.next_batch() for _ in range(tcfg.gradient_accumulation_steps)]
        try:
            stats = optimizer_step(stepper, micro, lr)
        except NonFiniteLossError as err:
            where = result.last_checkpoint or "none (no checkpoint was written yet)"
            raise NonFiniteLossError(
                f"{err} at step {result.step + 1}; training stopped, nothing was saved for this step; "
                f"last good checkpoint: {where}"
            ) from None
        step = result.step = result.step + 1
        bar.update(1)
        window.add(stats)
        if step % tcfg.log_interval == 0 or step == total:
            logged = window.record(step, stats)
            metrics.write(logged)
            result.history.append(logged)
            bar.set_postfix(
                loss=f"{logged['loss']:.4f}", kd=f"{logged['kd']:.4f}", ce=f"{logged['ce']:.4f}",
                lr=f"{lr:.2e}", tok_s=f"{logged['tokens_per_s']:.0f}",
            )
        if step % tcfg.eval_interval == 0 and step != total:
            run_eval(step, bar)
        if step % tcfg.save_interval == 0 and step != total:
            saver.save(step, stop)
        if on_step_end is not None:
            on_step_end(step, {"loss": stats.loss, "kd": stats.kd, "ce": stats.ce, "lr": lr, "grad_norm": stats.grad_norm})
        if stop.requested is not None:
            saver.save(step, stop)
            result.interrupted = True
            bar.write(f"{stop.requested} received: saved {result.last_checkpoint} at step {step}; resume with --resume")
            return


class _Saver:
    """原子保存检查点；同一步不重复保存（例如信号恰好落在保存步上），写盘失败说成一段话。"""

    def __init__(self, root, stepper, names, loader, cfg, tcfg, total, real_vocab_size, tokenizer_dir, result) -> None:
        self.root, self.stepper, self.names, self.loader = root, stepper, names, loader
        self.cfg, self.tcfg, self.total, self.real_vocab_size = cfg, tcfg, total, real_vocab_size
        self.tokenizer_dir, self.result = tokenizer_dir, result

    def save(self, step: int, stop: _StopFlag) -> Path:
        last = self.result.last_checkpoint
        if last is not None and last.name == checkpoint_name(step):
            return last  # 这一步已经存过了
        state = {
            "loader": self.loader.state_dict(),
            "training_config": self.tcfg.to_dict(),
            "total_steps": self.total,
            "real_vocab_size": self.real_vocab_size,
        }
        try:
            with stop.protect():
                path = save_checkpoint(
                    self.root, step, self.stepper.params, self.cfg, self.stepper.optimizer, self.names, state,
                    keep_last=self.tcfg.keep_last, tokenizer_dir=self.tokenizer_dir,
                )
        except OSError as err:
            raise write_failure(err, f"the checkpoint of step {step}", self.root, last) from err
        self.result.last_checkpoint = path
        return path


def _restore(
    path: Path,
    params: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    names: Mapping[int, str],
    loader: Any,
    cfg: ModelConfig,
) -> tuple[int, Path]:
    """把检查点装回：参数原地拷贝、优化器状态、数据位置、RNG。返回 (步数, 检查点路径)。"""
    saved_cfg, saved, tensors, state = load_checkpoint(path)
    if saved_cfg != cfg:
        changed = ", ".join(
            f"{k} {v} → {getattr(cfg, k)}" for k, v in saved_cfg.to_dict().items() if getattr(cfg, k) != v
        )
        raise ValueError(f"cannot resume from {path}: the student's model config changed ({changed})")
    with torch.no_grad():
        for key, value in params.items():
            value.copy_(saved[key])
    optimizer_from_tensors(optimizer, tensors, state["optimizer_param_groups"], names)
    loader.load_state_dict(state["loader"])
    restore_rng(tensors)
    return int(state["step"]), path
