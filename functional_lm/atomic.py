"""文件的提交（地面层）：fsync、原子替换目录、原子写 JSON、写 safetensors——本包只在这里把文件落盘。

原子的意思：先写同目录的隐藏临时文件 / 目录（``.名字.tmp-xxxxxxxx``）并 fsync，再 ``os.replace`` 改名；
替换已有目录时旧目录先改名为 ``.名字.old-xxxxxxxx``，新目录到位后才删除。被杀掉的写入因此只留下隐藏的临时项，
从不留下半个文件（``functional_lm.runs.rundir.remove_stale_temps`` 在下次运行开始时清掉它们）。
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:  # 运行时不导入 torch：命令行在导入 torch 之前就要用到本模块（原子写 run.json）
    from torch import Tensor

__all__ = ["fsync_path", "replace_dir", "write_json_atomic", "write_safetensors", "write_text_atomic"]


def fsync_path(path: Path) -> None:
    """把文件（或目录项）刷到磁盘；不支持目录 fsync 的平台上静默跳过。"""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_safetensors(tensors: Mapping[str, Tensor], file: Path, metadata: Optional[dict[str, str]] = None) -> None:
    """写一个 safetensors 文件并 fsync。

    safetensors 把写盘失败（磁盘满、文件过大……）报成 SafetensorError("... (os error 28)")；这里还原成
    带 errno 的 OSError，调用方因此能像对待任何写盘失败一样说清楚“磁盘满了”。
    """
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file(dict(tensors), str(file), metadata=metadata)
    except SafetensorError as err:
        code = re.search(r"os error (\d+)", str(err))
        if code is None:
            raise
        number = int(code.group(1))
        raise OSError(number, os.strerror(number), str(file)) from err
    fsync_path(file)


def replace_dir(tmp: Path, target: Path) -> None:
    """把写好的临时目录换到目标名：已有目标先改名挪开，换好后再删除旧的。"""
    if target.exists() and not target.is_dir():
        raise ValueError(f"save_pretrained: {target} exists and is not a directory")
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(target, old)
    try:
        os.replace(tmp, target)
    except BaseException:
        if old is not None:
            os.replace(old, target)  # 换不上就把旧的放回原处
        raise
    fsync_path(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_text_atomic(text: str, file: os.PathLike | str) -> Path:
    """原子地写文本（UTF-8）：先写同目录的临时文件并 fsync，再改名；中途失败时旧文件原样。"""
    file = Path(file)
    tmp = file.with_name(f".{file.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, file)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return file


def write_json_atomic(data: Any, file: os.PathLike | str) -> Path:
    """原子地写 JSON：先写同目录的临时文件并 fsync，再改名。"""
    return write_text_atomic(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n", file)
