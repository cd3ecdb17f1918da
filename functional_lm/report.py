"""训练结束时的简短报告：配置、最终指标、损失曲线（PNG，需要可选依赖 matplotlib）。

报告只读取运行目录里的 metrics.jsonl，不依赖训练过程中的任何对象；没有 matplotlib 时照常写出
report.md，并注明没有画图。
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Optional

__all__ = ["read_metrics", "plot_loss_curves", "write_report"]


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """读取 run_dir/metrics.jsonl 的全部记录（文件不存在时为空列表）。"""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def plot_loss_curves(curves: Mapping[str, list[dict[str, Any]]], file: Path, key: str = "loss") -> Optional[Path]:
    """把若干条训练曲线（名字 → 训练记录）画进一张 PNG；没有 matplotlib 时返回 None。"""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, records in curves.items():
        points = [(r["step"], r[key]) for r in records if r.get("kind") == "train" and r.get(key) is not None]
        if points:
            ax.plot(*zip(*points), label=name)
    ax.set_xlabel("step")
    ax.set_ylabel(key)
    ax.set_title(f"training {key}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(file, dpi=110)
    plt.close(fig)
    return file


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
) -> Path:
    """写出 run_dir/report.md（和 loss_curve.png），返回报告路径。

    curve_key：画哪一个训练指标（比较不同 α 的运行时用 "ce"，因为总损失的量纲随 α 变化）。
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    png = plot_loss_curves(curves, run_dir / "loss_curve.png", key=curve_key)
    parts = [f"# {title}", ""]
    parts += ["## 最终指标 / Final metrics", "", _table(final_metrics), ""]
    if png is not None:
        parts += ["## 损失曲线 / Loss curve", "", f"![loss curve]({png.name})", ""]
    else:
        parts += ["(matplotlib 未安装，没有画损失曲线 / matplotlib not installed: no loss-curve PNG)", ""]
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
