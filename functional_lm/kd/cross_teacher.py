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
from functional_lm.kd.alignment import Aligner
from functional_lm.kd.cross_source import CrossTargetSource
from functional_lm.kd.cross_targets import CrossTargets, cross_targets
from functional_lm.kd.objective import Model, teacher_hidden_states
from functional_lm.models.decoder import check_params, forward_hidden, output_weight

if TYPE_CHECKING:
    from functional_lm.data.loader import Batch
    from functional_lm.data.tokenizer import Tokenizer
    from functional_lm.kd.vocab_map import VocabMap

__all__ = ["CrossTokenizerTeacher"]


class CrossTokenizerTeacher(CrossTargetSource):
    """教师模型 + 两个分词器的对齐；``batch_targets`` 给出 CrossTargets（统计与验证见 kd/cross_source.py）。"""

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

    # ---------------------------------------------------------------- 训练前的核对（kd/preflight 调用）
    def check_run(self, tcfg: TrainingConfig, real_vocab_size: int) -> None:
        if real_vocab_size != self.student_real_vocab:
            raise ValueError(f"real_vocab_size={real_vocab_size} differs from the student tokenizer's "
                             f"{self.student_real_vocab} real tokens")

    def check_generation(self, student: Model, tcfg: TrainingConfig) -> None:
        """在线蒸馏的限制（kd/cross_source.check_cross_generation）。"""
        from functional_lm.kd.cross_source import check_cross_generation

        check_cross_generation(self.vocab_map, student, tcfg)

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
            self.count(targets, batch)
        return targets

    def summary(self) -> dict[str, Any]:
        """整个运行的比例与词表映射的说明（报告用）。"""
        return {"mode": self.mode, "vocabulary": self.vocab_map.describe(), **self.fractions()}
