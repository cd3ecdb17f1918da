"""README 与 docs/ 必须与代码对得上：示例原样运行、命令与 CI 相同、链接的页面存在、每页都有中英两部分。"""

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
BENCHMARKS_PAGE = DOCS / "benchmarks.md"
CJK = re.compile(r"[\u4e00-\u9fff]")


def test_readme_examples_run(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    assert len(blocks) >= 2, "README should carry the example in both languages"
    for block in blocks[:2]:
        exec(compile(block, "README.md", "exec"), {})
    printed = capsys.readouterr().out.split()
    assert printed == ["123426304", "123426304"]


def test_readme_setup_commands_match_ci():
    text = README.read_text(encoding="utf-8")
    ci = (README.parent / ".ci" / "run").read_text(encoding="utf-8")
    assert 'pip install torch==2.13.0 -e ".[test]"' in text and 'pip install torch==2.13.0 -e ".[test]"' in ci
    assert "python -m pytest -q" in text and "python -m pytest -q" in ci
    # 第三条命令：离线默认主任务。
    assert "```bash\nfunctional-lm distill\n```" in text


def halves(text: str) -> tuple[str, str]:
    """一页 markdown 的中文部分与英文部分：``## 中文`` 在前、``## English`` 在后，各恰好一个。"""
    assert text.count("\n## 中文\n") == 1 and text.count("\n## English\n") == 1, "need one '## 中文' and one '## English'"
    head, _, rest = text.partition("\n## 中文\n")
    chinese, _, english = rest.partition("\n## English\n")
    assert "\n## English\n" not in head, "the Chinese part comes first"
    return chinese, english


def local_links(text: str) -> list[str]:
    """markdown 链接里指向仓库内文件的目标（去掉 #锚点；http 链接与纯锚点不算）。"""
    targets = re.findall(r"\]\(([^)\s]+)\)", text)
    return [t.partition("#")[0] for t in targets if not t.startswith(("http://", "https://", "#"))]


def test_readme_links_every_docs_page_from_both_languages():
    chinese, english = halves(README.read_text(encoding="utf-8"))
    pages = {p.name for p in DOCS.glob("*.md")}
    assert pages, "docs/ holds the README's long sections"
    for part, name in ((chinese, "Chinese"), (english, "English")):
        linked = {t for t in local_links(part) if t.startswith("docs/")}
        missing = sorted(t for t in linked if not (ROOT / t).is_file())
        assert not missing, f"README ({name}) links to docs pages that do not exist: {missing}"
        unlinked = sorted(pages - {Path(t).name for t in linked})
        assert not unlinked, f"docs pages the README ({name}) does not link to: {unlinked}"


def test_every_docs_page_has_a_chinese_and_an_english_part():
    for page in sorted(DOCS.glob("*.md")):
        chinese, english = halves(page.read_text(encoding="utf-8"))
        assert CJK.search(chinese), f"{page.name}: the Chinese part has no Chinese"
        assert not CJK.search(english), f"{page.name}: the English part has Chinese in it: {CJK.findall(english)[:5]}"
        assert len(english.split()) > 10 and len(chinese) > 50, f"{page.name}: a part is empty"


def test_links_in_docs_pages_resolve():
    for page in sorted(DOCS.glob("*.md")):
        broken = [t for t in local_links(page.read_text(encoding="utf-8")) if not (page.parent / t).exists()]
        assert not broken, f"{page.name} links to files that do not exist: {broken}"


def benchmark_rows(text: str) -> list[str]:
    """基准表的各行（``| `bench_...`` 开头），按出现顺序：先中文表，后英文表。"""
    return [line for line in text.splitlines() if line.startswith("| `bench_")]


def test_benchmark_table_lives_in_docs_and_covers_every_script():
    scripts = sorted(p.name for p in (ROOT / "benchmarks").glob("bench_*.py"))
    assert not benchmark_rows(README.read_text(encoding="utf-8")), "the benchmark table lives in docs/benchmarks.md"
    for part, name in zip(halves(BENCHMARKS_PAGE.read_text(encoding="utf-8")), ("Chinese", "English")):
        named = [re.match(r"\| `(bench_\w+\.py)`", row).group(1) for row in benchmark_rows(part)]
        assert sorted(named) == scripts, f"the {name} benchmark table's rows {named} vs the scripts {scripts}"


RESULTS = ROOT / "benchmarks" / "results"


def _row_ratios(names: list[str], line: str) -> list[float]:
    """被引用的结果文件里全部比值行的比值（文件必须存在、属于这一行的脚本）。"""
    ratios = []
    for name in names:
        result = json.loads((RESULTS / name).read_text(encoding="utf-8"))
        assert result["benchmark"] and result["rows"], name
        assert name.split("-")[0] in line, f"{name} is cited by the row of another script: {line[:60]}"
        ratios += [r["ratio"] for r in result["rows"] if r["ratio"] is not None]
    return ratios


def quoted_ratios_missing(line: str) -> list[str]:
    """这一行写出的比值（N.NN×）里，哪些不是它引用的结果文件中某一行的比值（按写出的位数取整后比较）。"""
    names = re.findall(r"benchmarks/results/([\w.-]+\.json)", line)
    assert names, f"this row quotes no result file: {line[:80]}"
    ratios = _row_ratios(names, line)
    missing = []
    for quoted in re.findall(r"(\d+\.\d+)×", line):
        half_unit = 0.5 * 10 ** -len(quoted.split(".")[1])
        if not any(abs(float(quoted) - r) <= half_unit + 1e-12 for r in ratios):
            missing.append(quoted)
    return missing


def test_every_benchmark_figure_comes_from_a_committed_result_file():
    rows = benchmark_rows(BENCHMARKS_PAGE.read_text(encoding="utf-8"))
    for line in rows:
        if "bench_trl.py" in line:
            assert "not part of the test run" in line or "不属于测试运行" in line, f"bench_trl must be marked optional: {line}"
        assert not quoted_ratios_missing(line), (quoted_ratios_missing(line), line[:80])


def test_the_ratio_check_catches_a_figure_typed_by_hand():
    """检查本身能失败：把引用的真实比值改掉一位，它必须被发现。"""
    rows = [r for r in benchmark_rows(BENCHMARKS_PAGE.read_text(encoding="utf-8")) if "×" in r]
    line = rows[0]
    first = re.search(r"\d+\.\d+×", line).group(0)
    assert quoted_ratios_missing(line.replace(first, "97.31×", 1)) == ["97.31"]
