"""教师缓存的取值检查与出错时的消息（teacher_cache 与 cache_build 用它们；这里只有纯函数与异常类，不碰磁盘）。

* 构建时：教师给出的 log 概率与尾部质量必须是有限数（``non_finite_rows``）——NaN 权重的教师会写出满是
  NaN 的缓存，蒸馏到第几步才以 “non-finite loss” 停下；在写分片之前就拒绝，代价是对已在手边的张量做一次
  ``isfinite``。
* 导入时：JSON lines 的每一行（``check_row_ids``、``check_row_log_probs``）：id 是真实词表里互不相同的整数，
  log 概率有限、≤ 0 且 Σ exp ≤ 1 + 1e-3；出错时消息以调用方给的 ``文件:行号`` 开头。
* 读取时：每批读出的目标做取值范围检查（``target_problem``）：id ∈ [0, V_real)、log 概率有限且 ≤ 0 + ε、
  尾部质量 ∈ [0 − ε, 1 + ε]（ε = ``ROUNDING``，留给舍入）。float16 把 −∞ 存成 −65504，它是有限数，合法。
  校验和（CRC-32）之外的损坏（例如写入之前就坏了的值）由它发现；一批 b·L·K 个数的向量化比较，与训练一步相比可忽略。
* ``rebuild_command``：出错时建议用户重跑的 ``functional-lm teacher-cache`` 命令，--output-dir 是用户当初给的目录
  （命令行把划分写在它下面的 train/、val/），其余选项取自缓存的指纹；``damage_advice``、``missing_index_advice``、
  ``storage_failure`` 是各种出错情形的那一段话里 “怎么办” 的部分。
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from functional_lm.errors import StorageError, storage_advice, storage_reason

__all__ = [
    "GENERIC_REBUILD",
    "ROUNDING",
    "NonFiniteTeacher",
    "check_row_ids",
    "check_row_log_probs",
    "damage_advice",
    "listed",
    "missing_index_advice",
    "non_finite_rows",
    "rebuild_command",
    "storage_failure",
    "target_problem",
]

GENERIC_REBUILD = "the teacher-cache build that wrote it (same settings, same output directory)"  # 不知道命令时
_INDEX_FILE = "index.json"

ROUNDING = 1e-3  # 取值范围检查的舍入余量：log 概率 ≤ ε，尾部质量 ∈ [−ε, 1 + ε]


def non_finite_rows(log_probs: torch.Tensor, tail: torch.Tensor) -> list[int]:
    """第 0 维上（一批的块）含非有限值（NaN、±∞）的行号：log 概率 (b, L, K) 或尾部质量 (b, L) 中任一处。"""
    finite = torch.isfinite(log_probs).flatten(1).all(dim=1) & torch.isfinite(tail).flatten(1).all(dim=1)
    return torch.nonzero(~finite).flatten().tolist()


def _first_bad_row(bad: np.ndarray) -> int:
    """布尔数组 (b, …) 中第一处为真的行号（第 0 维）。"""
    return int(np.argmax(bad.any(axis=tuple(range(1, bad.ndim)))))


def target_problem(
    ids: np.ndarray, log_probs: np.ndarray, tail: np.ndarray, real_vocab_size: int
) -> tuple[str, int, str] | None:
    """一批读出的目标 (ids (b, L, K)、float32 log 概率 (b, L, K)、尾部质量 (b, L)) 的第一个取值问题：
    (文件种类 "ids" / "logprobs" / "tail", 行号, 说明)；没有问题时为 None。NaN 在比较里总是假，所以用 “不在范围内”。"""
    checks = (
        ("ids", ~((ids >= 0) & (ids < real_vocab_size)), f"holds token ids outside [0, {real_vocab_size}) (the real vocabulary)"),
        ("logprobs", ~np.isfinite(log_probs), "holds log-probabilities that are not finite (NaN or inf)"),
        ("logprobs", ~(log_probs <= ROUNDING), "holds log-probabilities above 0 (probabilities above 1)"),
        ("tail", ~((tail >= -ROUNDING) & (tail <= 1 + ROUNDING)), "holds a tail mass outside [0, 1] (or NaN)"),
    )
    for kind, bad, what in checks:
        if bad.any():
            row = _first_bad_row(bad)
            return kind, row, what
    return None


def check_row_ids(where: str, ids: list[Any], real_vocab_size: int) -> None:
    """一行的 id：整数、落在 [0, real_vocab_size)、互不相同。"""
    bad = [v for v in ids if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < real_vocab_size]
    if bad:
        raise ValueError(f"{where}: ids must be integers in [0, {real_vocab_size}) (the real vocabulary), got {bad[:4]}")
    if len(set(ids)) != len(ids):
        raise ValueError(f"{where}: ids must be distinct (each token once), got duplicates")


def check_row_log_probs(where: str, log_probs: list[Any]) -> None:
    """一行的 log 概率：有限、≤ 0，且 Σ exp ≤ 1 + 1e-3。"""
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in log_probs)
    if not numbers or not all(math.isfinite(v) and v <= 0 for v in log_probs):
        raise ValueError(f"{where}: logprobs must be finite numbers <= 0 (log-probabilities), got {log_probs[:4]}…")
    total = math.fsum(math.exp(v) for v in log_probs)
    if total > 1 + 1e-3:
        raise ValueError(f"{where}: the probabilities sum to {total:.6f} > 1 (exp of logprobs must sum to at most 1)")


def listed(numbers: list[int], limit: int = 8) -> str:
    """错误消息里的一串编号："4"、"0, 1, 2"；太多时只列前 limit 个再注明总数。"""
    shown = ", ".join(str(n) for n in numbers[:limit])
    return shown if len(numbers) <= limit else f"{shown}, … ({len(numbers)} in all)"


def rebuild_command(
    build_dir: str | Path, fingerprint: Mapping[str, Any] | None = None, blocks_per_shard: int | None = None
) -> str:
    """重建（或续建）这个缓存的命令行：``functional-lm teacher-cache --teacher DIR --output-dir C --top-k K …``。

    fingerprint 给出时填上 K、T、块长、文档掩码、值类型（与 blocks_per_shard，续建要求同样的分片布局）；
    教师配置为 null 的缓存是 --import 导入的。教师目录与数据选项不在指纹里，写成占位符并说明照第一次构建给。"""
    fp = dict(fingerprint or {})
    source = "--import FILE" if "teacher_config" in fp and fp["teacher_config"] is None else "--teacher DIR"
    parts = ["functional-lm teacher-cache", source, f"--output-dir {build_dir}", f"--top-k {fp.get('top_k', 'K')}"]
    if fingerprint is not None:
        parts += [f"--temperature {float(fp['temperature']):g}", f"--seq-len {fp['seq_len']}",
                  f"--document-mask {str(bool(fp['document_mask'])).lower()}", f"--value-dtype {fp['value_dtype']}"]
        if blocks_per_shard is not None:
            parts.append(f"--blocks-per-shard {blocks_per_shard}")
    placeholder = source.split()[1]
    if fingerprint is None:
        return f"`{' '.join(parts)} …` (with your {placeholder}, K and data options)"
    return f"`{' '.join(parts)}` ({placeholder} and the data options --data, --val-fraction, … as in the first build)"


def damage_advice(directory: Path, file: str, rebuild: str, reason: str = "") -> str:
    """损坏时的处理办法：删掉坏文件再原样重建——分片文件只重算那个分片，index.json 则整个重建；
    文件本就缺失时不必删，原样重建即可。rebuild：重建命令（rebuild_command）或 GENERIC_REBUILD。"""
    if file == _INDEX_FILE:
        return f"delete {directory / file} and rerun {rebuild}: it rebuilds the whole cache"
    first = f"rerun {rebuild}" if reason == "file is missing" else f"delete {directory / file} and rerun {rebuild}"
    return f"{first}: it recomputes that shard only (or delete the directory {directory} to rebuild everything)"


def missing_index_advice(build_dir: Path | None) -> str:
    """目录里没有 index.json（从没在这里建过缓存，或指错了目录）时的办法：在这里建一个，或指向建好的目录。"""
    how = "functional-lm teacher-cache (or build_teacher_cache)" if build_dir is None else rebuild_command(build_dir)
    return f"build one there with {how}, or point at the directory that a teacher-cache build wrote"


def storage_failure(
    err: OSError, path: Path, directory: Path, committed: tuple[int, int] | None
) -> StorageError:
    """构建时写盘失败 → 一段话：在写哪个文件、为什么（rundir.storage_reason）、留下了什么
    （committed = (已提交的分片数, 分片总数)；None 表示还什么都没写）、怎样继续（原样再建即从那里续建）。"""
    left = "Nothing was written yet." if committed is None else \
        f"The shard being written was discarded; {committed[0]} of {committed[1]} shards are committed and kept."
    return StorageError(
        f"could not write the teacher cache {directory}: writing {path} failed: {storage_reason(err)}. {left} "
        f"{storage_advice(err).capitalize()} and run the same build again: it resumes after the committed shards."
    )


class NonFiniteTeacher(ValueError):
    """构建缓存时教师给出了非有限的输出（NaN / ∞）：属性 blocks（出问题的块号）与 directory（缓存目录）。"""

    def __init__(self, teacher: str, blocks: list[int], directory: Path) -> None:
        self.blocks, self.directory = list(blocks), Path(directory)
        which = f"block {blocks[0]}" if len(blocks) == 1 else f"blocks {listed(blocks)}"
        super().__init__(
            f"{teacher} gives non-finite outputs (NaN or infinite log-probabilities) on {which} of the data "
            f"being cached into {directory}; such targets cannot be used, so nothing was written for them. Check "
            f"the teacher's weights (for NaN or inf) and config — distill refuses such a teacher too"
        )
