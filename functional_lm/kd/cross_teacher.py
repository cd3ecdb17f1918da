"""跨分词器的本地教师：一个目标来源（放在 Stepper.teacher_cache 的位置，与教师缓存、服务端教师同一个接口）。

每个微批：对齐（kd/alignment.py）→ 教师在自己的 token 流上前向（不求梯度）→ 每个学生位置的目标
（kd/cross_targets.py）→ 学生的分块损失（losses/cross_tokenizer.py）。另外累计多少个计损失的学生 token 得到了
映射目标、多少个退回 ULD、多少个只有交叉熵，写进 metrics.jsonl 的训练记录（xtok_mapped / xtok_uld /
xtok_none，各为比例）与报告。

--cross-tokenizer 的取值：auto（缺省：两边分词器不同时 hybrid，相同时 off）、off、hybrid、uld（kd/pipeline 解析）。
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

import torch

from functional_lm.config import TrainingConfig
from functional_lm.kd.alignment import KIND_MAPPED, KIND_NONE, KIND_ULD, Aligner
from functional_lm.kd.cross_targets import CrossTargets, cross_targets
from functional_lm.kd.objective import Model, teacher_hidden_states
from functional_lm.losses.common import LossSpec
from functional_lm.losses.cross_tokenizer import cross_token_terms
from functional_lm.models.decoder import check_params, forward_hidden, output_weight

if TYPE_CHECKING:
    from functional_lm.data.loader import Batch
    from functional_lm.data.tokenizer import Tokenizer
    from functional_lm.kd.vocab_map import VocabMap

__all__ = ["CrossTokenizerTeacher"]


class CrossTokenizerTeacher:
    """教师模型 + 两个分词器的对齐；``batch_targets`` 给出 CrossTargets。"""

    grades_generated = True  # 在线蒸馏：学生写的续写按字节对齐后由教师打分（见 check_generation）

    def __init__(self, teacher: Model, student_tok: Tokenizer, teacher_tok: Tokenizer, vocab_map: VocabMap,
                 mode: str, tcfg: TrainingConfig) -> None:
        check_params(teacher.params, teacher.cfg)
        self.teacher, self.vocab_map, self.mode = teacher, vocab_map, mode
        self.aligner = Aligner(student_tok, teacher_tok, vocab_map, mode)
        self.top_k, self.temperature, self.document_mask = tcfg.top_k, tcfg.temperature, tcfg.document_mask
        self.teacher_real_vocab = teacher_tok.real_vocab_size
        self.student_real_vocab = student_tok.real_vocab_size
        self.forward_fn = torch.compile(forward_hidden, dynamic=True) if tcfg.compile else forward_hidden
        self._window = torch.zeros(4, dtype=torch.float64)  # 计损失的 token：映射 / ULD / 只有 CE / 总数
        self.totals = torch.zeros(4, dtype=torch.float64)

    # ---------------------------------------------------------------- 训练前的核对（kd/preflight 调用）
    def check_run(self, tcfg: TrainingConfig, real_vocab_size: int) -> None:
        if real_vocab_size != self.student_real_vocab:
            raise ValueError(f"real_vocab_size={real_vocab_size} differs from the student tokenizer's "
                             f"{self.student_real_vocab} real tokens")

    def check_generation(self, student: Model, tcfg: TrainingConfig) -> None:
        """在线蒸馏：学生写的续写（学生的 token）解码成字节、由教师的分词器重新切分后打分（与数据批同一条对齐
        路径；不是合法 UTF-8 的字节作为教师的单字节 token 发送，没有对应的特殊 token 不给目标）。教师写续写
        （SeqKD）与采样估计还不支持：一段话拒绝。"""
        pair = f"({self.vocab_map.teacher_name} vs {self.vocab_map.student_name})"
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

    # ---------------------------------------------------------------- 目标
    def batch_targets(self, batch: Batch, device: torch.device, segments: Optional[torch.Tensor],
                      count: bool = True) -> CrossTargets:
        """一个微批的目标（形状按学生的批）；count=False 时不计入 xtok_* 统计（验证用）。"""
        plan = self.aligner.plan(batch.input_ids, batch.labels, segments)
        t_segments = None if plan.teacher_segments is None else plan.teacher_segments.to(device)
        hidden = teacher_hidden_states(self.teacher, plan.teacher_ids.to(device), self.forward_fn, t_segments)
        targets = cross_targets(
            hidden, output_weight(self.teacher.params, self.teacher.cfg), plan, self.vocab_map, batch.labels,
            top_k=self.top_k, temperature=self.temperature, teacher_real_vocab=self.teacher_real_vocab,
            student_real_vocab=self.student_real_vocab,
        )
        if count:
            valid = ((batch.labels != -100) & batch.loss_mask).to(device)
            kinds = [(targets.kind == k) & valid for k in (KIND_MAPPED, KIND_ULD, KIND_NONE)]
            self._window += torch.tensor([float(k.sum()) for k in kinds] + [float(valid.sum())], dtype=torch.float64)
        return targets

    def window_stats(self) -> dict[str, float]:
        """上次记录以来计损失的 token 里：得到映射目标 / 退回 ULD / 只有交叉熵的比例（写进训练记录）。"""
        mapped, uld, none, total = self._window.tolist()
        self.totals += self._window
        self._window.zero_()
        if total == 0:
            return {}
        return {"xtok_mapped": mapped / total, "xtok_uld": uld / total, "xtok_none": none / total}

    def summary(self) -> dict[str, Any]:
        """整个运行的比例与词表映射的说明（报告用）。"""
        mapped, uld, none, total = (self.totals + self._window).tolist()
        fractions = {} if total == 0 else {"mapped": mapped / total, "uld": uld / total, "ce_only": none / total}
        return {"mode": self.mode, "vocabulary": self.vocab_map.describe(), **fractions}

    # ---------------------------------------------------------------- 验证（kd/evaluate 调用）
    def eval_row(self, s_logits: torch.Tensor, one: Batch, real_vocab_size: int) -> dict[str, float]:
        """一条验证序列：与教师目标的散度之和（T = 1 下的 KL 与 ULD，α = 1）与映射位置上的 top-1 一致率。"""
        segments = one.segment_ids if self.document_mask else None  # 与训练同一个文档掩码设置
        targets = self.batch_targets(one, s_logits.device, segments, count=False)
        valid = (one.labels != -100) & one.loss_mask
        flat = lambda x: x.reshape(-1, *x.shape[2:])  # noqa: E731
        kd, _ = cross_token_terms(flat(s_logits), tuple(flat(x) for x in targets), flat(one.labels), flat(valid),
                                  LossSpec("forward_kl", self.temperature, 1.0), real_vocab_size)
        mapped = valid & (targets.kind == KIND_MAPPED)
        agree = s_logits[..., :real_vocab_size].argmax(-1) == targets.ids[..., 0]
        return {"kl_cache": float(kd.sum()), "agree": float(agree[mapped].sum()), "mapped": float(mapped.sum())}
