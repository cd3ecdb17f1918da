"""一次训练运行“看得见、听得见”的部分：进度条（或 --no-progress 时每条记录一行）、metrics.jsonl、滑动统计、
对 SIGINT / SIGTERM 的响应。

这些都不参与计算；训练器只在秩 0 上显示与写入（其余进程用 ``NullMetrics`` 与关闭的进度条）。
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Optional

from functional_lm.runs.checkpoint import finite_or_none
from functional_lm.runs.report import read_metrics_file
from functional_lm.runs.rundir import writing

__all__ = [
    "StopFlag", "stop_on_signals", "Metrics", "NullMetrics", "Window", "progress_bar", "train_fields", "eval_fields",
    "Progress", "say",
]


# ---------------------------------------------------------------- 信号
class StopFlag:
    """SIGINT / SIGTERM 只置位；训练循环在一步结束时检查它，保存后退出。

    第二次 Ctrl-C 立即中断（KeyboardInterrupt）——但保存进行中时不打断它：记下来，保存完成后再中断，
    这样磁盘上永远只有完整的检查点。
    """

    def __init__(self) -> None:
        self.requested: Optional[str] = None
        self.saving = False
        self.abort_after_save = False

    def __call__(self, signum: int, _frame: Any) -> None:
        if self.requested is not None and signum == signal.SIGINT:
            if self.saving:
                self.abort_after_save = True
                return
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name

    @contextlib.contextmanager
    def protect(self) -> Iterator[None]:
        """保存期间推迟第二次 Ctrl-C 的中断。"""
        self.saving = True
        try:
            yield
        finally:
            self.saving = False
        if self.abort_after_save:
            raise KeyboardInterrupt


@contextlib.contextmanager
def stop_on_signals() -> Iterator[StopFlag]:
    flag = StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag  # 只有主线程能装信号处理器
        return
    previous = {sig: signal.signal(sig, flag) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# ---------------------------------------------------------------- 日志
class Metrics:
    """metrics.jsonl：每行一个 JSON 对象（训练记录与验证记录用 "kind" 区分），追加写入并立即落盘。"""

    def __init__(self, path: Path, last_good: Callable[[], Optional[Path]]) -> None:
        self.path = path
        self.last_good = last_good  # 写失败时报告最后一个完好的检查点

    def truncate_after(self, step: int) -> None:
        """恢复训练时丢掉检查点之后（崩溃前已写出、恢复后会重算）的记录，避免同一步出现两次。

        崩溃（例如磁盘满）时写了一半的最后一行也在这里丢掉，并给出点名文件的警告。
        """
        if not self.path.is_file():
            return
        records, torn = read_metrics_file(self.path)
        if torn:
            print(f"warning: {self.path}: dropped a cut-off last line (a crash while writing it)", file=sys.stderr)
        keep = [json.dumps(r) for r in records if r.get("step", 0) <= step]
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with writing("the training metrics", self.path, self.last_good()):  # 临时文件再改名：失败时原文件不动
            tmp.write_text("".join(line + "\n" for line in keep), encoding="utf-8")
            os.replace(tmp, self.path)

    def write(self, record: dict[str, Any]) -> None:
        clean = {k: (finite_or_none(v) if isinstance(v, float) else v) for k, v in record.items()}
        with writing("the training metrics", self.path, self.last_good(), atomic=False), \
                open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(clean) + "\n")


class Window:
    """两次记录之间的滑动统计：逐步累加损失各部分与 token 数，记录时取平均并清零。

    吞吐只算训练的时间：验证与保存放在 ``paused()`` 里，它们的耗时从窗口里扣掉。"""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.loss = self.kd = self.ce = self.data_ce = 0.0
        self.tokens = self.steps = 0
        self.sources: dict[str, int] = {}  # 各来源（data / teacher / student）的步数，见 on_policy
        self.start = time.perf_counter()
        self.excluded = 0.0

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """块内的时间（验证、保存）不计入吞吐。"""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.excluded += time.perf_counter() - start

    def add(self, stats: Any) -> None:
        self.loss, self.kd, self.ce = self.loss + stats.loss, self.kd + stats.kd, self.ce + stats.ce
        self.tokens += stats.tokens
        self.steps += 1
        source = getattr(stats, "source", "data")
        self.sources[source] = self.sources.get(source, 0) + 1
        if source == "data":
            self.data_ce += stats.ce

    def record(self, step: int, stats: Any) -> dict[str, Any]:
        """训练记录：窗口内的平均损失、最后一步的学习率与梯度范数、吞吐。"""
        elapsed = time.perf_counter() - self.start - self.excluded
        n = max(self.steps, 1)
        logged = {
            "kind": "train", "step": step, "loss": self.loss / n, "kd": self.kd / n, "ce": self.ce / n,
            "lr": stats.lr, "grad_norm": stats.grad_norm, "tokens_per_s": self.tokens / max(elapsed, 1e-9),
        }
        if set(self.sources) - {"data"}:  # 有生成批时记下窗口内各来源的步数（只有数据批时记录与以前相同）
            logged["sources"] = dict(self.sources)
            # ce 只平均数据批（数据本身的文本上的交叉熵，与只有数据批的运行可比）；窗口里没有数据批时为 None。
            # 生成批上的交叉熵另记为 ce_generated（学生写的批上它是学生对自己样本的 NLL，不在目标里）。
            data_steps = self.sources.get("data", 0)
            logged["ce"] = self.data_ce / data_steps if data_steps else None
            logged["ce_generated"] = (self.ce - self.data_ce) / (self.steps - data_steps)
        self.reset()
        return logged


def progress_bar(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc="distill", unit="step", dynamic_ncols=True)


def train_fields(record: dict[str, Any]) -> dict[str, str]:
    """一条训练记录里给人看的字段（进度条的后缀与 --no-progress 的一行共用）：loss、kd、ce、lr、tok/s
    （服务端教师时另有 server tok/s 与等服务器的时间比例 waiting）。
    ce 为 None（窗口里只有生成批）时写 “—”。"""
    ce = record.get("ce")
    fields = {
        "loss": f"{record['loss']:.4f}", "kd": f"{record['kd']:.4f}", "ce": "—" if ce is None else f"{ce:.4f}",
        "lr": f"{record['lr']:.2e}", "tok/s": f"{record['tokens_per_s']:.0f}",
    }
    if "server_tokens_per_s" in record:  # 服务端教师：服务器的吞吐与训练等它的时间比例
        fields["server tok/s"] = f"{record['server_tokens_per_s']:.0f}"
        fields["waiting"] = f"{record['server_wait_fraction']:.0%}"
    return fields


def eval_fields(record: dict[str, Any]) -> dict[str, str]:
    """一条验证记录里的指标（4 位有效数字）；token 计数（*_tokens）不是指标，不显示。"""
    return {
        k: f"{v:.4g}" if isinstance(v, float) else str(v) for k, v in record.items()
        if k not in ("kind", "step") and not k.endswith("_tokens") and v is not None
    }


class Progress:
    """训练器的进度显示。

    lines 为假：tqdm 进度条，后缀是最近一条训练记录（train_fields）；lines 为真（--no-progress，进度条关掉）：
    每条训练记录与验证记录各打印一行到 stderr，例如
    ``[train] step 10/120: loss 3.2100, kd 1.2000, ce 4.1000, lr 3.00e-03, tok/s 1234``。
    非秩 0 的进程：关掉的进度条、lines 为假，什么都不显示。"""

    def __init__(self, bar: Any, total: int, lines: bool) -> None:
        self.bar, self.total, self.lines = bar, total, lines

    def step(self) -> None:
        self.bar.update(1)

    def describe(self, text: str) -> None:
        self.bar.set_description(text)

    def logged(self, record: dict[str, Any]) -> None:
        fields = train_fields(record)
        self.bar.set_postfix(fields)
        if self.lines:
            say(f"[train] step {record['step']}/{self.total}: " + ", ".join(f"{k} {v}" for k, v in fields.items()))

    def evaluated(self, record: dict[str, Any]) -> None:
        if self.lines:
            shown = ", ".join(f"{k} {v}" for k, v in eval_fields(record).items())
            say(f"[train] step {record['step']}/{self.total} validation: {shown}")

    def write(self, text: str) -> None:
        self.bar.write(text)

    def close(self) -> None:
        self.bar.close()


def say(message: str) -> None:
    """训练器对用户说的话（恢复位置、改动的设置）：写到 stderr。"""
    print(message, file=sys.stderr, flush=True)


class NullMetrics:
    """非秩 0 的进程：不写指标文件（接口同 Metrics）。"""

    def truncate_after(self, step: int) -> None:
        pass

    def write(self, record: dict[str, Any]) -> None:
        pass
