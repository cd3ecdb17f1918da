"""运行目录的管理：独占锁、“这里是否已有一次运行”、``--overwrite`` 的清理、中断保存留下的临时目录、
run.json 设置记录，以及把写盘失败（磁盘满、只读）说成一段话。

一次 ``functional-lm distill`` 的运行目录（``--output-dir``）::

    .lock              独占锁文件（flock：进程死亡时由操作系统释放，不会留下“陈旧的锁”），内容是持锁进程的 pid
    run.json           本次运行的全部设置（学生 / 训练配置、教师、数据……）：``--resume`` 据此还原设置
    tokenizer/         训练所用的分词器（连同聊天模板与 generation_config.json），复制进每个检查点与学生
    checkpoints/       step-XXXXXXXX 检查点（演示运行里在 distilled/、ce_only/ 子目录下）
    metrics.jsonl      训练 / 验证记录
    student/           最终学生（Hugging Face 格式）
    report.md          报告与 loss_curve.png

保存总是先写隐藏的临时目录（``.名字.tmp-xxxxxxxx``）再改名，替换已有目录时旧目录先改名为
``.名字.old-xxxxxxxx``、新目录到位后才删除——被杀掉的保存会留下这类目录。持锁之后它们不可能属于
正在进行的保存，``remove_stale_temps`` 在开始时把它们删掉。
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

from functional_lm.config import cache_root
from functional_lm.errors import RunDirError, storage_reason, write_failure
from functional_lm.atomic import write_json_atomic

__all__ = [
    "RUN_MARKERS",
    "SETTINGS_FILE",
    "RunLock",
    "ensure_output_dir",
    "run_markers",
    "clear_run",
    "remove_stale_temps",
    "read_settings",
    "writing",
    "materialize_tokenizer",
]

SETTINGS_FILE = "run.json"
LOCK_FILE = ".lock"
# 这些名字出现在目录里，就说明它已经装着一次运行（演示运行的两个学生在 distilled/ 与 ce_only/ 下）。
RUN_MARKERS = (SETTINGS_FILE, "metrics.jsonl", "checkpoints", "student", "report.md", "loss_curve.png",
               "tokenizer", "distilled", "ce_only")
_STALE = re.compile(r"^\..+\.(?:tmp|old)-[0-9a-f]{8}$")  # 被打断的原子保存留下的隐藏目录
_OLD = re.compile(r"^\.(.+)\.old-[0-9a-f]{8}$")  # 替换时被挪开的旧目录：.名字.old-xxxxxxxx
_STALE_DEPTH = 3  # 运行目录 / 演示子运行 / checkpoints：临时目录最深在第 3 层


# ---------------------------------------------------------------- 写盘失败


@contextlib.contextmanager
def writing(what: str, where: os.PathLike | str, last_good: Optional[Path] = None, *, atomic: bool = True) -> Iterator[None]:
    """``with writing("the final student", path, last_ckpt): ...``：块内的 OSError 变成一段话的 StorageError。"""
    try:
        yield
    except OSError as err:
        raise write_failure(err, what, where, last_good, atomic=atomic) from err


# ---------------------------------------------------------------- 目录检查与锁
def ensure_output_dir(path: os.PathLike | str) -> Path:
    """确认 path 能作为运行目录：不是文件、能创建、能写；任何问题都是一段点名目录的 RunDirError。

    在加载教师之前调用，免得几分钟之后才发现目录不能用。
    """
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise RunDirError(f"output directory {path} exists but is a file; choose another --output-dir")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{uuid.uuid4().hex[:8]}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise RunDirError(
            f"output directory {path} cannot be written: {storage_reason(err)}; choose another --output-dir"
        ) from None
    return path


class RunLock:
    """运行目录上的独占咨询锁（fcntl.flock）：同一目录同时只允许一次运行。

    锁随打开的文件描述符存在，进程死亡（包括 SIGKILL）时由操作系统释放，所以不会有陈旧的锁。
    没有 fcntl 的平台（Windows）上不加锁。
    """

    def __init__(self, directory: os.PathLike | str) -> None:
        self.path = Path(directory) / LOCK_FILE
        self._fd: Optional[int] = None

    def acquire(self) -> "RunLock":
        try:
            import fcntl
        except ImportError:  # pragma: no cover - 非 POSIX 平台
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise RunDirError(
                f"output directory {self.path.parent} is in use by another run (pid {holder}); wait for it to "
                f"finish or choose another --output-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # 关闭描述符即释放 flock；锁文件本身留着无害
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


# ---------------------------------------------------------------- 已有运行、清理
def run_markers(path: os.PathLike | str) -> list[str]:
    """目录里表明“已有一次运行”的条目名（空目录、只有锁文件或只有用户自己的文件时为空列表）。"""
    path = Path(path)
    if not path.is_dir():
        return []
    found = []
    for name in RUN_MARKERS:
        entry = path / name
        if entry.is_file() or (entry.is_dir() and any(entry.iterdir())):
            found.append(name)
    return found


def clear_run(path: os.PathLike | str, *, extra_roots: Iterable[os.PathLike | str] = ()) -> list[str]:
    """``--overwrite``：删掉上一次运行的产物（只删 RUN_MARKERS、检查点与临时目录，用户自己的其他文件不动）。

    extra_roots：运行的检查点目录（--checkpoint-dir 可以是别的名字，甚至在运行目录之外）：运行目录里的
    整个删掉；运行目录外的只删其中的 step-* 检查点。
    """
    from functional_lm.runs.checkpoint import list_checkpoints

    path = Path(path)
    removed = []
    for name in RUN_MARKERS:
        entry = path / name
        if entry.is_dir():
            shutil.rmtree(entry)
            removed.append(name)
        elif entry.exists():
            entry.unlink()
            removed.append(name)
    for root in map(Path, extra_roots):
        inside = root.resolve().is_relative_to(path.resolve())
        for entry in ([root] if inside and root.is_dir() else list_checkpoints(root)):
            shutil.rmtree(entry)
            removed.append(str(entry))
    remove_stale_temps(path)
    return removed


def _walk_stale(directory: Path, depth: int) -> Iterator[Path]:
    """深度优先找出被打断的保存留下的临时目录；不进入完整的检查点与匹配到的目录。"""
    try:
        entries = list(directory.iterdir())
    except OSError:
        return
    for entry in entries:
        if not entry.is_dir() or entry.is_symlink():
            continue
        if _STALE.match(entry.name):
            yield entry
        elif depth > 1 and not entry.name.startswith("step-"):
            yield from _walk_stale(entry, depth - 1)


def remove_stale_temps(path: os.PathLike | str) -> list[Path]:
    """清理运行目录下被打断的保存留下的 ``.名字.tmp-*`` / ``.名字.old-*`` 目录（调用方必须已持有锁）。

    ``.tmp-*`` 是没写完（或没来得及改名）的新目录，直接删除。``.old-*`` 是替换时被挪开的旧目录：
    若同名的新目录已经就位，它是多余的，删除；若进程恰好死在“旧的挪开、新的还没到位”之间，
    它就是这一步唯一的一份，改名回原处而绝不删除。返回被删除的目录。
    """
    removed = []
    for entry in _walk_stale(Path(path), _STALE_DEPTH):
        match = _OLD.match(entry.name)
        target = entry.with_name(match.group(1)) if match else None
        if target is not None and not target.exists():
            os.replace(entry, target)  # 找回唯一的一份
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
    return removed


# ---------------------------------------------------------------- run.json


def read_settings(path: os.PathLike | str) -> Optional[dict[str, Any]]:
    """读运行目录的 run.json；不存在时为 None，损坏时是点名文件的 RunDirError。"""
    file = Path(path) / SETTINGS_FILE
    if not file.is_file():
        return None
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RunDirError(f"{file}: cannot read the run's settings ({err}); fix or delete the file") from None
    if not isinstance(data, dict):
        raise RunDirError(f"{file}: expected a JSON object with the run's settings")
    return data


# ---------------------------------------------------------------- 随学生保存的分词器
def _default_tokenizer_files(tokenizer: Any) -> Path:
    """离线默认分词器导出成 tokenizer.json + tokenizer_config.json（约 4 秒），按指纹缓存，之后直接复用。"""
    from functional_lm.data.tokenizer import save_default_tokenizer
    from functional_lm.atomic import replace_dir

    target = cache_root() / "tokenizer" / f"qwen2.5-{tokenizer.fingerprint[:16]}"
    if (target / "tokenizer.json").is_file() and (target / "tokenizer_config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        save_default_tokenizer(tmp)
        replace_dir(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _generation_config(tokenizer: Any) -> dict[str, Any]:
    """generation_config.json：eos 为分词器的 eos，外加聊天的回合结束符 <|im_end|>（存在时）。"""
    eos = [tokenizer.eos_token_id]
    im_end = tokenizer.token_to_id("<|im_end|>")
    if im_end is not None and im_end not in eos:
        eos.insert(0, im_end)  # 与 Qwen2.5-Instruct 的 generation_config 相同的顺序
    return {"bos_token_id": tokenizer.separator_token_id, "eos_token_id": eos, "pad_token_id": tokenizer.pad_token_id}


def materialize_tokenizer(tokenizer: Any, source: Optional[os.PathLike | str], target: os.PathLike | str) -> Path:
    """把训练所用的分词器（含聊天模板）连同 generation_config.json 原子地写进 target 目录并返回它。

    source 为分词器目录（教师目录或 --tokenizer）时复制其中的分词器文件；为 None（离线默认）时导出。
    之后每个检查点与学生都从这里复制一份，于是任何一个都能独立地 ``generate --prompt``。
    """
    from functional_lm.hf import TOKENIZER_FILES
    from functional_lm.atomic import replace_dir

    target = Path(target)
    origin = Path(source) if source is not None else _default_tokenizer_files(tokenizer)
    origin = origin.parent if origin.is_file() else origin
    tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    try:
        for name in TOKENIZER_FILES:
            if (origin / name).is_file():
                shutil.copyfile(origin / name, tmp / name)
        if not (tmp / "generation_config.json").is_file():
            write_json_atomic(_generation_config(tokenizer), tmp / "generation_config.json")
        replace_dir(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
