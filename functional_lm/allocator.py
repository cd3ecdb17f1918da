"""glibc 的 malloc 调优：让大块内存（logits、log-softmax 缓冲、梯度）释放后留在进程里复用，而不是还给内核。

为什么：glibc 缺省把 ≥ 128 KiB（之后动态上调，最多 32 MiB）的分配直接 mmap、释放时 munmap，堆顶超过
128 KiB 的空闲也随即还给内核。训练步里几百 MB 的临时张量因此每一步都“申请新页 → 缺页中断清零 → 归还”：
本机 2 核上 20 步的蒸馏有 810 万次缺页、系统时间占用户时间的一半以上（issue 12 的测量）。

做法：进程启动时用 ``mallopt`` 把 mmap 阈值设到 2 GiB（mallopt 的参数是 int，上限 2^31 − 1）、关闭堆顶回收
（M_TRIM_THRESHOLD = −1，mallopt(3) 写明的“完全不回收”）、堆顶预留 64 MiB：这些块从堆上分配、释放后留在堆里
给下一步复用。代价是进程常驻内存停在它自己的峰值（不再在步与步之间回落）——训练的每一步都会再次用到这个峰值，
所以多占的只是“峰值之后、下一步之前”那段时间本可归还的内存。
为什么不设一个有限的回收阈值：4×512 的蒸馏步一次释放的大块（完整 logits 一块就 1.2 GB）常常超过 1 GiB，
回收阈值 1 GiB 时每步仍有 3 万次缺页（issue 12 的测量）；−1 时为 0，峰值 RSS 相同（5.26 vs 5.22 GB）。
只在 Linux + glibc 上生效；其他平台、或环境变量已经设置了 MALLOC_MMAP_THRESHOLD_ 等（用户自己的选择）时
什么都不做。``FUNCTIONAL_LM_MALLOC=default`` 关闭它。

为什么不用 jemalloc / tcmalloc 或带环境变量重新 exec：前者要另装系统库（LD_PRELOAD 也只能在进程启动前生效），
后者多一次进程启动、还会改变用户看到的进程树；mallopt 在运行中调用即生效，只影响之后的分配，
也不需要任何额外依赖。
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

__all__ = ["tune_malloc", "MALLOC_SETTINGS"]

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3  # glibc malloc.h 里的参数编号
_INT_MAX = 2**31 - 1
MALLOC_SETTINGS = {"mmap_threshold": _INT_MAX, "trim_threshold": -1, "top_pad": 64 * 2**20}
_USER_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "GLIBC_TUNABLES", "LD_PRELOAD")
_DONE: list[bool] = []


def _glibc():
    """glibc 的 libc（不是 glibc——例如 musl 或 macOS——时为 None）。"""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()
    except (OSError, AttributeError):
        return None
    return libc


def tune_malloc() -> bool:
    """在本进程里应用 MALLOC_SETTINGS（只做一次）；返回是否生效。"""
    if _DONE:
        return _DONE[0]
    wanted = os.environ.get("FUNCTIONAL_LM_MALLOC", "tuned").strip().lower() != "default"
    user_set = any(name in os.environ for name in _USER_ENV)
    libc = _glibc() if wanted and not user_set else None
    ok = libc is not None and all((
        libc.mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(MALLOC_SETTINGS["mmap_threshold"])),
        libc.mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(MALLOC_SETTINGS["trim_threshold"])),
        libc.mallopt(_M_TOP_PAD, ctypes.c_int(MALLOC_SETTINGS["top_pad"])),
    ))
    _DONE.append(bool(ok))
    return bool(ok)
