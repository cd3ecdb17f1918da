"""磁盘 token 缓存：一次分词，写成 uint32 memmap 文件 + 小 JSON 索引；再次分词时直接复用。

    cache_dir/tokens-<key>/
        tokens.bin    uint32[N]   所有文档（每篇后接分隔符）
        mask.bin      uint8[N]    仅当有对话文档时存在：是否计损失
        offsets.npy   int64[D+1]  文档边界
        lines.npy     int64[D]    每篇文档在它的数据源里的行号（错误消息点名 ``文件:行``）
        index.json    版本、键、分词器指纹、各数据源（名字、指纹、文档数）、token / 文档数、计损失的 token 数、
                      跳过的坏行数 …

键 = sha256(格式版本, 分词器指纹, 各数据源指纹, skip_errors)；数据源指纹对文件是 (绝对路径, 大小, mtime,
读取选项，纯文本还有 text_split)，文件或切法一改就换键重建。写入先进临时目录，完成后原子改名，
失败或中断不会留下半成品。

损坏：index.json 记着各文件的字节数与 CRC-32；复用前全部核对（见 store.py）。损坏的条目打印一行
``token cache <dir> is damaged (<file>: ...); rebuilding`` 后自动重建：新内容先在临时目录建好，再把旧目录
原子地挪开、新目录改名就位，最后才删旧目录——任何时刻都不会先删掉旧的而新的还没到位。
写缓存时的 OSError（磁盘满、只读 …）换成 ``CacheWriteError``（ValueError），写明缓存目录与正在写的文件，
临时目录照样清掉。

并行：主进程读取并校验文档（坏输入在这里按文件名与行号报错），按 chunk_size 篇一组交给工作进程池
（Linux 上用 fork，工作进程继承分词器；否则 spawn 后按来源路径重新加载），结果按原顺序写入；
进度条（tqdm）写到 stderr。
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
import zlib
from array import array
from collections import deque
from itertools import islice
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from functional_lm.errors import CacheDamagedError, CacheWriteError
from functional_lm.data.sources import (
    DEFAULT_TEXT_SPLIT,
    Document,
    DocumentSource,
    ReadStats,
    as_source,
    check_text_split,
)
from functional_lm.data.store import CACHE_FORMAT_VERSION, TOKEN_DTYPE, TokenStore, crc32_file
from functional_lm.data.tokenizer import Tokenizer, load_tokenizer

__all__ = ["CACHE_FORMAT_VERSION", "build_token_cache", "tokenize_documents", "cache_key"]

# 工作进程里的分词器（每个进程一份，由 initializer 设置）。
_WORKER_TOKENIZER: Tokenizer | None = None

Payload = tuple[str | None, list[dict] | None]  # (text, messages)
Encoded = tuple[np.ndarray, np.ndarray, np.ndarray | None]  # (tokens 含分隔符, 每篇长度, mask 或 None)


def _init_worker(tokenizer: Tokenizer | str | None) -> None:
    global _WORKER_TOKENIZER
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _WORKER_TOKENIZER = tokenizer if isinstance(tokenizer, Tokenizer) else load_tokenizer(tokenizer)


def _encode_chunk_with(tokenizer: Tokenizer, chunk: Sequence[Payload]) -> Encoded:
    """一组文档 → 拼好的 token（每篇后接分隔符）、每篇长度与（有对话时的）掩码。"""
    sep = tokenizer.separator_token_id
    texts = [text for text, _ in chunk if text is not None]
    encoded_texts = iter(tokenizer.encode_batch(texts)) if texts else iter(())
    pieces: list[list[int]] = []
    masks: list[list[bool] | None] = []
    for text, messages in chunk:
        if messages is not None:
            enc = tokenizer.apply_chat_template(messages)
            pieces.append(enc.input_ids + [sep])
            masks.append(enc.assistant_mask + [False])
        else:
            pieces.append(next(encoded_texts) + [sep])
            masks.append(None)
    lengths = np.array([len(p) for p in pieces], dtype=np.int64)
    tokens = np.fromiter((t for p in pieces for t in p), dtype=TOKEN_DTYPE, count=int(lengths.sum()))
    mask = None
    if any(m is not None for m in masks):
        mask = np.concatenate([np.asarray(m, dtype=bool) if m is not None else np.ones(len(p), dtype=bool)
                               for p, m in zip(pieces, masks)])
    return tokens, lengths, mask


def _encode_chunk(chunk: Sequence[Payload]) -> Encoded:
    assert _WORKER_TOKENIZER is not None
    return _encode_chunk_with(_WORKER_TOKENIZER, chunk)


def _chunks(docs: Iterable[Document], size: int) -> Iterator[list[Payload]]:
    it = iter(docs)
    while chunk := [(d.text, d.messages) for d in islice(it, size)]:
        yield chunk


def cache_key(tokenizer: Tokenizer, sources: Sequence[DocumentSource], skip_errors: bool) -> str:
    """缓存键：格式版本 + 分词器指纹 + 各数据源指纹 + 选项。"""
    payload = {
        "version": CACHE_FORMAT_VERSION,
        "tokenizer": tokenizer.fingerprint,
        "sources": [s.fingerprint for s in sources],
        "skip_errors": skip_errors,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


class _Writer:
    """顺序追加 token / 掩码 / 文档长度到临时目录；掩码文件在第一篇对话出现时才创建（之前的补 1）。

    边写边累计各文件的 CRC-32（不必写完再读一遍），close 后由 files() 给出 index.json 的 ``files`` 一节。
    """

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.tokens = open(directory / "tokens.bin", "wb")
        self.mask = None
        self.crc = {"tokens.bin": 0}
        self.lengths: list[np.ndarray] = []
        self.num_tokens = 0
        self.loss_tokens = 0  # 计损失的 token 数（没有掩码时等于 num_tokens）
        self.max_id = -1

    def _put(self, name: str, f: Any, data: bytes) -> None:
        f.write(data)
        self.crc[name] = zlib.crc32(data, self.crc[name])

    def write(self, tokens: np.ndarray, lengths: np.ndarray, mask: np.ndarray | None) -> None:
        if mask is not None and self.mask is None:
            self.mask = open(self.dir / "mask.bin", "wb")
            self.crc["mask.bin"] = 0
            for start in range(0, self.num_tokens, 1 << 24):  # 回填之前文档的“全部计损失”
                self._put("mask.bin", self.mask, np.ones(min(1 << 24, self.num_tokens - start), np.uint8).tobytes())
        self._put("tokens.bin", self.tokens, tokens.tobytes())
        if self.mask is not None:
            m = mask if mask is not None else np.ones(len(tokens), dtype=bool)
            self._put("mask.bin", self.mask, m.astype(np.uint8).tobytes())
        self.lengths.append(lengths)
        self.num_tokens += len(tokens)
        self.loss_tokens += len(tokens) if mask is None else int(np.count_nonzero(mask))
        if len(tokens):
            self.max_id = max(self.max_id, int(tokens.max()))

    def close(self, lines: Sequence[int]) -> np.ndarray:
        """关闭数据文件，写出 offsets.npy 与 lines.npy（lines：每篇文档的行号，按写入顺序）。"""
        self.tokens.close()
        if self.mask is not None:
            self.mask.close()
        lengths = np.concatenate(self.lengths) if self.lengths else np.zeros(0, dtype=np.int64)
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        np.save(self.dir / "offsets.npy", offsets)
        self.crc["offsets.npy"] = crc32_file(self.dir / "offsets.npy")  # 很小：写完读一遍即可
        np.save(self.dir / "lines.npy", np.asarray(lines, dtype=np.int64))
        self.crc["lines.npy"] = crc32_file(self.dir / "lines.npy")
        return offsets

    def discard(self) -> None:
        """出错时关掉打开的文件（目录随后整个删除）。"""
        for f in (self.tokens, self.mask):
            if f is not None and not f.closed:
                with contextlib.suppress(OSError):
                    f.close()

    def files(self) -> dict[str, dict[str, int]]:
        """index.json 的 ``files``：{文件名: {bytes, crc32}}。"""
        return {name: {"bytes": (self.dir / name).stat().st_size, "crc32": crc} for name, crc in self.crc.items()}


@contextlib.contextmanager
def _writing(cache_dir: Path, what: str) -> Iterator[None]:
    """把写缓存时的 OSError 换成 CacheWriteError（写明缓存目录与正在写的内容）；读数据源的错误不经过这里。"""
    try:
        yield
    except OSError as err:
        raise CacheWriteError(cache_dir, what, err) from err


def _progress(enabled: bool, desc: str):
    """tqdm 进度条（写 stderr）；未安装 tqdm 时退化为空操作。"""
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm 是核心依赖，这里只是保险
        tqdm = None
    if tqdm is None or not enabled:
        class _Null:
            def update(self, n: int = 1) -> None: ...
            def set_postfix(self, **kw: Any) -> None: ...
            def close(self) -> None: ...
        return _Null()
    return tqdm(desc=desc, unit=" docs", file=sys.stderr, dynamic_ncols=True)


def _pool(num_workers: int, tokenizer: Tokenizer):
    """工作进程池：能 fork 就 fork（直接继承分词器），否则 spawn 并按来源路径重新加载。"""
    methods = mp.get_all_start_methods()
    if "fork" in methods and sys.platform.startswith("linux"):
        return mp.get_context("fork").Pool(num_workers, _init_worker, (tokenizer,))
    return mp.get_context("spawn").Pool(num_workers, _init_worker, (tokenizer.source,))


def build_token_cache(
    sources: Sequence[Any],
    tokenizer: Tokenizer | str | None,
    cache_dir: str | os.PathLike,
    *,
    num_workers: int | None = None,
    chunk_size: int = 128,
    skip_errors: bool = False,
    progress: bool = True,
    text_split: str = DEFAULT_TEXT_SPLIT,
) -> TokenStore:
    """把若干数据源分词进磁盘缓存并以 memmap 打开；同样的 (分词器, 数据源) 第二次直接复用。

    sources: 文件路径、datasets 对象 / 名字或 DocumentSource 的列表。
    num_workers: 工作进程数；None 为 min(4, CPU 数)，0 或 1 表示在本进程里分词。
    text_split: 纯文本文件怎样切成文档（TEXT_SPLITS：paragraph / file / line），进数据源指纹。
    返回的 ``store.meta["reused"]`` 表示是否复用了已有缓存，``meta["skipped"]`` 为跳过的坏行数。
    已有缓存损坏时打印一行并自动重建；写缓存失败（磁盘满、只读）抛 CacheWriteError。
    """
    check_text_split(text_split)
    tokenizer = load_tokenizer(tokenizer)
    srcs = [as_source(s, text_split=text_split) for s in sources]
    key = cache_key(tokenizer, srcs, skip_errors)
    cache_dir = Path(cache_dir)
    final = cache_dir / f"tokens-{key[:20]}"
    store = _open_existing(final)
    if store is not None:
        store.meta["reused"] = True
        return store
    with _writing(cache_dir, "a temporary directory"):
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key[:20]}-", dir=cache_dir))
    try:
        meta = _tokenize_into(tmp, srcs, tokenizer, num_workers, chunk_size, skip_errors, progress)
        counts = meta.pop("source_documents")
        meta.update(key=key, sources=[
            {"name": s.name, "fingerprint": s.fingerprint, "documents": n} for s, n in zip(srcs, counts)
        ])
        with _writing(cache_dir, "the index (index.json)"):
            (tmp / "index.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
        _install(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    store = TokenStore.open(final)
    store.meta["reused"] = False
    return store


def _open_existing(final: Path) -> TokenStore | None:
    """已有的缓存条目：完好（含校验和）就打开复用；不存在返回 None；损坏时打印一行再返回 None（重建）。"""
    if not (final.exists() or final.is_symlink()):
        return None
    try:
        return TokenStore.open(final, verify=True)
    except (CacheDamagedError, FileNotFoundError) as err:  # FileNotFoundError：悬空的符号链接
        detail = f"{err.file}: {err.reason}" if isinstance(err, CacheDamagedError) else str(err)
        print(f"token cache {final} is damaged ({detail}); rebuilding", file=sys.stderr)
        return None


def _install(tmp: Path, final: Path) -> None:
    """把建好的临时目录换成 final。

    final 还在（损坏的旧条目）时先把它原子地改名挪开，新目录改名就位后才删旧的：目录不能被
    os.replace 直接覆盖（非空目录会 ENOTEMPTY），两次改名之间 final 短暂不存在，但任何时刻都不会
    “旧的已删、新的未到”。改名失败而 final 已有完好的 index.json：另一个进程刚写好同一个键，用它的。
    """
    aside = None
    if final.exists() or final.is_symlink():
        aside = final.with_name(f".damaged-{final.name}-{os.getpid()}-{time.time_ns()}")
        with _writing(final.parent, f"the replacement for the damaged {final.name} (moving it aside)"):
            try:
                os.replace(final, aside)
            except FileNotFoundError:  # 另一个进程已经挪走了
                aside = None
    try:
        os.replace(tmp, final)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (final / "index.json").is_file():
            raise CacheWriteError(final.parent, f"the cache directory {final.name}", err) from err
    finally:
        if aside is not None:
            _remove(aside)


def _remove(path: Path) -> None:
    """删掉挪开的旧条目（目录、文件或链接都行）；删不掉不影响新缓存，忽略。"""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


class _Origins:
    """主进程读文档时按顺序记下每篇的行号与各数据源的文档数（结果按同样的顺序写盘，两者一一对应）。"""

    def __init__(self, sources: int) -> None:
        self.lines = array("q")
        self.counts = [0] * sources

    def note(self, source: int, doc: Document) -> Document:
        self.lines.append(doc.line)
        self.counts[source] += 1
        return doc


def _windowed(pool: Any, chunks: Iterator[list[Payload]], window: int) -> Iterator[Encoded]:
    """按顺序取回结果，同时最多 window 个分块在途：读文档在主线程（坏输入照常抛出），内存有上界。"""
    pending: deque = deque()
    for chunk in chunks:
        pending.append(pool.apply_async(_encode_chunk, (chunk,)))
        if len(pending) >= window:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def _tokenize_into(
    directory: Path,
    sources: Sequence[DocumentSource],
    tokenizer: Tokenizer,
    num_workers: int | None,
    chunk_size: int,
    skip_errors: bool,
    progress: bool,
) -> dict[str, Any]:
    """真正的分词循环：读文档（主进程）→ 分块 → 编码（进程池或本进程）→ 顺序写盘；返回 index.json 内容。"""
    if num_workers is None:
        num_workers = min(4, os.cpu_count() or 1)
    stats = ReadStats()
    origins = _Origins(len(sources))
    docs = (origins.note(k, doc) for k, src in enumerate(sources) for doc in src.documents(skip_errors, stats))
    with _writing(directory.parent, "tokens.bin"):
        writer = _Writer(directory)
    bar = _progress(progress, "tokenizing")
    pool = _pool(num_workers, tokenizer) if num_workers > 1 else None
    try:
        if pool is None:
            results = (_encode_chunk_with(tokenizer, c) for c in _chunks(docs, chunk_size))
        else:
            results = _windowed(pool, _chunks(docs, chunk_size), window=2 * num_workers)
        for tokens, lengths, mask in results:  # 读数据源的 OSError 从这里冒出，不算写缓存失败
            with _writing(directory.parent, "the token data (tokens.bin / mask.bin)"):
                writer.write(tokens, lengths, mask)
            bar.update(len(lengths))
            bar.set_postfix(tokens=writer.num_tokens)
        what = "the token data, document offsets and line numbers (tokens.bin, mask.bin, offsets.npy, lines.npy)"
        with _writing(directory.parent, what):
            offsets = writer.close(origins.lines)
    finally:
        writer.discard()
        bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()
    if len(offsets) == 1:
        raise ValueError(f"no documents found in {[s.name for s in sources]}")
    return _index_meta(writer, offsets, tokenizer, stats) | {"source_documents": origins.counts}


def _index_meta(writer: _Writer, offsets: np.ndarray, tokenizer: Tokenizer, stats: ReadStats) -> dict[str, Any]:
    """index.json 的内容（键与数据源由调用方补上）。"""
    return {
        "version": CACHE_FORMAT_VERSION,
        "dtype": "uint32",
        "num_tokens": int(offsets[-1]),
        "num_documents": len(offsets) - 1,
        "has_mask": writer.mask is not None,
        "has_lines": True,
        "loss_tokens": writer.loss_tokens,
        "separator_id": tokenizer.separator_token_id,
        "max_token_id": writer.max_id,
        "tokenizer": tokenizer.fingerprint,
        "tokenizer_source": tokenizer.source,
        "real_vocab_size": tokenizer.real_vocab_size,
        "files": writer.files(),
        "skipped": stats.skipped,
        "errors": stats.errors,
    }


def tokenize_documents(documents: Iterable[Document], tokenizer: Tokenizer | str | None) -> TokenStore:
    """小语料的内存版：不写盘，直接得到 TokenStore（与磁盘缓存布局相同）。"""
    tokenizer = load_tokenizer(tokenizer)
    documents = list(documents)
    parts = [_encode_chunk_with(tokenizer, c) for c in _chunks(documents, 512)]
    if not parts:
        raise ValueError("no documents to tokenize")
    tokens = np.concatenate([p[0] for p in parts])
    lengths = np.concatenate([p[1] for p in parts])
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    mask = None
    if any(p[2] is not None for p in parts):
        mask = np.concatenate([p[2] if p[2] is not None else np.ones(len(p[0]), dtype=bool) for p in parts])
    runs: list[dict[str, Any]] = []  # 来自同一数据源的连续几篇算一段（与磁盘缓存的 sources 同形）
    for doc in documents:
        if runs and runs[-1]["name"] == doc.source:
            runs[-1]["documents"] += 1
        else:
            runs.append({"name": doc.source, "documents": 1})
    meta = {"sources": runs}
    lines = np.array([d.line for d in documents], dtype=np.int64)
    return TokenStore(tokens, offsets, tokenizer.separator_token_id, mask, meta=meta, lines=lines)
