"""蒸馏训练器：冻结的教师（Qwen2.5 / DeepSeek-R1-Distill-Qwen）→ 学生。``train()`` 读起来就是它的配方：

    1. 核对（preflight）：参数、词表、教师缓存、在线蒸馏设置；不从头开始时拒绝写进别人的运行目录。
    2. 布局：本进程的训练加载器（全局批 = batch_size × 进程数 × 累积步数）与计划的总步数。
    3. 教师放到设备上（可选 bfloat16、FSDP2 按层切分），学生放进参数壳（多进程时 DDP）与 AdamW（step）。
    4. 起点：播种；恢复时从最新检查点逐位一致地装回（saver）。
    5. 循环：取微批（数据批，或学生 / 教师写的生成批，见 on_policy）→ 一个优化步（step）→
       每 log_interval 步记录、每 eval_interval 步验证（evaluate）、每 save_interval 步原子保存（saver）。
    6. 结束：最后一次验证与保存；SIGINT / SIGTERM 时当前步结束后保存并干净退出。

损失与教师目标在 ``kd.objective``，一个优化步在 ``kd.step``，验证在 ``kd.evaluate``，保存与恢复在 ``kd.saver``。
循环、保存器与验证器共享的状态是一个 ``Run``。非有限的损失或梯度范数立即停止训练，报告步数与最后一个好的
检查点；绝不写出含 NaN 的检查点。
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch

from functional_lm.allocator import tune_malloc
from functional_lm.config import TrainingConfig
from functional_lm.distributed import Dist, all_reduce_sum, on_main, peer_loss_explained, setup
from functional_lm.errors import NonFiniteLossError, TeacherUnavailable
from functional_lm.kd.evaluate import Evaluator
from functional_lm.kd.objective import Model, document_segments
from functional_lm.kd.on_policy import batch_source, rollouts_for
from functional_lm.kd.preflight import check_models, refuse_foreign_run
from functional_lm.kd.saver import Saver, restore
from functional_lm.kd.step import (
    StepStats,
    Stepper,
    build_stepper,
    learning_rate,
    optimizer_step,
    teacher_for_training,
    total_training_steps,
)
from functional_lm.runs.monitor import Metrics, NullMetrics, Progress, StopFlag, Window, progress_bar, say, stop_on_signals
from functional_lm.runs.checkpoint import latest_checkpoint

if TYPE_CHECKING:
    from functional_lm.data.loader import Batch, BatchLoader
    from functional_lm.data.pipeline import DataBundle
    from functional_lm.kd.teacher_cache import TeacherCache

__all__ = ["TrainResult", "Run", "train"]


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


@dataclass
class Run:
    """一次 train() 的状态：训练循环、保存器（Saver）与验证器（Evaluator）共享的就是这一个对象。"""

    stepper: Stepper  # 学生参数壳、优化器、教师与损失设置（kd.step）
    loader: BatchLoader  # 本进程的训练加载器（已按全局批布局切分）
    total: int  # 计划的总步数
    result: TrainResult  # 进行中的结果：步数、最后一个检查点、记录
    ckpt_root: Path  # 检查点目录
    tokenizer_dir: Optional[Path]  # 复制进每个检查点的分词器目录
    metrics: Metrics | NullMetrics = field(default_factory=NullMetrics)  # 秩 0 写 metrics.jsonl，其余什么都不写
    bar: Optional[Progress] = None  # 进度条（或 --no-progress 时每条记录一行）


def train(
    student: Model,
    teacher: Optional[Model],
    data: DataBundle,
    tcfg: TrainingConfig,
    run_dir: str | Path,
    *,
    resume: bool = False,
    real_vocab_size: Optional[int] = None,
    tokenizer_dir: Optional[str | Path] = None,
    progress: bool = True,
    on_step_end: Optional[Callable[[int, dict[str, float]], None]] = None,
    info: Optional[Dist] = None,
    teacher_cache: Optional[TeacherCache] = None,
    val_teacher_cache: Optional[TeacherCache] = None,
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
    real_vocab_size = check_models(student, teacher, tcfg, real_vocab_size, teacher_cache, data, info)
    if not resume:
        on_main(lambda: refuse_foreign_run(run_dir, ckpt_root), info)
    loader, total = _training_loader(data, tcfg, info)
    _announce(run_dir, info, loader, tcfg, teacher)
    teacher = teacher_for_training(teacher, tcfg, info)
    stepper = build_stepper(student, teacher, tcfg, real_vocab_size, info, teacher_cache,
                            rollouts_for(data, "train", tcfg, real_vocab_size))
    run = Run(stepper, loader, total, _start(stepper, loader, total, ckpt_root if resume else None), ckpt_root,
              None if tokenizer_dir is None else Path(tokenizer_dir))
    run.metrics = _open_metrics(run_dir, info, run.result, resume)
    saver, evaluator = Saver(run), Evaluator(run, teacher, data, val_teacher_cache)
    run.bar = _progress(total, run.result.step, progress, info)
    _run_to_the_end(run, saver, evaluator, on_step_end)
    return run.result


def _run_to_the_end(
    run: Run, saver: Saver, evaluator: Evaluator, on_step_end: Optional[Callable[[int, dict[str, float]], None]]
) -> None:
    """循环到最后一步（或收到信号）；没被打断时最后验证一次并保存。无论怎样结束，结果里都放上学生参数。"""
    try:
        with stop_on_signals() as stop, peer_loss_explained(run.stepper.info, lambda: run.result.last_checkpoint):
            _loop(run, saver, evaluator, stop, on_step_end)
            if not run.result.interrupted:
                run.result.final_eval = evaluator(run.result.step)
                saver.save(run.result.step, stop)
    finally:
        run.bar.close()
        run.result.params = {k: v.detach() for k, v in run.stepper.params.items()}


def _loop(
    run: Run, saver: Saver, evaluator: Evaluator, stop: StopFlag,
    on_step_end: Optional[Callable[[int, dict[str, float]], None]] = None,
) -> None:
    """训练循环本身：取微批 → 一个优化步 → 记录 / 验证 / 保存 → 响应信号。"""
    stepper, result, bar, tcfg = run.stepper, run.result, run.bar, run.stepper.tcfg
    window = Window()
    while result.step < run.total:
        lr = learning_rate(result.step, tcfg, run.total)
        stats = _step_or_save(run, saver, stop, lr)
        step = result.step = result.step + 1
        bar.step()
        window.add(stats)
        if step % tcfg.log_interval == 0 or step == run.total:
            _log(run, window.record(step, stats))
        with window.paused():  # 验证与保存的时间不算进下一条记录的吞吐
            if step % tcfg.eval_interval == 0 and step != run.total:
                evaluator(step)
            if step % tcfg.save_interval == 0 and step != run.total:
                saver.save(step, stop)
        if on_step_end is not None:
            on_step_end(step, {"loss": stats.loss, "kd": stats.kd, "ce": stats.ce, "lr": lr, "grad_norm": stats.grad_norm})
        if _stop_agreed(stop, stepper.info):
            _stop_here(run, saver, stop, step)
            return


def _step_or_save(run: Run, saver: Saver, stop: StopFlag, lr: float) -> StepStats:
    """一个优化步；教师（服务器）中途不再应答时，数据位置退回这一步之前、丢掉半步的梯度，存下检查点再报错：
    续训（--resume）从这一步重新开始，与没有中断的运行逐位相同。"""
    before = run.loader.state_dict()
    try:
        return _one_step(run, lr)
    except TeacherUnavailable as err:
        run.stepper.optimizer.zero_grad(set_to_none=True)
        run.loader.load_state_dict(before)
        step = run.result.step
        saved = saver.save(step, stop) if step > 0 else None
        where = f"progress up to step {step} is saved in {saved}" if saved else "no step had finished yet"
        raise TeacherUnavailable(f"{err}. Training stopped before step {step + 1}; {where}; continue with --resume "
                                 f"once the teacher answers again") from None


def _one_step(run: Run, lr: float) -> StepStats:
    """第 result.step 步：取这一步的微批与来源，做一个优化步；非有限时补上步数与最后一个好的检查点。"""
    micro, source = _step_batches(run.stepper, run.loader, run.result.step)
    try:
        return optimizer_step(run.stepper, micro, lr, source)
    except NonFiniteLossError as err:
        where = run.result.last_checkpoint or "none (no checkpoint was written yet)"
        raise NonFiniteLossError(
            f"{err} at step {run.result.step + 1}; training stopped, nothing was saved for this step; "
            f"last good checkpoint: {where}"
        ) from None


def _log(run: Run, logged: dict[str, Any]) -> None:
    """一条训练记录：写进 metrics.jsonl、结果的历史与进度显示。目标来源报告吞吐时（服务端教师）一并记下。"""
    if hasattr(run.stepper.teacher_cache, "window_stats"):  # 每个进程都调用（跨分词器的比例在进程间相加）
        logged.update(run.stepper.teacher_cache.window_stats(run.stepper.info))
    run.metrics.write(logged)
    run.result.history.append(logged)
    run.bar.logged(logged)


def _stop_here(run: Run, saver: Saver, stop: StopFlag, step: int) -> None:
    """收到 SIGINT / SIGTERM：保存这一步，标记为被打断，秩 0 说明在哪里继续。"""
    saver.save(step, stop)
    run.result.interrupted = True
    if run.stepper.info.is_main:
        run.bar.write(f"{stop.requested or 'stop'} received: saved {run.result.last_checkpoint} at step {step}; "
                      f"resume with --resume")


def _start(stepper: Stepper, loader: BatchLoader, total: int, ckpt_root: Optional[Path]) -> TrainResult:
    """播种；给了检查点目录（恢复）且其中有检查点时从最新的一个装回。返回起点的 TrainResult。

    恢复哪一个检查点由秩 0 决定并广播：各进程绝不会装回不同的步。"""
    info = stepper.info
    torch.manual_seed(stepper.tcfg.seed + info.rank)
    result = TrainResult(step=0, total_steps=total, interrupted=False, last_checkpoint=None)
    found = on_main(lambda: latest_checkpoint(ckpt_root), info) if ckpt_root is not None else None
    if found is not None:
        result.step, result.last_checkpoint = restore(found, stepper, loader)
        if info.is_main:
            say(f"resumed from step {result.step} of {total} ({found})")
    return result


def _progress(total: int, step: int, progress: bool, info: Dist) -> Progress:
    """秩 0：有进度条时画进度条，没有时（--no-progress）每条记录打印一行；其余进程什么都不显示。"""
    return Progress(progress_bar(total, step, progress and info.is_main), total, not progress and info.is_main)


def _announce(run_dir: Path, info: Dist, loader: BatchLoader, tcfg: TrainingConfig, teacher: Optional[Model]) -> None:
    """秩 0：建运行目录，打印一行进程与全局批的布局。"""
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        say(_layout_line(info, loader, tcfg, teacher))


def _open_metrics(run_dir: Path, info: Dist, result: TrainResult, resume: bool) -> Metrics | NullMetrics:
    """秩 0 写 metrics.jsonl（恢复时先截掉最后一个检查点之后的记录），其他进程什么都不写。"""
    if not info.is_main:
        return NullMetrics()
    metrics = Metrics(run_dir / "metrics.jsonl", lambda: result.last_checkpoint)
    if resume:
        metrics.truncate_after(result.step)
    return metrics


def _training_loader(data: DataBundle, tcfg: TrainingConfig, info: Dist) -> tuple[BatchLoader, int]:
    """本进程的训练加载器（按全局批布局切分）与计划的总步数。"""
    loader = data.train_loader.relayout(
        rank=info.rank, world_size=info.world_size, accumulation=tcfg.gradient_accumulation_steps,
        pin_memory=info.device.type == "cuda", document_mask=tcfg.document_mask,
    )
    return loader, total_training_steps(tcfg, len(loader))


def _layout_line(info: Dist, loader: BatchLoader, tcfg: TrainingConfig, teacher: Optional[Model]) -> str:
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


def _stop_agreed(stop: StopFlag, info: Dist) -> bool:
    """任何一个进程收到 SIGINT / SIGTERM，所有进程在同一步一起停下（一次 all-reduce）。"""
    flag = 1.0 if stop.requested is not None else 0.0
    return all_reduce_sum([flag], info)[0] > 0 if info.enabled else flag > 0


def _prefetch(stepper: Stepper, loader: BatchLoader, now: list[Batch], next_step: int) -> None:
    """目标来源能提前取（服务端教师）时：这一步的各个数据微批一起发出，下一步若是数据步也先发出，
    于是服务器在学生算这一步时已经在算下一步的目标。"""
    source = stepper.teacher_cache
    if not hasattr(source, "prefetch"):
        return
    tcfg = stepper.source_settings.get("data", stepper.tcfg)
    ahead = loader.upcoming(len(now) or tcfg.gradient_accumulation_steps) if batch_source(tcfg, next_step) == "data" else []
    for batch in [*now, *ahead]:
        source.prefetch(batch, document_segments(batch, tcfg))


def _step_batches(stepper: Stepper, loader: BatchLoader, step: int) -> tuple[list[Batch], str]:
    """第 step 步（从 0 计）的微批与来源（on_policy.batch_source）：数据批原样；生成批由学生（当前参数）
    或教师为每个块写续写（on_policy.Rollouts）。数据位置照常前移，所以恢复与多进程的布局不受影响。"""
    micro = [loader.next_batch() for _ in range(stepper.tcfg.gradient_accumulation_steps)]
    source = batch_source(stepper.tcfg, step)
    _prefetch(stepper, loader, micro if source == "data" else [], step + 1)
    if source == "data":
        return micro, source
    # 教师写续写时它是完整的一份（切分的教师不能写，check_generation 在开始时拒绝了）
    writer = Model(stepper.params, stepper.cfg) if source == "student" else stepper.teacher
    generated = [stepper.rollouts.generated(writer.params, writer.cfg, b, step, stepper.tcfg.seed) for b in micro]
    if hasattr(stepper.teacher_cache, "prefetch"):  # 服务端教师：全部生成批的打分请求一起发出
        tcfg = stepper.source_settings.get(source, stepper.tcfg)
        for batch in generated:
            stepper.teacher_cache.prefetch(batch, document_segments(batch, tcfg))
    return generated, source

