"""config.json ↔ ModelConfig：每个家族一对映射函数（model_type → 读、写），拒绝一律点名字段。

    * qwen2（``Qwen2ForCausalLM``）：新旧两种 RoPE 布局（``rope_parameters.rope_theta`` 或顶层 ``rope_theta``）都认；
      ``hidden_act`` 为 ``"silu"`` 或其别名 ``"swish"``；plain RoPE（``rope_type == "default"``）与因子恰为 1.0 的
      线性缩放（数值相同）之外的缩放由家族决定能否读（见 ROPE_READERS）；
      启用且小于位置上限的滑动窗口 W：照常加载，但 ``max_seq_len`` 设为 W 并发出警告——
      长度 ≤ W 的序列上滑窗注意力与全因果注意力完全相同
      （``use_sliding_window: false`` 时 transformers 也忽略 ``sliding_window``，我们同样忽略）；
    * qwen3（``Qwen3ForCausalLM``）：同上，外加 ``head_dim``（可 ≠ hidden/heads）；``attention_bias`` 必须为假。
    * qwen3_moe（``Qwen3MoeForCausalLM``）：qwen3 的字段 + ``num_experts``、``num_experts_per_tok``、
      ``moe_intermediate_size``、``norm_topk_prob``、``decoder_sparse_step``、``mlp_only_layers``。
    * deepseek_v3（``DeepseekV3ForCausalLM``）：MLA 的秩与维度、DeepSeekMoE 的路由设置（n_routed_experts、
      n_group、topk_group、first_k_dense_replace、routed_scaling_factor、n_shared_experts）、YaRN；FP8 量化、
      别的路由方法 / 打分函数、隔层 MoE、注意力偏置点名拒绝。Qwen3 两家与 DeepSeek 都读 YaRN（``yarn_scaling``）。
    * 写出时同时写新旧两种 RoPE 字段，新旧版本的 transformers 都能读。
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any, Optional

import torch

from functional_lm.config import ModelConfig, YarnScaling

__all__ = [
    "ARCHITECTURES", "MARKER", "parse_dtype", "rope_theta", "check_rope_block", "sliding_window_limit", "base_fields",
    "config_from_hf", "config_to_hf", "READERS", "WRITERS",
]

# model_type → transformers 的类名
ARCHITECTURES: dict[str, str] = {
    "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
    "deepseek_v3": "DeepseekV3ForCausalLM",
}
MARKER = "functional_lm"  # config.json 中我们自己的附加字段（transformers 忽略它）

_DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}
_SILU_NAMES = ("silu", "swish")  # transformers 的 ACT2FN 中 "swish" 就是 SiLU


def parse_dtype(value: Any, source: str) -> Optional[torch.dtype]:
    """config.json 的 ``dtype`` / ``torch_dtype`` 字符串 → torch.dtype（缺省或 "auto" 为 None）。"""
    if value is None or value == "auto":
        return None
    name = str(value).removeprefix("torch.")
    if name not in _DTYPES:
        raise ValueError(f"{source}: unsupported dtype {value!r}; expected one of {sorted(_DTYPES)}")
    return _DTYPES[name]


def rope_blocks(hf: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """RoPE 缩放设置所在的两处：新布局 ``rope_parameters``、旧布局 ``rope_scaling``（缺省为空字典）。"""
    return [hf.get("rope_parameters") or {}, hf.get("rope_scaling") or {}]


def check_rope_block(block: Mapping[str, Any], source: str) -> None:
    """一段 RoPE 缩放设置：plain RoPE 或因子恰为 1 的线性缩放（数值完全相同）通过，其余点名拒绝。"""
    rope_type = block.get("rope_type", block.get("type", "default"))
    if rope_type == "default":
        return
    if rope_type == "linear":
        factor = block.get("factor")
        if isinstance(factor, (int, float)) and not isinstance(factor, bool) and float(factor) == 1.0:
            return  # 线性缩放把位置除以 factor：factor = 1 时 inv_freq 不变，与 plain RoPE 逐位相同
        raise ValueError(
            f"{source}: linear rope scaling with factor {factor!r} is not supported "
            f"(only factor 1.0, which equals plain RoPE)"
        )
    raise ValueError(
        f"{source}: rope_type {rope_type!r} is not supported (only plain RoPE, rope_type 'default', "
        f"or 'linear' with factor 1.0); long-context scaling such as yarn must be removed from the config "
        f"to load this model"
    )


def _number(block: Mapping[str, Any], key: str, source: str, default: Any = None) -> Any:
    """RoPE 设置里的一个数（缺省 default）；不是数时点名拒绝。"""
    value = block.get(key, default)
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise ValueError(f"{source}: rope scaling field {key!r} must be a number, got {value!r}")
    return value


def yarn_scaling(hf: Mapping[str, Any], source: str) -> Optional[YarnScaling]:
    """rope_parameters / rope_scaling 里的 YaRN 设置 → YarnScaling（没有 yarn 时为 None）；其余缩放照旧核对、拒绝。

    与 transformers 相同：factor 缺省为 max_position_embeddings / original_max_position_embeddings，
    original_max_position_embeddings 缺省取顶层同名字段、再缺省为 max_position_embeddings，β 缺省 32 / 1。
    """
    found = None
    for block in rope_blocks(hf):
        if block.get("rope_type", block.get("type")) != "yarn":
            check_rope_block(block, source)
            continue
        max_pos = hf.get("max_position_embeddings", 32768)
        original = _number(block, "original_max_position_embeddings", source,
                           hf.get("original_max_position_embeddings", max_pos))
        factor = _number(block, "factor", source) or max_pos / original
        try:
            found = YarnScaling(
                factor=float(factor), original_max_position_embeddings=int(original),
                beta_fast=float(_number(block, "beta_fast", source) or 32), beta_slow=float(_number(block, "beta_slow", source) or 1),
                mscale=_number(block, "mscale", source), mscale_all_dim=float(_number(block, "mscale_all_dim", source) or 0),
                attention_factor=_number(block, "attention_factor", source), truncate=bool(block.get("truncate", True)),
            )
        except ValueError as err:
            raise ValueError(f"{source}: invalid yarn rope scaling: {err}") from None
    return found


def rope_theta(hf: Mapping[str, Any], source: str, check: Callable[[Mapping[str, Any], str], None] = check_rope_block) -> float:
    """取 RoPE 基数 θ：新布局 ``rope_parameters``，旧布局顶层 ``rope_theta``；两处缩放设置都交给 check 核对。"""
    for block in rope_blocks(hf):
        check(block, source)
    params = hf.get("rope_parameters") or {}
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))  # transformers 的缺省 θ 也是 10000
    return float(theta)


def _uses_sliding_layers(hf: Mapping[str, Any]) -> bool:
    """是否有层使用滑动窗口：``layer_types`` 优先，否则按 transformers 的规则（层号 ≥ max_window_layers）。"""
    layers = hf.get("layer_types")
    if layers is not None:
        return any(t == "sliding_attention" for t in layers)
    return hf.get("num_hidden_layers", 0) > hf.get("max_window_layers", 28)


def sliding_window_limit(hf: Mapping[str, Any], source: str) -> Optional[int]:
    """启用且确有层使用、又短于位置上限的滑动窗口 W：返回 W 作为序列长度上限，否则返回 None。

    transformers 的滑窗遮罩（masking_utils.sliding_window_overlay）允许 ``kv_idx > q_idx - W``，
    即每个查询看见包括自己在内的最近 W 个位置。序列长度 ≤ W 时最早的位置 0 也在窗口内，
    滑窗注意力与全因果注意力完全相同；更长的序列才不同，所以把 max_seq_len 限制为 W 即可照常加载。
    """
    window = hf.get("sliding_window")
    if not hf.get("use_sliding_window", False) or window is None:
        return None  # 与 transformers 相同：use_sliding_window 为假时 sliding_window 被忽略
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"{source}: sliding_window must be a positive integer, got {window!r}")
    if window >= hf.get("max_position_embeddings", 32768) or not _uses_sliding_layers(hf):
        return None  # 窗口覆盖所有位置，或没有层用它：等价于全注意力
    warnings.warn(
        f"{source}: sliding-window attention (sliding_window={window}) is used by some layers; "
        f"sequences are limited to {window} tokens (max_seq_len={window}), where it equals full causal attention",
        UserWarning,
        stacklevel=4,
    )
    return window


def base_fields(hf: Mapping[str, Any], source: str, required: tuple[str, ...] = ()) -> dict[str, Any]:
    """各家族共有的 ModelConfig 字段（词表、宽度、层数、头数、RMSNorm ε、dropout、共享嵌入、位置上限）。

    silu 之外的激活函数、缺失的必需字段点名拒绝；θ 与 RoPE 缩放由各家族自己读。
    """
    if hf.get("hidden_act", "silu") not in _SILU_NAMES:
        raise ValueError(
            f"{source}: hidden_act {hf['hidden_act']!r} is not supported (these models use 'silu', alias 'swish')"
        )
    needed = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", *required)
    missing = [name for name in needed if hf.get(name) is None]
    if missing:
        raise ValueError(f"{source}: missing required field(s) {missing}")
    return dict(
        hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        intermediate_size=hf["intermediate_size"],
        vocab_size=hf["vocab_size"],
        max_seq_len=hf.get("max_position_embeddings", 32768),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        dropout=float(hf.get("attention_dropout", 0.0)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),  # transformers 缺省为 False
    )


def _refuse_attention_bias(hf: Mapping[str, Any], source: str) -> None:
    """Qwen3 / MoE / DeepSeek 的 ``attention_bias: true``（q/k/v/o 都带偏置）没有实现，点名拒绝。"""
    if hf.get("attention_bias", False):
        raise ValueError(f"{source}: attention_bias=true is not supported (q/k/v/o projections with bias); "
                         f"only checkpoints without attention bias can be loaded")


def _qwen2_from_hf(hf: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Qwen2：公共字段 + θ + 滑窗上限 + head_dim 必须等于 hidden/heads；q/k/v 偏置总在（除非我们的标记说没有）。"""
    fields = base_fields(hf, source)
    window = sliding_window_limit(hf, source)
    fields.update(
        rope_theta=rope_theta(hf, source), max_seq_len=window or fields["max_seq_len"],
        qkv_bias=bool((hf.get(MARKER) or {}).get("qkv_bias", True)),  # transformers 的 Qwen2 总带 q/k/v 偏置
    )
    head_dim = hf.get("head_dim")
    if head_dim is not None and head_dim != fields["hidden_size"] // fields["num_heads"]:
        raise ValueError(
            f"{source}: head_dim={head_dim} differs from hidden_size/num_attention_heads="
            f"{fields['hidden_size'] // fields['num_heads']}; decoupled head dimensions are not supported for qwen2"
        )
    return fields


def qwen3_attention_fields(hf: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Qwen3 与 Qwen3-MoE 共有的注意力字段：无偏置、head_dim（缺省 hidden/heads）、θ、滑窗上限。"""
    _refuse_attention_bias(hf, source)
    fields = base_fields(hf, source)
    window = sliding_window_limit(hf, source)
    head_dim = hf.get("head_dim")
    fields.update(
        rope_theta=rope_theta(hf, source, check=_no_check), rope_scaling=yarn_scaling(hf, source),
        max_seq_len=window or fields["max_seq_len"], qkv_bias=False,
        attention_head_dim=None if head_dim is None or head_dim * fields["num_heads"] == fields["hidden_size"]
        else head_dim,
    )
    return fields


def _no_check(block: Mapping[str, Any], source: str) -> None:
    """缩放设置已由 yarn_scaling 核对过。"""


def _qwen3_from_hf(hf: Mapping[str, Any], source: str) -> dict[str, Any]:
    return qwen3_attention_fields(hf, source) | {"family": "qwen3"}


def _qwen3_moe_from_hf(hf: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Qwen3-MoE：Qwen3 的注意力字段 + 专家数、每 token 专家数、专家宽度、归一、稀疏步长、稠密层表。"""
    fields = qwen3_attention_fields(hf, source)
    experts = hf.get("num_experts", hf.get("num_local_experts"))  # 发布的检查点写前者，transformers 5 写后者
    missing = [name for name, value in (("num_experts", experts), ("num_experts_per_tok", hf.get("num_experts_per_tok")),
                                        ("moe_intermediate_size", hf.get("moe_intermediate_size"))) if value is None]
    if missing:
        raise ValueError(f"{source}: missing required field(s) {missing}")
    return fields | {
        "family": "qwen3_moe", "num_experts": experts, "num_experts_per_tok": hf["num_experts_per_tok"],
        "moe_intermediate_size": hf["moe_intermediate_size"], "norm_topk_prob": bool(hf.get("norm_topk_prob", False)),
        "decoder_sparse_step": hf.get("decoder_sparse_step", 1), "mlp_only_layers": tuple(hf.get("mlp_only_layers") or ()),
    }


def _rope_fields(cfg: ModelConfig) -> dict[str, Any]:
    """RoPE 的新旧两种写法：plain RoPE，或 YaRN（rope_type "yarn" 与它的各个字段）。"""
    if cfg.rope_scaling is None:
        scaling, params = None, {"rope_type": "default", "rope_theta": cfg.rope_theta}
    else:
        y = cfg.rope_scaling
        scaling = {"rope_type": "yarn", "factor": y.factor, "original_max_position_embeddings": y.original_max_position_embeddings,
                   "beta_fast": y.beta_fast, "beta_slow": y.beta_slow, "mscale_all_dim": y.mscale_all_dim, "truncate": y.truncate}
        scaling |= {key: value for key, value in (("mscale", y.mscale), ("attention_factor", y.attention_factor))
                    if value is not None}
        params = {**scaling, "rope_theta": cfg.rope_theta}
    return {
        "rope_theta": cfg.rope_theta,  # 旧布局（transformers 4.x）
        "rope_scaling": scaling,
        "rope_parameters": params,  # 新布局（5.x）
    }


def common_to_hf(cfg: ModelConfig, model_type: str, dtype: torch.dtype) -> dict[str, Any]:
    """各家族共有的 config.json 字段。"""
    dtype_name = str(dtype).removeprefix("torch.")
    return {
        "architectures": [ARCHITECTURES[model_type]],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "max_position_embeddings": cfg.max_seq_len,
        **_rope_fields(cfg),
        "rms_norm_eps": cfg.norm_eps,
        "hidden_act": "silu",
        "attention_dropout": cfg.dropout,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "use_cache": True,
        "initializer_range": 0.02,
        "torch_dtype": dtype_name,  # 旧名
        "dtype": dtype_name,  # 新名
    }


def _qwen2_to_hf(cfg: ModelConfig, dtype: torch.dtype) -> dict[str, Any]:
    hf = common_to_hf(cfg, "qwen2", dtype) | {
        "use_sliding_window": False, "sliding_window": None, "max_window_layers": cfg.num_layers,
    }
    if not cfg.qkv_bias:
        hf[MARKER] = {"qkv_bias": False}
    return hf


def qwen3_attention_to_hf(cfg: ModelConfig, model_type: str, dtype: torch.dtype) -> dict[str, Any]:
    """Qwen3 与 Qwen3-MoE 共有的写出字段：head_dim、无偏置、不用滑窗。"""
    return common_to_hf(cfg, model_type, dtype) | {
        "head_dim": cfg.head_dim, "attention_bias": False, "use_sliding_window": False, "sliding_window": None,
        "max_window_layers": cfg.num_layers,
    }


def _qwen3_to_hf(cfg: ModelConfig, dtype: torch.dtype) -> dict[str, Any]:
    return qwen3_attention_to_hf(cfg, "qwen3", dtype)


def _qwen3_moe_to_hf(cfg: ModelConfig, dtype: torch.dtype) -> dict[str, Any]:
    return qwen3_attention_to_hf(cfg, "qwen3_moe", dtype) | {
        "num_experts": cfg.num_experts, "num_local_experts": cfg.num_experts,  # 旧名与 transformers 5 的新名
        "num_experts_per_tok": cfg.num_experts_per_tok,
        "moe_intermediate_size": cfg.moe_intermediate_size, "norm_topk_prob": cfg.norm_topk_prob,
        "decoder_sparse_step": cfg.decoder_sparse_step, "mlp_only_layers": list(cfg.mlp_only_layers),
        "output_router_logits": False, "router_aux_loss_coef": 0.001,
    }


def _refuse_deepseek_variants(hf: Mapping[str, Any], source: str) -> None:
    """DeepSeek-V3 中没有实现、会改变数值的设置：FP8 量化、别的路由方法或打分函数、隔层的 MoE、注意力偏置。"""
    _refuse_attention_bias(hf, source)
    quant = hf.get("quantization_config")
    if quant:
        method = quant.get("quant_method", "?") if isinstance(quant, Mapping) else quant
        raise ValueError(f"{source}: quantization_config ({method}) is not supported: this is a quantized checkpoint "
                         f"(DeepSeek-V3 ships FP8 weights with weight_scale_inv); convert it to bfloat16 first")
    for key, allowed in (("topk_method", "noaux_tc"), ("scoring_func", "sigmoid"), ("moe_layer_freq", 1)):
        if key in hf and hf[key] != allowed:
            raise ValueError(f"{source}: {key}={hf[key]!r} is not supported (only {allowed!r}, DeepSeek-V3's)")


def _deepseek_v3_from_hf(hf: Mapping[str, Any], source: str) -> dict[str, Any]:
    """DeepSeek-V3：公共字段 + MLA 的秩与维度、DeepSeekMoE 的路由设置、YaRN。"""
    _refuse_deepseek_variants(hf, source)
    fields = base_fields(hf, source, required=("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                                               "moe_intermediate_size", "num_experts_per_tok"))
    experts = hf.get("n_routed_experts", hf.get("num_local_experts"))
    if experts is None:
        raise ValueError(f"{source}: missing required field(s) ['n_routed_experts']")
    return fields | {
        "family": "deepseek_v3", "qkv_bias": False, "rope_theta": rope_theta(hf, source, check=_no_check),
        "rope_scaling": yarn_scaling(hf, source), "q_lora_rank": hf.get("q_lora_rank"),
        "kv_lora_rank": hf["kv_lora_rank"], "qk_nope_head_dim": hf["qk_nope_head_dim"],
        "qk_rope_head_dim": hf["qk_rope_head_dim"], "v_head_dim": hf["v_head_dim"], "num_experts": experts,
        "num_experts_per_tok": hf["num_experts_per_tok"], "moe_intermediate_size": hf["moe_intermediate_size"],
        "n_shared_experts": hf.get("n_shared_experts") or 0, "routed_scaling_factor": float(hf.get("routed_scaling_factor", 1.0)),
        "n_group": hf.get("n_group") or 1, "topk_group": hf.get("topk_group") or 1,
        "first_k_dense_replace": hf.get("first_k_dense_replace") or 0, "norm_topk_prob": bool(hf.get("norm_topk_prob", False)),
        "rope_interleave": bool(hf.get("rope_interleave", True)),
    }


def _deepseek_v3_to_hf(cfg: ModelConfig, dtype: torch.dtype) -> dict[str, Any]:
    return common_to_hf(cfg, "deepseek_v3", dtype) | {
        "q_lora_rank": cfg.q_lora_rank, "kv_lora_rank": cfg.kv_lora_rank, "qk_nope_head_dim": cfg.qk_nope_head_dim,
        "qk_rope_head_dim": cfg.qk_rope_head_dim, "v_head_dim": cfg.v_head_dim, "head_dim": cfg.qk_rope_head_dim,
        "n_routed_experts": cfg.num_experts, "num_experts_per_tok": cfg.num_experts_per_tok,
        "moe_intermediate_size": cfg.moe_intermediate_size, "n_shared_experts": cfg.n_shared_experts,
        "routed_scaling_factor": cfg.routed_scaling_factor, "n_group": cfg.n_group, "topk_group": cfg.topk_group,
        "first_k_dense_replace": cfg.first_k_dense_replace, "norm_topk_prob": cfg.norm_topk_prob,
        "rope_interleave": cfg.rope_interleave, "attention_bias": False, "topk_method": "noaux_tc",
        "scoring_func": "sigmoid", "num_nextn_predict_layers": 0,
    }


# model_type → 读出 ModelConfig 字段的函数；family → 写出 config.json 的函数。家族模块在这里登记。
READERS: dict[str, Callable[[Mapping[str, Any], str], dict[str, Any]]] = {
    "qwen2": _qwen2_from_hf, "qwen3": _qwen3_from_hf, "qwen3_moe": _qwen3_moe_from_hf,
    "deepseek_v3": _deepseek_v3_from_hf,
}
WRITERS: dict[str, Callable[[ModelConfig, torch.dtype], dict[str, Any]]] = {
    "qwen2": _qwen2_to_hf, "qwen3": _qwen3_to_hf, "qwen3_moe": _qwen3_moe_to_hf,
    "deepseek_v3": _deepseek_v3_to_hf,
}


def config_from_hf(hf: Mapping[str, Any], *, source: str = "config.json") -> ModelConfig:
    """把 transformers 的 config.json 字典映射成 ModelConfig；不支持或不合法时点名拒绝。"""
    archs = hf.get("architectures") or []
    model_type = hf.get("model_type", "qwen2")
    known = model_type in READERS and (not archs or ARCHITECTURES[model_type] in archs)
    if not known:
        supported = ", ".join(f"{name} (model_type {t!r})" for t, name in ARCHITECTURES.items())
        raise ValueError(
            f"{source}: architecture {archs or model_type!r} (model_type {model_type!r}) is not supported; "
            f"supported: {supported}"
        )
    fields = READERS[model_type](hf, source)
    try:
        return ModelConfig(**fields)
    except ValueError as err:
        raise ValueError(f"{source}: invalid model config: {err}") from None


def config_to_hf(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """ModelConfig → transformers 的 config.json 字典（按 cfg.family；新旧两种 RoPE 字段都写）。"""
    return WRITERS[cfg.family](cfg, dtype)
