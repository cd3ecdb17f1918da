"""TokenStore：分好词的语料在内存或磁盘上的统一表示。

布局（与磁盘缓存文件一一对应）：
    tokens   uint32[N]     所有文档首尾相接，每篇文档后面紧跟一个分隔符（<|endoftext|>）
    mask     bool[N]|None  每个 token 是否计损失（None 表示全部计；对话文档只有助手 token 为 True，
                           其后的分隔符为 False；纯文本文档连同分隔符全为 True）
    offsets  int64[D+1]    第 i 篇文档（含分隔符）占 tokens[offsets[i]:offsets[i+1]]

磁盘上：``tokens.bin``（uint32 原始字节）、可选的 ``mask.bin``（uint8）、``offsets.npy`` 与小的 ``index.json``，
打开时用 numpy memmap，语料可以远大于内存。
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

__all__ = ["TokenStore", "TOKEN_DTYPE"]

TOKEN_DTYPE = np.uint32  # Qwen 的 id < 2^32；uint16 装不下 151,665


@dataclass
class TokenStore:
    """分好词的文档集合（见模块说明的布局）。"""

    tokens: np.ndarray  # uint32[N]（内存数组或 memmap）
    offsets: np.ndarray  # int64[D+1]
    separator_id: int  # 文档分隔符 id
    mask: np.ndarray | None = None  # bool/uint8[N]，None = 全部计损失
    path: Path | None = None  # 磁盘缓存目录（内存中构造时为 None）
    meta: dict[str, Any] = field(default_factory=dict)  # index.json 的内容（+ 运行时信息）

    @property
    def num_documents(self) -> int:
        return len(self.offsets) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

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
    def open(cls, directory: str | Path) -> "TokenStore":
        """以 memmap 打开磁盘缓存（只读）。"""
        directory = Path(directory)
        meta = json.loads((directory / "index.json").read_text(encoding="utf-8"))
        n = int(meta["num_tokens"])
        tokens = np.memmap(directory / "tokens.bin", dtype=TOKEN_DTYPE, mode="r", shape=(n,))
        mask = None
        if meta.get("has_mask"):
            mask = np.memmap(directory / "mask.bin", dtype=np.bool_, mode="r", shape=(n,))
        offsets = np.load(directory / "offsets.npy")
        if int(offsets[-1]) != n:
            raise ValueError(f"{directory}: offsets end at {int(offsets[-1])} but index says {n} tokens")
        return cls(tokens, offsets, int(meta["separator_id"]), mask, directory, meta)
