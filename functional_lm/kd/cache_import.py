"""外部 top-k 的导入：``import_topk_jsonl`` 把别处（推理服务的 top-k log 概率）算好的 JSON lines 经教师缓存的
分片写入器（kd/cache_build.py 的 ``run_build``）写成同一格式（见 kd/teacher_cache.py）。"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from functional_lm.kd.cache_build import BuildStatus, Producer, check_build_args, full_fingerprint, run_build
from functional_lm.kd.cache_checks import check_row_ids, check_row_log_probs

__all__ = ["import_topk_jsonl"]

_MAX_LINE = 256 << 20  # 导入时单行的上限：K = 151,665 的一行约 4 MB，远在其下；更长的多半是二进制文件


class _RowReader:
    """按顺序读 JSON-lines 文件的第 j 行（从 0 数）并校验；可以向前跳过行（续建时跳过已提交的分片）。

    以二进制读、逐行解码：不是 UTF-8 的行（例如误给了二进制文件）报 ``文件:行号``；单行至多 _MAX_LINE 字节，
    没有换行的大文件不会被整个读进内存。"""

    def __init__(self, path: Path, top_k: int, real_vocab_size: int) -> None:
        self.path, self.top_k, self.real_vocab_size = path, top_k, real_vocab_size
        self.handle = open(path, "rb")
        self.next_row = 0  # 下一次 readline 得到的行号（从 0 数；文件行号 = 它 + 1）

    def _readline(self) -> str:
        """下一行的文本（文件结束时为空串）；不是 UTF-8 或长得不像一行时点名文件与行号。"""
        raw = self.handle.readline(_MAX_LINE + 1)
        where = f"{self.path}:{self.next_row + 1}"
        if len(raw) > _MAX_LINE:
            raise ValueError(f"{where}: the line is longer than {_MAX_LINE >> 20} MiB; expected JSON lines "
                             f"(one row per line), is this a binary file?")
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"{where}: not UTF-8 text (byte 0x{raw[err.start]:02x} at column {err.start + 1}); "
                             f"expected JSON lines of top-k targets, is this a binary file?") from None

    def _line(self) -> str:
        line = self._readline()
        if not line:
            raise ValueError(
                f"{self.path}: the file ends after {self.next_row} rows, but the dataset needs more "
                f"(one row per input position: number of blocks × seq_len rows)"
            )
        self.next_row += 1
        return line

    def rows(self, first: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """第 first … first+count−1 行：ids int32 (count, K)，log 概率 float64 (count, K)。"""
        while self.next_row < first:
            self._line()
        ids = np.empty((count, self.top_k), np.int32)
        log_probs = np.empty((count, self.top_k), np.float64)
        for i in range(count):
            ids[i], log_probs[i] = self._parse(self._line(), self.next_row)
        return ids, log_probs

    def _parse(self, line: str, lineno: int) -> tuple[list[int], list[float]]:
        """解析并校验一行（lineno 从 1 数）；错误写成 ``文件:行号: 问题``。"""
        where = f"{self.path}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: not valid JSON ({err.msg}); each line must be "
                             f'{{"ids": [...], "logprobs": [...]}}') from None
        if not (isinstance(row, dict) and isinstance(row.get("ids"), list) and isinstance(row.get("logprobs"), list)):
            raise ValueError(f'{where}: expected an object {{"ids": [...], "logprobs": [...]}}')
        ids, log_probs = row["ids"], row["logprobs"]
        if len(ids) != self.top_k or len(log_probs) != self.top_k:
            raise ValueError(f"{where}: expected {self.top_k} ids and {self.top_k} logprobs, "
                             f"got {len(ids)} and {len(log_probs)}")
        check_row_ids(where, ids, self.real_vocab_size)
        check_row_log_probs(where, log_probs)
        return ids, log_probs

    def finish(self, total_rows: int) -> None:
        """读到第 total_rows 行为止后，文件里不应再有非空行。"""
        while self.next_row < total_rows:
            self._line()
        extra = self._readline()
        if extra.strip():
            raise ValueError(f"{self.path}:{total_rows + 1}: extra row; the dataset has exactly {total_rows} rows "
                             f"(number of blocks × seq_len)")


def _import_producer(reader: _RowReader, seq_len: int, top_k: int, num_blocks: int) -> Producer:
    """导入的生产者：块 b 的位置 p 取第 b·L + p 行；尾部质量 = max(1 − Σ exp(log 概率), 0)。
    写最后一个分片时先确认文件没有多余的行（在它提交之前报错）。"""

    def produce(start: int, stop: int) -> Iterator[tuple[Any, torch.Tensor, torch.Tensor]]:
        ids, log_probs = reader.rows(start * seq_len, (stop - start) * seq_len)
        if stop == num_blocks:
            reader.finish(num_blocks * seq_len)
        tail = np.clip(1.0 - np.exp(log_probs).sum(axis=-1), 0.0, None)
        shape = (stop - start, seq_len)
        yield (ids.reshape(*shape, top_k), torch.from_numpy(log_probs.astype(np.float32)).reshape(*shape, top_k),
               torch.from_numpy(tail.astype(np.float32)).reshape(shape))

    return produce


def import_topk_jsonl(
    path: str | Path,
    dataset: Any,
    out_dir: str | Path,
    *,
    fingerprint: Mapping[str, Any],
    top_k: int,
    temperature: float,
    real_vocab_size: int,
    document_mask: bool = True,
    value_dtype: str = "float16",
    blocks_per_shard: int = 64,
    progress: bool = True,
    stop: Callable[[], bool] | None = None,
) -> BuildStatus:
    """把别处算好的 top-k 目标导入成教师缓存（同一格式、同一分片写入器）。

    文件格式：JSON lines，每行 ``{"ids": [K 个 id], "logprobs": [K 个温度 T 下的 log 概率]}``。
    对齐：第 j 行（从 0 数，空行不允许）是块 b = j // L 的输入位置 p = j % L 的目标（L = seq_len），
    即看到 ``input_ids[b, :p+1]`` 之后教师对下一个 token 的分布；块 b 占打包流的 token
    [b·(L+1), (b+1)·(L+1))，输入位置 p 就是流中第 b·(L+1) + p 个 token。文件恰有 len(dataset)·L 行，
    最后一块补齐部分的位置也要有一行（内容任意合法，它们不计损失）。
    尾部质量按 1 − Σ exp(logprobs) 求得并夹到 ≥ 0。每行都校验（K 项、id 在 [0, real_vocab_size) 且互不相同、
    log 概率有限且 ≤ 0、Σp ≤ 1 + 1e-3），错误写成 ``文件:行号: 问题``。
    fingerprint 须含 tokenizer / data / split；teacher_weights 缺省为该文件内容的 sha256，teacher_config 缺省为 null。
    """
    path = Path(path)
    check_build_args(top_k, temperature, value_dtype, real_vocab_size, 1)
    given = {"teacher_config": None, **fingerprint}
    given.setdefault("teacher_weights", f"jsonl-sha256:{_file_sha256(path)}")
    derived = {
        "seq_len": dataset.seq_len, "document_mask": bool(document_mask), "top_k": top_k,
        "temperature": float(temperature), "value_dtype": value_dtype, "real_vocab_size": real_vocab_size,
    }
    full = full_fingerprint(given, derived)
    reader = _RowReader(path, top_k, real_vocab_size)
    try:
        producer = _import_producer(reader, dataset.seq_len, top_k, len(dataset))
        return run_build(out_dir, full, len(dataset), blocks_per_shard, producer, progress, stop,
                          getattr(dataset, "store", None))
    finally:
        reader.handle.close()


def _file_sha256(path: Path) -> str:
    """文件内容的 sha256（分块读）；找不到文件时给出点名的 FileNotFoundError。"""
    if not path.is_file():
        raise FileNotFoundError(f"top-k file {path} does not exist")
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(16 << 20):
            digest.update(chunk)
    return digest.hexdigest()
