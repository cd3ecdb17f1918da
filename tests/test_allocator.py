"""glibc malloc 调优：大块内存释放后留在进程里，再次分配不再缺页；用户自己的设置与 FUNCTIONAL_LM_MALLOC=default 优先。

每种情形在新进程里测（mallopt 改的是整个进程的状态）。直接用 libc 的 malloc / free 检验机制本身（PyTorch 的
对齐分配会让同样大小的第二块偶尔放不进刚释放的那块，堆先长到峰值再复用），数的是缺页次数，不计时。
"""

import os
import subprocess
import sys

import pytest

_PROBE = """
import ctypes, resource
from functional_lm.allocator import tune_malloc
ok = tune_malloc()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
size = int(__import__("sys").argv[1])
block = libc.malloc(size); libc.memset(block, 1, size); libc.free(block)   # 写一遍再释放
before = faults()
for _ in range(3):                                                         # 同样大小再来三次
    block = libc.malloc(size); libc.memset(block, 1, size); libc.free(block)
print(ok, faults() - before)
"""


def _probe(size=64 << 20, **env):
    out = subprocess.run([sys.executable, "-c", _PROBE, str(size)], capture_output=True, text=True, timeout=120,
                         env={k: v for k, v in {**os.environ, **env}.items() if v is not None})
    assert out.returncode == 0, out.stderr
    ok, faults = out.stdout.split()
    return ok == "True", int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_freed_large_blocks_are_reused_without_page_faults():
    ok, faults = _probe(FUNCTIONAL_LM_MALLOC=None, MALLOC_MMAP_THRESHOLD_=None)
    assert ok and faults < 1000  # 3 × 64 MiB = 3 × 16384 页：调优后全部复用已经摸过的页
    ok, faults = _probe(FUNCTIONAL_LM_MALLOC="default")
    assert not ok and faults > 3 * 16000  # 缺省行为：每次 mmap / munmap，每一页都重新缺页取回


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_the_users_own_malloc_settings_win():
    ok, faults = _probe(MALLOC_MMAP_THRESHOLD_="131072")
    assert not ok and faults > 3 * 16000


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_blocks_larger_than_a_gibibyte_are_not_trimmed_either():
    # 4×512 的蒸馏步一次释放的大块可达 1.2 GB；堆顶回收阈值若是有限的 1 GiB，这块每次都还给内核再缺页取回
    # （3 × 1.25 GiB ≈ 98 万页）。关闭回收后只有第一次缺页。
    ok, faults = _probe(size=1280 << 20, FUNCTIONAL_LM_MALLOC=None, MALLOC_MMAP_THRESHOLD_=None)
    assert ok and faults < 1000
