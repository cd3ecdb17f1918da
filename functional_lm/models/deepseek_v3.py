"""DeepSeek-V3 家族（``DeepseekV3ForCausalLM``，DeepSeek-V3 / R1 与同结构的小检查点）：MLA + DeepSeekMoE + YaRN。

一层的参数（HF 键名，去掉 ``model.layers.{i}.`` 前缀）：
    注意力（layers.mla）：self_attn.q_a_proj / q_a_layernorm / q_b_proj（q_lora_rank 为 None 时 self_attn.q_proj），
        self_attn.kv_a_proj_with_mqa (c + r, d)，self_attn.kv_a_layernorm (c)，self_attn.kv_b_proj (h·(n + ev), c)，
        self_attn.o_proj (d, h·ev)；
    前馈：前 first_k_dense_replace 层为宽 intermediate_size 的稠密 SwiGLU；其余为 DeepSeekMoE（layers.moe）：
        mlp.gate.weight (E, d)、mlp.gate.e_score_correction_bias (E)、融合的 mlp.experts.gate_up_proj / down_proj、
        mlp.shared_experts.{gate,up,down}_proj（宽 moe_intermediate_size · n_shared_experts）。
RoPE 只作用在 r 维上，有 rope_scaling 时为 YaRN（layers.rope）。
"""

from functional_lm.config import ModelConfig
from functional_lm.layers import dense_ffn
from functional_lm.layers.mla import mla_attention
from functional_lm.layers.moe import deepseek_moe_ffn
from functional_lm.models.family import Family
from functional_lm.models.qwen2 import dense_mlp_shapes, plain_rope

__all__ = ["mla_shapes", "moe_shapes", "layer_shapes", "ffn_for", "FAMILY"]


def mla_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """MLA 的参数与形状（(out, in) 布局）。"""
    d, h, c, r = cfg.hidden_size, cfg.num_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    if cfg.q_lora_rank is None:
        query = {"self_attn.q_proj.weight": (h * cfg.head_dim, d)}
    else:
        query = {
            "self_attn.q_a_proj.weight": (cfg.q_lora_rank, d),
            "self_attn.q_a_layernorm.weight": (cfg.q_lora_rank,),
            "self_attn.q_b_proj.weight": (h * cfg.head_dim, cfg.q_lora_rank),
        }
    return query | {
        "self_attn.kv_a_proj_with_mqa.weight": (c + r, d),
        "self_attn.kv_a_layernorm.weight": (c,),
        "self_attn.kv_b_proj.weight": (h * (cfg.qk_nope_head_dim + cfg.v_head_dim), c),
        "self_attn.o_proj.weight": (d, h * cfg.v_head_dim),
    }


def moe_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """DeepSeekMoE 层的参数：路由器、修正偏置、融合的路由专家、共享专家。"""
    d, e, f = cfg.hidden_size, cfg.num_experts, cfg.moe_intermediate_size
    shared = f * cfg.n_shared_experts
    return {
        "mlp.gate.weight": (e, d),
        "mlp.gate.e_score_correction_bias": (e,),
        "mlp.experts.gate_up_proj": (e, 2 * f, d),
        "mlp.experts.down_proj": (e, d, f),
        "mlp.shared_experts.gate_proj.weight": (shared, d),
        "mlp.shared_experts.up_proj.weight": (shared, d),
        "mlp.shared_experts.down_proj.weight": (d, shared),
    }


def layer_shapes(cfg: ModelConfig, index: int) -> dict[str, tuple[int, ...]]:
    """第 index 层的参数名与形状。"""
    d = cfg.hidden_size
    ffn = moe_shapes(cfg) if cfg.is_moe_layer(index) else dense_mlp_shapes(cfg, cfg.intermediate_size)
    return {"input_layernorm.weight": (d,), **mla_shapes(cfg), "post_attention_layernorm.weight": (d,), **ffn}


def ffn_for(cfg: ModelConfig, index: int):
    """第 index 层的前馈混合器：前 first_k_dense_replace 层稠密，其余 DeepSeekMoE。"""
    return deepseek_moe_ffn if cfg.is_moe_layer(index) else dense_ffn


FAMILY = Family("deepseek_v3", layer_shapes, mla_attention, ffn_for, plain_rope)
