"""数据源读取：纯文本、JSON lines（``text`` 字段或对话 ``messages``）、parquet，以及 ``datasets`` 库能打开的数据集。

每个读取器逐篇产出 ``Document``，带上来源与行号（parquet / datasets 为从 1 起的行序号）。
坏输入（空文件、缺字段、非法 JSON、非法 UTF-8、未知角色、不是 parquet 的 .parquet）抛 ``DataError``，
消息形如 ``path:line: 原因``；``skip_errors=True`` 时跳过该行（段）并记入 ``ReadStats``。

纯文本怎样切成文档由 ``text_split`` 决定（``TEXT_SPLITS``）：
    "paragraph"（默认）  以一个或多个空白行（空行或只含空白字符的行）分段，每段一篇；段内原样保留，
                         只去掉段末那一行的换行符（它属于分隔）。一个 .txt 因此不再只有“一篇”文档。
    "file"               整个文件一篇（一次读入内存）。
    "line"               每个非空白行一篇（去掉行尾换行符）。
"paragraph" / "line" 逐行流式读取，内存只需容纳一段；文档的 ``line`` 是它开始的那一行。

扩展名决定读取器：TEXT_SUFFIXES / JSONL_SUFFIXES / PARQUET_SUFFIXES；没有扩展名的文件（README、LICENSE）按纯文本读；
其他扩展名（.pdf、.csv …）直接拒绝并列出支持的扩展名，而不是把二进制当文本读进来。

``as_source`` 区分“本地路径”和“hub 数据集名”：看起来像路径却不存在时立刻报 FileNotFoundError，
不导入 datasets、不联网；只有形如 ``name`` / ``owner/name`` 的字符串才交给 ``datasets.load_dataset``。
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from functional_lm.data.chat import validate_messages
from functional_lm.errors import DataError

__all__ = [
    "Document",
    "ReadStats",
    "DocumentSource",
    "read_documents",
    "read_hf_dataset",
    "as_source",
    "TEXT_SUFFIXES",
    "JSONL_SUFFIXES",
    "PARQUET_SUFFIXES",
    "TEXT_SPLITS",
    "DEFAULT_TEXT_SPLIT",
    "check_text_split",
    "resolve_kind",
    "looks_like_path",
]

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".text"}
JSONL_SUFFIXES = {".jsonl", ".ndjson", ".json"}
PARQUET_SUFFIXES = {".parquet", ".pq"}
TEXT_SPLITS = ("paragraph", "file", "line")  # 纯文本切分方式（见模块说明）
DEFAULT_TEXT_SPLIT = "paragraph"
MAX_KEPT_ERRORS = 100  # ReadStats 里最多保留多少条错误信息


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


def check_text_split(text_split: str) -> str:
    """校验 text_split 参数；不合法时的 ValueError 写明参数名与可选值。"""
    if text_split not in TEXT_SPLITS:
        raise ValueError(
            f"text_split={text_split!r} is not valid: expected one of {', '.join(map(repr, TEXT_SPLITS))} "
            f"('paragraph': documents separated by blank lines, 'file': one document per file, "
            f"'line': one document per non-empty line)"
        )
    return text_split


def _read_text_file(path: str, skip_errors: bool, stats: ReadStats) -> Iterator[Document]:
    """text_split="file"：整个文件一篇文档（一次读入内存）。"""
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


def _strip_eol(text: str) -> str:
    """去掉末尾那一个换行符（LF 或 CRLF）；其余空白原样保留（缩进、行尾空格都是内容）。"""
    if text.endswith("\r\n"):
        return text[:-2]
    return text[:-1] if text.endswith("\n") else text


def _text_units(path: str, one_per_line: bool) -> Iterator[tuple[int, list[str], DataError | None]]:
    """逐行流式读取，产出 (起始行号, 各行原文, 第一处 UTF-8 错误或 None)；空白行只做分隔、不进任何单元。

    按字节逐行切（换行字节 0x0A 不会出现在多字节 UTF-8 序列中间，所以逐行解码与整体解码等价），
    解码失败的行不算空白行：它留在所在段里，整段在产出时报错（行号是坏字节所在的行）。
    """
    start, lines, error = 0, [], None
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                text = None
                error = error or DataError(path, line_no, f"invalid UTF-8 at column {err.start + 1}")
            if text is not None and not text.strip():  # 空白行（str.isspace 意义下）：结束当前单元
                if start:
                    yield start, lines, error
                start, lines, error = 0, [], None
                continue
            start = start or line_no
            if text is not None:
                lines.append(text)
            if one_per_line:
                yield start, lines, error
                start, lines, error = 0, [], None
    if start:
        yield start, lines, error


def _read_text_units(path: str, one_per_line: bool, skip_errors: bool, stats: ReadStats) -> Iterator[Document]:
    """text_split="paragraph" / "line"：每段（每行）一篇；一篇都没有时报“文件为空”。"""
    found = False
    for start, lines, error in _text_units(path, one_per_line):
        found = True

        def produce(start: int = start, lines: list[str] = lines, error: DataError | None = error) -> Document:
            if error is not None:
                raise error
            return Document(_strip_eol("".join(lines)), None, path, start)

        doc = _guarded(produce, skip_errors, stats)
        if doc is not None:
            yield doc
    if not found:
        _guarded(lambda: _raise(DataError(path, 1, "file is empty")), skip_errors, stats)


def _read_text(path: str, text_split: str, skip_errors: bool, stats: ReadStats) -> Iterator[Document]:
    if text_split == "file":
        return _read_text_file(path, skip_errors, stats)
    return _read_text_units(path, text_split == "line", skip_errors, stats)


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
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError("reading parquet needs pyarrow: pip install 'functional_lm[parquet]'") from None
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:  # 文本、截断的文件等：pyarrow 的原话不带文件名，这里补上
        raise DataError(path, 1, f"not a parquet file ({err})") from None
    columns = [c for c in (text_field, messages_field) if c in pf.schema_arrow.names]
    row = 1
    try:
        for batch in pf.iter_batches(columns=columns or None, batch_size=4096):
            yield from batch.to_pylist()
            row += batch.num_rows
    except (pa.ArrowException, OSError) as err:  # 页损坏：报出所在批的第一行
        raise DataError(path, row, f"corrupt parquet data ({err})") from None


def _supported_suffixes() -> str:
    """错误消息里列出的支持扩展名（按读取器分组）。"""
    groups = ((JSONL_SUFFIXES, "JSON lines"), (PARQUET_SUFFIXES, "parquet"), (TEXT_SUFFIXES, "plain text"))
    return "; ".join(f"{' '.join(sorted(suffixes))} ({what})" for suffixes, what in groups)


def resolve_kind(path: str | os.PathLike, kind: str = "auto") -> str:
    """决定用哪个读取器："text" / "jsonl" / "parquet"。kind="auto" 时看扩展名，未知扩展名直接拒绝。

    没有扩展名的文件（README、LICENSE）按纯文本读；kind="text" 可强制把任何文件当纯文本。
    """
    if kind != "auto":
        if kind not in ("text", "jsonl", "parquet"):
            raise ValueError(f"unknown data kind {kind!r} for {path} (expected auto, text, jsonl or parquet)")
        return kind
    suffix = Path(path).suffix.lower()
    if suffix in JSONL_SUFFIXES:
        return "jsonl"
    if suffix in PARQUET_SUFFIXES:
        return "parquet"
    if suffix in TEXT_SUFFIXES or suffix == "":
        return "text"
    raise ValueError(
        f"{path}: no reader handles {suffix!r} files. Supported suffixes: {_supported_suffixes()}; "
        f"a file without a suffix is read as plain text. Convert the file to one of these formats "
        f"(or rename it to .txt if it really is plain text)."
    )


def read_documents(
    path: str | os.PathLike,
    *,
    kind: str = "auto",
    field: str = "text",
    messages_field: str = "messages",
    text_split: str = DEFAULT_TEXT_SPLIT,
    skip_errors: bool = False,
    stats: ReadStats | None = None,
) -> Iterator[Document]:
    """按扩展名（或 kind="text" / "jsonl" / "parquet"）读取一个文件，逐篇产出 Document。

    text_split 只影响纯文本文件（见模块说明）。不存在的文件 → FileNotFoundError；未知扩展名 → ValueError。
    """
    path = str(path)
    check_text_split(text_split)
    stats = stats if stats is not None else ReadStats()
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file not found: {path}")
    kind = resolve_kind(path, kind)
    if kind == "text":
        return _read_text(path, text_split, skip_errors, stats)
    if kind == "jsonl":
        return _read_jsonl(path, field, messages_field, skip_errors, stats)
    records = _parquet_records(path, field, messages_field)
    return _read_records(records, path, field, messages_field, skip_errors, stats)


def _first_line(err: BaseException, limit: int = 300) -> str:
    """异常的类型名 + 第一行消息（截断），用来在一段话里交代原因而不附整条回溯链。"""
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    text = text if len(text) <= limit else text[: limit - 1] + "…"
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _hf_failure(name: str, err: BaseException) -> ValueError:
    """load_dataset / load_from_disk 失败 → 一段完整的 ValueError（数据集名、原因、怎么办）。"""
    if os.path.isdir(name):
        return ValueError(
            f"cannot load the dataset directory {name} with the datasets library ({_first_line(err)})"
        )
    return ValueError(
        f"data source {name!r} is neither a local file nor a dataset the datasets library could load "
        f"({_first_line(err)}). If it is a file, check the path (relative paths start at {os.getcwd()}); "
        f"if it is a Hugging Face hub dataset id, check the spelling and the network connection "
        f"(offline? then it must already be in the local datasets cache)."
    )


def _import_datasets(name: str) -> Any:
    try:
        import datasets
    except ImportError:
        raise ImportError(
            f"data source {name!r} is not a local file; reading it as a Hugging Face dataset needs the "
            f"datasets library: pip install 'functional_lm[datasets]'"
        ) from None
    return datasets


def _open_hf_dataset(dataset: Any, split: str | None) -> tuple[Any, str]:
    """接受 datasets 对象、save_to_disk 目录或 load_dataset 的名字 / 路径；加载失败时报一段话的 ValueError。"""
    if not isinstance(dataset, (str, os.PathLike)):
        return dataset, f"hf:{getattr(dataset, '_fingerprint', type(dataset).__name__)}"
    name = str(dataset)
    datasets = _import_datasets(name)
    saved = os.path.isdir(name) and (
        os.path.exists(os.path.join(name, "dataset_info.json"))
        or os.path.exists(os.path.join(name, "dataset_dict.json"))
    )
    try:  # hub 的重试与回溯链对用户没有帮助：整理成一段话，不附原始回溯（from None）
        ds = datasets.load_from_disk(name) if saved else datasets.load_dataset(name, split=split or "train")
    except Exception as err:
        raise _hf_failure(name, err) from None
    if isinstance(ds, datasets.DatasetDict):
        want = split or "train"
        if want not in ds:
            raise ValueError(f"dataset {name} has no split {want!r} (it has {sorted(ds)}); pass split=")
        ds = ds[want]
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


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")  # name 或 owner/name
_FILE_SUFFIX = re.compile(r"\.[A-Za-z][A-Za-z0-9]{0,7}$")  # .txt .jsonl .csv …（不含 "-2.5" 这类版本号）


def looks_like_path(name: str) -> bool:
    """一个本地不存在的字符串是否“看起来像路径”（是则报文件不存在，不去 hub 上找）。

    像路径：以 "." "~" "/" 开头或含反斜杠；不是 ``name`` / ``owner/name`` 形状（多级目录、空格…）；
    单段却带 "." 后缀（missing.jsonl、notes.v2）；owner/name 形状但以文件扩展名结尾（data/missing.txt）。
    像 hub id：wikitext、allenai/c4、teknium/OpenHermes-2.5（".5" 是版本号，不是扩展名）。
    """
    if name.startswith((".", "~", "/")) or "\\" in name or not _HUB_ID.match(name):
        return True
    if "/" not in name:
        return Path(name).suffix != ""
    return _FILE_SUFFIX.search(name) is not None


def _file_source(path: str, field: str, messages_field: str, text_split: str) -> DocumentSource:
    """本地文件 → DocumentSource；扩展名在这里就检查（未知扩展名尽早拒绝，不等到分词时）。"""
    kind = resolve_kind(path)
    # text_split 只改变纯文本的切法，所以只进纯文本文件的指纹：切 jsonl 时换 --text-split 不必重新分词。
    opts = f"|{field}|{messages_field}" + (f"|split={text_split}" if kind == "text" else "")
    return DocumentSource(
        path,
        hashlib.sha256((_file_fingerprint(path) + opts).encode()).hexdigest(),
        lambda skip, stats: read_documents(
            path, kind=kind, field=field, messages_field=messages_field, text_split=text_split,
            skip_errors=skip, stats=stats,
        ),
    )


def as_source(
    item: Any,
    *,
    field: str = "text",
    messages_field: str = "messages",
    split: str | None = None,
    text_split: str = DEFAULT_TEXT_SPLIT,
) -> DocumentSource:
    """把路径 / datasets 对象 / DocumentSource 统一成 DocumentSource。

    本地文件按扩展名读（text_split 决定纯文本怎样切）；不存在而看起来像路径的字符串（或任何 PathLike）
    → FileNotFoundError，不导入 datasets、不联网；其余字符串当作 datasets 的名字 / 目录。
    """
    check_text_split(text_split)
    if isinstance(item, DocumentSource):
        return item
    if isinstance(item, (str, os.PathLike)):
        local = os.path.expanduser(os.fspath(item))
        if os.path.isfile(local):
            return _file_source(local, field, messages_field, text_split)
        if not os.path.exists(local) and (not isinstance(item, str) or looks_like_path(item)):
            where = os.path.abspath(local)
            raise FileNotFoundError(
                f"data file not found: {item}" + (f" (looked for {where})" if where != str(item) else "")
            )
    ds, name = _open_hf_dataset(item, split)
    fp = getattr(ds, "_fingerprint", None) or name
    return DocumentSource(
        name,
        hashlib.sha256(f"{name}|{fp}|{field}|{messages_field}".encode()).hexdigest(),
        lambda skip, stats: _read_records(iter(ds), name, field, messages_field, skip, stats),
    )
