"""数据流水线：Qwen 分词器、数据源读取、对话格式、磁盘 token 缓存、打包与可恢复的批加载器。

    from functional_lm.data import load_tokenizer, prepare_data
    tok = load_tokenizer(None)                       # 离线默认：Qwen2.5 词表（extra "qwen"）
    tok = load_tokenizer("path/to/Qwen2.5-0.5B")     # 教师目录：tokenizer.json + tokenizer_config.json
    data = prepare_data(["train.jsonl"], tokenizer=tok, seq_len=512, batch_size=8, val_fraction=0.01)
    data = prepare_data(["notes.txt"], text_split="paragraph")  # 纯文本：空白行分段（TEXT_SPLITS）

模块：tokenizer（分词器与词表契约）、chat（聊天模板与助手掩码）、sources（读取与坏输入报错）、
store（TokenStore 布局与损坏检查）、cache（并行分词进 memmap 缓存）、errors（缓存损坏 / 写失败）、
packing（定长块与划分）、loader（确定性可恢复加载器）、corpus（内置默认语料）、pipeline（一站式 prepare_data）。
"""

from functional_lm.data.token_cache import build_token_cache, tokenize_documents
from functional_lm.data.chat import ChatEncoding, render_chat
from functional_lm.data.corpus import default_corpus, default_corpus_source
from functional_lm.errors import CacheDamagedError, CacheWriteError
from functional_lm.data.loader import Batch, BatchLoader
from functional_lm.data.packing import IGNORE_INDEX, PackedDataset, pack, pack_documents, split_documents
from functional_lm.data.pipeline import DataBundle, prepare_data
from functional_lm.data.sources import (
    DEFAULT_TEXT_SPLIT,
    TEXT_SPLITS,
    Document,
    DocumentSource,
    ReadStats,
    as_source,
    check_text_split,
    read_documents,
    read_hf_dataset,
)
from functional_lm.errors import DataError
from functional_lm.data.store import TokenStore
from functional_lm.data.vocab_contract import VocabContract, check_vocab_compat
from functional_lm.data.tokenizer import (
    Tokenizer,
    load_tokenizer,
    save_default_tokenizer,
)

__all__ = [
    "Batch",
    "BatchLoader",
    "CacheDamagedError",
    "CacheWriteError",
    "ChatEncoding",
    "DataBundle",
    "DEFAULT_TEXT_SPLIT",
    "DataError",
    "Document",
    "DocumentSource",
    "IGNORE_INDEX",
    "PackedDataset",
    "ReadStats",
    "TEXT_SPLITS",
    "TokenStore",
    "Tokenizer",
    "VocabContract",
    "as_source",
    "build_token_cache",
    "check_text_split",
    "check_vocab_compat",
    "default_corpus",
    "default_corpus_source",
    "load_tokenizer",
    "pack",
    "pack_documents",
    "prepare_data",
    "read_documents",
    "read_hf_dataset",
    "render_chat",
    "save_default_tokenizer",
    "split_documents",
    "tokenize_documents",
]
