"""基准脚本共用：--smoke 的极小模型，结果行（本项目 vs 同一次运行里测得的参照）与比值表。

``--preset smoke``（bench_train 为 ``--student smoke``）是 1 层、隐藏 64、词表 256 的模型：编译变体的耗时
主要花在 dynamo 逐层追踪与 inductor 生成/编译 C++ 内核上，1 层让冒烟运行保持在几十秒以内；三个脚本用
同一个形状，磁盘上的 inductor 缓存可以彼此复用。

每个基准把测量整理成若干行，``main(argv)`` 在返回值的 ``"rows"`` 里交出它们，并在打印的 JSON 之前
排成一张表。一行是一个字典：

    name       行名（表的第一列；不含空白）
    unit       单位（tok/s、MiB、s ……；不含空白）
    ours       本项目一侧的值
    reference  参照一侧的值；没有参照的行为 None
    ratio      ours / reference，由脚本从原始测量（如耗时）自己算出；没有参照时为 None

数字一律打印 4 位有效数字（≥ 1000 时打印整数并加千分位逗号），比值后缀 ``x``。
"""

from __future__ import annotations

import math
from typing import Optional

from functional_lm.allocator import tune_malloc

# 两边（本项目与参照）在同一个进程设置下测量：导入即对本进程应用项目的 malloc 调优（见 allocator.py），
# 子进程（bench_loss、bench_train 的每个变体）同样导入本模块，所以比值不会把分配器的差别算到模型头上。
MALLOC_TUNED = tune_malloc()

__all__ = ["MALLOC_TUNED", "SMOKE_MODEL", "model_config", "parse_with_smoke", "row", "format_table", "print_table", "parse_number"]

# --smoke 的模型形状：即 tiny 预设（隐藏 64、4 头、2 个 KV 头、前馈 128、词表 256）减到 1 层。
SMOKE_MODEL = dict(
    hidden_size=64, num_layers=1, num_heads=4, num_kv_heads=2, intermediate_size=128,
    vocab_size=256, max_seq_len=128, rope_theta=10000.0,
)


def model_config(preset: str):
    """按名字取模型配置："smoke" 为 SMOKE_MODEL，其余交给 functional_lm.get_preset。"""
    from functional_lm import ModelConfig, get_preset

    return ModelConfig(**SMOKE_MODEL) if preset == "smoke" else get_preset(preset)


def parse_with_smoke(parser, argv, smoke: dict):
    """加上 ``--smoke`` 并解析：给了它就换上 smoke 缺省值再解析一次，命令行上显式给出的参数仍然优先
    （bench_loss、bench_train 的子进程拿到同样的 argv，也会这样做）。"""
    parser.add_argument("--smoke", action="store_true", help="极小尺寸试跑 / tiny sizes: " + str(smoke))
    args = parser.parse_args(argv)
    if args.smoke:
        parser.set_defaults(**smoke)
        args = parser.parse_args(argv)
    return args


def row(name: str, unit: str, ours: float, reference: Optional[float] = None, ratio: Optional[float] = None) -> dict:
    """组装一行；有参照就必须给出比值，反之亦然。"""
    if (reference is None) != (ratio is None):
        raise ValueError(f"row {name!r}: reference and ratio go together")
    return {"name": name, "unit": unit, "ours": ours, "reference": reference, "ratio": ratio}


def _fmt(value: Optional[float]) -> str:
    """表中的一个数字：None 为 "-"，非有限值原样，≥ 1000 打印整数（带逗号），其余 4 位有效数字。"""
    if value is None:
        return "-"
    if not math.isfinite(value):
        return str(value)
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.4g}"


def parse_number(text: str) -> Optional[float]:
    """``_fmt`` 的逆运算（测试用）：去掉千分位逗号与比值的 x 后缀，"-" 为 None。"""
    if text == "-":
        return None
    return float(text.rstrip("x").replace(",", ""))


def format_table(title: str, rows: list[dict], ours_label: str = "ours", reference_label: str = "reference") -> str:
    """把若干行排成等宽的文本表：标题、表头，然后每行 name unit ours reference ratio。"""
    header = ["row", "unit", ours_label, reference_label, "ratio"]
    cells = [header] + [
        [r["name"], r["unit"], _fmt(r["ours"]), _fmt(r["reference"]), "-" if r["ratio"] is None else _fmt(r["ratio"]) + "x"]
        for r in rows
    ]
    widths = [max(len(line[i]) for line in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))) for line in cells]
    return "\n".join([title, *lines])


def print_table(title: str, rows: list[dict], ours_label: str = "ours", reference_label: str = "reference") -> None:
    print(format_table(title, rows, ours_label, reference_label), flush=True)
