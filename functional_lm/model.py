"""公开路径 ``functional_lm.model``：所有家族共用的模型函数（实现在 ``functional_lm.models.decoder``）。"""

from functional_lm.models.decoder import *  # noqa: F401,F403  （公开名字即 models.decoder.__all__）
from functional_lm.models.decoder import __all__  # noqa: F401
