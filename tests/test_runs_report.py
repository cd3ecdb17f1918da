"""训练报告：Markdown 表格、采样、配置；有 matplotlib 时画 PNG，没有时照常写报告。"""

import builtins
import json

import pytest

from functional_lm.runs.report import read_metrics, write_report


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

    from functional_lm.runs.report import plot_loss_curves

    captured = []
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: captured.append(fig))
    records = [{"kind": "train", "step": 4, "ce": 3.0}, {"kind": "eval", "step": 4, "val_ce": 3.2}]
    plot_loss_curves({"s": records}, tmp_path / "x.png", key="ce", val_key="val_ce", reference=("teacher", 2.5))
    (ax,) = captured[0].axes
    train, val, ref = ax.lines
    assert train.get_marker() == "o" and list(train.get_xdata()) == [4]  # 只有一个点也画得出来
    assert list(val.get_ydata()) == [3.2] and val.get_color() == train.get_color()
    assert val.get_markerfacecolor() == "none" and val.get_markersize() > train.get_markersize()  # 空心大标记
    assert list(ref.get_ydata()) == [2.5, 2.5] and ref.get_label() == "teacher"
    # 训练与验证的点在同一张图里：标题、图例与 y 轴都说清哪个是哪个
    assert [train.get_label(), val.get_label()] == ["s: training", "s: validation"]
    assert val.get_linestyle() == "None"  # 验证点不连线（几个点的连线会横穿训练曲线）
    assert "training ce" in ax.get_title() and "validation val_ce" in ax.get_title()
    assert ax.get_ylabel() == "ce / val_ce"


def _captured_figures(monkeypatch):
    from matplotlib.figure import Figure

    captured = []
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: captured.append(fig))
    return captured


def test_runs_with_identical_curves_stay_distinguishable(tmp_path, monkeypatch):
    """在线学生的离线预热与离线蒸馏的学生完全相同：两条重合的曲线要用不同的标记与线型画出，后画的更细。"""
    pytest.importorskip("matplotlib")
    from functional_lm.runs.report import plot_eval_curves, plot_loss_curves

    captured = _captured_figures(monkeypatch)
    same = [{"kind": "train", "step": s, "ce": 3.0 - 0.1 * s} for s in (1, 2, 3)]
    same += [{"kind": "eval", "step": 3, "val_ce": 2.9, "on_policy_reverse_kl": 0.5}]
    curves = {"a": same, "b": same}
    plot_loss_curves(curves, tmp_path / "x.png", key="ce", val_key="val_ce")
    plot_eval_curves(curves, tmp_path / "y.png", ("on_policy_reverse_kl",))
    (loss_ax,), (eval_ax,) = captured[0].axes, captured[1].axes
    train_a, val_a, train_b, val_b = loss_ax.lines
    assert list(train_a.get_ydata()) == list(train_b.get_ydata())  # 数据确实重合
    for first, second in ((train_a, train_b), (val_a, val_b), tuple(eval_ax.lines)):
        assert first.get_marker() != second.get_marker()
        assert first.get_color() != second.get_color()
    assert train_a.get_linestyle() != train_b.get_linestyle()
    assert tuple(eval_ax.lines)[0].get_linestyle() != tuple(eval_ax.lines)[1].get_linestyle()
    assert train_b.get_linewidth() < train_a.get_linewidth()  # 压在上面的线更细，下面的露得出来
    assert [line.get_color() for line in eval_ax.lines] == [train_a.get_color(), train_b.get_color()]  # 两张图同色


def test_each_validation_panel_names_its_metric_on_the_y_axis(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from functional_lm.runs.report import plot_eval_curves

    captured = _captured_figures(monkeypatch)
    records = [{"kind": "eval", "step": 2, "on_policy_reverse_kl": 0.4, "on_policy_teacher_nll": 3.1}]
    plot_eval_curves({"s": records}, tmp_path / "y.png", ("on_policy_reverse_kl", "on_policy_teacher_nll"))
    axes = captured[0].axes
    assert [ax.get_ylabel() for ax in axes] == ["on_policy_reverse_kl", "on_policy_teacher_nll"]
    assert [ax.get_xlabel() for ax in axes] == ["step", "step"]
    assert [list(ax.lines[0].get_ydata()) for ax in axes] == [[0.4], [3.1]]


def test_the_demo_report_speaks_of_three_students_and_their_shared_warm_up(tmp_path):
    from functional_lm.config import TrainingConfig
    from functional_lm.kd.demo import curve_labels, demo_training_defaults, report_notes, student_configs

    tcfg = TrainingConfig(**demo_training_defaults())
    names = list(student_configs(tcfg))
    students = {n: tmp_path / n / "student" for n in names}
    text = " ".join(report_notes(tcfg, tmp_path / "teacher", students))
    assert len(names) == 3 and "both students" not in text and "all 3 students" in text
    assert "until step 60 the on-policy student's curves lie exactly on the distilled student's" in text
    labels = curve_labels(tcfg, names)
    assert labels["distilled"] == "student (distilled)" and labels["ce_only"] == "student (ce_only)"
    assert labels["on_policy"] == "student (on_policy; same as distilled until step 60: warm-up)"


def test_torn_last_line_is_dropped_but_a_damaged_middle_line_is_named(tmp_path):
    from functional_lm.runs.report import read_metrics_file

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo')
    assert read_metrics_file(path) == ([{"step": 1}, {"step": 2}], True)
    assert read_metrics(tmp_path) == [{"step": 1}, {"step": 2}]
    path.write_text('{"step": 1}\ngarbage\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not a JSON record"):
        read_metrics_file(path)
