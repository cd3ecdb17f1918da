"""benchmarks/evidence_cross_tokenizer.py 的冒烟运行：四种做法（CE-only、SeqKD、ULD、hybrid）都真的训练、评估，
表与结果文件里的数与返回值一致。不断言谁更好（那是实验的结果，写在 README 里，来自完整运行的结果文件）。"""

import json
import math
import sys
from pathlib import Path

import pytest

BENCH_DIR = Path(__file__).resolve().parent.parent / "benchmarks"
pytestmark = pytest.mark.usefixtures("qwen_tokenizer")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    sys.path.insert(0, str(BENCH_DIR))
    try:
        import evidence_cross_tokenizer as module

        out = tmp_path_factory.mktemp("evidence") / "r.json"
        result = module.main(["--smoke", "--seqkd-prompts", "4", "--eval-batches", "1", "--out", str(out)])
    finally:
        sys.path.remove(str(BENCH_DIR))
        for name in [n for n in sys.modules if n in ("evidence_cross_tokenizer", "_bench_common")]:
            del sys.modules[name]
    return result, out


def test_every_method_is_trained_and_evaluated(smoke):
    result, _ = smoke
    assert set(result["per_seed"]) == {"ce_only", "seqkd", "uld", "hybrid"}
    for method, runs in result["per_seed"].items():
        assert len(runs) == 1
        for key in ("val_ce", "agreement", "kl_to_teacher"):
            assert math.isfinite(runs[0][key]) and runs[0][key] >= 0, (method, key)
    assert result["seqkd_texts"] == 4 and result["seqkd_blocks"] >= 1
    assert result["fractions"]["mapped"] > 0.5  # hybrid 学生大多数位置得到映射目标
    assert result["per_seed"]["uld"][0] != result["per_seed"]["hybrid"][0]  # 两种损失确实不同


def test_rows_are_means_over_seeds_with_ce_only_as_reference(smoke):
    result, out = smoke
    rows = {r["name"]: r for r in result["rows"]}
    for method in ("seqkd", "uld", "hybrid"):
        r = rows[f"val_ce_{method}"]
        assert r["ours"] == pytest.approx(result["per_seed"][method][0]["val_ce"])
        assert r["reference"] == pytest.approx(result["per_seed"]["ce_only"][0]["val_ce"])
        assert r["ratio"] == pytest.approx(r["ours"] / r["reference"])
    saved = json.loads(out.read_text(encoding="utf-8"))
    assert saved["rows"] == json.loads(json.dumps(result["rows"]))
    assert saved["benchmark"] == "evidence_cross_tokenizer"
