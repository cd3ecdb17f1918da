"""多进程训练：torchrun 环境下的进程组、把参数字典登记给 PyTorch 分布式引擎的薄壳、按秩行事的小工具。

* ``setup(device)``：从 torchrun 的环境变量（RANK、WORLD_SIZE、LOCAL_RANK、MASTER_ADDR …）建立进程组：
  CUDA 上用 NCCL、每个进程一块卡（cuda:LOCAL_RANK），CPU 上用 gloo；集合通信有超时，一个进程死掉时
  其余进程在超时内报错退出，而不是永远挂住。单进程（没有 torchrun）时什么都不做。
* ``ParamShell``：只登记参数的 ``nn.Module``。它按 Hugging Face 键名建出嵌套子模块（``model.layers.3.mlp``
  …），把字典里的每个张量登记成 Parameter；``forward(fn, *args)`` 就是 ``fn(参数字典, *args)``——
  前向仍然是作用在普通字典上的纯函数，壳只是让 DDP / FSDP2 看得见这些参数（梯度 all-reduce、切分）。
* 学生用 DDP（``DistributedDataParallel``）：每个进程一份参数，梯度在反向中按桶 all-reduce（求平均），
  训练器把本进程的损失乘以进程数，平均之后正好是“全局有效 token 上的平均损失”的梯度。
* 教师可选 FSDP2（``fully_shard``）按层切分（``teacher_sharding="shard"``）：每层是一个 FSDP 单元，
  ``GatheredParams`` 在纯函数读到某层的第一个参数时 all-gather 这一层、同时释放上一层，
  所以任何时刻只有一层教师是完整的；没有优化器状态。所有进程以同样的顺序读参数，集合通信一一对上。

模型函数（layers.py、models/）从不导入本模块；只有训练器与命令行用它。
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch import nn

from functional_lm.devices import resolve_device
from functional_lm.errors import RunFailure
from functional_lm.errors import PeerFailure, PeerLost

__all__ = [
    "Dist",
    "SINGLE",
    "setup",
    "teardown",
    "ParamShell",
    "wrap_student",
    "shard_teacher",
    "GatheredParams",
    "all_reduce_sum",
    "broadcast_object",
    "gather_to_main",
    "main_first",
    "on_main",
    "peer_loss_explained",
]

# 集合通信的超时（秒）：一个进程死掉时，其余进程最多等这么久就报错退出。可用环境变量调整。
TIMEOUT_S = float(os.environ.get("FUNCTIONAL_LM_DIST_TIMEOUT", "600"))


@dataclass(frozen=True)
class Dist:
    """本进程在这次运行中的位置：秩、进程数、本机秩与设备。"""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """秩 0：唯一打印、显示进度条、写指标 / 检查点 / 报告 / 最终学生的进程。"""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


SINGLE = Dist()


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return default if value is None else int(value)


def setup(device_name: str = "auto") -> Dist:
    """按 torchrun 的环境变量加入进程组（已加入则沿用），返回本进程的 Dist；单进程时只解析设备。"""
    world = _env_int("WORLD_SIZE", 1)
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    device = resolve_device(device_name)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=TIMEOUT_S))
    return Dist(rank=rank, world_size=world, local_rank=local_rank, device=device)


def teardown() -> None:
    """离开进程组（没有进程组时什么都不做）。"""
    if dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------- 参数壳
class ParamShell(nn.Module):
    """只登记参数字典的 nn.Module（见模块说明）。每个键登记一个 Parameter：共享嵌入的字典里本来就只有
    ``model.embed_tokens.weight`` 一个键（输出投影直接读它），所以共享关系原样保留。"""

    def __init__(self, params: Mapping[str, torch.Tensor], *, trainable: bool = True) -> None:
        super().__init__()
        self.keys = list(params)
        for key, value in params.items():
            *path, leaf = key.split(".")
            module = self
            for part in path:
                if not hasattr(module, part):
                    module.add_module(part, nn.Module())
                module = getattr(module, part)
            module.register_parameter(leaf, nn.Parameter(value.detach(), requires_grad=trainable))

    def params(self) -> dict[str, torch.Tensor]:
        """当前的参数字典（键为 HF 名字，值为壳里登记的 Parameter——DDP / 优化器看到的正是它们）。"""
        return {key: self.get_parameter(key) for key in self.keys}

    def forward(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(参数字典, *args, **kwargs)``：DDP 要求经过模块的 forward，纯函数照旧作用在字典上。"""
        return fn(self.params(), *args, **kwargs)


def wrap_student(shell: ParamShell, info: Dist) -> nn.Module:
    """多进程时把学生的壳包成 DDP（梯度在反向中 all-reduce 求平均）；单进程原样返回。"""
    if not info.enabled:
        return shell
    from torch.nn.parallel import DistributedDataParallel

    ids = [info.device.index] if info.device.type == "cuda" else None
    return DistributedDataParallel(shell, device_ids=ids)  # 壳里没有缓冲区，只有参数


def shard_teacher(params: Mapping[str, torch.Tensor], num_layers: int, info: Dist) -> "GatheredParams":
    """用 FSDP2 把冻结的教师按层切分到各进程，返回按需 all-gather 的参数映射。

    参数留在主机内存里建壳，逐层交给 fully_shard：它把这一层搬到本进程的设备上、切分、只留本进程的一份，
    所以设备上任何时刻最多只有一层完整的教师（放不进一块卡的教师正是为此切分）。
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(info.device.type, (info.world_size,))
    shell = ParamShell(params, trainable=False)
    layers = [shell.get_submodule(f"model.layers.{i}") for i in range(num_layers)]
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(shell, mesh=mesh)  # 根单元：嵌入、最终范数、输出投影
    return GatheredParams(shell, layers)


class GatheredParams(Mapping):
    """FSDP2 切分的教师参数，读起来像普通字典：读到第 i 层的参数时 all-gather 第 i 层、释放上一层。

    根单元（嵌入、最终范数、输出投影）在 ``gathered()`` 上下文内一直完整（分块损失要用输出投影）。
    只在 ``torch.no_grad()`` 下使用（教师不求梯度，释放的层不会被计算图引用）。
    """

    def __init__(self, shell: ParamShell, layers: list[nn.Module]) -> None:
        self.shell, self.layers = shell, layers
        self._current: Optional[int] = None
        self._open = False

    @contextlib.contextmanager
    def gathered(self) -> Iterator["GatheredParams"]:
        """在块内可以读参数；退出时所有单元都重新切分。"""
        self.shell.unshard()
        self._open = True
        try:
            yield self
        finally:
            self._release_layer()
            self.shell.reshard()
            self._open = False

    def _release_layer(self) -> None:
        if self._current is not None:
            self.layers[self._current].reshard()
            self._current = None

    def __getitem__(self, key: str) -> torch.Tensor:
        if not self._open:
            raise RuntimeError("sharded teacher parameters are only readable inside GatheredParams.gathered()")
        if key.startswith("model.layers."):
            index = int(key.split(".")[2])
            if index != self._current:
                self._release_layer()
                self.layers[index].unshard()
                self._current = index
        return self.shell.get_parameter(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self.shell.keys)

    def __len__(self) -> int:
        return len(self.shell.keys)


# ---------------------------------------------------------------- 集合通信的小工具
# 秩 0 独自做的长活（分词建缓存、训练演示教师）可能远超集合通信的超时；其余进程在一个 gloo 协调组上
# 等它，这个组的超时单独设（缺省 24 小时，FUNCTIONAL_LM_SETUP_TIMEOUT 秒）。
SETUP_TIMEOUT_S = float(os.environ.get("FUNCTIONAL_LM_SETUP_TIMEOUT", str(24 * 3600)))
_COORDINATION: list[Any] = []


def _coordination_group() -> Any:
    """等待秩 0 用的 gloo 进程组（CPU 张量，长超时；进程内只建一次）。"""
    if not _COORDINATION:
        _COORDINATION.append(dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=SETUP_TIMEOUT_S)))
    return _COORDINATION[0]


def _comm_device(info: Dist) -> torch.device:
    """集合通信张量放在哪：NCCL 要 CUDA 张量，gloo 用 CPU 张量。"""
    return info.device if info.device.type == "cuda" else torch.device("cpu")


def all_reduce_sum(values: list[float], info: Dist) -> list[float]:
    """各进程的若干个数逐项求和（float64，一次通信）；单进程原样返回。"""
    if not info.enabled:
        return list(values)
    buffer = torch.tensor(values, dtype=torch.float64, device=_comm_device(info))
    dist.all_reduce(buffer)
    return buffer.tolist()


def broadcast_object(obj: Any, info: Dist, *, patient: bool = False) -> Any:
    """把秩 0 的一个可序列化对象发给所有进程（只用于本项目自己的小对象：设置、决定、错误消息）。

    patient=True 时走长超时的协调组：用于等待秩 0 的长活。
    """
    if not info.enabled:
        return obj
    box = [obj if info.is_main else None]
    if patient:
        dist.broadcast_object_list(box, src=0, group=_coordination_group())
    else:
        dist.broadcast_object_list(box, src=0, device=_comm_device(info))
    return box[0]


def gather_to_main(obj: Any, info: Dist) -> Optional[list[Any]]:
    """每个进程交一个小对象，秩 0 拿到按秩排列的列表，其余进程得到 None（例如各进程的 RNG 状态）。"""
    if not info.enabled:
        return [obj]
    out: Optional[list[Any]] = [None] * info.world_size if info.is_main else None
    dist.gather_object(obj, out, dst=0, group=_coordination_group())
    return out


# 表明“对面的进程不在了”的错误文字（gloo / NCCL / c10d 的措辞）；本进程自己的 CUDA / NCCL 错误不算。
_LOST_MARKERS = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "timed out", "Timed out")


@contextlib.contextmanager
def peer_loss_explained(info: Dist, last_good: Callable[[], Any]) -> Iterator[None]:
    """多进程时把“另一个进程不在了”导致的集合通信失败说成一段话：最后一个完好的检查点、怎样继续。"""
    try:
        yield
    except RuntimeError as err:
        lost = isinstance(err, dist.DistNetworkError) or any(m in str(err) for m in _LOST_MARKERS)
        if not info.enabled or not lost or isinstance(err, RunFailure):
            raise
        first = str(err).strip().splitlines()[0][:300]
        raise PeerLost(
            f"another process of this run stopped or became unreachable ({first}); rank {info.rank} stops too. "
            f"The last good checkpoint is {last_good() or 'none (no checkpoint was written yet)'}; "
            f"restart all processes with --resume"
        ) from err


def _outcome_from_main(info: Dist) -> Any:
    """非秩 0：等秩 0 公布结果；它失败了就抛 PeerFailure，它死了就说清楚（PeerLost）。"""
    try:
        status, value = broadcast_object(None, info, patient=True)
    except RuntimeError as err:
        raise PeerLost(f"rank 0 stopped or became unreachable while this process waited for it ({err})") from err
    if status == "error":
        raise PeerFailure(f"rank 0 failed: {value}")
    return value


@contextlib.contextmanager
def _publishing(info: Dist, result: list[Any]) -> Iterator[None]:
    """秩 0：块里的事成功后把 result 里的值（没有则 None）公布给其余进程；失败时公布原因并原样抛出。"""
    try:
        yield
    except BaseException as err:
        broadcast_object(("error", f"{type(err).__name__}: {err}"), info, patient=True)
        raise
    broadcast_object(("ok", result[0] if result else None), info, patient=True)


def on_main(fn: Callable[[], Any], info: Dist) -> Any:
    """只在秩 0 上运行 fn（例如运行目录的检查、写检查点），把结果或失败广播给所有进程。

    秩 0 失败时原样抛出它的异常；其余进程抛 PeerFailure（命令行不重复打印秩 0 已经说过的话）。
    """
    if not info.enabled:
        return fn()
    if not info.is_main:
        return _outcome_from_main(info)
    result: list[Any] = []
    with _publishing(info, result):
        result.append(fn())
    return result[0]


@contextlib.contextmanager
def main_first(info: Dist) -> Iterator[None]:
    """秩 0 先做块里的事（例如分词建缓存），成功后其余进程再做（它们会直接复用秩 0 的结果）。"""
    if not info.enabled:
        yield
    elif info.is_main:
        with _publishing(info, []):
            yield
    else:
        _outcome_from_main(info)
        yield
