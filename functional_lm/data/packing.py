"""打包：把文档流切成定长块，每块 seq_len + 1 个 token。

约定（与训练循环的接口）：
    block      = 流中连续的 seq_len + 1 个 token；相邻块不重叠，所以输入里的每个 token 恰好出现一次
    input_ids  = block[:-1]，labels = block[1:]；loss_mask = mask[1:] 且不是填充
    labels     在 loss_mask 为 False 处取 IGNORE_INDEX = -100（填充、非助手 token、对话后的分隔符）
    最后一个不满的块用 pad id（<|endoftext|>）补齐，补齐处不计损失
文档之间已在 TokenStore 里用 <|endoftext|> 隔开（分隔符算作它前面那篇文档的最后一个 token）。

文档编号（segment ids）：块里每个 token 所在文档的序号，减去块首 token 的序号，所以每行从 0 开始、单调不减；
补齐的尾部另算一篇。编号由 TokenStore 的 offsets（缓存索引里本来就有的文档边界）与块号直接算出，
不必另存，恢复训练时由 (epoch, position) 决定的块自然得到同样的编号。
document_mask=True 时（训练器的缺省），标签落在下一篇文档的位置不计损失：即每篇文档最后的分隔符
不再学习“预测下一篇文档的第一个 token”（它的标签为 −100）；文档内最后一个词预测分隔符照常计入。
document_mask=False 时一切与以前完全相同（注意力可以跨文档，与 GPT / Qwen 预训练的做法相同）。

验证集按“文档”划分：用种子打乱文档编号，取前 ceil(比例·D) 篇作验证集，两边各自保持原文档顺序，
一篇文档不会同时出现在训练与验证中。划分只记录文档编号，不复制 token（大语料下也只占 O(D) 内存）。
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from functional_lm.data.store import TokenStore

__all__ = ["IGNORE_INDEX", "Block", "PackedDataset", "split_documents", "pack", "pack_documents"]

IGNORE_INDEX = -100  # 交叉熵的忽略标签（与 torch.nn.functional.cross_entropy 默认值一致）


@dataclass
class Block:
    """一个块：tokens int64[L+1]，mask bool[L+1]（是否计损失），valid bool[L+1]（是否为真实 token）。"""

    tokens: np.ndarray
    mask: np.ndarray
    valid: np.ndarray


class PackedDataset:
    """由 TokenStore 中若干文档（按给定顺序）拼成的连续流，按块随机访问。

    选中的文档里编号相邻的会合并成一段（segment），取块时只需二分查找段表并拷贝几段切片。
    """

    def __init__(self, store: TokenStore, seq_len: int, doc_ids: np.ndarray | None = None) -> None:
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self.store = store
        self.seq_len = seq_len
        self.block_size = seq_len + 1
        self.pad_id = store.separator_id
        if doc_ids is None:
            doc_ids = np.arange(store.num_documents, dtype=np.int64)
        self.doc_ids = np.asarray(doc_ids, dtype=np.int64)
        self._build_segments()

    def _build_segments(self) -> None:
        """相邻文档合并成段：段在 store 中的起点、长度，以及在本数据流中的起点。"""
        ids = self.doc_ids
        if len(ids) == 0:
            self.seg_store_start = np.zeros(0, dtype=np.int64)
            self.seg_len = np.zeros(0, dtype=np.int64)
        else:
            breaks = np.flatnonzero(np.diff(ids) != 1) + 1  # 编号不连续处断开
            first = np.concatenate([[0], breaks])
            last = np.concatenate([breaks, [len(ids)]]) - 1
            offsets = self.store.offsets
            self.seg_store_start = offsets[ids[first]]
            self.seg_len = offsets[ids[last] + 1] - self.seg_store_start
        self.seg_stream_start = np.concatenate([[0], np.cumsum(self.seg_len)]).astype(np.int64)
        self.num_tokens = int(self.seg_stream_start[-1])
        # 每篇选中文档在本数据流中的起点（D + 1 项，末项 = num_tokens）：文档编号用它二分查找。
        doc_len = self.store.offsets[ids + 1] - self.store.offsets[ids] if len(ids) else np.zeros(0, np.int64)
        self.doc_stream_start = np.concatenate([[0], np.cumsum(doc_len)]).astype(np.int64)

    def __len__(self) -> int:
        return math.ceil(self.num_tokens / self.block_size)

    def _gather(self, array: np.ndarray, start: int, stop: int, fill: Any) -> np.ndarray:
        """取数据流 [start, stop) 对应的元素（跨段拼接）；超出流尾的部分填 fill。"""
        out = np.full(stop - start, fill, dtype=np.int64 if array.dtype != np.bool_ else np.bool_)
        seg = int(np.searchsorted(self.seg_stream_start, start, side="right")) - 1
        pos = start
        while pos < min(stop, self.num_tokens):
            seg_off = pos - self.seg_stream_start[seg]
            take = min(stop, self.seg_stream_start[seg + 1]) - pos
            src = self.seg_store_start[seg] + seg_off
            out[pos - start : pos - start + take] = array[src : src + take]
            pos += take
            seg += 1
        return out

    def stream_tokens(self, start: int, stop: int) -> np.ndarray:
        """数据流 [start, stop) 的 token（int64；超出流尾处为填充 id）。"""
        return self._gather(self.store.tokens, start, stop, self.pad_id)

    def stream_mask(self, start: int, stop: int) -> np.ndarray:
        """数据流 [start, stop) 的“计损失”掩码（对话里是助手 token；没有掩码的数据全为真，超出流尾处为假）。"""
        if self.store.mask is None:
            return np.arange(start, stop) < self.num_tokens
        return self._gather(self.store.mask, start, stop, False)

    def block(self, index: int) -> Block:
        """第 index 个块（0 ≤ index < len）。"""
        if not 0 <= index < len(self):
            raise IndexError(f"block index {index} out of range [0, {len(self)})")
        start = index * self.block_size
        stop = start + self.block_size
        valid = np.arange(start, stop) < self.num_tokens
        return Block(self.stream_tokens(start, stop), self.stream_mask(start, stop) & valid, valid)

    def segments(self, index: int) -> np.ndarray:
        """第 index 个块（L + 1 个 token）的文档编号 int64[L+1]：从 0 开始、单调不减，补齐的尾部另算一篇。"""
        if not 0 <= index < len(self):
            raise IndexError(f"block index {index} out of range [0, {len(self)})")
        start = index * self.block_size
        positions = np.arange(start, start + self.block_size)
        doc = np.searchsorted(self.doc_stream_start, positions, side="right") - 1
        return (doc - doc[0]).astype(np.int64)

    def example(self, index: int, document_mask: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """第 index 个训练样本：(input_ids[L], labels[L]（被遮处为 -100）, loss_mask[L])。

        document_mask=True 时，标签属于下一篇文档的位置不计损失（见模块说明）。"""
        return self._example(index, document_mask)[:3]

    def _example(self, index: int, document_mask: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """example 加上输入 token 的文档编号（编号只算一次）。"""
        blk = self.block(index)
        seg = self.segments(index)
        loss_mask = blk.mask[1:]
        if document_mask:
            loss_mask = loss_mask & (seg[1:] == seg[:-1])
        labels = np.where(loss_mask, blk.tokens[1:], IGNORE_INDEX)
        return blk.tokens[:-1], labels, loss_mask, seg[:-1]

    def examples(
        self, indices: Sequence[int], document_mask: bool = False
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """若干样本堆成 (b, L) 的四个数组：input_ids、labels、loss_mask 与输入 token 的文档编号。"""
        parts = [self._example(int(i), document_mask) for i in indices]
        return tuple(np.stack([p[k] for p in parts]) for k in range(4))  # type: ignore[return-value]


def split_documents(num_documents: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """按文档划分训练 / 验证：种子打乱后取前 ceil(比例·D) 篇作验证（比例 > 0 时至少一篇），两边保持原顺序。"""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n_val = math.ceil(val_fraction * num_documents) if val_fraction > 0 else 0
    if val_fraction > 0 and n_val >= num_documents:
        raise ValueError(
            f"val_fraction={val_fraction} leaves no training documents out of {num_documents} "
            f"(the validation split takes whole documents: add data, or set val_fraction=0)"
        )
    perm = np.random.default_rng(seed).permutation(num_documents)
    val = np.sort(perm[:n_val]).astype(np.int64)
    train = np.sort(perm[n_val:]).astype(np.int64)
    return train, val


def pack(
    store: TokenStore,
    seq_len: int,
    *,
    val_fraction: float = 0.0,
    seed: int = 0,
    model_config: Any = None,
) -> tuple[PackedDataset, PackedDataset]:
    """把 TokenStore 打包成 (训练集, 验证集)；给了 model_config 时检查块长与词表不超过模型的上限。"""
    if model_config is not None:
        if seq_len > model_config.max_seq_len:
            raise ValueError(
                f"block size seq_len={seq_len} is larger than the model's max_seq_len={model_config.max_seq_len}"
            )
        top = store.max_token_id()
        if top >= model_config.vocab_size:
            where = store.description
            raise ValueError(
                f"token id {top} in {where} does not fit the model's vocab_size={model_config.vocab_size} "
                f"(embedding rows); was the data tokenized with a larger tokenizer?"
            )
    train_ids, val_ids = split_documents(store.num_documents, val_fraction, seed)
    return PackedDataset(store, seq_len, train_ids), PackedDataset(store, seq_len, val_ids)


def pack_documents(
    documents: Sequence[Sequence[int]],
    seq_len: int,
    separator_id: int,
    masks: Sequence[Sequence[bool] | None] | None = None,
) -> PackedDataset:
    """便捷函数：内存中的若干 id 列表 → 打包好的数据集（不划分验证集）。"""
    store = TokenStore.from_documents(documents, separator_id=separator_id, masks=masks)
    return PackedDataset(store, seq_len)
