"""Hugging Face 检查点的读入与写出，所有家族共用（Qwen2 / Qwen2.5、Qwen3、Qwen3-MoE、DeepSeek-V3）。

config.json 的映射在 ``hf.configs``（每个家族一对函数，model_type 选家族）。

读入 ``load_pretrained(path)``：
    * 权重：单个 ``model.safetensors`` 或带 ``model.safetensors.index.json`` 的分片集合，
      用 ``safe_open`` 逐个张量读取（内存映射，不先把整个文件读进内存），只有显式给出 dtype 时才转换；
    * 共享嵌入的检查点若仍存了 ``lm_head.weight``：核对它与嵌入逐位相等后丢弃，只保留一个张量；
    * 永远不 ``torch.load`` 目录里的 pickle（``pytorch_model.bin`` 会被拒绝并提示转换）。

写出 ``save_pretrained(params, cfg, path)``：
    * ``config.json`` + ``model.safetensors``，超过 ``max_shard_size`` 时分片并写索引；
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
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import SafetensorError, safe_open

from functional_lm.config import ModelConfig
from functional_lm.hf.experts import fuse_experts
from functional_lm.hf.configs import ARCHITECTURES, config_from_hf, config_to_hf, parse_dtype
from functional_lm.models.decoder import EMBED_KEY, LM_HEAD_KEY, check_params, param_shapes
from functional_lm.shapes import Tensor
from functional_lm.atomic import fsync_path, replace_dir, write_safetensors

__all__ = [
    "ARCHITECTURES",
    "TOKENIZER_FILES",
    "config_from_hf",
    "config_to_hf",
    "load_config",
    "load_pretrained",
    "resolve_checkpoint",
    "save_pretrained",
]

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
                patterns = ["*.json", "*.safetensors", "README.md", *TOKENIZER_FILES]  # README.md：模型卡里的许可
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
    file: Path, keys: Optional[list[str]], dtype: Optional[torch.dtype], device: Optional[str],
    skip: Callable[[str], bool] = lambda key: False,
) -> dict[str, Tensor]:
    """从一个 safetensors 文件逐个读取张量（mmap；每次只多出一个张量的转换副本）；skip(key) 为真的键不读。"""
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
            for key in (key for key in wanted if not skip(key)):
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
        raise ValueError(f"unexpected key(s) for a {ARCHITECTURES[cfg.family]} with this config.json: {where}")
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


_LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.")


def _mtp_layers(hf: Mapping[str, Any], cfg: ModelConfig, skipped: list[str]) -> Callable[[str], bool]:
    """DeepSeek-V3 的多 token 预测层（层号 ≥ num_hidden_layers 的 num_nextn_predict_layers 层）：因果语言模型的前向
    不用它们，transformers 也忽略它们。返回“这个键属于它们”的判断（这些张量不读），判为真的键记进 skipped。"""
    extra = int(hf.get("num_nextn_predict_layers") or 0) if cfg.family == "deepseek_v3" else 0

    def is_mtp(key: str) -> bool:
        match = _LAYER_KEY.match(key)
        found = match is not None and cfg.num_layers <= int(match.group(1)) < cfg.num_layers + extra
        if found:
            skipped.append(key)
        return found

    return is_mtp


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
    """读取任一支持家族的检查点目录（或 hub id），返回 ``(ModelConfig, params)``（家族由 config.json 的 model_type 决定）。

    dtype 为 None 时保持检查点自己的 dtype（bf16 检查点读成 bf16）；device 指定张量直接读到哪个设备。
    """
    directory = resolve_checkpoint(path)
    config_file = directory / CONFIG_FILE
    hf = _read_json(config_file)
    cfg = config_from_hf(hf, source=str(config_file))
    parse_dtype(hf.get("dtype", hf.get("torch_dtype")), str(config_file))  # 只校验；实际 dtype 以文件为准
    device_name = None if device is None else str(torch.device(device))
    tensors: dict[str, Tensor] = {}
    owner: dict[str, str] = {}
    mtp: list[str] = []
    skip = _mtp_layers(hf, cfg, mtp)
    for name, keys in _weight_files(directory).items():
        for key, value in _read_tensors(directory / name, keys, dtype, device_name, skip).items():
            if key.endswith(_IGNORED_SUFFIXES):
                continue
            if key in tensors:
                raise ValueError(f"{name}: key {key} also appears in {owner[key]}")
            tensors[key], owner[key] = value, name
    if mtp:
        warnings.warn(f"{config_file}: {len(mtp)} tensors of the multi-token-prediction layer(s) "
                      f"(num_nextn_predict_layers={hf.get('num_nextn_predict_layers')}, from model.layers.{cfg.num_layers}) "
                      f"are not loaded: the causal-LM forward does not use them, as in transformers", UserWarning, stacklevel=2)
    if cfg.num_experts:
        fuse_experts(tensors, owner, cfg)  # 发布的逐专家键 → 融合张量（参数字典的布局）
    _untie(tensors, owner, cfg)
    if cfg.family == "qwen2" and not cfg.qkv_bias:
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
    if cfg.family == "qwen2" and not cfg.qkv_bias:
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
    """把参数字典写成 transformers 可直接 ``from_pretrained`` 的检查点目录（cfg.family 的类），返回该目录。

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
