"""Hugging Face Qwen2 检查点的读入与写出（Qwen2.5、DeepSeek-R1-Distill-Qwen 等 ``Qwen2ForCausalLM``）。

读入 ``load_pretrained(path)``：
    * ``config.json`` → ``ModelConfig``：新旧两种布局（``rope_parameters.rope_theta`` 或顶层 ``rope_theta``）都认；
      ``hidden_act`` 为 ``"silu"`` 或其别名 ``"swish"``；只支持 plain RoPE（``rope_type == "default"``）
      与因子恰为 1.0 的线性缩放（两者数值相同），yarn、dynamic 等缩放明确拒绝；
      启用且小于位置上限的滑动窗口 W：照常加载，但 ``max_seq_len`` 设为 W 并发出警告——
      长度 ≤ W 的序列上滑窗注意力与全因果注意力完全相同
      （``use_sliding_window: false`` 时 transformers 也忽略 ``sliding_window``，我们同样忽略）；
    * 权重：单个 ``model.safetensors`` 或带 ``model.safetensors.index.json`` 的分片集合，
      用 ``safe_open`` 逐个张量读取（内存映射，不先把整个文件读进内存），只有显式给出 dtype 时才转换；
    * 共享嵌入的检查点若仍存了 ``lm_head.weight``：核对它与嵌入逐位相等后丢弃，只保留一个张量；
    * 永远不 ``torch.load`` 目录里的 pickle（``pytorch_model.bin`` 会被拒绝并提示转换）。

写出 ``save_pretrained(params, cfg, path)``：
    * ``config.json``（同时写新旧两种 RoPE 字段，新旧版本的 transformers 都能读）+ ``model.safetensors``，
      超过 ``max_shard_size`` 时分片并写索引；
    * Qwen2 在 transformers 中总带 q/k/v 偏置：``qkv_bias=False`` 的配置写出全零偏置（函数完全相同），
      并在 config.json 里记一个 ``functional_lm`` 标记，我们自己读回时再去掉这些零偏置；
    * 原子写入：先写到同一父目录下的临时目录并 fsync，再改名到位；中途失败不会在目标名下留下半个检查点。

所有拒绝都是 ``ValueError``（找不到目录是 ``FileNotFoundError``），消息里写明文件与键。
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import SafetensorError, safe_open

from functional_lm.config import ModelConfig
from functional_lm.models.qwen2 import EMBED_KEY, LM_HEAD_KEY, check_params, param_shapes
from functional_lm.shapes import Tensor
from functional_lm.atomic import fsync_path, replace_dir, write_safetensors

__all__ = [
    "ARCHITECTURE",
    "TOKENIZER_FILES",
    "config_from_hf",
    "config_to_hf",
    "load_config",
    "load_pretrained",
    "resolve_checkpoint",
    "save_pretrained",
]

ARCHITECTURE = "Qwen2ForCausalLM"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_SIZE = 5 * 1024**3  # 5 GiB，与 transformers 的默认一致
# 随检查点一起复制的分词器 / 生成配置文件
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "generation_config.json",
)
# 非参数缓冲（旧版导出偶尔带上），可由配置重算，读入时忽略
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
_MARKER = "functional_lm"  # config.json 中我们自己的附加字段（transformers 忽略它）

_DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}


# ---------------------------------------------------------------- 配置映射
def _parse_dtype(value: Any, source: str) -> Optional[torch.dtype]:
    """config.json 的 ``dtype`` / ``torch_dtype`` 字符串 → torch.dtype（缺省或 "auto" 为 None）。"""
    if value is None or value == "auto":
        return None
    name = str(value).removeprefix("torch.")
    if name not in _DTYPES:
        raise ValueError(f"{source}: unsupported dtype {value!r}; expected one of {sorted(_DTYPES)}")
    return _DTYPES[name]


_SILU_NAMES = ("silu", "swish")  # transformers 的 ACT2FN 中 "swish" 就是 SiLU


def _check_rope_block(block: Mapping[str, Any], source: str) -> None:
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


def _rope_theta(hf: Mapping[str, Any], source: str) -> float:
    """取 RoPE 基数 θ：新布局 ``rope_parameters``，旧布局顶层 ``rope_theta`` + ``rope_scaling``。"""
    params = hf.get("rope_parameters") or {}
    for block in (params, hf.get("rope_scaling") or {}):
        _check_rope_block(block, source)
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))  # transformers 的缺省 θ 也是 10000
    return float(theta)


def _uses_sliding_layers(hf: Mapping[str, Any]) -> bool:
    """是否有层使用滑动窗口：``layer_types`` 优先，否则按 transformers 的规则（层号 ≥ max_window_layers）。"""
    layers = hf.get("layer_types")
    if layers is not None:
        return any(t == "sliding_attention" for t in layers)
    return hf.get("num_hidden_layers", 0) > hf.get("max_window_layers", 28)


def _check_sliding_window(hf: Mapping[str, Any], source: str) -> Optional[int]:
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
        stacklevel=3,
    )
    return window


def config_from_hf(hf: Mapping[str, Any], *, source: str = CONFIG_FILE) -> ModelConfig:
    """把 transformers 的 Qwen2 config.json 字典映射成 ModelConfig；不支持或不合法时点名拒绝。"""
    archs = hf.get("architectures") or []
    model_type = hf.get("model_type", "qwen2")
    if (archs and ARCHITECTURE not in archs) or model_type != "qwen2":
        raise ValueError(
            f"{source}: architecture {archs or model_type!r} (model_type {model_type!r}) is not supported; "
            f"only {ARCHITECTURE} checkpoints can be loaded"
        )
    if hf.get("hidden_act", "silu") not in _SILU_NAMES:
        raise ValueError(
            f"{source}: hidden_act {hf['hidden_act']!r} is not supported (Qwen2 uses 'silu', alias 'swish')"
        )
    window = _check_sliding_window(hf, source)
    required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    missing = [name for name in required if hf.get(name) is None]
    if missing:
        raise ValueError(f"{source}: missing required field(s) {missing}")
    marker = hf.get(_MARKER) or {}
    try:
        cfg = ModelConfig(
            hidden_size=hf["hidden_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=hf["num_attention_heads"],
            num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            intermediate_size=hf["intermediate_size"],
            vocab_size=hf["vocab_size"],
            max_seq_len=window or hf.get("max_position_embeddings", 32768),
            rope_theta=_rope_theta(hf, source),
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            dropout=float(hf.get("attention_dropout", 0.0)),
            qkv_bias=bool(marker.get("qkv_bias", True)),  # transformers 的 Qwen2 总带 q/k/v 偏置
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),  # transformers 缺省为 False
        )
    except ValueError as err:
        raise ValueError(f"{source}: invalid model config: {err}") from None
    head_dim = hf.get("head_dim")
    if head_dim is not None and head_dim != cfg.head_dim:
        raise ValueError(
            f"{source}: head_dim={head_dim} differs from hidden_size/num_attention_heads={cfg.head_dim}; "
            f"decoupled head dimensions are not supported"
        )
    return cfg


def config_to_hf(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """ModelConfig → transformers Qwen2 的 config.json 字典（新旧两种 RoPE 字段都写）。"""
    dtype_name = str(dtype).removeprefix("torch.")
    hf: dict[str, Any] = {
        "architectures": [ARCHITECTURE],
        "model_type": "qwen2",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "max_position_embeddings": cfg.max_seq_len,
        "rope_theta": cfg.rope_theta,  # 旧布局（transformers 4.x）
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},  # 新布局（5.x）
        "rms_norm_eps": cfg.norm_eps,
        "hidden_act": "silu",
        "attention_dropout": cfg.dropout,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": cfg.num_layers,
        "use_cache": True,
        "initializer_range": 0.02,
        "torch_dtype": dtype_name,  # 旧名
        "dtype": dtype_name,  # 新名
    }
    if not cfg.qkv_bias:
        hf[_MARKER] = {"qkv_bias": False}
    return hf


# ---------------------------------------------------------------- 读入
def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """本地目录原样返回；否则（装了 huggingface_hub 且网络可用时）把它当作 hub id 下载。"""
    local = Path(path).expanduser()
    if local.is_dir():
        return local
    text = str(path)
    if False:
        raise NotADirectoryError(f"checkpoint {text!r} is a file; expected a directory containing config.json and "
                                 f"*.safetensors")
    if re.fullmatch(r"[\w.-]+/[\w.-]+", text) and not local.exists():
        try:
            from huggingface_hub import snapshot_download
        except ImportError:
            pass
        else:
            try:
                patterns = ["*.json", "*.safetensors", *TOKENIZER_FILES]
                return Path(snapshot_download(text, allow_patterns=patterns))
            except Exception as err:  # 网络不可达、仓库不存在……
                raise FileNotFoundError(
                    f"{text!r} is not a local directory, and downloading it from the hub failed: {err}"
                ) from err
    raise FileNotFoundError(f"checkpoint directory {text!r} does not exist (expected config.json + *.safetensors)")


def _read_json(file: Path) -> dict[str, Any]:
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{file} not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{file}: not valid JSON: {err}") from None


def _weight_files(directory: Path) -> dict[str, list[str]]:
    """文件名 → 该文件应含的键（单文件时为 None 表示“全部”）。"""
    index_file = directory / INDEX_FILE
    if index_file.exists():
        weight_map = _read_json(index_file).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index_file}: missing or empty 'weight_map'")
        files: dict[str, list[str]] = {}
        for key, name in weight_map.items():
            files.setdefault(name, []).append(key)
        return files
    if (directory / WEIGHTS_FILE).exists():
        return {WEIGHTS_FILE: None}  # type: ignore[dict-item]
    pickles = sorted(p.name for p in directory.glob("*.bin")) + sorted(p.name for p in directory.glob("*.pt"))
    hint = (
        f" Found {pickles}: pickled checkpoints are never loaded (torch.load can execute code); "
        f"convert them to safetensors first."
        if pickles
        else ""
    )
    raise ValueError(f"{directory}: no {WEIGHTS_FILE} or {INDEX_FILE}.{hint}")


def _read_tensors(
    file: Path, keys: Optional[list[str]], dtype: Optional[torch.dtype], device: Optional[str]
) -> dict[str, Tensor]:
    """从一个 safetensors 文件逐个读取张量（mmap；每次只多出一个张量的转换副本）。"""
    if not file.exists():
        raise ValueError(f"{file.name}: listed in {INDEX_FILE} but missing from {file.parent}")
    out: dict[str, Tensor] = {}
    try:
        with safe_open(file, framework="pt", device=device or "cpu") as handle:
            present = set(handle.keys())
            wanted = sorted(present) if keys is None else keys
            absent = [key for key in wanted if key not in present]
            if absent:
                raise ValueError(f"{file.name}: the index maps keys {absent[:5]} to this file, but it lacks them")
            for key in wanted:
                tensor = handle.get_tensor(key)
                out[key] = tensor if dtype is None or tensor.dtype == dtype else tensor.to(dtype)
    except (SafetensorError, OSError, RuntimeError) as err:
        raise ValueError(f"{file}: corrupted or truncated safetensors file: {err}") from None
    return out


def _check_against_config(tensors: Mapping[str, Tensor], owner: Mapping[str, str], cfg: ModelConfig) -> None:
    """逐键核对：多余的键、缺失的键、形状，报错时写明所在文件。"""
    expected = param_shapes(cfg)
    extra = [key for key in tensors if key not in expected]
    if extra:
        where = ", ".join(f"{owner[key]}: {key}" for key in extra[:5])
        raise ValueError(f"unexpected key(s) for a {ARCHITECTURE} with this config.json: {where}")
    missing = [key for key in expected if key not in tensors]
    if missing:
        files = sorted(set(owner.values()))
        raise ValueError(f"checkpoint {files} is missing key(s) {missing[:5]} required by config.json")
    for key, shape in expected.items():
        if tuple(tensors[key].shape) != shape:
            raise ValueError(
                f"{owner[key]}: {key} has shape {tuple(tensors[key].shape)}, but config.json implies {shape}"
            )


def _untie(tensors: dict[str, Tensor], owner: Mapping[str, str], cfg: ModelConfig) -> None:
    """共享嵌入时多存的 ``lm_head.weight``：必须与嵌入逐位相等，然后丢弃。"""
    if not cfg.tie_word_embeddings or LM_HEAD_KEY not in tensors:
        return
    head, table = tensors[LM_HEAD_KEY], tensors.get(EMBED_KEY)
    if table is None or head.shape != table.shape or not torch.equal(head, table):
        raise ValueError(
            f"{owner[LM_HEAD_KEY]}: {LM_HEAD_KEY} is stored but differs from {EMBED_KEY} "
            f"although config.json says tie_word_embeddings=true"
        )
    del tensors[LM_HEAD_KEY]


def _drop_zero_biases(tensors: dict[str, Tensor], owner: Mapping[str, str]) -> None:
    """我们写出的无偏置模型带着全零偏置；读回 qkv_bias=False 时核对为零后去掉。"""
    for key in [k for k in tensors if k.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias"))]:
        if bool(tensors[key].any()):
            raise ValueError(f"{owner[key]}: {key} is non-zero but config.json marks the model qkv_bias=false")
        del tensors[key]


def load_config(path: str | os.PathLike) -> ModelConfig:
    """只读检查点目录的 config.json（不读权重）：坏 JSON、不支持的结构都是点名该文件的 ValueError。"""
    directory = resolve_checkpoint(path)
    config_file = directory / CONFIG_FILE
    return config_from_hf(_read_json(config_file), source=str(config_file))


def load_pretrained(
    path: str | os.PathLike,
    dtype: Optional[torch.dtype] = None,
    device: Optional[torch.device | str] = None,
) -> tuple[ModelConfig, dict[str, Tensor]]:
    """读取 Qwen2 检查点目录（或 hub id），返回 ``(ModelConfig, params)``。

    dtype 为 None 时保持检查点自己的 dtype（bf16 检查点读成 bf16）；device 指定张量直接读到哪个设备。
    """
    directory = resolve_checkpoint(path)
    config_file = directory / CONFIG_FILE
    hf = _read_json(config_file)
    cfg = config_from_hf(hf, source=str(config_file))
    _parse_dtype(hf.get("dtype", hf.get("torch_dtype")), str(config_file))  # 只校验；实际 dtype 以文件为准
    device_name = None if device is None else str(torch.device(device))
    tensors: dict[str, Tensor] = {}
    owner: dict[str, str] = {}
    for name, keys in _weight_files(directory).items():
        for key, value in _read_tensors(directory / name, keys, dtype, device_name).items():
            if key.endswith(_IGNORED_SUFFIXES):
                continue
            if key in tensors:
                raise ValueError(f"{name}: key {key} also appears in {owner[key]}")
            tensors[key], owner[key] = value, name
    _untie(tensors, owner, cfg)
    if not cfg.qkv_bias:
        _drop_zero_biases(tensors, owner)
    _check_against_config(tensors, owner, cfg)
    check_params(tensors, cfg)  # 最后一道：dtype 等
    return cfg, {key: tensors[key] for key in param_shapes(cfg)}


# ---------------------------------------------------------------- 写出
def _parse_size(size: int | str) -> int:
    """``"5GB"`` / ``"500MB"`` / 整数字节 → 字节数。"""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B)?\s*", str(size), re.IGNORECASE)
    if not match:
        raise ValueError(f"max_shard_size must be bytes or like '5GB', got {size!r}")
    unit = (match.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
    return int(float(match.group(1)) * scale)


def _hf_tensors(params: Mapping[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """按 transformers 的键集合整理待写张量：CPU、连续；无偏置配置补全零偏置。"""
    out = {key: params[key].detach().to("cpu").contiguous() for key in param_shapes(cfg)}
    if not cfg.qkv_bias:
        e = cfg.head_dim
        dtype = params[EMBED_KEY].dtype
        for i in range(cfg.num_layers):
            prefix = f"model.layers.{i}.self_attn."
            out[prefix + "q_proj.bias"] = torch.zeros(cfg.num_heads * e, dtype=dtype)
            out[prefix + "k_proj.bias"] = torch.zeros(cfg.num_kv_heads * e, dtype=dtype)
            out[prefix + "v_proj.bias"] = torch.zeros(cfg.num_kv_heads * e, dtype=dtype)
    return out


def _shards(tensors: Mapping[str, Tensor], max_bytes: int) -> list[dict[str, Tensor]]:
    """按键顺序贪心分片：当前分片加上下一个张量会超过上限时另起一片（单个大张量独占一片）。"""
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for key, value in tensors.items():
        nbytes = value.numel() * value.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = value
        size += nbytes
    return shards


def _write_shard(tensors: dict[str, Tensor], file: Path) -> None:
    """写一个 safetensors 文件（metadata format=pt，transformers 要求）。"""
    write_safetensors(tensors, file, metadata={"format": "pt"})


def _write_json(data: Any, file: Path) -> None:
    file.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    fsync_path(file)


def _tokenizer_files(directory: Path) -> list[Path]:
    files = [directory / name for name in TOKENIZER_FILES if (directory / name).is_file()]
    if not files:
        raise ValueError(f"tokenizer directory {directory}: no tokenizer files found (looked for {TOKENIZER_FILES})")
    return files


def save_pretrained(
    params: Mapping[str, Tensor],
    cfg: ModelConfig,
    path: str | os.PathLike,
    *,
    tokenizer: Optional[str | os.PathLike] = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
) -> Path:
    """把参数字典写成 transformers 可直接 ``from_pretrained`` 的 Qwen2 检查点目录，返回该目录。

    dtype 取自参数本身（嵌入矩阵的 dtype）；tokenizer 给出目录时复制其中的分词器文件。
    """
    check_params(params, cfg)
    target = Path(path).expanduser().absolute()
    tok_files = _tokenizer_files(Path(tokenizer)) if tokenizer is not None else []
    tensors = _hf_tensors(params, cfg)
    shards = _shards(tensors, _parse_size(max_shard_size))
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        _write_json(config_to_hf(cfg, params[EMBED_KEY].dtype), tmp / CONFIG_FILE)
        if len(shards) == 1:
            _write_shard(shards[0], tmp / WEIGHTS_FILE)
        else:
            weight_map = {}
            for i, shard in enumerate(shards, start=1):
                name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                _write_shard(shard, tmp / name)
                weight_map.update({key: name for key in shard})
            total = sum(v.numel() * v.element_size() for v in tensors.values())
            _write_json({"metadata": {"total_size": total}, "weight_map": weight_map}, tmp / INDEX_FILE)
        for file in tok_files:
            shutil.copyfile(file, tmp / file.name)
            fsync_path(tmp / file.name)
        fsync_path(tmp)
        replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
