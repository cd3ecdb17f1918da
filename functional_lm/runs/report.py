"""训练结束时的简短报告：配置、最终指标、损失曲线（PNG，需要可选依赖 matplotlib）。

报告只读取运行目录里的 metrics.jsonl，不依赖训练过程中的任何对象；没有 matplotlib 时照常写出
report.md，并注明没有画图。
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Optional

__all__ = ["read_metrics", "read_metrics_file", "plot_loss_curves", "plot_eval_curves", "write_report"]


def read_metrics_file(path: str | Path) -> tuple[list[dict[str, Any]], bool]:
    """读取一个 metrics.jsonl，返回 (记录列表, 最后一行是否被截断而丢掉)。

    追加写入时崩溃（例如磁盘满）会留下写了一半的最后一行：丢掉它、照常返回其余记录；
    中间某行损坏则不是崩溃能造成的，报 ValueError 并点名文件与行号。
    """
    path = Path(path)
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    records: list[dict[str, Any]] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):
                return records, True
            raise ValueError(f"{path}:{number}: not a JSON record; the metrics file is damaged") from None
    return records, False


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """读取 run_dir/metrics.jsonl 的全部记录（文件不存在时为空列表；被截断的最后一行被丢掉）。"""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return read_metrics_file(path)[0]


def _points(records: list[dict[str, Any]], kind: str, key: str) -> list[tuple[Any, Any]]:
    return [(r["step"], r[key]) for r in records if r.get("kind") == kind and r.get(key) is not None]


def _pyplot() -> Any:
    """matplotlib.pyplot（Agg 后端，不需要显示器）；没有安装 matplotlib 时为 None。"""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _save(plt: Any, fig: Any, file: Path) -> Path:
    """排版、写出 PNG、关掉图。"""
    fig.tight_layout()
    fig.savefig(file, dpi=110)
    plt.close(fig)
    return file


# 每个运行一种标记与线型（颜色之外再区分一次）：两个运行的曲线重合时（例如在线学生的离线预热与离线蒸馏的学生
# 完全相同），后画的虚线压在先画的粗实线上，两条都看得见。
_MARKERS = ("o", "^", "x", "D", "v", "*")
_LINESTYLES = ("-", (0, (6, 3)), (0, (2, 2)), "-.", (0, (5, 1)), (0, (1, 3)))


def _style(index: int) -> dict[str, Any]:
    """第 index 个运行的颜色、标记、线型与线宽（越往后越细，压在上面也不遮住前面的）；两张图里同一个运行样子相同。"""
    return {
        "color": f"C{index % 10}",
        "marker": _MARKERS[index % len(_MARKERS)],
        "linestyle": _LINESTYLES[index % len(_LINESTYLES)],
        "linewidth": max(3.0 - 0.8 * index, 1.2),
    }


def _legend_below(ax: Any, columns: int) -> None:
    """图例放在坐标区下面，不压住曲线；没有带标签的曲线（例如服务端教师的运行没有教师一侧的验证指标）时不画。"""
    if not ax.get_legend_handles_labels()[0]:
        return
    ax.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=columns, frameon=False)


def plot_loss_curves(
    curves: Mapping[str, list[dict[str, Any]]],
    file: Path,
    key: str = "loss",
    *,
    val_key: Optional[str] = None,
    reference: Optional[tuple[str, float]] = None,
) -> Optional[Path]:
    """把若干条训练曲线（名字 → 记录）画进一张 PNG；没有 matplotlib 时返回 None。

    每个运行画训练记录的 key（实心小标记，只有一个点时也看得见）；给了 val_key 时同色、同线型画出验证点
    （空心大标记），图例写明 training / validation；每个运行的标记与线型各不相同（见 _style）。
    reference = (名字, 数值) 画一条水平参照线（例如教师在验证集上的交叉熵）。
    """
    plt = _pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(9, 6))
    for index, (name, records) in enumerate(curves.items()):
        points, style = _points(records, "train", key), _style(index)
        if points:
            ax.plot(*zip(*points), markersize=6, markeredgewidth=1.5, label=f"{name}: training", **style)
            val = _points(records, "eval", val_key) if val_key else []
            if val:  # 验证点不连线：只有几个点，连线会横穿训练曲线
                ax.plot(*zip(*val), markersize=11, markerfacecolor="none", markeredgewidth=1.8,
                        label=f"{name}: validation", **(style | {"linestyle": "none"}))
    if reference is not None and reference[1] is not None:
        ax.axhline(reference[1], color="gray", linestyle=":", label=reference[0])
    ax.set_xlabel("step")
    ax.set_ylabel(f"{key} / {val_key}" if val_key else key)
    ax.set_title(f"training {key} (lines, small filled markers) and validation {val_key} (large hollow markers)"
                 if val_key else f"training {key}", fontsize="medium")
    ax.grid(alpha=0.3)
    _legend_below(ax, columns=2)
    return _save(plt, fig, file)


def plot_eval_curves(curves: Mapping[str, list[dict[str, Any]]], file: Path, keys: tuple[str, ...]) -> Optional[Path]:
    """验证指标随步数的曲线（每个 key 一个子图，y 轴标着这个指标；每个运行一条线，标记与线型同 plot_loss_curves）；
    没有 matplotlib 或没有任何点时返回 None。"""
    found = {k: {n: _points(r, "eval", k) for n, r in curves.items()} for k in keys}
    keys = tuple(k for k in keys if any(found[k].values()))
    plt = _pyplot()
    if plt is None or not keys:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 4.8), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for index, (name, points) in enumerate(found[key].items()):
            if points:
                ax.plot(*zip(*points), markersize=7, markeredgewidth=1.5, label=name, **_style(index))
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        ax.set_title(f"validation {key}")
        ax.grid(alpha=0.3)
    for ax in axes[0]:
        _legend_below(ax, columns=1)
    return _save(plt, fig, file)


def _table(rows: Mapping[str, Mapping[str, Any]]) -> str:
    """名字 → 指标字典，写成 Markdown 表格（列为所有出现过的指标）。"""
    columns: list[str] = []
    for metrics in rows.values():
        columns += [k for k in metrics if k not in columns]
    lines = ["| model | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, metrics in rows.items():
        cells = [_fmt(metrics.get(c)) for c in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def write_report(
    run_dir: str | Path,
    *,
    title: str,
    configs: Mapping[str, Any],
    final_metrics: Mapping[str, Mapping[str, Any]],
    curves: Mapping[str, list[dict[str, Any]]],
    samples: Optional[Mapping[str, str]] = None,
    notes: Optional[list[str]] = None,
    curve_key: str = "loss",
    val_key: Optional[str] = None,
    reference: Optional[tuple[str, float]] = None,
    eval_keys: tuple[str, ...] = (),
) -> Path:
    """写出 run_dir/report.md（和 loss_curve.png），返回报告路径。

    curve_key：画哪一个训练指标（比较不同 α 的运行时用 "ce"，因为总损失的量纲随 α 变化）；
    val_key：同图画出的验证指标（如 "val_ce"）；reference：水平参照线 (名字, 数值)；
    eval_keys：另画一张验证指标曲线 eval_curves.png（如在线指标 on_policy_reverse_kl），每个指标一个子图。
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    png = plot_loss_curves(curves, run_dir / "loss_curve.png", key=curve_key, val_key=val_key, reference=reference)
    parts = [f"# {title}", ""]
    parts += ["## 最终指标 / Final metrics", "", _table(final_metrics), ""]
    if png is not None:
        parts += ["## 损失曲线 / Loss curve", "", f"![loss curve]({png.name})", ""]
    else:
        parts += ["(matplotlib 未安装，没有画损失曲线 / matplotlib not installed: no loss-curve PNG)", ""]
    evals = plot_eval_curves(curves, run_dir / "eval_curves.png", eval_keys) if eval_keys else None
    if evals is not None:
        parts += ["## 验证指标曲线 / Validation metrics", "", f"![validation metrics]({evals.name})", ""]
    if samples:
        parts += ["## 采样续写 / Sampled continuations", ""]
        for name, text in samples.items():
            parts += [f"**{name}**", "", "```", text, "```", ""]
    if notes:
        parts += ["## 说明 / Notes", ""] + [f"- {n}" for n in notes] + [""]
    parts += ["## 配置 / Configuration", "", "```json", json.dumps(configs, indent=2, default=str), "```", ""]
    path = run_dir / "report.md"
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
