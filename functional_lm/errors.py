"""本包抛出的错误类型（地面层：只依赖标准库）。

每个错误的消息都是完整的一段话（哪个文件 / 字段 / 参数、期待什么、怎么办），命令行照印，不打印回溯：

    ValueError 的子类   输入或环境的问题，退出码 2：RunDirError、DataError、CacheDamagedError、CacheWriteError
    RunFailure         运行中途的失败，退出码 1：NonFiniteLossError、PeerLost、StorageError（写盘失败）
    Interrupted        SIGINT / SIGTERM 之后已保存并停下，退出码 130（KeyboardInterrupt 的子类）
    其他               NonFiniteLogits（generate）、PeerFailure（非秩 0 进程安静退出）

只属于教师缓存的错误（TeacherCacheDamaged、TeacherCacheMismatch、NonFiniteTeacher）和它们的消息一起留在
``functional_lm.kd.teacher_cache`` / ``functional_lm.kd.cache_checks``：消息要用到缓存格式的知识。
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Optional

__all__ = [
    "RunDirError",
    "Interrupted",
    "RunFailure",
    "NonFiniteLossError",
    "PeerLost",
    "PeerFailure",
    "StorageError",
    "storage_reason",
    "storage_advice",
    "write_failure",
    "DataError",
    "CacheDamagedError",
    "CacheWriteError",
    "NonFiniteLogits",
]

# 磁盘满 / 超配额 / 文件过大，与只读 / 没有权限：各给一句可以照做的建议。
_DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_READ_ONLY = {errno.EROFS, errno.EACCES, errno.EPERM}


# ---------------------------------------------------------------- 运行
class RunDirError(ValueError):
    """运行目录不可用：是文件、不可写、已有运行、被另一个进程占用……（消息是一整段说明）。"""


class Interrupted(KeyboardInterrupt):
    """SIGINT / SIGTERM 之后，训练已保存进度并停下；消息说明保存在哪、怎样继续。命令行以退出码 130 结束。

    是 KeyboardInterrupt 的子类：和 Ctrl-C 一样穿过一般的 ``except Exception``，一直传到命令行入口。
    """


class RunFailure(RuntimeError):
    """运行中途的失败（不是输入错误）：消息是完整的一段话，命令行照印、退出码 1。"""


class NonFiniteLossError(RunFailure):
    """损失或梯度出现 NaN / inf：训练停止，消息中给出步数与最后一个好的检查点。"""


class TeacherUnavailable(RunFailure):
    """教师（服务端教师）在训练中途不再应答：训练器存下这一步之前的进度（检查点），消息说明怎样续训。"""


class PeerLost(RunFailure):
    """另一个进程死了或连不上：集合通信失败（gloo 立刻发现断开的连接，NCCL 等到超时）。"""


class PeerFailure(RuntimeError):
    """秩 0 上的一步失败了（它已经打印了原因）；其余进程以这个异常安静地退出。"""


# ---------------------------------------------------------------- 写盘失败
class StorageError(RunFailure):
    """写盘失败（磁盘满、配额、只读）：消息说明在写什么、写到哪里、最后一个完好的检查点。"""


def storage_reason(err: OSError) -> str:
    """OSError → 人话：磁盘满 / 只读 / 其他（附 errno 名）。"""
    code = err.errno
    name = errno.errorcode.get(code, str(code)) if code is not None else "?"
    if code in _DISK_FULL:
        what = "the disk is full (or a size/quota limit was reached)"
    elif code in _READ_ONLY:
        what = "the location is read-only or not writable"
    else:
        what = err.strerror or str(err)
    return f"{what} [{name}]"


def storage_advice(err: OSError) -> str:
    """按写盘失败的原因给的处理办法：磁盘满就腾空间，其余（只读、无权限……）就让位置可写。"""
    return "free some space" if err.errno in _DISK_FULL else "make the location writable"


def write_failure(
    err: OSError, what: str, where: os.PathLike | str, last_good: Optional[Path] = None, *, atomic: bool = True
) -> StorageError:
    """把写盘时的 OSError 包成一段话：写的是什么、写到哪、为什么失败、留下了什么、最后一个完好的检查点在哪。

    atomic：这次写入是否原子（临时文件再改名）——是则什么都没留下；否（追加写指标）则最后一行可能被截断，
    恢复时会丢掉它。建议按原因给：磁盘满就腾空间，只读就换个能写的地方。
    """
    left = "Nothing half-written was left in place." if atomic else \
        f"The last line of {where} may be cut off; it is dropped when the run resumes."
    advice = storage_advice(err)
    good = (
        f"The last good checkpoint is {last_good}; {advice} and continue with --resume."
        if last_good is not None
        else f"No checkpoint had been written yet; {advice} and start again."
    )
    return StorageError(f"could not write {what} to {where}: {storage_reason(err)}. {left} {good}")


# ---------------------------------------------------------------- 数据与 token 缓存
class DataError(ValueError):
    """输入数据错误；``str()`` 形如 ``path:line: message``。"""

    def __init__(self, path: str, line: int, message: str) -> None:
        self.path, self.line, self.message = str(path), line, message
        super().__init__(f"{self.path}:{line}: {message}")


class CacheDamagedError(ValueError):
    """缓存目录损坏（index.json 读不出、文件缺失、大小 / 校验和 / 偏移不符、id 越界）。

    属性：directory（缓存目录）、file（出问题的文件名，如 "tokens.bin"）、reason（原因）。
    build_token_cache 遇到它会自动重建；直接 TokenStore.open 时它告诉用户怎样重建。
    """

    def __init__(self, directory: str | Path, file: str, reason: str) -> None:
        self.directory, self.file, self.reason = Path(directory), file, reason
        super().__init__(
            f"token cache {self.directory} is damaged ({file}: {reason}); rebuild it by deleting the "
            f"directory {self.directory} and preparing the data again (build_token_cache / prepare_data "
            f"rebuild a damaged cache automatically)"
        )


class CacheWriteError(ValueError):
    """写 token 缓存时的 OSError（磁盘满、只读、没有权限 …），换成写明缓存目录与所写内容的一段话。

    属性：directory（缓存目录）、what（正在写的东西）、errno（原始 OSError 的 errno，可能为 None）。
    """

    def __init__(self, directory: str | Path, what: str, error: OSError) -> None:
        self.directory, self.what, self.errno = Path(directory), what, error.errno
        reason = error.strerror or str(error)
        if error.errno in _DISK_FULL:
            advice = "free some disk space, or point the cache elsewhere (cache_dir / FUNCTIONAL_LM_CACHE)"
        elif error.errno in _READ_ONLY:
            advice = "the directory is read-only or not writable; point the cache at a writable directory"
        else:
            advice = "check the directory, or point the cache elsewhere (cache_dir / FUNCTIONAL_LM_CACHE)"
        super().__init__(
            f"cannot write the token cache in {self.directory} while writing {what}: {reason}; {advice}"
        )


# ---------------------------------------------------------------- 模型输出
class NonFiniteLogits(RuntimeError):
    """模型给出了 NaN / inf 的 logits（权重坏了，或数值在所选 dtype 中溢出）；in_prompt 表示在提示上就已如此。"""

    def __init__(self, in_prompt: bool) -> None:
        where = "on the prompt" if in_prompt else "while generating"
        super().__init__(f"the model produced non-finite logits (NaN or inf) {where}")
        self.in_prompt = in_prompt
