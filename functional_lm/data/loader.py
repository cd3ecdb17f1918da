"""批加载器：从 PackedDataset 按种子确定的顺序取批，产出 (input_ids, labels, loss_mask)，位置可保存 / 恢复。

顺序：第 e 轮的块顺序 = ``np.random.default_rng([seed, e]).permutation(num_blocks)``（shuffle=False 时为原序），
只由 (seed, epoch) 决定，所以恢复时只需记住 (epoch, position) 两个整数——中断后恢复的运行与不间断的运行
看到完全相同的批。
    * ``for batch in loader``：从当前位置取到本轮结束（本轮已取完则开始下一轮）；
    * ``loader.next_batch()``：无限地取下一批，自动跨轮；
    * ``loader.batch_at(epoch, position)``：随机读取某一批，不改变位置；
    * ``state_dict()`` / ``load_state_dict()``：{epoch, position, seed, batch_size, num_blocks, shuffle, drop_last}。
"""

from __future__ import annotations

import math
from typing import Any, Iterator, NamedTuple

import numpy as np
import torch

from functional_lm.data.packing import PackedDataset
from functional_lm.typing import Bool, Int, Tensor

__all__ = ["Batch", "BatchLoader"]


class Batch(NamedTuple):
    """一批训练数据（形状 b t，t = seq_len）。"""

    input_ids: Int[Tensor, "b t"]  # int64
    labels: Int[Tensor, "b t"]  # int64，被遮处为 -100
    loss_mask: Bool[Tensor, "b t"]  # 是否计损失

    def to(self, device: Any, non_blocking: bool = False) -> "Batch":
        return Batch(*(x.to(device, non_blocking=non_blocking) for x in self))


class BatchLoader:
    """确定性、可恢复的批加载器（见模块说明）。"""

    def __init__(
        self,
        dataset: PackedDataset,
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        pin_memory: bool = False,
    ) -> None:
        if batch_size < 1 or batch_size > len(dataset):
            raise ValueError(
                f"batch_size={batch_size} must be between 1 and the number of blocks ({len(dataset)})"
            )
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.pin_memory = pin_memory
        self.epoch = 0
        self.position = 0  # 本轮已经交出的批数
        self._order_cache: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        """每轮的批数。"""
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """第 epoch 轮的块顺序（只由 seed 与 epoch 决定）。"""
        if self._order_cache is not None and self._order_cache[0] == epoch:
            return self._order_cache[1]
        n = len(self.dataset)
        order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
        self._order_cache = (epoch, order)
        return order

    def batch_at(self, epoch: int, position: int) -> Batch:
        """第 epoch 轮的第 position 批（纯读取：不改变加载器的位置；验证用它取固定的批）。"""
        if not 0 <= position < len(self):
            raise IndexError(f"batch position {position} out of range: an epoch has {len(self)} batches")
        if epoch < 0:
            raise IndexError(f"epoch must be >= 0, got {epoch}")
        order = self.epoch_order(epoch)
        indices = order[position * self.batch_size : (position + 1) * self.batch_size]
        x, y, m = self.dataset.examples(indices)
        batch = Batch(torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(m))
        return Batch(*(t.pin_memory() for t in batch)) if self.pin_memory else batch

    def next_batch(self) -> Batch:
        """交出下一批并前移位置；本轮取完时自动进入下一轮。"""
        if self.position >= len(self):
            self.epoch += 1
            self.position = 0
        batch = self.batch_at(self.epoch, self.position)
        self.position += 1  # 先更新状态再交出：交出 k 批后 state_dict 的 position 就是 k
        return batch

    def __iter__(self) -> Iterator[Batch]:
        if self.position >= len(self):
            self.epoch += 1
            self.position = 0
        epoch = self.epoch
        while self.epoch == epoch and self.position < len(self):
            yield self.next_batch()

    def state_dict(self) -> dict[str, int | bool]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "num_blocks": len(self.dataset),
            "shuffle": self.shuffle,
            "drop_last": self.drop_last,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """恢复位置与种子；批大小、块数等与当前数据不一致时拒绝（否则恢复后的批不同）。"""
        for key, current in (
            ("batch_size", self.batch_size),
            ("num_blocks", len(self.dataset)),
            ("drop_last", self.drop_last),
        ):
            if key in state and state[key] != current:
                raise ValueError(f"cannot resume: saved {key}={state[key]} but this loader has {key}={current}")
        self.seed = int(state["seed"])
        self.shuffle = bool(state.get("shuffle", self.shuffle))
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self._order_cache = None
