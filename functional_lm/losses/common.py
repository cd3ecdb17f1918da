"""蒸馏损失各模块共用的约定与零件：超参数规格 ``LossSpec``、输入校验、归一化分母 N、计算精度、
温度 T 下的 log 概率、交叉熵，以及把两项组合成目标函数的 ``objective`` / ``finish``。

这里的公开名字供 losses 包内的 divergences / sparse / chunked 共用；包外请从 ``functional_lm.losses`` 导入。

形状图例（见 functional_lm/shapes.py）：``b`` 批、``t`` 位置、``d`` 隐藏维度、``v`` 词表列；``*batch`` 表示任意前导维度
（通常是 ``b t``，也可以是展平后的 ``n``）。学生列数记作 ``vs``，教师列数记作 ``vt``。

约定（全部模块共用）
-------------------
* P 是教师分布，Q 是学生分布，都在温度 T 下取：P = softmax(z_t / T)，Q = softmax(z_s / T)。
* 标签已由调用方移位：``labels[..., i]`` 就是位置 i 的 logits 所要预测的 token（本模块不再移位）。
* 规格书的目标函数（Hinton）::

      loss = α · T² · mean_tok D(P ‖ Q)  +  (1 − α) · mean_tok CE(z_s, labels)

  默认 α = 0.5、T = 2.0、D = 前向 KL。T² 只在 ``objective`` 一处相乘（它补偿 ∂D/∂z_s ∝ 1/T 的缩放，
  使 KD 项的梯度量级与 T 无关）；交叉熵取 T = 1，只看学生。
* 掩码：``labels == ignore_index`` 或 ``loss_mask`` 为 False 的 token 对两项都不计入（数值和梯度都为零）。
* 归一化：先在有效 token 上求和，再除以 N。N 默认是本次调用的有效 token 数；梯度累积时训练器传入
  全局计数 ``num_tokens``，于是 Σ_微批 (Σ_微批内 ℓ) / N_全局 = 大批的平均，梯度与一次算大批完全相同。
  没有任何有效 token 时返回 0（带计算图、梯度为零），而不是 0/0 = NaN。
* 真实词表：Qwen2.5 的嵌入有 151,936 行，真实 token 只有 151,665 个（教师可能有 152,064 行）。
  ``real_vocab_size`` 之后的列在两边的 softmax 中都被排除——它们的概率恰为 0、梯度恰为 0，
  既不会分走概率，也不会被截断/补零成"幽灵"质量。未给出时要求师生列数相同，并把全部列视为真实词表。
* 低精度（bf16 / fp16）logits 先升到 float32 再计算；float64 保持 float64（测试用它做精确比对）。
* 教师视为常数：对教师 logits 不求梯度。
"""

import math
from dataclasses import dataclass

import torch

from functional_lm.shapes import Tensor, under_transform

DIVERGENCES: tuple[str, ...] = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd")

Number = float | int

# ================================================================================================
# 超参数与输入校验
# ================================================================================================


def check_real(name: str, value: object, low: float, high: float, *, high_open: bool = False) -> float:
    """校验一个实数超参数落在 [low, high]（或 [low, high)）内，返回 float。"""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if not (low <= value < high if high_open else low <= value <= high):
        closing = ")" if high_open else "]"
        raise ValueError(f"{name} must be in [{low}, {high}{closing}, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class LossSpec:
    """一次损失计算的全部超参数（构造时校验，之后在普通版、分块版、稀疏版之间共享）。"""

    divergence: str = "forward_kl"  # 散度名，见 DIVERGENCES
    temperature: float = 2.0  # 蒸馏温度 T > 0
    alpha: float = 0.5  # KD 项权重 α ∈ [0, 1]
    beta: float = 0.5  # 广义 JSD 的 β ∈ [0, 1]
    skew_lambda: float = 0.1  # 偏斜 KL 的 λ ∈ [0, 1)
    ignore_index: int = -100  # 不计入损失的标签值

    def __post_init__(self) -> None:
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"unknown divergence {self.divergence!r}; valid names: {', '.join(DIVERGENCES)}")
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
            raise ValueError(f"temperature must be a finite number > 0, got {t!r}")
        check_real("alpha", self.alpha, 0.0, 1.0)
        check_real("beta", self.beta, 0.0, 1.0)
        check_real("skew_lambda", self.skew_lambda, 0.0, 1.0, high_open=True)
        if isinstance(self.ignore_index, bool) or not isinstance(self.ignore_index, int):
            raise ValueError(f"ignore_index must be an int, got {self.ignore_index!r}")


def resolve_real_vocab(student_cols: int, teacher_cols: int | None, real_vocab_size: int | None) -> int:
    """确定真实词表大小 V：两边都只在前 V 列上取 softmax。teacher_cols=None 表示教师不是稠密 logits。"""
    if real_vocab_size is None:
        if teacher_cols is not None and teacher_cols != student_cols:
            raise ValueError(
                f"student logits have {student_cols} columns but teacher logits have {teacher_cols}; "
                f"pass real_vocab_size (e.g. 151665 for Qwen2.5) so both are cut to the same real vocabulary"
            )
        return student_cols
    if isinstance(real_vocab_size, bool) or real_vocab_size < 1:
        raise ValueError(f"real_vocab_size must be a positive int, got {real_vocab_size!r}")
    for who, cols in (("student", student_cols), ("teacher", teacher_cols)):
        if cols is not None and cols < real_vocab_size:
            raise ValueError(
                f"real_vocab_size={real_vocab_size} exceeds the {who}'s {cols} logit columns "
                f"(student {student_cols}, teacher {teacher_cols})"
            )
    return real_vocab_size


def valid_mask(labels: Tensor, loss_mask: Tensor | None, ignore_index: int) -> Tensor:
    """有效 token：标签不是 ignore_index，且 loss_mask（若给出）为真。"""
    valid = labels != ignore_index
    return valid if loss_mask is None else valid & loss_mask


def check_ids(ids: Tensor, valid: Tensor | None, vocab: int, what: str) -> None:
    """eager 下检查 id 落在 [0, vocab)（落进填充列的标签几乎总是 bug）；在 torch.func / compile 中让路。"""
    if under_transform(ids) or (valid is not None and under_transform(valid)):
        return
    bad = (ids < 0) | (ids >= vocab)
    if valid is not None:
        bad = bad & valid
    if bool(bad.any()):
        raise ValueError(f"{what} must lie in [0, {vocab}) (the real vocabulary); got {ids[bad][:8].tolist()}")


def token_divisor(valid: Tensor, num_tokens: int | Tensor | None) -> int | Tensor:
    """归一化分母 N ≥ 1：默认本次调用的有效 token 数；梯度累积时传入全局计数。"""
    if num_tokens is None:
        return valid.sum().clamp(min=1)
    if isinstance(num_tokens, Tensor):
        if num_tokens.numel() != 1:
            raise ValueError(f"num_tokens must be a scalar, got shape {tuple(num_tokens.shape)}")
        return num_tokens.reshape(()).clamp(min=1)
    if isinstance(num_tokens, bool) or num_tokens < 0:
        raise ValueError(f"num_tokens must be a non-negative int (the global count of loss tokens), got {num_tokens!r}")
    return max(num_tokens, 1)


# ================================================================================================
# 精度、log 概率与两项的组合
# ================================================================================================


def compute_dtype(x: Tensor) -> torch.dtype:
    """计算精度：bf16 / fp16 升到 float32，其余保持。"""
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def student_log_probs(student_real: Tensor, temperature: float) -> Tensor:
    """log Q = log_softmax(z_s / T)，只在真实词表列上（输入已切好）。"""
    scaled = student_real if temperature == 1.0 else student_real / temperature
    return torch.log_softmax(scaled, dim=-1)


@torch.no_grad()
def teacher_log_probs(
    teacher_logits: Tensor, real_vocab_size: int, temperature: float, dtype: torch.dtype, *, inplace: bool = False
) -> Tensor:
    """log P = log_softmax(z_t / T)，原地计算以省内存（默认先复制；inplace=True 时直接改写调用方
    自己刚算出的教师 logits）；−∞ 夹到 dtype 最小值：P = exp(最小值) 仍恰为 0，但 log P 有限，
    于是与学生的 −∞ 相减、与之 logaddexp 时前向和反向都不会出现 ∞ − ∞。"""
    view = teacher_logits[..., :real_vocab_size]
    logp = view if inplace and view.dtype == dtype else view.to(dtype, copy=True)
    if temperature != 1.0:
        logp.div_(temperature)
    logp.sub_(torch.logsumexp(logp, dim=-1, keepdim=True))
    return logp.clamp_(min=torch.finfo(dtype).min)


def cross_entropy(
    student_real: Tensor, student_log_q: Tensor, labels: Tensor, valid: Tensor, spec: LossSpec
) -> Tensor:
    """CE = logsumexp(z_s) − z_s[label]（T = 1，只在真实词表上）；无效位置的标签先换成 0 以便 gather。"""
    safe = torch.where(valid, labels, 0).unsqueeze(-1)
    if spec.temperature == 1.0:  # T = 1 时 log Q 就是 T=1 的 log 概率，直接复用
        return -student_log_q.gather(-1, safe).squeeze(-1)
    return torch.logsumexp(student_real, dim=-1) - student_real.gather(-1, safe).squeeze(-1)


def objective(kd_sum: Tensor, ce_sum: Tensor, spec: LossSpec) -> Tensor:
    """唯一乘 T² 的地方：α·T²·ΣD + (1−α)·ΣCE（之后再除以 N）。"""
    return spec.alpha * spec.temperature**2 * kd_sum + (1.0 - spec.alpha) * ce_sum


def finish(
    kd_sum: Tensor, ce_sum: Tensor, divisor: int | Tensor, spec: LossSpec, return_parts: bool
) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
    """loss = (α·T²·ΣD + (1−α)·ΣCE) / N；parts 为未加权的平均 D 与平均 CE（已 detach，供日志）。"""
    loss = objective(kd_sum, ce_sum, spec) / divisor
    if not return_parts:
        return loss
    return loss, {"kd": (kd_sum / divisor).detach(), "ce": (ce_sum / divisor).detach()}
