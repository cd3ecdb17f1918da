"""跨分词器的服务端教师：学生的批按文本对齐（kd/alignment.py），教师的 token 流发给 OpenAI 兼容服务器
（kd/served.py，只发 id），服务器给的 top-K（教师词表、教师的位置）在这里变成每个学生位置的目标。

服务器只给 top-K 与“实际 token”的 log P（prompt_logprobs），没有完整分布，所以与本地教师（kd/cross_targets.py）
相比：

    ULD 行     教师自己降序的 top-K 与尾部 1 − Σ_topK P：与本地的**相同**（只差 float16 取整）。
    MAPPED 行  映射分布只从 top-K 里建：P̃(map(t)) = P_T(t)，t 取教师 top-K 里有对应学生 token 的那些；
               链式法则的因子 P_T(t_r | …) 是服务器给的实际 token 的 log P，所以 P(段) 是**精确的**：
               P̃(x_{i+1}) += P(段)（x_{i+1} 不在其中时另加一项），t₁ 在 top-K 里且有对应时 P̃(map(t₁)) −= P(段)。
               尾部 = 1 − Σ 保留的 P̃：top-K 之外的质量与 top-K 里没有对应的质量都在尾部桶里。
               保留的项不足 K 个时，其余位置填不在其中的学生 id、P = 0（log P 存为 float16 的最小值）：前向 KL
               （缺省的散度）里这些桶贡献 0；反向 KL 与 JSD 会把它们当成教师确信为 0 的 token，这时请用本地
               教师或跨分词器的缓存。
    K          与 --top-k 相同（服务器的 --max-logprobs 要 ≥ K）；温度必须为 1（同服务端教师）。

本地教师的 MAPPED 行取的是完整 P̃ 的 top-k：两者在 P̃ 的前几名通常相同（教师 top-K 里映射到的 token 就是 P̃ 的
前几名，除非很多教师的高概率 token 没有对应），测试逐项核对服务端的每一项等于本地完整 P̃ 在同一个 id 上的值。
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Optional

import torch

from functional_lm.kd.alignment import KIND_MAPPED, KIND_ULD, Aligner, CrossPlan
from functional_lm.kd.cross_source import CrossTargetSource
from functional_lm.kd.cross_targets import CrossTargets
from functional_lm.kd.teacher_cache import stored_log_probs

if TYPE_CHECKING:
    from functional_lm.config import TrainingConfig
    from functional_lm.data.loader import Batch
    from functional_lm.data.tokenizer import Tokenizer
    from functional_lm.distributed import Dist
    from functional_lm.kd.served import ServedTargets, ServedTeacher
    from functional_lm.kd.vocab_map import VocabMap

__all__ = ["ServedCrossTeacher", "served_cross_targets"]


def _chain_terms(got: ServedTargets, plan: CrossPlan, rows: torch.Tensor) -> torch.Tensor:
    """每个位置的 log P(段) = log P_T(t₁) + Σ_{r≥2} log P_T(t_r | …)（服务器给的实际 token 的 log P），float64；
    组里只有一个教师 token 的位置为 −∞（不拆分）。rows：这些位置的下标（展平的学生位置）。"""
    actual = got.actual_log_probs.reshape(-1).double()
    inner = plan.inner_rows.reshape(plan.kind.numel(), plan.inner_rows.shape[-1])[rows]  # 宽度可以为 0
    present = inner >= 0
    chained = present.any(-1)
    extra = torch.where(present, actual[inner.clamp(min=0)], torch.zeros((), dtype=torch.float64)).sum(-1)
    span = actual[plan.pred_row.reshape(-1)[rows]] + extra
    return torch.where(chained & span.isfinite(), span, torch.full_like(span, float("-inf")))


def _fill_free_ids(ids: torch.Tensor, used: torch.Tensor, rows_per_chunk: int = 2048) -> torch.Tensor:
    """没有保留项的槽（used 为假）换成这一行里没有用到的学生 id（取 0 … 2K−1 里没被占的，按从小到大），
    使每行的 id 互不相同。2K 个候选里至多 K 个被占，空槽至多 K 个，所以总够用。按行块做，内存 ≤ 块 × 2K × K。"""
    k = ids.shape[-1]
    out = ids.clone()
    candidates = torch.arange(2 * k)
    for start in range(0, ids.shape[0], rows_per_chunk):
        block_ids, block_used = ids[start:start + rows_per_chunk], used[start:start + rows_per_chunk]
        taken = (candidates[None, :, None] == torch.where(block_used, block_ids, -1)[:, None, :]).any(-1)
        free = candidates[None].expand_as(taken).gather(1, taken.int().argsort(dim=1, stable=True))  # 空的在前
        rank = ((~block_used).cumsum(-1) - 1).clamp(min=0)
        out[start:start + rows_per_chunk] = torch.where(block_used, block_ids, free.gather(1, rank))
    return out


def _mapped_rows(got: ServedTargets, plan: CrossPlan, vmap: VocabMap, labels: torch.Tensor, rows: torch.Tensor,
                 top_k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MAPPED 位置（rows）的 (学生 id, log P̃, 尾部)：从服务器的 top-K 建映射分布并做链式法则（见模块说明）。"""
    k = got.ids.shape[-1]
    pred = plan.pred_row.reshape(-1)[rows]
    t_ids = got.ids.reshape(-1, k)[pred]
    p = got.log_probs.reshape(-1, k)[pred].double().exp()
    s_ids = vmap.teacher_to_student[t_ids.clamp(max=vmap.teacher_to_student.numel() - 1)]
    p = torch.where(s_ids >= 0, p, torch.zeros_like(p))
    span = _chain_terms(got, plan, rows).exp()  # P(段)，不拆分的位置为 0
    first = plan.first_token.reshape(-1)[rows]
    p = torch.where(t_ids == first[:, None], (p - span[:, None]).clamp(min=0.0), p)  # t₁ 的质量减去 P(段)
    label = labels.reshape(-1)[rows].clamp(min=0)
    at_label = s_ids == label[:, None]
    p = p + torch.where(at_label, span[:, None], torch.zeros_like(p))
    extra = torch.where(at_label.any(-1), torch.zeros_like(span), span)  # x_{i+1} 不在其中：另加一项
    s_ids = torch.cat([s_ids, torch.where(extra > 0, label, -1)[:, None]], dim=-1)
    p = torch.cat([p, extra[:, None]], dim=-1)
    top_p, order = p.topk(top_k, dim=-1)
    chosen = s_ids.gather(-1, order)
    used = (top_p > 0) & (chosen >= 0)
    tail = (1.0 - torch.where(used, top_p, torch.zeros_like(top_p)).sum(-1)).clamp(0.0, 1.0)
    log_p = torch.where(used, top_p.log(), torch.full_like(top_p, float("-inf")))
    return _fill_free_ids(chosen, used), stored_log_probs(log_p.float()), tail.float()


@torch.no_grad()
def served_cross_targets(got: ServedTargets, plan: CrossPlan, vmap: VocabMap, labels: torch.Tensor, *,
                         top_k: int) -> CrossTargets:
    """服务器在教师流上的目标 (b, tt, K) + 对齐 → 每个学生位置的 CrossTargets (b, t, K)（见模块说明）。"""
    b, t = plan.kind.shape
    kind, pred = plan.kind.reshape(-1), plan.pred_row.reshape(-1)
    ids = torch.arange(top_k).expand(b * t, top_k).clone()
    log_p = torch.zeros((b * t, top_k), dtype=torch.float32)
    tail = torch.zeros(b * t, dtype=torch.float32)
    uld = ((kind == KIND_ULD) & (pred >= 0)).nonzero().squeeze(1)
    log_p[uld] = got.log_probs.reshape(-1, top_k)[pred[uld]].float()
    tail[uld] = got.tail.reshape(-1)[pred[uld]].float()
    mapped = ((kind == KIND_MAPPED) & (pred >= 0)).nonzero().squeeze(1)
    if mapped.numel():
        ids[mapped], log_p[mapped], tail[mapped] = _mapped_rows(got, plan, vmap, labels, mapped, top_k)
    return CrossTargets(ids.reshape(b, t, top_k), log_p.reshape(b, t, top_k), tail.reshape(b, t), plan.kind)


class ServedCrossTeacher(CrossTargetSource):
    """服务端教师 + 两个分词器的对齐；``batch_targets`` 给出 CrossTargets（统计与验证见 kd/cross_source.py）。"""

    grades_generated = True  # 在线蒸馏：学生的续写按字节对齐后发给服务器打分
    temperature = 1.0

    def __init__(self, served: ServedTeacher, student_tok: Tokenizer, teacher_tok: Tokenizer, vocab_map: VocabMap,
                 mode: str, tcfg: TrainingConfig) -> None:
        self.served, self.vocab_map, self.mode = served, vocab_map, mode
        self.aligner = Aligner(student_tok, teacher_tok, vocab_map, mode)
        self.top_k, self.document_mask = served.top_k, tcfg.document_mask
        self.student_real_vocab = student_tok.real_vocab_size

    @property
    def model(self) -> Optional[str]:
        return self.served.model

    def check_run(self, tcfg: TrainingConfig, real_vocab_size: int) -> None:
        """T = 1、K 与服务器的相同（served.check_run 的理由），学生的真实词表与学生分词器的相同。"""
        self.served.check_run(tcfg, self.served.real_vocab_size)
        if real_vocab_size != self.student_real_vocab:
            raise ValueError(f"real_vocab_size={real_vocab_size} differs from the student tokenizer's "
                             f"{self.student_real_vocab} real tokens")

    def check_generation(self, student: Any, tcfg: TrainingConfig) -> None:
        """在线蒸馏：与本地的跨分词器教师相同的限制（kd/cross_source.check_cross_generation）。"""
        from functional_lm.kd.cross_source import check_cross_generation

        check_cross_generation(self.vocab_map, student, tcfg)

    def batch_targets(self, batch: Batch, device: torch.device, segments: Optional[torch.Tensor],
                      count: bool = True) -> CrossTargets:
        """对齐 → 教师流发给服务器 → 每个学生位置的目标；count=False 时不计入 xtok_* 统计（验证用）。"""
        plan = self.aligner.plan(batch.input_ids.cpu(), batch.labels.cpu(), None if segments is None else segments.cpu())
        limit = self.served.max_model_len
        if limit is not None and plan.teacher_ids.shape[1] + 1 > limit:  # 训练器存下进度再停（可以 --resume）
            from functional_lm.errors import TeacherUnavailable

            raise TeacherUnavailable(
                f"a batch's teacher token stream is {plan.teacher_ids.shape[1]} tokens (the teacher's tokenizer cuts "
                f"the text into more tokens than the student's), but the server at {self.served.settings.base} takes "
                f"at most {limit} per sequence (its --max-model-len, one padding id appended); start it with a "
                f"larger --max-model-len or lower --seq-len")
        request = SimpleNamespace(input_ids=plan.teacher_ids, labels=None)  # 经 served_targets：等待时间照常统计
        got = self.served.served_targets(request, plan.teacher_segments)
        targets = served_cross_targets(got, plan, self.vocab_map, batch.labels.cpu(), top_k=self.top_k)
        targets = CrossTargets(*(x.to(device) for x in targets))
        if count:
            self.count(targets, batch)
        return targets

    def window_stats(self, info: Dist | None = None) -> dict[str, float]:
        """xtok_* 比例（进程间相加）与服务器的吞吐、等待。"""
        from functional_lm.distributed import SINGLE

        return super().window_stats(info or SINGLE) | self.served.window_stats()

    def summary(self) -> dict[str, Any]:
        return {"mode": self.mode, "vocabulary": self.vocab_map.describe(), "served": self.served.model,
                "url": self.served.settings.base, **self.fractions()}

    def close(self) -> None:
        self.served.close()
