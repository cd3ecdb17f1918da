"""内置默认语料：CPython 自带的 ``pydoc_data.topics``——Python 官方文档（语言参考等）的英文正文，
每台装了 Python 的机器都有，无需下载，供离线演示与测试使用。

每个主题（``if``、``assignment``、``typesseq`` …）是一篇文档，按主题名排序，去掉首尾空白。
规模随 Python 版本略有不同（3.11：79 篇、464,891 字符，默认分词器下 106,284 token，加上分隔符 106,363）。
"""

from __future__ import annotations

import hashlib
import sys

from functional_lm.data.sources import Document, DocumentSource, ReadStats

__all__ = ["default_corpus", "default_corpus_source", "DEFAULT_CORPUS_NAME"]

DEFAULT_CORPUS_NAME = "pydoc_data.topics"


def default_corpus() -> list[str]:
    """返回默认语料的文档列表（按主题名排序，非空）。"""
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    return [topics[name].strip() for name in sorted(topics) if topics[name].strip()]


def default_corpus_source() -> DocumentSource:
    """默认语料作为带指纹的数据源（指纹 = Python 版本 + 全文哈希），供磁盘缓存使用。"""
    docs = default_corpus()
    digest = hashlib.sha256("\x00".join(docs).encode("utf-8")).hexdigest()
    name = f"{DEFAULT_CORPUS_NAME}@python{sys.version_info.major}.{sys.version_info.minor}"

    def read(skip_errors: bool, stats: ReadStats):
        for i, text in enumerate(docs, start=1):
            stats.documents += 1
            yield Document(text, None, name, i)

    return DocumentSource(name, digest, read)
