"""数据源读取：纯文本、JSON lines（``text`` 字段或对话 ``messages``）、parquet，以及 ``datasets`` 库能打开的数据集。

每个读取器逐篇产出 ``Document``，带上来源与行号（parquet / datasets 为从 1 起的行序号）。
坏输入（空文件、缺字段、非法 JSON、非法 UTF-8、未知角色）抛 ``DataError``，消息形如 ``path:line: 原因``；
``skip_errors=True`` 时跳过该行并记入 ``ReadStats``。
纯文本文件整文件算一篇文档（一次读入内存）；非常大的语料请用 JSON lines 或 parquet 逐行给出。
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from functional_lm.data.chat import validate_messages

__all__ = [
    "DataError",
    "Document",
    "ReadStats",
    "DocumentSource",
    "read_documents",
    "read_hf_dataset",
    "as_source",
    "TEXT_SUFFIXES",
    "JSONL_SUFFIXES",
    "PARQUET_SUFFIXES",
]

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".text"}
JSONL_SUFFIXES = {".jsonl", ".ndjson", ".json"}
PARQUET_SUFFIXES = {".parquet", ".pq"}
MAX_KEPT_ERRORS = 100  # ReadStats 里最多保留多少条错误信息


class DataError(ValueError):
    """输入数据错误；``str()`` 形如 ``path:line: message``。"""

    def __init__(self, path: str, line: int, message: str) -> None:
        self.path, self.line, self.message = str(path), line, message
        super().__init__(f"{self.path}:{line}: {message}")


@dataclass
class Document:
    """一篇文档：纯文本（text）或一段对话（messages），二者恰有其一。"""

    text: str | None
    messages: list[dict] | None
    source: str  # 文件路径或数据集名
    line: int  # 行号 / 行序号（从 1 起）


@dataclass
class ReadStats:
    """读取统计：产出的文档数、跳过的坏行数与（前若干条）错误信息。"""

    documents: int = 0
    skipped: int = 0
    errors: list[str] = field(default_factory=list)

    def record(self, error: DataError) -> None:
        self.skipped += 1
        if len(self.errors) < MAX_KEPT_ERRORS:
            self.errors.append(str(error))


def _document_from_record(record: Any, path: str, line: int, text_field: str, messages_field: str) -> Document:
    """一条 JSON / parquet / datasets 记录 → Document；有 messages 字段时当作对话。"""
    if not isinstance(record, dict):
        raise DataError(path, line, f"expected a JSON object, got {type(record).__name__}")
    if record.get(messages_field) is not None:
        messages = record[messages_field]
        try:
            validate_messages(messages)
        except ValueError as err:
            raise DataError(path, line, str(err)) from None
        return Document(None, [dict(m) for m in messages], path, line)
    text = record.get(text_field)
    if text is None:
        raise DataError(path, line, f"record has no {text_field!r} field (nor {messages_field!r})")
    if not isinstance(text, str):
        raise DataError(path, line, f"field {text_field!r} must be a string, got {type(text).__name__}")
    return Document(text, None, path, line)


def _guarded(
    produce: Callable[[], Document], skip_errors: bool, stats: ReadStats
) -> Document | None:
    """调用 produce；出 DataError 时按 skip_errors 决定抛出还是计数跳过。"""
    try:
        doc = produce()
    except DataError as err:
        if not skip_errors:
            raise
        stats.record(err)
        return None
    stats.documents += 1
    return doc


def _read_text(path: str, skip_errors: bool, stats: ReadStats) -> Iterator[Document]:
    data = Path(path).read_bytes()

    def produce() -> Document:
        if not data.strip():
            raise DataError(path, 1, "file is empty")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as err:
            line = data.count(b"\n", 0, err.start) + 1
            raise DataError(path, line, f"invalid UTF-8 at byte {err.start}") from None
        return Document(text, None, path, 1)

    doc = _guarded(produce, skip_errors, stats)
    if doc is not None:
        yield doc


def _read_jsonl(
    path: str, text_field: str, messages_field: str, skip_errors: bool, stats: ReadStats
) -> Iterator[Document]:
    seen_content = False
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            seen_content = True

            def produce(raw: bytes = raw, line_no: int = line_no) -> Document:
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise DataError(path, line_no, f"invalid UTF-8 at column {err.start + 1}") from None
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(path, line_no, f"invalid JSON ({err.msg})") from None
                return _document_from_record(record, path, line_no, text_field, messages_field)

            doc = _guarded(produce, skip_errors, stats)
            if doc is not None:
                yield doc
    if not seen_content:
        _guarded(lambda: _raise(DataError(path, 1, "file is empty")), skip_errors, stats)


def _raise(err: Exception):
    raise err


def _read_records(
    records: Iterable[Any], name: str, text_field: str, messages_field: str, skip_errors: bool, stats: ReadStats
) -> Iterator[Document]:
    """逐条记录（parquet 行、datasets 样本）→ Document，行号从 1 起。"""
    empty = True
    for row, record in enumerate(records, start=1):
        empty = False
        doc = _guarded(
            lambda: _document_from_record(record, name, row, text_field, messages_field), skip_errors, stats
        )
        if doc is not None:
            yield doc
    if empty:
        _guarded(lambda: _raise(DataError(name, 1, "dataset is empty")), skip_errors, stats)


def _parquet_records(path: str, text_field: str, messages_field: str) -> Iterator[dict]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError("reading parquet needs pyarrow: pip install 'functional_lm[parquet]'") from None
    pf = pq.ParquetFile(path)
    columns = [c for c in (text_field, messages_field) if c in pf.schema_arrow.names]
    for batch in pf.iter_batches(columns=columns or None, batch_size=4096):
        yield from batch.to_pylist()


def read_documents(
    path: str | os.PathLike,
    *,
    kind: str = "auto",
    field: str = "text",
    messages_field: str = "messages",
    skip_errors: bool = False,
    stats: ReadStats | None = None,
) -> Iterator[Document]:
    """按扩展名（或 kind="text" / "jsonl" / "parquet"）读取一个文件，逐篇产出 Document。"""
    path = str(path)
    stats = stats if stats is not None else ReadStats()
    if kind == "auto":
        suffix = Path(path).suffix.lower()
        kind = (
            "jsonl" if suffix in JSONL_SUFFIXES else "parquet" if suffix in PARQUET_SUFFIXES else "text"
        )
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file not found: {path}")
    if kind == "text":
        return _read_text(path, skip_errors, stats)
    if kind == "jsonl":
        return _read_jsonl(path, field, messages_field, skip_errors, stats)
    if kind == "parquet":
        records = _parquet_records(path, field, messages_field)
        return _read_records(records, path, field, messages_field, skip_errors, stats)
    raise ValueError(f"unknown data kind {kind!r} for {path} (expected text, jsonl or parquet)")


def _open_hf_dataset(dataset: Any, split: str | None) -> tuple[Any, str]:
    """接受 datasets 对象、save_to_disk 目录或 load_dataset 的名字 / 路径（离线时须在本地）。"""
    if not isinstance(dataset, (str, os.PathLike)):
        return dataset, f"hf:{getattr(dataset, '_fingerprint', type(dataset).__name__)}"
    try:
        import datasets
    except ImportError:
        raise ImportError("reading with the datasets library needs: pip install 'functional_lm[datasets]'") from None
    name = str(dataset)
    if os.path.isdir(name) and (
        os.path.exists(os.path.join(name, "dataset_info.json"))
        or os.path.exists(os.path.join(name, "dataset_dict.json"))
    ):
        ds = datasets.load_from_disk(name)
    else:
        ds = datasets.load_dataset(name, split=split or "train")
    if isinstance(ds, datasets.DatasetDict):
        ds = ds[split or "train"]
    return ds, f"hf:{name}"


def read_hf_dataset(
    dataset: Any,
    *,
    split: str | None = None,
    field: str = "text",
    messages_field: str = "messages",
    skip_errors: bool = False,
    stats: ReadStats | None = None,
) -> Iterator[Document]:
    """读取 ``datasets`` 库能打开的任何数据集（对象、磁盘目录或本地 load_dataset 名字）。"""
    stats = stats if stats is not None else ReadStats()
    ds, name = _open_hf_dataset(dataset, split)
    return _read_records(iter(ds), name, field, messages_field, skip_errors, stats)


# --------------------------------------------------------------------------------------------
# 带指纹的数据源：磁盘缓存以 (分词器指纹, 各数据源指纹) 为键
# --------------------------------------------------------------------------------------------


@dataclass
class DocumentSource:
    """一个可重复读取的数据源：名字、内容指纹（变了就要重新分词）与产出 Document 的函数。"""

    name: str
    fingerprint: str
    read: Callable[[bool, ReadStats], Iterator[Document]]

    def documents(self, skip_errors: bool = False, stats: ReadStats | None = None) -> Iterator[Document]:
        return self.read(skip_errors, stats if stats is not None else ReadStats())


def _file_fingerprint(path: str) -> str:
    """文件指纹：绝对路径 + 大小 + 修改时间（纳秒）；不读全文，适合大文件。"""
    st = os.stat(path)
    key = f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}"
    return hashlib.sha256(key.encode()).hexdigest()


def as_source(
    item: Any, *, field: str = "text", messages_field: str = "messages", split: str | None = None
) -> DocumentSource:
    """把路径 / datasets 对象 / DocumentSource 统一成 DocumentSource。"""
    if isinstance(item, DocumentSource):
        return item
    if isinstance(item, (str, os.PathLike)) and os.path.isfile(item):
        path = str(item)
        opts = f"|{field}|{messages_field}"
        return DocumentSource(
            path,
            hashlib.sha256((_file_fingerprint(path) + opts).encode()).hexdigest(),
            lambda skip, stats: read_documents(
                path, field=field, messages_field=messages_field, skip_errors=skip, stats=stats
            ),
        )
    if isinstance(item, (str, os.PathLike)) and not os.path.exists(item) and os.sep in str(item):
        raise FileNotFoundError(f"data source not found: {item}")
    ds, name = _open_hf_dataset(item, split)
    fp = getattr(ds, "_fingerprint", None) or name
    return DocumentSource(
        name,
        hashlib.sha256(f"{name}|{fp}|{field}|{messages_field}".encode()).hexdigest(),
        lambda skip, stats: _read_records(iter(ds), name, field, messages_field, skip, stats),
    )
