"""训练器的保存与恢复：原子保存检查点（秩 0 写，各进程交出随机数状态）、从最新检查点逐位一致地装回，
以及“恢复的数据与检查点训练过的内容相同”的核对（按内容指纹，不按路径）。

检查点的文件格式在 ``functional_lm.runs.checkpoint``；这里只决定存什么、何时存、怎样装回训练状态。
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch

from functional_lm.distributed import gather_to_main, on_main
from functional_lm.errors import write_failure
from functional_lm.kd.cache_identity import data_fingerprint, describe, differences
from functional_lm.runs.checkpoint import (
    checkpoint_name,
    load_checkpoint,
    optimizer_from_tensors,
    restore_rng,
    rng_state,
    save_checkpoint,
)
from functional_lm.runs.monitor import StopFlag, say

if TYPE_CHECKING:
    from functional_lm.data.loader import BatchLoader
    from functional_lm.kd.step import Stepper
    from functional_lm.kd.trainer import Run

__all__ = ["Saver", "restore"]


class Saver:
    """原子保存检查点（秩 0 写；各进程交出自己的随机数状态）；同一步不重复保存，写盘失败说成一段话。"""

    def __init__(self, run: Run) -> None:
        self.run = run
        self.data = _data_identity(run.loader)  # 数据的内容指纹：开始时算一次，每个检查点都记下

    def save(self, step: int, stop: StopFlag) -> Optional[Path]:
        last = self.run.result.last_checkpoint
        if last is not None and last.name == checkpoint_name(step):
            return last  # 这一步已经存过了
        info = self.run.stepper.info
        rng = gather_to_main(rng_state(), info)  # 各进程交出自己的随机数状态
        path = on_main(lambda: self._write(step, stop, rng, last), info)  # 秩 0 写；失败传给所有进程
        self.run.result.last_checkpoint = path
        return path

    def _write(self, step: int, stop: StopFlag, rng: Any, last: Optional[Path]) -> Path:
        run, s = self.run, self.run.stepper
        state = {
            "loader": run.loader.state_dict(), "training_config": s.tcfg.to_dict(), "total_steps": run.total,
            "real_vocab_size": s.real_vocab_size, "world_size": s.info.world_size, "data": self.data,
        }
        try:
            with stop.protect():
                return save_checkpoint(
                    run.ckpt_root, step, s.params, s.cfg, s.optimizer, s.names, state,
                    keep_last=s.tcfg.keep_last, tokenizer_dir=run.tokenizer_dir, rng_states=rng,
                )
        except OSError as err:
            raise write_failure(err, f"the checkpoint of step {step}", run.ckpt_root, last) from err


def restore(path: Path, stepper: Stepper, loader: BatchLoader) -> tuple[int, Path]:
    """把检查点装回：参数原地拷贝、优化器状态、数据位置、随机数。返回 (步数, 检查点路径)。

    检查点可以来自不同的进程数：参数与优化器状态是完整的（秩 0 写出），数据位置按“已消耗的块数”换算；
    随机数状态按秩恢复，新增的秩按 (seed, 步数, 秩) 播种。
    """
    saved_cfg, saved, tensors, state = load_checkpoint(path)
    if saved_cfg != stepper.cfg:
        changed = ", ".join(
            f"{k} {v} → {getattr(stepper.cfg, k)}" for k, v in saved_cfg.to_dict().items() if getattr(stepper.cfg, k) != v
        )
        raise ValueError(f"cannot resume from {path}: the student's model config changed ({changed})")
    _check_same_data(path, state, loader)  # 先于数据位置：内容换了时说“数据不同”，而不是块数对不上
    with torch.no_grad():
        for key, value in stepper.params.items():
            value.copy_(saved[key])
    optimizer_from_tensors(stepper.optimizer, tensors, state["optimizer_param_groups"], stepper.names)
    try:
        loader.load_state_dict(state["loader"])
    except ValueError as err:
        raise ValueError(f"cannot resume from {path}: {str(err).removeprefix('cannot resume: ')}") from None
    step = int(state["step"])
    if stepper.tcfg.document_mask and "document_mask" not in state.get("training_config", {"document_mask": None}):
        say(f"[train] note: {path} was written before document_mask existed (attention crossed documents); this "
            "run continues with document_mask=true, which changes the trajectory — pass document_mask=False to "
            "continue exactly as before")
    if not restore_rng(tensors, stepper.info.rank):
        torch.manual_seed(stepper.tcfg.seed * 1_000_003 + step * 1009 + stepper.info.rank)
    return step, path


def _data_identity(loader: BatchLoader) -> Optional[dict[str, Any]]:
    """加载器背后那份分词数据的内容指纹（cache_identity.data_fingerprint，与文件路径无关）；没有 TokenStore 时 None。"""
    store = getattr(getattr(loader, "dataset", None), "store", None)
    return data_fingerprint(store) if store is not None else None


def _check_same_data(path: Path, state: Mapping[str, Any], loader: BatchLoader) -> None:
    """恢复的数据必须与检查点训练过的内容相同（文件可以换了路径或被 touch 过）；旧检查点没有记录时不查。"""
    saved, now = state.get("data"), _data_identity(loader)
    if saved is None or now is None:
        return
    found = differences({"data": saved}, {"data": now})
    if found:
        words = "; ".join(describe(found, "this run", built="the checkpoint was trained on"))
        raise ValueError(
            f"cannot resume from {path}: {words}; resume with the data this run was trained on, or start a new "
            f"run (--overwrite or another --output-dir)"
        )


