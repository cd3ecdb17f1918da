"""训练检查点：学生模型（Hugging Face 格式）+ 训练器状态，原子写入，只保留最近 N 个。

目录布局（``<run>/checkpoints/step-00000100/``）::

    config.json, model.safetensors        学生模型，transformers 可直接 from_pretrained
    trainer_state.safetensors             AdamW 的一阶 / 二阶矩与步数（按参数名存），torch 的 RNG 状态
    trainer_state.json                    步数、数据加载器位置、优化器超参数、训练配置等（纯 JSON）

读取训练器状态时只用 safetensors 与 JSON，从不反序列化任意 Python 对象（不用 pickle）。
写入顺序：先写进同级的临时目录（save_pretrained 本身也是原子的），补齐训练器状态并 fsync，
最后一次 rename 改名到最终名字——中断的保存永远不会在最终名字下留下半个检查点。
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import load_file

from functional_lm.config import ModelConfig
from functional_lm.hf import load_pretrained, save_pretrained
from functional_lm.atomic import replace_dir, write_safetensors

__all__ = [
    "STATE_JSON",
    "STATE_TENSORS",
    "checkpoint_name",
    "list_checkpoints",
    "latest_checkpoint",
    "optimizer_to_tensors",
    "optimizer_from_tensors",
    "save_checkpoint",
    "load_checkpoint",
    "restore_rng",
    "rng_state",
]

STATE_JSON = "trainer_state.json"
STATE_TENSORS = "trainer_state.safetensors"
_NAME = re.compile(r"^step-(\d{8})$")
_RNG_KEY = "__rng__/torch"


def checkpoint_name(step: int) -> str:
    """第 step 步的检查点目录名（补零，按名字排序即按步数排序）。"""
    return f"step-{step:08d}"


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    """root 下所有完整的检查点目录，按步数升序（临时目录与缺状态文件的目录不算）。"""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name) and (p / STATE_JSON).is_file()]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(root: str | os.PathLike) -> Optional[Path]:
    """最新的完整检查点；没有时为 None。"""
    found = list_checkpoints(root)
    return found[-1] if found else None


# ---------------------------------------------------------------- 优化器状态 <-> 张量字典
def optimizer_to_tensors(
    optimizer: torch.optim.Optimizer, names: Mapping[int, str]
) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """把优化器状态拆成 (张量字典, 可 JSON 化的参数组超参数)。

    names 把参数张量的 id 映射到参数名；状态张量存为 ``{参数名}/{状态名}``（如 exp_avg），
    这样恢复时不依赖参数在列表中的顺序。
    """
    tensors: dict[str, torch.Tensor] = {}
    groups: list[dict[str, Any]] = []
    for group in optimizer.param_groups:
        hyper = {k: v for k, v in group.items() if k != "params"}
        hyper["params"] = [names[id(p)] for p in group["params"]]
        groups.append(_jsonable(hyper))
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                if not isinstance(value, torch.Tensor):
                    raise ValueError(f"optimizer state {names[id(p)]}/{key} is not a tensor: {value!r}")
                tensors[f"{names[id(p)]}/{key}"] = value.detach().to("cpu", copy=True).contiguous()
    return tensors, groups


def optimizer_from_tensors(
    optimizer: torch.optim.Optimizer,
    tensors: Mapping[str, torch.Tensor],
    groups: list[dict[str, Any]],
    names: Mapping[int, str],
) -> None:
    """把 optimizer_to_tensors 的结果装回一个用同样参数构造的优化器。"""
    if len(groups) != len(optimizer.param_groups):
        raise ValueError(f"checkpoint has {len(groups)} parameter groups, the optimizer has {len(optimizer.param_groups)}")
    for saved, group in zip(groups, optimizer.param_groups):
        current = [names[id(p)] for p in group["params"]]
        if saved["params"] != current:
            raise ValueError("checkpoint parameter groups list different parameters than this model")
        group.update({k: v for k, v in saved.items() if k != "params"})
        for p in group["params"]:
            prefix = f"{names[id(p)]}/"
            state = {k[len(prefix) :]: v.to(p.device) for k, v in tensors.items() if k.startswith(prefix)}
            if state:
                optimizer.state[p] = state


def _jsonable(obj: Any) -> Any:
    """优化器超参数里的元组等转成 JSON 类型（betas 是元组）。"""
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.item()
    return obj


def _restore_tuples(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    for group in groups:
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
    return groups


def _fsync_dir(path: Path) -> None:
    for file in path.iterdir():
        if file.is_file():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _first_non_finite(params: Mapping[str, torch.Tensor]) -> Optional[str]:
    """第一个含 NaN / inf 的参数名；全部有限时为 None。"""
    for key, value in params.items():
        if not torch.isfinite(value).all():
            return key
    return None


# ---------------------------------------------------------------- 保存 / 读取
def save_checkpoint(
    root: str | os.PathLike,
    step: int,
    params: Mapping[str, torch.Tensor],
    cfg: ModelConfig,
    optimizer: torch.optim.Optimizer,
    names: Mapping[int, str],
    state: dict[str, Any],
    *,
    keep_last: int = 3,
    tokenizer_dir: Optional[str | os.PathLike] = None,
    rng_states: Optional[list[dict[str, torch.Tensor]]] = None,
) -> Path:
    """原子地写出第 step 步的检查点并轮换旧检查点，返回最终目录。

    任何参数含 NaN / inf 时拒绝保存（抛 ValueError），保证磁盘上的检查点都是好的。
    """
    bad = _first_non_finite(params)
    if bad is not None:
        raise ValueError(f"refusing to save a checkpoint at step {step}: parameter {bad} is not finite")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_name(step)
    tmp = root / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    detached = {k: v.detach() for k, v in params.items()}
    save_pretrained(detached, cfg, tmp, tokenizer=tokenizer_dir)
    try:
        tensors, groups = optimizer_to_tensors(optimizer, names)
        tensors.update(_rng_tensors(rng_states if rng_states is not None else [rng_state()]))
        write_safetensors(tensors, tmp / STATE_TENSORS)
        payload = dict(state, step=step, optimizer_param_groups=groups)
        (tmp / STATE_JSON).write_text(json.dumps(payload, indent=2, sort_keys=True), encoding="utf-8")
        _fsync_dir(tmp)
        # 同一步再次保存（例如恢复后）：旧目录先改名挪开，新目录到位后才删除——这一步唯一的一份
        # 检查点在替换品就位之前绝不删除。
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: str | os.PathLike) -> tuple[ModelConfig, dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]]:
    """读取检查点，返回 (模型配置, 参数, 训练器张量（含 RNG 状态）, 训练器 JSON 状态)。

    恢复训练时参数被原地拷贝进训练器自己的叶子张量，所以这里不必先克隆一份。
    """
    path = Path(path)
    for name in (STATE_JSON, STATE_TENSORS):
        if not (path / name).is_file():
            raise ValueError(f"{path} is not a trainer checkpoint: {name} is missing")
    cfg, params = load_pretrained(path)  # 与 load_pretrained 相同：张量直接从文件映射读出，不另做整份拷贝
    try:
        tensors = load_file(str(path / STATE_TENSORS))
    except Exception as err:  # safetensors 对损坏文件抛出多种异常
        raise ValueError(f"{path / STATE_TENSORS}: cannot read trainer state ({err})") from err
    try:
        state = json.loads((path / STATE_JSON).read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path / STATE_JSON}: invalid JSON ({err})") from err
    state["optimizer_param_groups"] = _restore_tuples(state.get("optimizer_param_groups", []))
    return cfg, params, tensors, state


def rng_state() -> dict[str, torch.Tensor]:
    """本进程的随机数状态：CPU 上的 torch 生成器，有 CUDA 时再加当前设备的生成器（dropout 用它们）。"""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _rng_key(kind: str, rank: int) -> str:
    """秩 0 的 CPU 状态沿用旧名 ``__rng__/torch``；其余为 ``__rng__/{kind}.{rank}``。"""
    return _RNG_KEY if (kind, rank) == ("torch", 0) else f"__rng__/{kind}.{rank}"


def _rng_tensors(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """各进程（按秩）的随机数状态 → 检查点里的张量。"""
    return {_rng_key(kind, rank): value for rank, state in enumerate(states) for kind, value in state.items()}


def restore_rng(tensors: Mapping[str, torch.Tensor], rank: int = 0) -> bool:
    """恢复本进程（第 rank 个）保存时的随机数状态；检查点里没有这个秩的状态时返回 False（调用方另行播种）。"""
    key = _rng_key("torch", rank)
    if key not in tensors:
        return False
    torch.set_rng_state(tensors[key])
    cuda = _rng_key("cuda", rank)
    if cuda in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors[cuda])
    return True


def finite_or_none(value: float) -> Optional[float]:
    """JSON 里不能写 NaN：非有限值记为 None。"""
    return value if math.isfinite(value) else None
