"""教师缓存：把教师在打包数据集每个块上的稀疏目标（top-k id、温度 T 下的 log 概率、尾部质量）存到磁盘，
蒸馏时按块号流式读取，不必每一步都跑教师。

磁盘格式（目录 C）
------------------
::

    C/index.json            格式版本、指纹、布局、每个已提交分片的文件字节数与 CRC-32、是否完整
    C/ids-SSSSS.bin         int32   小端 [n, L, K]   top-k token id（按 log 概率从大到小）
    C/logprobs-SSSSS.bin    值类型  小端 [n, L, K]   log P_T(id)，P_T = softmax(z_t / T)（只在真实词表列上）
    C/tail-SSSSS.bin        float32 小端 [n, L]      尾部质量 1 − Σ_topk P_T（由非 top-k 列精确求得）
    C/kind-SSSSS.bin        uint8         [n, L]      只有跨分词器的缓存才有：每个学生位置的目标种类
                                                     （0 只有 CE / 1 映射目标 / 2 ULD，见 kd/cross_cache.py）
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
                           top_k, temperature, value_dtype, real_vocab_size}（见 FINGERPRINT_FIELDS），跨分词器的
                           缓存另有 cross_tokenizer = {mode, teacher_tokenizer, shared_tokens}（CROSS_FIELD）
    num_blocks, blocks_per_shard, num_shards
    shards                长 num_shards 的列表：null 或 {"blocks": [起, 止), "files": {名字: {bytes, crc32}}}
    complete              所有分片都已提交

读取：``TeacherCache.open`` 做便宜的结构检查（index.json 可解析、完整、每个文件都在且字节数与记录和布局相符；
截断的分片点名报错，而不是读成 0）。原地的损坏（大小不变）缺省也会被发现：每个分片**第一次被读到时**把它的
三个文件读一遍核对 CRC-32（每个分片每个进程一次，不是每批一次；代价与实际读到的数据量成正比），每批读出的值
再做取值范围检查（id ∈ [0, V_real)、log 概率有限且 ≤ 0、尾部质量 ∈ [0, 1]，见 kd/cache_checks.py）。
``verify=True`` 在打开时就核对全部分片。数据经 np.memmap 读取。错误都是 ``TeacherCacheDamaged``（ValueError），
写明目录、文件、原因与处理办法（``build_dir`` 给出时建议里是可以照抄的 ``functional-lm teacher-cache`` 命令）。
全程不用 pickle。

构建（``build_teacher_cache``、续建、分片写入器）与外部 top-k 的导入（``import_topk_jsonl``）在
functional_lm/kd/cache_build.py；指纹的字段与比较（``make_fingerprint``、``teacher_weights_fingerprint``、数据的
内容指纹）在 functional_lm/kd/cache_identity.py，这里只留打开缓存时的核对 ``check_fingerprint``。
``TeacherCache.batch_targets`` 给训练器一批现成的目标（已在设备上），训练器因此不必知道文件格式。
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from functional_lm.kd.cache_identity import comparable, data_fingerprint, describe, make_fingerprint
from functional_lm.kd.cache_identity import differences as _differences
from functional_lm.kd.cache_identity import jsonable as _jsonable
from functional_lm.kd.cache_identity import teacher_weights_fingerprint
from functional_lm.data.store import crc32_file
from functional_lm.losses import teacher_topk
from functional_lm.kd.cache_checks import (
    GENERIC_REBUILD,
    damage_advice,
    missing_index_advice,
    rebuild_command,
    target_problem,
)

__all__ = [
    "teacher_targets",
    "stored_log_probs",
    "FINGERPRINT_FIELDS",
    "VALUE_DTYPES",
    "TeacherCache",
    "TeacherCacheDamaged",
    "TeacherCacheMismatch",
    "check_fingerprint",
    "data_fingerprint",
    "make_fingerprint",
    "teacher_weights_fingerprint",
    # 格式的细节，给 cache_build 的写入器：
    "FORMAT", "VERSION", "INDEX_FILE", "IDS_DTYPE", "TAIL_DTYPE", "KIND_DTYPE", "KINDS", "CROSS_KINDS", "CROSS_FIELD",
    "LOGIT_BYTES", "file_kinds",
    "decode_values", "encode_values", "expected_bytes", "file_names", "new_index", "read_index", "shard_blocks",
    "shard_problem",
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
IDS_DTYPE = np.dtype("<i4")
TAIL_DTYPE = np.dtype("<f4")
KIND_DTYPE = np.dtype("u1")
KINDS = ("ids", "logprobs", "tail")
CROSS_KINDS = (*KINDS, "kind")  # 跨分词器的缓存多一个文件：每个位置的目标种类
CROSS_FIELD = "cross_tokenizer"  # 指纹里的可选字段：有它（非 None）即跨分词器的缓存
_TARGET_KINDS = (0, 1, 2)  # KIND_NONE / KIND_MAPPED / KIND_ULD（losses/cross_tokenizer.py）
LOGIT_BYTES = 64 << 20  # 每个行块的 float32 logits 至多 64 MiB（V = 151,936 时约 110 行）
_OPEN_SHARDS = 16  # 读取时同时映射的分片数上限（每个 memmap 占一个文件描述符）：映射进进程的页
# 因此至多是 16 个分片的大小，与缓存总大小无关——比内存大的缓存训练时常驻内存保持平稳
_FLOAT16_MIN = float(np.finfo(np.float16).min)  # −65504

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


# ================================================================================================
# 布局与 index.json
# ================================================================================================


def file_kinds(fingerprint: Mapping[str, Any]) -> tuple[str, ...]:
    """一个缓存每个分片有哪些文件：同词表的三个；跨分词器的（指纹有 cross_tokenizer）再加 kind。"""
    return CROSS_KINDS if fingerprint.get(CROSS_FIELD) else KINDS


def file_names(shard: int, cross: bool = False) -> dict[str, str]:
    """分片 s 的文件名：{"ids": "ids-0000s.bin", ...}；cross 时多一个 "kind"。"""
    return {kind: f"{kind}-{shard:05d}.bin" for kind in (CROSS_KINDS if cross else KINDS)}


def shard_blocks(shard: int, per_shard: int, num_blocks: int) -> tuple[int, int]:
    """分片 s 装的块 [s·B, min((s+1)·B, N))。"""
    return shard * per_shard, min((shard + 1) * per_shard, num_blocks)


def expected_bytes(blocks: int, seq_len: int, top_k: int, value_dtype: str, cross: bool = False) -> dict[str, int]:
    """一个 n 块的分片各文件应有的字节数：ids n·L·K·4，logprobs n·L·K·(2 或 4)，tail n·L·4；cross 时 kind n·L。"""
    cells = blocks * seq_len
    sizes = {
        "ids": cells * top_k * IDS_DTYPE.itemsize,
        "logprobs": cells * top_k * VALUE_DTYPES[value_dtype].itemsize,
        "tail": cells * TAIL_DTYPE.itemsize,
    }
    return sizes | {"kind": cells * KIND_DTYPE.itemsize} if cross else sizes


def new_index(fingerprint: dict[str, Any], num_blocks: int, per_shard: int) -> dict[str, Any]:
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


def read_index(directory: Path, rebuild: str = GENERIC_REBUILD) -> dict[str, Any]:
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


def shard_problem(directory: Path, index: dict[str, Any], shard: int) -> tuple[str, str] | None:
    """已提交分片 s 的结构问题 (文件名, 原因)：记录的字节数与布局不符、文件缺失、实际大小不符；没有问题为 None。"""
    fp, entry = index["fingerprint"], index["shards"][shard]
    start, stop = shard_blocks(shard, index["blocks_per_shard"], index["num_blocks"])
    cross = bool(fp.get(CROSS_FIELD))
    expected = expected_bytes(stop - start, fp["seq_len"], fp["top_k"], fp["value_dtype"], cross)
    files = entry.get("files") if isinstance(entry, dict) else None
    for kind, name in file_names(shard, cross).items():
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


def encode_values(log_probs: torch.Tensor, value_dtype: str) -> np.ndarray:
    """float32 log 概率 → 磁盘数组：float16 先夹到 ≥ −65504（更小的概率本就为 0），bfloat16 取位模式。"""
    x = log_probs.detach().to("cpu", torch.float32)
    if value_dtype == "float16":
        return x.clamp(min=_FLOAT16_MIN).to(torch.float16).numpy().astype(VALUE_DTYPES["float16"], copy=False)
    if value_dtype == "bfloat16":
        bits = x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        return bits.astype(VALUE_DTYPES["bfloat16"], copy=False)
    return x.numpy().astype(VALUE_DTYPES["float32"], copy=False)


def decode_values(raw: np.ndarray, value_dtype: str) -> np.ndarray:
    """磁盘数组 → float32 log 概率（bfloat16 的位模式左移 16 位即 float32）。"""
    if value_dtype == "bfloat16":
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return raw.astype(np.float32)


# ================================================================================================
# 目标：教师隐藏状态 → 缓存里存的值（建缓存与在线 top-k 训练共用）
# ================================================================================================


@torch.no_grad()
def teacher_targets(
    hidden: torch.Tensor, weight32: torch.Tensor, top_k: int, temperature: float, real_vocab_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """教师最终隐藏状态 (…, d) → 展平后每个 token 的 (top-k id, 温度 T 下的 log P, 尾部质量)。

    logits = h·Wᵀ 在 float32 中按行块计算（每块至多 LOGIT_BYTES），再取 teacher_topk。建缓存与在线 top-k
    训练共用这一个函数：同样的隐藏状态得到逐位相同的目标。weight32 是 float32 的输出投影 (V, d)。
    """
    flat = hidden.reshape(-1, hidden.shape[-1]).float()
    rows_per_chunk = max(1, LOGIT_BYTES // (4 * weight32.shape[0]))
    parts = [
        teacher_topk(F.linear(flat[r : r + rows_per_chunk], weight32), top_k,
                     temperature=temperature, real_vocab_size=real_vocab_size)
        for r in range(0, flat.shape[0], rows_per_chunk)
    ]
    ids, log_probs, tail = (torch.cat(p) for p in zip(*parts))
    return ids, log_probs, tail


def stored_log_probs(log_probs: torch.Tensor, value_dtype: str = "float16") -> torch.Tensor:
    """log 概率经过缓存的存储格式再读回（float16 / bfloat16 取整）：在线 top-k 训练用它，
    使“从缓存训练”与“在线 top-k 训练”是同一种数。"""
    decoded = decode_values(encode_values(log_probs, value_dtype), value_dtype)
    return torch.from_numpy(decoded).to(log_probs.device)


# ================================================================================================
# 读取
# ================================================================================================


@dataclass
class _ShardMaps:
    """一个分片的只读 memmap（跨分词器的缓存多一个 kind）。"""

    ids: np.ndarray  # int32 (n, L, K)
    log_probs: np.ndarray  # 值类型 (n, L, K)
    tail: np.ndarray  # float32 (n, L)
    kind: np.ndarray | None = None  # uint8 (n, L)


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
        self.cross: dict[str, Any] | None = self.fingerprint.get(CROSS_FIELD) or None  # 跨分词器的缓存
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
            index = read_index(directory, rebuild_command(build) if build is not None else GENERIC_REBUILD)
        except FileNotFoundError:
            raise _missing_index(directory, build) from None
        rebuild = GENERIC_REBUILD if build is None else \
            rebuild_command(build, index["fingerprint"], index["blocks_per_shard"])
        _check_complete(directory, index, rebuild)
        for shard in range(index["num_shards"]):
            if (problem := shard_problem(directory, index, shard)) is not None:
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
        start, stop = shard_blocks(shard, self.blocks_per_shard, self.num_blocks)
        shape, names = (stop - start, self.seq_len), file_names(shard, self.cross is not None)
        maps = _ShardMaps(
            ids=np.memmap(self.directory / names["ids"], IDS_DTYPE, "r", shape=(*shape, self.top_k)),
            log_probs=np.memmap(self.directory / names["logprobs"], VALUE_DTYPES[self.value_dtype], "r",
                                shape=(*shape, self.top_k)),
            tail=np.memmap(self.directory / names["tail"], TAIL_DTYPE, "r", shape=shape),
            kind=np.memmap(self.directory / names["kind"], KIND_DTYPE, "r", shape=shape) if "kind" in names else None,
        )
        self._maps[shard] = maps
        if len(self._maps) > _OPEN_SHARDS:
            self._maps.popitem(last=False)
        return maps

    def targets(self, block_indices: Sequence[int] | np.ndarray | torch.Tensor) -> tuple[torch.Tensor, ...]:
        """块 block_indices 的稀疏目标：(ids int64 (b, L, K), log 概率 float32 (b, L, K), 尾部质量 float32 (b, L))；
        跨分词器的缓存再加每个位置的目标种类 (kind int64 (b, L))。"""
        blocks = np.asarray(block_indices.cpu() if isinstance(block_indices, torch.Tensor) else block_indices,
                            dtype=np.int64).reshape(-1)
        if blocks.size and (blocks.min() < 0 or blocks.max() >= self.num_blocks):
            raise IndexError(f"block indices must lie in [0, {self.num_blocks}) for the teacher cache "
                             f"{self.directory}, got {blocks[(blocks < 0) | (blocks >= self.num_blocks)][:4].tolist()}")
        shape = (len(blocks), self.seq_len)
        ids = np.empty((*shape, self.top_k), IDS_DTYPE)
        raw = np.empty((*shape, self.top_k), VALUE_DTYPES[self.value_dtype])
        tail = np.empty(shape, TAIL_DTYPE)
        kind = np.empty(shape, KIND_DTYPE) if self.cross is not None else None
        for j, block in enumerate(blocks.tolist()):
            shard, row = divmod(block, self.blocks_per_shard)
            maps = self._shard(shard)
            ids[j], raw[j], tail[j] = maps.ids[row], maps.log_probs[row], maps.tail[row]
            if kind is not None:
                kind[j] = maps.kind[row]
        log_probs = decode_values(raw, self.value_dtype)
        self._check_values(blocks, ids, log_probs, tail, kind)
        out = (torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(log_probs),
               torch.from_numpy(tail.astype(np.float32)))
        return out if kind is None else (*out, torch.from_numpy(kind.astype(np.int64)))

    def batch_targets(
        self, batch: Any, device: torch.device, segment_ids: Any = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """一批训练数据的稀疏目标，已搬到 device 上、可以直接交给损失：按批的块号 ``batch.block_ids`` 读 targets。
        segment_ids 不用（缓存的目标按建缓存时的文档掩码算好；与服务端教师同一个签名）。

        返回 (top-k id int64 (b, L, K), 温度 T 下的 log 概率 float32 (b, L, K), 尾部质量 float32 (b, L))；
        批不带 block_ids 时（不是 BatchLoader 给的批）抛一句话的 ValueError。"""
        if getattr(batch, "block_ids", None) is None:
            raise ValueError("training from a teacher cache needs batches that carry block_ids (BatchLoader gives them)")
        if self.cross is not None:
            raise ValueError(f"teacher cache {self.directory} holds cross-tokenizer targets (its fingerprint has "
                             f"{CROSS_FIELD}); open it with functional_lm.kd.cross_cache.open_teacher_cache, which "
                             f"reads them as CrossTargets")
        return tuple(x.to(device, non_blocking=True) for x in self.targets(batch.block_ids.cpu()))  # type: ignore[return-value]

    def _check_values(self, blocks: np.ndarray, ids: np.ndarray, log_probs: np.ndarray, tail: np.ndarray,
                      kind: np.ndarray | None = None) -> None:
        """读出的一批目标的取值范围（cache_checks.target_problem；跨分词器时 kind ∈ {0, 1, 2}）；有问题时点名那个块
        所在的分片文件。"""
        problem = target_problem(ids, log_probs, tail, self.real_vocab_size)
        if problem is None and kind is not None and (bad := ~np.isin(kind, _TARGET_KINDS)).any():
            problem = "kind", int(bad.reshape(len(blocks), -1).any(-1).argmax()), \
                "holds target kinds outside {0, 1, 2} (CE only / mapped / ULD)"
        if problem is not None:
            file, row, what = problem
            block = int(blocks[row])
            names = file_names(block // self.blocks_per_shard, self.cross is not None)
            raise self._damaged(names[file], f"block {block} {what}")


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
