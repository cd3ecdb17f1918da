"""形状图例、jaxtyping 别名与运行时类型检查开关。

维度图例（jaxtyping 字符串与 einops 模式共用同一套字母）::

    b   批大小 (batch)
    t   查询位置 (query positions)
    s   键 / 缓存位置 (key / cache positions)
    d   隐藏维度 (hidden)
    h   查询头数 (query heads)
    k   键值头数 (key/value heads)
    g   每个键值头对应的查询头数 (queries per kv head)，h = k·g
    e   每个头的维度 (head_dim)
    f   前馈网络隐藏维度 (ffn hidden)
    v   词表大小 (vocab)
    he  = h·e，查询投影的输出宽度；ke = k·e，键 / 值投影的输出宽度

运行时检查：
    * 默认开启（eager 模式下由 jaxtyping + beartype 检查每个公开函数的形状和 dtype）；
    * 环境变量 ``FUNCTIONAL_LM_TYPECHECK=0`` 在导入时关闭，``typecheck(False)`` 上下文管理器临时关闭；
    * ``torch.compile`` 追踪期间自动让路：jaxtyping 的包装器在 dynamo 中会误报，
      因此追踪时直接调用原函数（检查在 eager 下已经做过）。
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import Callable, Iterator, TypeVar

import torch
from beartype import beartype
from jaxtyping import Bool, Float, Int, Integer, Shaped, jaxtyped
from torch import Tensor

__all__ = [
    "Bool",
    "Float",
    "Int",
    "Integer",
    "Shaped",
    "Tensor",
    "typechecked",
    "typecheck",
    "typecheck_enabled",
    "under_transform",
]

F = TypeVar("F", bound=Callable)


class _CheckState:
    """检查开关的唯一可变状态（模块级，仅此一处；模型计算路径本身不读写任何全局量）。"""

    enabled: bool = os.environ.get("FUNCTIONAL_LM_TYPECHECK", "1").strip().lower() not in {
        "0",
        "false",
        "off",
        "no",
    }


def typecheck_enabled() -> bool:
    """当前是否开启运行时形状检查。"""
    return _CheckState.enabled


@contextlib.contextmanager
def typecheck(enabled: bool) -> Iterator[None]:
    """临时开启 / 关闭运行时形状检查：``with typecheck(False): ...``。"""
    previous = _CheckState.enabled
    _CheckState.enabled = bool(enabled)
    try:
        yield
    finally:
        _CheckState.enabled = previous


def typechecked(fn: F) -> F:
    """给函数加上 jaxtyping + beartype 运行时检查的装饰器。

    关闭时它是恒等包装（只多一次 Python 调用）；在 torch.compile 追踪期间，
    ``torch.compiler.is_compiling()`` 为真，dynamo 会把分支常量折叠，图中不留检查代码。
    """
    checked = jaxtyped(typechecker=beartype)(fn)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if torch.compiler.is_compiling() or not _CheckState.enabled:
            return fn(*args, **kwargs)
        return checked(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def under_transform(x: Tensor) -> bool:
    """x 是否处于 torch.compile 追踪或 torch.func 变换（vmap / grad / jvp）之中。

    依赖张量取值的检查（例如 token id 范围）在这些情况下无法做 Python 分支，
    必须让路：eager 下照常报错，变换下跳过。
    """
    if torch.compiler.is_compiling():
        return True
    return bool(torch._C._functorch.is_functorch_wrapped_tensor(x))
