"""``python -m functional_lm.cli ...``：同 ``functional-lm`` 命令（旧的入口，保留）。"""

from functional_lm.cli import entry

entry()
