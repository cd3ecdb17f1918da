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
    * 环境变量 ``FUNCTIONAL_LM_TYPECHECK=0`` 在导入时关闭；``typecheck(False)`` 直接调用即全局关闭，
      写成 ``with typecheck(False): ...`` 则只在块内关闭、退出时恢复原设置；
    * 形状错误抛出简短的 ``jaxtyping.TypeCheckError``：只写函数、参数、实际值、期望注解与已绑定的维度，
      不再附上 jaxtyping 默认打印的全部实参（参数字典可有上百个张量）；
    * ``torch.compile`` 追踪期间自动让路：jaxtyping 的包装器在 dynamo 中会误报，
      因此追踪时直接调用原函数（检查在 eager 下已经做过）。
"""

from __future__ import annotations

import functools
import os
import re
from typing import Callable, Optional, TypeVar

import torch
from beartype import beartype
from jaxtyping import Bool, Float, Int, Integer, Shaped, TypeCheckError, jaxtyped
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


class _Setting:
    """``typecheck(...)`` 的返回值：构造时已切换全局开关；作为上下文管理器使用时，退出时恢复原设置。"""

    def __init__(self, enabled: bool) -> None:
        self.enabled = bool(enabled)
        self.previous = _CheckState.enabled
        _CheckState.enabled = self.enabled

    def __enter__(self) -> "_Setting":
        return self

    def __exit__(self, *exc_info: object) -> None:
        _CheckState.enabled = self.previous

    def __repr__(self) -> str:
        return f"typecheck({self.enabled})"


def typecheck(enabled: bool) -> _Setting:
    """开启 / 关闭运行时形状检查。

    ``typecheck(False)`` 直接调用：全局关闭，直到再次 ``typecheck(True)``；
    ``with typecheck(False): ...``：只在块内关闭，退出（包括异常退出）时恢复进入前的设置。
    """
    return _Setting(enabled)


# ---------------------------------------------------------------- 简短的类型错误消息
_MAX_FIELD = 200  # 单个字段（实际值、期望注解）的最大字符数
_MAX_MESSAGE = 800  # 整条消息的上限（解析失败的回退路径也不超过它）
_SEPARATOR = "\n----------------------\n"
_CALLED_WITH = "Called with parameters"
_AXES_HEADER = "The current values for each jaxtyping axis annotation are as follows."


def _clip(text: str, limit: int) -> str:
    """截断过长的字段，保留开头并以 … 标明。"""
    text = text.strip()
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _first(pattern: str, text: str) -> Optional[str]:
    """正则（多行、``.`` 可跨行）的第一个分组；无匹配为 None。"""
    match = re.search(pattern, text, re.MULTILINE | re.DOTALL)
    return match.group(1) if match else None


def _axis_bindings(message: str) -> str:
    """jaxtyping 消息末尾的维度绑定（``d=5`` 等），合成一行；没有时为空串。"""
    if _AXES_HEADER not in message:
        return ""
    lines = message.split(_AXES_HEADER, 1)[1].strip().splitlines()
    bindings = ", ".join(line.strip() for line in lines if "=" in line)
    return re.sub(r"torch\.Size\(\[([^\]]*)\]\)", r"[\1]", bindings)  # batch=torch.Size([2]) → batch=[2]


def _expected(annotation: str) -> str:
    """``<class 'Float[Tensor, 'd']'>.`` → ``Float[Tensor, 'd']``。"""
    annotation = annotation.strip().removesuffix(".")
    if annotation.startswith("<class '") and annotation.endswith("'>"):
        annotation = annotation[len("<class '") : -len("'>")]
    return annotation


def _actual(value: str) -> str:
    """``f32[2,5](torch)`` → ``f32[2,5]``；其它值压成一行并截断。"""
    return _clip(" ".join(re.sub(r"\(torch\)", "", value).split()), _MAX_FIELD)


def _fallback(message: str) -> str:
    """格式与预期不符时：在 “Called with parameters” 处截断，去掉分隔线。"""
    head = message.split(_CALLED_WITH, 1)[0].rstrip().removesuffix("-" * 22).rstrip()
    return _clip(head, _MAX_MESSAGE)


def _short_message(message: str) -> str:
    """把 jaxtyping 的长错误消息压成几行：函数、参数（或返回值）、实际值、期望注解、已绑定维度。"""
    head = message.split(_SEPARATOR, 1)[0]
    function = _first(r"^Type-check error whilst checking the (?:parameters|return value) of ([^\s]+?)\.?$", head)
    actual = _first(r"^Actual value: (.*?)\nExpected type: ", head)  # 实际值可能跨多行（例如字典）
    expected = _first(r"^Expected type: ([^\n]*)", head)
    if function is None:
        return _fallback(message)
    if "whilst checking the return value" in head:
        what = "return value"
    else:
        name = _first(r"typechecking parameter '([^']+)'", head)
        what = f"argument '{name}'" if name else "arguments (no single argument is at fault)"
    lines = [f"{function}: {what} does not match its annotation"]
    if actual is not None and expected is not None:
        lines += [f"  actual:   {_actual(actual)}", f"  expected: {_clip(_expected(expected), _MAX_FIELD)}"]
    bindings = _axis_bindings(message)
    if bindings:
        lines.append(f"  dimensions bound so far: {_clip(bindings, _MAX_FIELD)}")
    return _clip("\n".join(lines), _MAX_MESSAGE)


def _shortened(error: TypeCheckError) -> TypeCheckError:
    """同类（TypeCheckError）的新异常，带简短消息；打上标记，外层包装器不再重复处理。"""
    short = TypeCheckError(_short_message(str(error)))
    short._functional_lm_short = True  # type: ignore[attr-defined]
    return short


def typechecked(fn: F) -> F:
    """给函数加上 jaxtyping + beartype 运行时检查的装饰器。

    关闭时它是恒等包装（只多一次 Python 调用）；在 torch.compile 追踪期间，
    ``torch.compiler.is_compiling()`` 为真，dynamo 会把分支常量折叠，图中不留检查代码。
    检查失败时抛出简短的 TypeCheckError（``from None``：不再串联打印 jaxtyping 的原始长消息）。
    """
    checked = jaxtyped(typechecker=beartype)(fn)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if torch.compiler.is_compiling() or not _CheckState.enabled:
            return fn(*args, **kwargs)
        try:
            return checked(*args, **kwargs)
        except TypeCheckError as error:
            if getattr(error, "_functional_lm_short", False):
                raise  # 内层函数已压缩过的错误，原样向上传
            raise _shortened(error) from None

    return wrapper  # type: ignore[return-value]


def under_transform(x: Tensor) -> bool:
    """x 是否处于 torch.compile 追踪或 torch.func 变换（vmap / grad / jvp）之中。

    依赖张量取值的检查（例如 token id 范围）在这些情况下无法做 Python 分支，
    必须让路：eager 下照常报错，变换下跳过。
    """
    if torch.compiler.is_compiling():
        return True
    return bool(torch._C._functorch.is_functorch_wrapped_tensor(x))
