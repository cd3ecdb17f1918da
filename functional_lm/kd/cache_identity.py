"""教师缓存的身份：数据的内容指纹、旧指纹的兼容，以及指纹不符时用文字说明哪一样不同。

数据指纹只看内容（``data_fingerprint``）::

    {"crc32": {"tokens": c₁, "offsets": c₂[, "mask": c₃]}, "num_tokens": N}

c₁ = CRC-32(token 的 uint32 小端字节)，c₂ = CRC-32(文档边界的 int64 小端字节)，c₃ = CRC-32(损失掩码的 uint8 字节，
只有对话数据才有)。磁盘上的分词缓存直接取 index.json 里 tokens.bin / mask.bin 的 CRC-32（两个文件正是这些原始字节，
不必重读），文档边界只有 O(D) 个数，现算。数据文件的路径、修改时间、分词缓存的键都不进指纹：把数据逐字节地
拷到另一台机器、另一个路径，或者 touch 一下，缓存照常可用；分词器另有自己的指纹字段（``tokenizer``）。

旧指纹（这个版本之前建的缓存）在 data 里多一个 ``key``（分词缓存的键，含数据文件的绝对路径与修改时间）：
    * 磁盘形式 ``{"key", "files": {"tokens.bin", "offsets.npy"[, "mask.bin"]: CRC-32}, "num_tokens"}``——
      只要记下的三个 CRC-32 与这份数据的相同（offsets.npy 的按 np.save 的字节算），就当作相同的数据接受；
    * 内存形式 ``{"key": null, "crc32": {...}, "num_tokens"}``——去掉 key 就是新的指纹。
``comparable`` 把相符的旧 data 换成新指纹再比较，所以旧缓存不必重建；不相符的照常按“数据不同”拒绝，
说明里多一句“这个缓存早于内容指纹”。

差异的说明（``describe``）：每一项一句话，说清是哪一样不同，可读的设置再写出两边的值，例如
“the split seed (--split-seed) differs: cache 0, this run 5”；数据、分词器、教师权重这类哈希只说“不同”，
数据还写出两边的 token 数。

指纹的字段（``make_fingerprint``）：调用方负责 tokenizer、data、split、teacher_weights 四项，其余由构建补上；
教师权重的身份（``teacher_weights_fingerprint``）只读每个 safetensors 文件的头部与首尾各 1 MiB。
"""

from __future__ import annotations

import hashlib
import io
import json
import struct
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from functional_lm.data.store import TokenStore

__all__ = [
    "ABSENT", "comparable", "data_fingerprint", "describe", "differences", "jsonable", "make_fingerprint", "short",
    "teacher_weights_fingerprint",
]

ABSENT = object()  # 一侧没有这个字段

# 字段路径 → 说明：取值可以直接写出来的设置（括号里是对应的命令行选项）。
_SETTINGS = {
    "split.split": "the split (train or val)",
    "split.val_fraction": "the validation fraction (--val-fraction)",
    "split.seed": "the split seed (--split-seed)",
    "seq_len": "the block length (--seq-len)",
    "document_mask": "the document mask (--document-mask)",
    "top_k": "top-k (--top-k)",
    "temperature": "the temperature (--temperature)",
    "value_dtype": "the stored value type (--value-dtype)",
    "real_vocab_size": "the real vocabulary size (the tokenizer's)",
    "num_blocks": "the number of blocks",
    "blocks_per_shard": "the blocks per shard (--blocks-per-shard)",
}
# 哈希类字段：值本身对人没有意义，只说哪一样不同。
_IDENTITIES = {
    "tokenizer": "the tokenizer differs (another vocabulary or other tokenizer files)",
    "teacher_weights": "the teacher's weights differ (another checkpoint, or its weights changed)",
}


# ------------------------------------------------------------------------------------------------ 比较
def jsonable(value: Any) -> Any:
    """经一次 JSON 往返（元组变列表、键变字符串），与从 index.json 读回的值可以直接比较。"""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def differences(old: Any, new: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """两份 JSON 值的差异 [(字段路径, 旧值, 新值)]；字典逐键递归（路径用点连接），其余整体比较。"""
    if isinstance(old, dict) and isinstance(new, dict):
        found = []
        for key in sorted(set(old) | set(new), key=str):
            path = f"{prefix}.{key}" if prefix else str(key)
            found += differences(old.get(key, ABSENT), new.get(key, ABSENT), path)
        return found
    same = (old == new and type(old) is type(new)) or _same_number(old, new)
    return [] if same else [(prefix, old, new)]


def _same_number(a: Any, b: Any) -> bool:
    """2 与 2.0 视为相同（JSON 不区分）；布尔不算数字。"""
    numbers = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (a, b))
    return numbers and a == b


def short(value: Any, limit: int = 80) -> str:
    """消息里的值：JSON 写法，过长时截断；缺失的一侧写 (absent)。"""
    text = "(absent)" if value is ABSENT else json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= limit else text[: limit - 1] + "…"


# ------------------------------------------------------------------------------------------------ 数据的内容指纹
def _crc(array: np.ndarray, dtype: str) -> int:
    """数组按给定的小端类型排成字节后的 CRC-32（分块算，大数组也不整份复制）。"""
    flat, crc, step = np.asarray(array).reshape(-1), 0, 1 << 22
    for start in range(0, len(flat), step):
        crc = zlib.crc32(np.ascontiguousarray(flat[start : start + step], dtype=dtype).tobytes(), crc)
    return crc


def _recorded_crc(store: Any, name: str) -> int | None:
    """磁盘分词缓存在 index.json 里记下的某个文件的 CRC-32；内存中的 TokenStore 没有时为 None。"""
    files = store.meta.get("files") if store.path is not None else None
    entry = files.get(name) if isinstance(files, dict) else None
    return entry.get("crc32") if isinstance(entry, dict) else None


def data_fingerprint(store: Any) -> dict[str, Any]:
    """数据的内容指纹（见模块说明）：token、文档边界与（有时）损失掩码的 CRC-32，加 token 数；与路径无关。"""
    tokens = _recorded_crc(store, "tokens.bin")
    crcs = {
        "tokens": tokens if tokens is not None else _crc(store.tokens, "<u4"),
        "offsets": _crc(store.offsets, "<i8"),
    }
    if store.mask is not None:
        mask = _recorded_crc(store, "mask.bin")
        crcs["mask"] = mask if mask is not None else _crc(store.mask, "u1")
    return {"crc32": crcs, "num_tokens": int(store.num_tokens)}


def _npy_crc(offsets: np.ndarray) -> int:
    """offsets 按 np.save 写成 .npy 文件的字节的 CRC-32（旧指纹记的是 offsets.npy 文件的校验和）。"""
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(offsets, dtype=np.int64), allow_pickle=False)
    return zlib.crc32(buffer.getvalue())


def _legacy_matches(recorded: Mapping[str, Any], store: Any) -> bool:
    """旧的磁盘形式 data 指纹记下的 CRC-32 与 token 数是否与这份数据的相同。"""
    files, now = recorded.get("files"), data_fingerprint(store)
    if not isinstance(files, dict) or recorded.get("num_tokens") != now["num_tokens"]:
        return False
    offsets = _recorded_crc(store, "offsets.npy")
    offsets = offsets if offsets is not None else _npy_crc(store.offsets)
    wanted = {"tokens.bin": now["crc32"]["tokens"], "offsets.npy": offsets}
    if "mask" in now["crc32"]:
        wanted["mask.bin"] = now["crc32"]["mask"]
    return files == wanted


def comparable(recorded_fp: Mapping[str, Any], store: Any) -> dict[str, Any]:
    """缓存记下的指纹，旧形式的 data（带 key）与这份数据相符时换成新的内容指纹（见模块说明），其余原样。"""
    fp = dict(recorded_fp)
    data = fp.get("data")
    if not (isinstance(data, dict) and "key" in data):
        return fp
    if "files" in data:
        if _legacy_matches(data, store):
            fp["data"] = data_fingerprint(store)
    else:
        fp["data"] = {k: v for k, v in data.items() if k != "key"}
    return fp


# ------------------------------------------------------------------------------------------------ 指纹的字段
def make_fingerprint(
    tokenizer: Any, store: TokenStore, *, teacher_weights: str | None, split: str = "train",
    val_fraction: float = 0.0, seed: int = 0, split_seed: int | None = None,
) -> dict[str, Any]:
    """调用方负责的四个指纹字段（tokenizer、data、split、teacher_weights）；其余字段由构建函数补上。

    tokenizer：分词器指纹字符串，或带 ``.fingerprint`` 的分词器；split："train" 或 "val"，连同划分的
    val_fraction 与划分种子 split_seed（``pack`` 的 seed；记为 ``split.seed``，旧的参数名 seed 仍可用，
    split_seed 给了时以它为准）；teacher_weights：``teacher_weights_fingerprint(目录)``，
    内存中的教师可以传任意能标识它的字符串；None 时不写这一项（导入时由 import_topk_jsonl 记下文件的 sha256）。"""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    fingerprint = {
        "tokenizer": str(getattr(tokenizer, "fingerprint", tokenizer)),
        "data": data_fingerprint(store),
        "split": {"split": split, "val_fraction": float(val_fraction),
                  "seed": int(seed if split_seed is None else split_seed)},
    }
    if teacher_weights is not None:
        fingerprint["teacher_weights"] = str(teacher_weights)
    return fingerprint


def teacher_weights_fingerprint(checkpoint_dir: str | Path) -> str:
    """教师权重的身份：sha256(每个 *.safetensors 的 文件名、大小、头部 JSON、数据区首尾各至多 1 MiB)，按文件名排序。

    头部记着每个张量的名字、dtype、形状与字节偏移，加上文件大小即可区分不同结构的检查点；同一结构的
    不同权重（例如微调前后）头部完全相同，所以再取数据区首尾的一小段。全程只读每个文件约 2 MiB，
    不必把几 GB 的权重读一遍。"""
    directory = Path(checkpoint_dir)
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in the teacher checkpoint {directory}")
    digest = hashlib.sha256()
    for file in files:
        digest.update(_safetensors_identity(file))
    return "safetensors-sha256:" + digest.hexdigest()


def _safetensors_identity(file: Path, sample: int = 1 << 20) -> bytes:
    """一个 safetensors 文件的身份字节：名字、大小、头部 JSON、数据区开头与结尾各至多 sample 字节。"""
    size = file.stat().st_size
    with open(file, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8 or (length := struct.unpack("<Q", prefix)[0]) > size - 8:
            raise ValueError(f"{file}: not a safetensors file (the 8-byte header length is missing or too large)")
        header = handle.read(length)
        head = handle.read(sample)
        handle.seek(max(8 + length, size - sample))
        tail = handle.read(sample)
    return f"{file.name}\0{size}\0".encode() + header + b"\0" + head + b"\0" + tail + b"\0"


# ------------------------------------------------------------------------------------------------ 文字说明
def _data_sentence(found: Sequence[tuple[str, Any, Any]], built: str) -> str:
    """data.* 的差异合成一句话：token 数不同时写出两边的数（built：“缓存建自” 的说法），只有文档边界或掩码不同时
    说是哪一样。"""
    paths = {path for path, _, _ in found}
    counts = {path: (old, new) for path, old, new in found}
    if "data.key" in paths or "data.files" in paths or any(p.startswith("data.files.") for p in paths):
        return ("the data's tokens differ (different text or a different file; the cache predates content "
                "fingerprints, and the checksums it recorded do not match this data)")
    if "data.num_tokens" in counts:
        old, new = counts["data.num_tokens"]
        return (f"the data's tokens differ (different text or a different file): {built} {short(old)} tokens, "
                f"this data has {short(new)}")
    if paths == {"data.crc32.offsets"}:
        return "the data's document boundaries differ (the same tokens cut into other documents)"
    if paths == {"data.crc32.mask"}:
        return "the data's loss mask differs (other tokens are trained on: chat data's assistant turns)"
    return "the data's tokens differ (different text or a different file)"


def _sentence(path: str, old: Any, new: Any, who: str) -> str:
    """一个非数据字段的差异：哈希类只说不同，其余写出 缓存的值 与 这次的值。"""
    top = path.split(".")[0]
    if top in _IDENTITIES:
        return _IDENTITIES[top]
    if top == "teacher_config" and path != top:
        label = f"the teacher's config.json ({path.split('.', 1)[1]})"
    else:
        label = _SETTINGS.get(path, path)
    return f"{label} differs: cache {short(old)}, {who} {short(new)}"


def describe(
    found: Sequence[tuple[str, Any, Any]], who: str = "this build", built: str = "the cache was built from",
) -> list[str]:
    """差异 [(字段路径, 缓存的值, 这次的值)] → 每项一句话（data.* 合成一句，放在最前）。
    who：“这一次”的叫法；built：数据一句里“记录的一方”的说法（检查点用 “the checkpoint was trained on”）。"""
    is_data = [path == "data" or path.startswith("data.") for path, _, _ in found]
    data = [item for item, flag in zip(found, is_data) if flag]
    rest = [item for item, flag in zip(found, is_data) if not flag]
    sentences = [_data_sentence(data, built)] if data else []
    return sentences + [_sentence(path, old, new, who) for path, old, new in rest]
