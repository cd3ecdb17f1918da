"""KV 缓存：预分配、静态形状的数据（一个 NamedTuple），进出模型的前向；各家族的缓存路径共用。

图例：l 层数，b 批，t 本次写入的位置数，s 缓存槽位数（预分配的最大长度 S），k 键值头，e 头维度。

    * ``KVCache``：k、v 形状 (l, b, k, S, e)，预分配到最大长度 S，解码步的形状因此是静态的、可编译；
      MLA（DeepSeek-V3）的 k 槽存压缩的潜变量 (l, b, 1, S, c)、v 槽存 RoPE 键 (l, b, 1, S, r)（见 cache_widths）；
      ``mask`` (b, S) 标记哪些槽位存着真实 token（左填充与尚未写入的槽位为假）；
      ``positions`` (b,) 是每条序列下一个 token 的 RoPE 位置（= 已有真实 token 数）；
      ``index`` () 是下一个写入的槽位（左填充让各行末尾对齐，所以全批共用一个槽位下标）。
    * 一次写入 t 个 token：槽位 index … index+t−1；第 i 层的块拿到 ``layer_slot(cache, i, slots)``，
      写入后交回新的 k、v，``advance`` 把各层的结果叠成新缓存（输入缓存不变，数据进、数据出）。
"""

from typing import NamedTuple, Optional

import torch

from functional_lm.config import ModelConfig
from functional_lm.layers import KVSlot
from functional_lm.shapes import Bool, Float, Int, Integer, Tensor

__all__ = ["KVCache", "cache_widths", "cache_bytes_per_token", "init_cache", "WritePlan", "plan_write", "layer_slot", "advance"]


class KVCache(NamedTuple):
    """预分配的键值缓存（一个 pytree：NamedTuple 的每个字段都是张量）。"""

    k: Float[Tensor, "l b k s e"]  # 各层 RoPE 之后的键（MLA：潜变量）
    v: Float[Tensor, "l b k s ev"]  # 各层的值（MLA：RoPE 键）
    mask: Bool[Tensor, "b s"]  # 槽位是否存着真实 token
    positions: Int[Tensor, "b"]  # 每行下一个 token 的 RoPE 位置
    index: Int[Tensor, ""]  # 下一个写入的槽位（全批共用）

    @property
    def max_len(self) -> int:
        """缓存槽位数 S。"""
        return self.k.shape[3]


def cache_widths(cfg: ModelConfig) -> tuple[tuple[int, int], tuple[int, int]]:
    """每层每个 token 在缓存里存什么：((k 的头数, 宽度), (v 的头数, 宽度))。

    GQA：k、v 各 k 个头 × e；MLA（DeepSeek-V3）：k 槽存压缩的潜变量 (1 × c)，v 槽存共享的 RoPE 键 (1 × r)。
    """
    if cfg.uses_mla:
        return (1, cfg.kv_lora_rank), (1, cfg.qk_rope_head_dim)
    return (cfg.num_kv_heads, cfg.head_dim), (cfg.num_kv_heads, cfg.head_dim)


def cache_bytes_per_token(cfg: ModelConfig, dtype: torch.dtype = torch.bfloat16) -> dict[str, int]:
    """每个 token 的缓存字节数（所有层）：本模型的缓存，以及同样的头数用普通多头 KV（每头存完整的 k、v）时要多少。

    MLA 的对照是它展开之后的每头键值 h·(e + ev)；GQA 的对照就是它自己。
    """
    size = torch.empty((), dtype=dtype).element_size()
    (kh, kw), (vh, vw) = cache_widths(cfg)
    ours = cfg.num_layers * (kh * kw + vh * vw) * size
    if cfg.uses_mla:
        plain = cfg.num_layers * cfg.num_heads * (cfg.head_dim + cfg.v_head_dim) * size
    else:
        plain = ours
    return {"cache": ours, "per_head_kv": plain}


def init_cache(
    cfg: ModelConfig,
    batch_size: int,
    max_len: int,
    dtype: torch.dtype = torch.float32,
    device: Optional[torch.device | str] = None,
) -> KVCache:
    """全零的空缓存：S = max_len 个槽位，全部标记为空。"""
    if max_len < 1 or batch_size < 1:
        raise ValueError(f"init_cache: batch_size and max_len must be >= 1, got {batch_size}, {max_len}")
    (k_heads, k_width), (v_heads, v_width) = cache_widths(cfg)
    return KVCache(
        k=torch.zeros((cfg.num_layers, batch_size, k_heads, max_len, k_width), dtype=dtype, device=device),
        v=torch.zeros((cfg.num_layers, batch_size, v_heads, max_len, v_width), dtype=dtype, device=device),
        mask=torch.zeros(batch_size, max_len, dtype=torch.bool, device=device),
        positions=torch.zeros(batch_size, dtype=torch.int64, device=device),
        index=torch.zeros((), dtype=torch.int64, device=device),
    )


class WritePlan(NamedTuple):
    """一次写入 t 个 token 的簿记（各层共用）。"""

    real: Bool[Tensor, "b t"]  # 新 token 是否真实（左填充为假）
    slots: Integer[Tensor, "t"]  # 写入的槽位 index … index+t−1
    filled: Bool[Tensor, "b s"]  # 写入之后哪些槽位存着真实 token
    positions: Integer[Tensor, "b t"]  # 新 token 的 RoPE 位置


def plan_write(cache: KVCache, input_ids: Tensor, attention_mask: Optional[Tensor] = None) -> WritePlan:
    """t 个新 token 写到哪些槽位、取什么位置；eager 下写不下时抛出 ValueError（编译时形状已固定，不查）。

    位置接着每行已有的真实 token 数往下数：p = positions[b] + (本次真实 token 的累计数 − 1)，左填充处取 0（其输出不被使用）。
    """
    t = input_ids.shape[1]
    if not torch.compiler.is_compiling() and int(cache.index) + t > cache.max_len:
        raise ValueError(
            f"KV cache is full: writing {t} token(s) at slot {int(cache.index)} overflows max_len={cache.max_len}"
        )
    real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    slots = cache.index + torch.arange(t, device=input_ids.device)  # (t,)
    filled = cache.mask.index_copy(1, slots, real)
    positions = cache.positions[:, None] + (real.long().cumsum(dim=-1) - 1).clamp(min=0)
    return WritePlan(real, slots, filled, positions)


def layer_slot(cache: KVCache, layer: int, slots: Tensor) -> KVSlot:
    """第 layer 层的缓存槽：该层的 k、v（视图，不复制）与本次写入的槽位。"""
    return KVSlot(cache.k[layer], cache.v[layer], slots)


def advance(cache: KVCache, plan: WritePlan, slots: list[KVSlot]) -> KVCache:
    """各层写入后的槽叠成新缓存：k、v 按层堆叠，掩码、位置与下一个槽位向前推进 t。"""
    return KVCache(
        k=torch.stack([slot.k for slot in slots]),
        v=torch.stack([slot.v for slot in slots]),
        mask=plan.filled,
        positions=cache.positions + plan.real.long().sum(dim=-1),
        index=cache.index + plan.slots.shape[0],
    )
