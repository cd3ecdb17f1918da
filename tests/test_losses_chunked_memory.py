"""分块蒸馏损失的内存承诺，按结构验证（不计时、不量 RSS）：前向 + 反向期间，任何被创建或被 autograd
保存的张量都不超过 chunk_size × vocab 个元素——整批的 (tokens × vocab) logits 从未出现。

做法：TorchDispatchMode 记下每个算子输出的元素数，saved_tensors_hooks 记下每个被保存张量的元素数。
对照组是普通版损失：同样的记录器必须看到 tokens × vocab 的张量，证明记录器本身有效。
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from functional_lm.losses import DIVERGENCES, chunked_distillation_loss, distillation_loss

TOKENS, HIDDEN, VOCAB, REAL, CHUNK = 64, 8, 50, 45, 16  # 权重 50×8=400、隐藏 64×8=512 < 块 16×50=800 < 全部 64×50=3200


class _Largest(TorchDispatchMode):
    """记录分派期间各算子输出里最大的元素数。"""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in tree_flatten(out)[0]:
            if isinstance(leaf, torch.Tensor):
                self.largest = max(self.largest, leaf.numel())
        return out


def _inputs():
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, TOKENS // 2, HIDDEN, generator=gen, requires_grad=True)
    weight = torch.randn(VOCAB, HIDDEN, generator=gen, requires_grad=True)
    t_hidden = torch.randn(2, TOKENS // 2, HIDDEN, generator=gen)
    t_weight = torch.randn(VOCAB, HIDDEN, generator=gen)
    labels = torch.randint(0, REAL, (2, TOKENS // 2), generator=gen)
    return hidden, weight, t_hidden, t_weight, labels


def _measure(loss_fn):
    """loss_fn() 的前向与反向中：(创建的最大张量, autograd 保存的最大张量) 的元素数。"""
    saved = [0]

    def pack(tensor):
        saved[0] = max(saved[0], tensor.numel())
        return tensor

    with _Largest() as mode, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss_fn().backward()
    return mode.largest, saved[0]


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_chunked_loss_never_creates_or_saves_a_full_logit_tensor(divergence):
    hidden, weight, t_hidden, t_weight, labels = _inputs()
    created, saved = _measure(lambda: chunked_distillation_loss(
        hidden, weight, labels, teacher_hidden=t_hidden, teacher_weight=t_weight, chunk_size=CHUNK,
        divergence=divergence, real_vocab_size=REAL,
    ))
    assert created <= CHUNK * VOCAB, (divergence, created)
    assert saved <= CHUNK * VOCAB, (divergence, saved)
    assert hidden.grad is not None and weight.grad is not None


def test_the_recorder_sees_the_plain_losss_full_logits():
    hidden, weight, t_hidden, t_weight, labels = _inputs()
    created, saved = _measure(lambda: distillation_loss(
        hidden @ weight.T, t_hidden @ t_weight.T, labels, real_vocab_size=REAL,
    ))
    assert created >= TOKENS * REAL and saved >= TOKENS * REAL
