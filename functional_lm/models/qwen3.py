"""Qwen3 稠密家族（``Qwen3ForCausalLM``）：Qwen2 的块，外加每头的 QK-norm，q/k/v 无偏置，头维度 e 可 ≠ d/h。

与 Qwen2 的差别只在注意力的参数：多了 ``self_attn.q_norm.weight``、``self_attn.k_norm.weight``（形状 (e,)，
所有头共享），q 宽 h·e、k/v 宽 k·e 中的 e 取 ``cfg.head_dim``（config.json 的 head_dim）。
RMSNorm 作用在 RoPE 之前的每个头上（layers.project_qkv）；前馈、RoPE 与 Qwen2 完全相同。
"""

from functional_lm.config import ModelConfig
from functional_lm.layers import gqa_attention
from functional_lm.models.family import Family
from functional_lm.models.qwen2 import attention_shapes, dense_ffn_for, dense_mlp_shapes, plain_rope

__all__ = ["qk_norm_shapes", "layer_shapes", "FAMILY"]


def qk_norm_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """QK-norm 的两个权重，形状 (e,)。"""
    return {"self_attn.q_norm.weight": (cfg.head_dim,), "self_attn.k_norm.weight": (cfg.head_dim,)}


def layer_shapes(cfg: ModelConfig, index: int = 0) -> dict[str, tuple[int, ...]]:
    """一层的参数名与形状：Qwen2 的注意力（无偏置）+ QK-norm + 稠密 SwiGLU。"""
    d = cfg.hidden_size
    return {
        "input_layernorm.weight": (d,),
        **attention_shapes(cfg),
        **qk_norm_shapes(cfg),
        "post_attention_layernorm.weight": (d,),
        **dense_mlp_shapes(cfg, cfg.intermediate_size),
    }


FAMILY = Family("qwen3", layer_shapes, gqa_attention, dense_ffn_for, plain_rope)
