"""公开路径 ``functional_lm.losses``：蒸馏损失（稠密散度、稀疏 top-k、分块引擎）。"""

from functional_lm.losses.divergences import *  # noqa: F401,F403
from functional_lm.losses.divergences import __all__  # noqa: F401
