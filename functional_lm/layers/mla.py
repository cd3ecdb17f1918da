"""多头潜在注意力（MLA，DeepSeek-V2 / V3）：一个与 gqa_attention 同签名的注意力混合器，以及它的 KV 缓存写入。

图例：b 批，t 查询位置，s 键位置，d 隐藏，h 头，c 压缩的 KV 潜变量宽度（kv_lora_rank），
n 每头不带位置的 q/k 维度（qk_nope_head_dim），r 解耦 RoPE 的维度（qk_rope_head_dim），ev 每头的值维度（v_head_dim），
e = n + r 每头 q/k 的总维度。

    q = W_qb · RMSNorm(W_qa x)（q LoRA；q_lora_rank 为 None 时 q = W_q x），拆成每头 [q_n (n) | q_r (r)]
    [c_kv | k_r] = W_kva x：c_kv 是所有头共享的潜变量（再做一次 RMSNorm），k_r 是所有头共享的一个 RoPE 键
    [k_n | v] = W_kvb c_kv：每头的不带位置的键 (n) 与值 (ev)
    q_r、k_r 施加 RoPE（DeepSeek 的检查点里维度交错存放：rope_interleave），k = [k_n | k_r]（k_r 复制到每个头）
    out = W_o · softmax(q kᵀ · c + M) v，c = e^(−1/2)，YaRN 的 mscale_all_dim 再乘 mscale(s)²

KV 缓存只存 c_kv（RMSNorm 之后）与 RoPE 之后的 k_r：每层每个 token c + r 个数，而不是 h·(e + ev) 个——这正是
MLA 的意义。解码时从缓存里的潜变量重新展开 W_kvb c_kv（与完整前向同一条公式，所以缓存解码等于完整前向）。
潜变量与 q LoRA 的两个 RMSNorm 的 ε 固定为 1e-6（transformers 的 DeepseekV3RMSNorm 缺省值，不取 rms_norm_eps）。
"""

from collections.abc import Mapping
from typing import Optional

import torch
from einops import rearrange

from functional_lm.config import ModelConfig
from functional_lm.layers import (
    AttentionMask, KVSlot, apply_rope, attend, build_attention_mask, check_segment_ids, grad_needed, linear, rms_norm,
)
from functional_lm.layers.rope import apply_rope_interleaved, yarn_mscale
from functional_lm.shapes import Bool, Float, Integer, Tensor, typechecked

__all__ = ["LATENT_NORM_EPS", "mla_scale", "mla_query", "mla_latent", "expand_latent", "write_latent", "mla_attention"]

LATENT_NORM_EPS = 1e-6  # q_a_layernorm 与 kv_a_layernorm 的 ε（transformers 写死的缺省值）


def mla_scale(cfg: ModelConfig) -> float:
    """softmax 的缩放 c = e^(−1/2)；YaRN 且 mscale_all_dim ≠ 0 时再乘 mscale(s, mscale_all_dim)²。"""
    scale = cfg.head_dim ** -0.5
    if cfg.rope_scaling is not None and cfg.rope_scaling.mscale_all_dim:
        m = yarn_mscale(cfg.rope_scaling.factor, cfg.rope_scaling.mscale_all_dim)
        scale = scale * m * m
    return scale


def _rope(x: Tensor, cos: Tensor, sin: Tensor, cfg: ModelConfig) -> Tensor:
    return apply_rope_interleaved(x, cos, sin) if cfg.rope_interleave else apply_rope(x, cos, sin)


@typechecked
def mla_query(
    x: Float[Tensor, "b t d"], attn: Mapping[str, Tensor], cfg: ModelConfig, cos: Tensor, sin: Tensor
) -> Float[Tensor, "b h t e"]:
    """每头的查询 [q_n | RoPE(q_r)]：q LoRA（q_a_proj → RMSNorm → q_b_proj）或直接的 q_proj。"""
    if cfg.q_lora_rank is None:
        q = linear(x, attn["q_proj.weight"])
    else:
        q = linear(rms_norm(linear(x, attn["q_a_proj.weight"]), attn["q_a_layernorm.weight"], LATENT_NORM_EPS),
                   attn["q_b_proj.weight"])
    q = rearrange(q, "b t (h e) -> b h t e", e=cfg.head_dim)
    q_nope, q_rot = q.split([cfg.qk_nope_head_dim, cfg.qk_rope_head_dim], dim=-1)
    return torch.cat([q_nope, _rope(q_rot, cos, sin, cfg)], dim=-1)


@typechecked
def mla_latent(
    x: Float[Tensor, "b t d"], attn: Mapping[str, Tensor], cfg: ModelConfig, cos: Tensor, sin: Tensor
) -> tuple[Float[Tensor, "b 1 t c"], Float[Tensor, "b 1 t r"]]:
    """缓存里存的两样：RMSNorm 之后的潜变量 c_kv 与 RoPE 之后的共享键 k_r（都当作一个“头”）。"""
    latent, k_rot = linear(x, attn["kv_a_proj_with_mqa.weight"]).split([cfg.kv_lora_rank, cfg.qk_rope_head_dim], dim=-1)
    latent = rms_norm(latent, attn["kv_a_layernorm.weight"], LATENT_NORM_EPS)
    latent, k_rot = rearrange(latent, "b t c -> b 1 t c"), rearrange(k_rot, "b t r -> b 1 t r")
    return latent, _rope(k_rot, cos, sin, cfg)


@typechecked
def expand_latent(
    latent: Float[Tensor, "b 1 s c"], k_rot: Float[Tensor, "b 1 s r"], attn: Mapping[str, Tensor], cfg: ModelConfig
) -> tuple[Float[Tensor, "b h s e"], Float[Tensor, "b h s ev"]]:
    """潜变量展开成每头的键值：[k_n | v] = W_kvb c_kv，k = [k_n | k_r]（k_r 复制到 h 个头）。"""
    kv = rearrange(linear(latent, attn["kv_b_proj.weight"]), "b 1 s (h e) -> b h s e", h=cfg.num_heads)
    k_nope, v = kv.split([cfg.qk_nope_head_dim, cfg.v_head_dim], dim=-1)
    return torch.cat([k_nope, k_rot.expand(-1, cfg.num_heads, -1, -1)], dim=-1), v


def write_latent(kv: KVSlot, latent: Tensor, k_rot: Tensor) -> KVSlot:
    """把 t 个新 token 的潜变量与 RoPE 键写进这一层的缓存槽（KVSlot 的 k 存潜变量 (b, 1, S, c)，v 存 k_r (b, 1, S, r)）。"""
    return KVSlot(kv.k.index_copy(2, kv.slots, latent), kv.v.index_copy(2, kv.slots, k_rot), kv.slots)


@typechecked
def mla_attention(
    x: Float[Tensor, "b t d"],
    attn: Mapping[str, Tensor],
    cfg: ModelConfig,
    *,
    rope: tuple[Tensor, Tensor],
    attention_mask: Optional[Integer[Tensor, "b t"] | Bool[Tensor, "b t"]] = None,
    segment_ids: Optional[Integer[Tensor, "b t"]] = None,
    mask: AttentionMask = None,
    dropout_p: float = 0.0,
    kv: Optional[KVSlot] = None,
) -> Float[Tensor, "b t d"] | tuple[Float[Tensor, "b t d"], KVSlot]:
    """多头潜在注意力（见模块说明）；参数与返回值的含义同 layers.gqa_attention（rope 为 RoPE 维度 r 的 cos / sin 表）。"""
    if segment_ids is not None:
        check_segment_ids(segment_ids, tuple(x.shape[:2]))
    if kv is not None and mask is None:
        raise ValueError("mla_attention: attention over a KV cache needs its prebuilt mask (cache_attention_mask)")
    cos, sin = rope
    q = mla_query(x, attn, cfg, cos, sin)
    latent, k_rot = mla_latent(x, attn, cfg, cos, sin)
    if kv is not None:
        kv = write_latent(kv, latent, k_rot)  # 缓存只存潜变量与 RoPE 键
        latent, k_rot = kv.k, kv.v
    k, v = expand_latent(latent, k_rot, attn, cfg)
    if mask is None:
        mask = build_attention_mask(x.shape[1], attention_mask=attention_mask, segment_ids=segment_ids,
                                    dropout_p=dropout_p, needs_grad=grad_needed(x, attn))
    out = rearrange(attend(q, k, v, mask, dropout_p, scale=mla_scale(cfg)), "b h t e -> b t (h e)")
    out = linear(out, attn["o_proj.weight"])
    return out if kv is None else (out, kv)
