"""各命令共用的命令行选项与参数类型（不导入 torch：参数在重的导入之前就核对）。"""

from __future__ import annotations

import argparse

__all__ = ["TEXT_SPLITS", "positive_int"]

# 与 functional_lm.data.TEXT_SPLITS 相同（这里不导入 data：它会带进 torch）；测试保证两者一致。
TEXT_SPLITS = ("paragraph", "file", "line")


def positive_int(text: str) -> int:
    """argparse 的类型：正整数，否则给出 “expected a positive integer” 的一句话。"""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value
