"""公开路径 ``functional_lm.model``：Qwen2 家族的模型函数（实现在 ``functional_lm.models.qwen2``）。"""

from functional_lm.models.qwen2 import *  # noqa: F401,F403  （公开名字即 models.qwen2.__all__）
from functional_lm.models.qwen2 import __all__  # noqa: F401
