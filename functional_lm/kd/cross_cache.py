"""跨分词器的教师缓存：教师与学生的分词器不同时，把**已经对齐、映射到学生位置上的目标**存盘。

存什么（两种做法，选了第二种）
------------------------------
1. 教师在自己 token 流上的 top-k + 对齐表，训练时再映射。映射目标要的是教师的**完整**分布：未映射质量
   U = Σ_{t: map(t) = −1} P_T(t) 与链式法则的 P_T(t_r | t₁…t_{r−1})（t_r 常常不在 top-k 里）都从 top-k 算不出来，
   所以这种缓存只能近似在线蒸馏；还要多存对齐（每个学生位置的教师行、链式法则的内层行）。
2. **映射后的目标，按学生的位置**（这里的做法）：与同词表缓存同一个布局（ids、logprobs、tail，学生的块号与位置），
   再加每个位置一个字节的目标种类 kind（0 只有 CE / 1 映射目标 / 2 ULD）。MAPPED 行是学生 id 上的 log P̃ 与尾部，
   ULD 行是教师自己降序的 top-k log P_T（ids 一栏是 0 … k−1 占位）。内容与在线跨分词器蒸馏
   （kd/cross_teacher.py）逐位相同的一步算出：同一个 ``CrossTokenizerTeacher.batch_targets``。

每个学生 token 的字节数：K·4（ids）+ K·2（float16 log 概率）+ 4（尾部）+ 1（kind）= 6K + 5；K = 64 时 389 字节，
与同词表缓存（6K + 4）只差 1 字节。

值的取整：MAPPED 行在线时就按 float16 取整（与同词表的在线 top-k 同一种数）；ULD 行在线不取整，缓存按
value_dtype 存（float16 误差 ≤ 2⁻¹¹·|log p|；要逐位一致用 --value-dtype float32）。

指纹：同词表缓存的字段（tokenizer 是**学生**的分词器，real_vocab_size 是学生的真实词表），再加
``cross_tokenizer = {mode, teacher_tokenizer（教师分词器的指纹）, shared_tokens（词表映射共有的 token 数）}``。
``open_teacher_cache`` 见到这个字段就给出 ``CrossTeacherCache``：batch_targets 读出 CrossTargets，训练与验证走
跨分词器的损失，xtok_* 比例照常写进 metrics.jsonl。
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch

from functional_lm.kd.cache_build import BuildStatus, full_fingerprint, run_build
from functional_lm.kd.cache_checks import NonFiniteTeacher, non_finite_rows
from functional_lm.kd.cross_source import CrossTargetSource
from functional_lm.kd.cross_targets import CrossTargets
from functional_lm.kd.teacher_cache import CROSS_FIELD, TeacherCache

if TYPE_CHECKING:
    from functional_lm.data.loader import Batch
    from functional_lm.kd.cross_served import ServedCrossTeacher
    from functional_lm.kd.cross_teacher import CrossTokenizerTeacher

__all__ = ["CrossTeacherCache", "open_teacher_cache", "build_cross_teacher_cache", "cross_fingerprint",
           "check_cross_cache_run"]


class CrossTeacherCache(TeacherCache, CrossTargetSource):
    """跨分词器的教师缓存（open_teacher_cache 按指纹给出）：每批读出 CrossTargets，并统计 xtok_* 比例。"""

    def __init__(self, directory: Path, index: dict[str, Any], rebuild: str) -> None:
        super().__init__(directory, index, rebuild)
        self.mode: str = self.cross["mode"]
        self.document_mask: bool = bool(self.fingerprint["document_mask"])

    def batch_targets(self, batch: Batch, device: torch.device, segments: Optional[torch.Tensor] = None,
                      count: bool = True) -> CrossTargets:  # type: ignore[override]
        """按批的块号读目标（segments 不用：建缓存时已按它的文档掩码对齐）；count=False 时不计入统计（验证用）。"""
        if getattr(batch, "block_ids", None) is None:
            raise ValueError("training from a teacher cache needs batches that carry block_ids (BatchLoader gives them)")
        ids, log_p, tail, kind = (x.to(device, non_blocking=True) for x in self.targets(batch.block_ids.cpu()))
        targets = CrossTargets(ids, log_p, tail, kind)
        if count:
            self.count(targets, batch)
        return targets

    def summary(self) -> dict[str, Any]:
        """报告用：模式、词表映射共有的 token 数、整个运行的三个比例、缓存目录。"""
        return {"mode": self.mode, "vocabulary": f"{self.cross['shared_tokens']:,} teacher tokens share their bytes "
                f"with a student token", "teacher_cache": str(self.directory), **self.fractions()}


def open_teacher_cache(directory: str | Path, *, verify: bool = False,
                       build_dir: str | Path | None = None) -> TeacherCache:
    """打开任一种教师缓存（参数同 ``TeacherCache.open``）：指纹里有 cross_tokenizer 时是 CrossTeacherCache。"""
    cache = TeacherCache.open(directory, verify=verify, build_dir=build_dir)
    if cache.cross is None:
        return cache
    return CrossTeacherCache.open(directory, verify=False, build_dir=build_dir)  # 结构检查很便宜：再做一次


def cross_fingerprint(source: CrossTokenizerTeacher | ServedCrossTeacher) -> dict[str, Any]:
    """指纹的 cross_tokenizer 字段：模式、教师分词器的指纹、共有 token 数（都不含路径：换个目录仍认得）。"""
    return {"mode": source.mode, "teacher_tokenizer": str(source.aligner.teacher.fingerprint),
            "shared_tokens": int(source.vocab_map.shared)}


def _teacher_config(source: Any) -> dict[str, Any]:
    """指纹里的教师：本地教师的配置；服务端教师（kd/cross_served.py）的模型名（同一个模型换了地址仍认得）。"""
    teacher = getattr(source, "teacher", None)
    return teacher.cfg.to_dict() if teacher is not None else {"served_model": source.model}


def _producer(source: CrossTokenizerTeacher | ServedCrossTeacher, dataset: Any, document_mask: bool, batch_size: int,
              device: torch.device, teacher: str, where: Path) -> Callable[[int, int], Iterator[tuple[Any, ...]]]:
    """分片内按固定的 batch_size 从头切批（批划分只取决于分片）；每批的目标就是在线跨分词器蒸馏的那一个函数给的。"""
    from functional_lm.data.loader import Batch

    def produce(start: int, stop: int) -> Iterator[tuple[Any, ...]]:
        for first in range(start, stop, batch_size):
            blocks = range(first, min(first + batch_size, stop))
            arrays = [torch.from_numpy(a) for a in dataset.examples(blocks, document_mask)]
            batch = Batch(arrays[0].long(), arrays[1].long(), arrays[2].bool(), arrays[3].long())
            got = source.batch_targets(batch, device, batch.segment_ids if document_mask else None, count=False)
            if bad := non_finite_rows(got.log_p, got.tail):
                raise NonFiniteTeacher(teacher, [blocks[i] for i in bad], where)
            yield got.ids.cpu().numpy(), got.log_p, got.tail, got.kind

    return produce


def build_cross_teacher_cache(
    source: CrossTokenizerTeacher | ServedCrossTeacher, dataset: Any, out_dir: str | Path, *, fingerprint: Mapping[str, Any],
    document_mask: bool = True, batch_size: int = 4, blocks_per_shard: int = 64, device: str | torch.device = "cpu",
    value_dtype: str = "float16", progress: bool = True, stop: Callable[[], bool] | None = None,
    teacher_name: str | None = None,
) -> BuildStatus:
    """在 out_dir 建（或续建）跨分词器的教师缓存（格式见模块说明；续建、中断、写盘失败的规矩同 build_teacher_cache）。

    source：``CrossTokenizerTeacher``（教师已在 device 上）或 ``ServedCrossTeacher``（服务端教师），top_k、温度取它的；dataset：学生分词打包的
    ``PackedDataset``；fingerprint：``make_fingerprint(学生分词器, store, teacher_weights=…, split=…)``。"""
    from functional_lm.kd.cache_build import check_build_args

    check_build_args(source.top_k, source.temperature, value_dtype, source.student_real_vocab, batch_size)
    derived = {
        "seq_len": dataset.seq_len, "document_mask": bool(document_mask),
        "teacher_config": _teacher_config(source), "top_k": source.top_k,
        "temperature": float(source.temperature), "value_dtype": value_dtype,
        "real_vocab_size": source.student_real_vocab, CROSS_FIELD: cross_fingerprint(source),
    }
    where = Path(out_dir).expanduser()
    name = f"the teacher {teacher_name}" if teacher_name else "the teacher"
    producer = _producer(source, dataset, bool(document_mask), batch_size, torch.device(device), name, where)
    return run_build(out_dir, full_fingerprint(fingerprint, derived), len(dataset), blocks_per_shard, producer,
                     progress, stop, getattr(dataset, "store", None))


def check_cross_cache_run(run: Mapping[str, Any], cache: TeacherCache) -> None:
    """distill --teacher-cache C 的跨分词器设置与缓存对得上：--cross-tokenizer（auto 或缓存的模式）与
    --teacher-tokenizer（给了时与缓存记下的教师分词器相同）；同词表的缓存配 hybrid / uld 也一段话拒绝。"""
    mode = run.get("cross_tokenizer") or "auto"
    if cache.cross is None:
        if mode in ("hybrid", "uld") or run.get("teacher_tokenizer"):
            what = f"--cross-tokenizer {mode}" if mode != "auto" else f"--teacher-tokenizer {run['teacher_tokenizer']}"
            raise ValueError(
                f"{what} with --teacher-cache {cache.directory}: that cache holds same-vocabulary targets (its teacher "
                f"used the student's tokenizer); build a cross-tokenizer cache with `functional-lm teacher-cache "
                f"--teacher DIR --teacher-tokenizer NAME`, or drop {what.split()[0]}")
        return
    cached = cache.cross["mode"]
    if mode not in ("auto", cached):
        raise ValueError(
            f"--cross-tokenizer {mode} with --teacher-cache {cache.directory}, whose targets were aligned for "
            f"--cross-tokenizer {cached} (its index.json, field {CROSS_FIELD}): the kind of target of every position "
            f"is fixed when the cache is built; use --cross-tokenizer {cached} (or auto), or build a cache with "
            f"`functional-lm teacher-cache ... --cross-tokenizer {mode}`")
    if run.get("teacher_tokenizer"):
        from functional_lm.data.vocab_bytes import load_teacher_tokenizer

        given = load_teacher_tokenizer(run["teacher_tokenizer"])
        if str(given.fingerprint) != cache.cross["teacher_tokenizer"]:
            raise ValueError(
                f"--teacher-tokenizer {run['teacher_tokenizer']} differs from the tokenizer the teacher cache "
                f"{cache.directory} was aligned with (its vocabulary fingerprint is another); the cache's targets are "
                f"already on the student's tokens, so --teacher-tokenizer can be left out")
