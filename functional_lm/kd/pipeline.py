"""``functional-lm distill`` 在真实教师（或教师缓存）上运行的流程：读教师与分词器、核对词表与块长、准备数据、
打开教师缓存并核对它的指纹、训练、保存学生（HF 格式，带分词器）并写报告。

命令行（参数、运行目录的锁与恢复）在 ``functional_lm.cli.distill``；没有教师时的离线演示在 ``functional_lm.kd.demo``。
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Optional

from functional_lm.config import ModelConfig, TrainingConfig
from functional_lm.errors import Interrupted
from functional_lm.kd.cross_setup import OWN_TOKENIZER_FAMILIES
from functional_lm.runs.rundir import writing

if TYPE_CHECKING:
    from functional_lm.data.pipeline import DataBundle
    from functional_lm.kd.cross_setup import TokenizerChoice
    from functional_lm.data.tokenizer import Tokenizer
    from functional_lm.distributed import Dist
    from functional_lm.kd.objective import Model
    from functional_lm.kd.teacher_cache import TeacherCache
    from functional_lm.kd.trainer import TrainResult

__all__ = ["run_distill", "tokenizer_source", "OWN_TOKENIZER_FAMILIES"]


def tokenizer_source(run: Mapping[str, Any], teacher_dir: Optional[Path]) -> Optional[Path]:
    """分词器来源：--tokenizer，否则教师目录（有 tokenizer.json 时），否则 None（离线默认）。"""
    if run.get("tokenizer"):
        return Path(run["tokenizer"])
    if teacher_dir is not None and (teacher_dir / "tokenizer.json").is_file():
        return teacher_dir
    return None


def _check_lengths(seq_len: int, student_cfg: ModelConfig, teacher_cfg: Optional[ModelConfig]) -> None:
    for name, cfg in (("student", student_cfg), ("teacher", teacher_cfg)):
        if cfg is not None and seq_len > cfg.max_seq_len:
            raise ValueError(f"--seq-len {seq_len} exceeds the {name}'s max_seq_len={cfg.max_seq_len}")


def _open_teacher_caches(run: Mapping[str, Any]) -> tuple[Optional[TeacherCache], Optional[TeacherCache]]:
    """--teacher-cache C：(C/train, C/val 或 None)，跨分词器的缓存是 CrossTeacherCache；没给时两者都是 None。C 是 teacher-cache 的 --output-dir，
    错误消息里的重建建议据此写出命令；误给了划分目录（C/train）时点名它的上一级。"""
    if not run.get("teacher_cache"):
        return None, None
    from functional_lm.kd.cross_cache import open_teacher_cache

    root = Path(run["teacher_cache"]).expanduser()
    if (root / "index.json").is_file() and not (root / "train").exists():
        raise ValueError(
            f"--teacher-cache {root} holds one split of a teacher cache (its index.json is right there); pass "
            f"--teacher-cache {root.parent}, the directory given to teacher-cache --output-dir, which holds train/ "
            f"and val/"
        )
    val = open_teacher_cache(root / "val", build_dir=root) if (root / "val" / "index.json").is_file() else None
    return open_teacher_cache(root / "train", build_dir=root), val


def _check_top_k(top_k: int, real_vocab_size: int, cache: Optional[TeacherCache]) -> None:
    """--top-k 在分词打包之前核对：不超过真实词表；有教师缓存时必须等于缓存的 K（0 = 取缓存的 K）。"""
    if top_k > real_vocab_size:
        raise ValueError(f"--top-k {top_k} exceeds the vocabulary: the tokenizer has {real_vocab_size} real tokens "
                         f"(1 <= --top-k <= {real_vocab_size}; 0 = the full teacher distribution)")
    if cache is not None and top_k not in (0, cache.top_k):
        raise ValueError(f"--top-k {top_k} differs from the teacher cache's K = {cache.top_k} ({cache.directory}); "
                         f"leave --top-k out to use the cache's K, or build a cache with --top-k {top_k}")


def _check_cache_identity(cache: TeacherCache, tokenizer: Tokenizer, data: DataBundle, tcfg: TrainingConfig) -> None:
    """缓存是为这份数据（按内容，不按路径）、这个分词器、这个划分（val_fraction 与 split_seed）建的：三项指纹逐项
    核对，不符的用文字点名（温度、K 等由训练器核对）。训练的 seed 不在其中：不同 seed 的学生共用一份缓存。"""
    from functional_lm.kd.teacher_cache import check_fingerprint, make_fingerprint

    wanted = make_fingerprint(tokenizer, data.store, teacher_weights=None, split="train",
                              val_fraction=tcfg.val_fraction, split_seed=tcfg.split_seed)
    advice = ("build a cache for this run with `functional-lm teacher-cache` and the same data options (--data, "
              "--seq-len, --val-fraction, --split-seed, --text-split, --tokenizer), or change the run to match "
              "the cache")
    check_fingerprint({k: cache.fingerprint.get(k) for k in wanted}, wanted, cache.directory, store=data.store,
                      who="this run", advice=advice)


def _finish(result: TrainResult, student_cfg: ModelConfig, teacher_info: Optional[dict[str, Any]], tcfg: TrainingConfig,
            run: Mapping[str, Any], out: Path, tok_dir: Path, world_size: int = 1,
            teacher_dir: Optional[Path] = None) -> Path:
    """秩 0：保存最终学生（HF 格式，带分词器）、写报告，再在学生目录写模型卡（README.md）。"""
    from functional_lm.hf import save_pretrained
    from functional_lm.kd.on_policy import ON_POLICY_METRICS
    from functional_lm.runs.report import read_metrics, write_report

    with writing("the final student", out / "student", result.last_checkpoint):
        final = save_pretrained(result.params, student_cfg, out / "student", tokenizer=tok_dir)
    with writing("the report", out / "report.md", result.last_checkpoint):
        write_report(
            out,
            title="functional_lm distillation report",
            configs={"student": student_cfg.to_dict(), "teacher": teacher_info,
                     "training": tcfg.to_dict(), "run": dict(run)},
            final_metrics={"student (distilled)": result.final_eval},
            curves={"distilled student": read_metrics(out)},
            val_key="val_ce",
            reference=("teacher (val CE)", result.final_eval.get("teacher_ce")),
            curve_key="ce",
            eval_keys=ON_POLICY_METRICS,  # 有在线验证指标时另画一张曲线
            notes=[f"student checkpoint: {final}", f"steps: {result.step}/{result.total_steps}"],
        )
    with writing("the model card", final / "README.md", result.last_checkpoint):
        _model_card(final, out, result, student_cfg, teacher_info, tcfg, run, world_size, teacher_dir)
    print(f"student saved to {final}; report: {out / 'report.md'}", file=sys.stderr)
    return final


def _model_card(final: Path, out: Path, result: TrainResult, student_cfg: ModelConfig,
                teacher_info: Optional[dict[str, Any]], tcfg: TrainingConfig, run: Mapping[str, Any],
                world_size: int, teacher_dir: Optional[Path]) -> None:
    """学生目录的模型卡（runs/model_card.py）：教师的名字或路径、它的许可、hub 上的数据集、设置与最终验证。"""
    from functional_lm.runs.model_card import hub_datasets, teacher_license, write_model_card

    info = teacher_info or {}
    base = run.get("teacher") or info.get("served")
    cross = (info.get("cross_tokenizer") or {}).get("mode")
    extra = {"seq_len": run.get("seq_len"), "teacher source": "cache " + str(run["teacher_cache"])
             if run.get("teacher_cache") else "server " + str(run["teacher_url"]) if run.get("teacher_url")
             else "local checkpoint"} | ({"cross_tokenizer": cross} if cross else {})
    data = ", ".join(str(d) for d in run.get("data") or []) or "the embedded corpus (pydoc_data.topics)"
    tokens = result.step * tcfg.batch_size * tcfg.gradient_accumulation_steps * world_size * int(run["seq_len"])
    write_model_card(final, out, title=f"{final.parent.name}: a distilled {student_cfg.family} student",
                     base_model=str(base) if base else None,
                     license=teacher_license(teacher_dir),  # 解析过的目录：hub id 的快照里也有 README.md
                     datasets=hub_datasets(run.get("data")), data=data, training=tcfg.to_dict(), extra=extra,
                     steps=result.step, tokens=tokens, final=result.final_eval, family=student_cfg.family)


def _load_teacher(teacher_dir: Optional[Path], tcfg: TrainingConfig, info: Dist) -> Optional[Model]:
    """教师在 float32 中运行，除非 teacher_bf16（auto：CUDA 上）要 bfloat16——bf16 检查点同样按此转换。"""
    if teacher_dir is None:
        return None
    import torch

    from functional_lm.hf import load_pretrained
    from functional_lm.kd.objective import Model
    from functional_lm.kd.step import teacher_dtype

    teacher_cfg, teacher_params = load_pretrained(teacher_dir, dtype=teacher_dtype(tcfg, info.device) or torch.float32)
    return Model(teacher_params, teacher_cfg)


def run_distill(
    student_cfg: ModelConfig, tcfg: TrainingConfig, run: Mapping[str, Any], out: Path, *, resume: bool,
    progress: bool, info: Optional[Dist] = None,
) -> Path:
    """加载教师与数据，蒸馏，保存学生（HF 格式，带分词器）并写报告；返回运行目录。

    多进程时每个进程都运行它：秩 0 先写分词器、建分词缓存，其余进程复用；只有秩 0 保存学生与报告。
    """
    from functional_lm.distributed import SINGLE
    from functional_lm.hf import load_config, resolve_checkpoint
    from functional_lm.kd.objective import Model
    from functional_lm.kd.trainer import train
    from functional_lm.models.decoder import init_params

    info = info or SINGLE
    teacher_dir = resolve_checkpoint(run["teacher"]) if run.get("teacher") else None
    teacher_cfg = load_config(teacher_dir) if teacher_dir is not None else None
    caches = _open_teacher_caches(run)
    choice, tcfg = _choose_tokenizers(run, tcfg, student_cfg, teacher_dir, teacher_cfg, caches[0], info)
    tok_dir, data = _prepare(run, tcfg, student_cfg, choice, out, progress, info)
    teacher, train_cache, val_cache, tcfg = _target_sources(run, tcfg, choice, data, teacher_dir, caches, info)
    student = Model(init_params(student_cfg, seed=tcfg.seed), student_cfg)
    try:
        result = train(
            student, teacher, data, tcfg, out, resume=resume, real_vocab_size=choice.student.real_vocab_size,
            tokenizer_dir=tok_dir, progress=progress, info=info, teacher_cache=train_cache, val_teacher_cache=val_cache,
        )
    finally:
        if hasattr(train_cache, "close"):  # 服务端教师：停掉在途的请求
            train_cache.close()
    if result.interrupted:
        raise Interrupted(f"saved {result.last_checkpoint} at step {result.step}; continue with --resume")
    if info.is_main:
        teacher_cfg = teacher.cfg if teacher is not None else getattr(getattr(train_cache, "teacher", None), "cfg", None)
        _finish(result, student_cfg, _teacher_info(teacher_cfg, train_cache, run), tcfg, run, out, tok_dir,
                info.world_size, teacher_dir)
    return out


def _choose_tokenizers(run: Mapping[str, Any], tcfg: TrainingConfig, student_cfg: ModelConfig,
                       teacher_dir: Optional[Path], teacher_cfg: Optional[ModelConfig], cache: Any,
                       info: Dist) -> tuple[TokenizerChoice, TrainingConfig]:
    """分词之前的一切核对：服务端教师的温度、缓存的跨分词器设置、两边的分词器与模式、词表契约、块长与 top-k。"""
    from functional_lm.data import check_vocab_compat
    from functional_lm.kd.cross_setup import DEFAULT_CROSS_TOP_K, choose_tokenizers, refuse_cross_combinations

    if run.get("teacher_url") and tcfg.temperature != 1.0:  # 在分词与加载之前拒绝（理由见 served.py）
        raise ValueError(
            f"--temperature {tcfg.temperature:g} with --teacher-url {run['teacher_url']}: a server returns "
            f"log-probabilities at T = 1 and the distribution at another temperature cannot be recovered exactly "
            f"from its top-k values (that needs every logit); use --temperature 1, or a local --teacher DIR")
    if cache is not None:  # 缓存决定跨分词器与否（它的目标已在学生的位置上）：设置只需与它一致
        from functional_lm.kd.cross_cache import check_cross_cache_run

        check_cross_cache_run(run, cache)
    choice = choose_tokenizers(_student_side(run) if cache is not None else run, teacher_dir, teacher_cfg,
                               student_cfg)
    if choice.cross:
        refuse_cross_combinations(run, tcfg, info)
        tcfg = tcfg.replace(top_k=tcfg.top_k or DEFAULT_CROSS_TOP_K)
    # 词表契约与块长：在加载任何权重之前拒绝不相容的组合（跨分词器时教师的词表另有核对，见 cross_setup）。
    check_vocab_compat(choice.student, student_cfg.vocab_size,
                       None if teacher_cfg is None or choice.cross else teacher_cfg.vocab_size)
    _check_lengths(int(run["seq_len"]), student_cfg, teacher_cfg)
    _check_top_k(tcfg.top_k, choice.student.real_vocab_size, cache)
    return choice, tcfg


def _prepare(run: Mapping[str, Any], tcfg: TrainingConfig, student_cfg: ModelConfig, choice: TokenizerChoice,
             out: Path, progress: bool, info: Dist) -> tuple[Path, DataBundle]:
    """秩 0 写出学生的分词器并分词（写 token 缓存），其余进程复用；返回 (分词器目录, 数据)。"""
    from functional_lm.data import prepare_data
    from functional_lm.distributed import main_first, on_main
    from functional_lm.runs.rundir import materialize_tokenizer

    def write_tokenizer() -> Path:
        with writing("the tokenizer files", out / "tokenizer"):
            return materialize_tokenizer(choice.student, choice.student_source, out / "tokenizer")

    tok_dir = on_main(write_tokenizer, info)
    with main_first(info):
        data = prepare_data(
            run.get("data"), tokenizer=choice.student, seq_len=int(run["seq_len"]), batch_size=tcfg.batch_size,
            val_fraction=tcfg.val_fraction, seed=tcfg.seed, cache_dir=run.get("cache_dir"),
            model_config=student_cfg, progress=progress and info.is_main,
            text_split=run.get("text_split", "paragraph"), split_seed=tcfg.split_seed,
        )
    return tok_dir, data


def _target_sources(run: Mapping[str, Any], tcfg: TrainingConfig, choice: TokenizerChoice, data: DataBundle,
                    teacher_dir: Optional[Path], caches: tuple[Any, Any], info: Dist) -> tuple[Any, ...]:
    """目标从哪里来：(教师模型或 None, 训练的目标来源, 验证的目标来源, tcfg)。教师缓存（核对它是为这份数据
    建的）、服务端教师、本地教师；跨分词器时后两者包成按批对齐的来源（kd/cross_served.py、kd/cross_teacher.py）。"""
    from functional_lm.kd.cross_setup import check_cross_data, open_cross_teacher

    train_cache, val_cache = caches
    if train_cache is not None:
        _check_cache_identity(train_cache, choice.student, data, tcfg)
        tcfg = tcfg.replace(top_k=tcfg.top_k or train_cache.top_k)  # top_k 缺省取缓存的 K
    if run.get("teacher_url"):  # 跨分词器时服务器的 id 是教师词表的
        from functional_lm.kd.served import open_served_teacher

        vocab = (choice.teacher if choice.cross else choice.student).real_vocab_size
        train_cache = open_served_teacher(run, tcfg.top_k, vocab, int(run["seq_len"]))
    if choice.cross:
        check_cross_data(choice, data)  # 在加载教师权重之前
    if choice.cross and train_cache is not None:  # 服务端教师：按批对齐，教师流发给服务器
        from functional_lm.kd.cross_served import ServedCrossTeacher

        train_cache = val_cache = ServedCrossTeacher(train_cache, choice.student, choice.teacher, choice.vocab_map,
                                                     choice.mode, tcfg)
    teacher = _load_teacher(teacher_dir, tcfg, info)
    if choice.cross and teacher is not None:  # 教师成为一个目标来源：按批对齐，在自己的 token 流上前向
        return None, *([open_cross_teacher(teacher, choice, tcfg, info)] * 2), tcfg
    return teacher, train_cache, val_cache, tcfg


def _student_side(run: Mapping[str, Any]) -> dict[str, Any]:
    """从教师缓存训练时选分词器用的设置：去掉教师一侧的（--teacher-tokenizer、--cross-tokenizer 已与缓存核对过）。"""
    return {k: v for k, v in run.items() if k not in ("teacher_tokenizer", "cross_tokenizer")}


def _teacher_info(teacher_cfg: Optional[ModelConfig], source: Any, run: Mapping[str, Any]) -> Optional[dict[str, Any]]:
    """报告里的教师：本地教师的配置；服务端教师的模型名与地址；否则教师缓存指纹里记的配置。跨分词器时
    （本地、服务端或缓存）另加对齐的统计（cross_tokenizer）。"""
    if teacher_cfg is not None:
        config = teacher_cfg.to_dict()
    elif run.get("teacher_url"):
        config = {"served": source.model, "url": run["teacher_url"]}
    else:
        config = source.fingerprint.get("teacher_config")
    if hasattr(source, "summary"):
        return (config or {}) | {"cross_tokenizer": source.summary()}
    return config
