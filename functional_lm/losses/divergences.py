"""稠密散度族与普通版蒸馏损失：输入完整的师生 logits（``distillation_loss``、``token_divergence``、
``temperature_log_softmax``）。形状图例与全部约定（P、Q、T²、掩码、归一化、真实词表、精度）见 ``common``。

逐 token 的散度（``divergence_from_log_probs``）、KL 的逐元素写法（``kl_terms``）与稠密教师的两项
（``dense_token_terms``）也供稀疏版与分块版使用。

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

全部非负，且当且仅当 P = Q 时为 0。KL 逐元素计算（见 ``kl_terms``）::

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
"""

import math
from collections.abc import Callable

import torch

from functional_lm.losses.common import (
    LossSpec,
    Number,
    check_ids,
    compute_dtype,
    cross_entropy,
    finish,
    resolve_real_vocab,
    student_log_probs,
    teacher_log_probs,
    token_divisor,
    valid_mask,
)
from functional_lm.shapes import Bool, Float, Integer, Tensor, typechecked

# ================================================================================================
# 散度（log 空间）
# ================================================================================================


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


def kl_terms(a: Tensor, log_a: Tensor, log_b: Tensor) -> Tensor:
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
    """KL(A‖B)，a = exp(log a)；公式与约定见 ``kl_terms``。"""
    return kl_terms(log_a.exp(), log_a, log_b)


def _log_mix(log_a: Tensor, log_b: Tensor, weight: float) -> Tensor:
    """log(w·A + (1−w)·B) = logaddexp(log a + log w, log b + log(1−w))，0 < w < 1。

    调用方保证两个参数中有一个是教师（已夹到有限的最小值），所以不会两侧同为 −∞；
    logaddexp(x, −∞) = x，对 −∞ 一侧的梯度 1/(1 + e^{x−(−∞)}) = 0，有限。"""
    return torch.logaddexp(log_a + math.log(weight), log_b + math.log1p(-weight))


def _forward_kl(log_p: Tensor, log_q: Tensor, spec: LossSpec) -> Tensor:
    return _kl(log_p, log_q)  # KL(P‖Q)


def _reverse_kl(log_p: Tensor, log_q: Tensor, spec: LossSpec) -> Tensor:
    return _kl(log_q, log_p)  # KL(Q‖P)


def _jsd(log_p: Tensor, log_q: Tensor, spec: LossSpec) -> Tensor:
    beta = spec.beta
    if beta == 0.0:  # 端点约定：β=0 → 前向 KL
        return _kl(log_p, log_q)
    if beta == 1.0:  # 端点约定：β=1 → 反向 KL
        return _kl(log_q, log_p)
    log_m = _log_mix(log_p, log_q, beta)  # M = β·P + (1−β)·Q
    return beta * _kl(log_p, log_m) + (1.0 - beta) * _kl(log_q, log_m)


def _skew_forward_kl(log_p: Tensor, log_q: Tensor, spec: LossSpec) -> Tensor:
    lam = spec.skew_lambda
    return _kl(log_p, log_q if lam == 0.0 else _log_mix(log_p, log_q, lam))  # KL(P ‖ λP + (1−λ)Q)


def _skew_reverse_kl(log_p: Tensor, log_q: Tensor, spec: LossSpec) -> Tensor:
    lam = spec.skew_lambda
    return _kl(log_q, log_p if lam == 0.0 else _log_mix(log_q, log_p, lam))  # KL(Q ‖ λQ + (1−λ)P)


def _tvd(log_p: Tensor, log_q: Tensor, spec: LossSpec) -> Tensor:
    return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(dim=-1)  # ½·Σ|P − Q|


_DIVERGENCE_FNS: dict[str, Callable[[Tensor, Tensor, LossSpec], Tensor]] = {
    "forward_kl": _forward_kl,
    "reverse_kl": _reverse_kl,
    "jsd": _jsd,
    "skew_forward_kl": _skew_forward_kl,
    "skew_reverse_kl": _skew_reverse_kl,
    "tvd": _tvd,
}


def divergence_from_log_probs(log_p: Tensor, log_q: Tensor, spec: LossSpec) -> Tensor:
    """逐 token 散度 D(P‖Q)：log_p 为教师、log_q 为学生，最后一维是词表。"""
    return _DIVERGENCE_FNS[spec.divergence](log_p, log_q, spec)


# ================================================================================================
# 稠密教师：逐 token 的两项
# ================================================================================================


def dense_token_terms(
    student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, valid: Tensor, spec: LossSpec, real: int
) -> tuple[Tensor, Tensor]:
    """稠密教师：返回逐 token 的 (D, CE)，无效 token 处恰为 0。普通版与分块版共用这一个函数。"""
    dtype = compute_dtype(student_logits)
    student_real = student_logits[..., :real].to(dtype)  # 同 dtype 时是视图，不复制
    log_q = student_log_probs(student_real, spec.temperature)
    log_p = teacher_log_probs(teacher_logits, real, spec.temperature, dtype)
    kd = divergence_from_log_probs(log_p, log_q, spec)
    ce = cross_entropy(student_real, log_q, labels, valid, spec)
    return torch.where(valid, kd, 0.0), torch.where(valid, ce, 0.0)


# ================================================================================================
# 公开函数：普通版
# ================================================================================================


@typechecked
def temperature_log_softmax(
    logits: Float[Tensor, "*batch v"], *, temperature: Number = 1.0, real_vocab_size: int | None = None
) -> Float[Tensor, "*batch v"]:
    """log softmax(z / T)，只在前 real_vocab_size 列上归一化；填充列为 −∞（概率恰为 0）。"""
    spec = LossSpec(temperature=temperature)
    cols = logits.shape[-1]
    real = resolve_real_vocab(cols, None, real_vocab_size)
    scaled = logits.to(compute_dtype(logits)) / spec.temperature
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
    spec = LossSpec(divergence=divergence, temperature=temperature, beta=beta, skew_lambda=skew_lambda)
    real = resolve_real_vocab(student_logits.shape[-1], teacher_logits.shape[-1], real_vocab_size)
    dtype = compute_dtype(student_logits)
    log_q = student_log_probs(student_logits[..., :real].to(dtype), spec.temperature)
    log_p = teacher_log_probs(teacher_logits, real, spec.temperature, dtype)
    return divergence_from_log_probs(log_p, log_q, spec)


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
    spec = LossSpec(divergence, temperature, alpha, beta, skew_lambda, ignore_index)
    real = resolve_real_vocab(student_logits.shape[-1], teacher_logits.shape[-1], real_vocab_size)
    valid = valid_mask(labels, loss_mask, ignore_index)
    check_ids(labels, valid, real, "labels")
    divisor = token_divisor(valid, num_tokens)
    kd, ce = dense_token_terms(student_logits, teacher_logits, labels, valid, spec, real)
    return finish(kd.sum(), ce.sum(), divisor, spec, return_parts)
