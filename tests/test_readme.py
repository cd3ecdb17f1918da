"""README 中的示例必须能原样运行（文档与代码不脱节）。"""

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


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
