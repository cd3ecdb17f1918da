"""TokenStore：分好词的语料在内存或磁盘上的统一表示。

布局（与磁盘缓存文件一一对应）：
    tokens   uint32[N]     所有文档首尾相接，每篇文档后面紧跟一个分隔符（<|endoftext|>）
    mask     bool[N]|None  每个 token 是否计损失（None 表示全部计；对话文档只有助手 token 为 True，
                           其后的分隔符为 False；纯文本文档连同分隔符全为 True）
    offsets  int64[D+1]    第 i 篇文档（含分隔符）占 tokens[offsets[i]:offsets[i+1]]
    lines    int64[D]|None 第 i 篇文档在它的数据源里的行号（从 1 起；parquet / datasets 为行序号），与 index.json
                           ``sources`` 里各数据源的文档数一起给出 ``文件:行``，错误消息用它点名用户的数据

磁盘上：``tokens.bin``（uint32 原始字节）、可选的 ``mask.bin``（uint8）、``offsets.npy``、``lines.npy``（有这个文件
之前建的缓存没有它，消息里就只有文件名与文档序号）与小的 ``index.json``，
打开时用 numpy memmap，语料可以远大于内存。

损坏检测：index.json 记下每个数据文件的字节数与 CRC-32（``files``）。``TokenStore.open`` 总做便宜的结构检查
（index.json 可解析、文件齐全、大小与 token 数相符、offsets 单调且首尾对得上）；``verify=True`` 时再读一遍
全部数据核对校验和与最大 token id（约每 GB 一秒）。发现问题抛 ``CacheDamagedError``（ValueError），
消息写明目录、文件与重建办法；build_token_cache 复用缓存前用 verify=True，损坏时自动重建。
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from functional_lm.errors import CacheDamagedError

__all__ = ["TokenStore", "TOKEN_DTYPE", "CACHE_FORMAT_VERSION", "crc32_file"]

TOKEN_DTYPE = np.uint32  # Qwen 的 id < 2^32；uint16 装不下 151,665
# 磁盘缓存格式版本（进缓存键）：2 = index.json 带各文件的字节数与 CRC-32。版本一变，旧缓存自然换键重建。
CACHE_FORMAT_VERSION = 2
CHECKSUM_CHUNK = 16 << 20  # 校验时每次读 16 MiB（4 的倍数，tokens.bin 的块可直接看成 uint32）


def crc32_file(path: str | Path) -> int:
    """整个文件的 CRC-32（分块读）。

    用 CRC-32 就够了：这里要发现的是截断、写坏、位翻转这类意外损坏，不是防人故意篡改；
    zlib.crc32 每秒能算 GB 级，而 sha256 慢好几倍，复用缓存时每次都要付这笔账。
    """
    return _scan(Path(path), as_tokens=False)[0]


def _scan(path: Path, as_tokens: bool) -> tuple[int, int]:
    """读一遍文件：(CRC-32, 最大 uint32 值)；as_tokens=False 时第二项为 -1。"""
    crc, top = 0, -1
    with open(path, "rb") as f:
        while chunk := f.read(CHECKSUM_CHUNK):
            crc = zlib.crc32(chunk, crc)
            whole = len(chunk) // 4 * 4
            if as_tokens and whole:
                top = max(top, int(np.frombuffer(chunk[:whole], dtype=TOKEN_DTYPE).max()))
    return crc, top


def _count(meta: dict[str, Any], key: str) -> int | None:
    """index.json 里的非负整数字段；缺失或类型不对时返回 None。"""
    value = meta.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _read_index(directory: Path) -> dict[str, Any]:
    """读并校验 index.json 的形状；任何问题都是 index.json 的损坏。"""
    try:
        meta = json.loads((directory / "index.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CacheDamagedError(directory, "index.json", "file is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CacheDamagedError(directory, "index.json", f"not readable JSON ({err})") from None
    if not isinstance(meta, dict):
        raise CacheDamagedError(directory, "index.json", f"expected a JSON object, got {type(meta).__name__}")
    for key in ("num_tokens", "separator_id"):
        if _count(meta, key) is None:
            raise CacheDamagedError(directory, "index.json", f"field {key!r} is missing or not an integer >= 0")
    files = meta.get("files", {})
    ok = isinstance(files, dict) and all(
        isinstance(e, dict) and _count(e, "bytes") is not None and _count(e, "crc32") is not None
        for e in files.values()
    )
    if not ok:
        raise CacheDamagedError(directory, "index.json", "field 'files' must map names to {bytes, crc32}")
    return meta


def _check_sizes(directory: Path, meta: dict[str, Any]) -> None:
    """每个数据文件都在，且大小既等于 token 数推出的大小，也等于 index.json 记下的字节数。"""
    n = meta["num_tokens"]
    implied = {"tokens.bin": 4 * n, "offsets.npy": None}  # offsets.npy 带 npy 头，大小只能比对记录
    if meta.get("has_mask"):
        implied["mask.bin"] = n
    if meta.get("has_lines"):
        implied["lines.npy"] = None
    recorded = meta.get("files", {})
    for name, size in implied.items():
        path = directory / name
        if not path.is_file():
            raise CacheDamagedError(directory, name, "file is missing")
        actual = path.stat().st_size
        if size is not None and actual != size:
            raise CacheDamagedError(directory, name, f"{actual} bytes, but {n} tokens need {size}")
        if name in recorded and actual != recorded[name]["bytes"]:
            raise CacheDamagedError(directory, name, f"{actual} bytes, index.json recorded {recorded[name]['bytes']}")


def _load_offsets(directory: Path, meta: dict[str, Any]) -> np.ndarray:
    """读 offsets.npy 并检查：一维 int64，从 0 开始、严格递增（每篇至少有分隔符）、止于 token 数。"""
    try:
        offsets = np.load(directory / "offsets.npy", allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise CacheDamagedError(directory, "offsets.npy", f"not a readable .npy array ({err})") from None
    n, docs = meta["num_tokens"], _count(meta, "num_documents")
    if offsets.ndim != 1 or offsets.dtype != np.int64 or len(offsets) < 2:
        got = f"{offsets.dtype}{list(offsets.shape)}"
        raise CacheDamagedError(directory, "offsets.npy", f"expected an int64[D+1] array, got {got}")
    if int(offsets[0]) != 0 or int(offsets[-1]) != n or bool(np.any(np.diff(offsets) < 1)):
        raise CacheDamagedError(
            directory, "offsets.npy", f"offsets must rise strictly from 0 to {n} tokens (ends at {int(offsets[-1])})"
        )
    if docs is not None and len(offsets) != docs + 1:
        raise CacheDamagedError(directory, "offsets.npy", f"{len(offsets) - 1} documents, index.json says {docs}")
    return offsets


def _load_lines(directory: Path, meta: dict[str, Any], documents: int) -> np.ndarray | None:
    """读 lines.npy（memmap）：一维 int64，每篇文档一个行号；index.json 没有 has_lines 时为 None。"""
    if not meta.get("has_lines"):
        return None
    try:
        lines = np.load(directory / "lines.npy", mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise CacheDamagedError(directory, "lines.npy", f"not a readable .npy array ({err})") from None
    if lines.ndim != 1 or lines.dtype != np.int64 or len(lines) != documents:
        got = f"{lines.dtype}{list(lines.shape)}"
        raise CacheDamagedError(directory, "lines.npy", f"expected an int64[{documents}] array, got {got}")
    return lines


def _verify_contents(directory: Path, meta: dict[str, Any]) -> None:
    """读全部数据：CRC-32 与记录相符，token id 都在分词器的范围内（verify=True 时调用）。"""
    files = meta.get("files") or {}
    optional = (("mask.bin",) if meta.get("has_mask") else ()) + (("lines.npy",) if meta.get("has_lines") else ())
    for name in ("tokens.bin", "offsets.npy") + optional:
        if name not in files:
            raise CacheDamagedError(directory, "index.json", f"no checksum recorded for {name}")
        try:
            crc, top = _scan(directory / name, as_tokens=name == "tokens.bin")
        except OSError as err:
            raise CacheDamagedError(directory, name, f"cannot be read ({err})") from None
        if crc != files[name]["crc32"]:
            raise CacheDamagedError(
                directory, name, f"checksum {crc:08x} does not match index.json ({files[name]['crc32']:08x})"
            )
        vocab = _count(meta, "real_vocab_size")
        if name == "tokens.bin" and vocab is not None and top >= vocab:
            raise CacheDamagedError(directory, name, f"token id {top} is out of range (the tokenizer has {vocab} ids)")


@dataclass
class TokenStore:
    """分好词的文档集合（见模块说明的布局）。"""

    tokens: np.ndarray  # uint32[N]（内存数组或 memmap）
    offsets: np.ndarray  # int64[D+1]
    separator_id: int  # 文档分隔符 id
    mask: np.ndarray | None = None  # bool/uint8[N]，None = 全部计损失
    path: Path | None = None  # 磁盘缓存目录（内存中构造时为 None）
    meta: dict[str, Any] = field(default_factory=dict)  # index.json 的内容（+ 运行时信息）
    lines: np.ndarray | None = None  # int64[D]：每篇文档在它的数据源里的行号（不知道时为 None）

    @property
    def num_documents(self) -> int:
        return len(self.offsets) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    @property
    def description(self) -> str:
        """错误消息里怎样称呼这份数据：用户给的数据源（文件路径 / 数据集名，多于 3 个时写前 2 个与其余的个数）；
        不知道数据源时，磁盘缓存写出目录，内存中构造的叫 "the data"。"""
        names = list(dict.fromkeys(str(s.get("name")) for s in self.meta.get("sources", ()) if isinstance(s, dict)))
        if len(names) > 3:
            return f"{names[0]}, {names[1]} and {len(names) - 2} more data sources"
        if names:
            return ", ".join(names)
        return f"the token cache {self.path}" if self.path is not None else "the data"

    def document_origin(self, doc: int) -> str:
        """第 doc 篇文档（从 0 起）从哪里来，供错误消息使用：``文件:行``；缓存没有记下行号时为
        ``document N of <数据源>``（N 从 1 起）。"""
        sources = [s for s in self.meta.get("sources", ()) if isinstance(s, dict)]
        counts = [s.get("documents") for s in sources]
        if self.lines is not None and counts and all(isinstance(c, int) for c in counts):
            k = int(np.searchsorted(np.cumsum(counts), doc, side="right"))
            if k < len(sources):
                return f"{sources[k].get('name')}:{int(self.lines[doc])}"
        return f"document {doc + 1} of {self.description}"

    def loss_token_count(self) -> int | None:
        """计损失的 token 数（index.json 记着；没有掩码时为全部 token）；旧缓存没记下时为 None（不扫全量）。"""
        if self.mask is None:
            return self.num_tokens
        if "loss_tokens" in self.meta:
            return int(self.meta["loss_tokens"])
        return int(np.count_nonzero(self.mask)) if self.path is None else None

    def max_token_id(self) -> int:
        """最大 token id（磁盘缓存在 index.json 里记着，不必扫全量）。"""
        if "max_token_id" not in self.meta:
            self.meta["max_token_id"] = int(self.tokens.max()) if self.num_tokens else -1
        return int(self.meta["max_token_id"])

    @classmethod
    def from_documents(
        cls,
        documents: Sequence[Sequence[int]],
        *,
        separator_id: int,
        masks: Sequence[Sequence[bool] | None] | None = None,
    ) -> "TokenStore":
        """在内存中由若干 id 列表构造；masks[i] 为 None 表示该篇是纯文本（全部计损失，含分隔符）。"""
        lengths = np.array([len(d) + 1 for d in documents], dtype=np.int64)
        offsets = np.zeros(len(documents) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        tokens = np.empty(int(offsets[-1]), dtype=TOKEN_DTYPE)
        has_mask = masks is not None and any(m is not None for m in masks)
        mask = np.ones(len(tokens), dtype=bool) if has_mask else None
        for i, doc in enumerate(documents):
            a, b = offsets[i], offsets[i + 1]
            tokens[a : b - 1] = np.asarray(doc, dtype=np.int64)
            tokens[b - 1] = separator_id
            if has_mask and masks[i] is not None:
                if len(masks[i]) != len(doc):
                    raise ValueError(f"document {i}: mask has {len(masks[i])} entries for {len(doc)} tokens")
                mask[a : b - 1] = np.asarray(masks[i], dtype=bool)
                mask[b - 1] = False  # 对话之后的分隔符不计损失
        return cls(tokens=tokens, offsets=offsets, separator_id=separator_id, mask=mask)

    @classmethod
    def open(cls, directory: str | Path, *, verify: bool = False) -> "TokenStore":
        """以 memmap 打开磁盘缓存（只读）；损坏时抛 CacheDamagedError（见模块说明），verify=True 时再核对校验和。"""
        directory = Path(directory)
        if not directory.exists():
            raise FileNotFoundError(f"no token cache at {directory}")
        if not directory.is_dir():
            raise CacheDamagedError(directory, directory.name, "not a directory")
        meta = _read_index(directory)
        _check_sizes(directory, meta)
        offsets = _load_offsets(directory, meta)
        lines = _load_lines(directory, meta, len(offsets) - 1)
        if verify:
            _verify_contents(directory, meta)
        n = meta["num_tokens"]
        tokens = np.memmap(directory / "tokens.bin", dtype=TOKEN_DTYPE, mode="r", shape=(n,))
        mask = None
        if meta.get("has_mask"):
            mask = np.memmap(directory / "mask.bin", dtype=np.bool_, mode="r", shape=(n,))
        return cls(tokens, offsets, meta["separator_id"], mask, directory, meta, lines)
