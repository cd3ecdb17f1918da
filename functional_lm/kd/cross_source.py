"""跨分词器目标来源的共同部分：本地教师（kd/cross_teacher.py，逐批对齐）与跨分词器的教师缓存（kd/cross_cache.py，
读出建缓存时对齐好的目标）给训练器同一个接口。

    batch_targets(batch, device, segments, count=True) → CrossTargets（子类实现）
    window_stats()  上次记录以来计损失的学生 token 里得到映射目标 / 退回 ULD / 只有 CE 的比例
                    （metrics.jsonl 训练记录的 xtok_mapped / xtok_uld / xtok_none）
    fractions()     整个运行的这三个比例（报告用）
    eval_row(...)   一条验证序列与目标的散度之和与映射位置上的 top-1 一致率（kd/evaluate 调用）

计损失的 token = labels ≠ −100 且 loss_mask；三个比例之和为 1。
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

import torch

from functional_lm.distributed import SINGLE, Dist, all_reduce_sum
from functional_lm.losses.common import LossSpec
from functional_lm.losses.cross_tokenizer import KIND_MAPPED, KIND_NONE, KIND_ULD, cross_token_terms

if TYPE_CHECKING:
    from functional_lm.data.loader import Batch
    from functional_lm.kd.cross_targets import CrossTargets

__all__ = ["CrossTargetSource", "check_cross_generation"]


class CrossTargetSource:
    """混入类：子类设好 temperature、document_mask 并实现 batch_targets；这里管统计与验证。"""

    temperature: float
    document_mask: bool

    def batch_targets(self, batch: Batch, device: torch.device, segments: Optional[torch.Tensor],
                      count: bool = True) -> CrossTargets:
        raise NotImplementedError

    def _counts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(本窗口, 已结束的窗口之和)：计损失的 token 里映射 / ULD / 只有 CE / 总数（懒建，子类不必调 __init__）。"""
        if not hasattr(self, "_window"):
            self._window = torch.zeros(4, dtype=torch.float64)
            self._totals = torch.zeros(4, dtype=torch.float64)
        return self._window, self._totals

    def count(self, targets: CrossTargets, batch: Batch) -> None:
        """把一批目标的种类计入本窗口（只数计损失的 token）。"""
        valid = ((batch.labels != -100) & batch.loss_mask).to(targets.kind.device)
        kinds = [(targets.kind == k) & valid for k in (KIND_MAPPED, KIND_ULD, KIND_NONE)]
        self._counts()[0].add_(torch.tensor([float(k.sum()) for k in kinds] + [float(valid.sum())],
                                            dtype=torch.float64))

    def window_stats(self, info: Dist = SINGLE) -> dict[str, float]:
        """上次记录以来的三个比例（写进训练记录）；没有计损失的 token 时为空。多进程时各进程的计数先相加
        （训练器在每个进程的同一步调用，所以这是一次集体通信），记录与报告因此是全局的比例。"""
        window, totals = self._counts()
        window.copy_(torch.tensor(all_reduce_sum(window.tolist(), info), dtype=torch.float64))
        mapped, uld, none, total = window.tolist()
        totals += window
        window.zero_()
        if total == 0:
            return {}
        return {"xtok_mapped": mapped / total, "xtok_uld": uld / total, "xtok_none": none / total}

    def fractions(self) -> dict[str, float]:
        """这个进程跑过的各步的三个比例（报告用；--resume 的运行从恢复处算起：计数不进检查点）。"""
        window, totals = self._counts()
        mapped, uld, none, total = (totals + window).tolist()
        return {} if total == 0 else {"mapped": mapped / total, "uld": uld / total, "ce_only": none / total}

    def eval_row(self, s_logits: torch.Tensor, one: Batch, real_vocab_size: int) -> dict[str, Any]:
        """一条验证序列：与目标的散度之和（温度 T 下的 KL 与 ULD，α = 1）与映射位置上的 top-1 一致率。"""
        segments = one.segment_ids if self.document_mask else None  # 与训练同一个文档掩码设置
        targets = self.batch_targets(one, s_logits.device, segments, count=False)
        valid = ((one.labels != -100) & one.loss_mask).to(s_logits.device)
        flat = lambda x: x.reshape(-1, *x.shape[2:])  # noqa: E731
        labels = one.labels.to(s_logits.device)
        kd, _ = cross_token_terms(flat(s_logits), tuple(flat(x) for x in targets), flat(labels), flat(valid),
                                  LossSpec("forward_kl", self.temperature, 1.0), real_vocab_size)
        mapped = valid & (targets.kind == KIND_MAPPED)
        agree = s_logits[..., :real_vocab_size].argmax(-1) == targets.ids[..., 0]
        return {"kl_cache": float(kd.sum()), "agree": float(agree[mapped].sum()), "mapped": float(mapped.sum())}


def check_cross_generation(vocab_map: Any, student: Any, tcfg: Any) -> None:
    """跨分词器的在线蒸馏（本地与服务端的教师共用）：学生写的续写（学生的 token）解码成字节、由教师的分词器
    重新切分后打分（与数据批同一条对齐路径；不是合法 UTF-8 的字节作为教师的单字节 token 发送，没有对应的特殊
    token 不给目标）。教师写续写（SeqKD）与采样估计还不支持：一段话拒绝。"""
    pair = f"({vocab_map.teacher_name} vs {vocab_map.student_name})"
    if tcfg.teacher_generated_fraction > 0:
        raise ValueError(
            f"teacher_generated_fraction={tcfg.teacher_generated_fraction} with a teacher whose tokenizer differs "
            f"from the student's {pair}: the teacher would write in its own vocabulary, and turning its text into "
            f"student batches inside the run is not available; write the teacher's text once with `functional-lm "
            f"generate` and train on it with --data (sequence-level distillation), or set the fraction to 0 "
            f"(on-policy grading of the student's continuations works)")
    if tcfg.on_policy_estimator == "sampled":
        raise ValueError(
            f"on_policy_estimator='sampled' with a teacher whose tokenizer differs from the student's {pair}: the "
            f"sampled estimate needs log P_teacher of each sampled student token, which a span-aligned teacher "
            f"gives only for one-to-one groups; use on_policy_estimator='topk' (the default)")
    from functional_lm.kd.preflight import check_rollout_length

    check_rollout_length(tcfg, student.cfg.max_seq_len, f"the student's max_seq_len {student.cfg.max_seq_len}")
