"""磁盘 token 缓存的两类错误，供 cache / store 抛出、命令行捕获。

两者都是 ValueError 的子类：命令行把 ValueError 当作“输入或环境有问题”，只打印一段消息、退出码 2，
不打印回溯。消息本身是完整的一段话（哪个目录、哪个文件、出了什么事、怎么办），不依赖回溯链。
"""

from __future__ import annotations

import errno as _errno
from pathlib import Path

__all__ = ["CacheDamagedError", "CacheWriteError"]

# 磁盘满 / 超配额 / 文件过大，与只读 / 没有权限：各给一句可以照做的建议。
_FULL = {_errno.ENOSPC, _errno.EDQUOT, _errno.EFBIG}
_READ_ONLY = {_errno.EROFS, _errno.EACCES, _errno.EPERM}


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
        if error.errno in _FULL:
            advice = "free some disk space, or point the cache elsewhere (cache_dir / FUNCTIONAL_LM_CACHE)"
        elif error.errno in _READ_ONLY:
            advice = "the directory is read-only or not writable; point the cache at a writable directory"
        else:
            advice = "check the directory, or point the cache elsewhere (cache_dir / FUNCTIONAL_LM_CACHE)"
        super().__init__(
            f"cannot write the token cache in {self.directory} while writing {what}: {reason}; {advice}"
        )
