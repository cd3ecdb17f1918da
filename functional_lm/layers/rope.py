"""RoPE 的两种变体：YaRN 长上下文缩放的 cos / sin 表，以及 DeepSeek 交错存放维度的旋转。

YaRN（Peng et al. 2023；数值与 transformers 的 _compute_yarn_parameters 逐位一致）：
    维度对 i 的原始逆频率 ω_i = θ^(−2i/r)。在训练长度 L₀ 内转过的圈数 L₀·ω_i / 2π 多的（高频）维度保持原样（外推），
    转不满一圈的（低频）维度把频率除以 s = factor（插值），中间用线性斜坡混合：
        γ_i = clamp((i − lo) / (hi − lo), 0, 1)，lo / hi 是转 β_fast / β_slow 圈的维度号（取整、夹到 [0, r/2 − 1]）；
        ω'_i = (ω_i / s) · γ_i + ω_i · (1 − γ_i)。
    cos / sin 再乘幅度 m（attention_factor；缺省 m = mscale(s, mscale) / mscale(s, mscale_all_dim)，
    mscale(s, c) = 0.1·c·ln s + 1，没有 mscale_all_dim 时 m = mscale(s, 1)）。
DeepSeek 另把 softmax 的缩放乘 mscale(s, mscale_all_dim)²（见 layers.mla.mla_scale）。
"""

import math

import torch
from einops import rearrange, repeat

from functional_lm.config import YarnScaling
from functional_lm.shapes import Float, Integer, Tensor, typechecked

__all__ = ["yarn_mscale", "yarn_attention_factor", "yarn_inv_freq", "yarn_tables", "apply_rope_interleaved"]


def yarn_mscale(scale: float, coefficient: float = 1.0) -> float:
    """mscale(s, c) = 0.1·c·ln s + 1（s ≤ 1 时为 1）。"""
    return 1.0 if scale <= 1 else 0.1 * coefficient * math.log(scale) + 1.0


def yarn_attention_factor(scaling: YarnScaling) -> float:
    """cos / sin 的幅度 m（见模块说明）。"""
    if scaling.attention_factor is not None:
        return scaling.attention_factor
    if scaling.mscale and scaling.mscale_all_dim:
        return float(yarn_mscale(scaling.factor, scaling.mscale) / yarn_mscale(scaling.factor, scaling.mscale_all_dim))
    return yarn_mscale(scaling.factor)


def _correction_range(scaling: YarnScaling, dim: int, theta: float) -> tuple[float, float]:
    """斜坡的两端：转 β 圈的维度号 i(β) = r·ln(L₀ / (2πβ)) / (2 ln θ)；truncate 时向外取整，夹到 [0, r − 1]。"""

    def dim_for(rotations: float) -> float:
        return dim * math.log(scaling.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dim_for(scaling.beta_fast), dim_for(scaling.beta_slow)
    if scaling.truncate:
        low, high = math.floor(low), math.ceil(high)
    return max(low, 0), min(high, dim - 1)


def yarn_inv_freq(scaling: YarnScaling, dim: int, theta: float, device=None) -> Float[Tensor, "half"]:
    """YaRN 的逆频率 ω'（r/2 个，float32，运算顺序同 transformers）。"""
    pos_freqs = theta ** (torch.arange(0, dim, 2, device=device).float() / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (scaling.factor * pos_freqs)
    low, high = _correction_range(scaling, dim, theta)
    high = high + 0.001 if low == high else high  # 避免除以 0
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device=device) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1 = 保持原频率（外推），0 = 完全插值
    return interpolation * (1 - keep) + extrapolation * keep


@typechecked
def yarn_tables(
    position_ids: Integer[Tensor, "b t"], dim: int, theta: float, scaling: YarnScaling, dtype: torch.dtype = torch.float32
) -> tuple[Float[Tensor, "b t e"], Float[Tensor, "b t e"]]:
    """YaRN 的 cos / sin 表 (b, t, r)：φ = p · ω'，rotate-half 的排法（两半共用角度），乘幅度 m 后转成 dtype。"""
    inv_freq = yarn_inv_freq(scaling, dim, theta, position_ids.device)
    angles = position_ids.float()[..., None] * inv_freq  # (b, t, r/2)
    angles = repeat(angles, "b t half -> b t (two half)", two=2)
    factor = yarn_attention_factor(scaling)
    return (angles.cos() * factor).to(dtype), (angles.sin() * factor).to(dtype)


@typechecked
def apply_rope_interleaved(
    x: Float[Tensor, "b n t e"], cos: Float[Tensor, "b t e"], sin: Float[Tensor, "b t e"]
) -> Float[Tensor, "b n t e"]:
    """交错存放的 RoPE（DeepSeek 的检查点）：第 i 对是相邻的 (x_{2i}, x_{2i+1})，旋转角 φ_i：
        (x_{2i}, x_{2i+1}) ↦ (x_{2i} cos φ_i − x_{2i+1} sin φ_i,  x_{2i+1} cos φ_i + x_{2i} sin φ_i)，
    结果按 rotate-half 的排法写出（前半是各对的第一个分量，后半是第二个）：q、k 都这样排，点积不变。"""
    half = cos.shape[-1] // 2
    cos = rearrange(cos[..., :half], "b t e -> b 1 t e")  # 两半的角度相同，取前半即每对的角度
    sin = rearrange(sin[..., :half], "b t e -> b 1 t e")
    first, second = x[..., 0::2], x[..., 1::2]
    return torch.cat([first * cos - second * sin, second * cos + first * sin], dim=-1)
