"""一次运行的全部设置：配置文件解析、默认 < 预设 < 文件 < 命令行 的合并、run.json 的读写，
以及恢复运行（``--resume``）时把保存的设置还原、找出改动过的字段并判断哪些改动无法恢复。

设置 = 运行选项（教师、数据、预设、块长、分词器……，RUN_KEYS）+ ModelConfig + TrainingConfig。
恢复时以 run.json 里保存的设置为底，配置文件与命令行上**明确给出**的值覆盖它们；于是
``functional-lm distill --output-dir runs/x --resume`` 不必重复当初的任何参数。
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

from functional_lm.config import MODEL_BOUNDS, TRAINING_BOUNDS, ModelConfig, TrainingConfig, get_preset

__all__ = [
    "RUN_KEYS",
    "TEACHER_SOURCES",
    "convert_setting",
    "RunSettings",
    "field_help",
    "check_field_values",
    "load_config_file",
    "merge_configs",
    "resolve_configs",
    "resolve_settings",
    "compare_settings",
    "saved_training",
    "legacy_notes",
    "settings_from_checkpoint",
]

# 配置文件里允许的顶层运行选项（不属于两个配置类）。
RUN_KEYS = (
    "teacher", "data", "preset", "output_dir", "seq_len", "tokenizer", "cache_dir", "text_split", "teacher_cache",
    "teacher_url", "teacher_model", "teacher_timeout", "teacher_concurrency", "teacher_tokenizer", "cross_tokenizer",
)
# --cross-tokenizer 的取值（kd/cross_teacher.py 解释它们）；名字可用的教师分词器见 data/vocab_bytes.py。
CROSS_TOKENIZER_MODES = ("auto", "off", "hybrid", "uld")
NAMED_TEACHER_TOKENIZERS = ("deepseek", "qwen3.5")
# 教师目标的三个来源（互斥）：本地检查点、教师缓存、服务端教师。
TEACHER_SOURCES = ("teacher", "teacher_cache", "teacher_url")
SETTINGS_FORMAT = 1

# 恢复时不能改的设置：检查点里的数据位置与参数形状都以它们为前提。
_FIXED_RUN = ("data", "seq_len", "tokenizer", "text_split")
# batch_size、gradient_accumulation_steps 可以改：只要全局批 batch_size × 进程数 × 累积不变（训练器核对）。
# seed 定数据顺序与在线采样，split_seed 与 val_fraction 定划分：检查点里的数据位置以三者为前提。
_FIXED_TRAINING = ("seed", "split_seed", "val_fraction", "checkpoint_dir")
# 改了也不影响训练轨迹的设置（只影响记录、验证、保存的频率与位置）。
_NEUTRAL = (
    "log_interval", "eval_interval", "save_interval", "keep_last", "eval_batches", "cache_dir", "preset",
    "teacher_sharding", "teacher_url", "teacher_timeout", "teacher_concurrency",  # 服务器换了地址仍是同一个模型
)


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


def convert_setting(name: str, kind: str, value: Any, source: str) -> Any:
    """把命令行字符串或配置文件值转成字段类型；类型不对时报错并点名来源与字段。

    ``Optional[bool]`` 字段另外接受 auto / none（None，即“按设备自动决定”）。
    """
    if kind == "Optional[bool]":
        if value is None or str(value).strip().lower() in {"auto", "none"}:
            return None
        kind = "bool"
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


def check_field_values(values: Mapping[str, Any], source: str, *, as_flags: bool = False) -> None:
    """逐个检查明确给出的配置字段值的类型与各自的范围（config.MODEL_BOUNDS / TRAINING_BOUNDS），不看其他字段。

    不导入 torch，命令行在加载任何东西之前调用；字段之间的约束（hidden_size 被 num_heads 整除……）
    仍由配置类构造时检查。错误以 来源（as_flags 时为 --选项名）开头，再点名 类名.字段。
    """
    for name, raw in values.items():
        for cls, bounds in ((ModelConfig, MODEL_BOUNDS), (TrainingConfig, TRAINING_BOUNDS)):
            fields = _fields(cls)
            if name not in fields:
                continue
            value = convert_setting(name, str(fields[name].type), raw, source)
            if name in bounds:
                where = "--" + name.replace("_", "-") if as_flags else source
                bounds[name].check(f"{where}: {cls.__name__}.{name}", value)


# ---------------------------------------------------------------- 配置文件
def _parser_for(path: Path):
    """按扩展名选解析函数与它的异常类型。"""
    suffix = path.suffix.lower()
    if suffix == ".toml":
        try:
            import tomllib as parser_module
        except ImportError:  # Python 3.10
            import tomli as parser_module
        return parser_module.loads, (parser_module.TOMLDecodeError,)
    if suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ValueError(f"{path}: reading YAML needs PyYAML (pip install pyyaml), or use TOML/JSON") from None
        return (lambda t: yaml.safe_load(t) or {}), (yaml.YAMLError,)
    if suffix == ".json":
        return json.loads, (json.JSONDecodeError,)
    raise ValueError(f"{path}: unknown config format {suffix!r}; use .toml, .yaml/.yml or .json")


def load_config_file(path: str | Path) -> dict[str, Any]:
    """读取 TOML / YAML / JSON 配置文件，返回平铺的字典（[model] / [training] 小节会被展开）。"""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {path} does not exist")
    parse, errors = _parser_for(path)
    try:
        data = parse(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, *errors) as err:
        raise ValueError(f"{path}: cannot parse ({err})") from None
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


def merge_configs(
    base_model: ModelConfig,
    base_training: Mapping[str, Any],
    file_values: Mapping[str, Any],
    cli_values: Mapping[str, Any],
    *,
    source: str = "config",
) -> tuple[ModelConfig, TrainingConfig]:
    """在给定的底（预设或保存的设置）上依次应用配置文件与命令行的字段；坏值以配置校验消息报 ValueError。"""
    model_changes: dict[str, Any] = {}
    train_changes: dict[str, Any] = dict(base_training)
    for values, where in ((file_values, source), (cli_values, "command line")):
        for name, value in values.items():
            for cls, changes in ((ModelConfig, model_changes), (TrainingConfig, train_changes)):
                fields = _fields(cls)
                if name in fields:
                    changes[name] = convert_setting(name, str(fields[name].type), value, where)
    return dataclasses.replace(base_model, **model_changes), TrainingConfig(**train_changes)


def resolve_configs(
    preset: str, file_values: Mapping[str, Any], cli_values: Mapping[str, Any], *, source: str = "config"
) -> tuple[ModelConfig, TrainingConfig]:
    """按 默认 < 预设 < 文件 < 命令行 合并出两份配置（新运行的情形）。"""
    return merge_configs(get_preset(preset), {}, file_values, cli_values, source=source)


# ---------------------------------------------------------------- 一次运行的设置
@dataclass
class RunSettings:
    """一次运行的全部设置（写进 run.json）。"""

    mode: str  # "distill"（真实教师）或 "demo"（离线演示）
    run: dict[str, Any]  # RUN_KEYS 中除 output_dir 外的运行选项
    model: ModelConfig
    training: TrainingConfig

    def to_json(self) -> dict[str, Any]:
        return {
            "format": SETTINGS_FORMAT, "mode": self.mode, "run": self.run,
            "model": self.model.to_dict(), "training": self.training.to_dict(),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "RunSettings":
        return cls(data["mode"], dict(data["run"]), ModelConfig(**data["model"]), TrainingConfig(**data["training"]))


def _absolute(item: Any) -> Any:
    """本地存在的路径记成绝对路径（换个工作目录恢复也找得到）；hub id 等原样保留。"""
    if isinstance(item, str) and os.path.exists(os.path.expanduser(item)):
        return str(Path(item).expanduser().resolve())
    return item


def normalize_run(run: Mapping[str, Any]) -> dict[str, Any]:
    """运行选项的规范形式：data 是列表，本地路径是绝对路径，不含 output_dir。"""
    out = {k: v for k, v in run.items() if k != "output_dir" and v is not None}
    if "seq_len" in out:
        out["seq_len"] = convert_setting("seq_len", "int", out["seq_len"], "seq_len")
        if out["seq_len"] < 1:
            raise ValueError(f"--seq-len must be a positive number of tokens, got {out['seq_len']}")
    if isinstance(out.get("data"), str):
        out["data"] = [out["data"]]
    if "data" in out:
        out["data"] = [_absolute(item) for item in out["data"]]
    for key in ("teacher", "tokenizer", "teacher_cache"):
        if key in out:
            out[key] = _absolute(out[key])
    if "teacher_tokenizer" in out and str(out["teacher_tokenizer"]) not in NAMED_TEACHER_TOKENIZERS:
        out["teacher_tokenizer"] = _absolute(out["teacher_tokenizer"])  # 名字原样，目录换成绝对路径
    if out.get("cross_tokenizer", "auto") not in CROSS_TOKENIZER_MODES:
        raise ValueError(f"--cross-tokenizer {out['cross_tokenizer']!r}: expected one of {list(CROSS_TOKENIZER_MODES)} "
                         f"(auto: hybrid when the teacher's tokenizer differs from the student's, off when it is the same)")
    if "teacher_timeout" in out:
        out["teacher_timeout"] = convert_setting("teacher_timeout", "float", out["teacher_timeout"], "teacher_timeout")
        if not 0 < out["teacher_timeout"] < float("inf"):
            raise ValueError(f"--teacher-timeout must be a positive number of seconds, got {out['teacher_timeout']}")
    if "teacher_concurrency" in out:
        out["teacher_concurrency"] = convert_setting("teacher_concurrency", "int", out["teacher_concurrency"],
                                                     "teacher_concurrency")
        if out["teacher_concurrency"] < 1:
            raise ValueError(f"--teacher-concurrency must be >= 1 requests in flight, got {out['teacher_concurrency']}")
    if "teacher_url" in out and not str(out["teacher_url"]).startswith(("http://", "https://")):
        raise ValueError(f"--teacher-url {out['teacher_url']!r}: expected an http:// or https:// URL of an "
                         f"OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1")
    return out


def resolve_settings(
    saved: Optional[Mapping[str, Any]],
    explicit_run: Mapping[str, Any],
    file_values: Mapping[str, Any],
    cli_values: Mapping[str, Any],
    *,
    demo_defaults: Mapping[str, Any],
    demo_seq_len: int,
    source: str = "config",
) -> RunSettings:
    """合并出本次运行的设置：新运行以预设为底，恢复的运行以保存的设置为底；明确给出的值总是优先。

    新运行的块长缺省为学生的 max_seq_len（演示为 demo_seq_len 与它的较小者），纯文本缺省按段落分篇；
    记下的是实际生效的值，恢复时明确给出同样的值不算改动。
    """
    explicit = normalize_run(explicit_run)
    if saved is None:
        mode = "demo" if all(explicit.get(k) is None for k in TEACHER_SOURCES) else "distill"
        preset = explicit.get("preset") or ("demo-student" if mode == "demo" else "student-123m")
        base_training = demo_defaults if mode == "demo" else {}
        model, training = merge_configs(get_preset(preset), base_training, file_values, cli_values, source=source)
        default_len = min(demo_seq_len, model.max_seq_len) if mode == "demo" else model.max_seq_len
        run = {"text_split": "paragraph", "seq_len": default_len, **explicit, "preset": preset}
        _check_teacher_source(run)
        return RunSettings(mode, run, model, training)
    mode = saved["mode"]
    if mode == "demo" and explicit.get("teacher") is not None:
        raise ValueError("cannot resume: this run directory holds the offline demo, but --teacher was given")
    if saved.get("legacy") and mode == "distill" and "teacher" not in explicit:
        raise ValueError(
            "this run has no run.json (it was made by an older version of functional_lm), so its teacher and data "
            "are unknown; resume it by repeating --teacher, --data and --seq-len"
        )
    base_model = get_preset(explicit["preset"]) if "preset" in explicit else ModelConfig(**saved["model"])
    model, training = merge_configs(base_model, saved_training(saved), file_values, cli_values, source=source)
    run = {**saved.get("run", {}), **explicit}
    _check_teacher_source(run)
    return RunSettings(mode, run, model, training)


def _check_teacher_source(run: Mapping[str, Any]) -> None:
    """教师目标只有一个来源：--teacher（在线教师）与 --teacher-cache（存好的目标）不能同时给。

    两者同时给时训练会读缓存、验证却跑在线教师——两个不同的“教师”，所以拒绝（恢复时合并后的设置同样核对）。"""
    given = [k for k in TEACHER_SOURCES if run.get(k) is not None]
    if "teacher_url" in given and len(given) > 1:
        other = next(k for k in given if k != "teacher_url")
        raise ValueError(
            f"--teacher-url {run['teacher_url']} and --{other.replace('_', '-')} {run[other]} cannot be combined: "
            f"the served teacher gives the training targets itself; give one teacher source"
        )
    if run.get("teacher") is not None and run.get("teacher_cache") is not None:
        raise ValueError(
            f"--teacher {run['teacher']} and --teacher-cache {run['teacher_cache']} cannot be combined: --teacher "
            f"runs a live teacher that gives the training targets and the evaluation scores, while --teacher-cache "
            f"reads the stored top-k targets of a teacher-cache build (C/train for training, C/val for evaluation) "
            f"without loading any teacher; give one of them, not both"
        )


# 新增训练字段在旧版本里的实际行为：旧运行的 run.json / 检查点里没有这些字段，恢复时按旧行为补上，
# 而不是换成新的缺省值（那会悄悄改变恢复后的训练轨迹）。
_BEFORE_FIELD_EXISTED = {"document_mask": False, "on_policy_estimator": "topk"}


def saved_training(saved: Mapping[str, Any]) -> dict[str, Any]:
    """保存的训练配置，缺的新字段按旧版本的行为补齐（见 _BEFORE_FIELD_EXISTED）；
    没有 split_seed 的旧运行按它自己的 seed 划分过数据，所以 split_seed = seed。"""
    training = dict(saved.get("training", {}))
    return {**_BEFORE_FIELD_EXISTED, "split_seed": training.get("seed", 0), **training}


def legacy_notes(saved: Mapping[str, Any]) -> list[str]:
    """恢复旧运行时按旧行为补上的字段，每项一行说明（现在只有 split_seed）。"""
    training = saved.get("training", {})
    if "split_seed" in training:
        return []
    seed = training.get("seed", 0)
    return [f"this run was saved before split_seed existed; it resumes with split_seed = its seed ({seed}), "
            f"the train/validation split it was trained on"]


def _flat(settings: Mapping[str, Any]) -> dict[str, Any]:
    """run.json 的内容摊平成 字段名 → 值（模型字段加 "model." 前缀以便区分）。"""
    flat = {k: v for k, v in settings.get("run", {}).items()}
    flat |= {f"model.{k}": v for k, v in settings.get("model", {}).items()}
    flat |= saved_training(settings)
    return flat


def compare_settings(
    saved: Mapping[str, Any], new: RunSettings, *, movable: tuple[str, ...] = ()
) -> tuple[list[str], list[str], list[str]]:
    """比较保存的设置与本次设置，返回三组“名字 旧值 → 新值”：
    (无法恢复的改动, 改变训练轨迹的改动, 无关轨迹的改动)。movable 里的名字（例如检查点记着数据的内容指纹时的
    data：换了路径的同一份数据，内容由训练器核对）改了也算无关轨迹的改动。"""
    old, cur = _flat(saved), _flat(new.to_json())
    fixed, trajectory, neutral = [], [], []
    for name in sorted(set(old) | set(cur)):
        if old.get(name) == cur.get(name) or (saved.get("legacy") and name in new.run and name not in old):
            continue  # 旧版本的运行没有记下运行选项：明确给出的值就是它们
        text = f"{name.removeprefix('model.')} {old.get(name)!r} → {cur.get(name)!r}"
        if name in movable:
            neutral.append(text)
        elif name.startswith("model.") or name in _FIXED_RUN or name in _FIXED_TRAINING:
            fixed.append(text)
        elif name in _NEUTRAL:
            neutral.append(text)
        else:
            trajectory.append(text)
    return fixed, trajectory, neutral


def settings_from_checkpoint(checkpoint: Path, mode: str) -> dict[str, Any]:
    """没有 run.json 的旧运行：从最新检查点还原模型与训练配置（运行选项需要重新给出）。"""
    from functional_lm.runs.checkpoint import STATE_JSON
    from functional_lm.hf import load_config

    state = json.loads((checkpoint / STATE_JSON).read_text(encoding="utf-8"))
    model = load_config(checkpoint)
    return {"mode": mode, "run": {}, "model": model.to_dict(), "training": state["training_config"], "legacy": True}
