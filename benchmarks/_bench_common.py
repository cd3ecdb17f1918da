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
    ratio      ours / reference，由脚本从原始测量（如耗时）自己算出；没有参照时必须为 None，
               有参照也可以为 None（进程开销行：两个小百分比之比没有意义）

数字一律打印 4 位有效数字（≥ 1000 时打印整数并加千分位逗号），比值后缀 ``x``。

进程开销行（issue 12）：每个被计时的变体在 tokens/s 行旁边另有两行，两边都只统计计时的那几步（不含预热、编译）：

    <变体>_sys      %user        100 · 系统态 CPU 秒 / 用户态 CPU 秒（getrusage 的 ru_stime / ru_utime 增量）
    <变体>_faults   faults/step  每个计时步的次缺页数（ru_minflt 增量 / 步数）

它们由 ``Usage``（getrusage(RUSAGE_SELF) 的快照与差值）与 ``measured``（把一段 with 块的差值累加进字典）
测得，``usage_rows`` 排成两行；比值一律为 None。在子进程里运行的变体（bench_loss、bench_train）由子进程
自己测量计时步的差值，放进它打印的 JSON（``Usage.as_dict``），父进程用 ``Usage.from_dict`` 读回。

结果文件（``--out FILE``，每个脚本都有；``parse_with_smoke`` 加上这个参数）：脚本结束时 ``write_result`` 把
一次运行写成一个 JSON 对象——docs/benchmarks.md 的表格引用的就是 ``benchmarks/results/`` 里这样的文件，而不是手抄的数字：

    benchmark  脚本名（如 bench_generate）
    command    重现这次运行的命令行（``python benchmarks/<脚本>.py <参数>``）
    machine    机器记录（``machine_record``）：CPU 型号、逻辑核数与本进程可用的核数、torch 线程数、
               运行前后的 1/5/15 分钟负载、torch / transformers / python 版本、平台、malloc 调优、
               CUDA 设备名（有的话）、UTC 日期时间
    record     脚本打印的那行 JSON（各脚本自己的字段）
    rows       比值表的各行（未取整）

已有的文件不覆盖（结果文件是别人引用的数据）：解析参数时就拒绝，写入时用 link 原子地“只在不存在时创建”。
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import math
import os
import platform
import resource
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Optional

from functional_lm.allocator import tune_malloc

# 两边（本项目与参照）在同一个进程设置下测量：导入即对本进程应用项目的 malloc 调优（见 allocator.py），
# 子进程（bench_loss、bench_train 的每个变体）同样导入本模块，所以比值不会把分配器的差别算到模型头上。
MALLOC_TUNED = tune_malloc()

__all__ = [
    "MALLOC_TUNED", "SMOKE_MODEL", "PROCESS_UNITS", "Usage", "measured", "usage_rows", "step_rows", "run_workers", "process_note",
    "model_config", "FAMILY_MODELS", "parse_with_smoke", "row", "format_table", "print_table", "parse_number",
    "cpu_model", "machine_record", "command_line", "write_result", "hf_model_from_params",
]
# 进程开销行的单位：这样的行允许有参照而没有比值。
PROCESS_UNITS = ("%user", "faults/step")

# --smoke 的模型形状：即 tiny 预设（隐藏 64、4 头、2 个 KV 头、前馈 128、词表 256）减到 1 层。
SMOKE_MODEL = dict(
    hidden_size=64, num_layers=1, num_heads=4, num_kv_heads=2, intermediate_size=128,
    vocab_size=256, max_seq_len=128, rope_theta=10000.0,
)


# --family 的模型：各家族真实检查点的形状，缩到本机放得下（层数、宽度、专家数变小；每头维度、路由方式、
# MLA 的秩之比、YaRN 照真实检查点）。qwen2 即缺省的学生。
FAMILY_MODELS: dict[str, dict] = {
    "qwen2": {},
    # Qwen3-0.6B 的块：head_dim 128 ≠ 隐藏 / 头数，QK-norm，共享嵌入
    "qwen3": dict(family="qwen3", qkv_bias=False, hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=4,
                  attention_head_dim=128, intermediate_size=1536, max_seq_len=1024),
    # Qwen3-30B-A3B 的块：128 个专家里选 8 个 → 这里 32 选 8，专家宽 256，权重重新归一，不共享输出头
    "qwen3_moe": dict(family="qwen3_moe", qkv_bias=False, hidden_size=512, num_layers=4, num_heads=8, num_kv_heads=2,
                      attention_head_dim=64, intermediate_size=1536, num_experts=32, num_experts_per_tok=8,
                      moe_intermediate_size=256, norm_topk_prob=True, tie_word_embeddings=False, max_seq_len=1024),
    # DeepSeek-V3 的块：MLA（q 秩 256、潜变量 128、nope 64 + rope 32、v 64）、YaRN ×4（含 mscale_all_dim）、
    # 第 1 层稠密、32 个路由专家分 4 组选 2 组里的 8 个 + 1 个共享专家；词表是 DeepSeek 的 129,280
    "deepseek_v3": dict(family="deepseek_v3", qkv_bias=False, hidden_size=512, num_layers=4, num_heads=8,
                        num_kv_heads=8, intermediate_size=1536, vocab_size=129280, max_seq_len=1024,
                        q_lora_rank=256, kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
                        num_experts=32, num_experts_per_tok=8, moe_intermediate_size=256, n_group=4, topk_group=2,
                        n_shared_experts=1, first_k_dense_replace=1, routed_scaling_factor=2.5, norm_topk_prob=True,
                        tie_word_embeddings=False, rope_theta=10000.0,
                        rope_scaling=dict(factor=4.0, original_max_position_embeddings=256, beta_fast=32.0,
                                          beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0)),
}


def model_config(preset: str, family: Optional[str] = None):
    """按名字取模型配置："smoke" 为 SMOKE_MODEL，其余交给 functional_lm.get_preset；给了 family 时取 FAMILY_MODELS
    （在缺省学生的字段上改）。"""
    from functional_lm import ModelConfig, get_preset

    if family is not None:
        return ModelConfig(**FAMILY_MODELS[family])
    return ModelConfig(**SMOKE_MODEL) if preset == "smoke" else get_preset(preset)


def hf_model_from_params(params: dict, cfg, share: bool = False):
    """同一组张量的 transformers 模型（cfg.family 的 <家族>ForCausalLM）：配置经 hf.config_to_hf 转换，权重经 load_state_dict 装入
    （参照一侧与本项目一侧因此从同一组初始权重出发）。

    share=False 拷入（学生：两边各自训练）；share=True 直接用同一块存储（教师：只读，省下一份权重；dtype 也随之
    取参数字典的，如 bf16 教师）。共享嵌入时参数字典里没有 lm_head.weight，所以只允许缺这一个键；装入后重新绑定
    并核对 lm_head 与嵌入是同一块存储。"""
    import transformers

    from functional_lm.hf import config_to_hf

    hf = config_to_hf(cfg)
    config = transformers.AutoConfig.for_model(hf.pop("model_type"), **hf)
    model = transformers.AutoModelForCausalLM.from_config(config)
    result = model.load_state_dict({k: v.detach() for k, v in params.items()}, strict=False, assign=share)
    allowed = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
    if set(result.missing_keys) - allowed or result.unexpected_keys:
        raise RuntimeError(f"weights do not map onto {type(model).__name__}: {result}")
    if cfg.tie_word_embeddings:
        model.tie_weights()
        if model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr():
            raise RuntimeError("transformers did not tie lm_head to embed_tokens")
    return model


def parse_with_smoke(parser, argv, smoke: dict):
    """加上 ``--smoke`` 与 ``--out`` 并解析：给了 --smoke 就换上 smoke 缺省值再解析一次，命令行上显式给出的
    参数仍然优先（bench_loss、bench_train 的子进程拿到同样的 argv，也会这样做）。

    --out 指向已有的文件时立刻报错（argparse 的一段话、退出码 2），不等跑完才发现写不进去。
    ``args.load_before`` 记下解析时（即运行开始时）的负载，``write_result`` 把它写进机器记录。"""
    parser.add_argument("--smoke", action="store_true", help="极小尺寸试跑 / tiny sizes: " + str(smoke))
    parser.add_argument("--out", metavar="FILE", default=None,
                        help="把结果行与机器记录写成 JSON（不覆盖已有文件）/ write the rows and the machine record "
                        "as JSON to FILE (an existing file is never overwritten)")
    args = parser.parse_args(argv)
    if args.smoke:
        parser.set_defaults(**smoke)
        args = parser.parse_args(argv)
    if args.out is not None and Path(args.out).exists() and not getattr(args, "worker", None):
        parser.error(f"--out {args.out} already exists; result files are never overwritten: choose a new name "
                     "(e.g. with today's date) or delete the old file first")
    args.load_before = _load_average()
    return args


# ---------------------------------------------------------------- 结果文件（--out）
def _load_average() -> Optional[list[float]]:
    """1/5/15 分钟负载（os.getloadavg）；平台不支持时为 None。"""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def cpu_model(cpuinfo: str = "/proc/cpuinfo") -> str:
    """CPU 型号：/proc/cpuinfo 第一行 ``model name``；读不到时退回 platform.processor()（可能为空串）。"""
    try:
        for line in Path(cpuinfo).read_text(encoding="utf-8", errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _versions() -> dict:
    """torch / transformers / python 的版本（transformers 没装时为 None）。"""
    import torch

    try:
        import transformers

        hf = transformers.__version__
    except ImportError:
        hf = None
    return {"torch": torch.__version__, "transformers": hf, "python": platform.python_version()}


def machine_record(load_before: Optional[list[float]]) -> dict:
    """这台机器与这次运行的环境：CPU、核数、线程、运行前后的负载、版本、malloc 调优、CUDA 设备、日期时间（UTC）。"""
    import torch

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cuda = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {
        "cpu_model": cpu_model(), "logical_cores": os.cpu_count(), "usable_cores": usable,
        "torch_threads": torch.get_num_threads(), "load_before": load_before, "load_after": _load_average(),
        **_versions(), "platform": platform.platform(), "malloc_tuned": MALLOC_TUNED, "cuda_device": cuda,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def command_line(script: str, argv: Optional[list[str]]) -> str:
    """重现这次运行的命令：``python benchmarks/<脚本>.py <参数>``（argv 为 None 时取 sys.argv[1:]）。"""
    argv = sys.argv[1:] if argv is None else list(argv)
    return shlex.join(["python", f"benchmarks/{Path(script).name}", *argv])


def write_result(args, script: str, argv: Optional[list[str]], record: dict, rows: list[dict]) -> Optional[Path]:
    """给了 --out 时把这次运行写成 JSON（格式见模块说明）并返回路径；没给时什么都不做、返回 None。

    先写同目录的临时文件并 fsync，再 os.link 到目标名：目标已存在时 link 失败（FileExistsError），
    已有的文件因此永远不会被覆盖；写到一半的文件也永远不会出现在目标名下。"""
    if args.out is None:
        return None
    target = Path(args.out)
    payload = {"benchmark": Path(script).stem, "command": command_line(script, argv),
               "machine": machine_record(getattr(args, "load_before", None)), "record": record, "rows": rows}
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(payload, handle, indent=2, ensure_ascii=False)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.link(tmp, target)
    except FileExistsError:
        raise SystemExit(f"--out {target} appeared while the benchmark ran; it was left as it was and this run's "
                         f"result was not written") from None
    finally:
        tmp.unlink(missing_ok=True)
    print(f"result written to {target}", file=sys.stderr)
    return target


def row(name: str, unit: str, ours: float, reference: Optional[float] = None, ratio: Optional[float] = None) -> dict:
    """组装一行；有比值就必须有参照（有参照而没有比值可以，如进程开销行）。"""
    if ratio is not None and reference is None:
        raise ValueError(f"row {name!r}: a ratio needs a reference")
    return {"name": name, "unit": unit, "ours": ours, "reference": reference, "ratio": ratio}


@dataclasses.dataclass(frozen=True)
class Usage:
    """进程开销：用户态秒数、系统态秒数、次缺页数（ru_minflt），以及这些开销覆盖的计时步数。

    ``Usage.now()`` 是本进程（含其所有线程）到目前为止的累计值（steps 为 0）；两个快照相减得到一段的增量，
    相加把若干段（若干轮、若干子进程）合在一起。"""

    user_s: float = 0.0
    sys_s: float = 0.0
    minflt: int = 0
    steps: int = 0

    @classmethod
    def now(cls) -> "Usage":
        ru = resource.getrusage(resource.RUSAGE_SELF)
        return cls(ru.ru_utime, ru.ru_stime, ru.ru_minflt)

    def __add__(self, other: "Usage") -> "Usage":
        return Usage(*(a + b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other))))

    def __sub__(self, other: "Usage") -> "Usage":
        return Usage(*(a - b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other))))

    def sys_pct(self) -> float:
        """100 · 系统态 / 用户态；用户态为 0（极短的一段）时为 0.0。"""
        return 100.0 * self.sys_s / self.user_s if self.user_s > 0 else 0.0

    def faults_per_step(self) -> float:
        """每个计时步的次缺页数；没有计时步时为 0.0。"""
        return self.minflt / self.steps if self.steps > 0 else 0.0

    def as_dict(self) -> dict:
        """写进 JSON 的形式（子进程交给父进程）：四个原始字段。"""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Usage":
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls)})


@contextlib.contextmanager
def measured(totals: dict, key: str, steps: int = 1):
    """把 with 块的进程开销增量累加到 ``totals[key]``（一个 Usage），这一段记为 steps 个计时步。"""
    start = Usage.now()
    try:
        yield
    finally:
        delta = dataclasses.replace(Usage.now() - start, steps=steps)
        totals[key] = totals.get(key, Usage()) + delta


def usage_rows(name: str, ours: Usage, reference: Optional[Usage] = None) -> list[dict]:
    """一个变体的两行进程开销：``<name>_sys``（%user）与 ``<name>_faults``（faults/step）；比值为 None。"""
    return [
        row(f"{name}_sys", "%user", ours.sys_pct(), None if reference is None else reference.sys_pct()),
        row(f"{name}_faults", "faults/step", ours.faults_per_step(),
            None if reference is None else reference.faults_per_step()),
    ]


def step_rows(name: str, mine: dict, ref: dict, tokens: int) -> list[dict]:
    """子进程测得的一个变体对参照：tokens/s（比值 = 参照步时 / 本方步时）、两行进程开销与峰值内存（比值）。

    mine、ref 是工作子进程打印的 JSON：step_s（最快一步的秒数）、usage（Usage.as_dict）、peak_rss_mib。"""
    return [
        row(name, "tok/s", tokens / mine["step_s"], tokens / ref["step_s"], ref["step_s"] / mine["step_s"]),
        *usage_rows(name, Usage.from_dict(mine["usage"]), Usage.from_dict(ref["usage"])),
        row(f"{name}_peak_rss", "MiB", mine["peak_rss_mib"], ref["peak_rss_mib"],
            mine["peak_rss_mib"] / ref["peak_rss_mib"]),
    ]


def run_workers(script: str, argv: list[str], variants: tuple[str, ...], extra: tuple[str, ...] = (),
                env: Optional[dict] = None) -> dict:
    """每个变体一个子进程：``python script argv --worker 变体 extra``（峰值内存因此是这个变体自己的）。

    env：在本进程环境之上为子进程另设的变量（例如 FUNCTIONAL_LM_MALLOC=default：子进程不调 malloc）。
    返回 变体 → 子进程打印的最后一行 JSON；失败的变体记下退出码与 stderr 末尾。"""
    results = {}
    for variant in variants:
        print(f"running {variant} …", file=sys.stderr)
        command = [sys.executable, script, *argv, "--worker", variant, *extra]
        out = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **env} if env else None)
        if out.returncode != 0:
            results[variant] = {"error": f"exit {out.returncode}", "stderr_tail": out.stderr[-2000:]}
            continue
        results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
    return results


def process_note() -> str:
    """表前的一行说明：进程开销行的含义，以及两边在同一个进程设置下测量。"""
    malloc = "tuned malloc (functional_lm.allocator.tune_malloc)" if MALLOC_TUNED else "default malloc (tuning off)"
    return ("process rows: *_sys = 100 * system / user CPU seconds, *_faults = minor page faults per timed step "
            f"(getrusage over the timed steps only); ours and reference ran under the same settings: {malloc}")


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
    """打印表；有进程开销行时先打印一行 ``process_note()``（在标题之前，表之后紧接着的仍是 JSON）。"""
    if any(r["unit"] in PROCESS_UNITS for r in rows):
        print(process_note())
    print(format_table(title, rows, ours_label, reference_label), flush=True)
