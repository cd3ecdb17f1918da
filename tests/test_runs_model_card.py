"""学生目录的模型卡（README.md，Hugging Face 约定）：YAML 头用 huggingface_hub 自己的解析器读回（独立于我们的
写法），正文两种语言都在，最终验证表与损失曲线都在学生目录里。"""

import json

import pytest

from conftest import write_teacher_and_data
from functional_lm import ModelConfig
from functional_lm.cli import main
from functional_lm.runs.model_card import hub_datasets, teacher_license

pytestmark = pytest.mark.usefixtures("qwen_tokenizer")
TEACHER = ModelConfig(hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=32,
                      vocab_size=151936, max_seq_len=64, rope_theta=1e4)
FLAGS = ["--preset", "tiny", "--vocab-size", "151936", "--hidden-size", "16", "--num-heads", "2", "--num-kv-heads",
         "1", "--seq-len", "32", "--max-steps", "2", "--eval-interval", "2", "--log-interval", "1", "--batch-size",
         "2", "--no-progress"]


def test_the_teachers_license_is_read_from_its_card_header(tmp_path):
    assert teacher_license(tmp_path) is None and teacher_license(None) is None
    (tmp_path / "README.md").write_text("---\nlicense: apache-2.0\nlanguage: [en]\n---\n# A model\nlicense: mit\n")
    assert teacher_license(tmp_path) == "apache-2.0"
    (tmp_path / "README.md").write_text("# no header\nlicense: mit\n")
    assert teacher_license(tmp_path) is None


def test_only_hub_names_count_as_datasets(tmp_path):
    local = tmp_path / "a" / "b.jsonl"
    local.parent.mkdir()
    local.write_text("{}")
    assert hub_datasets(["HuggingFaceFW/fineweb-edu", str(local), "train.jsonl"]) == ["HuggingFaceFW/fineweb-edu"]
    assert hub_datasets(None) == []


def test_every_distilled_student_carries_a_model_card(tmp_path):
    from huggingface_hub import ModelCard

    root = write_teacher_and_data(tmp_path, TEACHER)
    (root / "teacher" / "README.md").write_text("---\nlicense: apache-2.0\n---\n# tiny teacher\n")
    out = tmp_path / "run"
    assert main(["distill", "--teacher", str(root / "teacher"), "--data", str(root / "data.jsonl"), *FLAGS,
                 "--cache-dir", str(root / "cache"), "--output-dir", str(out)]) == 0
    card = ModelCard.load(out / "student" / "README.md")
    meta = card.data.to_dict()
    assert meta["library_name"] == "transformers" and "distillation" in meta["tags"] and "qwen2" in meta["tags"]
    assert meta["base_model"] == str(root / "teacher") and meta["license"] == "apache-2.0"
    assert "datasets" not in meta  # 本地文件不是 hub 数据集：写在正文
    assert "## 中文" in card.text and "## English" in card.text and str(root / "data.jsonl") in card.text
    final = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert final["kind"] == "eval" and f"| val_ce | {final['val_ce']:.4g} |" in card.text
    assert "| max_steps | 2 |" in card.text and f"{2 * 2 * 32:,} tokens" in card.text
    assert (out / "student" / "loss_curve.png").is_file() and "![loss curve](loss_curve.png)" in card.text
