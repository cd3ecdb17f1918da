"""知识蒸馏损失：散度族、精确的约定，以及从不持有整批全词表 logits 的分块损失。

形状图例（见 typing.py）：``b`` 批、``t`` 位置、``d`` 隐藏维度、``v`` 词表列；``*batch`` 表示任意前导维度
（通常是 ``b t``，也可以是展平后的 ``n``）。学生列数记作 ``vs``，教师列数记作 ``vt``。

约定（全部模块共用）
-------------------
* P 是教师分布，Q 是学生分布，都在温度 T 下取：P = softmax(z_t / T)，Q = softmax(z_s / T)。
* 标签已由调用方移位：``labels[..., i]`` 就是位置 i 的 logits 所要预测的 token（本模块不再移位）。
* 规格书的目标函数（Hinton）::

      loss = α · T² · mean_tok D(P ‖ Q)  +  (1 − α) · mean_tok CE(z_s, labels)

  默认 α = 0.5、T = 2.0、D = 前向 KL。T² 只在 ``_objective`` 一处相乘（它补偿 ∂D/∂z_s ∝ 1/T 的缩放，
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

散度表（逐 token，在真实词表上求和；log 空间计算，混合分布用 logaddexp）
---------------------------------------------------------------------------
====================  ======================================================================
名称                  公式
====================  ======================================================================
``forward_kl``        KL(P‖Q) = Σ_v P_v · (log P_v − log Q_v)                （Hinton，规格书默认）
``reverse_kl``        KL(Q‖P) = Σ_v Q_v · (log Q_v − log P_v)                （MiniLLM 等）
``jsd``               M = β·P + (1−β)·Q；JSD_β = β·KL(P‖M) + (1−β)·KL(Q‖M)   （GKD，β 默认 0.5）
                      β→0：JSD_β/β → KL(P‖Q)；β→1：JSD_β/(1−β) → KL(Q‖P)；端点 β=0、β=1
                      按 GKD / TRL 的约定直接取前向 KL 与反向 KL 本身
``skew_forward_kl``   SKL_λ = KL(P ‖ λ·P + (1−λ)·Q)            （DistiLLM，λ 默认 0.1；λ=0 即前向 KL）
``skew_reverse_kl``   SRKL_λ = KL(Q ‖ λ·Q + (1−λ)·P)           （DistiLLM；λ=0 即反向 KL）
``tvd``               TVD = ½ · Σ_v |P_v − Q_v|
====================  ======================================================================

全部非负，且当且仅当 P = Q 时为 0。KL 逐元素计算（见 ``_kl_terms``）::

    KL(A‖B) = Σ_v a·(log a − log b) + Σ_v (b − a)        （第二项精确为 0，用来抵消归一化常数的舍入）

而不是 Σ a·log a − Σ a·log b：后者是两个约 10 的数相减，float32、V = 32768、KL ≈ 5e-5 时相对误差中位数达
10%–20%，KL 更小时还会出现负值；新写法中位数约 3e-6。报告值再夹到 ≥ 0（梯度直通，不截断）。

被屏蔽的列（logit = −∞，概率恰为 0）
-----------------------------------
* 约定 0·log 0 = 0（两侧都是）：a = 0 的项贡献恰为 0。实现上先把这些位置的输入换成安全值（torch.where /
  masked_fill）再做运算、需要时最后再换回，所以前向没有 0·∞，反向也不会经未选分支流回 NaN；数值与梯度都有限。
* 教师的 log P 夹到 dtype 最小值（P 仍恰为 0），学生的 log Q 保持 −∞。于是两侧都为 −∞ 的列
  完全等同于把这些列从词表中删去；只有学生为 −∞ 的列，结果等于 Q 在这些列上为 0 时的公式值。
* 真正无穷的 KL 不做修饰：教师有质量而学生为 −∞（前向 KL、β = 0 的 JSD）时值为 +∞，梯度仍是有限的
  解析式 α·T·(Q − P)/N；反过来学生有质量而教师为 −∞（反向 KL）时，由于教师被夹到最小值，值是一个
  巨大的数（float32 下约 Q_屏蔽·3.4e38，可能溢出为 +∞），不应当拿来训练——请在两侧同时屏蔽。
  混合分布（JSD、偏斜 KL）与 TVD 在这些情形下都有限。

公开函数
--------
``distillation_loss``          普通版：输入完整 logits。
``chunked_distillation_loss``  分块版：输入最终隐藏状态与输出投影（共享嵌入），逐块算 logits、损失与梯度，
                               峰值内存 O(chunk × vocab)；值与梯度等于普通版。
``sparse_distillation_loss``   稀疏教师：教师以 top-k id + 温度 T 下的 log 概率（+ 尾部质量）给出，可缓存。
``teacher_topk``               从教师 logits 生成上述稀疏目标。
``token_divergence``           逐 token 的散度值（不做掩码与平均）。
``temperature_log_softmax``    log softmax(z/T)，填充列为 −∞（概率为 0）。
"""

import dataclasses
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange

from functional_lm.shapes import Bool, Float, Int, Integer, Tensor, typechecked, under_transform

__all__ = [
    "DIVERGENCES",
    "distillation_loss",
    "chunked_distillation_loss",
    "chunked_sparse_distillation_loss",
    "sparse_distillation_loss",
    "teacher_topk",
    "token_divergence",
    "temperature_log_softmax",
]

DIVERGENCES: tuple[str, ...] = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd")

Number = float | int

# ================================================================================================
# 超参数与输入校验
# ================================================================================================


def _check_real(name: str, value: object, low: float, high: float, *, high_open: bool = False) -> float:
    """校验一个实数超参数落在 [low, high]（或 [low, high)）内，返回 float。"""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if not (low <= value < high if high_open else low <= value <= high):
        closing = ")" if high_open else "]"
        raise ValueError(f"{name} must be in [{low}, {high}{closing}, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class _LossSpec:
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
        _check_real("alpha", self.alpha, 0.0, 1.0)
        _check_real("beta", self.beta, 0.0, 1.0)
        _check_real("skew_lambda", self.skew_lambda, 0.0, 1.0, high_open=True)
        if isinstance(self.ignore_index, bool) or not isinstance(self.ignore_index, int):
            raise ValueError(f"ignore_index must be an int, got {self.ignore_index!r}")


def _resolve_real_vocab(student_cols: int, teacher_cols: int | None, real_vocab_size: int | None) -> int:
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


def _valid_mask(labels: Tensor, loss_mask: Tensor | None, ignore_index: int) -> Tensor:
    """有效 token：标签不是 ignore_index，且 loss_mask（若给出）为真。"""
    valid = labels != ignore_index
    return valid if loss_mask is None else valid & loss_mask


def _check_ids(ids: Tensor, valid: Tensor | None, vocab: int, what: str) -> None:
    """eager 下检查 id 落在 [0, vocab)（落进填充列的标签几乎总是 bug）；在 torch.func / compile 中让路。"""
    if under_transform(ids) or (valid is not None and under_transform(valid)):
        return
    bad = (ids < 0) | (ids >= vocab)
    if valid is not None:
        bad = bad & valid
    if bool(bad.any()):
        raise ValueError(f"{what} must lie in [0, {vocab}) (the real vocabulary); got {ids[bad][:8].tolist()}")


def _divisor(valid: Tensor, num_tokens: int | Tensor | None) -> int | Tensor:
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
# 概率与散度（log 空间）
# ================================================================================================


def _compute_dtype(x: Tensor) -> torch.dtype:
    """计算精度：bf16 / fp16 升到 float32，其余保持。"""
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def _student_log_probs(student_real: Tensor, temperature: float) -> Tensor:
    """log Q = log_softmax(z_s / T)，只在真实词表列上（输入已切好）。"""
    scaled = student_real if temperature == 1.0 else student_real / temperature
    return torch.log_softmax(scaled, dim=-1)


@torch.no_grad()
def _teacher_log_probs(
    teacher_logits: Tensor, real_vocab: int, temperature: float, dtype: torch.dtype, *, inplace: bool = False
) -> Tensor:
    """log P = log_softmax(z_t / T)，原地计算以省内存（默认先复制；inplace=True 时直接改写调用方
    自己刚算出的教师 logits）；−∞ 夹到 dtype 最小值：P = exp(最小值) 仍恰为 0，但 log P 有限，
    于是与学生的 −∞ 相减、与之 logaddexp 时前向和反向都不会出现 ∞ − ∞。"""
    view = teacher_logits[..., :real_vocab]
    logp = view if inplace and view.dtype == dtype else view.to(dtype, copy=True)
    if temperature != 1.0:
        logp.div_(temperature)
    logp.sub_(torch.logsumexp(logp, dim=-1, keepdim=True))
    return logp.clamp_(min=torch.finfo(dtype).min)


def _nonnegative(x: Tensor) -> Tensor:
    """值为 max(x, 0)、梯度与 x 相同（直通）：散度数学上 ≥ 0，舍入不应让报告值变负，也不应截断梯度。
    写成 x − min(x, 0).detach()：x = +∞ 时仍是 +∞ − 0 = +∞，不会出现 ∞ − ∞。"""
    return x - x.detach().clamp(max=0.0)


def _mass_correction(a: Tensor, log_b: Tensor, d: Tensor) -> Tensor:
    """Σ_v (b − a)（d = log a − log b，未做掩码），精确算术下为 0；只取值、不建图（A、B 都归一化，真实梯度恒为 0）。

    它抵消第一项 Σ a·d 的舍入误差：
    * 归一化常数（logsumexp）偏 δ 时整行 log a（或 log b）同移，Σ a·d 偏 ≈ δ_b − δ_a，本项偏 ≈ δ_a − δ_b；
    * exp 的舍入使 a、b 与各自的 log 略不一致：d ≤ 1 处把 a − b 写成 b·expm1(d)（数学上相等），两项合起来是
      Σ b·(d·e^d − expm1(d))，只依赖同一个 d，不再受 a、b 各自约 1 ulp 的舍入影响。
    逐元素写成 a − b = b·expm1(min(d, 1)) + max(a − e·b, 0)：d ≤ 1 时后一项为 0（a = b·e^d ≤ e·b）；d > 1 时两项之和
    b·(e − 1) + a − e·b = a − b（此时它不是小量，没有抵消问题）。只用算术、不用布尔掩码挑选（CPU 上掩码慢数倍），
    也避开了 expm1 的上溢。被屏蔽的列：a = 0 时 d = −∞（或极负），expm1 = −1，得 a − b = −b；b = 0 而 a > 0 时
    d = +∞，min(d, 1) = 1，得 a；两侧都为 −∞ 时 d = NaN，先换成 0，得 0。
    """
    b = log_b.detach().exp()
    near = d.detach().nan_to_num(nan=0.0).clamp_(max=1.0).expm1_().mul_(b).sum(dim=-1)  # 原地改写新建的临时张量
    far = torch.add(a.detach(), b, alpha=-math.e).clamp_(min=0.0).sum(dim=-1)
    return -(near + far)


def _kl_terms(a: Tensor, log_a: Tensor, log_b: Tensor) -> Tensor:
    """KL(A‖B) = Σ_v a·(log a − log b) + Σ_v (b − a)，其中 a = exp(log a) 由调用方给出（最后一维是词表）。

    * 逐元素先相减再加权：不让两个约 10 的大数 Σa·log a 与 Σa·log b 相减；求和用 torch.sum（成对/分段累加），
      不用 einsum：后者走 bmm，在 float32 中顺序累加 V 项，KL ≈ 5e-5 时误差大一个数量级以上。
    * 0·log 0 = 0：a = 0 处先用 torch.where 把差换成 0 再乘（0 用同 dtype 的 0 维张量，避开混合类型的慢路径），
      前向没有 0·∞（含 −∞ − (−∞)），反向里减法是线性的、未选分支只收到 0，不会有 NaN 流回；
      a > 0 而 b = 0 时该项为 +∞（KL 真为无穷）。
    * 第二项见 ``_mass_correction``：float32、V = 32768、KL ≈ 5e-5 时把相对误差中位数从约 4e-3 降到约 3e-6。
    梯度就是 Σ a·(log a − log b) 的梯度（第二项不建图）；报告值夹到 ≥ 0（梯度直通）。
    """
    d = log_a - log_b
    correction = _mass_correction(a, log_b, d)  # 先求修正项，之后 d 只剩一个用处、可以尽早释放（省一块词表大小的内存）
    diff = torch.where(a > 0, d, d.new_zeros(()))
    del d
    return _nonnegative((a * diff).sum(dim=-1) + correction)


def _kl(log_a: Tensor, log_b: Tensor) -> Tensor:
    """KL(A‖B)，a = exp(log a)；公式与约定见 ``_kl_terms``。"""
    return _kl_terms(log_a.exp(), log_a, log_b)


def _log_mix(log_a: Tensor, log_b: Tensor, weight: float) -> Tensor:
    """log(w·A + (1−w)·B) = logaddexp(log a + log w, log b + log(1−w))，0 < w < 1。

    调用方保证两个参数中有一个是教师（已夹到有限的最小值），所以不会两侧同为 −∞；
    logaddexp(x, −∞) = x，对 −∞ 一侧的梯度 1/(1 + e^{x−(−∞)}) = 0，有限。"""
    return torch.logaddexp(log_a + math.log(weight), log_b + math.log1p(-weight))


def _forward_kl(log_p: Tensor, log_q: Tensor, spec: _LossSpec) -> Tensor:
    return _kl(log_p, log_q)  # KL(P‖Q)


def _reverse_kl(log_p: Tensor, log_q: Tensor, spec: _LossSpec) -> Tensor:
    return _kl(log_q, log_p)  # KL(Q‖P)


def _jsd(log_p: Tensor, log_q: Tensor, spec: _LossSpec) -> Tensor:
    beta = spec.beta
    if beta == 0.0:  # 端点约定：β=0 → 前向 KL
        return _kl(log_p, log_q)
    if beta == 1.0:  # 端点约定：β=1 → 反向 KL
        return _kl(log_q, log_p)
    log_m = _log_mix(log_p, log_q, beta)  # M = β·P + (1−β)·Q
    return beta * _kl(log_p, log_m) + (1.0 - beta) * _kl(log_q, log_m)


def _skew_forward_kl(log_p: Tensor, log_q: Tensor, spec: _LossSpec) -> Tensor:
    lam = spec.skew_lambda
    return _kl(log_p, log_q if lam == 0.0 else _log_mix(log_p, log_q, lam))  # KL(P ‖ λP + (1−λ)Q)


def _skew_reverse_kl(log_p: Tensor, log_q: Tensor, spec: _LossSpec) -> Tensor:
    lam = spec.skew_lambda
    return _kl(log_q, log_p if lam == 0.0 else _log_mix(log_q, log_p, lam))  # KL(Q ‖ λQ + (1−λ)P)


def _tvd(log_p: Tensor, log_q: Tensor, spec: _LossSpec) -> Tensor:
    return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(dim=-1)  # ½·Σ|P − Q|


_DIVERGENCE_FNS: dict[str, Callable[[Tensor, Tensor, _LossSpec], Tensor]] = {
    "forward_kl": _forward_kl,
    "reverse_kl": _reverse_kl,
    "jsd": _jsd,
    "skew_forward_kl": _skew_forward_kl,
    "skew_reverse_kl": _skew_reverse_kl,
    "tvd": _tvd,
}


def _divergence(log_p: Tensor, log_q: Tensor, spec: _LossSpec) -> Tensor:
    """逐 token 散度 D(P‖Q)：log_p 为教师、log_q 为学生，最后一维是词表。"""
    return _DIVERGENCE_FNS[spec.divergence](log_p, log_q, spec)


# ================================================================================================
# 逐 token 的两项与组合
# ================================================================================================


def _cross_entropy(
    student_real: Tensor, student_log_q: Tensor, labels: Tensor, valid: Tensor, spec: _LossSpec
) -> Tensor:
    """CE = logsumexp(z_s) − z_s[label]（T = 1，只在真实词表上）；无效位置的标签先换成 0 以便 gather。"""
    safe = torch.where(valid, labels, 0).unsqueeze(-1)
    if spec.temperature == 1.0:  # T = 1 时 log Q 就是 T=1 的 log 概率，直接复用
        return -student_log_q.gather(-1, safe).squeeze(-1)
    return torch.logsumexp(student_real, dim=-1) - student_real.gather(-1, safe).squeeze(-1)


def _dense_token_terms(
    student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, valid: Tensor, spec: _LossSpec, real: int
) -> tuple[Tensor, Tensor]:
    """稠密教师：返回逐 token 的 (D, CE)，无效 token 处恰为 0。普通版与分块版共用这一个函数。"""
    dtype = _compute_dtype(student_logits)
    student_real = student_logits[..., :real].to(dtype)  # 同 dtype 时是视图，不复制
    log_q = _student_log_probs(student_real, spec.temperature)
    log_p = _teacher_log_probs(teacher_logits, real, spec.temperature, dtype)
    kd = _divergence(log_p, log_q, spec)
    ce = _cross_entropy(student_real, log_q, labels, valid, spec)
    return torch.where(valid, kd, 0.0), torch.where(valid, ce, 0.0)


def _objective(kd_sum: Tensor, ce_sum: Tensor, spec: _LossSpec) -> Tensor:
    """唯一乘 T² 的地方：α·T²·ΣD + (1−α)·ΣCE（之后再除以 N）。"""
    return spec.alpha * spec.temperature**2 * kd_sum + (1.0 - spec.alpha) * ce_sum


def _finish(
    kd_sum: Tensor, ce_sum: Tensor, divisor: int | Tensor, spec: _LossSpec, return_parts: bool
) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
    """loss = (α·T²·ΣD + (1−α)·ΣCE) / N；parts 为未加权的平均 D 与平均 CE（已 detach，供日志）。"""
    loss = _objective(kd_sum, ce_sum, spec) / divisor
    if not return_parts:
        return loss
    return loss, {"kd": (kd_sum / divisor).detach(), "ce": (ce_sum / divisor).detach()}


# ================================================================================================
# 公开函数：普通版
# ================================================================================================


@typechecked
def temperature_log_softmax(
    logits: Float[Tensor, "*batch v"], *, temperature: Number = 1.0, real_vocab_size: int | None = None
) -> Float[Tensor, "*batch v"]:
    """log softmax(z / T)，只在前 real_vocab_size 列上归一化；填充列为 −∞（概率恰为 0）。"""
    spec = _LossSpec(temperature=temperature)
    cols = logits.shape[-1]
    real = _resolve_real_vocab(cols, None, real_vocab_size)
    scaled = logits.to(_compute_dtype(logits)) / spec.temperature
    if real < cols:
        padded = torch.arange(cols, device=logits.device) >= real
        scaled = scaled.masked_fill(padded, float("-inf"))
    return torch.log_softmax(scaled, dim=-1)


@typechecked
def token_divergence(
    student_logits: Float[Tensor, "*batch vs"],
    teacher_logits: Float[Tensor, "*batch vt"],
    *,
    divergence: str = "forward_kl",
    temperature: Number = 2.0,
    beta: Number = 0.5,
    skew_lambda: Number = 0.1,
    real_vocab_size: int | None = None,
) -> Float[Tensor, "*batch"]:
    """逐 token 的 D(P‖Q)（P = 教师、Q = 学生，温度 T，真实词表上），不乘 T²、不做掩码与平均。"""
    spec = _LossSpec(divergence=divergence, temperature=temperature, beta=beta, skew_lambda=skew_lambda)
    real = _resolve_real_vocab(student_logits.shape[-1], teacher_logits.shape[-1], real_vocab_size)
    dtype = _compute_dtype(student_logits)
    log_q = _student_log_probs(student_logits[..., :real].to(dtype), spec.temperature)
    log_p = _teacher_log_probs(teacher_logits, real, spec.temperature, dtype)
    return _divergence(log_p, log_q, spec)


@typechecked
def distillation_loss(
    student_logits: Float[Tensor, "*batch vs"],
    teacher_logits: Float[Tensor, "*batch vt"],
    labels: Integer[Tensor, "*batch"],
    *,
    alpha: Number = 0.5,
    temperature: Number = 2.0,
    divergence: str = "forward_kl",
    ignore_index: int = -100,
    beta: Number = 0.5,
    skew_lambda: Number = 0.1,
    real_vocab_size: int | None = None,
    loss_mask: Bool[Tensor, "*batch"] | None = None,
    num_tokens: int | Tensor | None = None,
    return_parts: bool = False,
) -> Float[Tensor, ""] | tuple[Float[Tensor, ""], dict[str, Tensor]]:
    """蒸馏损失 α·T²·mean D(P‖Q) + (1−α)·mean CE(z_s, labels)（普通版，输入完整 logits）。

    参数：
        student_logits / teacher_logits：最后一维是词表；列数可以不同（如 151,936 与 152,064），
            此时必须给 ``real_vocab_size``（Qwen2.5 为 151,665），两边都只在前 V 列上取 softmax。
        labels：已移位的目标 token（labels[..., i] 是位置 i 的目标），``ignore_index`` 表示不计入。
        divergence / beta / skew_lambda：散度及其参数，公式见模块文档的表格。
        loss_mask：额外的布尔掩码（False = 不计入），与 ignore_index 取交。
        num_tokens：归一化分母 N；None = 本次调用的有效 token 数。梯度累积时传全局有效 token 数。
        return_parts：为真时返回 ``(loss, {"kd": mean D, "ce": mean CE})``（均已 detach，未乘权重）。
    """
    spec = _LossSpec(divergence, temperature, alpha, beta, skew_lambda, ignore_index)
    real = _resolve_real_vocab(student_logits.shape[-1], teacher_logits.shape[-1], real_vocab_size)
    valid = _valid_mask(labels, loss_mask, ignore_index)
    _check_ids(labels, valid, real, "labels")
    divisor = _divisor(valid, num_tokens)
    kd, ce = _dense_token_terms(student_logits, teacher_logits, labels, valid, spec, real)
    return _finish(kd.sum(), ce.sum(), divisor, spec, return_parts)


# ================================================================================================
# 稀疏教师目标（top-k + 尾部质量）
# ================================================================================================


@typechecked
def teacher_topk(
    teacher_logits: Float[Tensor, "*batch vt"],
    k: int,
    *,
    temperature: Number = 2.0,
    real_vocab_size: int | None = None,
) -> tuple[Int[Tensor, "*batch topk"], Float[Tensor, "*batch topk"], Float[Tensor, "*batch"]]:
    """把教师输出压成可缓存的稀疏目标：(top-k id, 温度 T 下的 log P, 尾部质量 1 − Σ_topk P)。

    注意 log 概率绑定了温度 T：缓存时的 T 必须与训练时相同。尾部质量由非 top-k 列的 logsumexp
    直接求得，而不是 1 − Σ，避免相减抵消。
    """
    spec = _LossSpec(temperature=temperature)
    real = _resolve_real_vocab(teacher_logits.shape[-1], None, real_vocab_size)
    if isinstance(k, bool) or not 1 <= k <= real:
        raise ValueError(f"k must be in [1, {real}] (the real vocabulary), got {k!r}")
    log_p = _teacher_log_probs(teacher_logits, real, spec.temperature, _compute_dtype(teacher_logits))
    top_log_p, ids = log_p.topk(k, dim=-1)
    tail = log_p.scatter(-1, ids, float("-inf")).logsumexp(dim=-1).exp()  # Σ_{v∉topk} P_v
    return ids, top_log_p, tail


def _logsumexp_or_neginf(x: Tensor) -> Tensor:
    """log Σ_v exp(x_v)（最后一维，keepdim）；整行都是 −∞ 时结果为 −∞ 且梯度为 0。

    torch.logsumexp 在整行 −∞ 时反向要算 exp(−∞ − (−∞)) = NaN，所以先把这些行换成 0（有限的安全值，
    masked_fill 与 torch.where 等价）再求，最后把结果换回 −∞：被换掉的位置只收到 0 梯度，乘以有限的 softmax 仍为 0。"""
    empty = torch.isneginf(x).all(dim=-1, keepdim=True)
    lse = x.masked_fill(empty, 0.0).logsumexp(dim=-1, keepdim=True)  # 即 torch.where(empty, 0, x)
    return lse.masked_fill(empty, float("-inf"))


def _coarse_student(log_q: Tensor, ids: Tensor) -> Tensor:
    """学生在"top-k 各一桶 + 其余并成一桶"划分上的 log 概率，形状 (..., k+1)。"""
    top = log_q.gather(-1, ids)
    rest = _logsumexp_or_neginf(log_q.scatter(-1, ids, float("-inf")))  # log Σ_{v∉topk} Q_v（可为 −∞）
    return torch.cat([top, rest], dim=-1)


def _coarse_teacher(top_log_p: Tensor, tail_mass: Tensor | None, dtype: torch.dtype) -> Tensor:
    """教师在同一划分上的 log 概率，与稠密教师同一约定：夹到 ≥ dtype 最小值（P = 0 时 log P 有限）。

    给出的尾部质量按原值取 log（恰为 0 → P_尾 = 0，学生尾部也为 0 时该桶贡献 0·log 0 = 0）；
    缺省时估计为 1 − Σ_topk P，这个差的舍入误差无法区分 0 与很小的质量，沿用夹到 ≥ 最小正规数的做法。
    教师屏蔽了列时请传 ``teacher_topk`` 给出的精确尾部质量。
    """
    finfo = torch.finfo(dtype)
    top_log_p = top_log_p.detach().to(dtype).clamp(min=finfo.min)
    if tail_mass is None:
        tail = (1.0 - top_log_p.exp().sum(dim=-1)).clamp(min=finfo.tiny)
    else:
        tail = tail_mass.detach().to(dtype).clamp(min=0.0)
    log_tail = tail.log().clamp(min=finfo.min)
    return torch.cat([top_log_p, log_tail.unsqueeze(-1)], dim=-1)


@typechecked
def sparse_distillation_loss(
    student_logits: Float[Tensor, "*batch vs"],
    teacher_topk_ids: Integer[Tensor, "*batch topk"],
    teacher_topk_log_probs: Float[Tensor, "*batch topk"],
    labels: Integer[Tensor, "*batch"],
    *,
    teacher_tail_mass: Float[Tensor, "*batch"] | None = None,
    alpha: Number = 0.5,
    temperature: Number = 2.0,
    divergence: str = "forward_kl",
    ignore_index: int = -100,
    beta: Number = 0.5,
    skew_lambda: Number = 0.1,
    real_vocab_size: int | None = None,
    loss_mask: Bool[Tensor, "*batch"] | None = None,
    num_tokens: int | Tensor | None = None,
    return_parts: bool = False,
) -> Float[Tensor, ""] | tuple[Float[Tensor, ""], dict[str, Tensor]]:
    """稀疏教师版蒸馏损失：教师只给 top-k id 与温度 T 下的 log 概率（可选尾部质量）。

    做法：把词表划分成 k 个单 token 桶加一个"尾部"桶，在这 k+1 个桶上比较教师与学生
    （学生尾部 = log Σ_{v∉topk} Q_v，精确求得）。由数据处理不等式，这个粗粒度散度 ≤ 稠密散度，
    k 增大（划分变细）时单调逼近，k = V 时两者相等（此时没有尾部桶）。其余约定与 ``distillation_loss`` 相同；
    CE 项用学生的完整 logits。
    """
    spec = _LossSpec(divergence, temperature, alpha, beta, skew_lambda, ignore_index)
    real = _resolve_real_vocab(student_logits.shape[-1], None, real_vocab_size)
    _check_topk(teacher_topk_ids, real)
    valid = _valid_mask(labels, loss_mask, ignore_index)
    _check_ids(labels, valid, real, "labels")
    sparse = (teacher_topk_ids, teacher_topk_log_probs, teacher_tail_mass)
    kd, ce = _sparse_token_terms(student_logits, sparse, labels, valid, spec, real)
    return _finish(kd.sum(), ce.sum(), _divisor(valid, num_tokens), spec, return_parts)


def _check_topk(ids: Tensor, real: int) -> None:
    """top-k 的 k 不能超过真实词表，id 必须落在真实词表内。"""
    k = ids.shape[-1]
    if k > real:
        raise ValueError(f"teacher top-k has k={k} entries but the real vocabulary has only {real}")
    _check_ids(ids, None, real, "teacher_topk_ids")


def _sparse_token_terms(
    student_logits: Tensor, sparse: tuple[Tensor, Tensor, Tensor | None], labels: Tensor, valid: Tensor,
    spec: _LossSpec, real: int,
) -> tuple[Tensor, Tensor]:
    """稀疏教师：逐 token 的 (D, CE)，无效 token 处恰为 0。普通版与分块版共用。

    sparse = (top-k id, 温度 T 下的 log P, 尾部质量或 None)；划分为 k 个单 token 桶 + 尾部桶（k = V 时无尾部）。
    """
    ids, top_log_p, tail_mass = sparse
    dtype = _compute_dtype(student_logits)
    student_real = student_logits[..., :real].to(dtype)
    log_q = _student_log_probs(student_real, spec.temperature)
    ids = ids.long()
    if ids.shape[-1] == real:  # 没有尾部：两边都是完整分布（只是列的顺序按 ids 重排）
        coarse_q = log_q.gather(-1, ids)
        coarse_p = top_log_p.detach().to(dtype).clamp(min=torch.finfo(dtype).min)
    else:
        coarse_q = _coarse_student(log_q, ids)
        coarse_p = _coarse_teacher(top_log_p, tail_mass, dtype)
    kd = torch.where(valid, _divergence(coarse_p, coarse_q, spec), 0.0)
    ce = torch.where(valid, _cross_entropy(student_real, log_q, labels, valid, spec), 0.0)
    return kd, ce


# ================================================================================================
# 分块损失：从隐藏状态出发，逐块计算 logits、损失和梯度
# ================================================================================================

TeacherChunkFn = Callable[[slice], Tensor]


def _teacher_chunk_fn(
    teacher_hidden: Tensor | None, teacher_weight: Tensor | None, teacher_logits_fn: TeacherChunkFn | None
) -> tuple[TeacherChunkFn, bool]:
    """把两种教师给法统一成"行切片 → 该块教师 logits (c, vt)"的函数；第二个返回值表示
    这块 logits 是否由本模块新算出（是则可以原地改写，省一次复制）。"""
    has_pair = teacher_hidden is not None or teacher_weight is not None
    if has_pair == (teacher_logits_fn is not None):
        raise ValueError(
            "give the teacher either as teacher_hidden + teacher_weight or as teacher_logits_fn (exactly one)"
        )
    if teacher_logits_fn is not None:
        return teacher_logits_fn, False  # 调用方可能返回其缓存的视图：不能原地改写
    if teacher_hidden is None or teacher_weight is None:
        raise ValueError("teacher_hidden and teacher_weight must be given together")
    flat = rearrange(teacher_hidden, "... dt -> (...) dt")
    return (lambda rows: F.linear(flat[rows], teacher_weight)), True


def _row_chunks(num_rows: int, chunk_size: int) -> list[slice]:
    """把 [0, n) 切成长度 chunk_size 的连续行段（最后一段可以更短）。"""
    return [slice(start, min(start + chunk_size, num_rows)) for start in range(0, num_rows, chunk_size)]


def _chunk_rows(valid: Tensor, chunk_size: int, compact: bool) -> list[slice | Tensor]:
    """分块的行。compact 且有不计损失的行时只取计损失的行（按原顺序的下标张量，每块 chunk_size 行），
    否则是连续的行段。不计损失的行（提示、填充、被遮的标签）对损失与梯度的贡献恰为 0，跳过它们就省下
    它们的 (行 × 词表) 计算——在线蒸馏的批里这是一半的行。"""
    if compact and not bool(valid.all()):
        kept = valid.nonzero().squeeze(1)
        return [kept[part] for part in _row_chunks(kept.numel(), chunk_size)]
    return _row_chunks(valid.numel(), chunk_size)


def _num_rows(rows: slice | Tensor) -> int:
    return rows.stop - rows.start if isinstance(rows, slice) else rows.numel()


def _chunk_teacher_logits(teacher_fn: TeacherChunkFn, rows: slice | Tensor) -> Tensor:
    """取一块教师 logits（不求梯度），并检查行数。"""
    with torch.no_grad():
        logits = teacher_fn(rows)
    expected = _num_rows(rows)
    if logits.ndim != 2 or logits.shape[0] != expected:
        where = f"rows {rows.start}:{rows.stop}" if isinstance(rows, slice) else f"{expected} rows"
        raise ValueError(f"teacher logits for {where} must have shape ({expected}, vt), got {tuple(logits.shape)}")
    return logits


@dataclass(frozen=True)
class _ChunkContext:
    """分块计算中各块共用的只读量。"""

    weight: Tensor  # 学生输出投影 (vs, d)
    teacher_fn: TeacherChunkFn | None  # 行段 → 教师 logits (c, vt)；稀疏教师时为 None
    teacher_owned: bool  # 教师 logits 是否为本模块新算出（可原地改写）
    spec: _LossSpec
    real_vocab_size: int | None
    divisor: int | Tensor  # 归一化分母 N
    need_grad: bool
    compiled: bool = False  # 前向 KL 的逐元素部分是否走 torch.compile 融合的版本
    sparse_fn: Callable[[slice], tuple[Tensor, Tensor, Tensor | None]] | None = None  # 行段 → (top-k id, log P, 尾部)
    compact: bool = False  # 只算计损失的行（教师一侧接受下标张量时：教师隐藏状态或稀疏目标，见 _chunk_rows）


def _chunk_logits(ctx: _ChunkContext, h_chunk: Tensor, rows: slice | Tensor) -> tuple[Tensor, Tensor, int]:
    """一块的学生 logits z = h_c·Wᵀ（不建图）、教师 logits，以及真实词表大小 V。"""
    with torch.no_grad():
        student = F.linear(h_chunk, ctx.weight)
    teacher = _chunk_teacher_logits(ctx.teacher_fn, rows)
    real = _resolve_real_vocab(ctx.weight.shape[0], teacher.shape[-1], ctx.real_vocab_size)
    return student, teacher, real


_CPU_BLOCK_ELEMS = 1 << 18  # CPU 上每个行块的元素预算（float32 1 MiB）
_ACCEL_SUB_BLOCKS = 16  # 其他设备上一块至多再切成 16 个行块


def _sub_blocks(x: Tensor) -> list[slice]:
    """快速路径里逐行归约（KL、logsumexp）用的行块划分，使临时张量远小于一块 (c × V) 缓冲区。

    CPU：每块 ≤ 2^18 个元素（V = 151,665 时 1 行）——临时张量留在缓存里，而且 glibc 的堆能反复复用这些小块，
    不会被撑大（基准尺寸下实测 c/16 行的块使峰值 RSS 多约 120 MiB）。
    GPU 等：至多 16 块（每块 ⌈c/16⌉ 行），控制核启动次数；缓存分配器没有上面的问题。"""
    rows, cols = x.shape[0], x.shape[-1]
    per_block = max(1, _CPU_BLOCK_ELEMS // cols) if x.device.type == "cpu" else -(-rows // _ACCEL_SUB_BLOCKS)
    return _row_chunks(rows, per_block)


def _blocked_logsumexp(x: Tensor) -> Tensor:
    """logsumexp(x, dim=-1, keepdim=True)，按行块求：torch.logsumexp 内部要一个与输入一样大的临时张量
    (x − max)，分块后它只有一个行块大，快速路径的峰值因此保持在 3 个 (c × V) 缓冲区。"""
    out = x.new_empty(x.shape[0], 1)
    for rows in _sub_blocks(x):
        torch.logsumexp(x[rows], dim=-1, keepdim=True, out=out[rows])
    return out


@torch.no_grad()
def _kl_rows_then_probs_(log_p: Tensor, log_q: Tensor) -> Tensor:
    """按行块求 KL(P‖Q)（公式同 ``_kl_terms``），并把 log_p 原地换成 p = exp(log p)。

    每块的 p 只求一次 exp：先用它算 KL，再写回 log_p 的位置；临时张量只有一个行块大（见 ``_sub_blocks``），
    因此不会在已有的 (c × V) 缓冲区之外再多占一整块。"""
    kd = log_p.new_empty(log_p.shape[0])  # 预先分配结果：循环里不留小张量，免得把 glibc 堆切碎
    for rows in _sub_blocks(log_p):
        block = log_p[rows]
        p = block.exp()
        kd[rows] = _kl_terms(p, block, log_q[rows])
        block.copy_(p)
    return kd


@torch.no_grad()
def _reverse_kl_rows_then_grad_(log_p: Tensor, log_q: Tensor) -> Tensor:
    """按行块求 KL(Q‖P)（公式同 ``_kl_terms``），并把 log_q 原地换成 Q ⊙ (log Q − log P − KL)。

    这正是反向 KL 对学生 logits 的梯度（乘 1/T 之前）：∂KL(Q‖P)/∂z_j = (q_j/T)·(d_j − Σ_v q_v d_v)，
    d = log Q − log P（Σ_v q_v ∂log q_v/∂z_j = Σ_v q_v(δ_vj − q_j)/T = 0）。Σ_v q_v d_v 用已经算好的 KL 代入
    （二者只差 ``_mass_correction`` 的舍入级修正）。临时张量只有一个行块大，log_p 的缓冲区被当作 d 的草稿。"""
    kd = log_q.new_empty(log_q.shape[0])
    for rows in _sub_blocks(log_q):
        lq, d = log_q[rows], log_p[rows]
        q = lq.exp()
        kd[rows] = _kl_terms(q, lq, d)
        d.sub_(lq).neg_()  # d = log Q − log P（改写 log P 的缓冲区）
        # 学生被屏蔽的列（z = −∞）：q = 0、d = −∞，0·(−∞) = NaN 换成 0（那一列的梯度本来就是 0）
        lq.copy_(q.mul_(d.sub_(kd[rows].unsqueeze(-1))).nan_to_num_(nan=0.0, posinf=math.inf, neginf=-math.inf))
    return kd


@torch.no_grad()
def _fused_kl_chunk(
    ctx: _ChunkContext, h_chunk: Tensor, rows: slice | Tensor, labels: Tensor, valid: Tensor
) -> tuple[Tensor, Tensor, Tensor, int]:
    """前向 KL（规格书默认）与反向 KL（在线蒸馏默认）的快速路径：不建 autograd 图，直接写出解析梯度，
    原地复用缓冲区，并尽早释放不再需要的块张量（峰值约 3 个 (c × vocab) 张量）。

        前向：∂[α·T²·KL(P‖Q)/N]/∂z_s = α·T·(Q − P)/N           （Q = softmax(z_s/T)，P = softmax(z_t/T)）
        反向：∂[α·T²·KL(Q‖P)/N]/∂z_s = α·T·Q ⊙ (log Q − log P − KL(Q‖P))/N
        ∂[(1−α)·CE/N]/∂z_s           = (1−α)·(softmax(z_s) − onehot(label))/N

    数值与 ``_dense_token_terms`` 的公式逐项相同（KL 用同一个 ``_kl_terms``，CE = lse(z) − z[label]）。
    缓冲区顺序：学生 z、教师 log P、log Q 三块；KL 按行块求值的同时把其中一块原地换成梯度。
    返回 (D, CE, ∂loss/∂z_s 的真实词表列部分, V)。
    """
    spec, temperature = ctx.spec, ctx.spec.temperature
    student, teacher, real = _chunk_logits(ctx, h_chunk, rows)
    if ctx.compiled and spec.divergence == "forward_kl":
        kd, ce, grad = _compiled_forward_kl_terms()(
            student[:, :real], teacher[:, :real], labels, valid, temperature, spec.alpha, ctx.divisor
        )
        return kd, ce, grad, real
    dtype = _compute_dtype(student)
    log_p = _teacher_log_probs(teacher, real, temperature, dtype, inplace=ctx.teacher_owned)
    del teacher
    z = student[:, :real].to(dtype)
    del student
    log_q = z / temperature
    lse_t = _blocked_logsumexp(log_q)
    log_q.sub_(lse_t)  # log Q = z/T − logsumexp(z/T)
    scale = valid.to(dtype) / ctx.divisor  # 有效 token 为 1/N，其余为 0
    weight = (spec.alpha * temperature * scale).unsqueeze(-1)
    if spec.divergence == "reverse_kl":
        kd = _reverse_kl_rows_then_grad_(log_p, log_q)  # 此后 log_q 的缓冲区里是 Q ⊙ (d − KL)
        grad = log_q.mul_(weight)  # α·T·Q ⊙ (d − KL)/N
    else:
        kd = _kl_rows_then_probs_(log_p, log_q)  # KL(P‖Q)；此后 log_p 的缓冲区里是 P
        grad = log_q.exp_().sub_(log_p).mul_(weight)  # α·T·(Q − P)/N
    del log_p, log_q
    lse_1 = lse_t if temperature == 1.0 else _blocked_logsumexp(z)
    ce = _cross_entropy_and_grad_(grad, z, lse_1, labels, valid, (1.0 - spec.alpha) * scale if spec.alpha < 1.0 else None)
    return torch.where(valid, kd, 0.0), torch.where(valid, ce, 0.0), grad, real


@torch.no_grad()
def _cross_entropy_and_grad_(
    grad: Tensor, z: Tensor, lse_1: Tensor, labels: Tensor, valid: Tensor, w_ce: Tensor | None
) -> Tensor:
    """CE = lse(z) − z[label]（T = 1），并在给了权重 w_ce（= (1−α)/N，α < 1 时）时把 w_ce·(softmax(z) − onehot)
    加进 grad（z 被原地改写）。"""
    safe = torch.where(valid, labels, 0).unsqueeze(-1)
    ce = (lse_1 - z.gather(-1, safe)).squeeze(-1)
    if w_ce is not None:
        w = w_ce.unsqueeze(-1)
        grad.add_(z.sub_(lse_1).exp_().mul_(w))  # + (1−α)·softmax(z)/N（z 不再需要，原地改写）
        grad.scatter_add_(-1, safe, -w)  # − (1−α)·onehot/N
    return ce


def _forward_kl_terms(
    student: Tensor, teacher: Tensor, labels: Tensor, valid: Tensor, temperature: float, alpha: float,
    divisor: int | Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """前向 KL 快速路径的同一组公式，写成无原地操作的纯函数，交给 torch.compile 融合成少数几趟遍历。

    输入为真实词表列上的学生 / 教师 logits (c, V)；返回逐 token 的 D、CE（无效 token 为 0）与
    ∂loss/∂z_s = α·T·(Q − P)/N + (1−α)·(softmax(z_s) − onehot)/N。
    """
    dtype = _compute_dtype(student)
    z, t = student.to(dtype), teacher.to(dtype)
    log_p = torch.log_softmax(t / temperature, dim=-1).clamp(min=torch.finfo(dtype).min)
    p = log_p.exp()
    log_q = torch.log_softmax(z / temperature, dim=-1)
    q = log_q.exp()
    kd = _kl_terms(p, log_p, log_q)  # KL(P‖Q)，与其他路径同一个公式
    lse_1 = torch.logsumexp(z, dim=-1, keepdim=True)
    safe = torch.where(valid, labels, 0).unsqueeze(-1)
    ce = (lse_1 - z.gather(-1, safe)).squeeze(-1)  # CE = lse(z) − z[label]
    scale = (valid.to(dtype) / divisor).unsqueeze(-1)  # 有效 token 为 1/N，其余为 0
    grad = (alpha * temperature) * scale * (q - p) + (1.0 - alpha) * scale * (z - lse_1).exp()
    grad = grad.scatter_add(-1, safe, -(1.0 - alpha) * scale)
    return torch.where(valid, kd, 0.0), torch.where(valid, ce, 0.0), grad


_FUSED = ("forward_kl", "reverse_kl")  # 有解析梯度快速路径的散度（_fused_kl_chunk）


@functools.lru_cache(maxsize=None)
def _compiled_forward_kl_terms():
    """编译过的 ``_forward_kl_terms``（进程内只编译一次；最后一块更短时再特化一次）。"""
    return torch.compile(_forward_kl_terms, fullgraph=True)


def _generic_chunk(
    ctx: _ChunkContext, h_chunk: Tensor, rows: slice | Tensor, labels: Tensor, valid: Tensor
) -> tuple[Tensor, Tensor, Tensor | None, int]:
    """任意散度：在这一块上建小图，用 autograd 求 ∂loss/∂z_s（只对真实词表列）。"""
    student, teacher, real = _chunk_logits(ctx, h_chunk, rows)
    leaf = student[:, :real].detach().requires_grad_(ctx.need_grad)
    with torch.enable_grad():
        kd, ce = _dense_token_terms(leaf, teacher, labels, valid, ctx.spec, real)
        if not ctx.need_grad:
            return kd.detach(), ce.detach(), None, real
        (grad,) = torch.autograd.grad(_objective(kd.sum(), ce.sum(), ctx.spec) / ctx.divisor, leaf)
    return kd.detach(), ce.detach(), grad, real


def _sparse_chunk(
    ctx: _ChunkContext, h_chunk: Tensor, rows: slice | Tensor, labels: Tensor, valid: Tensor
) -> tuple[Tensor, Tensor, Tensor | None, int]:
    """稀疏教师的一块：学生 logits z = h_c·Wᵀ（不建图），在这一块上用 autograd 求 ∂loss/∂z（只对真实词表列）。"""
    with torch.no_grad():
        student = F.linear(h_chunk, ctx.weight)
    real = _resolve_real_vocab(ctx.weight.shape[0], None, ctx.real_vocab_size)
    sparse = ctx.sparse_fn(rows)
    leaf = student[:, :real].detach().requires_grad_(ctx.need_grad)
    with torch.enable_grad():
        kd, ce = _sparse_token_terms(leaf, sparse, labels, valid, ctx.spec, real)
        if not ctx.need_grad:
            return kd.detach(), ce.detach(), None, real
        (grad,) = torch.autograd.grad(_objective(kd.sum(), ce.sum(), ctx.spec) / ctx.divisor, leaf)
    return kd.detach(), ce.detach(), grad, real


class _ChunkedDistillation(torch.autograd.Function):
    """前向时逐块完成"logits → 损失 → ∂损失/∂logits → ∂h、∂W"，反向只把存好的梯度乘上上游梯度。

    每块：z = h_c·Wᵀ（c × vs），ℓ_c = (α·T²·Σ_c D + (1−α)·Σ_c CE)/N，g = ∂ℓ_c/∂z（前向与反向 KL 用解析式，
    其余散度由同一个 ``_dense_token_terms`` 经 autograd 求得），然后 ∂h_c = g·W[:V]，∂W[:V] += gᵀ·h_c
    （填充行 W[V:] 的梯度恒为 0）。任意时刻只存在一块的 (c × vocab) 张量；总损失 = Σ_c ℓ_c。
    教师一侧接受下标时，块只由计损失的行组成（见 _chunk_rows），不计损失的行的 ∂h 为 0。
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, valid, chunk_ctx, chunk_size):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        chunk_ctx = dataclasses.replace(chunk_ctx, need_grad=need_h or need_w)
        fused = chunk_ctx.spec.divergence in _FUSED and chunk_ctx.need_grad and chunk_ctx.sparse_fn is None
        chunk_fn = _sparse_chunk if chunk_ctx.sparse_fn is not None else _fused_kl_chunk if fused else _generic_chunk
        acc_dtype = _compute_dtype(weight)  # ∂W 在至少 float32 中累加
        grad_hidden = torch.zeros_like(hidden) if need_h else None
        grad_weight = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device) if need_w else None
        kd_total = ce_total = torch.zeros((), dtype=acc_dtype, device=hidden.device)
        for rows in _chunk_rows(valid, chunk_size, chunk_ctx.compact):
            h_chunk = hidden[rows]
            kd, ce, grad, real = chunk_fn(chunk_ctx, h_chunk, rows, labels[rows], valid[rows])
            kd_total, ce_total = kd_total + kd.sum(), ce_total + ce.sum()
            if need_h and isinstance(rows, slice):
                torch.mm(grad.to(weight.dtype), weight[:real], out=grad_hidden[rows])  # ∂h_c = g·W[:V]
            elif need_h:  # 只算了计损失的行：其余行的 ∂h 保持 0
                grad_hidden.index_copy_(0, rows, grad.to(weight.dtype) @ weight[:real])
            if need_w:
                grad_weight[:real].addmm_(grad.to(acc_dtype).T, h_chunk.to(acc_dtype))  # ∂W[:V] += gᵀ·h_c
            del grad
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        divisor = chunk_ctx.divisor
        loss = _objective(kd_total, ce_total, chunk_ctx.spec) / divisor
        kd_mean, ce_mean = kd_total / divisor, ce_total / divisor
        ctx.mark_non_differentiable(kd_mean, ce_mean)
        return loss, kd_mean, ce_mean

    @staticmethod
    def backward(ctx, grad_loss, _grad_kd, _grad_ce):
        grad_hidden, grad_weight = ctx.saved_tensors
        if not torch.equal(grad_loss, torch.ones_like(grad_loss)):  # 上游梯度为 1（最常见）时免去一次复制
            grad_hidden = None if grad_hidden is None else grad_hidden * grad_loss.to(grad_hidden.dtype)
            grad_weight = None if grad_weight is None else grad_weight * grad_loss.to(grad_weight.dtype)
        if grad_weight is not None:
            grad_weight = grad_weight.to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None


@typechecked
def chunked_distillation_loss(
    student_hidden: Float[Tensor, "*batch d"],
    student_weight: Float[Tensor, "vs d"],
    labels: Integer[Tensor, "*batch"],
    *,
    teacher_hidden: Float[Tensor, "*batch dt"] | None = None,
    teacher_weight: Float[Tensor, "vt dt"] | None = None,
    teacher_logits_fn: TeacherChunkFn | None = None,
    chunk_size: int = 256,
    alpha: Number = 0.5,
    temperature: Number = 2.0,
    divergence: str = "forward_kl",
    ignore_index: int = -100,
    beta: Number = 0.5,
    skew_lambda: Number = 0.1,
    real_vocab_size: int | None = None,
    loss_mask: Bool[Tensor, "*batch"] | None = None,
    num_tokens: int | Tensor | None = None,
    return_parts: bool = False,
    compile: bool = False,
) -> Float[Tensor, ""] | tuple[Float[Tensor, ""], dict[str, Tensor]]:
    """分块蒸馏损失：值与梯度等于 ``distillation_loss(h·Wᵀ, 教师 logits, labels, ...)``，
    但任何时刻只存在 chunk_size 个 token 的 (token × vocab) 张量。

    参数：
        student_hidden：学生最终（norm 之后）的隐藏状态；student_weight：输出投影 (vs, d)，
            共享嵌入时就传 ``params["model.embed_tokens.weight"]`` 本身，梯度会与嵌入查表的梯度相加。
        教师二选一：``teacher_hidden`` + ``teacher_weight``（教师 logits = h_t·W_tᵀ），或
            ``teacher_logits_fn(rows: slice) -> (c, vt)``，rows 是展平后 token 轴上的行段。
        chunk_size：每块的 token 数（不必整除 token 总数）。其余参数同 ``distillation_loss``。
        compile：前向 KL 时把每块的逐元素计算（两个 log-softmax、KL、CE 与解析梯度）交给 torch.compile
            融合（首次调用有编译开销；CPU 上每块快数倍）；其他散度不受影响。

    梯度在前向中逐块算好（同 Liger 的 fused linear cross-entropy），反向只做缩放；因此不支持二阶导，
    也不支持 torch.func 变换（请用普通版）。
    """
    spec = _LossSpec(divergence, temperature, alpha, beta, skew_lambda, ignore_index)
    _check_chunk_size(chunk_size)
    teacher_fn, teacher_owned = _teacher_chunk_fn(teacher_hidden, teacher_weight, teacher_logits_fn)
    if teacher_weight is not None:
        _resolve_real_vocab(student_weight.shape[0], teacher_weight.shape[0], real_vocab_size)
    return _run_chunked(
        student_hidden, student_weight, labels, loss_mask, spec, chunk_size,
        label_vocab=real_vocab_size or student_weight.shape[0], real_vocab_size=real_vocab_size,
        num_tokens=num_tokens, return_parts=return_parts,
        teacher_fn=teacher_fn, teacher_owned=teacher_owned, compiled=compile,
    )


def _check_chunk_size(chunk_size: int) -> None:
    """分块的 token 数必须是正整数。"""
    if isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")


def _run_chunked(
    student_hidden: Tensor, student_weight: Tensor, labels: Tensor, loss_mask: Tensor | None, spec: _LossSpec,
    chunk_size: int, *, label_vocab: int, real_vocab_size: int | None, num_tokens: int | Tensor | None,
    return_parts: bool, teacher_fn: TeacherChunkFn | None = None, teacher_owned: bool = False,
    compiled: bool = False, sparse_fn: Callable | None = None,
) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
    """两种分块损失（稠密教师给 teacher_fn，稀疏教师给 sparse_fn）共用的一段：展平 token 轴、有效掩码、
    核对标签、归一化分母 N，再交给 _ChunkedDistillation。"""
    hidden = rearrange(student_hidden, "... d -> (...) d")
    flat_labels = rearrange(labels, "... -> (...)")
    valid = _valid_mask(flat_labels, None if loss_mask is None else rearrange(loss_mask, "... -> (...)"), spec.ignore_index)
    _check_ids(flat_labels, valid, label_vocab, "labels")
    chunk_ctx = _ChunkContext(
        student_weight, teacher_fn, teacher_owned, spec, real_vocab_size, _divisor(valid, num_tokens), True,
        compiled=compiled, sparse_fn=sparse_fn, compact=teacher_owned or sparse_fn is not None,
    )
    loss, kd_mean, ce_mean = _ChunkedDistillation.apply(hidden, student_weight, flat_labels, valid, chunk_ctx, chunk_size)
    if not return_parts:
        return loss
    return loss, {"kd": kd_mean, "ce": ce_mean}


@typechecked
def chunked_sparse_distillation_loss(
    student_hidden: Float[Tensor, "*batch d"],
    student_weight: Float[Tensor, "vs d"],
    labels: Integer[Tensor, "*batch"],
    teacher_topk_ids: Integer[Tensor, "*batch topk"],
    teacher_topk_log_probs: Float[Tensor, "*batch topk"],
    *,
    teacher_tail_mass: Float[Tensor, "*batch"] | None = None,
    chunk_size: int = 256,
    alpha: Number = 0.5,
    temperature: Number = 2.0,
    divergence: str = "forward_kl",
    ignore_index: int = -100,
    beta: Number = 0.5,
    skew_lambda: Number = 0.1,
    real_vocab_size: int | None = None,
    loss_mask: Bool[Tensor, "*batch"] | None = None,
    num_tokens: int | Tensor | None = None,
    return_parts: bool = False,
) -> Float[Tensor, ""] | tuple[Float[Tensor, ""], dict[str, Tensor]]:
    """分块的稀疏教师损失：值与梯度等于 ``sparse_distillation_loss(h·Wᵀ, ids, log P, labels, ...)``，
    但任何时刻只存在 chunk_size 个 token 的学生 logits（教师缓存与在线 top-k 蒸馏用它）。

    教师只给 top-k id、温度 T 下的 log 概率与尾部质量（``teacher_topk`` 或 ``TeacherCache.targets`` 的结果）；
    梯度在前向中逐块算好，反向只做缩放（与 ``chunked_distillation_loss`` 同一个机制）。
    """
    spec = _LossSpec(divergence, temperature, alpha, beta, skew_lambda, ignore_index)
    _check_chunk_size(chunk_size)
    real = _resolve_real_vocab(student_weight.shape[0], None, real_vocab_size)
    ids = rearrange(teacher_topk_ids, "... k -> (...) k")
    _check_topk(ids, real)
    log_p = rearrange(teacher_topk_log_probs, "... k -> (...) k")
    tail = None if teacher_tail_mass is None else rearrange(teacher_tail_mass, "... -> (...)")
    sparse_fn = lambda rows: (ids[rows], log_p[rows], None if tail is None else tail[rows])  # noqa: E731
    return _run_chunked(
        student_hidden, student_weight, labels, loss_mask, spec, chunk_size, label_vocab=real,
        real_vocab_size=real_vocab_size, num_tokens=num_tokens, return_parts=return_parts, sparse_fn=sparse_fn,
    )
