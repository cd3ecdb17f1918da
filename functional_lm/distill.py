"""``functional-lm distill``：参数与配置文件解析、真实教师的蒸馏流程、离线默认演示。

配置的优先级（后者覆盖前者）：字段默认值 < 预设 (--preset) < 配置文件 (--config) < 命令行 (--field-name)。
ModelConfig 与 TrainingConfig 的每个字段都可以写在配置文件里（平铺，或放在 [model] / [training] 小节中），
也可以在命令行上用 ``--字段名``（下划线换成短横线）覆盖。坏值在加载任何模型之前就以配置校验的
消息报错。

不带 --teacher 运行时是离线演示（见 functional_lm/demo.py）：在内置语料上训练一个小教师（缓存复用），
再把它蒸馏进更小的学生，并训练一个只用交叉熵的对照学生。
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import re
import sys
from pathlib import Path
from typing import Any, Mapping, Optional

from functional_lm.config import ModelConfig, TrainingConfig, get_preset

__all__ = ["register", "resolve_configs", "load_config_file", "field_help", "RUN_KEYS"]

# 配置文件里允许的顶层运行选项（不属于两个配置类）。
RUN_KEYS = ("teacher", "data", "preset", "output_dir", "seq_len", "tokenizer", "cache_dir")


# ---------------------------------------------------------------- 字段说明（取自 config.py 的行尾注释）
def field_help(cls: type) -> dict[str, str]:
    """从 dataclass 源码中每个字段的行尾注释取出帮助文字（配置字段只在一处写说明）。"""
    pattern = re.compile(r"^\s+(\w+):\s*[^=]+=\s*.+?#\s*(.+)$")
    helps = {}
    for line in inspect.getsource(cls).splitlines():
        match = pattern.match(line)
        if match:
            helps[match.group(1)] = match.group(2).strip()
    return helps


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _convert(name: str, kind: str, value: Any, source: str) -> Any:
    """把命令行字符串或配置文件值转成字段类型；类型不对时报错并点名来源与字段。"""
    if kind == "bool":
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in {"1", "true", "yes", "on"}:
            return True
        if text in {"0", "false", "no", "off"}:
            return False
        raise ValueError(f"{source}: {name} expects true/false, got {value!r}")
    if kind in ("int", "float"):
        if isinstance(value, bool):
            raise ValueError(f"{source}: {name} expects {kind}, got {value!r}")
        try:
            if kind == "float":
                number = float(value)
            elif isinstance(value, str):
                number = int(value.strip())
            else:
                number = value  # 配置文件里的数字；整数字段的 12.0 在下面转换，12.5 报错
        except ValueError:
            raise ValueError(f"{source}: {name} expects {kind}, got {value!r}") from None
        if kind == "int" and isinstance(number, float):
            if not number.is_integer():
                raise ValueError(f"{source}: {name} expects int, got {value!r}")
            number = int(number)
        return number
    return str(value)


# ---------------------------------------------------------------- 配置文件
def load_config_file(path: str | Path) -> dict[str, Any]:
    """读取 TOML / YAML / JSON 配置文件，返回平铺的字典（[model] / [training] 小节会被展开）。"""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    suffix = path.suffix.lower()
    if suffix == ".toml":
        try:
            import tomllib as parser_module
        except ImportError:  # Python 3.10
            import tomli as parser_module

        parse, errors = parser_module.loads, (parser_module.TOMLDecodeError,)
    elif suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ValueError(f"{path}: reading YAML needs PyYAML (pip install pyyaml), or use TOML/JSON") from None
        parse, errors = (lambda t: yaml.safe_load(t) or {}), (yaml.YAMLError,)
    elif suffix == ".json":
        parse, errors = json.loads, (json.JSONDecodeError,)
    else:
        raise ValueError(f"{path}: unknown config format {suffix!r}; use .toml, .yaml/.yml or .json")
    try:
        data = parse(text)
    except errors as err:
        raise ValueError(f"{path}: cannot parse ({err})") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the top level must be a table/mapping, got {type(data).__name__}")
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if key in ("model", "training") and isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    known = set(_fields(ModelConfig)) | set(_fields(TrainingConfig)) | set(RUN_KEYS)
    unknown = sorted(set(flat) - known)
    if unknown:
        raise ValueError(f"{path}: unknown keys {unknown}; valid keys are {sorted(known)}")
    return flat


def resolve_configs(
    preset: str, file_values: Mapping[str, Any], cli_values: Mapping[str, Any], *, source: str = "config"
) -> tuple[ModelConfig, TrainingConfig]:
    """按 默认 < 预设 < 文件 < 命令行 合并出两份配置；任何坏值都以配置校验消息报 ValueError。"""
    base_model = get_preset(preset)
    model_changes: dict[str, Any] = {}
    train_changes: dict[str, Any] = {}
    for values, where in ((file_values, source), (cli_values, "command line")):
        for name, value in values.items():
            if name in RUN_KEYS:
                continue
            for cls, changes in ((ModelConfig, model_changes), (TrainingConfig, train_changes)):
                fields = _fields(cls)
                if name in fields:
                    changes[name] = _convert(name, str(fields[name].type), value, where)
    return dataclasses.replace(base_model, **model_changes), TrainingConfig(**train_changes)


# ---------------------------------------------------------------- 命令行
def register(subparsers: argparse._SubParsersAction) -> None:
    """注册 distill 子命令。"""
    p = subparsers.add_parser(
        "distill",
        help="把 Qwen2 教师蒸馏进学生；不带参数时运行离线演示",
        description=(
            "知识蒸馏：loss = α·T²·KL(教师‖学生, T) + (1−α)·CE。"
            "不给 --teacher 时运行离线演示：在内置语料上训练小教师（缓存），蒸馏出更小的学生，并与只用 CE 的学生对照。"
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    run = p.add_argument_group("run")
    run.add_argument("--teacher", help="教师检查点目录（Qwen2ForCausalLM：config.json + *.safetensors）或 hub id")
    run.add_argument("--data", nargs="+", help="训练数据：文本、JSON lines（text 或 messages）、parquet；缺省为内置语料")
    run.add_argument("--preset", help="学生预设（有教师时缺省 student-123m，演示时缺省 demo-student）")
    run.add_argument("--output-dir", help="运行目录（检查点、指标、报告）；缺省 runs/distill 或 runs/demo")
    run.add_argument("--seq-len", type=int, help="训练块长度；缺省为学生的 max_seq_len")
    run.add_argument("--tokenizer", help="分词器目录；缺省用教师目录里的，没有时用离线 Qwen2.5 词表")
    run.add_argument("--cache-dir", help="分词缓存目录（缺省 ~/.cache/functional_lm/tokens）")
    run.add_argument("--resume", action="store_true", help="从运行目录中最新的检查点继续")
    run.add_argument("--config", help="配置文件（.toml / .yaml / .json）：字段平铺或放在 [model]/[training] 中")
    run.add_argument("--no-progress", action="store_true", help="不显示进度条")
    for title, cls in (("model (ModelConfig)", ModelConfig), ("training (TrainingConfig)", TrainingConfig)):
        group = p.add_argument_group(title)
        helps = field_help(cls)
        for name, f in _fields(cls).items():
            flag = "--" + name.replace("_", "-")
            group.add_argument(
                flag, dest=f"field_{name}", default=argparse.SUPPRESS, metavar=str(f.type).upper(),
                help=f"{helps.get(name, name)} (default: {f.default!r})",
            )
    p.set_defaults(func=_cmd_distill)


def _cli_fields(args: argparse.Namespace) -> dict[str, Any]:
    return {k[len("field_") :]: v for k, v in vars(args).items() if k.startswith("field_")}


def _cmd_distill(args: argparse.Namespace) -> int:
    file_values = load_config_file(args.config) if args.config else {}
    # 命令行运行选项覆盖文件中的同名选项。
    run = {k: file_values.get(k) for k in RUN_KEYS}
    for key in RUN_KEYS:
        value = getattr(args, key, None)
        if value is not None:
            run[key] = value
    if isinstance(run.get("data"), str):
        run["data"] = [run["data"]]
    demo = run.get("teacher") is None
    preset = run.get("preset") or ("demo-student" if demo else "student-123m")
    if demo:
        from functional_lm.demo import demo_training_defaults

        file_values = {**demo_training_defaults(), **file_values}
    student_cfg, tcfg = resolve_configs(preset, file_values, _cli_fields(args), source=args.config or "config")
    progress = not args.no_progress
    from functional_lm.train import Interrupted

    try:
        if demo:
            from functional_lm.demo import run_demo

            run_demo(student_cfg, tcfg, run, resume=args.resume, progress=progress)
        else:
            run_distill(student_cfg, tcfg, run, resume=args.resume, progress=progress)
    except Interrupted as err:
        print(f"functional-lm distill: stopped: {err}", file=sys.stderr)
        return 130
    return 0


# ---------------------------------------------------------------- 真实教师的蒸馏
def _has_tokenizer(directory: Path) -> bool:
    return (directory / "tokenizer.json").is_file()


def run_distill(
    student_cfg: ModelConfig, tcfg: TrainingConfig, run: Mapping[str, Any], *, resume: bool, progress: bool
) -> Path:
    """加载教师与数据，蒸馏，保存学生（HF 格式）并写报告；返回运行目录。"""
    import torch

    from functional_lm.data import check_vocab_compat, load_tokenizer, prepare_data
    from functional_lm.hf import config_from_hf, load_pretrained, resolve_checkpoint, save_pretrained
    from functional_lm.model import init_params
    from functional_lm.report import read_metrics, write_report
    from functional_lm.train import Interrupted, Model, train

    teacher_dir = resolve_checkpoint(run["teacher"])
    config_file = teacher_dir / "config.json"
    teacher_cfg = config_from_hf(json.loads(config_file.read_text(encoding="utf-8")), source=str(config_file))
    tok_source = run.get("tokenizer") or (teacher_dir if _has_tokenizer(teacher_dir) else None)
    tokenizer = load_tokenizer(tok_source)
    # 词表契约：在加载任何权重之前拒绝不相容的组合。
    check_vocab_compat(tokenizer, student_cfg.vocab_size, teacher_cfg.vocab_size)
    seq_len = int(run.get("seq_len") or student_cfg.max_seq_len)
    for name, cfg in (("student", student_cfg), ("teacher", teacher_cfg)):
        if seq_len > cfg.max_seq_len:
            raise ValueError(f"--seq-len {seq_len} exceeds the {name}'s max_seq_len={cfg.max_seq_len}")
    out = Path(run.get("output_dir") or "runs/distill")
    data = prepare_data(
        run.get("data"), tokenizer=tokenizer, seq_len=seq_len, batch_size=tcfg.batch_size,
        val_fraction=tcfg.val_fraction, seed=tcfg.seed, cache_dir=run.get("cache_dir"),
        model_config=student_cfg, progress=progress,
    )
    teacher_dtype = torch.bfloat16 if tcfg.teacher_bf16 else torch.float32
    teacher_cfg, teacher_params = load_pretrained(teacher_dir, dtype=teacher_dtype)
    student = Model(init_params(student_cfg, seed=tcfg.seed), student_cfg)
    result = train(
        student, Model(teacher_params, teacher_cfg), data, tcfg, out, resume=resume,
        real_vocab_size=tokenizer.real_vocab_size, tokenizer_dir=tok_source, progress=progress,
    )
    if result.interrupted:
        raise Interrupted(f"saved {result.last_checkpoint} at step {result.step}; continue with --resume")
    final = save_pretrained(result.params, student_cfg, out / "student", tokenizer=tok_source)
    write_report(
        out,
        title="functional_lm distillation report",
        configs={"student": student_cfg.to_dict(), "teacher": teacher_cfg.to_dict(), "training": tcfg.to_dict(), "run": dict(run)},
        final_metrics={"student (distilled)": result.final_eval},
        curves={"distilled student": read_metrics(out)},
        notes=[f"student checkpoint: {final}", f"steps: {result.step}/{result.total_steps}"],
    )
    print(f"student saved to {final}; report: {out / 'report.md'}", file=sys.stderr)
    return out
