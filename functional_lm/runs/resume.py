"""打开一个运行目录时的规矩：新开、恢复（--resume / --resume auto）还是清空重来（--overwrite），以及恢复时
设置的还原与核对。由 ``functional-lm distill`` 在秩 0 上、持有目录锁之后调用（机制见 rundir.py）。

顺序很重要——任何会删东西的决定都放在所有检查之后：
    1. 决定恢复还是新开（不动任何文件）；
    2. 合并设置：新开以预设为底，恢复以 run.json 为底，明确给出的值覆盖；核对改动与全局批；
    3. 需要清空时先做一遍“飞行前检查”（教师的 config.json 读得出、本地数据文件都在），然后才清空；
    4. 最后原子地写出 run.json。
所以 ``--overwrite --alpha 1.5`` 或拼错的 ``--teacher`` 不会先删掉上一次运行再报错。
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

from functional_lm.runs.checkpoint import STATE_JSON, list_checkpoints
from functional_lm.runs.rundir import SETTINGS_FILE, clear_run, read_settings, run_markers, writing
from functional_lm.atomic import write_json_atomic
from functional_lm.errors import RunDirError
from functional_lm.runs.settings import RunSettings, compare_settings, legacy_notes, settings_from_checkpoint

__all__ = ["Opening", "checkpoint_roots", "latest_in", "decide", "open_settings"]

_SUBRUNS = ("", "distilled", "ce_only")  # 真实教师的运行在根目录，演示的两个学生各在一个子目录


@dataclass
class Opening:
    """打开运行目录的决定：是否恢复，是否要先清空（以及清空的原因，用于提示）。"""

    resuming: bool
    clear: bool = False
    reason: str = ""


def checkpoint_roots(out: Path, checkpoint_dir: str) -> list[Path]:
    """运行目录里可能存放检查点的目录（checkpoint_dir 可为相对或绝对路径；去重）。"""
    roots = [out / sub / checkpoint_dir if sub else out / checkpoint_dir for sub in _SUBRUNS]
    return list(dict.fromkeys(roots))


def latest_in(roots: list[Path]) -> Optional[Path]:
    """这些目录里最新写出的完整检查点（按修改时间；演示的两个学生各有一串）。"""
    found = [path for root in roots for path in list_checkpoints(root)]
    return max(found, key=lambda p: (p / STATE_JSON).stat().st_mtime, default=None)


def decide(out: Path, roots: list[Path], resume: Optional[str], overwrite: bool) -> Opening:
    """按 --resume / --overwrite 与目录现状决定怎样打开（只读，不删任何东西）；不能开始时抛 RunDirError。"""
    markers = run_markers(out)
    if overwrite:
        return Opening(False, clear=bool(markers), reason=f"--overwrite ({', '.join(markers)})")
    has_checkpoint = latest_in(roots) is not None
    if resume == "yes":
        if not has_checkpoint:
            raise RunDirError(
                f"--resume: there is no checkpoint to resume from in {out}; check the --output-dir path, or use "
                f"--resume auto to start a new run when there is none"
            )
        return Opening(True)
    if resume == "auto":
        if has_checkpoint:
            return Opening(True)
        reason = f"--resume auto found no checkpoint, so it starts over ({', '.join(markers)})"
        return Opening(False, clear=bool(markers), reason=reason)
    if markers:
        raise RunDirError(
            f"{out} already holds a run ({', '.join(markers)}); continue it with --resume, start over with "
            f"--overwrite (deletes it), or choose another --output-dir"
        )
    return Opening(False)


def _saved_settings(out: Path, roots: list[Path]) -> Optional[dict[str, Any]]:
    """恢复用的设置：run.json；旧版本留下的运行没有它时，从最新检查点还原模型与训练配置（标记 legacy）。"""
    saved = read_settings(out)
    if saved is None and (found := latest_in(roots)) is not None:
        mode = "demo" if (out / "distilled").is_dir() else "distill"
        saved = settings_from_checkpoint(found, mode)
    return saved


def _records_data(checkpoint: Optional[Path]) -> bool:
    """检查点是否记着数据的内容指纹（trainer_state.json 的 "data"）：记着时数据文件可以换路径，内容由训练器核对。"""
    try:
        state = json.loads((checkpoint / STATE_JSON).read_text(encoding="utf-8")) if checkpoint else {}
    except (OSError, ValueError):
        return False  # 读不出的检查点由装回时报错
    return isinstance(state, dict) and isinstance(state.get("data"), dict)


def _report_changes(out: Path, saved: Mapping[str, Any], settings: RunSettings, checkpoint: Optional[Path]) -> None:
    """恢复时：无法恢复的改动拒绝并点名；改变轨迹的改动逐个列出；其余改动简单提一句。
    检查点记着数据的内容指纹时，数据文件换了路径（拷到别处、换了机器）不算无法恢复：内容在装回检查点时核对。"""
    movable = ("data",) if _records_data(checkpoint) else ()
    fixed, trajectory, neutral = compare_settings(saved, settings, movable=movable)
    if fixed:
        raise RunDirError(
            f"cannot resume {out}: {'; '.join(fixed)}. A resumed run keeps the student's architecture, the data "
            f"(files, --seq-len, --text-split, --tokenizer) and the split and order (--split-seed, --val-fraction, "
            f"--seed); start a new run for these (--overwrite or another --output-dir)"
        )
    if trajectory:
        print(f"[distill] resuming with changed settings that alter the training trajectory: {'; '.join(trajectory)}",
              file=sys.stderr)
    if neutral:
        checked = " (the data's content is checked against the checkpoint)" if any(
            t.startswith("data ") for t in neutral) else ""
        print(f"[distill] also changed: {'; '.join(neutral)}{checked}", file=sys.stderr)


def _check_data_present(out: Path, settings: RunSettings, checkpoint: Optional[Path]) -> None:
    """恢复时本地数据文件都还在；不在时（数据挪走了）一段话说明怎样继续，而不是只说文件找不到。"""
    from functional_lm.data.sources import looks_like_path

    missing = [str(item) for item in settings.run.get("data") or []
               if not Path(str(item)).exists() and looks_like_path(str(item))]
    if not missing:
        return
    if _records_data(checkpoint):
        how = ("if it moved, resume with --data NEW_PATH: the checkpoint records the data's content, so a copy at "
               "another path is accepted when its tokens are the same")
    else:
        how = (f"put it back at that path: {checkpoint} predates data fingerprints, so a copy at another path "
               f"cannot be checked against it")
    raise RunDirError(f"cannot resume {out}: its data file {missing[0]} no longer exists; {how}")


def _check_global_batch(checkpoint: Path, settings: RunSettings, world_size: int) -> None:
    """全局批 batch_size × 进程数 × 累积步数 必须与检查点的相同（否则数据位置失去意义）；在写 run.json 之前核对。"""
    loader = json.loads((checkpoint / STATE_JSON).read_text(encoding="utf-8")).get("loader", {})
    saved = int(loader.get("global_batch", loader.get("batch_size", 0)))
    t = settings.training
    now = t.batch_size * world_size * t.gradient_accumulation_steps
    if saved and saved != now:
        raise RunDirError(
            f"cannot resume {checkpoint}: the global batch changed: the checkpoint consumed {saved} blocks per "
            f"optimizer step, this run would consume {now} (batch_size {t.batch_size} × {world_size} process(es) × "
            f"{t.gradient_accumulation_steps} accumulation step(s)); keep batch_size × processes × "
            f"gradient_accumulation_steps equal"
        )


def _preflight(settings: RunSettings) -> None:
    """清空之前先确认新运行至少能开始：教师的 config.json 读得出，本地数据文件都在、扩展名认得。"""
    from functional_lm.data.sources import as_source, looks_like_path

    if settings.mode == "distill":
        from functional_lm.hf import load_config

        load_config(settings.run["teacher"])
    for item in settings.run.get("data") or []:
        if Path(str(item)).exists() or looks_like_path(str(item)):  # 本地文件；hub 上的数据集名不在这里查
            as_source(item, text_split=settings.run.get("text_split", "paragraph"))


def open_settings(
    out: Path, roots: list[Path], opening: Opening, settings_on: Callable[[Optional[Mapping[str, Any]]], RunSettings],
    world_size: int,
) -> RunSettings:
    """合并并核对设置、（需要时）清空旧运行、写出 run.json；返回本次运行的设置。"""
    saved = _saved_settings(out, roots) if opening.resuming else None
    settings = settings_on(saved)
    if saved is not None:
        for note in legacy_notes(saved):
            print(f"[distill] note: {note}", file=sys.stderr)
        _report_changes(out, saved, settings, latest_in(roots))
        _check_data_present(out, settings, latest_in(roots))
        _check_global_batch(latest_in(roots), settings, world_size)
    if opening.clear:
        _preflight(settings)
        clear_run(out, extra_roots=roots)
        print(f"[distill] cleared the previous run in {out}: {opening.reason}", file=sys.stderr)
    with writing("the run settings", out / SETTINGS_FILE):
        write_json_atomic(settings.to_json(), out / SETTINGS_FILE)
    return settings
