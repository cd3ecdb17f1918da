"""学生 / 教师模型：参数字典的构造、校验与前向计算。

模型 = 一个普通的 ``dict[str, Tensor]``（键名即 Hugging Face Qwen2 的名字）+ 本模块的纯函数：

    嵌入 → num_layers × transformer_block → 最终 RMSNorm → 输出投影（共享嵌入时直接用嵌入矩阵）

同一个字典可以原样交给 ``torch.func.functional_call(Qwen2ForCausalLM(...), params, ...)``。
"""

from collections.abc import Mapping
from typing import Optional

import torch
import torch.nn.functional as F

from functional_lm.config import ModelConfig
from functional_lm.layers import linear, rms_norm, rope_tables, transformer_block
from functional_lm.typing import Bool, Float, Integer, Tensor, typechecked, under_transform

__all__ = [
    "param_shapes",
    "init_params",
    "check_params",
    "check_input_ids",
    "default_position_ids",
    "layer_params",
    "output_weight",
    "embed",
    "decode_embeddings",
    "forward_hidden",
    "forward",
    "count_parameters",
    "unique_tensors",
]

EMBED_KEY = "model.embed_tokens.weight"
FINAL_NORM_KEY = "model.norm.weight"
LM_HEAD_KEY = "lm_head.weight"


def _layer_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """一层的参数名（去掉 ``model.layers.{i}.`` 前缀）与形状，(out, in) 布局。"""
    d, f, e = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q_width, kv_width = cfg.num_heads * e, cfg.num_kv_heads * e
    shapes = {
        "input_layernorm.weight": (d,),
        "self_attn.q_proj.weight": (q_width, d),
        "self_attn.k_proj.weight": (kv_width, d),
        "self_attn.v_proj.weight": (kv_width, d),
        "self_attn.o_proj.weight": (d, q_width),
        "post_attention_layernorm.weight": (d,),
        "mlp.gate_proj.weight": (f, d),
        "mlp.up_proj.weight": (f, d),
        "mlp.down_proj.weight": (d, f),
    }
    if cfg.qkv_bias:
        shapes |= {
            "self_attn.q_proj.bias": (q_width,),
            "self_attn.k_proj.bias": (kv_width,),
            "self_attn.v_proj.bias": (kv_width,),
        }
    return shapes


def param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """配置所要求的全部参数键与形状（共享嵌入时没有 ``lm_head.weight``）。"""
    shapes = {EMBED_KEY: (cfg.vocab_size, cfg.hidden_size)}
    for i in range(cfg.num_layers):
        shapes |= {f"model.layers.{i}.{name}": shape for name, shape in _layer_shapes(cfg).items()}
    shapes[FINAL_NORM_KEY] = (cfg.hidden_size,)
    if not cfg.tie_word_embeddings:
        shapes[LM_HEAD_KEY] = (cfg.vocab_size, cfg.hidden_size)
    return shapes


def init_params(
    cfg: ModelConfig,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: Optional[torch.device | str] = None,
) -> dict[str, Tensor]:
    """按配置随机初始化参数字典；同一 seed 在任何设备上得到同样的值。

    矩阵与嵌入 ~ N(0, 0.02²)，偏置为 0，RMSNorm 权重为 1。随机数在 CPU 上按固定键顺序
    生成后再搬到目标设备 / dtype，所以结果与设备无关。
    """
    if not dtype.is_floating_point:
        raise ValueError(f"init_params: dtype must be a floating dtype, got {dtype}")
    generator = torch.Generator().manual_seed(seed)
    params: dict[str, Tensor] = {}
    for key, shape in param_shapes(cfg).items():
        if key.endswith("norm.weight"):
            value = torch.ones(shape)
        elif key.endswith(".bias"):
            value = torch.zeros(shape)
        else:
            value = torch.empty(shape).normal_(0.0, 0.02, generator=generator)
        params[key] = value.to(device=device, dtype=dtype)
    return params


def check_params(params: Mapping[str, Tensor], cfg: ModelConfig) -> None:
    """显式核对参数字典与配置：缺键、多键、形状不符、非浮点 dtype 都给出点名的 ValueError。"""
    expected = param_shapes(cfg)
    missing = [key for key in expected if key not in params]
    extra = [key for key in params if key not in expected]
    problems = []
    if missing:
        problems.append(f"missing keys {missing[:5]}{' …' if len(missing) > 5 else ''}")
    if extra:
        hint = " (lm_head.weight present but cfg.tie_word_embeddings=True)" if LM_HEAD_KEY in extra else ""
        problems.append(f"unexpected keys {extra[:5]}{' …' if len(extra) > 5 else ''}{hint}")
    for key, shape in expected.items():
        value = params.get(key)
        if value is None:
            continue
        if not isinstance(value, Tensor):
            problems.append(f"{key} is {type(value).__name__}, expected a Tensor")
        elif tuple(value.shape) != shape:
            problems.append(f"{key} has shape {tuple(value.shape)}, expected {shape}")
        elif not value.dtype.is_floating_point:
            problems.append(f"{key} has dtype {value.dtype}, expected a floating dtype")
    if problems:
        raise ValueError("params do not match the ModelConfig: " + "; ".join(problems))


def check_input_ids(input_ids: Tensor, cfg: ModelConfig) -> None:
    """核对 token id：必须是整数张量 (b, t)，t ≤ max_seq_len，取值在 [0, vocab_size)。

    取值范围要读张量内容，只在 eager 下检查；torch.compile / vmap 等变换之下让路。
    """
    if not isinstance(input_ids, Tensor):
        raise ValueError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise ValueError(f"input_ids must be an integer tensor, got dtype {input_ids.dtype}")
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must have shape (batch, seq), got {tuple(input_ids.shape)}")
    if input_ids.shape[1] > cfg.max_seq_len:
        raise ValueError(
            f"sequence length {input_ids.shape[1]} exceeds ModelConfig.max_seq_len={cfg.max_seq_len}"
        )
    if under_transform(input_ids) or input_ids.numel() == 0:
        return
    low, high = int(input_ids.min()), int(input_ids.max())
    if low < 0 or high >= cfg.vocab_size:
        raise ValueError(
            f"token ids must lie in [0, vocab_size={cfg.vocab_size}), got min {low}, max {high}"
        )


def default_position_ids(
    input_ids: Tensor, attention_mask: Optional[Tensor] = None
) -> Integer[Tensor, "b t"]:
    """默认位置：无填充掩码时为 0…t−1；有掩码时为真实 token 的累计序号（左填充也从 0 数起）。"""
    if attention_mask is None:
        return torch.arange(input_ids.shape[1], device=input_ids.device).expand(input_ids.shape[0], -1)
    positions = attention_mask.long().cumsum(dim=-1) - 1
    return positions.clamp(min=0)


def layer_params(params: Mapping[str, Tensor], cfg: ModelConfig, index: int) -> dict[str, Tensor]:
    """第 index 层的参数视图：去掉 ``model.layers.{i}.`` 前缀的键 → 同一批张量（不复制）。"""
    prefix = f"model.layers.{index}."
    return {name: params[prefix + name] for name in _layer_shapes(cfg)}


def output_weight(params: Mapping[str, Tensor], cfg: ModelConfig) -> Float[Tensor, "v d"]:
    """输出投影矩阵：共享嵌入时就是嵌入张量本身（同一个对象），否则为 ``lm_head.weight``。"""
    return params[EMBED_KEY] if cfg.tie_word_embeddings else params[LM_HEAD_KEY]


@typechecked
def embed(input_ids: Integer[Tensor, "b t"], table: Float[Tensor, "v d"]) -> Float[Tensor, "b t d"]:
    """按 token id 取嵌入向量。"""
    return F.embedding(input_ids, table)


def _validate(params, input_ids, cfg, position_ids, attention_mask) -> None:
    """前向入口的一次性校验（编译追踪时跳过：形状已由 guard 固定）。"""
    if torch.compiler.is_compiling():
        return
    check_params(params, cfg)
    check_input_ids(input_ids, cfg)
    for name, extra in (("position_ids", position_ids), ("attention_mask", attention_mask)):
        if extra is not None and tuple(extra.shape) != tuple(input_ids.shape):
            raise ValueError(
                f"{name} must have the shape of input_ids {tuple(input_ids.shape)}, got {tuple(extra.shape)}"
            )


@typechecked
def decode_embeddings(
    params: Mapping[str, Tensor],
    x: Float[Tensor, "b t d"],
    cfg: ModelConfig,
    *,
    position_ids: Integer[Tensor, "b t"],
    attention_mask: Optional[Integer[Tensor, "b t"] | Bool[Tensor, "b t"]] = None,
    training: bool = False,
) -> Float[Tensor, "b t d"]:
    """从嵌入向量出发：num_layers 个解码块 + 最终 RMSNorm。

    单独暴露出来，便于对嵌入求导（例如用梯度检验因果性）或输入自定义嵌入。
    """
    # RoPE 表对所有层相同，只算一次。
    rope = rope_tables(position_ids, cfg.head_dim, cfg.rope_theta, x.dtype)
    dropout_p = cfg.dropout if training else 0.0
    for i in range(cfg.num_layers):
        x = transformer_block(
            x, layer_params(params, cfg, i), cfg, rope=rope, attention_mask=attention_mask, dropout_p=dropout_p
        )
    return rms_norm(x, params[FINAL_NORM_KEY], cfg.norm_eps)


@typechecked
def forward_hidden(
    params: Mapping[str, Tensor],
    input_ids: Integer[Tensor, "b t"],
    cfg: ModelConfig,
    *,
    position_ids: Optional[Integer[Tensor, "b t"]] = None,
    attention_mask: Optional[Integer[Tensor, "b t"] | Bool[Tensor, "b t"]] = None,
    training: bool = False,
) -> Float[Tensor, "b t d"]:
    """最终 RMSNorm 之后的隐藏状态 (b, t, d)；分块蒸馏损失直接使用它和输出投影矩阵。

    attention_mask: 1 = 真实 token，0 = 填充；缺省时为纯因果注意力（最快的路径）。
    training: 为真且 cfg.dropout > 0 时在注意力概率上做 dropout。
    """
    _validate(params, input_ids, cfg, position_ids, attention_mask)
    if position_ids is None:
        position_ids = default_position_ids(input_ids, attention_mask)
    x = embed(input_ids, params[EMBED_KEY])
    return decode_embeddings(
        params, x, cfg, position_ids=position_ids, attention_mask=attention_mask, training=training
    )


@typechecked
def forward(
    params: Mapping[str, Tensor],
    input_ids: Integer[Tensor, "b t"],
    cfg: ModelConfig,
    *,
    position_ids: Optional[Integer[Tensor, "b t"]] = None,
    attention_mask: Optional[Integer[Tensor, "b t"] | Bool[Tensor, "b t"]] = None,
    training: bool = False,
) -> Float[Tensor, "b t v"]:
    """完整前向：input_ids (b, t) → logits (b, t, vocab_size)。

    自动生成 position_ids 与因果遮罩；输出投影在共享嵌入时直接读取嵌入张量，
    因此嵌入的梯度同时得到输入端与输出端两份贡献。
    """
    hidden = forward_hidden(
        params, input_ids, cfg, position_ids=position_ids, attention_mask=attention_mask, training=training
    )
    return linear(hidden, output_weight(params, cfg))


def unique_tensors(params: Mapping[str, Tensor]) -> list[Tensor]:
    """字典里的不同张量（同一个张量出现在多个键下时只取一次，按首次出现的顺序）。"""
    first: dict[int, Tensor] = {}
    for value in params.values():
        first.setdefault(id(value), value)
    return list(first.values())


def count_parameters(params: Mapping[str, Tensor]) -> int:
    """参数总数；同一个张量（共享嵌入）只计一次。"""
    return sum(value.numel() for value in unique_tensors(params))
