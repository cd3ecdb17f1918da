"""设备选择：把用户给的设备名（``auto``、``cpu``、``cuda``、``cuda:1``、``mps``）解析成 ``torch.device``。

``auto`` = 有 CUDA 时用 CUDA，否则 CPU。未知名字或本机没有的设备都是一行说清楚的 ValueError，
而不是之后在某个张量拷贝里冒出来的 RuntimeError（例如 safetensors 的 “pin_memory” 报错）。
模型函数（layers.py、models/）从不提到设备；设备只从命令行 / 训练器流到加载与生成。
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["DEVICE_CHOICES", "resolve_device"]

DEVICE_CHOICES = "auto, cpu, cuda, cuda:N or mps"


def _unknown(name: str) -> ValueError:
    return ValueError(f"--device {name!r} is not a device name; expected {DEVICE_CHOICES}")


def _check_cuda(name: str, device: torch.device) -> None:
    """CUDA 设备必须真的可用，编号必须存在。"""
    if not torch.cuda.is_available():
        built = "this PyTorch build has no CUDA support" if torch.version.cuda is None else "no GPU is visible"
        raise ValueError(f"--device {name}: CUDA is not available on this machine ({built}); use --device cpu")
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise ValueError(f"--device {name}: this machine has {count} CUDA device(s), numbered 0..{count - 1}")


def resolve_device(name: Optional[str | torch.device] = "auto") -> torch.device:
    """设备名 → torch.device；不认识或不可用时抛出点名参数的 ValueError。"""
    if isinstance(name, torch.device):
        name = str(name)
    text = (name or "auto").strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise _unknown(text) from None
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        _check_cuda(text, device)
        return device
    if device.type == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise ValueError(f"--device {text}: Apple MPS is not available on this machine; use --device cpu")
        return device
    raise _unknown(text)
