"""教师缓存的构建：``build_teacher_cache`` 跑教师前向写出缓存（可续建），``import_topk_jsonl`` 把别处算好的
top-k 经同一个分片写入器写成同一格式。磁盘格式、index.json 的字段与读取见 functional_lm/kd/teacher_cache.py。

身份与续建：缓存的身份是指纹（分词器、数据、划分、块长、文档掩码、教师配置与权重、K、T、值类型、真实词表）。
``build_teacher_cache`` 发现目录里已有指纹相同的 index.json 时续建：跳过已提交的分片（核对其文件大小；
大小不符或文件缺失的分片重算），删掉被打断的写入留下的临时文件。每个分片的批划分只取决于分片本身，
所以同样的设备与 batch_size 下，续建写出的字节与一次建完的完全相同。指纹不同时抛 ``TeacherCacheMismatch``，
逐项用文字说明哪一样不同（数据、划分种子、分词器……）——绝不悄悄删掉已有缓存。数据的指纹只看内容
（token、文档边界、掩码的 CRC-32），与数据文件的路径和修改时间无关；划分记的是划分种子 split_seed
（``split.seed``），与训练的 seed 无关，所以一份缓存供不同 seed 的学生共用（见 functional_lm/kd/cache_identity.py）。

构建时拒绝非有限的教师输出（``NonFiniteTeacher``，点名块号与教师）；写盘失败（磁盘满、只读）是一段话的
``StorageError``：点名正在写的文件，已提交的分片保留，腾出空间后原样再建即从那里续建。

外部目标：``import_topk_jsonl`` 把别处算好的 top-k（JSON lines，每个输入位置一行）经同一个分片写入器写成同一格式。
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import sys
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from functional_lm.kd.cache_identity import differences as _differences
from functional_lm.kd.cache_identity import jsonable as _jsonable
from functional_lm.kd.cache_identity import short as _short
from functional_lm.config import ModelConfig
from functional_lm.atomic import fsync_path
from functional_lm.models.decoder import (
    check_input_ids,
    check_params,
    forward_hidden,
    output_weight,
)
from functional_lm.runs.rundir import RunLock
from functional_lm.atomic import write_json_atomic
from functional_lm.errors import RunDirError
from functional_lm.kd.cache_checks import (
    NonFiniteTeacher,
    check_row_ids,
    check_row_log_probs,
    non_finite_rows,
    storage_failure,
)
from functional_lm.kd.teacher_cache import (
    FINGERPRINT_FIELDS,
    IDS_DTYPE,
    INDEX_FILE,
    KINDS,
    TAIL_DTYPE,
    VALUE_DTYPES,
    check_fingerprint,
    encode_values,
    expected_bytes,
    file_names,
    new_index,
    read_index,
    shard_blocks,
    shard_problem,
    teacher_targets,
)

__all__ = [
    "human_bytes",
    "BuildStatus",
    "NonFiniteTeacher",
    "build_teacher_cache",
    "build_served_cache",
    "import_topk_jsonl",
]

_TEMP = re.compile(r"^\.(?:(?:ids|logprobs|tail)-\d{5}\.bin\.tmp|index\.json\.tmp-[0-9a-f]{8})$")
_DATA_FILE = re.compile(r"^(?:ids|logprobs|tail)-\d{5}\.bin$")
_MAX_LINE = 256 << 20  # 导入时单行的上限：K = 151,665 的一行约 4 MB，远在其下；更长的多半是二进制文件

# ================================================================================================
# 指纹
# ================================================================================================


def _full_fingerprint(given: Mapping[str, Any], derived: Mapping[str, Any]) -> dict[str, Any]:
    """调用方的指纹 + 构建参数推出的字段；两边都给了却不相同、或缺字段时报错（点名字段）。"""
    given, derived = _jsonable(dict(given)), _jsonable(dict(derived))
    clash = [(k, given[k], v) for k, v in derived.items() if k in given and _differences(given[k], v)]
    if clash:
        listed = "; ".join(f"{k}: fingerprint has {_short(a)}, the build uses {_short(b)}" for k, a, b in clash)
        raise ValueError(f"the fingerprint passed to the teacher-cache build disagrees with its arguments ({listed})")
    full = {**given, **derived}
    missing = [k for k in FINGERPRINT_FIELDS if k not in full]
    if missing:
        raise ValueError(
            f"the teacher-cache fingerprint lacks the fields {missing}; build it with make_fingerprint(...) "
            f"(tokenizer, data, split, teacher_weights) — the build adds the other fields itself"
        )
    return full


# ================================================================================================
# 分片写入
# ================================================================================================


def _install_file(tmp: Path, final: Path) -> None:
    """临时文件改名就位（单独成函数，测试借它模拟写到一半时崩溃）。"""
    os.replace(tmp, final)


class _WriteFailed(Exception):
    """构建中一次写盘失败：原始的 OSError 与正在写的路径（_run_build 把它说成一段话的 StorageError）。"""

    def __init__(self, err: OSError, path: Path) -> None:
        super().__init__(str(err))
        self.err, self.path = err, path


@contextlib.contextmanager
def _writing(path: Path) -> Iterator[None]:
    """块内写 path 时的 OSError → _WriteFailed（记下路径：file.write 的 OSError 本身不带文件名）。"""
    try:
        yield
    except OSError as err:
        raise _WriteFailed(err, Path(err.filename) if err.filename else path) from err


class _ShardWriter:
    """把一个分片的目标逐批追加到三个临时文件（边写边累计 CRC-32），commit 时 fsync、改名、返回 index 记录。"""

    def __init__(self, directory: Path, shard: int, value_dtype: str) -> None:
        self.directory, self.value_dtype = directory, value_dtype
        self.names = file_names(shard)
        self.temps = {kind: directory / f".{name}.tmp" for kind, name in self.names.items()}
        self.handles: dict[str, Any] = {}
        try:
            for kind, path in self.temps.items():
                with _writing(path):
                    self.handles[kind] = open(path, "wb")
        except _WriteFailed:
            self.abort()
            raise
        self.crc = dict.fromkeys(KINDS, 0)
        self.bytes = dict.fromkeys(KINDS, 0)

    def write(self, ids: torch.Tensor | np.ndarray, log_probs: torch.Tensor, tail: torch.Tensor) -> int:
        """追加一批 (ids (b, L, K), log 概率 (b, L, K), 尾部 (b, L))；返回写入的字节数。"""
        arrays = {
            "ids": np.asarray(ids).astype(IDS_DTYPE, copy=False),
            "logprobs": encode_values(log_probs, self.value_dtype),
            "tail": tail.detach().to("cpu", torch.float32).numpy().astype(TAIL_DTYPE, copy=False),
        }
        total = 0
        for kind, array in arrays.items():
            data = np.ascontiguousarray(array).tobytes()
            with _writing(self.temps[kind]):
                self.handles[kind].write(data)
            self.crc[kind] = zlib.crc32(data, self.crc[kind])
            self.bytes[kind] += len(data)
            total += len(data)
        return total

    def commit(self) -> dict[str, Any]:
        """fsync 并关闭三个临时文件，改名就位，返回 {"files": {名字: {bytes, crc32}}}。"""
        for kind, handle in self.handles.items():
            with _writing(self.temps[kind]):
                handle.flush()
                os.fsync(handle.fileno())
                handle.close()
        for kind, name in self.names.items():
            with _writing(self.directory / name):
                _install_file(self.temps[kind], self.directory / name)
        with _writing(self.directory):
            fsync_path(self.directory)
        return {"files": {self.names[k]: {"bytes": self.bytes[k], "crc32": self.crc[k]} for k in KINDS}}

    def abort(self) -> None:
        """出错时关闭并删掉临时文件（已改名就位的文件没有进 index.json，续建时会被重算覆盖）。"""
        for kind, handle in self.handles.items():
            with contextlib.suppress(OSError):  # 磁盘满时 close 里的 flush 还会再失败一次：照样删掉临时文件
                handle.close()
        for path in self.temps.values():
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)


# ================================================================================================
# 构建（教师前向与外部导入共用的驱动）
# ================================================================================================

# 生产者：给定块区间 [start, stop)，依次产出若干批 (ids, log 概率, 尾部)，覆盖区间内全部块。
Producer = Callable[[int, int], Iterator[tuple[Any, torch.Tensor, torch.Tensor]]]


@dataclass(frozen=True)
class BuildStatus:
    """一次构建调用的结果。"""

    directory: Path  # 缓存目录
    complete: bool  # 全部分片都已提交（被 stop 打断时为 False，再调用一次即可续建）
    shards_done: int  # 已提交的分片数（含以前提交的）
    num_shards: int  # 分片总数
    shards_written: int  # 本次新写的分片数
    bytes_written: int  # 本次写入的数据字节数


def _clean_directory(directory: Path, resuming: bool) -> None:
    """删掉被打断的写入留下的临时文件。新建缓存时：目录里有不属于缓存的东西则拒绝（不动用户的文件）；
    没有 index.json 的分片文件（无法使用，例如 index.json 被删掉了）一并删掉，免得与新缓存混在一起。"""
    entries = list(directory.iterdir())
    strangers = [e.name for e in entries if not (_TEMP.match(e.name) or _DATA_FILE.match(e.name) or e.name == ".lock")]
    if strangers and not resuming:
        raise ValueError(
            f"{directory} is not empty and holds no teacher cache ({strangers[0]} is not a cache file, and there "
            f"is no {INDEX_FILE}); choose an empty or new directory for the teacher cache"
        )
    for entry in entries:
        if entry.is_file() and (_TEMP.match(entry.name) or (not resuming and _DATA_FILE.match(entry.name))):
            entry.unlink()


def _open_for_writing(
    directory: Path, fingerprint: dict[str, Any], num_blocks: int, per_shard: int, store: Any = None,
) -> dict[str, Any]:
    """新建或续建：已有 index.json 时核对指纹与布局（不同 → TeacherCacheMismatch；旧版本的数据指纹按 store
    核对），清掉临时文件，并把文件大小不对的已提交分片标回未提交（之后重算）。"""
    resuming = (directory / INDEX_FILE).exists()
    if not resuming:
        _clean_directory(directory, resuming=False)
        index = new_index(fingerprint, num_blocks, per_shard)
        with _writing(directory / INDEX_FILE):
            write_json_atomic(index, directory / INDEX_FILE)
        return index
    index = read_index(directory)
    check_fingerprint(index["fingerprint"], fingerprint, directory, store=store)
    layout = {"num_blocks": index["num_blocks"], "blocks_per_shard": index["blocks_per_shard"]}
    check_fingerprint(layout, {"num_blocks": num_blocks, "blocks_per_shard": per_shard}, directory)
    _clean_directory(directory, resuming=True)
    for shard, entry in enumerate(index["shards"]):
        if entry is not None and (problem := shard_problem(directory, index, shard)) is not None:
            print(f"teacher cache {directory}: shard {shard} is damaged ({problem[0]}: {problem[1]}); "
                  f"recomputing it", file=sys.stderr)
            index["shards"][shard] = None
            index["complete"] = False
    return index


class _Progress:
    """tqdm 进度条（stderr，单位 token，速率即 token/s）；后缀是本次已写的字节数。"""

    def __init__(self, enabled: bool, total: int) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, desc="teacher cache", unit="tok", unit_scale=True, file=sys.stderr,
                        dynamic_ncols=True, disable=not enabled)
        self.bytes = 0

    def advance(self, tokens: int, nbytes: int) -> None:
        self.bytes += nbytes
        self.bar.update(tokens)
        self.bar.set_postfix(written=human_bytes(self.bytes), refresh=False)

    def close(self) -> None:
        self.bar.close()


def human_bytes(n: float) -> str:
    """字节数的简写：812 B、12.3 MB …（十进制单位）。"""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _write_shard(directory: Path, index: dict[str, Any], shard: int, producer: Producer, bar: _Progress) -> int:
    """计算并提交一个分片：写临时文件 → fsync → 改名 → 原子重写 index.json。返回写入的字节数。"""
    fp = index["fingerprint"]
    start, stop = shard_blocks(shard, index["blocks_per_shard"], index["num_blocks"])
    writer = _ShardWriter(directory, shard, fp["value_dtype"])
    try:
        for ids, log_probs, tail in producer(start, stop):
            bar.advance(int(tail.shape[0]) * fp["seq_len"], writer.write(ids, log_probs, tail))
        expected = expected_bytes(stop - start, fp["seq_len"], fp["top_k"], fp["value_dtype"])
        if writer.bytes != expected:
            raise RuntimeError(f"shard {shard}: the producer wrote {writer.bytes} bytes, expected {expected}")
        entry = writer.commit()
    except BaseException:
        writer.abort()
        raise
    index["shards"][shard] = {"blocks": [start, stop], **entry}
    try:
        with _writing(directory / INDEX_FILE):
            write_json_atomic(index, directory / INDEX_FILE)
    except _WriteFailed:
        index["shards"][shard] = None  # 没记进 index.json 就不算提交：续建时重算
        raise
    return sum(writer.bytes.values())


def _fill_shards(
    directory: Path, index: dict[str, Any], producer: Producer, progress: bool, stop: Callable[[], bool] | None
) -> BuildStatus:
    """依次写出所有未提交的分片；每个分片之前问一次 stop()，为真就干净地停下。全部写完后标记 complete。"""
    todo = [s for s, entry in enumerate(index["shards"]) if entry is None]
    per, n, seq_len = index["blocks_per_shard"], index["num_blocks"], index["fingerprint"]["seq_len"]
    total = sum(min(per, n - s * per) for s in todo) * seq_len
    written_shards = written_bytes = 0
    bar = _Progress(progress, total)
    try:
        for shard in todo:
            if stop is not None and stop():
                break
            written_bytes += _write_shard(directory, index, shard, producer, bar)
            written_shards += 1
    finally:
        bar.close()
    done = sum(entry is not None for entry in index["shards"])
    if done == index["num_shards"] and not index["complete"]:
        index["complete"] = True
        with _writing(directory / INDEX_FILE):
            write_json_atomic(index, directory / INDEX_FILE)
    return BuildStatus(directory, done == index["num_shards"], done, index["num_shards"], written_shards, written_bytes)


def _run_build(
    out_dir: str | Path, fingerprint: dict[str, Any], num_blocks: int, per_shard: int, producer: Producer,
    progress: bool, stop: Callable[[], bool] | None, store: Any = None,
) -> BuildStatus:
    """在目录锁之内：打开（新建或续建）→ 写分片 → 标记完成。store：这次的数据，核对旧版本缓存的数据指纹用。"""
    if isinstance(per_shard, bool) or not isinstance(per_shard, int) or per_shard < 1:
        raise ValueError(f"blocks_per_shard must be a positive int, got {per_shard!r}")
    directory = Path(out_dir).expanduser()
    index: dict[str, Any] | None = None
    try:
        with _writing(directory):
            directory.mkdir(parents=True, exist_ok=True)
        lock = _lock(directory)
        try:
            index = _open_for_writing(directory, fingerprint, num_blocks, per_shard, store)
            return _fill_shards(directory, index, producer, progress, stop)
        finally:
            lock.release()
    except _WriteFailed as failed:
        committed = None if index is None else (sum(e is not None for e in index["shards"]), index["num_shards"])
        raise storage_failure(failed.err, failed.path, directory, committed) from failed.err


def _lock(directory: Path) -> RunLock:
    """构建期间持有缓存目录的独占锁；已被另一个构建持有时是一段话的 ValueError。"""
    try:
        with _writing(directory / ".lock"):
            return RunLock(directory).acquire()
    except RunDirError:
        raise ValueError(
            f"teacher cache {directory} is being written by another process (its lock file {directory / '.lock'} "
            f"is held); wait for that build to finish, or write to another directory"
        ) from None


def _check_build_args(top_k: int, temperature: float, value_dtype: str, real_vocab_size: int, batch_size: int) -> None:
    """构建参数的基本校验（K、T、值类型、batch_size），错误写明参数名与期望。"""
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= real_vocab_size:
        raise ValueError(f"top_k must be an int in [1, {real_vocab_size}] (the real vocabulary), got {top_k!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 < temperature < math.inf:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if value_dtype not in VALUE_DTYPES:
        raise ValueError(f"value_dtype must be one of {sorted(VALUE_DTYPES)}, got {value_dtype!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")


def _teacher_producer(
    params: dict[str, torch.Tensor], cfg: ModelConfig, dataset: Any, *, top_k: int, temperature: float,
    real_vocab_size: int, document_mask: bool, batch_size: int, device: torch.device, teacher: str, where: Path,
) -> Producer:
    """教师前向的生产者：分片内按固定的 batch_size 从头切批（批划分只取决于分片），
    logits = h·Wᵀ 在 float32 中按行块计算（teacher_targets，每块至多 teacher_cache.LOGIT_BYTES），再取 teacher_topk。
    一批里有非有限的 log 概率或尾部质量时抛 NonFiniteTeacher（点名块号；teacher 是消息里教师的称呼）。"""
    weight = output_weight(params, cfg)
    weight32 = weight if weight.dtype == torch.float32 else weight.float()  # 转一次：V·d·4 字节

    def produce(start: int, stop: int) -> Iterator[tuple[Any, torch.Tensor, torch.Tensor]]:
        for first in range(start, stop, batch_size):
            blocks = range(first, min(first + batch_size, stop))
            input_ids, _, _, segments = dataset.examples(blocks, document_mask)
            ids_t = torch.from_numpy(input_ids).to(device)
            check_input_ids(ids_t, cfg)
            seg_t = torch.from_numpy(segments).to(device) if document_mask else None
            with torch.no_grad():
                hidden = forward_hidden(params, ids_t, cfg, segment_ids=seg_t, check=False)
            ids, log_probs, tail = teacher_targets(hidden, weight32, top_k, temperature, real_vocab_size)
            shape = (len(blocks), dataset.seq_len)
            if bad := non_finite_rows(log_probs.reshape(*shape, top_k), tail.reshape(shape)):
                raise NonFiniteTeacher(teacher, [blocks[i] for i in bad], where)
            yield ids.reshape(*shape, top_k).cpu().numpy(), log_probs.reshape(*shape, top_k), tail.reshape(shape)

    return produce


def build_teacher_cache(
    teacher_params: Mapping[str, torch.Tensor],
    teacher_cfg: ModelConfig,
    dataset: Any,
    out_dir: str | Path,
    *,
    top_k: int,
    temperature: float,
    fingerprint: Mapping[str, Any],
    real_vocab_size: int | None = None,
    document_mask: bool = True,
    batch_size: int = 4,
    blocks_per_shard: int = 64,
    device: str | torch.device = "cpu",
    value_dtype: str = "float16",
    progress: bool = True,
    stop: Callable[[], bool] | None = None,
    teacher_name: str | None = None,
) -> BuildStatus:
    """在 out_dir 建（或续建）教师缓存：对每个未提交的分片跑教师前向、取 top-k、写文件并提交（格式见模块说明）。

    dataset：``PackedDataset``（块数 len(dataset)、``examples``、``seq_len``）。fingerprint：至少含
    ``make_fingerprint`` 给出的 tokenizer / data / split / teacher_weights；seq_len、document_mask、
    teacher_config、top_k、temperature、value_dtype、real_vocab_size 由本函数按参数补上（若也给了，必须一致）。
    real_vocab_size 缺省为教师的 vocab_size。参数搬到 device（已在其上时不复制）。
    stop：每个分片之前调用，返回真就在分片之间干净地停下（返回的 complete 为 False，再调用即续建）。
    teacher_name：错误消息里怎样称呼教师（例如检查点目录）。
    已有指纹不同的缓存 → TeacherCacheMismatch（不删除任何东西）；教师输出非有限 → NonFiniteTeacher（已提交的
    分片保留）；写盘失败 → StorageError（点名文件，已提交的分片保留）。
    """
    real_vocab_size = teacher_cfg.vocab_size if real_vocab_size is None else real_vocab_size
    _check_build_args(top_k, temperature, value_dtype, real_vocab_size, batch_size)
    if real_vocab_size > teacher_cfg.vocab_size:
        raise ValueError(f"real_vocab_size={real_vocab_size} exceeds the teacher's vocab_size={teacher_cfg.vocab_size}")
    derived = {
        "seq_len": dataset.seq_len, "document_mask": bool(document_mask), "teacher_config": teacher_cfg.to_dict(),
        "top_k": top_k, "temperature": float(temperature), "value_dtype": value_dtype, "real_vocab_size": real_vocab_size,
    }
    full = _full_fingerprint(fingerprint, derived)
    device = torch.device(device)
    params = {key: value.to(device) for key, value in teacher_params.items()}
    check_params(params, teacher_cfg)
    producer = _teacher_producer(
        params, teacher_cfg, dataset, top_k=top_k, temperature=float(temperature), real_vocab_size=real_vocab_size,
        document_mask=bool(document_mask), batch_size=batch_size, device=device,
        teacher=f"the teacher {teacher_name}" if teacher_name else "the teacher", where=Path(out_dir).expanduser(),
    )
    return _run_build(out_dir, full, len(dataset), blocks_per_shard, producer, progress, stop,
                      getattr(dataset, "store", None))


def build_served_cache(
    served: Any, dataset: Any, out_dir: str | Path, *, fingerprint: Mapping[str, Any], document_mask: bool = True,
    batch_size: int = 4, blocks_per_shard: int = 64, value_dtype: str = "float16", progress: bool = True,
    stop: Callable[[], bool] | None = None,
) -> BuildStatus:
    """服务端教师（served.ServedTeacher，已探测）建（或续建）同样格式的缓存：每批块的 token id（文档掩码时逐篇）
    交给服务器，目标是它 prompt_logprobs 的 top-K（T = 1）。指纹里的 teacher_config 是服务器上的模型名：
    同一个模型换了地址，缓存仍然认它。续建与中断的规矩同 build_teacher_cache。"""
    _check_build_args(served.top_k, 1.0, value_dtype, served.real_vocab_size, batch_size)
    derived = {"seq_len": dataset.seq_len, "document_mask": bool(document_mask),
               "teacher_config": {"served_model": served.model}, "top_k": served.top_k, "temperature": 1.0,
               "value_dtype": value_dtype, "real_vocab_size": served.real_vocab_size}

    def produce(start: int, stop_at: int) -> Iterator[tuple[Any, torch.Tensor, torch.Tensor]]:
        for first in range(start, stop_at, batch_size):
            blocks = range(first, min(first + batch_size, stop_at))
            input_ids, _, _, segments = dataset.examples(blocks, document_mask)
            got = served.fetch(torch.from_numpy(input_ids), torch.from_numpy(segments) if document_mask else None,
                               value_dtype=value_dtype)
            yield got.ids.numpy(), got.log_probs, got.tail

    return _run_build(out_dir, _full_fingerprint(fingerprint, derived), len(dataset), blocks_per_shard, produce,
                      progress, stop, getattr(dataset, "store", None))


# ================================================================================================
# 外部 top-k 的导入（JSON lines）
# ================================================================================================


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
    _check_build_args(top_k, temperature, value_dtype, real_vocab_size, 1)
    given = {"teacher_config": None, **fingerprint}
    given.setdefault("teacher_weights", f"jsonl-sha256:{_file_sha256(path)}")
    derived = {
        "seq_len": dataset.seq_len, "document_mask": bool(document_mask), "top_k": top_k,
        "temperature": float(temperature), "value_dtype": value_dtype, "real_vocab_size": real_vocab_size,
    }
    full = _full_fingerprint(given, derived)
    reader = _RowReader(path, top_k, real_vocab_size)
    try:
        producer = _import_producer(reader, dataset.seq_len, top_k, len(dataset))
        return _run_build(out_dir, full, len(dataset), blocks_per_shard, producer, progress, stop,
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
