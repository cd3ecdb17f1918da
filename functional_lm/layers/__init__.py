"""各家族共用的纯函数层：RMSNorm、RoPE、GQA 注意力（可带 Qwen3 的 QK-norm）、SwiGLU 与 Transformer 块（可带一层的 KV 缓存槽）。

MoE 路由与专家（layers.moe）、多头潜在注意力（layers.mla）、YaRN（layers.rope）是同一楼层的子模块，
以同样的签名插进 transformer_block。

图例（见 functional_lm/shapes.py）：b 批，t 查询位置，s 键位置，d 隐藏，h 查询头，k 键值头，
g = h/k，e 头维度，f 前馈隐藏，he = h·e，ke = k·e。

结构选择（与 Qwen2 / Qwen2.5 一致，真实检查点无需任何权重置换）：
    * Pre-norm：x + attn(norm(x))；x + ffn(norm(x))；
    * RMSNorm 在 float32 中计算后转回输入 dtype，再乘可学习权重；
    * RoPE 使用 "rotate-half" 约定：头维度的前半与后半配对旋转；
    * GQA：k 个键值头被扩展（重复）到 h 个查询头；
    * q/k/v 投影可带偏置，o 投影无偏置；前馈网络为无偏置的 SwiGLU；
    * 块只写一遍：训练 / 完整前向不带缓存；prefill 与解码步给块一个 ``KVSlot``（这一层的 k、v 缓存与
      写入槽位），块把新键值写进去、在整个缓存上做注意力，并把新的槽返回（数据进、数据出，jax-llm-examples 风格）。

这里所有函数都是纯函数：输入张量，输出张量，不读写任何全局状态（dropout 例外，
仅在显式传入 dropout_p > 0 时使用 torch 的随机数生成器）。
"""

import functools
import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, Optional

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from functional_lm.config import ModelConfig
from functional_lm.shapes import Bool, Float, Integer, Tensor, typechecked, under_transform

__all__ = [
    "rms_norm",
    "rope_tables",
    "apply_rope",
    "linear",
    "streaming_linear",
    "fusion_barrier",
    "expand_kv",
    "project_qkv",
    "attend",
    "attention_bias_mask",
    "cache_attention_mask",
    "KVSlot",
    "write_kv",
    "check_segment_ids",
    "segment_positions",
    "segment_mask",
    "segment_block_mask",
    "build_attention_mask",
    "grad_needed",
    "AttentionMask",
    "gqa_attention",
    "swiglu",
    "dense_ffn",
    "sub_params",
    "transformer_block",
]

RopeTables = tuple[Float[Tensor, "b t e"], Float[Tensor, "b t e"]]
# 预先建好、所有层共用的注意力掩码：None = 纯因果；布尔张量 (b, 1, t, s)，True = 可以看；
# 或 FlexAttention 的 BlockMask（编译 / CUDA 下的文档掩码，整块被遮的键块直接跳过）。
AttentionMask = Optional[Bool[Tensor, "b 1 t s"] | BlockMask]


class KVSlot(NamedTuple):
    """一层的 KV 缓存槽：预分配的 k、v（RoPE 之后的键与值，S 个槽位）与本次写入的槽位下标。

    t 个新 token 写到槽位 slots[0] … slots[t−1]（全批共用：左填充让各行末尾对齐）。
    """

    k: Float[Tensor, "b k s e"]  # 这一层的键缓存
    v: Float[Tensor, "b k s e"]  # 这一层的值缓存
    slots: Integer[Tensor, "t"]  # 新 token 写入的槽位


@typechecked
def rms_norm(x: Float[Tensor, "*batch d"], weight: Float[Tensor, "d"], eps: float) -> Float[Tensor, "*batch d"]:
    """RMSNorm：y = x · rsqrt(mean(x²) + ε) · γ。

    均方至少在 float32 中计算（bf16 下平方和会丢精度；float64 输入保持 float64），
    归一化结果先转回输入 dtype 再乘 γ，与 Hugging Face Qwen2RMSNorm 的运算顺序逐位一致。
    """
    x32 = x.to(torch.promote_types(x.dtype, torch.float32))
    mean_square = x32.pow(2).mean(dim=-1, keepdim=True)  # (…, 1)：每个位置的 mean(x²)
    normed = x32 * torch.rsqrt(mean_square + eps)  # 均方根归一到 ≈ 1
    return weight * normed.to(x.dtype)


@typechecked
def rope_tables(
    position_ids: Integer[Tensor, "b t"],
    head_dim: int,
    theta: float,
    dtype: torch.dtype = torch.float32,
) -> RopeTables:
    """按 position_ids 生成 RoPE 的 cos / sin 表，形状 (b, t, e)。

    数学：对头维度的第 i 对（i = 0 … e/2−1），逆频率 ω_i = 1 / θ^(2i/e)；
    位置 p 的旋转角 φ_{p,i} = p · ω_i。rotate-half 约定把第 i 维与第 i + e/2 维配成一对，
    因此角度表沿最后一维重复两次：[φ_0 … φ_{e/2−1}, φ_0 … φ_{e/2−1}]。
    角度至少在 float32 中计算（位置可达 10⁵ 量级，bf16 会严重失真；float64 时用 float64），
    最后才转成 dtype。float32 下与 Hugging Face Qwen2 的计算逐位一致。
    """
    angle_dtype = torch.promote_types(dtype, torch.float32)
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=position_ids.device).to(angle_dtype)
    inv_freq = 1.0 / (theta ** (exponents / head_dim))  # (e/2,)：ω_i = θ^(−2i/e)
    angles = position_ids.to(angle_dtype)[..., None] * inv_freq  # (b, t, e/2)：φ = p · ω
    angles = repeat(angles, "b t half -> b t (two half)", two=2)  # 前后两半共享同一角度
    return angles.cos().to(dtype), angles.sin().to(dtype)


def _rotate_half(x: Tensor) -> Tensor:
    """把 [x₁, x₂]（前半、后半）变成 [−x₂, x₁]，即每对 (x₁ᵢ, x₂ᵢ) 乘以虚数单位 i。"""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


@typechecked
def apply_rope(
    x: Float[Tensor, "b n t e"], cos: Float[Tensor, "b t e"], sin: Float[Tensor, "b t e"]
) -> Float[Tensor, "b n t e"]:
    """对 q 或 k（n 个头）施加旋转位置编码。

    数学：把第 i 维与第 i + e/2 维看作复数 z = x₁ + i·x₂，旋转角 φ：
        z · e^{iφ} = (x₁cosφ − x₂sinφ) + i(x₂cosφ + x₁sinφ)
    写成向量形式即 x·cos + rotate_half(x)·sin。由于 ⟨R(p)q, R(p')k⟩ = ⟨q, R(p'−p)k⟩，
    旋转后的点积只依赖相对位置 p' − p。
    """
    cos = rearrange(cos, "b t e -> b 1 t e")  # 所有头共享同一张表
    sin = rearrange(sin, "b t e -> b 1 t e")
    return (x * cos) + (_rotate_half(x) * sin)


# 行数不超过它的 linear 在 torch.compile（CPU）之下改用 streaming_linear（见其说明）。
STREAMING_MAX_ROWS = 8


@torch.library.custom_op("functional_lm::fusion_barrier", mutates_args=())
def fusion_barrier(x: Tensor) -> Tensor:
    """返回 x 的一份拷贝。数学上是恒等映射（梯度原样传回）；它的用处是对 inductor 不透明：

    编译时 x 必须先算好、写进内存，下游的循环只读这块内存，而不会把产生 x 的逐元素计算
    （RMSNorm、残差相加、嵌入查表……）内联进去、在每次迭代里重算。见 streaming_linear。
    """
    return x.clone()


@fusion_barrier.register_fake
def _fusion_barrier_fake(x: Tensor) -> Tensor:
    return torch.empty_like(x)


fusion_barrier.register_autograd(lambda ctx, grad: grad)


@typechecked
def linear(
    x: Float[Tensor, "*batch i"], weight: Float[Tensor, "o i"], bias: Optional[Float[Tensor, "o"]] = None
) -> Float[Tensor, "*batch o"]:
    """y = x Wᵀ + b；权重保持 (out, in) 布局，与 nn.Linear / HF 检查点一致。

    eager 下总是 ``F.linear``（与 transformers 逐位一致）。在 torch.compile 追踪 CPU 代码、且输入只有
    几行（≤ STREAMING_MAX_ROWS，即解码步）时改写成 ``streaming_linear``：数学相同，只是求和顺序不同
    （差在 float32 舍入量级），读权重的速度约为 MKL 矩阵-向量乘的 3 倍。行数在编译时是静态的，
    这个分支在图里被常量折叠。
    """
    if torch.compiler.is_compiling() and x.device.type == "cpu" and 0 < math.prod(x.shape[:-1]) <= STREAMING_MAX_ROWS:
        return streaming_linear(x, weight, bias)
    return F.linear(x, weight, bias)


@typechecked
def streaming_linear(
    x: Float[Tensor, "*batch i"], weight: Float[Tensor, "o i"], bias: Optional[Float[Tensor, "o"]] = None
) -> Float[Tensor, "*batch o"]:
    """y = x Wᵀ + b 的“逐权重行流式”写法，供只有几行输入的解码步在 torch.compile 下使用。

    数学与 ``linear`` 相同：y[r, o] = Σ_i x[r, i] · W[o, i] (+ b[o])。每个输入行写成一次
    “逐元素乘 + 末维求和” (W ⊙ x_r).sum(−1)；inductor 把它编译成一个不落中间张量的循环：
    按顺序扫过权重行 o，与 x_r 做一次向量化点积。几行输入的这些归约迭代空间相同、读同一个 W，
    inductor 可以把它们横向融合进同一个循环（实测 r = 2 的解码步只比 r = 1 慢约 6%）。

    为什么更快：解码时每读 4 字节权重只做 2r 次浮点运算，速度由读权重的带宽决定。
    MKL 的 sgemm 在 r = 1…8 时在 2 核 AVX-512 CPU 上只跑出约 10 GB/s，这个融合循环约 25–30 GB/s
    （151936×512 的输出投影：约 29 ms → 10–13 ms）。
    输入行先经过 ``fusion_barrier``：否则 inductor 会把上游的逐元素计算（最终 RMSNorm、残差、嵌入查表）
    内联进归约循环、对每个权重元素重算一遍——实测 r = 8 的输出投影因此从约 18 ms 变成约 53 ms，
    写成一次广播乘 W[o, 1, i] · x[1, r, i] 时整个解码步甚至慢几十倍。
    代价：eager 下逐元素乘会真的物化 (o, i) 的中间张量，所以 eager 代码不要直接调用它，
    ``linear`` 只在编译时选它。累加至少在 float32 中进行（bf16 权重的上转融合在读取里，不多占内存）。
    """
    acc = torch.promote_types(x.dtype, torch.float32)
    rows = fusion_barrier(rearrange(x, "... i -> (...) i").to(acc))  # (r, i)：先算好，不被内联
    w = weight.to(acc)
    out = torch.stack([(w * row).sum(dim=-1) for row in rows.unbind(0)])  # (r, o)
    if bias is not None:
        out = out + bias
    return out.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])


@typechecked
def expand_kv(x: Float[Tensor, "b k s e"], groups: int) -> Float[Tensor, "b h s e"]:
    """GQA 的头扩展：把 k 个键值头各复制 g 份，得到 h = k·g 个头。

    查询头 j 使用键值头 ⌊j / g⌋（与 HF repeat_kv 的顺序相同：(k g) 中 k 在外层）。
    """
    return repeat(x, "b k s e -> b (k g) s e", g=groups)


@typechecked
def project_qkv(
    x: Float[Tensor, "b t d"],
    attn: Mapping[str, Tensor],
    cfg: ModelConfig,
    cos: Float[Tensor, "b t e"],
    sin: Float[Tensor, "b t e"],
) -> tuple[Float[Tensor, "b h t e"], Float[Tensor, "b k t e"], Float[Tensor, "b k t e"]]:
    """q/k/v 投影（可带偏置）、拆成多头、[Qwen3：每头 RMSNorm]，并对 q、k 施加 RoPE；v 不旋转。

    attn 是一层注意力的参数视图，键为 ``q_proj.weight``、``q_proj.bias`` 等（偏置可缺省）；
    cfg.qk_norm 时还有 ``q_norm.weight``、``k_norm.weight``，形状 (e,)。
    """
    q = linear(x, attn["q_proj.weight"], attn.get("q_proj.bias"))  # (b, t, h·e)
    k = linear(x, attn["k_proj.weight"], attn.get("k_proj.bias"))  # (b, t, k·e)
    v = linear(x, attn["v_proj.weight"], attn.get("v_proj.bias"))  # (b, t, k·e)
    q = rearrange(q, "b t (h e) -> b h t e", e=cfg.head_dim)
    k = rearrange(k, "b t (k e) -> b k t e", e=cfg.head_dim)
    v = rearrange(v, "b t (k e) -> b k t e", e=cfg.head_dim)
    if cfg.qk_norm:
        # Qwen3 的 QK-norm：RoPE 之前对每个头的 q、k 各做一次 RMSNorm（权重 (e,) 在头之间共享），
        # q ← q · rsqrt(mean_e(q²) + ε) · γ_q，k 同理；注意力 logit 的尺度因此不随训练漂移。
        q = rms_norm(q, attn["q_norm.weight"], cfg.norm_eps)
        k = rms_norm(k, attn["k_norm.weight"], cfg.norm_eps)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


@typechecked
def attention_bias_mask(
    attention_mask: Integer[Tensor, "b s"] | Bool[Tensor, "b s"], num_queries: int
) -> Bool[Tensor, "b 1 t s"]:
    """由填充掩码（1/True = 真实 token，0/False = 填充）和因果约束合成布尔注意力掩码。

    查询 i（对应最后 t 个键位置中的第 i 个）可以看键 j，当且仅当 j ≤ i + (s − t) 且键 j 不是填充。
    此外总允许看自己所在的对角位置：左填充时填充位置的整行都会被遮住，softmax 会得到 NaN；
    让它看自己只改变填充位置（其输出无人使用）的值，真实位置不受影响。
    """
    num_keys = attention_mask.shape[-1]
    offset = num_keys - num_queries
    q_pos = torch.arange(num_queries, device=attention_mask.device)[:, None] + offset
    k_pos = torch.arange(num_keys, device=attention_mask.device)[None, :]
    causal = k_pos <= q_pos  # (t, s)
    keep = causal & rearrange(attention_mask.bool(), "b s -> b 1 1 s")
    return keep | (k_pos == q_pos)


@typechecked
def cache_attention_mask(filled: Bool[Tensor, "b s"], slots: Integer[Tensor, "t"]) -> Bool[Tensor, "b 1 t s"]:
    """缓存上的注意力掩码：查询 i（槽位 slots[i]）可看键槽位 j ⇔ j 存着真实 token 且 j ≤ slots[i]；另外总可看自己。

    filled：写入本次 token 之后，每个槽位是否存着真实 token（左填充与尚未写入的槽位为假）。
    “总可看自己”只影响左填充位置上的查询（否则整行被遮、softmax 得 NaN），其输出无人使用。
    掩码覆盖全部 S 个槽位，所以解码步的形状不依赖当前长度。
    """
    key_slots = torch.arange(filled.shape[1], device=filled.device)
    causal = key_slots[None, :] <= slots[:, None]  # (t, S)
    keep = causal & rearrange(filled, "b s -> b 1 1 s")
    return keep | (key_slots[None, :] == slots[:, None])


@typechecked
def write_kv(kv: KVSlot, k: Float[Tensor, "b k t e"], v: Float[Tensor, "b k t e"]) -> KVSlot:
    """把 t 个新键值写进槽位 kv.slots：k_cache[:, :, slots[i]] ← k[:, :, i]（v 同理）。

    非原地的 ``index_copy``：输入缓存不变，返回新的槽（像 JAX 一样数据进、数据出）；
    每步多一次缓存拷贝，量级 b·k·S·e，远小于每步读一遍的权重。
    """
    return KVSlot(kv.k.index_copy(2, kv.slots, k), kv.v.index_copy(2, kv.slots, v), kv.slots)


def check_segment_ids(segment_ids: object, shape: tuple[int, ...], where: str = "segment_ids") -> None:
    """核对文档编号：整数张量、形状与 input_ids 相同、每行单调不减（打包器只会产出这样的编号）。

    取值检查要读张量内容，只在 eager 下做；torch.compile / torch.func 变换之下让路。
    """
    if not isinstance(segment_ids, Tensor):
        raise ValueError(f"{where} must be a torch.Tensor, got {type(segment_ids).__name__}")
    if segment_ids.dtype.is_floating_point or segment_ids.dtype.is_complex or segment_ids.dtype == torch.bool:
        raise ValueError(f"{where} must be an integer tensor (one document id per token), got dtype {segment_ids.dtype}")
    if tuple(segment_ids.shape) != tuple(shape):
        raise ValueError(f"{where} must have the shape of input_ids {tuple(shape)}, got {tuple(segment_ids.shape)}")
    if torch.compiler.is_compiling() or under_transform(segment_ids) or segment_ids.shape[-1] < 2:
        return
    drops = (segment_ids[:, 1:] < segment_ids[:, :-1]).nonzero()
    if len(drops):
        row, col = (int(i) for i in drops[0])
        raise ValueError(
            f"{where} must be non-decreasing along each row (one run of equal ids per packed document), but row "
            f"{row} goes from {int(segment_ids[row, col])} to {int(segment_ids[row, col + 1])} at position {col + 1}"
        )


@typechecked
def segment_positions(
    segment_ids: Integer[Tensor, "b t"],
    attention_mask: Optional[Integer[Tensor, "b t"] | Bool[Tensor, "b t"]] = None,
) -> Integer[Tensor, "b t"]:
    """每个文档内从 0 重新数起的位置：p_i = i − start(i)，start(i) 为 token i 所在文档的第一个位置。

    文档起点是编号与前一个 token 不同的位置（行首总是起点）；start(i) = max{j ≤ i : j 是起点}，用 cummax 求。
    给了填充掩码时只数真实 token（与无文档编号时的 default_position_ids 一致，左填充的第一个真实 token 为 0）：
    p_i = c_i − (c_{start(i)} − r_{start(i)}) − 1，c 为真实 token 的累计数，r 为该位置是否真实；填充处截到 0。
    """
    index = torch.arange(segment_ids.shape[1], device=segment_ids.device).expand_as(segment_ids)
    first = torch.ones_like(segment_ids[:, :1], dtype=torch.bool)
    is_start = torch.cat([first, segment_ids[:, 1:] != segment_ids[:, :-1]], dim=1)
    start = torch.where(is_start, index, torch.zeros_like(index)).cummax(dim=1).values
    if attention_mask is None:
        return index - start
    real = attention_mask.long()
    count = real.cumsum(dim=1)
    before = count.gather(1, start) - real.gather(1, start)  # 本文档开始之前的真实 token 数
    return (count - before - 1).clamp(min=0)


@typechecked
def segment_mask(
    segment_ids: Integer[Tensor, "b t"],
    attention_mask: Optional[Integer[Tensor, "b t"] | Bool[Tensor, "b t"]] = None,
) -> Bool[Tensor, "b 1 t t"]:
    """块对角因果掩码：查询 i 可以看键 j ⇔ j ≤ i 且 seg_i = seg_j（同一篇文档）。

    给了填充掩码时再遮住填充的键（对角位置总是保留，理由见 attention_bias_mask）。
    """
    same = rearrange(segment_ids, "b t -> b 1 t 1") == rearrange(segment_ids, "b s -> b 1 1 s")
    causal = torch.ones(segment_ids.shape[1], segment_ids.shape[1], dtype=torch.bool, device=segment_ids.device).tril()
    keep = same & causal
    if attention_mask is not None:
        keep = keep & attention_bias_mask(attention_mask, segment_ids.shape[1])
    return keep


def segment_block_mask(
    segment_ids: Integer[Tensor, "b t"], attention_mask: Optional[Tensor] = None
) -> BlockMask:
    """同一个掩码的 FlexAttention 形式（BlockMask）：按 128×128 的块记下哪些块全遮、哪些部分遮。

    flex_attention 跳过全遮的块——打包了许多短文档时，块对角之外的绝大部分注意力根本不计算。
    每批建一次、所有层共用（decode_embeddings 负责）。
    """
    padding = None if attention_mask is None else attention_mask.bool()

    def mask_mod(b, h, q_idx, kv_idx):
        keep = (segment_ids[b, q_idx] == segment_ids[b, kv_idx]) & (kv_idx <= q_idx)
        if padding is not None:
            keep = keep & (padding[b, kv_idx] | (kv_idx == q_idx))
        return keep

    batch, length = segment_ids.shape
    return create_block_mask(mask_mod, batch, None, length, length, device=segment_ids.device)


def _flex_wanted(segment_ids: Tensor, dropout_p: float, needs_grad: bool) -> bool:
    """文档掩码用不用 FlexAttention：CUDA 上用（eager 时走编译好的 flex）；CPU 上只在 torch.compile 追踪、
    且不需要反向时用（torch 2.13 的 CPU FlexAttention 没有反向：CPU 上的教师前向、推理用它，训练的学生用布尔掩码）。
    CPU eager 与 torch.func 变换之下用布尔掩码 + SDPA / 显式公式；要 dropout 时也用后者（flex 不做 dropout）。"""
    if dropout_p > 0.0 or (not torch.compiler.is_compiling() and under_transform(segment_ids)):
        return False
    if segment_ids.device.type == "cuda":
        return True
    return torch.compiler.is_compiling() and not needs_grad


def grad_needed(x: Tensor, params: Mapping[str, Tensor]) -> bool:
    """这次前向之后会不会反向穿过注意力：求导开着，且输入或任何一个参数需要梯度。"""
    return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params.values()))


def build_attention_mask(
    num_queries: int,
    *,
    attention_mask: Optional[Tensor] = None,
    segment_ids: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    needs_grad: bool = True,
) -> AttentionMask:
    """一批的注意力掩码，各层共用：无文档编号时为填充掩码（或 None = 纯因果），
    有文档编号时为块对角因果掩码——FlexAttention 的 BlockMask 或布尔张量（见 _flex_wanted）。
    needs_grad：之后是否要反向（见 grad_needed）；拿不准时保持缺省的 True（总是可以反向的选择）。"""
    if segment_ids is None:
        return None if attention_mask is None else attention_bias_mask(attention_mask, num_queries)
    if _flex_wanted(segment_ids, dropout_p, needs_grad):
        return segment_block_mask(segment_ids, attention_mask)
    return segment_mask(segment_ids, attention_mask)


def _attention_math(
    q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], dropout_p: float, scale: Optional[float] = None
) -> Tensor:
    """显式写出的注意力：P = softmax(q kᵀ / √e + M)，out = P v。

    torch.func 变换（jvp 的前向自动微分、vmap 的批处理规则）不支持 SDPA 的融合 CPU 内核，
    在这些变换之下改走这条全部由基本算子组成的路径，数学上与融合内核相同。
    """
    scores = torch.einsum("bhte,bhse->bhts", q, k) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if mask is None:
        t, s = q.shape[2], k.shape[2]
        mask = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(s - t)
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = scores.softmax(dim=-1)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p)
    return torch.einsum("bhts,bhse->bhte", probs, v)


@functools.cache
def _compiled_flex_attention():
    """eager 调用 FlexAttention 时用的编译版本（flex_attention 本身未编译时只是逐元素的参考实现）；
    只编译一次、之后复用，不含任何状态。"""
    return torch.compile(flex_attention, dynamic=False)


@typechecked
def attend(
    q: Float[Tensor, "b h t e"],
    k: Float[Tensor, "b k s e"],
    v: Float[Tensor, "b k s ev"],
    mask: AttentionMask = None,
    dropout_p: float = 0.0,
    scale: Optional[float] = None,
) -> Float[Tensor, "b h t ev"]:
    """缩放点积注意力：softmax(q kᵀ · c + M) v，c = scale（缺省 1/√e），M 在被遮位置为 −∞；v 的宽度可以不同于 e（MLA）。

    mask 为 None 时使用标准因果遮罩（要求 t == s，上三角 −∞）；布尔张量时使用给定的掩码；
    BlockMask（文档掩码，见 build_attention_mask）时走 FlexAttention，全遮的块不计算。
    eager / compile 下走 PyTorch 的 SDPA 融合内核；查询头 j 读键值头 ⌊j / g⌋。
    SDPA 的 ``enable_gqa`` 让内核直接按这个下标读 k、v，不必先把它们复制 g 份（``expand_kv``）：
    前向与复制后的结果逐位相同，k、v 的梯度在内核里把 g 个查询头的贡献求和，与 transformers 在无掩码时
    的做法一致。例外：CUDA 上带掩码的 enable_gqa 会退回数学内核，那里先复制（同 transformers）；
    torch.func 变换之下走等价的显式公式（也先复制）。
    """
    groups = q.shape[1] // k.shape[1]
    if q.shape[1] != groups * k.shape[1]:
        raise ValueError(f"attend: query heads {q.shape[1]} not a multiple of kv heads {k.shape[1]}")
    if mask is None and q.shape[2] != k.shape[2]:
        raise ValueError(f"attend: causal attention without a mask needs t == s, got t={q.shape[2]}, s={k.shape[2]}")
    if isinstance(mask, BlockMask):
        if dropout_p > 0.0:
            raise ValueError("attend: FlexAttention does not apply dropout; build a boolean mask when dropout_p > 0")
        flex = flex_attention if torch.compiler.is_compiling() else _compiled_flex_attention()
        return flex(q, k, v, block_mask=mask, enable_gqa=groups > 1, scale=scale)
    if not torch.compiler.is_compiling() and torch._C._functorch.is_functorch_wrapped_tensor(q):
        return _attention_math(q, expand_kv(k, groups), expand_kv(v, groups), mask, dropout_p, scale)
    native_gqa = groups > 1 and (mask is None or q.device.type == "cpu")
    if groups > 1 and not native_gqa:
        k, v = expand_kv(k, groups), expand_kv(v, groups)
    if mask is None:
        return F.scaled_dot_product_attention(
            q, k, v, dropout_p=dropout_p, is_causal=q.shape[2] > 1, enable_gqa=native_gqa, scale=scale
        )
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout_p, enable_gqa=native_gqa, scale=scale
    )


def _default_rope(x: Tensor, cfg: ModelConfig, position_ids, attention_mask, segment_ids) -> RopeTables:
    """没有预建 RoPE 表时按位置现建：位置缺省为 0…t−1（有 segment_ids 时在每篇文档开头从 0 重新数）。"""
    if position_ids is None:
        position_ids = (
            segment_positions(segment_ids, attention_mask) if segment_ids is not None
            else torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1)
        )
    return rope_tables(position_ids, cfg.rope_dim, cfg.rope_theta, x.dtype)


@typechecked
def gqa_attention(
    x: Float[Tensor, "b t d"],
    attn: Mapping[str, Tensor],
    cfg: ModelConfig,
    *,
    position_ids: Optional[Integer[Tensor, "b t"]] = None,
    rope: Optional[RopeTables] = None,
    attention_mask: Optional[Integer[Tensor, "b t"] | Bool[Tensor, "b t"]] = None,
    segment_ids: Optional[Integer[Tensor, "b t"]] = None,
    mask: AttentionMask = None,
    dropout_p: float = 0.0,
    kv: Optional[KVSlot] = None,
) -> Float[Tensor, "b t d"] | tuple[Float[Tensor, "b t d"], KVSlot]:
    """分组查询注意力（GQA）：投影 → RoPE → [写进缓存] → 因果注意力（k、v 按 GQA 共享）→ o 投影。

    参数：
        attn: 一层的注意力参数视图（``q_proj.weight`` … ``o_proj.weight``）。
        position_ids / rope: 显式位置或预先算好的 cos/sin 表（二选一，见 _default_rope）。
        attention_mask: (b, t) 填充掩码，1 = 真实 token，0 = 填充；缺省表示没有填充。
        segment_ids: (b, t) 打包文档的编号（同一编号 = 同一篇文档，每行单调不减，JAX 的约定）：
            注意力只在同一篇文档内、因果地进行，跨文档完全遮住。
        mask: 预先建好的掩码（build_attention_mask / cache_attention_mask 的结果，各层共用）。
        kv: 这一层的缓存槽：新键值写进 kv.slots，注意力在全部 S 个缓存槽位上做（此时 mask 必须给出），
            返回 (输出, 新槽)；缺省只返回输出。
    """
    if segment_ids is not None:
        check_segment_ids(segment_ids, tuple(x.shape[:2]))
    if mask is not None and (segment_ids is not None or attention_mask is not None):
        raise ValueError("gqa_attention: give either a prebuilt mask or attention_mask / segment_ids, not both")
    if kv is not None and mask is None:
        raise ValueError("gqa_attention: attention over a KV cache needs its prebuilt mask (cache_attention_mask)")
    cos, sin = rope if rope is not None else _default_rope(x, cfg, position_ids, attention_mask, segment_ids)
    q, k, v = project_qkv(x, attn, cfg, cos, sin)
    if kv is not None:
        kv = write_kv(kv, k, v)  # (b, k, S, e)：新键值写到各自的槽位，注意力读整个缓存
        k, v = kv.k, kv.v
    if mask is None:
        mask = build_attention_mask(
            x.shape[1], attention_mask=attention_mask, segment_ids=segment_ids, dropout_p=dropout_p,
            needs_grad=grad_needed(x, attn),
        )
    out = rearrange(attend(q, k, v, mask, dropout_p), "b h t e -> b t (h e)")
    out = linear(out, attn["o_proj.weight"])
    return out if kv is None else (out, kv)


@typechecked
def swiglu(
    x: Float[Tensor, "*batch d"],
    gate_w: Float[Tensor, "f d"],
    up_w: Float[Tensor, "f d"],
    down_w: Float[Tensor, "d f"],
) -> Float[Tensor, "*batch d"]:
    """SwiGLU 前馈：down( SiLU(gate(x)) ⊙ up(x) )。

    数学：SiLU(z) = z · σ(z)。门控分支 SiLU(x W_gᵀ) 逐元素地调制线性分支 x W_uᵀ，
    再由 W_d 投影回隐藏维度；三个投影都没有偏置。
    """
    gate = F.silu(linear(x, gate_w))  # (…, f)：门
    return linear(gate * linear(x, up_w), down_w)


def dense_ffn(x: Float[Tensor, "b t d"], mlp: Mapping[str, Tensor], cfg: ModelConfig) -> Float[Tensor, "b t d"]:
    """稠密前馈层：一层 ``mlp.`` 参数视图上的 SwiGLU（gate_proj / up_proj / down_proj）。"""
    return swiglu(x, mlp["gate_proj.weight"], mlp["up_proj.weight"], mlp["down_proj.weight"])


def sub_params(params: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """取出以 prefix 开头的参数并去掉前缀（只是引用，不复制张量），例如一层里的 ``self_attn.``。"""
    return {key[len(prefix) :]: value for key, value in params.items() if key.startswith(prefix)}


@typechecked
def transformer_block(
    x: Float[Tensor, "b t d"],
    layer: Mapping[str, Tensor],
    cfg: ModelConfig,
    *,
    rope: RopeTables,
    attention_mask: Optional[Integer[Tensor, "b t"] | Bool[Tensor, "b t"]] = None,
    segment_ids: Optional[Integer[Tensor, "b t"]] = None,
    mask: AttentionMask = None,
    dropout_p: float = 0.0,
    kv: Optional[KVSlot] = None,
    attention: Optional[Callable[..., Any]] = None,
    ffn: Optional[Callable[[Tensor, Mapping[str, Tensor], ModelConfig], Tensor]] = None,
) -> Float[Tensor, "b t d"] | tuple[Float[Tensor, "b t d"], KVSlot]:
    """一个 Pre-norm 解码块：x ← x + attn(norm(x))；x ← x + ffn(norm(x))。所有家族共用这一个块。

    layer 是去掉 ``model.layers.{i}.`` 前缀后的参数视图。残差路径不经过任何变换，
    因此权重全零时块是恒等映射。attention_mask / segment_ids / mask 的含义见 gqa_attention。
    kv：这一层的缓存槽（prefill / 解码步）；给了时返回 (x, 写入新键值后的槽)，缺省只返回 x。
    attention / ffn：这一层的两个混合器，缺省为 GQA（gqa_attention）与稠密 SwiGLU（dense_ffn）；
    家族把它们换成 MLA（layers.mla）或 MoE（layers.moe），签名相同：
    attention(x, self_attn 参数, cfg, rope=, attention_mask=, segment_ids=, mask=, dropout_p=, kv=)，
    ffn(x, mlp 参数, cfg)。训练、完整前向与缓存解码走的是同一个块，三者的数值只差在注意力看到的键值来自哪里。
    """
    attention = gqa_attention if attention is None else attention
    ffn = dense_ffn if ffn is None else ffn
    attn_in = rms_norm(x, layer["input_layernorm.weight"], cfg.norm_eps)
    attn_out = attention(
        attn_in, sub_params(layer, "self_attn."), cfg, rope=rope, attention_mask=attention_mask,
        segment_ids=segment_ids, mask=mask, dropout_p=dropout_p, kv=kv,
    )
    if kv is not None:
        attn_out, kv = attn_out
    x = x + attn_out
    ffn_out = ffn(rms_norm(x, layer["post_attention_layernorm.weight"], cfg.norm_eps), sub_params(layer, "mlp."), cfg)
    return x + ffn_out if kv is None else (x + ffn_out, kv)
