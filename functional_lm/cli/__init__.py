"""``functional-lm`` 命令行：argparse 子命令结构。

每个子命令是一个 ``register(subparsers)`` 函数：建子解析器、声明参数、``set_defaults(func=...)``；
新增子命令只需写一个这样的函数并加入 ``SUBCOMMANDS``。

    functional-lm generate --model DIR (--prompt TEXT | --prompt-ids 1,2,3) [--max-new-tokens N]
                           [--temperature T --top-k K --top-p P --seed S --dtype D --device DEV --compile]
    functional-lm distill  [--teacher DIR --data FILES ...]（见 functional_lm/cli/distill.py）
    functional-lm teacher-cache (--teacher DIR | --import FILE) --output-dir C --top-k K [--temperature T ...]
                           （预先计算教师的 top-k 目标；见 functional_lm/cli/teacher_cache.py）

启动顺序：解析参数 → 各子命令的 ``check_args``（参数的值与范围，不导入 torch，坏值立即报错）→ 导入 torch
与本包 → 运行。

错误处理：任何失败都只打印一段话（命令名 + 原因），从不打印 Python 回溯；``--debug`` 或环境变量
``FUNCTIONAL_LM_DEBUG=1`` 时照常抛出、显示回溯。退出码：0 成功；2 输入或参数错误；
130 被 Ctrl-C / SIGTERM 打断；1 其他失败（NaN 损失、磁盘满、内部错误）。
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
from typing import Any, Callable, Optional, Sequence

__all__ = ["main", "build_parser", "SUBCOMMANDS"]

EXIT_INTERRUPTED = 130  # 与 shell 对 SIGINT 的约定相同：128 + 2


# ---------------------------------------------------------------- 分词器


# ---------------------------------------------------------------- generate 子命令


# ---------------------------------------------------------------- 入口
def _register_generate(subparsers: argparse._SubParsersAction) -> None:
    from functional_lm.cli.generate import register

    register(subparsers)


def _register_distill(subparsers: argparse._SubParsersAction) -> None:
    from functional_lm.cli.distill import register

    register(subparsers)


def _register_teacher_cache(subparsers: argparse._SubParsersAction) -> None:
    from functional_lm.cli.teacher_cache import register

    register(subparsers)


SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _register_generate, _register_distill, _register_teacher_cache,
]


def build_parser() -> argparse.ArgumentParser:
    """顶层解析器：每个子命令由 SUBCOMMANDS 中的一个注册函数加入。"""
    parser = argparse.ArgumentParser(
        prog="functional-lm", description="函数式 Qwen2 / Qwen3 / Qwen3-MoE / DeepSeek-V3：生成与知识蒸馏 / functional Qwen2, Qwen3, "
        "Qwen3-MoE, DeepSeek-V3: generation and knowledge distillation"
    )
    parser.add_argument("--debug", action="store_true", help="出错时显示 Python 回溯 / show Python tracebacks on errors")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in SUBCOMMANDS:
        register(subparsers)
    return parser


def _debug(argv: Sequence[str]) -> bool:
    """是否显示回溯：命令行有 --debug，或环境变量 FUNCTIONAL_LM_DEBUG 为真。"""
    env = os.environ.get("FUNCTIONAL_LM_DEBUG", "").strip().lower()
    return "--debug" in argv or env in {"1", "true", "yes", "on"}


def _one_paragraph(err: BaseException) -> tuple[str, int]:
    """异常 → (一段话, 退出码)。输入错误为 2，运行中的失败为 1；意外的异常提示用 --debug 看回溯。"""
    from functional_lm.errors import RunFailure

    text = " ".join(str(err).split()) or type(err).__name__
    if isinstance(err, (ValueError, FileNotFoundError, ImportError, NotADirectoryError, IsADirectoryError)):
        return text, 2
    if isinstance(err, (RunFailure, PermissionError)):  # 磁盘满、NaN、另一个进程死了……：消息本身说清了
        return text, 1
    if isinstance(err, OSError):
        return f"{text} ({type(err).__name__})", 1
    return f"unexpected {type(err).__name__}: {text} (this is probably a bug; rerun with --debug for the traceback)", 1


@contextlib.contextmanager
def _interrupts_deferred() -> Any:
    """这段时间里的 Ctrl-C 先记下、结束时再抛出 KeyboardInterrupt，而不是在任意一行代码里抛出。

    用于启动时导入 torch 与本包：有的第三方库在导入可选依赖时用裸 except 包住，KeyboardInterrupt 落在
    那里会被悄悄吞掉，运行照常跑完、退出码 0（CI 上见过一次）。只在主线程、且 SIGINT 仍是 Python 缺省处理器时接管。
    """
    if threading.current_thread() is not threading.main_thread() or (
        signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield
        return
    pending: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, _frame: pending.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if pending:
        raise KeyboardInterrupt("interrupted during start-up; nothing was saved")


def _preload() -> None:
    """先导入所有子命令都要的重模块（torch 与训练器及其依赖）；之后各处的惰性导入只是查表。"""
    import torch  # noqa: F401

    import functional_lm.kd.trainer  # noqa: F401


def main(argv: Optional[Sequence[str]] = None) -> int:
    """命令行入口；返回退出码（0 成功，2 输入错误，130 被打断，1 其他失败）。"""
    from functional_lm.allocator import tune_malloc

    tune_malloc()  # 大块内存留在进程里复用，不在每一步还给内核又缺页取回（见 allocator.py）
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = _debug(argv)
    command = next((a for a in argv if not a.startswith("-")), "")
    rank = int(os.environ.get("RANK", "0") or 0)  # torchrun 下的秩：只有秩 0 说话，其余只报告自己独有的错误
    checking = True  # 启动检查的错误每个进程都一样：torchrun 下只由秩 0 说出来
    from functional_lm.cli.generate import attach_dash_values

    try:
        args = build_parser().parse_args(attach_dash_values(argv))
        command = args.command
        if getattr(args, "check_args", None) is not None:
            args.check_args(args)  # 导入 torch 之前：参数的值与范围（见各子命令的 check_args）
        checking = False
        with _interrupts_deferred():
            _preload()
        return int(args.func(args) or 0)
    except KeyboardInterrupt as err:  # 也包括 errors.Interrupted：训练已保存并停下，消息说明在哪里继续
        if debug:
            raise
        if rank == 0:
            print(f"functional-lm {command}: stopped: {str(err) or 'interrupted; nothing was saved'}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:  # noqa: BLE001 - 命令行的最后一道：一段话，不打印回溯
        if debug:
            raise
        if _peer_failure(err):
            return 1  # 秩 0 已经打印了原因
        text, code = _one_paragraph(err)
        if checking and rank:
            return code  # 秩 0 打印同一个启动错误
        where = f"functional-lm {command}" + (f" [rank {rank}]" if rank else "")
        print(f"{where}: error: {text}", file=sys.stderr)
        return code


def _peer_failure(err: BaseException) -> bool:
    """另一个进程（秩 0）失败导致的退出：它已经说过原因，这里不再重复。"""
    module = sys.modules.get("functional_lm.errors")
    return module is not None and isinstance(err, module.PeerFailure)


def entry() -> None:
    """控制台脚本 ``functional-lm`` 与 ``python -m functional_lm`` 的入口：运行 main 并以它的退出码结束。

    被打断（130）时用 ``os._exit``：CPython 在 KeyboardInterrupt 穿过 C 扩展内部的 PyRun_* 之后会记下
    “未处理的 Ctrl-C”，即使 Python 代码已经处理了它，解释器退出时仍会以 SIGINT 自杀（退出状态 −2 而不是 130）。
    此时进度已保存、锁由操作系统释放，只需先把输出刷出去。

    torchrun 下的多进程运行（WORLD_SIZE > 1）同样用 ``os._exit``：进程组已经 destroy、文件都已原子写好并 fsync，
    但 gloo 的 C++ 工作线程偶尔在解释器收尾时才析构，进程以 “terminate called without an active exception”
    （SIGABRT）结束、torchrun 把整次运行报成失败（CI 上 4 次里见过 1 次；PyTorch 的已知问题，见
    pytorch/pytorch#190489）。跳过解释器收尾就没有这场竞争。
    """
    code = main()
    if code == EXIT_INTERRUPTED or int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
