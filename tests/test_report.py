"""训练报告：Markdown 表格、采样、配置；有 matplotlib 时画 PNG，没有时照常写报告。"""

import builtins
import json

import pytest

from functional_lm.report import read_metrics, write_report


def _records():
    return [
        {"kind": "train", "step": 1, "loss": 3.0},
        {"kind": "train", "step": 2, "loss": 2.5},
        {"kind": "eval", "step": 2, "val_ce": 2.7},
    ]


def test_report_with_plot(tmp_path):
    pytest.importorskip("matplotlib")
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in _records()))
    assert read_metrics(tmp_path) == _records()
    path = write_report(
        tmp_path, title="T", configs={"a": 1}, final_metrics={"student": {"val_ce": 2.7, "top1": None}},
        curves={"student": read_metrics(tmp_path)}, samples={"student": "hello"}, notes=["n1"],
    )
    text = path.read_text(encoding="utf-8")
    assert text.startswith("# T") and "| student | 2.7 | — |" in text and "hello" in text and "- n1" in text
    png = tmp_path / "loss_curve.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![loss curve](loss_curve.png)" in text


def test_report_without_matplotlib(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError("no matplotlib here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    path = write_report(tmp_path, title="T", configs={}, final_metrics={"m": {"x": 1.0}}, curves={"m": _records()})
    assert "matplotlib not installed" in path.read_text(encoding="utf-8")
    assert not (tmp_path / "loss_curve.png").exists()


def test_plot_marks_points_and_draws_validation_and_teacher_reference(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    from functional_lm.report import plot_loss_curves

    captured = []
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: captured.append(fig))
    records = [{"kind": "train", "step": 4, "ce": 3.0}, {"kind": "eval", "step": 4, "val_ce": 3.2}]
    plot_loss_curves({"s": records}, tmp_path / "x.png", key="ce", val_key="val_ce", reference=("teacher", 2.5))
    (ax,) = captured[0].axes
    train, val, ref = ax.lines
    assert train.get_marker() == "o" and list(train.get_xdata()) == [4]  # 只有一个点也画得出来
    assert val.get_marker() == "s" and list(val.get_ydata()) == [3.2] and val.get_color() == train.get_color()
    assert list(ref.get_ydata()) == [2.5, 2.5] and ref.get_label() == "teacher"


def test_torn_last_line_is_dropped_but_a_damaged_middle_line_is_named(tmp_path):
    from functional_lm.report import read_metrics_file

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo')
    assert read_metrics_file(path) == ([{"step": 1}, {"step": 2}], True)
    assert read_metrics(tmp_path) == [{"step": 1}, {"step": 2}]
    path.write_text('{"step": 1}\ngarbage\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not a JSON record"):
        read_metrics_file(path)
