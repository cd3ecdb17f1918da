"""Qwen2 / Qwen2.5 / DeepSeek-R1-Distill-Qwen 家族（``Qwen2ForCausalLM``）：GQA + 稠密 SwiGLU + plain RoPE。

一层的参数（HF 键名，去掉 ``model.layers.{i}.`` 前缀，(out, in) 布局）：
    input_layernorm.weight (d)，self_attn.{q,k,v}_proj.weight / .bias（qkv_bias 时），self_attn.o_proj.weight，
    post_attention_layernorm.weight (d)，mlp.{gate,up,down}_proj.weight。
前向由共享的解码栈（models.decoder）完成；本模块只描述参数形状与 RoPE 表。
"""

from functional_lm.config import ModelConfig
from functional_lm.layers import dense_ffn, gqa_attention, rope_tables
from functional_lm.layers.rope import yarn_tables
from functional_lm.models.family import Family
from functional_lm.shapes import Tensor

__all__ = ["attention_shapes", "dense_mlp_shapes", "layer_shapes", "plain_rope", "dense_ffn_for", "FAMILY"]


def attention_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """GQA 注意力的参数：q 宽 h·e，k、v 宽 k·e；qkv_bias 时带偏置。"""
    d, e = cfg.hidden_size, cfg.head_dim
    q_width, kv_width = cfg.num_heads * e, cfg.num_kv_heads * e
    shapes = {
        "self_attn.q_proj.weight": (q_width, d),
        "self_attn.k_proj.weight": (kv_width, d),
        "self_attn.v_proj.weight": (kv_width, d),
        "self_attn.o_proj.weight": (d, q_width),
    }
    if cfg.qkv_bias:
        shapes |= {
            "self_attn.q_proj.bias": (q_width,),
            "self_attn.k_proj.bias": (kv_width,),
            "self_attn.v_proj.bias": (kv_width,),
        }
    return shapes


def dense_mlp_shapes(cfg: ModelConfig, width: int) -> dict[str, tuple[int, ...]]:
    """稠密 SwiGLU 前馈的参数（隐藏宽度 width）。"""
    d = cfg.hidden_size
    return {"mlp.gate_proj.weight": (width, d), "mlp.up_proj.weight": (width, d), "mlp.down_proj.weight": (d, width)}


def layer_shapes(cfg: ModelConfig, index: int = 0) -> dict[str, tuple[int, ...]]:
    """一层的参数名与形状（各层相同，index 不影响）。"""
    d = cfg.hidden_size
    attention = attention_shapes(cfg)
    weights = {name: shape for name, shape in attention.items() if name.endswith(".weight")}
    biases = {name: shape for name, shape in attention.items() if name.endswith(".bias")}
    # 偏置排在一层的最后：参数字典的键序决定梯度范数的求和顺序与优化器状态的顺序，
    # 与此前版本（及其检查点、黄金值）保持一致。
    return {
        "input_layernorm.weight": (d,),
        **weights,
        "post_attention_layernorm.weight": (d,),
        **dense_mlp_shapes(cfg, cfg.intermediate_size),
        **biases,
    }


def plain_rope(position_ids: Tensor, cfg: ModelConfig, dtype) -> tuple[Tensor, Tensor]:
    """RoPE 的 cos / sin 表，维度为 cfg.rope_dim：plain RoPE（layers.rope_tables），有 rope_scaling 时为 YaRN。"""
    if cfg.rope_scaling is not None:
        return yarn_tables(position_ids, cfg.rope_dim, cfg.rope_theta, cfg.rope_scaling, dtype)
    return rope_tables(position_ids, cfg.rope_dim, cfg.rope_theta, dtype)


def dense_ffn_for(cfg: ModelConfig, index: int):
    """每一层都是稠密 SwiGLU。"""
    return dense_ffn


FAMILY = Family("qwen2", layer_shapes, gqa_attention, dense_ffn_for, plain_rope)
