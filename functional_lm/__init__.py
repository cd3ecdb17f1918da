"""functional_lm：函数式（JAX 风格）纯 PyTorch 实现的 Qwen2 / Qwen2.5 解码器与知识蒸馏流水线。

模型就是一个普通的 ``dict[str, Tensor]``（键名与 Hugging Face Qwen2 一致）加上一组纯函数。
"""

from functional_lm.config import PRESETS, ModelConfig, TrainingConfig, get_preset
from functional_lm.model import count_parameters, forward, forward_hidden, init_params

__all__ = [
    "ModelConfig",
    "TrainingConfig",
    "PRESETS",
    "get_preset",
    "init_params",
    "forward",
    "forward_hidden",
    "count_parameters",
]
