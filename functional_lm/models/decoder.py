"""所有家族共用的解码栈：参数字典的构造、校验与前向计算。

模型 = 一个普通的 ``dict[str, Tensor]``（键名即该家族在 Hugging Face 中的名字）+ 本模块的纯函数：

    嵌入 → num_layers × layers.transformer_block → 最终 RMSNorm → 输出投影（共享嵌入时直接用嵌入矩阵）

同一个字典可以原样交给 ``torch.func.functional_call(<家族>ForCausalLM(...), params, ...)``。
家族（cfg.family：qwen2、qwen3、qwen3_moe、deepseek_v3）只决定每层的参数形状、注意力与前馈用哪个混合器、
RoPE 表怎样算（models.family.Family，每个家族一个模块）；块只有一份（``layers.transformer_block``），
层循环也只有一份（``_decoder_stack``）：训练与完整前向不带缓存；
``forward(params, ids, cfg, cache=cache) -> (logits, cache)`` 把 t 个新 token 写进 KV 缓存（models.cache），
prefill（t = 提示长度）与解码步（t = 1）都是它。
"""

from collections import Counter
from collections.abc import Mapping
from typing import Optional

import torch
import torch.nn.functional as F

from functional_lm.config import ModelConfig
from functional_lm.layers import (
    KVSlot,
    build_attention_mask,
    cache_attention_mask,
    check_segment_ids,
    grad_needed,
    linear,
    rms_norm,
    segment_positions,
    transformer_block,
)
from functional_lm.models.cache import KVCache, advance, layer_slot, plan_write
from functional_lm.models.deepseek_v3 import FAMILY as DEEPSEEK_V3
from functional_lm.models.family import Family
from functional_lm.models.qwen2 import FAMILY as QWEN2
from functional_lm.models.qwen3 import FAMILY as QWEN3
from functional_lm.models.qwen3_moe import FAMILY as QWEN3_MOE
from functional_lm.shapes import Bool, Float, Integer, Tensor, typechecked, under_transform

__all__ = [
    "FAMILIES",
    "family_of",
    "layer_shapes",
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


# 家族名 → 家族描述（参数形状、两种混合器、RoPE 表）；解码栈对所有家族只有这一份。
FAMILIES: dict[str, Family] = {family.name: family for family in (QWEN2, QWEN3, QWEN3_MOE, DEEPSEEK_V3)}


def family_of(cfg: ModelConfig) -> Family:
    """配置所属家族的描述。"""
    return FAMILIES[cfg.family]


def layer_shapes(cfg: ModelConfig, index: int) -> dict[str, tuple[int, ...]]:
    """第 index 层的参数名（去掉 ``model.layers.{i}.`` 前缀）与形状，(out, in) 布局。"""
    return family_of(cfg).layer_shapes(cfg, index)


def param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """配置所要求的全部参数键与形状（共享嵌入时没有 ``lm_head.weight``）。"""
    shapes = {EMBED_KEY: (cfg.vocab_size, cfg.hidden_size)}
    for i in range(cfg.num_layers):
        shapes |= {f"model.layers.{i}.{name}": shape for name, shape in layer_shapes(cfg, i).items()}
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


def _listed(keys: list[str], limit: int = 5) -> str:
    """键列表的简短写法：最多列出 limit 个，其余以 … 表示。"""
    return f"{keys[:limit]}{' …' if len(keys) > limit else ''}"


def _majority_dtype(tensors: Mapping[str, Tensor]) -> torch.dtype:
    """出现最多的 dtype；票数相同时取嵌入矩阵的 dtype。"""
    counts = Counter(value.dtype for value in tensors.values())
    embed_dtype = tensors[EMBED_KEY].dtype if EMBED_KEY in tensors else None
    return max(counts, key=lambda dtype: (counts[dtype], dtype == embed_dtype))


def _odd_ones(tensors: Mapping[str, Tensor], attribute: str, reference: object, verb: str = "is") -> str:
    """属性（dtype / device）与参照不同的键，写成 ``key is value``，最多列 5 个；没有时为空串。"""
    odd = [f"{key} {verb} {getattr(value, attribute)}" for key, value in tensors.items()
           if getattr(value, attribute) != reference]
    return ", ".join(odd[:5]) + (f" (and {len(odd) - 5} more)" if len(odd) > 5 else "")


def _mixed_dtype_problem(tensors: Mapping[str, Tensor]) -> Optional[str]:
    """点名 dtype 与多数不同的键（例如 float32 参数中混进一个 float64）；全部一致时为 None。"""
    if not tensors:
        return None
    majority = _majority_dtype(tensors)
    odd = _odd_ones(tensors, "dtype", majority)
    if not odd:
        return None
    return f"mixed dtypes: most parameters are {majority}, but {odd}; cast all parameters to one dtype"


def _device_problem(tensors: Mapping[str, Tensor]) -> Optional[str]:
    """点名与嵌入矩阵不在同一设备上的键；全部一致（或缺嵌入）时为 None。"""
    if EMBED_KEY not in tensors:
        return None
    device = tensors[EMBED_KEY].device
    odd = _odd_ones(tensors, "device", device, verb="is on")
    if not odd:
        return None
    return f"mixed devices: {EMBED_KEY} is on {device}, but {odd}"


def _tensor_problem(key: str, value: object, shape: tuple[int, ...]) -> Optional[str]:
    """单个参数的问题（类型、形状、非浮点 dtype）；没有问题时为 None。"""
    if not isinstance(value, Tensor):
        return f"{key} is {type(value).__name__}, expected a Tensor"
    if tuple(value.shape) != shape:
        return f"{key} has shape {tuple(value.shape)}, expected {shape}"
    if not value.dtype.is_floating_point:
        return f"{key} has dtype {value.dtype}, expected a floating dtype"
    return None


def check_params(params: Mapping[str, Tensor], cfg: ModelConfig) -> None:
    """显式核对参数字典与配置，所有问题合成一条点名的 ValueError。

    检查：缺键、多键、形状不符、非浮点 dtype，以及 dtype 不一致（点名少数派的键与多数 dtype）、
    设备与嵌入矩阵不一致的键——否则这些错误要到 ``F.linear`` 深处才以难懂的消息出现。
    """
    expected = param_shapes(cfg)
    missing = [key for key in expected if key not in params]
    extra = [key for key in params if key not in expected]
    problems = []
    if missing:
        problems.append(f"missing keys {_listed(missing)}")
    if extra:
        hint = " (lm_head.weight present but cfg.tie_word_embeddings=True)" if LM_HEAD_KEY in extra else ""
        problems.append(f"unexpected keys {_listed(extra)}{hint}")
    good: dict[str, Tensor] = {}
    for key, shape in expected.items():
        if key not in params:
            continue
        problem = _tensor_problem(key, params[key], shape)
        if problem is None:
            good[key] = params[key]
        else:
            problems.append(problem)
    problems += [p for p in (_mixed_dtype_problem(good), _device_problem(good)) if p is not None]
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
    return {name: params[prefix + name] for name in layer_shapes(cfg, index)}


def output_weight(params: Mapping[str, Tensor], cfg: ModelConfig) -> Float[Tensor, "v d"]:
    """输出投影矩阵：共享嵌入时就是嵌入张量本身（同一个对象），否则为 ``lm_head.weight``。"""
    return params[EMBED_KEY] if cfg.tie_word_embeddings else params[LM_HEAD_KEY]


@typechecked
def embed(input_ids: Integer[Tensor, "b t"], table: Float[Tensor, "v d"]) -> Float[Tensor, "b t d"]:
    """按 token id 取嵌入向量。"""
    return F.embedding(input_ids, table)


def _validate(params, input_ids, cfg, position_ids, attention_mask, segment_ids=None) -> None:
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
    if segment_ids is not None:
        check_segment_ids(segment_ids, tuple(input_ids.shape))


def _decoder_stack(
    params: Mapping[str, Tensor], x: Tensor, cfg: ModelConfig, *, rope, mask, dropout_p: float,
    cache: Optional[KVCache] = None, slots: Optional[Tensor] = None, family: Optional[Family] = None,
) -> tuple[Tensor, list[KVSlot]]:
    """num_layers 个解码块 + 最终 RMSNorm：所有路径（训练、完整前向、prefill、解码步）共用这一个层循环。

    给了缓存时第 i 层拿到自己的槽 layer_slot(cache, i, slots)，返回各层写入后的槽；否则返回空列表。
    family 缺省为 cfg 的家族；换掉它的混合器可以观察中间量（例如 models.routing 记下路由 logits）。
    """
    family = family or family_of(cfg)
    written: list[KVSlot] = []
    for i in range(cfg.num_layers):
        layer = layer_params(params, cfg, i)
        mixers = {"attention": family.attention, "ffn": family.ffn(cfg, i)}
        if cache is None:
            x = transformer_block(x, layer, cfg, rope=rope, mask=mask, dropout_p=dropout_p, **mixers)
            continue
        x, kv = transformer_block(
            x, layer, cfg, rope=rope, mask=mask, dropout_p=dropout_p, kv=layer_slot(cache, i, slots), **mixers
        )
        written.append(kv)
    return rms_norm(x, params[FINAL_NORM_KEY], cfg.norm_eps), written


@typechecked
def decode_embeddings(
    params: Mapping[str, Tensor],
    x: Float[Tensor, "b t d"],
    cfg: ModelConfig,
    *,
    position_ids: Integer[Tensor, "b t"],
    attention_mask: Optional[Integer[Tensor, "b t"] | Bool[Tensor, "b t"]] = None,
    segment_ids: Optional[Integer[Tensor, "b t"]] = None,
    training: bool = False,
    family: Optional[Family] = None,
) -> Float[Tensor, "b t d"]:
    """从嵌入向量出发：num_layers 个解码块 + 最终 RMSNorm（不带缓存）。

    单独暴露出来，便于对嵌入求导（例如用梯度检验因果性）或输入自定义嵌入。
    family：换掉家族的混合器（缺省为 cfg 的家族），见 _decoder_stack。
    segment_ids：打包文档的编号，注意力不跨文档（见 layers.gqa_attention）。
    """
    # RoPE 表与注意力掩码对所有层相同，只建一次。
    rope = (family or family_of(cfg)).rope(position_ids, cfg, x.dtype)
    dropout_p = cfg.dropout if training else 0.0
    mask = build_attention_mask(
        x.shape[1], attention_mask=attention_mask, segment_ids=segment_ids, dropout_p=dropout_p,
        needs_grad=grad_needed(x, params),
    )
    return _decoder_stack(params, x, cfg, rope=rope, mask=mask, dropout_p=dropout_p, family=family)[0]


def _check_cache_call(input_ids: Tensor, cache: KVCache, position_ids, segment_ids) -> None:
    """缓存路径的入口核对：批大小与缓存相同；位置由缓存给出，不接受 position_ids；不支持打包文档。"""
    if position_ids is not None or segment_ids is not None:
        raise ValueError("forward with a KV cache takes no position_ids / segment_ids (positions come from the cache)")
    if input_ids.shape[0] != cache.mask.shape[0]:
        raise ValueError(f"prompt batch {input_ids.shape[0]} != cache batch {cache.mask.shape[0]}")


def _cached_hidden(
    params: Mapping[str, Tensor], input_ids: Tensor, cfg: ModelConfig, cache: KVCache,
    attention_mask: Optional[Tensor], dropout_p: float,
) -> tuple[Tensor, KVCache]:
    """把 t 个新 token 写进缓存槽位 index … index+t−1：返回最终 RMSNorm 后的隐藏状态与新缓存。

    注意力在全部 S 个槽位上做，用布尔掩码遮住未写入槽位、左填充与未来位置（cache_attention_mask），
    所以 t = 1 的解码步形状静态、不依赖当前长度。
    """
    plan = plan_write(cache, input_ids, attention_mask)
    mask = cache_attention_mask(plan.filled, plan.slots)
    x = embed(input_ids, params[EMBED_KEY])
    rope = family_of(cfg).rope(plan.positions, cfg, x.dtype)  # 所有层共用
    hidden, written = _decoder_stack(
        params, x, cfg, rope=rope, mask=mask, dropout_p=dropout_p, cache=cache, slots=plan.slots
    )
    return hidden, advance(cache, plan, written)


@typechecked
def forward_hidden(
    params: Mapping[str, Tensor],
    input_ids: Integer[Tensor, "b t"],
    cfg: ModelConfig,
    *,
    position_ids: Optional[Integer[Tensor, "b t"]] = None,
    attention_mask: Optional[Integer[Tensor, "b t"] | Bool[Tensor, "b t"]] = None,
    segment_ids: Optional[Integer[Tensor, "b t"]] = None,
    training: bool = False,
    check: bool = True,
    cache: Optional[KVCache] = None,
) -> Float[Tensor, "b t d"] | tuple[Float[Tensor, "b t d"], KVCache]:
    """最终 RMSNorm 之后的隐藏状态 (b, t, d)；分块蒸馏损失直接使用它和输出投影矩阵。

    attention_mask: 1 = 真实 token，0 = 填充（有缓存时只能是左填充）；缺省时为纯因果注意力（最快的路径）。
    segment_ids: 打包文档的编号 (b, t)，同一编号 = 同一篇文档，每行单调不减：每个 token 只看本文档
        之前的 token，位置（position_ids 缺省时）在每篇文档开头从 0 重新数。
    training: 为真且 cfg.dropout > 0 时在注意力概率上做 dropout。
    check: 逐键核对参数字典与 token id（缺省开启）；训练器在开始时核对过一次后传 False——
        对按层 all-gather 的切分教师，逐键核对会把每一层多取一遍。解码步也传 False。
    cache: KV 缓存（models.cache.KVCache）：给了时 t 个 token 接着缓存往下写，返回 (隐藏状态, 新缓存)。
    """
    if check:
        _validate(params, input_ids, cfg, position_ids, attention_mask, segment_ids)
    dropout_p = cfg.dropout if training else 0.0
    if cache is not None:
        if check:
            _check_cache_call(input_ids, cache, position_ids, segment_ids)
        return _cached_hidden(params, input_ids, cfg, cache, attention_mask, dropout_p)
    if position_ids is None:
        position_ids = (
            segment_positions(segment_ids, attention_mask) if segment_ids is not None
            else default_position_ids(input_ids, attention_mask)
        )
    x = embed(input_ids, params[EMBED_KEY])
    return decode_embeddings(
        params, x, cfg, position_ids=position_ids, attention_mask=attention_mask, segment_ids=segment_ids,
        training=training,
    )


@typechecked
def forward(
    params: Mapping[str, Tensor],
    input_ids: Integer[Tensor, "b t"],
    cfg: ModelConfig,
    *,
    position_ids: Optional[Integer[Tensor, "b t"]] = None,
    attention_mask: Optional[Integer[Tensor, "b t"] | Bool[Tensor, "b t"]] = None,
    segment_ids: Optional[Integer[Tensor, "b t"]] = None,
    training: bool = False,
    cache: Optional[KVCache] = None,
) -> Float[Tensor, "b t v"] | tuple[Float[Tensor, "b t v"], KVCache]:
    """完整前向：input_ids (b, t) → logits (b, t, vocab_size)；给了 cache 时返回 (logits, 新缓存)。

    自动生成 position_ids 与因果遮罩（给了 segment_ids 时为文档内的因果遮罩，见 forward_hidden）；
    输出投影在共享嵌入时直接读取嵌入张量，因此嵌入的梯度同时得到输入端与输出端两份贡献。
    """
    out = forward_hidden(
        params, input_ids, cfg, position_ids=position_ids, attention_mask=attention_mask,
        segment_ids=segment_ids, training=training, cache=cache,
    )
    if cache is None:
        return linear(out, output_weight(params, cfg))
    hidden, cache = out
    return linear(hidden, output_weight(params, cfg)), cache


def unique_tensors(params: Mapping[str, Tensor]) -> list[Tensor]:
    """字典里的不同张量（同一个张量出现在多个键下时只取一次，按首次出现的顺序）。"""
    first: dict[int, Tensor] = {}
    for value in params.values():
        first.setdefault(id(value), value)
    return list(first.values())


def count_parameters(params: Mapping[str, Tensor]) -> int:
    """参数总数；同一个张量（共享嵌入）只计一次。"""
    return sum(value.numel() for value in unique_tensors(params))
