"""Qwen3-MoE 家族（``Qwen3MoeForCausalLM``）：Qwen3 的注意力 + 稀疏前馈（softmax 路由的 top-k 专家）。

第 i 层是不是 MoE 层由 ``cfg.is_moe_layer(i)`` 决定：i 不在 mlp_only_layers 里、且 (i + 1) % decoder_sparse_step == 0；
其余层是宽 intermediate_size 的稠密 SwiGLU（与 Qwen3 相同）。MoE 层的参数（transformers 5 的融合布局，
参数字典只保留这一种；发布的逐专家键由 hf.experts 在读入时合并）：
    mlp.gate.weight (E, d)，mlp.experts.gate_up_proj (E, 2f, d)，mlp.experts.down_proj (E, d, f)。
"""

from functional_lm.config import ModelConfig
from functional_lm.layers import dense_ffn, gqa_attention
from functional_lm.layers.moe import moe_ffn
from functional_lm.models.family import Family
from functional_lm.models.qwen2 import attention_shapes, dense_mlp_shapes, plain_rope
from functional_lm.models.qwen3 import qk_norm_shapes

__all__ = ["moe_mlp_shapes", "layer_shapes", "ffn_for", "FAMILY"]


def moe_mlp_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """一个 MoE 前馈层的参数：路由器与融合的专家张量。"""
    d, e, f = cfg.hidden_size, cfg.num_experts, cfg.moe_intermediate_size
    return {"mlp.gate.weight": (e, d), "mlp.experts.gate_up_proj": (e, 2 * f, d), "mlp.experts.down_proj": (e, d, f)}


def layer_shapes(cfg: ModelConfig, index: int) -> dict[str, tuple[int, ...]]:
    """第 index 层的参数名与形状：Qwen3 的注意力 + （MoE 或稠密）前馈。"""
    d = cfg.hidden_size
    ffn = moe_mlp_shapes(cfg) if cfg.is_moe_layer(index) else dense_mlp_shapes(cfg, cfg.intermediate_size)
    return {
        "input_layernorm.weight": (d,),
        **attention_shapes(cfg),
        **qk_norm_shapes(cfg),
        "post_attention_layernorm.weight": (d,),
        **ffn,
    }


def ffn_for(cfg: ModelConfig, index: int):
    """第 index 层的前馈混合器。"""
    return moe_ffn if cfg.is_moe_layer(index) else dense_ffn


FAMILY = Family("qwen3_moe", layer_shapes, gqa_attention, ffn_for, plain_rope)
