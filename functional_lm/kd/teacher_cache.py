"""教师缓存：把教师在打包数据集每个块上的稀疏目标（top-k id、温度 T 下的 log 概率、尾部质量）存到磁盘，
蒸馏时按块号流式读取，不必每一步都跑教师。

磁盘格式（目录 C）
------------------
::

    C/index.json            格式版本、指纹、布局、每个已提交分片的文件字节数与 CRC-32、是否完整
    C/ids-SSSSS.bin         int32   小端 [n, L, K]   top-k token id（按 log 概率从大到小）
    C/logprobs-SSSSS.bin    值类型  小端 [n, L, K]   log P_T(id)，P_T = softmax(z_t / T)（只在真实词表列上）
    C/tail-SSSSS.bin        float32 小端 [n, L]      尾部质量 1 − Σ_topk P_T（由非 top-k 列精确求得）
    C/.lock                 构建时的独占锁（flock），不属于数据

* 块按数据集的块号顺序存放：分片 s 装块 [s·B, min((s+1)·B, N))，B = ``blocks_per_shard``，N = 块数，
  n = 该分片的块数；L = seq_len（每块的输入位置数），K = top_k。块 b 的位置 p 对应输入 ``input_ids[b, p]``，
  其目标是教师对下一个 token（``labels[b, p]`` 所在位置）的分布——与 ``PackedDataset.example`` 的移位一致。
* 值类型（``value_dtype``，记在指纹里）：``float16``（缺省）、``bfloat16``（以 uint16 存其位模式）或
  ``float32``。log 概率落在 [−30, 0] 附近：float16 有 10 位尾数，舍入误差 ≤ 2⁻¹¹·|x|，[−30, 0] 上至多约 0.0078；
  bfloat16 只有 7 位尾数，误差大 8 倍（至多约 0.0625），它多出来的指数范围在这里用不上（测试实测两者）。
  float16 的最小值是 −65504：更小的 log 概率（概率本就恰为 0）存为 −65504。
* 分片提交：三个文件先写到隐藏的临时名（``.ids-SSSSS.bin.tmp`` …）、fsync，再改名就位，然后原子地重写
  index.json，在 ``shards[s]`` 记下三个文件的字节数与 CRC-32（未提交的分片为 null）。全部分片提交后
  ``complete`` 置为 true。index.json 不含时间戳：同样的输入总是逐字节相同的缓存。

index.json 的字段::

    format, version       "functional_lm.kd.teacher_cache", 1
    fingerprint           {tokenizer, data, split, seq_len, document_mask, teacher_config, teacher_weights,
                           top_k, temperature, value_dtype, real_vocab_size}（见 FINGERPRINT_FIELDS）
    num_blocks, blocks_per_shard, num_shards
    shards                长 num_shards 的列表：null 或 {"blocks": [起, 止), "files": {名字: {bytes, crc32}}}
    complete              所有分片都已提交

身份与续建：缓存的身份是指纹（分词器、数据、划分、块长、文档掩码、教师配置与权重、K、T、值类型、真实词表）。
``build_teacher_cache`` 发现目录里已有指纹相同的 index.json 时续建：跳过已提交的分片（核对其文件大小；
大小不符或文件缺失的分片重算），删掉被打断的写入留下的临时文件。每个分片的批划分只取决于分片本身，
所以同样的设备与 batch_size 下，续建写出的字节与一次建完的完全相同。指纹不同时抛 ``TeacherCacheMismatch``，
逐项用文字说明哪一样不同（数据、划分种子、分词器……）——绝不悄悄删掉已有缓存。数据的指纹只看内容
（token、文档边界、掩码的 CRC-32），与数据文件的路径和修改时间无关；划分记的是划分种子 split_seed
（``split.seed``），与训练的 seed 无关，所以一份缓存供不同 seed 的学生共用（见 functional_lm/kd/cache_identity.py）。

读取：``TeacherCache.open`` 做便宜的结构检查（index.json 可解析、完整、每个文件都在且字节数与记录和布局相符；
截断的分片点名报错，而不是读成 0）。原地的损坏（大小不变）缺省也会被发现：每个分片**第一次被读到时**把它的
三个文件读一遍核对 CRC-32（每个分片每个进程一次，不是每批一次；代价与实际读到的数据量成正比），每批读出的值
再做取值范围检查（id ∈ [0, V_real)、log 概率有限且 ≤ 0、尾部质量 ∈ [0, 1]，见 teacher_cache_checks）。
``verify=True`` 在打开时就核对全部分片。数据经 np.memmap 读取。错误都是 ``TeacherCacheDamaged``（ValueError），
写明目录、文件、原因与处理办法（``build_dir`` 给出时建议里是可以照抄的 ``functional-lm teacher-cache`` 命令）。
全程不用 pickle。

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
import struct
import sys
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from functional_lm.kd.cache_identity import comparable, describe
from functional_lm.kd.cache_identity import data_fingerprint as content_fingerprint
from functional_lm.kd.cache_identity import differences as _differences
from functional_lm.kd.cache_identity import jsonable as _jsonable
from functional_lm.kd.cache_identity import short as _short
from functional_lm.config import ModelConfig
from functional_lm.data.store import TokenStore, crc32_file
from functional_lm.atomic import fsync_path
from functional_lm.losses import teacher_topk
from functional_lm.models.qwen2 import (
    check_input_ids,
    check_params,
    forward_hidden,
    output_weight,
)
from functional_lm.runs.rundir import RunLock
from functional_lm.atomic import write_json_atomic
from functional_lm.errors import RunDirError
from functional_lm.kd.cache_checks import (
    GENERIC_REBUILD,
    NonFiniteTeacher,
    damage_advice,
    missing_index_advice,
    non_finite_rows,
    rebuild_command,
    storage_failure,
    target_problem,
)

__all__ = [
    "human_bytes",
    "teacher_targets",
    "stored_log_probs",
    "FINGERPRINT_FIELDS",
    "VALUE_DTYPES",
    "BuildStatus",
    "NonFiniteTeacher",
    "TeacherCache",
    "TeacherCacheDamaged",
    "TeacherCacheMismatch",
    "build_teacher_cache",
    "check_fingerprint",
    "data_fingerprint",
    "import_topk_jsonl",
    "make_fingerprint",
    "teacher_weights_fingerprint",
]

FORMAT = "functional_lm.kd.teacher_cache"
VERSION = 1
INDEX_FILE = "index.json"
FINGERPRINT_FIELDS = (
    "tokenizer", "data", "split", "seq_len", "document_mask", "teacher_config", "teacher_weights",
    "top_k", "temperature", "value_dtype", "real_vocab_size",
)
# 值类型 → 磁盘上的 numpy 类型（小端）；bfloat16 存位模式（numpy 没有 bfloat16）。
VALUE_DTYPES: dict[str, np.dtype] = {
    "float16": np.dtype("<f2"),
    "bfloat16": np.dtype("<u2"),
    "float32": np.dtype("<f4"),
}
_IDS_DTYPE = np.dtype("<i4")
_TAIL_DTYPE = np.dtype("<f4")
_KINDS = ("ids", "logprobs", "tail")
_TEMP = re.compile(r"^\.(?:(?:ids|logprobs|tail)-\d{5}\.bin\.tmp|index\.json\.tmp-[0-9a-f]{8})$")
_DATA_FILE = re.compile(r"^(?:ids|logprobs|tail)-\d{5}\.bin$")
_LOGIT_BYTES = 64 << 20  # 每个行块的 float32 logits 至多 64 MiB（V = 151,936 时约 110 行）
_OPEN_SHARDS = 16  # 读取时同时映射的分片数上限（每个 memmap 占一个文件描述符）：映射进进程的页
# 因此至多是 16 个分片的大小，与缓存总大小无关——比内存大的缓存训练时常驻内存保持平稳
_FLOAT16_MIN = float(np.finfo(np.float16).min)  # −65504
_MAX_LINE = 256 << 20  # 导入时单行的上限：K = 151,665 的一行约 4 MB，远在其下；更长的多半是二进制文件

# ================================================================================================
# 错误
# ================================================================================================


class TeacherCacheDamaged(ValueError):
    """教师缓存不可用：index.json 缺失 / 读不出、不完整、分片文件缺失 / 大小不符 / 校验和不符 / 值超出范围。

    属性：directory（缓存目录）、file（出问题的文件名）、reason（原因）。消息是完整的一段话，带处理办法；
    summary 替换开头的 “teacher cache D is damaged (文件: 原因)”（缺失、不完整时用）。
    """

    def __init__(
        self, directory: str | Path, file: str, reason: str, advice: str | None = None, *, summary: str | None = None
    ) -> None:
        self.directory, self.file, self.reason = Path(directory), file, reason
        advice = advice or damage_advice(self.directory, file, GENERIC_REBUILD)
        summary = summary or f"teacher cache {self.directory} is damaged ({file}: {reason})"
        super().__init__(f"{summary}; {advice}")


class TeacherCacheMismatch(ValueError):
    """已有缓存的指纹（或布局）与这次要求的不同；属性 directory 与 fields（不同字段的名字，含嵌套的点路径）。

    消息用文字说明每一项是什么不同（cache_identity.describe）：例如 “the split seed (--split-seed) differs:
    cache 0, this run 5”、“the data's tokens differ (different text or a different file)”。who 是消息里
    “这一次”的叫法（构建时 this build，蒸馏时 this run），advice 是句末的处理办法。"""

    def __init__(
        self, directory: str | Path, differences: Sequence[tuple[str, Any, Any]], *, who: str = "this build",
        advice: str | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.fields = [name for name, _, _ in differences]
        listed = "; ".join(describe(differences, who))
        advice = advice or (f"it was left untouched: write the new cache to another directory, or delete "
                            f"{self.directory} to rebuild it")
        super().__init__(f"teacher cache {self.directory} was built for something else: {listed}; {advice}")


# ================================================================================================
# 指纹
# ================================================================================================


def check_fingerprint(
    index_fp: Mapping[str, Any], wanted_fp: Mapping[str, Any], cache_dir: str | Path, *, store: Any = None,
    who: str = "this build", advice: str | None = None,
) -> None:
    """核对缓存的指纹与这次要求的指纹；有差异时抛 TeacherCacheMismatch，逐项用文字说明哪一样不同（一段话）。

    给了 store（这次的 TokenStore）时，旧版本缓存的数据指纹按它记下的校验和核对（cache_identity.comparable）。"""
    recorded = comparable(index_fp, store) if store is not None else dict(index_fp)
    found = _differences(_jsonable(recorded), _jsonable(dict(wanted_fp)))
    if found:
        raise TeacherCacheMismatch(cache_dir, found, who=who, advice=advice)


def teacher_weights_fingerprint(checkpoint_dir: str | Path) -> str:
    """教师权重的身份：sha256(每个 *.safetensors 的 文件名、大小、头部 JSON、数据区首尾各至多 1 MiB)，按文件名排序。

    头部记着每个张量的名字、dtype、形状与字节偏移，加上文件大小即可区分不同结构的检查点；同一结构的
    不同权重（例如微调前后）头部完全相同，所以再取数据区首尾的一小段。全程只读每个文件约 2 MiB，
    不必把几 GB 的权重读一遍。"""
    directory = Path(checkpoint_dir)
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in the teacher checkpoint {directory}")
    digest = hashlib.sha256()
    for file in files:
        digest.update(_safetensors_identity(file))
    return "safetensors-sha256:" + digest.hexdigest()


def _safetensors_identity(file: Path, sample: int = 1 << 20) -> bytes:
    """一个 safetensors 文件的身份字节：名字、大小、头部 JSON、数据区开头与结尾各至多 sample 字节。"""
    size = file.stat().st_size
    with open(file, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8 or (length := struct.unpack("<Q", prefix)[0]) > size - 8:
            raise ValueError(f"{file}: not a safetensors file (the 8-byte header length is missing or too large)")
        header = handle.read(length)
        head = handle.read(sample)
        handle.seek(max(8 + length, size - sample))
        tail = handle.read(sample)
    return f"{file.name}\0{size}\0".encode() + header + b"\0" + head + b"\0" + tail + b"\0"


def data_fingerprint(store: TokenStore) -> dict[str, Any]:
    """数据的内容指纹：token、文档边界与损失掩码的 CRC-32 加 token 数，与文件的路径、修改时间无关
    （格式与旧版本的兼容见 functional_lm/kd/cache_identity.py）。"""
    return content_fingerprint(store)


def make_fingerprint(
    tokenizer: Any, store: TokenStore, *, teacher_weights: str | None, split: str = "train",
    val_fraction: float = 0.0, seed: int = 0, split_seed: int | None = None,
) -> dict[str, Any]:
    """调用方负责的四个指纹字段（tokenizer、data、split、teacher_weights）；其余字段由构建函数补上。

    tokenizer：分词器指纹字符串，或带 ``.fingerprint`` 的分词器；split："train" 或 "val"，连同划分的
    val_fraction 与划分种子 split_seed（``pack`` 的 seed；记为 ``split.seed``，旧的参数名 seed 仍可用，
    split_seed 给了时以它为准）；teacher_weights：``teacher_weights_fingerprint(目录)``，
    内存中的教师可以传任意能标识它的字符串；None 时不写这一项（导入时由 import_topk_jsonl 记下文件的 sha256）。"""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    fingerprint = {
        "tokenizer": str(getattr(tokenizer, "fingerprint", tokenizer)),
        "data": data_fingerprint(store),
        "split": {"split": split, "val_fraction": float(val_fraction),
                  "seed": int(seed if split_seed is None else split_seed)},
    }
    if teacher_weights is not None:
        fingerprint["teacher_weights"] = str(teacher_weights)
    return fingerprint


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
# 布局与 index.json
# ================================================================================================


def _file_names(shard: int) -> dict[str, str]:
    """分片 s 的三个文件名：{"ids": "ids-0000s.bin", ...}。"""
    return {kind: f"{kind}-{shard:05d}.bin" for kind in _KINDS}


def _shard_blocks(shard: int, per_shard: int, num_blocks: int) -> tuple[int, int]:
    """分片 s 装的块 [s·B, min((s+1)·B, N))。"""
    return shard * per_shard, min((shard + 1) * per_shard, num_blocks)


def _expected_bytes(blocks: int, seq_len: int, top_k: int, value_dtype: str) -> dict[str, int]:
    """一个 n 块的分片三个文件应有的字节数：ids n·L·K·4，logprobs n·L·K·(2 或 4)，tail n·L·4。"""
    cells = blocks * seq_len
    return {
        "ids": cells * top_k * _IDS_DTYPE.itemsize,
        "logprobs": cells * top_k * VALUE_DTYPES[value_dtype].itemsize,
        "tail": cells * _TAIL_DTYPE.itemsize,
    }


def _new_index(fingerprint: dict[str, Any], num_blocks: int, per_shard: int) -> dict[str, Any]:
    """一个空缓存的 index.json 内容（所有分片都未提交）。"""
    num_shards = math.ceil(num_blocks / per_shard)
    return {
        "format": FORMAT, "version": VERSION, "fingerprint": fingerprint, "num_blocks": num_blocks,
        "blocks_per_shard": per_shard, "num_shards": num_shards, "shards": [None] * num_shards, "complete": False,
    }


def _is_count(value: Any, low: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _missing_index(directory: Path, build_dir: Path | None) -> TeacherCacheDamaged:
    """目录里没有 index.json：这里没有缓存（从没建过，或指错了目录）——说清楚，不建议删任何东西。"""
    return TeacherCacheDamaged(
        directory, INDEX_FILE, "file is missing", summary=f"no teacher cache in {directory} ({INDEX_FILE} is missing)",
        advice=missing_index_advice(build_dir),
    )


def _read_index(directory: Path, rebuild: str = GENERIC_REBUILD) -> dict[str, Any]:
    """读 index.json 并检查形状（格式、版本、布局字段、分片表的长度）；任何问题都是 index.json 的损坏
    （rebuild：建议里怎样称呼重建这个缓存的命令）。文件不存在时抛 FileNotFoundError，由调用方说明。"""
    try:
        index = json.loads((directory / INDEX_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise TeacherCacheDamaged(directory, INDEX_FILE, f"not readable JSON ({err})",
                                  damage_advice(directory, INDEX_FILE, rebuild)) from None
    try:
        _check_index_shape(directory, index)
    except TeacherCacheDamaged as err:
        advice = damage_advice(directory, err.file, rebuild)
        raise TeacherCacheDamaged(directory, err.file, err.reason, advice) from None
    return index


def _check_index_shape(directory: Path, index: Any) -> None:
    """index.json 的形状：格式、版本、布局字段、分片表的长度、指纹里读取要用的字段。"""
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise TeacherCacheDamaged(directory, INDEX_FILE, f"not a teacher-cache index (expected format {FORMAT!r})")
    if index.get("version") != VERSION:
        raise TeacherCacheDamaged(directory, INDEX_FILE, f"format version {index.get('version')!r}, expected {VERSION}")
    n, per = index.get("num_blocks"), index.get("blocks_per_shard")
    if not (_is_count(n) and _is_count(per, 1) and index.get("num_shards") == math.ceil(n / per)):
        raise TeacherCacheDamaged(directory, INDEX_FILE, "num_blocks / blocks_per_shard / num_shards are inconsistent")
    shards = index.get("shards")
    if not isinstance(shards, list) or len(shards) != index["num_shards"]:
        raise TeacherCacheDamaged(directory, INDEX_FILE, f"'shards' must be a list of {index['num_shards']} entries")
    _check_fingerprint_shape(directory, index.get("fingerprint"))


def _check_fingerprint_shape(directory: Path, fp: Any) -> None:
    """读取需要的指纹字段：K ≥ 1、L ≥ 1、T > 0、已知的值类型。"""
    ok = (
        isinstance(fp, dict) and all(k in fp for k in FINGERPRINT_FIELDS)
        and _is_count(fp["top_k"], 1) and _is_count(fp["seq_len"], 1) and fp["value_dtype"] in VALUE_DTYPES
        and isinstance(fp["temperature"], (int, float)) and fp["temperature"] > 0
    )
    if not ok:
        raise TeacherCacheDamaged(
            directory, INDEX_FILE, f"'fingerprint' must hold {list(FINGERPRINT_FIELDS)} with top_k >= 1, seq_len >= 1, "
            f"temperature > 0 and value_dtype in {sorted(VALUE_DTYPES)}"
        )


def _shard_problem(directory: Path, index: dict[str, Any], shard: int) -> tuple[str, str] | None:
    """已提交分片 s 的结构问题 (文件名, 原因)：记录的字节数与布局不符、文件缺失、实际大小不符；没有问题为 None。"""
    fp, entry = index["fingerprint"], index["shards"][shard]
    start, stop = _shard_blocks(shard, index["blocks_per_shard"], index["num_blocks"])
    expected = _expected_bytes(stop - start, fp["seq_len"], fp["top_k"], fp["value_dtype"])
    files = entry.get("files") if isinstance(entry, dict) else None
    for kind, name in _file_names(shard).items():
        record = files.get(name) if isinstance(files, dict) else None
        if not (isinstance(record, dict) and _is_count(record.get("bytes")) and _is_count(record.get("crc32"))):
            return INDEX_FILE, f"shard {shard} has no {{bytes, crc32}} record for {name}"
        if record["bytes"] != expected[kind]:
            need = expected[kind]
            return INDEX_FILE, f"{name} is recorded as {record['bytes']} bytes, but {stop - start} blocks need {need}"
        path = directory / name
        if not path.is_file():
            return name, "file is missing"
        if (actual := path.stat().st_size) != expected[kind]:
            return name, f"{actual} bytes, but index.json recorded {expected[kind]} (truncated or overwritten)"
    return None


# ================================================================================================
# 值的编码
# ================================================================================================


def _encode_values(log_probs: torch.Tensor, value_dtype: str) -> np.ndarray:
    """float32 log 概率 → 磁盘数组：float16 先夹到 ≥ −65504（更小的概率本就为 0），bfloat16 取位模式。"""
    x = log_probs.detach().to("cpu", torch.float32)
    if value_dtype == "float16":
        return x.clamp(min=_FLOAT16_MIN).to(torch.float16).numpy().astype(VALUE_DTYPES["float16"], copy=False)
    if value_dtype == "bfloat16":
        bits = x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        return bits.astype(VALUE_DTYPES["bfloat16"], copy=False)
    return x.numpy().astype(VALUE_DTYPES["float32"], copy=False)


def _decode_values(raw: np.ndarray, value_dtype: str) -> np.ndarray:
    """磁盘数组 → float32 log 概率（bfloat16 的位模式左移 16 位即 float32）。"""
    if value_dtype == "bfloat16":
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return raw.astype(np.float32)


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
        self.names = _file_names(shard)
        self.temps = {kind: directory / f".{name}.tmp" for kind, name in self.names.items()}
        self.handles: dict[str, Any] = {}
        try:
            for kind, path in self.temps.items():
                with _writing(path):
                    self.handles[kind] = open(path, "wb")
        except _WriteFailed:
            self.abort()
            raise
        self.crc = dict.fromkeys(_KINDS, 0)
        self.bytes = dict.fromkeys(_KINDS, 0)

    def write(self, ids: torch.Tensor | np.ndarray, log_probs: torch.Tensor, tail: torch.Tensor) -> int:
        """追加一批 (ids (b, L, K), log 概率 (b, L, K), 尾部 (b, L))；返回写入的字节数。"""
        arrays = {
            "ids": np.asarray(ids).astype(_IDS_DTYPE, copy=False),
            "logprobs": _encode_values(log_probs, self.value_dtype),
            "tail": tail.detach().to("cpu", torch.float32).numpy().astype(_TAIL_DTYPE, copy=False),
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
        return {"files": {self.names[k]: {"bytes": self.bytes[k], "crc32": self.crc[k]} for k in _KINDS}}

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
        index = _new_index(fingerprint, num_blocks, per_shard)
        with _writing(directory / INDEX_FILE):
            write_json_atomic(index, directory / INDEX_FILE)
        return index
    index = _read_index(directory)
    check_fingerprint(index["fingerprint"], fingerprint, directory, store=store)
    layout = {"num_blocks": index["num_blocks"], "blocks_per_shard": index["blocks_per_shard"]}
    check_fingerprint(layout, {"num_blocks": num_blocks, "blocks_per_shard": per_shard}, directory)
    _clean_directory(directory, resuming=True)
    for shard, entry in enumerate(index["shards"]):
        if entry is not None and (problem := _shard_problem(directory, index, shard)) is not None:
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
    start, stop = _shard_blocks(shard, index["blocks_per_shard"], index["num_blocks"])
    writer = _ShardWriter(directory, shard, fp["value_dtype"])
    try:
        for ids, log_probs, tail in producer(start, stop):
            bar.advance(int(tail.shape[0]) * fp["seq_len"], writer.write(ids, log_probs, tail))
        expected = _expected_bytes(stop - start, fp["seq_len"], fp["top_k"], fp["value_dtype"])
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


def _check_build_args(top_k: int, temperature: float, value_dtype: str, real_vocab: int, batch_size: int) -> None:
    """构建参数的基本校验（K、T、值类型、batch_size），错误写明参数名与期望。"""
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= real_vocab:
        raise ValueError(f"top_k must be an int in [1, {real_vocab}] (the real vocabulary), got {top_k!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 < temperature < math.inf:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if value_dtype not in VALUE_DTYPES:
        raise ValueError(f"value_dtype must be one of {sorted(VALUE_DTYPES)}, got {value_dtype!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")


@torch.no_grad()
def teacher_targets(
    hidden: torch.Tensor, weight32: torch.Tensor, top_k: int, temperature: float, real_vocab: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """教师最终隐藏状态 (…, d) → 展平后每个 token 的 (top-k id, 温度 T 下的 log P, 尾部质量)。

    logits = h·Wᵀ 在 float32 中按行块计算（每块至多 _LOGIT_BYTES），再取 teacher_topk。建缓存与在线 top-k
    训练共用这一个函数：同样的隐藏状态得到逐位相同的目标。weight32 是 float32 的输出投影 (V, d)。
    """
    flat = hidden.reshape(-1, hidden.shape[-1]).float()
    rows_per_chunk = max(1, _LOGIT_BYTES // (4 * weight32.shape[0]))
    parts = [
        teacher_topk(F.linear(flat[r : r + rows_per_chunk], weight32), top_k,
                     temperature=temperature, real_vocab_size=real_vocab)
        for r in range(0, flat.shape[0], rows_per_chunk)
    ]
    ids, log_probs, tail = (torch.cat(p) for p in zip(*parts))
    return ids, log_probs, tail


def stored_log_probs(log_probs: torch.Tensor, value_dtype: str = "float16") -> torch.Tensor:
    """log 概率经过缓存的存储格式再读回（float16 / bfloat16 取整）：在线 top-k 训练用它，
    使“从缓存训练”与“在线 top-k 训练”是同一种数。"""
    decoded = _decode_values(_encode_values(log_probs, value_dtype), value_dtype)
    return torch.from_numpy(decoded).to(log_probs.device)


def _teacher_producer(
    params: dict[str, torch.Tensor], cfg: ModelConfig, dataset: Any, *, top_k: int, temperature: float,
    real_vocab: int, document_mask: bool, batch_size: int, device: torch.device, teacher: str, where: Path,
) -> Producer:
    """教师前向的生产者：分片内按固定的 batch_size 从头切批（批划分只取决于分片），
    logits = h·Wᵀ 在 float32 中按行块计算（每块至多 _LOGIT_BYTES），再取 teacher_topk。
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
            ids, log_probs, tail = teacher_targets(hidden, weight32, top_k, temperature, real_vocab)
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
    real_vocab = teacher_cfg.vocab_size if real_vocab_size is None else real_vocab_size
    _check_build_args(top_k, temperature, value_dtype, real_vocab, batch_size)
    if real_vocab > teacher_cfg.vocab_size:
        raise ValueError(f"real_vocab_size={real_vocab} exceeds the teacher's vocab_size={teacher_cfg.vocab_size}")
    derived = {
        "seq_len": dataset.seq_len, "document_mask": bool(document_mask), "teacher_config": teacher_cfg.to_dict(),
        "top_k": top_k, "temperature": float(temperature), "value_dtype": value_dtype, "real_vocab_size": real_vocab,
    }
    full = _full_fingerprint(fingerprint, derived)
    device = torch.device(device)
    params = {key: value.to(device) for key, value in teacher_params.items()}
    check_params(params, teacher_cfg)
    producer = _teacher_producer(
        params, teacher_cfg, dataset, top_k=top_k, temperature=float(temperature), real_vocab=real_vocab,
        document_mask=bool(document_mask), batch_size=batch_size, device=device,
        teacher=f"the teacher {teacher_name}" if teacher_name else "the teacher", where=Path(out_dir).expanduser(),
    )
    return _run_build(out_dir, full, len(dataset), blocks_per_shard, producer, progress, stop,
                      getattr(dataset, "store", None))


# ================================================================================================
# 外部 top-k 的导入（JSON lines）
# ================================================================================================


class _RowReader:
    """按顺序读 JSON-lines 文件的第 j 行（从 0 数）并校验；可以向前跳过行（续建时跳过已提交的分片）。

    以二进制读、逐行解码：不是 UTF-8 的行（例如误给了二进制文件）报 ``文件:行号``；单行至多 _MAX_LINE 字节，
    没有换行的大文件不会被整个读进内存。"""

    def __init__(self, path: Path, top_k: int, real_vocab: int) -> None:
        self.path, self.top_k, self.real_vocab = path, top_k, real_vocab
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
        _check_row_ids(where, ids, self.real_vocab)
        _check_row_log_probs(where, log_probs)
        return ids, log_probs

    def finish(self, total_rows: int) -> None:
        """读到第 total_rows 行为止后，文件里不应再有非空行。"""
        while self.next_row < total_rows:
            self._line()
        extra = self._readline()
        if extra.strip():
            raise ValueError(f"{self.path}:{total_rows + 1}: extra row; the dataset has exactly {total_rows} rows "
                             f"(number of blocks × seq_len)")


def _check_row_ids(where: str, ids: list[Any], real_vocab: int) -> None:
    """一行的 id：整数、落在 [0, real_vocab)、互不相同。"""
    bad = [v for v in ids if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < real_vocab]
    if bad:
        raise ValueError(f"{where}: ids must be integers in [0, {real_vocab}) (the real vocabulary), got {bad[:4]}")
    if len(set(ids)) != len(ids):
        raise ValueError(f"{where}: ids must be distinct (each token once), got duplicates")


def _check_row_log_probs(where: str, log_probs: list[Any]) -> None:
    """一行的 log 概率：有限、≤ 0，且 Σ exp ≤ 1 + 1e-3。"""
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in log_probs)
    if not numbers or not all(math.isfinite(v) and v <= 0 for v in log_probs):
        raise ValueError(f"{where}: logprobs must be finite numbers <= 0 (log-probabilities), got {log_probs[:4]}…")
    total = math.fsum(math.exp(v) for v in log_probs)
    if total > 1 + 1e-3:
        raise ValueError(f"{where}: the probabilities sum to {total:.6f} > 1 (exp of logprobs must sum to at most 1)")


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


# ================================================================================================
# 读取
# ================================================================================================


@dataclass
class _ShardMaps:
    """一个分片的三个只读 memmap。"""

    ids: np.ndarray  # int32 (n, L, K)
    log_probs: np.ndarray  # 值类型 (n, L, K)
    tail: np.ndarray  # float32 (n, L)


class TeacherCache:
    """只读的教师缓存：``TeacherCache.open(目录)``，再用 ``targets(块号)`` 取稀疏目标（见模块说明）。

    每个分片第一次被读到时核对它三个文件的 CRC-32（记下已核对的分片：映射被换出再换回也不重算），
    每批读出的值做取值范围检查；任何损坏都是点名文件的 TeacherCacheDamaged。"""

    def __init__(self, directory: Path, index: dict[str, Any], rebuild: str = GENERIC_REBUILD) -> None:
        self.directory = directory
        self.index = index
        self.fingerprint: dict[str, Any] = index["fingerprint"]
        self.top_k: int = self.fingerprint["top_k"]
        self.temperature: float = float(self.fingerprint["temperature"])
        self.seq_len: int = self.fingerprint["seq_len"]
        self.value_dtype: str = self.fingerprint["value_dtype"]
        self.real_vocab_size: int = self.fingerprint["real_vocab_size"]
        self.num_blocks: int = index["num_blocks"]
        self.blocks_per_shard: int = index["blocks_per_shard"]
        self._rebuild = rebuild  # 建议里重建这个缓存的命令（见 open 的 build_dir）
        self._maps: OrderedDict[int, _ShardMaps] = OrderedDict()
        self._verified: set[int] = set()  # 已核对过 CRC-32 的分片

    @classmethod
    def open(cls, directory: str | Path, *, verify: bool = False, build_dir: str | Path | None = None) -> TeacherCache:
        """打开缓存并做结构检查（完整、文件齐全、字节数相符）；verify=True 当场核对全部分片的 CRC-32
        （否则每个分片在第一次被读到时核对）。

        build_dir：建这个缓存时 ``functional-lm teacher-cache --output-dir`` 的目录（命令行把划分写在
        build_dir/train、build_dir/val）；给出时错误消息里的建议是照抄即可的重建命令。"""
        directory = Path(directory).expanduser()
        if not directory.is_dir():
            raise FileNotFoundError(f"no teacher cache at {directory} (not a directory)")
        build = Path(build_dir).expanduser() if build_dir is not None else None
        try:
            index = _read_index(directory, rebuild_command(build) if build is not None else GENERIC_REBUILD)
        except FileNotFoundError:
            raise _missing_index(directory, build) from None
        rebuild = GENERIC_REBUILD if build is None else \
            rebuild_command(build, index["fingerprint"], index["blocks_per_shard"])
        _check_complete(directory, index, rebuild)
        for shard in range(index["num_shards"]):
            if (problem := _shard_problem(directory, index, shard)) is not None:
                file, reason = problem
                raise TeacherCacheDamaged(directory, file, reason, damage_advice(directory, file, rebuild, reason))
        cache = cls(directory, index, rebuild)
        for shard in range(index["num_shards"]) if verify else ():
            cache._verify(shard)
        return cache

    def _damaged(self, file: str, reason: str) -> TeacherCacheDamaged:
        return TeacherCacheDamaged(self.directory, file, reason, damage_advice(self.directory, file, self._rebuild))

    def _verify(self, shard: int) -> None:
        """分片 s 的 CRC-32 与 index.json 的记录相符（每个分片只核对一次）；不符时抛点名文件的 TeacherCacheDamaged。"""
        if shard not in self._verified:
            if (problem := _checksum_problem(self.directory, self.index["shards"][shard])) is not None:
                raise self._damaged(*problem)
            self._verified.add(shard)

    def _shard(self, shard: int) -> _ShardMaps:
        """分片 s 的 memmap（最近用过的至多 _OPEN_SHARDS 个保持映射）；第一次用到时先核对校验和。"""
        if shard in self._maps:
            self._maps.move_to_end(shard)
            return self._maps[shard]
        self._verify(shard)
        start, stop = _shard_blocks(shard, self.blocks_per_shard, self.num_blocks)
        shape, names = (stop - start, self.seq_len), _file_names(shard)
        maps = _ShardMaps(
            ids=np.memmap(self.directory / names["ids"], _IDS_DTYPE, "r", shape=(*shape, self.top_k)),
            log_probs=np.memmap(self.directory / names["logprobs"], VALUE_DTYPES[self.value_dtype], "r",
                                shape=(*shape, self.top_k)),
            tail=np.memmap(self.directory / names["tail"], _TAIL_DTYPE, "r", shape=shape),
        )
        self._maps[shard] = maps
        if len(self._maps) > _OPEN_SHARDS:
            self._maps.popitem(last=False)
        return maps

    def targets(self, block_indices: Sequence[int] | np.ndarray | torch.Tensor) -> tuple[torch.Tensor, ...]:
        """块 block_indices 的稀疏目标：(ids int64 (b, L, K), log 概率 float32 (b, L, K), 尾部质量 float32 (b, L))。"""
        blocks = np.asarray(block_indices.cpu() if isinstance(block_indices, torch.Tensor) else block_indices,
                            dtype=np.int64).reshape(-1)
        if blocks.size and (blocks.min() < 0 or blocks.max() >= self.num_blocks):
            raise IndexError(f"block indices must lie in [0, {self.num_blocks}) for the teacher cache "
                             f"{self.directory}, got {blocks[(blocks < 0) | (blocks >= self.num_blocks)][:4].tolist()}")
        shape = (len(blocks), self.seq_len)
        ids = np.empty((*shape, self.top_k), _IDS_DTYPE)
        raw = np.empty((*shape, self.top_k), VALUE_DTYPES[self.value_dtype])
        tail = np.empty(shape, _TAIL_DTYPE)
        for j, block in enumerate(blocks.tolist()):
            shard, row = divmod(block, self.blocks_per_shard)
            maps = self._shard(shard)
            ids[j], raw[j], tail[j] = maps.ids[row], maps.log_probs[row], maps.tail[row]
        log_probs = _decode_values(raw, self.value_dtype)
        self._check_values(blocks, ids, log_probs, tail)
        return (torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(log_probs),
                torch.from_numpy(tail.astype(np.float32)))

    def _check_values(self, blocks: np.ndarray, ids: np.ndarray, log_probs: np.ndarray, tail: np.ndarray) -> None:
        """读出的一批目标的取值范围（teacher_cache_checks.target_problem）；有问题时点名那个块所在的分片文件。"""
        if (problem := target_problem(ids, log_probs, tail, self.real_vocab_size)) is not None:
            kind, row, what = problem
            block = int(blocks[row])
            raise self._damaged(_file_names(block // self.blocks_per_shard)[kind], f"block {block} {what}")


def _check_complete(directory: Path, index: dict[str, Any], rebuild: str) -> None:
    """所有分片都已提交；否则是 “不完整” 的一段话：续建的办法是原样重跑构建。"""
    if not index.get("complete") or any(entry is None for entry in index["shards"]):
        done = sum(entry is not None for entry in index["shards"])
        raise TeacherCacheDamaged(
            directory, INDEX_FILE, f"{done} of {index['num_shards']} shards written",
            summary=f"teacher cache {directory} is incomplete ({done} of {index['num_shards']} shards written)",
            advice=f"its build stopped before the end (or is still running); resume it by rerunning {rebuild}",
        )


def _checksum_problem(directory: Path, entry: dict[str, Any]) -> tuple[str, str] | None:
    """一个已提交分片的文件与 index.json 记录的 CRC-32 是否相符：(文件名, 原因)，相符时为 None。"""
    for name, record in sorted(entry["files"].items()):
        try:
            crc = crc32_file(directory / name)
        except OSError as err:
            return name, f"cannot be read ({err})"
        if crc != record["crc32"]:
            return name, f"checksum {crc:08x} does not match index.json ({record['crc32']:08x}): damaged in place"
    return None
