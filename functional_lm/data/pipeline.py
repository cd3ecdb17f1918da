"""一站式入口：分词器 + 数据源 → 磁盘缓存 → 打包（训练 / 验证）→ 批加载器。

    data = prepare_data(["corpus.jsonl"], tokenizer="path/to/teacher", seq_len=512, batch_size=8,
                        val_fraction=0.01, seed=0, split_seed=0, cache_dir=".cache/tokens", model_config=cfg)
    batch = data.train_loader.next_batch()        # Batch(input_ids, labels, loss_mask)，形状 (8, 512)

seed 决定训练集每轮的打乱顺序，split_seed 决定哪些文档进验证集（None = 同 seed，即以前的做法）。
sources 为 None 时使用内置默认语料（pydoc_data.topics）。text_split 决定纯文本文件怎样切成文档
（"paragraph" 默认：空白行分段；"file"：整文件一篇；"line"：每个非空白行一篇），见 sources.TEXT_SPLITS。
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from functional_lm.config import cache_root
from functional_lm.data.token_cache import build_token_cache
from functional_lm.data.corpus import default_corpus_source
from functional_lm.data.loader import BatchLoader
from functional_lm.data.packing import PackedDataset, pack
from functional_lm.data.sources import DEFAULT_TEXT_SPLIT, check_text_split
from functional_lm.data.store import TokenStore
from functional_lm.data.tokenizer import Tokenizer, load_tokenizer
from functional_lm.data.vocab_contract import check_vocab_compat

__all__ = ["DataBundle", "prepare_data", "default_cache_dir"]

def default_cache_dir() -> Path:
    """分词缓存的默认目录：缓存根目录（FUNCTIONAL_LM_CACHE，缺省 ~/.cache/functional_lm）下的 tokens/。"""
    return cache_root() / "tokens"


@dataclass
class DataBundle:
    """prepare_data 的结果：分词器、缓存、两个打包数据集和对应的加载器（验证集不打乱、不丢尾批）。"""

    tokenizer: Tokenizer
    store: TokenStore
    train: PackedDataset
    val: PackedDataset
    train_loader: BatchLoader
    val_loader: BatchLoader | None


def _check_something_counts(store: TokenStore) -> None:
    """对话只在助手回复上计损失：一个助手回合都没有（也没有纯文本）的数据什么也训练不了，点名数据文件报错。
    掩码全为假就说明每篇都是对话（纯文本文档的掩码全为真）。旧缓存没记下计损失的 token 数时不检查。"""
    if store.loss_token_count() == 0:
        raise ValueError(
            f"{store.description}: none of the {store.num_documents} conversations has an assistant turn, so no "
            f"token counts toward the loss (distillation trains on the assistant replies only); add assistant "
            f"replies to the conversations, or give plain text as {{\"text\": ...}} rows"
        )


def prepare_data(
    sources: Sequence[Any] | None = None,
    *,
    tokenizer: Tokenizer | str | os.PathLike | None = None,
    seq_len: int = 512,
    batch_size: int = 8,
    val_fraction: float = 0.0,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    model_config: Any = None,
    num_workers: int | None = None,
    skip_errors: bool = False,
    progress: bool = True,
    text_split: str = DEFAULT_TEXT_SPLIT,
    split_seed: int | None = None,
) -> DataBundle:
    """分词（复用缓存）→ 检查词表与块长 → 划分打包（种子 split_seed，None 时用 seed）→ 构造加载器（种子 seed）。"""
    check_text_split(text_split)  # 先于加载分词器：参数写错立刻报，不等几秒
    tok = load_tokenizer(tokenizer)
    if model_config is not None:
        check_vocab_compat(tok, model_config.vocab_size)
    srcs = [default_corpus_source()] if sources is None else list(sources)
    store = build_token_cache(
        srcs, tok, cache_dir or default_cache_dir(), num_workers=num_workers,
        skip_errors=skip_errors, progress=progress, text_split=text_split,
    )
    _check_something_counts(store)
    split = seed if split_seed is None else split_seed
    train, val = pack(store, seq_len, val_fraction=val_fraction, seed=split, model_config=model_config)
    train_loader = BatchLoader(train, batch_size, seed=seed, shuffle=True, drop_last=True)
    val_loader = None
    if len(val) > 0:
        val_loader = BatchLoader(val, min(batch_size, len(val)), seed=seed, shuffle=False, drop_last=False)
    return DataBundle(tok, store, train, val, train_loader, val_loader)
