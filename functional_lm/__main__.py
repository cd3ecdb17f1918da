"""``python -m functional_lm ...`` 与 ``torchrun -m functional_lm ...``：同 ``functional-lm`` 命令。"""

from functional_lm.cli import entry

entry()
