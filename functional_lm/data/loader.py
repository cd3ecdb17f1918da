"""批加载器：从 PackedDataset 按种子确定的顺序取批，产出 (input_ids, labels, loss_mask, segment_ids, block_ids)，位置可保存 / 恢复。

顺序：第 e 轮的块顺序 = ``np.random.default_rng([seed, e]).permutation(num_blocks)``（shuffle=False 时为原序），
只由 (seed, epoch) 决定，所以恢复时只需记住 (epoch, position) 两个整数——中断后恢复的运行与不间断的运行
看到完全相同的批。

多进程与梯度累积（world-size 不变性）：一个优化步消耗一个**全局批** G = batch_size × world_size ×
accumulation 个块，即本轮顺序中的第 k 段 ``order[k·G : (k+1)·G]``；第 m 个微批里第 r 个进程取
``order[k·G + m·B·W + r·B : ... + B]``（B = batch_size，W = world_size）。所以只要 G 相同，无论几个进程、
每个进程几条、累积几次，每个优化步读的都是同一组块；一轮有 ⌊N/G⌋ 个优化步，优化步从不跨轮。
    * ``for batch in loader``：从当前位置取到本轮结束（本轮已取完则开始下一轮）；
    * ``loader.next_batch()``：无限地取本进程的下一个微批，自动跨轮；
    * ``loader.batch_at(epoch, position)``：随机读取某一微批，不改变位置；
    * ``state_dict()`` / ``load_state_dict()``：位置记成“本轮已消耗的块数”，换一种 (B, W, 累积) 组合、
      只要 G 不变就能接着读（例如 2 进程的检查点在 1 个进程上恢复）。
"""

from __future__ import annotations

import math
from typing import Any, Iterator, NamedTuple, Optional

import numpy as np
import torch

from functional_lm.data.packing import PackedDataset
from functional_lm.shapes import Bool, Int, Tensor

__all__ = ["Batch", "BatchLoader"]


class Batch(NamedTuple):
    """一批训练数据（形状 b t，t = seq_len）。"""

    input_ids: Int[Tensor, "b t"]  # int64
    labels: Int[Tensor, "b t"]  # int64，被遮处为 -100
    loss_mask: Bool[Tensor, "b t"]  # 是否计损失
    segment_ids: Optional[Int[Tensor, "b t"]] = None  # int64，输入 token 所在文档的编号（每行从 0 起、不减）
    block_ids: Optional[Int[Tensor, "b"]] = None  # int64，每行是数据集的第几个块（教师缓存按它取目标）

    def to(self, device: Any, non_blocking: bool = False) -> "Batch":
        return Batch(*(None if x is None else x.to(device, non_blocking=non_blocking) for x in self))

    def rows(self, start: int, stop: int) -> "Batch":
        """第 start … stop−1 行（视图，不复制）。"""
        return Batch(*(None if x is None else x[start:stop] for x in self))


class BatchLoader:
    """确定性、可恢复、按进程切分的批加载器（见模块说明）。"""

    def __init__(
        self,
        dataset: PackedDataset,
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        pin_memory: bool = False,
        rank: int = 0,
        world_size: int = 1,
        accumulation: int = 1,
        document_mask: bool = False,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must lie in [0, world_size={world_size})")
        global_batch = batch_size * world_size * accumulation
        if batch_size < 1 or global_batch > len(dataset):
            raise ValueError(
                f"a global batch of {global_batch} blocks (batch_size={batch_size} × {world_size} process(es) × "
                f"{accumulation} accumulation step(s)) must fit the {len(dataset)} blocks of the data"
            )
        if global_batch != batch_size and not drop_last:
            raise ValueError("drop_last=False is only supported for one process without accumulation")
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.pin_memory = pin_memory
        self.rank, self.world_size, self.accumulation = rank, world_size, accumulation
        self.document_mask = document_mask  # 标签属于下一篇文档处不计损失（见 packing 的说明）
        self.epoch = 0
        self.position = 0  # 本轮已经交出的微批数
        self._order_cache: tuple[int, np.ndarray] | None = None

    def relayout(
        self, *, rank: int = 0, world_size: int = 1, accumulation: int = 1, pin_memory: bool = False,
        document_mask: Optional[bool] = None,
    ) -> "BatchLoader":
        """同一份数据、种子与位置，换成某个进程在 (world_size, accumulation) 布局下的加载器（训练器用）；
        document_mask 为 None 时沿用本加载器的设置。"""
        loader = BatchLoader(
            self.dataset, self.batch_size, seed=self.seed, shuffle=self.shuffle, drop_last=self.drop_last,
            pin_memory=pin_memory, rank=rank, world_size=world_size, accumulation=accumulation,
            document_mask=self.document_mask if document_mask is None else document_mask,
        )
        loader.epoch = self.epoch
        loader.position = self.position * self.batch_size * self.world_size // (loader.batch_size * world_size)
        return loader

    @property
    def global_batch(self) -> int:
        """一个优化步消耗的块数 G = batch_size × world_size × accumulation。"""
        return self.batch_size * self.world_size * self.accumulation

    def __len__(self) -> int:
        """每轮的微批数（每个进程）：⌊N/G⌋ 个优化步 × accumulation。"""
        n = len(self.dataset)
        if not self.drop_last:
            return math.ceil(n / self.batch_size)
        return n // self.global_batch * self.accumulation

    def epoch_order(self, epoch: int) -> np.ndarray:
        """第 epoch 轮的块顺序（只由 seed 与 epoch 决定）。"""
        if self._order_cache is not None and self._order_cache[0] == epoch:
            return self._order_cache[1]
        n = len(self.dataset)
        order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
        self._order_cache = (epoch, order)
        return order

    def _rows(self, position: int) -> slice:
        """第 position 个微批里本进程的块在本轮顺序中的位置。"""
        step, micro = divmod(position, self.accumulation)
        start = step * self.global_batch + micro * self.batch_size * self.world_size + self.rank * self.batch_size
        return slice(start, start + self.batch_size)

    def batch_at(self, epoch: int, position: int) -> Batch:
        """第 epoch 轮的第 position 个微批（本进程的那一份；纯读取，不改变位置；验证用它取固定的批）。"""
        if not 0 <= position < len(self):
            raise IndexError(f"batch position {position} out of range: an epoch has {len(self)} batches")
        if epoch < 0:
            raise IndexError(f"epoch must be >= 0, got {epoch}")
        indices = self.epoch_order(epoch)[self._rows(position)]
        arrays = self.dataset.examples(indices, self.document_mask)
        batch = Batch(*(torch.from_numpy(a) for a in arrays), torch.from_numpy(np.asarray(indices, dtype=np.int64)))
        return Batch(*(t.pin_memory() for t in batch)) if self.pin_memory else batch

    def next_batch(self) -> Batch:
        """交出下一批并前移位置；本轮取完时自动进入下一轮。"""
        if self.position >= len(self):
            self.epoch += 1
            self.position = 0
        batch = self.batch_at(self.epoch, self.position)
        self.position += 1  # 先更新状态再交出：交出 k 批后 state_dict 的 position 就是 k
        return batch

    def upcoming(self, n: int) -> list[Batch]:
        """接下来的 n 批（不前移位置；跨轮时进入下一轮的顺序）：给提前取目标的来源（服务端教师）用。"""
        epoch, position, out = self.epoch, self.position, []
        for _ in range(n):
            if position >= len(self):
                epoch, position = epoch + 1, 0
            out.append(self.batch_at(epoch, position))
            position += 1
        return out

    def __iter__(self) -> Iterator[Batch]:
        if self.position >= len(self):
            self.epoch += 1
            self.position = 0
        epoch = self.epoch
        while self.epoch == epoch and self.position < len(self):
            yield self.next_batch()

    def state_dict(self) -> dict[str, int | bool]:
        """位置以“本轮已消耗的块数”记录（consumed），与进程数、每进程批大小无关。"""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "consumed": self.position * self.batch_size * self.world_size,
            "global_batch": self.global_batch,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "accumulation": self.accumulation,
            "num_blocks": len(self.dataset),
            "shuffle": self.shuffle,
            "drop_last": self.drop_last,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """恢复位置与种子。块数或全局批 G 不同则拒绝（恢复后的批就不同了）；G 相同时换算微批位置。"""
        for key, current in (("num_blocks", len(self.dataset)), ("drop_last", self.drop_last)):
            if key in state and state[key] != current:
                raise ValueError(f"cannot resume: saved {key}={state[key]} but this loader has {key}={current}")
        saved_global = int(state.get("global_batch", state["batch_size"]))
        if saved_global != self.global_batch:
            raise ValueError(
                f"cannot resume: the global batch changed: the checkpoint consumed {saved_global} blocks per "
                f"optimizer step ({_layout(state)}), this run would consume {self.global_batch} "
                f"({_layout(self.state_dict())}); keep batch_size × processes × gradient_accumulation_steps equal"
            )
        consumed = int(state.get("consumed", int(state["position"]) * int(state["batch_size"])))
        self.seed = int(state["seed"])
        self.shuffle = bool(state.get("shuffle", self.shuffle))
        self.epoch = int(state["epoch"])
        self.position = consumed // (self.batch_size * self.world_size)
        self._order_cache = None


def _layout(state: dict[str, Any]) -> str:
    """“batch_size B × W 个进程 × A 次累积”的文字说明。"""
    return (
        f"batch_size {state['batch_size']} × {state.get('world_size', 1)} process(es) × "
        f"{state.get('accumulation', 1)} accumulation step(s)"
    )
