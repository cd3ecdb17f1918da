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

外部目标：``import_topk_jsonl``（kd/cache_import.py）把别处算好的 top-k（JSON lines，每个输入位置一行）经同一个
分片写入器写成同一格式；跨分词器的缓存（kd/cross_cache.py）也经这里的 ``run_build`` 写出。
"""

from __future__ import annotations

import contextlib
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
    non_finite_rows,
    storage_failure,
)
from functional_lm.kd.teacher_cache import (
    FINGERPRINT_FIELDS,
    IDS_DTYPE,
    INDEX_FILE,
    KIND_DTYPE,
    TAIL_DTYPE,
    VALUE_DTYPES,
    check_fingerprint,
    encode_values,
    expected_bytes,
    file_kinds,
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
    "run_build",
    "check_build_args",
    "full_fingerprint",
    "Producer",
]

_TEMP = re.compile(r"^\.(?:(?:ids|logprobs|tail|kind)-\d{5}\.bin\.tmp|index\.json\.tmp-[0-9a-f]{8})$")
_DATA_FILE = re.compile(r"^(?:ids|logprobs|tail|kind)-\d{5}\.bin$")

# ================================================================================================
# 指纹
# ================================================================================================


def full_fingerprint(given: Mapping[str, Any], derived: Mapping[str, Any]) -> dict[str, Any]:
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
    """构建中一次写盘失败：原始的 OSError 与正在写的路径（run_build 把它说成一段话的 StorageError）。"""

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
    """把一个分片的目标逐批追加到各自的临时文件（边写边累计 CRC-32），commit 时 fsync、改名、返回 index 记录。
    cross：跨分词器的缓存，多一个每个位置目标种类的 kind 文件。"""

    def __init__(self, directory: Path, shard: int, value_dtype: str, cross: bool = False) -> None:
        self.directory, self.value_dtype = directory, value_dtype
        self.names = file_names(shard, cross)
        self.temps = {kind: directory / f".{name}.tmp" for kind, name in self.names.items()}
        self.handles: dict[str, Any] = {}
        try:
            for kind, path in self.temps.items():
                with _writing(path):
                    self.handles[kind] = open(path, "wb")
        except _WriteFailed:
            self.abort()
            raise
        self.crc = dict.fromkeys(self.names, 0)
        self.bytes = dict.fromkeys(self.names, 0)

    def write(self, ids: torch.Tensor | np.ndarray, log_probs: torch.Tensor, tail: torch.Tensor,
              kind: torch.Tensor | None = None) -> int:
        """追加一批 (ids (b, L, K), log 概率 (b, L, K), 尾部 (b, L)[, 目标种类 (b, L)])；返回写入的字节数。"""
        if (kind is None) == ("kind" in self.names):
            raise RuntimeError("a cross-tokenizer cache writes a kind per position, a same-vocabulary one none")
        arrays = {
            "ids": np.asarray(ids).astype(IDS_DTYPE, copy=False),
            "logprobs": encode_values(log_probs, self.value_dtype),
            "tail": tail.detach().to("cpu", torch.float32).numpy().astype(TAIL_DTYPE, copy=False),
        }
        if kind is not None:
            arrays["kind"] = kind.detach().to("cpu").numpy().astype(KIND_DTYPE, copy=False)
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
        return {"files": {self.names[k]: {"bytes": self.bytes[k], "crc32": self.crc[k]} for k in self.names}}

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

# 生产者：给定块区间 [start, stop)，依次产出若干批 (ids, log 概率, 尾部)（跨分词器的缓存再加目标种类），
# 覆盖区间内全部块。
Producer = Callable[[int, int], Iterator[tuple[Any, ...]]]


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
    cross = "kind" in file_kinds(fp)
    start, stop = shard_blocks(shard, index["blocks_per_shard"], index["num_blocks"])
    writer = _ShardWriter(directory, shard, fp["value_dtype"], cross)
    try:
        for parts in producer(start, stop):
            bar.advance(int(parts[2].shape[0]) * fp["seq_len"], writer.write(*parts))
        expected = expected_bytes(stop - start, fp["seq_len"], fp["top_k"], fp["value_dtype"], cross)
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


def run_build(
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


def check_build_args(top_k: int, temperature: float, value_dtype: str, real_vocab_size: int, batch_size: int) -> None:
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
    check_build_args(top_k, temperature, value_dtype, real_vocab_size, batch_size)
    if real_vocab_size > teacher_cfg.vocab_size:
        raise ValueError(f"real_vocab_size={real_vocab_size} exceeds the teacher's vocab_size={teacher_cfg.vocab_size}")
    derived = {
        "seq_len": dataset.seq_len, "document_mask": bool(document_mask), "teacher_config": teacher_cfg.to_dict(),
        "top_k": top_k, "temperature": float(temperature), "value_dtype": value_dtype, "real_vocab_size": real_vocab_size,
    }
    full = full_fingerprint(fingerprint, derived)
    device = torch.device(device)
    params = {key: value.to(device) for key, value in teacher_params.items()}
    check_params(params, teacher_cfg)
    producer = _teacher_producer(
        params, teacher_cfg, dataset, top_k=top_k, temperature=float(temperature), real_vocab_size=real_vocab_size,
        document_mask=bool(document_mask), batch_size=batch_size, device=device,
        teacher=f"the teacher {teacher_name}" if teacher_name else "the teacher", where=Path(out_dir).expanduser(),
    )
    return run_build(out_dir, full, len(dataset), blocks_per_shard, producer, progress, stop,
                      getattr(dataset, "store", None))


def build_served_cache(
    served: Any, dataset: Any, out_dir: str | Path, *, fingerprint: Mapping[str, Any], document_mask: bool = True,
    batch_size: int = 4, blocks_per_shard: int = 64, value_dtype: str = "float16", progress: bool = True,
    stop: Callable[[], bool] | None = None,
) -> BuildStatus:
    """服务端教师（served.ServedTeacher，已探测）建（或续建）同样格式的缓存：每批块的 token id（文档掩码时逐篇）
    交给服务器，目标是它 prompt_logprobs 的 top-K（T = 1）。指纹里的 teacher_config 是服务器上的模型名：
    同一个模型换了地址，缓存仍然认它。续建与中断的规矩同 build_teacher_cache。"""
    check_build_args(served.top_k, 1.0, value_dtype, served.real_vocab_size, batch_size)
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

    return run_build(out_dir, full_fingerprint(fingerprint, derived), len(dataset), blocks_per_shard, produce,
                      progress, stop, getattr(dataset, "store", None))
