"""functional_lm：函数式（JAX 风格）纯 PyTorch 实现的 Qwen2 / Qwen2.5 解码器与知识蒸馏流水线。

模型就是一个普通的 ``dict[str, Tensor]``（键名与 Hugging Face Qwen2 一致）加上一组纯函数。

依赖 torch 的名字（init_params、forward……）在第一次访问时才导入（PEP 562 的模块级 ``__getattr__``）：
``functional-lm`` 命令因此能在导入 torch 之前装好自己的错误处理（启动时按 Ctrl-C 也只打印一行）。
"""

import importlib

from functional_lm.config import PRESETS, ModelConfig, TrainingConfig, get_preset

_LAZY = {
    "init_params": "functional_lm.models.decoder",
    "forward": "functional_lm.models.decoder",
    "forward_hidden": "functional_lm.models.decoder",
    "count_parameters": "functional_lm.models.decoder",
    "typecheck": "functional_lm.shapes",
    "typecheck_enabled": "functional_lm.shapes",
}

__all__ = ["ModelConfig", "TrainingConfig", "PRESETS", "get_preset", *_LAZY]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'functional_lm' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # 之后直接命中，不再经过这里
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
