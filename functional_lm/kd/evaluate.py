"""验证：损失各部分、学生与教师困惑度、KL(教师 ‖ 学生)（T = 1）、top-1 一致率；在线蒸馏所优化的量
（学生采样的续写上的反向 KL 与教师 NLL）；以及训练中按间隔验证的 ``Evaluator``。

逐条序列计算完整 logits（一次只有 t × vocab 的张量），各项乘以有效 token 数再相加（跨序列、跨进程可加），
最后除以总 token 数。多进程时第 i 个验证批归第 i mod W 个进程，各项之和 all-reduce。
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Optional

import torch

from functional_lm.config import TrainingConfig
from functional_lm.distributed import SINGLE, Dist, all_reduce_sum
from functional_lm.kd.objective import Model, count_valid_tokens, document_segments, is_sharded, no_checks_if_sharded, teacher_scope
from functional_lm.kd.on_policy import rollouts_for
from functional_lm.losses import distillation_loss, sparse_distillation_loss
from functional_lm.models.decoder import forward_hidden, output_weight

if TYPE_CHECKING:
    from functional_lm.data.loader import Batch, BatchLoader
    from functional_lm.data.pipeline import DataBundle
    from functional_lm.kd.on_policy import Rollouts
    from functional_lm.kd.trainer import Run
    from functional_lm.kd.teacher_cache import TeacherCache

__all__ = ["evaluate", "evaluate_on_policy", "Evaluator"]


def _eval_row(
    student: Model, teacher: Optional[Model], one: Batch, tcfg: TrainingConfig, real_vocab_size: int,
    cache: Optional[TeacherCache] = None,
) -> dict[str, float]:
    """一条验证序列的各项之和（乘以有效 token 数 n，便于跨序列、跨进程相加）；
    没有教师而有验证集的教师缓存时，KL 与一致率改按缓存目标计算（见 _cache_row）。"""
    n = count_valid_tokens(one)
    s_logits, t_logits = _row_logits(student, teacher, one.input_ids, document_segments(one, tcfg))
    common = dict(real_vocab_size=real_vocab_size, loss_mask=one.loss_mask, return_parts=True)
    loss, parts = distillation_loss(
        s_logits, t_logits, one.labels, alpha=tcfg.alpha, temperature=tcfg.temperature,
        divergence=tcfg.divergence, **common,
    )
    _, kl1 = distillation_loss(s_logits, t_logits, one.labels, alpha=1.0, temperature=1.0, **common)
    valid = (one.labels != -100) & one.loss_mask
    agree = s_logits[..., :real_vocab_size].argmax(-1) == t_logits[..., :real_vocab_size].argmax(-1)
    row = {
        "loss": float(loss) * n, "kd": float(parts["kd"]) * n, "ce": float(parts["ce"]) * n,
        "teacher_ce": _summed_ce(t_logits, one.labels, valid, real_vocab_size), "kl_t1": float(kl1["kd"]) * n,
        "agree": float(agree[valid].sum()),
        "tokens": float(n), "kl_cache": 0.0, "mapped": 0.0,
    }
    return row | _cache_row(s_logits, one, cache, real_vocab_size) if teacher is None and cache is not None else row


def _row_logits(
    student: Model, teacher: Optional[Model], input_ids: torch.Tensor, segment_ids: Optional[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """一条序列上学生与教师的完整 logits（教师的在 float32 中）；没有教师时教师一侧就是学生的
    （KD 相关的量恒为 0，最后不报告）。"""
    s_hidden = forward_hidden(student.params, input_ids, student.cfg, segment_ids=segment_ids)
    s_logits = s_hidden @ output_weight(student.params, student.cfg).T
    if teacher is None:
        return s_logits, s_logits
    with teacher_scope(teacher), no_checks_if_sharded(teacher):
        t_hidden = forward_hidden(teacher.params, input_ids, teacher.cfg, check=False, segment_ids=segment_ids)
        return s_logits, t_hidden.float() @ output_weight(teacher.params, teacher.cfg).float().T


def _cache_row(s_logits: torch.Tensor, one: Batch, cache: TeacherCache, real_vocab_size: int) -> dict[str, float]:
    """没有教师、只有验证集的教师缓存时：与缓存目标的 KL（温度取缓存的 T，k 个单 token 桶 + 尾部桶）
    与 top-1 一致率（学生的 argmax 是否等于缓存里概率最大的 id），同样乘以有效 token 数。"""
    if hasattr(cache, "eval_row"):  # 跨分词器的教师：按它自己的目标（映射目标上的 KL + ULD）
        return cache.eval_row(s_logits, one, real_vocab_size)
    ids, log_p, tail = (x.to(s_logits.device) for x in cache.targets(one.block_ids.cpu()))
    _, parts = sparse_distillation_loss(
        s_logits, ids, log_p, one.labels, teacher_tail_mass=tail, alpha=1.0, temperature=cache.temperature,
        real_vocab_size=real_vocab_size, loss_mask=one.loss_mask, return_parts=True,
    )
    valid = (one.labels != -100) & one.loss_mask
    agree = s_logits[..., :real_vocab_size].argmax(-1) == ids[..., 0]
    n = count_valid_tokens(one)
    return {"kl_cache": float(parts["kd"]) * n, "agree": float(agree[valid].sum()), "mapped": float(n)}


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
        agree = totals["agree"] / totals["mapped"] if totals["mapped"] else 0.0  # 一致率只在有映射目标的 token 上
        scores |= {"kl_cache_student": mean["kl_cache"], "top1_agreement": agree}
    return scores


def _my_batches(loader: BatchLoader, max_batches: Optional[int], teacher: Optional[Model], info: Dist) -> tuple[bool, range]:
    """验证批怎样分给各进程：(是否轮流分担, 本进程算的批号)。多进程时第 i 批归第 i mod W 个进程；
    教师按层切分时每个进程都算全部批（all-gather 必须一一对上），结果相同、不再相加。"""
    count = min(max_batches if max_batches is not None else len(loader), len(loader))
    striped = info.enabled and not is_sharded(teacher)
    return striped, range(info.rank, count, info.world_size) if striped else range(count)


@torch.no_grad()
def evaluate(
    student: Model,
    teacher: Optional[Model],
    loader: BatchLoader,
    tcfg: TrainingConfig,
    *,
    real_vocab_size: int,
    max_batches: Optional[int] = None,
    info: Dist = SINGLE,
    teacher_cache: Optional[TeacherCache] = None,
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
    keys = ("loss", "kd", "ce", "teacher_ce", "kl_t1", "agree", "tokens", "kl_cache", "mapped")
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
    loader: BatchLoader,
    rollouts: Rollouts,
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


def _on_policy_row(student: Model, teacher: Model, one: Batch, real_vocab_size: int) -> tuple[float, float, float]:
    """一条生成序列：(反向 KL·n, 教师 NLL·n, n)，n 为生成的有效 token 数。词表大小的计算只在这 n 个位置上做
    （提示与填充约占一半的位置）。"""
    n = count_valid_tokens(one)
    if n == 0:
        return 0.0, 0.0, 0.0
    s_logits, t_logits = _row_logits(student, teacher, one.input_ids, one.segment_ids)
    valid = (one.labels != -100) & one.loss_mask
    s_logits, t_logits, labels = s_logits[valid], t_logits[valid], one.labels[valid]
    _, rkl = distillation_loss(s_logits, t_logits, labels, alpha=1.0, divergence="reverse_kl", temperature=1.0,
                               real_vocab_size=real_vocab_size, return_parts=True)
    return float(rkl["kd"]) * n, _summed_ce(t_logits, labels, torch.ones_like(labels, dtype=torch.bool), real_vocab_size), float(n)


def _summed_ce(logits: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor, real_vocab_size: int) -> float:
    """Σ 有效位置的交叉熵 lse(z) − z[label]（T = 1，只在真实词表的列上）：教师的 NLL / 困惑度用它，
    不必为一个交叉熵去算整套蒸馏损失。"""
    return float(torch.nn.functional.cross_entropy(logits[valid][:, :real_vocab_size].float(), labels[valid], reduction="sum"))


class Evaluator:
    """按间隔验证（所有进程一起算，秩 0 写指标）；验证期间进度条上写着 “evaluating”，没有进度条时结果打印一行。"""

    def __init__(
        self, run: Run, teacher: Optional[Model], data: DataBundle, val_cache: Optional[TeacherCache] = None
    ) -> None:
        self.run, self.teacher, self.val_loader, self.val_cache = run, teacher, data.val_loader, val_cache
        s = run.stepper
        # 在线验证要教师给学生采样的续写打分：没有教师（只有教师缓存）时不做
        self.val_rollouts = rollouts_for(data, "val", s.tcfg, s.real_vocab_size) if teacher is not None else None

    def __call__(self, step: int) -> dict[str, float]:
        if self.val_loader is None:
            return {}
        bar, s = self.run.bar, self.run.stepper
        bar.describe("distill (evaluating)")
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
        self.run.metrics.write(record)
        bar.evaluated(record)
        return scores

