"""模型与训练配置：冻结（不可变）的 dataclass，构造时校验，外加按名字查找的预设表。

校验失败一律抛出 ValueError，消息里写明字段名、收到的值和期望的范围。
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Mapping
from typing import Any, Optional

__all__ = [
    "ModelConfig", "YarnScaling", "FAMILIES", "MOE_FAMILIES", "TrainingConfig", "PRESETS", "get_preset", "DIVERGENCE_NAMES", "TEACHER_SHARDINGS", "cache_root",
    "Bounds", "MODEL_BOUNDS", "TRAINING_BOUNDS", "POSITIVE", "NON_NEGATIVE", "PROBABILITY", "POSITIVE_INT", "SEED",
    "TOP_P", "SAMPLING_TEMPERATURE", "ON_POLICY_ESTIMATORS",
]

# 蒸馏散度的名字（与 functional_lm.losses.DIVERGENCES 相同；配置层不依赖损失模块，测试保证两者一致）。
DIVERGENCE_NAMES: tuple[str, ...] = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd")
# 多进程训练时教师的放置：每个进程一份完整副本，或用 FSDP2 按层切分到各进程（放不进单个设备的教师）。
TEACHER_SHARDINGS: tuple[str, ...] = ("replicate", "shard")


def _num(x: float) -> str:
    """范围端点的写法：整数原样（种子上界 4294967295 不写成 4.29e+09），浮点用 %g。"""
    return str(x) if isinstance(x, int) else f"{x:g}"


@dataclass(frozen=True)
class Bounds:
    """一个数值设置的合法范围：所有命令行选项与配置字段共用的唯一检查（``check``）。

    low / high 为 None 表示该侧无界；low_open / high_open 表示不含端点，例如 top-p ∈ (0, 1] 是
    ``Bounds(0, 1, low_open=True)``。浮点值还必须有限（NaN、±inf 一律拒绝），integer=True 时必须是 int。
    note 是附在范围后的说明，例如 "(0 = greedy)"。
    """

    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    high_open: bool = False
    integer: bool = False
    note: str = ""

    def describe(self) -> str:
        """范围的文字：两侧有界为区间 "in [0, 1)"，一侧有界为 "> 0" / ">= 0"（浮点加 "a finite number"）。"""
        if self.low is not None and self.high is not None:
            text = f"in {'(' if self.low_open else '['}{_num(self.low)}, {_num(self.high)}{')' if self.high_open else ']'}"
        elif self.low is not None:
            text = f"{'>' if self.low_open else '>='} {_num(self.low)}"
        elif self.high is not None:
            text = f"{'<' if self.high_open else '<='} {_num(self.high)}"
        else:
            text = "an integer" if self.integer else "a finite number"
        if not self.integer and (self.low is None) != (self.high is None):
            text = f"a finite number {text}"
        return f"{text} {self.note}" if self.note else text

    def contains(self, value: float) -> bool:
        """value 是否在范围内（不查类型；NaN 与 ±inf 不在任何范围内）。"""
        if not math.isfinite(value):
            return False
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below

    def check(self, name: str, value: Any) -> Any:
        """value 的类型与范围不对时抛出点名 name 的 ValueError；否则原样返回。"""
        if isinstance(value, bool) or not isinstance(value, int if self.integer else (int, float)):
            kind = "an int" if self.integer else "a number"
            raise ValueError(f"{name} must be {kind}, got {value!r} ({type(value).__name__})")
        if not self.contains(value):
            raise ValueError(f"{name} must be {self.describe()}, got {value!r}")
        return value


POSITIVE = Bounds(0, low_open=True)  # 有限且 > 0：学习率、ε、θ、温度、裁剪阈值
NON_NEGATIVE = Bounds(0)  # 有限且 >= 0：权重衰减
PROBABILITY = Bounds(0, 1)  # [0, 1]：α、每步的概率
POSITIVE_INT = Bounds(0, low_open=True, integer=True)  # 整数 > 0：尺寸、步数、间隔
SEED = Bounds(0, 2**32 - 1, integer=True)  # 随机种子：numpy 与 torch 都接受的 [0, 2^32 − 1]
TOP_P = Bounds(0, 1, low_open=True, note="(1 = off)")  # 核采样 p ∈ (0, 1]
SAMPLING_TEMPERATURE = Bounds(0, note="(0 = greedy)")  # 采样温度 >= 0，0 为贪心

# 每个数值字段的范围：__post_init__ 用它校验，命令行在导入 torch 之前用它逐个检查明确给出的值。
MODEL_BOUNDS: dict[str, Bounds] = {
    **dict.fromkeys(("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size", "vocab_size",
                     "max_seq_len"), POSITIVE_INT),
    "rope_theta": POSITIVE,
    "norm_eps": POSITIVE,
    "dropout": Bounds(0, 1, high_open=True),
    **dict.fromkeys(("num_experts", "num_experts_per_tok", "moe_intermediate_size", "first_k_dense_replace",
                     "n_shared_experts", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"),
                    Bounds(0, integer=True)),
    **dict.fromkeys(("decoder_sparse_step", "n_group", "topk_group"), POSITIVE_INT),
    "routed_scaling_factor": POSITIVE,
}
TRAINING_BOUNDS: dict[str, Bounds] = {
    **dict.fromkeys(("batch_size", "num_epochs", "log_interval", "eval_interval", "save_interval",
                     "gradient_accumulation_steps", "keep_last", "loss_chunk_size", "eval_batches", "prompt_length",
                     "max_new_tokens"), POSITIVE_INT),
    "warmup_steps": Bounds(0, integer=True),
    "max_steps": Bounds(0, integer=True, note="(0 = use num_epochs)"),
    "top_k": Bounds(0, integer=True, note="(0 = the full teacher distribution)"),
    "on_policy_start": Bounds(0, integer=True),
    "seed": SEED,
    "split_seed": SEED,
    **dict.fromkeys(("learning_rate", "gradient_clip", "temperature"), POSITIVE),
    "weight_decay": NON_NEGATIVE,
    "alpha": PROBABILITY,
    "val_fraction": Bounds(0, 1, high_open=True),
    "on_policy_fraction": Bounds(0, 1, note="(a probability per step)"),
    "teacher_generated_fraction": Bounds(0, 1, note="(a probability per step)"),
    "generation_temperature": SAMPLING_TEMPERATURE,
    "generation_top_p": TOP_P,
}


def _check_bounds(obj: Any, bounds: dict[str, Bounds]) -> None:
    """逐个字段按 bounds 检查类型与范围，错误点名 类名.字段。"""
    for name, bound in bounds.items():
        bound.check(f"{type(obj).__name__}.{name}", getattr(obj, name))


@dataclass(frozen=True)
class YarnScaling:
    """YaRN 长上下文 RoPE 缩放（DeepSeek-V3 / R1 与部分 Qwen3 检查点用它）：字段名与 HF 的 rope_parameters 相同。

    数学（见 layers.rope.yarn_inv_freq）：把训练长度 L₀ = original_max_position_embeddings 内转不满一圈的低频维度
    按 factor 放慢（插值），转很多圈的高频维度保持原样（外推），中间按 beta_fast / beta_slow 之间的线性斜坡混合；
    cos / sin 乘 attention_factor（缺省 0.1·mscale·ln(factor) + 1 的比值，见 mscale 与 mscale_all_dim）。
    """

    factor: float  # 上下文放大倍数 s / context extension factor s
    original_max_position_embeddings: int  # 训练时的上下文长度 L₀ / pre-training context length L₀
    beta_fast: float = 32.0  # 斜坡高频端：转满 β_fast 圈以上的维度不插值 / ramp end: dims with ≥ β_fast turns are not interpolated
    beta_slow: float = 1.0  # 斜坡低频端：不满 β_slow 圈的维度完全插值 / ramp start: dims with < β_slow turns are fully interpolated
    mscale: Optional[float] = None  # cos/sin 幅度的系数（只在 mscale_all_dim 也给出时用）/ coefficient of the cos/sin magnitude (used only with mscale_all_dim)
    mscale_all_dim: float = 0.0  # DeepSeek：softmax 缩放再乘 m² 的系数（0 = 不乘）/ DeepSeek: coefficient of the m² softmax-scale factor (0 = none)
    attention_factor: Optional[float] = None  # 显式给出的 cos/sin 幅度（None = 由 mscale 算）/ explicit cos/sin magnitude (None = from mscale)
    truncate: bool = True  # 斜坡端点取整（HF 的缺省）/ round the ramp ends (HF default)

    def __post_init__(self) -> None:
        if isinstance(self.factor, bool) or not isinstance(self.factor, (int, float)) or not self.factor >= 1.0:
            raise ValueError(f"YarnScaling.factor must be a number >= 1, got {self.factor!r}")
        POSITIVE_INT.check("YarnScaling.original_max_position_embeddings", self.original_max_position_embeddings)
        for name in ("beta_fast", "beta_slow"):
            POSITIVE.check(f"YarnScaling.{name}", getattr(self, name))
        if self.mscale is not None:
            POSITIVE.check("YarnScaling.mscale", self.mscale)
        NON_NEGATIVE.check("YarnScaling.mscale_all_dim", self.mscale_all_dim)
        if self.attention_factor is not None:
            POSITIVE.check("YarnScaling.attention_factor", self.attention_factor)


# 在线蒸馏里学生写的批怎样估计散度（kd/sampled_kl.py）。
ON_POLICY_ESTIMATORS: tuple[str, ...] = ("topk", "sampled")
# 支持的结构家族（config.json 的 model_type）；每个家族在 functional_lm/models/ 下有一个模块。
FAMILIES: tuple[str, ...] = ("qwen2", "qwen3", "qwen3_moe", "deepseek_v3")
MOE_FAMILIES: tuple[str, ...] = ("qwen3_moe", "deepseek_v3")
# 家族专属的字段：取缺省值时 to_dict 不写它们，所以 Qwen2 配置的字典（运行设置、教师缓存的指纹）与以前逐字相同。
FAMILY_FIELDS: tuple[str, ...] = (
    "family", "attention_head_dim", "rope_scaling", "num_experts", "num_experts_per_tok",
    "moe_intermediate_size", "norm_topk_prob", "decoder_sparse_step", "mlp_only_layers", "first_k_dense_replace",
    "n_shared_experts", "routed_scaling_factor", "n_group", "topk_group", "q_lora_rank", "kv_lora_rank",
    "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "rope_interleave",
)


@dataclass(frozen=True)
class ModelConfig:
    """解码器的结构超参数；默认值即规格书中约 123M 参数的 Qwen2.5 式学生模型。

    family 说明结构家族（qwen2 / qwen3 / qwen3_moe / deepseek_v3）；家族专属字段的缺省值都是“不用”，
    所以只写前十几个字段的配置就是一个 Qwen2。
    """

    hidden_size: int = 512  # 隐藏维度 d / hidden size d
    num_layers: int = 12  # Transformer 块的层数 / number of transformer blocks
    num_heads: int = 8  # 查询头数 h / query heads h
    num_kv_heads: int = 2  # 键值头数 k（GQA：每 g = h/k 个查询头共享一组 K/V）/ key-value heads k (GQA: g = h/k query heads share one)
    intermediate_size: int = 2048  # SwiGLU 前馈隐藏维度 f / SwiGLU hidden size f
    vocab_size: int = 151936  # 嵌入矩阵的行数 v（Qwen2.5：151,665 个真实 token）/ embedding rows v (Qwen2.5: 151,665 real tokens)
    max_seq_len: int = 512  # 最大序列长度（位置数上限）/ maximum sequence length (positions)
    rope_theta: float = 1e6  # RoPE 基数 θ / RoPE base θ
    norm_eps: float = 1e-6  # RMSNorm 的 ε / RMSNorm epsilon
    dropout: float = 0.0  # 注意力概率上的 dropout（仅训练时）/ dropout on attention probabilities (training only)
    qkv_bias: bool = True  # q/k/v 投影带偏置（Qwen2.5 如此）/ bias on the q/k/v projections (as in Qwen2.5)
    tie_word_embeddings: bool = True  # 输出投影直接复用嵌入矩阵 / output projection reuses the embedding matrix
    # ---- 家族专属 / family-specific (defaults = not used)
    family: str = "qwen2"  # 结构家族 / architecture family: qwen2, qwen3, qwen3_moe, deepseek_v3
    attention_head_dim: Optional[int] = None  # 每头维度 e（Qwen3 可 ≠ d/h）；None = d/h / head dim e (Qwen3: may differ from d/h); None = d/h
    rope_scaling: Optional[YarnScaling] = None  # YaRN 缩放；None = plain RoPE / YaRN scaling; None = plain RoPE
    num_experts: int = 0  # 路由专家数 E；0 = 稠密前馈 / routed experts E; 0 = dense FFN
    num_experts_per_tok: int = 0  # 每个 token 选的专家数 k_e / experts per token k_e
    moe_intermediate_size: int = 0  # 每个专家的 SwiGLU 隐藏维度 / SwiGLU hidden size of one expert
    norm_topk_prob: bool = False  # 选中专家的权重重新归一到和为 1 / renormalise the selected experts' weights to sum 1
    decoder_sparse_step: int = 1  # Qwen3-MoE：层号 i 满足 (i+1) % step == 0 时为 MoE 层 / MoE layer when (i+1) % step == 0
    mlp_only_layers: tuple[int, ...] = ()  # Qwen3-MoE：这些层用稠密前馈 / these layers use the dense FFN
    first_k_dense_replace: int = 0  # DeepSeek-V3：前 k 层用稠密前馈 / first k layers use the dense FFN
    n_shared_experts: int = 0  # DeepSeek-V3：每个 token 都经过的共享专家数 / shared experts every token passes through
    routed_scaling_factor: float = 1.0  # DeepSeek-V3：路由权重再乘的系数 / factor on the routing weights
    n_group: int = 1  # DeepSeek-V3：专家分组数 / expert groups
    topk_group: int = 1  # DeepSeek-V3：每个 token 只在得分最高的这么多组里选专家 / groups a token may pick experts from
    q_lora_rank: Optional[int] = None  # MLA：查询的低秩维度；None = 直接投影 / MLA query low rank; None = a full projection
    kv_lora_rank: int = 0  # MLA：压缩键值潜变量的维度 c；0 = 不用 MLA / MLA latent width c; 0 = no MLA
    qk_nope_head_dim: int = 0  # MLA：每头不带位置的 q/k 维度 / per-head q/k dims without RoPE
    qk_rope_head_dim: int = 0  # MLA：每头解耦 RoPE 的 q/k 维度 r / per-head decoupled-RoPE q/k dims r
    v_head_dim: int = 0  # MLA：每头的值维度 / per-head value dims
    rope_interleave: bool = True  # MLA：RoPE 维度在检查点中交错存放（DeepSeek 如此）/ RoPE dims stored interleaved (as DeepSeek does)

    def __post_init__(self) -> None:
        if isinstance(self.rope_scaling, Mapping):  # 从 to_dict 的字典重建（运行设置、缓存指纹）
            object.__setattr__(self, "rope_scaling", YarnScaling(**self.rope_scaling))
        if isinstance(self.mlp_only_layers, list):
            object.__setattr__(self, "mlp_only_layers", tuple(self.mlp_only_layers))
        _check_bounds(self, MODEL_BOUNDS)
        for name in ("qkv_bias", "tie_word_embeddings", "norm_topk_prob", "rope_interleave"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"ModelConfig.{name} must be a bool, got {getattr(self, name)!r}")
        if self.family not in FAMILIES:
            raise ValueError(f"ModelConfig.family must be one of {list(FAMILIES)}, got {self.family!r}")
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, YarnScaling):
            raise ValueError(f"ModelConfig.rope_scaling must be a YarnScaling or None, got {self.rope_scaling!r}")
        self._check_attention()
        self._check_moe()

    def _check_family_fields(self) -> None:
        """只有某些家族才有的结构：q/k/v 偏置只属于 Qwen2，独立的头维度只属于 Qwen3 两家，MLA 只属于 DeepSeek-V3。"""
        if self.qkv_bias and self.family != "qwen2":
            raise ValueError(f"ModelConfig.qkv_bias=True: family {self.family!r} has no q/k/v bias; set qkv_bias=False")
        if self.attention_head_dim is not None and not self.qk_norm:
            raise ValueError(f"ModelConfig.attention_head_dim needs family 'qwen3' or 'qwen3_moe' (got {self.family!r}, "
                             f"whose head dim is hidden_size / num_heads)")
        if self.uses_mla and self.family != "deepseek_v3":
            raise ValueError(f"ModelConfig.kv_lora_rank={self.kv_lora_rank} (MLA) needs family 'deepseek_v3', got {self.family!r}")

    def _check_attention(self) -> None:
        """注意力的整除关系：h 是 k 的倍数；e（或 MLA 的 RoPE 维度 r）是偶数；未给 e 时 d 能被 h 整除。"""
        self._check_family_fields()
        if self.num_heads % self.num_kv_heads != 0:
            raise ValueError(
                f"ModelConfig.num_heads={self.num_heads} must be divisible by num_kv_heads={self.num_kv_heads}"
            )
        if self.uses_mla:
            for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
                POSITIVE_INT.check(f"ModelConfig.{name}", getattr(self, name))
            if self.q_lora_rank is not None:
                POSITIVE_INT.check("ModelConfig.q_lora_rank", self.q_lora_rank)
        elif self.family == "deepseek_v3":
            raise ValueError("ModelConfig.kv_lora_rank must be > 0 for family 'deepseek_v3' (multi-head latent attention)")
        if self.attention_head_dim is not None:
            POSITIVE_INT.check("ModelConfig.attention_head_dim", self.attention_head_dim)
        elif not self.uses_mla and self.hidden_size % self.num_heads != 0:
            raise ValueError(
                f"ModelConfig.hidden_size={self.hidden_size} must be divisible by num_heads={self.num_heads} "
                f"(or give attention_head_dim)"
            )
        if self.rope_dim % 2 != 0:
            # RoPE 把头维度的前半与后半配成一对一对地旋转，奇数维无法配对。
            raise ValueError(f"ModelConfig.head_dim: the RoPE dimension {self.rope_dim} must be even (RoPE rotates pairs of dimensions)")

    def _check_moe(self) -> None:
        """MoE 字段：只在 MoE 家族里用；专家数、每 token 专家数、分组之间的关系。"""
        if self.num_experts == 0:
            if self.family in MOE_FAMILIES:
                raise ValueError(f"ModelConfig.num_experts must be > 0 for family {self.family!r}")
            return
        if self.family not in MOE_FAMILIES:
            raise ValueError(f"ModelConfig.num_experts={self.num_experts} needs an MoE family {list(MOE_FAMILIES)}, "
                             f"got family {self.family!r}")
        for name in ("num_experts_per_tok", "moe_intermediate_size"):
            POSITIVE_INT.check(f"ModelConfig.{name}", getattr(self, name))
        if self.num_experts_per_tok > self.num_experts:
            raise ValueError(f"ModelConfig.num_experts_per_tok={self.num_experts_per_tok} must be <= "
                             f"num_experts={self.num_experts}")
        if self.num_experts % self.n_group != 0 or self.topk_group > self.n_group:
            raise ValueError(f"ModelConfig: n_group={self.n_group} must divide num_experts={self.num_experts} and "
                             f"topk_group={self.topk_group} must be <= n_group")
        bad = [i for i in self.mlp_only_layers if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < self.num_layers]
        if bad:
            raise ValueError(f"ModelConfig.mlp_only_layers must be layer indices in [0, {self.num_layers}), got {bad}")

    @property
    def qk_norm(self) -> bool:
        """RoPE 之前对每个头的 q、k 做 RMSNorm（Qwen3 与 Qwen3-MoE 如此）。"""
        return self.family in ("qwen3", "qwen3_moe")

    @property
    def uses_mla(self) -> bool:
        """是否为多头潜在注意力（DeepSeek-V3）。"""
        return self.kv_lora_rank > 0

    @property
    def head_dim(self) -> int:
        """每个注意力头的维度 e：attention_head_dim，缺省 d / h；MLA 时为 q/k 的总维度 nope + rope。"""
        if self.uses_mla:
            return self.qk_nope_head_dim + self.qk_rope_head_dim
        return self.attention_head_dim if self.attention_head_dim is not None else self.hidden_size // self.num_heads

    @property
    def rope_dim(self) -> int:
        """施加 RoPE 的维度：GQA 为整个头 e，MLA 为解耦的 RoPE 部分 r。"""
        return self.qk_rope_head_dim if self.uses_mla else self.head_dim

    @property
    def num_queries_per_kv(self) -> int:
        """每个键值头服务的查询头数 g = h / k。"""
        return self.num_heads // self.num_kv_heads

    def is_moe_layer(self, index: int) -> bool:
        """第 index 层的前馈是不是 MoE：Qwen3-MoE 按 mlp_only_layers 与 decoder_sparse_step，DeepSeek 按 first_k_dense_replace。"""
        if self.num_experts == 0:
            return False
        if self.family == "deepseek_v3":
            return index >= self.first_k_dense_replace
        return index not in self.mlp_only_layers and (index + 1) % self.decoder_sparse_step == 0

    def replace(self, **changes: Any) -> "ModelConfig":
        """返回修改了若干字段的新配置（重新校验）。"""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """字段字典（``ModelConfig(**d)`` 可重建）；家族专属字段取缺省值时不写（见 FAMILY_FIELDS）。"""
        data = dataclasses.asdict(self)
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for name in FAMILY_FIELDS:
            if data[name] == defaults[name]:
                del data[name]
        if "mlp_only_layers" in data:
            data["mlp_only_layers"] = list(data["mlp_only_layers"])
        return data


@dataclass(frozen=True)
class TrainingConfig:
    """蒸馏训练的超参数；默认值即规格书中的取值。"""

    batch_size: int = 8  # 每个微批的序列条数 / sequences per micro-batch
    learning_rate: float = 3e-4  # AdamW 峰值学习率 / peak AdamW learning rate
    weight_decay: float = 0.01  # AdamW 权重衰减（范数与偏置不衰减）/ AdamW weight decay (not on norms and biases)
    warmup_steps: int = 500  # 线性预热步数，之后余弦衰减 / linear warm-up steps, then cosine decay
    num_epochs: int = 3  # 训练轮数（max_steps 为 0 时）/ epochs (when max_steps is 0)
    gradient_clip: float = 1.0  # 全局梯度范数裁剪阈值 / global gradient-norm clip
    alpha: float = 0.5  # 蒸馏项权重：loss = α·T²·KD + (1−α)·CE / weight of the distillation term
    temperature: float = 2.0  # 蒸馏温度 T / distillation temperature T
    checkpoint_dir: str = "checkpoints"  # 检查点目录（相对运行目录）/ checkpoint folder (relative to the run)
    log_interval: int = 50  # 每隔多少步记录一次 / steps between log records
    eval_interval: int = 500  # 每隔多少步验证一次 / steps between evaluations
    save_interval: int = 1000  # 每隔多少步保存检查点 / steps between checkpoints
    seed: int = 0  # 随机种子（初始化、数据顺序、在线采样）；不决定划分 / random seed (init, data order, sampling); not the split
    split_seed: int = 0  # 训练 / 验证划分的种子：换 seed 不换划分，一份教师缓存供多个学生 / seed of the train/validation split: students with different seeds share one teacher cache
    gradient_accumulation_steps: int = 1  # 每个优化步累积的微批数 / micro-batches accumulated per optimizer step
    max_steps: int = 0  # 优化步数；0 = 由 num_epochs 决定 / optimizer steps; 0 = from num_epochs
    keep_last: int = 3  # 只保留最近的几个检查点 / checkpoints to keep
    divergence: str = "forward_kl"  # 蒸馏散度 / distillation divergence
    loss_chunk_size: int = 1024  # 分块损失每块的 token 数 / tokens per chunk of the chunked loss
    eval_batches: int = 8  # 每次验证最多用几批 / at most this many validation batches
    bf16: bool = False  # 学生前向用 bfloat16 autocast / bfloat16 autocast for the student
    teacher_bf16: Optional[bool] = None  # 教师以 bfloat16 运行；auto = CUDA 上是、CPU 上否 / teacher in bfloat16; auto = on CUDA only
    compile: bool = False  # 用 torch.compile 编译前向与损失 / torch.compile the forwards and the loss
    val_fraction: float = 0.05  # 按文档划出的验证集比例 / fraction of documents held out for validation
    device: str = "auto"  # 设备：auto（有 CUDA 用 CUDA）、cpu、cuda、cuda:N / device: auto (CUDA when present), cpu, cuda, cuda:N
    teacher_sharding: str = "replicate"  # 多进程时教师每进程一份或用 FSDP2 切分 / teacher per process: replicate or shard (FSDP2)
    document_mask: bool = True  # 打包的文档互不可见、位置逐篇从 0 数 / packed documents do not attend to each other
    top_k: int = 0  # 教师只给前 k 个 token（稀疏损失，在线或来自教师缓存）；0 = 完整分布 / teacher top-k targets only (sparse loss); 0 = full distribution
    on_policy_fraction: float = 0.0  # λ：一步的整批由学生采样续写、教师逐 token 打分的概率（GKD）/ λ: probability that a step's batch is written by the student and graded by the teacher (GKD)
    teacher_generated_fraction: float = 0.0  # 一步的整批由教师采样续写的概率（序列级蒸馏 SeqKD）/ probability that a step's batch is written by the teacher (SeqKD)
    on_policy_start: int = 0  # 从这一步起才有生成批（之前是离线预热）/ generated batches only from this step on (off-policy warm-up before it)
    on_policy_divergence: str = "reverse_kl"  # 学生写的批用的散度（这些批没有交叉熵项）/ divergence on student-written batches (they have no CE term)
    on_policy_estimator: str = "topk"  # 学生写的批怎样估计散度：topk = 教师的 top-k + 尾部上的散度；sampled = 采样 token 上的反向 KL 估计 log q(x) − log p(x)（只需实际 token 的 log 概率）/ how student-written batches estimate the divergence: topk = the divergence over the teacher's top-k + tail; sampled = the per-token reverse-KL estimate log q(x) − log p(x) on the sampled token
    prompt_length: int = 64  # 提示的 token 数上限：纯文本取块的前缀，对话取助手回合之前的部分（左截断）/ prompt tokens: a block's prefix for plain text, the turns before the assistant reply for chat (cut from the left)
    max_new_tokens: int = 64  # 每条提示最多生成的 token 数（遇 EOS 停止）/ most tokens generated per prompt (stops at EOS)
    generation_temperature: float = 1.0  # 生成续写的采样温度（0 = 贪心）/ sampling temperature of the rollouts (0 = greedy)
    generation_top_p: float = 1.0  # 生成续写的核采样 p（1 = 不截断）/ nucleus sampling p of the rollouts (1 = off)
    on_policy_eval: Optional[bool] = None  # 验证时也在学生采样的续写上报告教师的反向 KL 与 NLL；auto = 有生成批时 / also evaluate the teacher's reverse KL and NLL on student-sampled continuations; auto = when batches are generated
    compile_generation: Optional[bool] = None  # 用 torch.compile 编译生成续写的解码步；auto = 同 compile / torch.compile the decode step that writes continuations; auto = same as compile

    def __post_init__(self) -> None:
        _check_bounds(self, TRAINING_BOUNDS)
        if self.divergence not in DIVERGENCE_NAMES:
            raise ValueError(
                f"TrainingConfig.divergence must be one of {list(DIVERGENCE_NAMES)}, got {self.divergence!r}"
            )
        for name in ("bf16", "compile", "document_mask"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"TrainingConfig.{name} must be a bool, got {getattr(self, name)!r}")
        if self.teacher_bf16 is not None and not isinstance(self.teacher_bf16, bool):
            raise ValueError(f"TrainingConfig.teacher_bf16 must be true, false or auto (None), got {self.teacher_bf16!r}")
        if self.teacher_sharding not in TEACHER_SHARDINGS:
            raise ValueError(
                f"TrainingConfig.teacher_sharding must be one of {list(TEACHER_SHARDINGS)}, got {self.teacher_sharding!r}"
            )
        if not isinstance(self.device, str) or not self.device.strip():
            raise ValueError(f"TrainingConfig.device must be a device name such as auto, cpu or cuda, got {self.device!r}")
        self._check_generation()
        if not isinstance(self.checkpoint_dir, str) or not self.checkpoint_dir:
            raise ValueError(
                f"TrainingConfig.checkpoint_dir must be a non-empty path string, got {self.checkpoint_dir!r}"
            )

    def _check_generation(self) -> None:
        """在线蒸馏的字段（各自的范围见 TRAINING_BOUNDS）：两个比例之和不超过 1，散度有名字，两个 auto 开关。"""
        name = type(self).__name__
        if self.on_policy_fraction + self.teacher_generated_fraction > 1.0:
            raise ValueError(
                f"{name}.on_policy_fraction + teacher_generated_fraction must be <= 1 (the rest of the steps use the "
                f"data), got {self.on_policy_fraction} + {self.teacher_generated_fraction}"
            )
        if self.on_policy_estimator not in ON_POLICY_ESTIMATORS:
            raise ValueError(
                f"{name}.on_policy_estimator must be one of {list(ON_POLICY_ESTIMATORS)}, got {self.on_policy_estimator!r}"
            )
        if self.on_policy_estimator == "sampled" and (self.generation_temperature != 1.0 or self.generation_top_p != 1.0):
            raise ValueError(
                f"{name}.on_policy_estimator='sampled' needs samples from the student's own distribution q "
                f"(generation_temperature 1 and generation_top_p 1), got {self.generation_temperature} and "
                f"{self.generation_top_p}: log q(x) - log p(x) estimates KL(q || p) only for x ~ q"
            )
        if self.on_policy_divergence not in DIVERGENCE_NAMES:
            raise ValueError(
                f"{name}.on_policy_divergence must be one of {list(DIVERGENCE_NAMES)}, got {self.on_policy_divergence!r}"
            )
        for field in ("on_policy_eval", "compile_generation"):
            value = getattr(self, field)
            if value is not None and not isinstance(value, bool):
                raise ValueError(f"{name}.{field} must be true, false or auto (None), got {value!r}")

    @property
    def generates(self) -> bool:
        """是否有生成批（学生或教师写的续写）。"""
        return self.on_policy_fraction > 0.0 or self.teacher_generated_fraction > 0.0

    @property
    def evaluates_on_policy(self) -> bool:
        """验证时是否在学生采样上报告教师的反向 KL 与 NLL（on_policy_eval；auto = 有生成批时）。"""
        return self.generates if self.on_policy_eval is None else self.on_policy_eval

    @property
    def compiles_generation(self) -> bool:
        """生成续写的解码步是否编译（compile_generation；auto = 同 compile）。"""
        return self.compile if self.compile_generation is None else self.compile_generation

    def replace(self, **changes: Any) -> "TrainingConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# 预设表：按名字查找模型配置（gpt-fast 风格）。
PRESETS: dict[str, ModelConfig] = {
    # 规格书中的学生模型：约 123.4M 参数（含 q/k/v 偏置，嵌入共享）。
    "student-123m": ModelConfig(),
    # 同样大小的 Qwen3 式学生：每头 QK-norm、q/k/v 无偏置，其余同上（123,418,624 个参数）。
    "student-qwen3-123m": ModelConfig(family="qwen3", qkv_bias=False),
    # 测试用的极小模型：2 层、隐藏 64、4 头、2 个 KV 头、词表 256。
    "tiny": ModelConfig(
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=128,
        vocab_size=256,
        max_seq_len=128,
        rope_theta=10000.0,
    ),
    # 离线演示（functional-lm distill 不带参数）：在内置语料上几分钟内训练完的小教师与更小的学生。
    # 词表保持 Qwen2.5 的 151,936 行，离线分词器的 id 直接可用。
    "demo-teacher": ModelConfig(
        hidden_size=128,
        num_layers=3,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=384,
        max_seq_len=128,
        rope_theta=10000.0,
    ),
    "demo-student": ModelConfig(
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=192,
        max_seq_len=128,
        rope_theta=10000.0,
    ),
}


def get_preset(name: str) -> ModelConfig:
    """按名字取预设配置；未知名字报错并列出可选项。"""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; available: {sorted(PRESETS)}") from None


def cache_root() -> Path:
    """本项目所有缓存（分词缓存 tokens/、演示教师 demo/、导出的分词器 tokenizer/）的根目录：
    环境变量 FUNCTIONAL_LM_CACHE，缺省 ~/.cache/functional_lm。每次调用时读取环境变量。"""
    root = os.environ.get("FUNCTIONAL_LM_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "functional_lm"
