"""每个学生目录里的模型卡 ``README.md``（Hugging Face 的约定：YAML 头 + 正文，中文在前、英文在后）。

YAML 头（Hub 读取的元数据）::

    library_name: transformers           学生是标准的 Qwen2ForCausalLM / Qwen3ForCausalLM 检查点
    tags: [distillation, knowledge-distillation, functional_lm, …]
    base_model: 教师的名字或路径（hub id 或检查点目录；服务端教师是服务器上的模型名）
    datasets: [hub 上的数据集名]         只列 --data 里不是本地文件的那些（本地文件写在正文）
    license: 教师的许可                  教师目录的 README.md 头里有 license 时照抄，否则不写

正文：这次运行的设置、数据、步数与 token 数、最终验证表、损失曲线（报告的 PNG 复制到学生目录）、怎样加载
（transformers 与本项目）。YAML 只用 JSON 形式的标量与列表（JSON 是 YAML 的子集），不需要 YAML 库。
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

from functional_lm.atomic import write_text_atomic

__all__ = ["teacher_license", "hub_datasets", "model_card_text", "write_model_card"]

CARD_FILE = "README.md"
PLOT_FILE = "loss_curve.png"
SETTINGS = ("max_steps", "batch_size", "gradient_accumulation_steps", "learning_rate", "alpha", "temperature", "divergence",
            "top_k", "on_policy_fraction", "seed")


def teacher_license(teacher_dir: Optional[Path]) -> Optional[str]:
    """教师目录 README.md 的 YAML 头里的 ``license:``（一个标量）；没有目录、没有文件或没有这一项时为 None。"""
    card = None if teacher_dir is None else Path(teacher_dir) / CARD_FILE
    if card is None or not card.is_file():
        return None
    text = card.read_text(encoding="utf-8", errors="replace")
    head = re.match(r"\A---\s*\n(.*?)\n---\s*(\n|\Z)", text, re.S)
    found = head and re.search(r"^license:\s*['\"]?([^'\"\n#]+?)['\"]?\s*$", head.group(1), re.M)
    return found.group(1).strip() if found else None


def hub_datasets(data: Optional[Sequence[Any]]) -> list[str]:
    """--data 里像 hub 数据集名（owner/name，且不是存在的本地路径）的项。"""
    names = []
    for item in data or []:
        text = str(item)
        if re.fullmatch(r"[\w.-]+/[\w.-]+", text) and not Path(text).expanduser().exists():
            names.append(text)
    return names


def _front_matter(base_model: Optional[str], license: Optional[str], datasets: list[str], tags: list[str]) -> str:
    fields: dict[str, Any] = {"library_name": "transformers", "tags": tags}
    if base_model:
        fields["base_model"] = base_model
    if datasets:
        fields["datasets"] = datasets
    if license:
        fields["license"] = license
    return "\n".join(["---", *(f"{k}: {json.dumps(v, ensure_ascii=False)}" for k, v in fields.items()), "---"])


def _metrics_table(final: Mapping[str, Any]) -> str:
    rows = [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in final.items()]
    return "\n".join(["| metric | value |", "|---|---|", *rows]) if rows else "(no validation metrics)"


def _settings_table(training: Mapping[str, Any], extra: Mapping[str, Any]) -> str:
    rows = [f"| {k} | {training[k]} |" for k in SETTINGS if k in training] + [f"| {k} | {v} |" for k, v in extra.items()]
    return "\n".join(["| setting | value |", "|---|---|", *rows])


def model_card_text(
    *, title: str, base_model: Optional[str], license: Optional[str], datasets: list[str], data: str,
    training: Mapping[str, Any], extra: Mapping[str, Any], steps: int, tokens: int, final: Mapping[str, Any],
    plot: bool, family: str,
) -> str:
    """模型卡的全文（见模块说明）。extra：另外要列出的设置（块长、教师的来源、跨分词器的模式……）。"""
    tags = ["distillation", "knowledge-distillation", "functional_lm", family]
    teacher = base_model or "(no teacher: cross-entropy only)"
    load = ("```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
            "model = AutoModelForCausalLM.from_pretrained(\"PATH\")\ntokenizer = AutoTokenizer.from_pretrained(\"PATH\")\n"
            "\nfrom functional_lm.hf import load_pretrained          # 本项目的纯函数 / this project's pure functions\n"
            "from functional_lm import forward\ncfg, params = load_pretrained(\"PATH\")  # dict[str, Tensor]\n```")
    plot_md = f"![loss curve]({PLOT_FILE})" if plot else "(matplotlib not installed: no loss plot)"
    settings, metrics = _settings_table(training, extra), _metrics_table(final)
    return "\n".join([
        _front_matter(base_model, license, datasets, tags), "", f"# {title}", "",
        "## 中文", "",
        f"由 `functional_lm` 从教师 **{teacher}** 蒸馏出的学生（{family}）。训练 {steps} 步、{tokens:,} 个 token；"
        f"数据：{data}。", "", "### 加载", "", load, "", "### 训练设置", "", settings, "",
        "### 最终验证", "", metrics, "", "### 损失曲线", "", plot_md, "",
        "## English", "",
        f"A student ({family}) distilled by `functional_lm` from the teacher **{teacher}**: {steps} steps, "
        f"{tokens:,} tokens; data: {data}.", "", "### Loading", "", load, "", "### Training settings", "", settings,
        "", "### Final evaluation", "", metrics, "", "### Loss curve", "", plot_md, "",
    ])


def write_model_card(student_dir: Path, run_dir: Path, **card: Any) -> Path:
    """把模型卡写到 student_dir/README.md（原子写入），报告的损失曲线 PNG 一并复制过去；返回卡片路径。"""
    student_dir = Path(student_dir)
    plot = Path(run_dir) / PLOT_FILE
    if plot.is_file():
        shutil.copyfile(plot, student_dir / PLOT_FILE)
    path = student_dir / CARD_FILE
    write_text_atomic(model_card_text(plot=plot.is_file(), **card), path)
    return path
