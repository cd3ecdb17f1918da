"""``functional-lm teacher-cache``：把教师在蒸馏数据上的 top-k 目标预先算好存盘（格式见 functional_lm/kd/teacher_cache.py）。

    functional-lm teacher-cache --teacher DIR --output-dir C --top-k K [--temperature T] [--data FILES ...]
                                [--seq-len N --val-fraction F --split-seed S --document-mask true/false ...]
    functional-lm teacher-cache --import TOPK.jsonl --output-dir C --top-k K [...]

教师的分词器与学生的不同（--teacher-tokenizer deepseek|qwen3.5|DIR，或教师目录里别的 tokenizer.json）时建跨分词器的
缓存：两边的分词器按 distill 的同一套规则选（kd/cross_setup.choose_tokenizers），目标按文本对齐、映射到学生的
位置上存盘（kd/cross_cache.py）。

块与 ``functional-lm distill`` 用同样的数据选项时训练、验证的块完全相同：数据经同一个 ``prepare_data``
（同样的分词器来源、块长、验证比例与划分种子 --split-seed）打包；distill 的 --seed 只管初始化、数据顺序与采样，
所以一份缓存供不同 --seed 的学生共用。旧的 ``--seed`` 是 ``--split-seed`` 的别名（已弃用，打印一行提示）。目录布局::

    C/train/    训练块的教师缓存（index.json + 分片文件）
    C/val/      验证块的教师缓存（验证集有块时才有；--import 时没有）

中断与续建：构建期间 SIGINT / SIGTERM 只置位（``monitor.stop_on_signals``），构建在分片之间干净地停下，
以退出码 130 结束并说明怎样继续——原样再运行同一条命令即可；同样的设备与 --batch-size 下，续建完成的缓存与
一次建完的逐字节相同（见 cache_build 的模块说明）。已有缓存的设置不同（教师、数据、K、T……）时报
``TeacherCacheMismatch``（退出码 2），绝不删除用户的缓存。

尽早拒绝：参数、词表与 K、块长先核对，再确认 --output-dir 能写（与 distill 同一段话），然后才分词、跑教师。
教师输出非有限时点名块号与教师（退出码 2）；写盘失败（磁盘满、只读）点名正在写的文件，已提交的分片保留（退出码 1）。
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from functional_lm.config import PRESETS, TRAINING_BOUNDS, TrainingConfig
from functional_lm.cli.options import TEXT_SPLITS, positive_int
from functional_lm.runs.rundir import ensure_output_dir
from functional_lm.runs.settings import CROSS_TOKENIZER_MODES
from functional_lm.errors import Interrupted

__all__ = ["register"]

_DEFAULTS = TrainingConfig()
_DEFAULT_SEQ_LEN = PRESETS["student-123m"].max_seq_len  # distill 有教师时的默认块长：学生预设的 max_seq_len
_VALUE_DTYPES = ("float16", "bfloat16", "float32")  # 与 teacher_cache.VALUE_DTYPES 相同（这里不导入 torch）


# ---------------------------------------------------------------- 命令行
def _add_source_options(p: argparse.ArgumentParser) -> None:
    """必需参数：目标从哪里来（运行教师 --teacher 或导入别处算好的 top-k --import，二者之一）、写到哪里、K；
    以及温度。必需与否由 _check_args 检查（错误是一段话），这里只让 --help 把它们列在 “必需参数” 组里。"""
    group = p.add_argument_group(
        "required arguments / 必需参数",
        "--output-dir、--top-k，以及 --teacher 与 --import 二者之一 / --output-dir, --top-k and one of --teacher, "
        "--import",
    )
    source = group.add_mutually_exclusive_group()
    source.add_argument("--teacher", metavar="DIR", help="教师检查点目录（Qwen2ForCausalLM）或 hub id；在 float32 中运行 / "
                        "teacher checkpoint directory (Qwen2ForCausalLM) or hub id; run in float32")
    source.add_argument("--import", dest="import_file", metavar="FILE", help=(
        "不跑教师，导入别处算好的 top-k（JSON lines），只写 C/train。每行 {\"ids\": [K 个 id], \"logprobs\": [温度 T 下"
        "的 K 个 log 概率]}；第 j 行是训练块 j // L 的输入位置 j %% L 的目标（L = --seq-len），共 训练块数 × L 行，"
        "格式见 functional_lm/kd/cache_import.py 的 import_topk_jsonl / import top-k targets computed elsewhere "
        "(JSON lines) into C/train instead of running a teacher. Each row is {\"ids\": [K ids], \"logprobs\": "
        "[K log-probabilities at temperature T]}; row j holds the target of input position j %% L of train block "
        "j // L (L = --seq-len), number of train blocks × L rows in all; the format is described at "
        "import_topk_jsonl in functional_lm/kd/cache_import.py"))
    source.add_argument("--teacher-url", metavar="URL", help="服务端教师：OpenAI 兼容服务器（如 vLLM）的根地址，"
                        "如 http://127.0.0.1:8000/v1；只发 token id，目标取它 prompt_logprobs 的 top-k（温度须为 1）"
                        " / served teacher: the base URL of an OpenAI-compatible server (e.g. vLLM), such as "
                        "http://127.0.0.1:8000/v1; only token ids are sent, the targets are the top-k of its "
                        "prompt_logprobs (temperature must be 1)")
    served = p.add_argument_group("served teacher / 服务端教师")
    served.add_argument("--teacher-model", metavar="NAME", help="服务器上的模型名（只服务一个模型时可省）/ the model "
                        "name on the server (optional when it serves one)")
    served.add_argument("--teacher-timeout", type=float, default=120.0, metavar="SECONDS", help="每个请求的超时秒数"
                        "（默认 120）/ seconds per request (default: 120)")
    served.add_argument("--teacher-concurrency", type=int, default=4, metavar="N", help="同时在途的请求数（默认 4）/ "
                        "requests in flight at once (default: 4)")
    group.add_argument("--output-dir", metavar="C", help="缓存目录 C：写出 C/train 与 C/val / cache directory C: "
                       "writes C/train and C/val")
    group.add_argument("--top-k", type=int, metavar="K", help="每个位置保存概率最高的 K 个 token（1 ≤ K ≤ 真实词表）/ keep the K "
                       "most likely tokens per position (1 <= K <= the real vocabulary)")
    group = p.add_argument_group("targets / 目标")
    group.add_argument("--temperature", type=float, metavar="T", default=_DEFAULTS.temperature, help=(
        f"蒸馏温度 T，必须与 distill 的 --temperature 相同（默认 {_DEFAULTS.temperature}）/ distillation "
        f"temperature T; must equal distill's --temperature (default {_DEFAULTS.temperature})"))


def _add_data_options(p: argparse.ArgumentParser) -> None:
    """数据选项：与 distill 的同名选项含义相同，取值也必须相同，块才一致。"""
    data = p.add_argument_group("data (as for distill) / 数据（与 distill 相同）")
    data.add_argument("--data", nargs="+", metavar="FILE", help="训练数据：.txt/.md、.jsonl、.parquet；缺省为内置语料 / training "
                      "data: .txt/.md, .jsonl, .parquet; default: the embedded corpus")
    data.add_argument("--text-split", choices=TEXT_SPLITS, default="paragraph", help="纯文本怎样分成文档（默认 "
                      "paragraph）/ how plain text splits into documents (default: paragraph)")
    data.add_argument("--tokenizer", metavar="DIR", help="分词器目录（默认用教师目录里的，没有时或 --import 时用离线 Qwen2.5 "
                      "词表）/ tokenizer directory (default: the teacher's; else, and with --import, the offline Qwen2.5 "
                      "vocabulary)")
    data.add_argument("--teacher-tokenizer", metavar="NAME|DIR", help="教师的分词器：deepseek、qwen3.5 或含 "
                      "tokenizer.json 的目录（缺省为教师目录里的）；与学生的（--tokenizer，缺省离线 Qwen2.5）不同时建"
                      "跨分词器的缓存：按文本对齐后的目标存在学生的位置上，与 distill 同一套规则 / the teacher's "
                      "tokenizer: deepseek, qwen3.5 or a directory with tokenizer.json (default: the teacher "
                      "directory's); when it differs from the student's (--tokenizer, default the offline Qwen2.5 "
                      "vocabulary) the cache is cross-tokenizer: targets aligned by text and stored on the student's "
                      "positions, by the same rules as distill")
    data.add_argument("--cross-tokenizer", choices=CROSS_TOKENIZER_MODES, default="auto", help="跨分词器的目标："
                      "auto（缺省）、off、hybrid、uld，同 distill / the cross-tokenizer targets: auto (default), off, "
                      "hybrid, uld, as for distill")
    data.add_argument("--seq-len", type=positive_int, metavar="N", default=_DEFAULT_SEQ_LEN, help=(
        f"块的 token 数（默认 {_DEFAULT_SEQ_LEN}，即 distill 默认学生 student-123m 的 max_seq_len；distill 用了别的"
        f" --seq-len 或预设时这里给同样的值）/ tokens per block (default {_DEFAULT_SEQ_LEN}, the max_seq_len of "
        f"distill's default student student-123m; pass the same --seq-len as distill when it differs)"))
    data.add_argument("--cache-dir", metavar="DIR", help="分词缓存目录（默认 ~/.cache/functional_lm/tokens）/ token cache "
                      "directory (default: ~/.cache/functional_lm/tokens)")
    data.add_argument("--val-fraction", type=float, metavar="F", default=_DEFAULTS.val_fraction, help=(
        f"按文档划出的验证集比例（默认 {_DEFAULTS.val_fraction}）/ fraction of documents held out for validation "
        f"(default {_DEFAULTS.val_fraction})"))
    data.add_argument("--split-seed", type=int, metavar="S", default=None, help=(
        f"训练 / 验证划分的种子，与 distill 的 --split-seed 相同（默认 {_DEFAULTS.split_seed}）；distill 的 --seed 不影响"
        f"划分，不同 --seed 的学生共用这份缓存 / seed of the train/validation split, as distill's --split-seed "
        f"(default {_DEFAULTS.split_seed}); distill's --seed does not change the split, so students of any --seed "
        f"share the cache"))
    data.add_argument("--seed", type=int, metavar="S", dest="legacy_seed", default=None, help=(
        "已弃用：同 --split-seed（打印一行提示）/ deprecated: the same as --split-seed (prints a note)"))
    data.add_argument("--document-mask", default="true", metavar="true/false", help="打包的文档互不可见（默认 "
                      "true，与 distill 相同）/ packed documents do not attend to each other (default: true, as "
                      "in distill)")


def _add_build_options(p: argparse.ArgumentParser) -> None:
    build = p.add_argument_group("build / 构建")
    build.add_argument("--device", metavar="DEV", default=_DEFAULTS.device, help="教师运行的设备：auto、cpu、cuda、cuda:N（默认 "
                       "auto）/ device for the teacher: auto, cpu, cuda, cuda:N (default: auto)")
    build.add_argument("--batch-size", type=positive_int, metavar="B", default=4, help="教师每次前向的块数（默认 4；续建时用"
                       "同样的值才逐字节相同）/ blocks per teacher forward (default 4; keep it when resuming for "
                       "byte-identical files)")
    build.add_argument("--blocks-per-shard", type=positive_int, metavar="N", default=64, help="每个分片的块数：中断最多丢掉"
                       "一个分片（默认 64）/ blocks per shard: an interruption loses at most one shard (default 64)")
    build.add_argument("--value-dtype", choices=_VALUE_DTYPES, default="float16", help="log 概率的存储类型（默认 "
                       "float16）/ storage type of the log-probabilities (default: float16)")
    build.add_argument("--no-progress", action="store_true", help="不显示进度条 / no progress bar")
    build.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="出错时显示 Python 回溯 / show Python tracebacks on errors")


def register(subparsers: argparse._SubParsersAction) -> None:
    """注册 teacher-cache 子命令。"""
    p = subparsers.add_parser(
        "teacher-cache",
        usage="%(prog)s (--teacher DIR | --teacher-url URL | --import FILE) --output-dir C --top-k K [options]",
        help="预先计算教师的 top-k 目标存盘，供蒸馏读取 / precompute the teacher's top-k targets for distillation",
        description=(
            "在 distill 用同样数据选项时训练与验证的块上运行教师，把 top-k 目标写到 C/train 与 C/val；Ctrl-C 在分片"
            "之间停下，原样再运行同一条命令即续建 / run the teacher over exactly the blocks that distill trains and "
            "validates on with the same data options and store its top-k targets in C/train and C/val; Ctrl-C "
            "stops between shards, and rerunning the same command resumes."
        ),
    )
    _add_source_options(p)
    _add_data_options(p)
    _add_build_options(p)
    p.set_defaults(func=_cmd_teacher_cache, check_args=_check_args)  # check_args：导入 torch 之前


# ---------------------------------------------------------------- 参数校验（加载任何东西之前）
def _check_args(args: argparse.Namespace) -> bool:
    """必填项与数值范围，错误点名参数；返回 document_mask 的布尔值。"""
    from functional_lm.runs.settings import convert_setting

    if args.teacher is None and args.import_file is None and args.teacher_url is None:
        raise ValueError("give --teacher DIR (run a teacher checkpoint over the data), --teacher-url URL (a served "
                         "teacher) or --import FILE (convert top-k targets computed elsewhere, JSON lines); none was "
                         "given")
    if args.teacher_url is not None:
        if not args.teacher_url.startswith(("http://", "https://")):
            raise ValueError(f"--teacher-url {args.teacher_url!r}: expected an http:// or https:// URL of an "
                             f"OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1")
        if args.temperature != 1.0:
            raise ValueError(
                f"--temperature {args.temperature:g} with --teacher-url: the server returns log-probabilities at "
                f"T = 1 and the distribution at another temperature cannot be recovered exactly from its top-k "
                f"values (that needs every logit); pass --temperature 1 (and train with --temperature 1)")
        if not (args.teacher_timeout > 0 and args.teacher_concurrency >= 1):
            raise ValueError(f"--teacher-timeout must be > 0 seconds and --teacher-concurrency >= 1, got "
                             f"{args.teacher_timeout} and {args.teacher_concurrency}")
    if args.import_file is not None and (args.teacher_tokenizer or args.cross_tokenizer != "auto"):
        what = "--teacher-tokenizer" if args.teacher_tokenizer else f"--cross-tokenizer {args.cross_tokenizer}"
        raise ValueError(f"{what} needs --teacher DIR or --teacher-url URL: a cross-tokenizer cache is built by "
                         f"running the teacher over text aligned to its own tokenizer, while --import takes targets "
                         f"already on the student's token ids")
    if not args.output_dir:
        raise ValueError("--output-dir is required: the directory C that receives C/train and C/val")
    out = Path(args.output_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise ValueError(f"--output-dir {out} is a file; expected a directory for the teacher cache")
    if args.top_k is None or args.top_k < 1:
        raise ValueError(f"--top-k must be a positive integer (tokens kept per position), got {args.top_k}")
    checks = (("--temperature", "temperature", args.temperature), ("--val-fraction", "val_fraction", args.val_fraction),
              ("--split-seed", "split_seed", args.split_seed), ("--seed", "split_seed", args.legacy_seed))
    for option, field, value in checks:
        if value is not None:
            TRAINING_BOUNDS[field].check(option, value)  # 与 distill 的同名字段同一个范围
    args.split_seed = _split_seed(args)  # 范围先查过：--seed 的提示只在它可用时才打印
    if args.import_file is not None and not Path(args.import_file).expanduser().is_file():
        raise FileNotFoundError(f"--import {args.import_file}: no such file (expected JSON lines of top-k targets)")
    return bool(convert_setting("--document-mask", "bool", args.document_mask, "command line"))


def _split_seed(args: argparse.Namespace) -> int:
    """划分种子：--split-seed；旧的 --seed 是它的别名（以前它就是划分种子），打印一行提示；两者不同时报错。"""
    if args.legacy_seed is None:
        return _DEFAULTS.split_seed if args.split_seed is None else args.split_seed
    if args.split_seed is not None and args.split_seed != args.legacy_seed:
        raise ValueError(f"--seed {args.legacy_seed} and --split-seed {args.split_seed} disagree; --seed is the old "
                         f"name of --split-seed, give only --split-seed")
    print(f"note: teacher-cache --seed is deprecated, use --split-seed {args.legacy_seed} (the same split); distill's "
          f"--seed no longer chooses the split, so pass --split-seed {args.legacy_seed} to distill as well",
          file=sys.stderr)
    return args.legacy_seed


def _check_top_k(top_k: int, real_vocab_size: int) -> None:
    if top_k > real_vocab_size:
        raise ValueError(f"--top-k {top_k} exceeds the vocabulary: the tokenizer has {real_vocab_size} real tokens")


def _check_writable(out: Path) -> None:
    """在任何重活之前确认 --output-dir 能写：建出 C（以及已有的 C/train、C/val）并各写删一个探测文件。
    不能写（只读、不是目录、没有权限……）时是与 distill 相同的一段话（rundir.ensure_output_dir）。"""
    for directory in [out] + [out / split for split in ("train", "val") if (out / split).is_dir()]:
        ensure_output_dir(directory)


def _prepare(args: argparse.Namespace, tokenizer: Any, model_config: Any) -> Any:
    """先确认输出目录能写，再分词并打包：与 run_distill 的 prepare_data 调用相同的参数，所以块与 distill 的完全相同。"""
    from functional_lm.data import prepare_data

    _check_writable(Path(args.output_dir).expanduser())
    return prepare_data(
        args.data, tokenizer=tokenizer, seq_len=args.seq_len, batch_size=args.batch_size,
        val_fraction=args.val_fraction, seed=args.split_seed, cache_dir=args.cache_dir, model_config=model_config,
        progress=not args.no_progress, text_split=args.text_split, split_seed=args.split_seed,
    )


# ---------------------------------------------------------------- 两种来源
def _teacher_jobs(args: argparse.Namespace, out: Path, document_mask: bool) -> list[tuple[str, Any, Callable]]:
    """运行教师：读配置、选两边的分词器（与 distill 同一个 choose_tokenizers）、核对词表与块长、分词打包、加载权重；
    返回每个划分的 (名字, 数据集, 构建函数)。教师的分词器与学生的不同时转去 _cross_jobs。"""
    import torch

    from functional_lm.data import check_vocab_compat
    from functional_lm.devices import resolve_device
    from functional_lm.hf import load_config, load_pretrained, resolve_checkpoint
    from functional_lm.config import ModelConfig
    from functional_lm.kd.cross_setup import choose_tokenizers
    from functional_lm.kd.cache_build import build_teacher_cache
    from functional_lm.kd.cache_identity import make_fingerprint, teacher_weights_fingerprint

    device = resolve_device(args.device)
    teacher_dir = resolve_checkpoint(args.teacher)
    teacher_cfg = load_config(teacher_dir)
    choice = choose_tokenizers({"tokenizer": args.tokenizer, "teacher_tokenizer": args.teacher_tokenizer,
                                "cross_tokenizer": args.cross_tokenizer}, teacher_dir, teacher_cfg, ModelConfig())
    if args.seq_len > teacher_cfg.max_seq_len:
        raise ValueError(f"--seq-len {args.seq_len} exceeds the teacher's max_seq_len={teacher_cfg.max_seq_len}")
    if choice.cross:
        return _cross_jobs(args, out, document_mask, choice, teacher_dir, device)
    tokenizer = choice.student
    check_vocab_compat(tokenizer, tokenizer.real_vocab_size, teacher_cfg.vocab_size)  # 没有学生：只核对教师
    _check_top_k(args.top_k, tokenizer.real_vocab_size)
    data = _prepare(args, tokenizer, teacher_cfg)
    weights = teacher_weights_fingerprint(teacher_dir)
    teacher_cfg, params = load_pretrained(teacher_dir, dtype=torch.float32)

    def job(split: str) -> Callable:
        fp = make_fingerprint(tokenizer, data.store, teacher_weights=weights, split=split,
                              val_fraction=args.val_fraction, split_seed=args.split_seed)
        return lambda stop: build_teacher_cache(
            params, teacher_cfg, getattr(data, split), out / split, top_k=args.top_k, temperature=args.temperature,
            fingerprint=fp, real_vocab_size=tokenizer.real_vocab_size, document_mask=document_mask,
            batch_size=args.batch_size, blocks_per_shard=args.blocks_per_shard, device=device,
            value_dtype=args.value_dtype, progress=not args.no_progress, stop=stop,
            teacher_name=args.teacher,
        )

    splits = ["train"] + (["val"] if len(data.val) > 0 else [])
    return [(split, getattr(data, split), job(split)) for split in splits]


def _cross_jobs(args: argparse.Namespace, out: Path, document_mask: bool, choice: Any, teacher_dir: Path,
                device: Any) -> list[tuple[str, Any, Callable]]:
    """跨分词器的缓存：学生的分词器打包数据（与 distill 的块相同），数据里的特殊 token 先核对，教师按文本对齐，
    映射后的目标存在学生的位置上（kd/cross_cache.py）。"""
    import torch

    from functional_lm.config import TrainingConfig
    from functional_lm.hf import load_pretrained
    from functional_lm.kd.cache_identity import make_fingerprint, teacher_weights_fingerprint
    from functional_lm.kd.cross_cache import build_cross_teacher_cache
    from functional_lm.kd.cross_setup import check_cross_data
    from functional_lm.kd.cross_teacher import CrossTokenizerTeacher
    from functional_lm.kd.objective import Model

    _check_top_k(args.top_k, choice.student.real_vocab_size)
    data = _prepare(args, choice.student, None)
    check_cross_data(choice, data)  # 在加载教师权重之前
    weights = teacher_weights_fingerprint(teacher_dir)
    teacher_cfg, params = load_pretrained(teacher_dir, dtype=torch.float32)
    teacher = Model({k: v.to(device) for k, v in params.items()}, teacher_cfg)
    tcfg = TrainingConfig(top_k=args.top_k, temperature=args.temperature, document_mask=document_mask)
    source = CrossTokenizerTeacher(teacher, choice.student, choice.teacher, choice.vocab_map, choice.mode, tcfg)
    print(f"[teacher-cache] cross-tokenizer ({choice.mode}): {choice.vocab_map.describe()}", file=sys.stderr)

    def job(split: str) -> Callable:
        fp = make_fingerprint(choice.student, data.store, teacher_weights=weights, split=split,
                              val_fraction=args.val_fraction, split_seed=args.split_seed)
        return lambda stop: build_cross_teacher_cache(
            source, getattr(data, split), out / split, fingerprint=fp, document_mask=document_mask,
            batch_size=args.batch_size, blocks_per_shard=args.blocks_per_shard, device=device,
            value_dtype=args.value_dtype, progress=not args.no_progress, stop=stop, teacher_name=args.teacher)

    splits = ["train"] + (["val"] if len(data.val) > 0 else [])
    return [(split, getattr(data, split), job(split)) for split in splits]


def _served_jobs(args: argparse.Namespace, out: Path, document_mask: bool) -> list[tuple[str, Any, Callable]]:
    """服务端教师：分词打包（与 distill 相同），探测服务器，为每个划分建缓存；teacher_weights 记服务器上的模型名。"""
    from functional_lm.kd.cache_build import build_served_cache
    from functional_lm.kd.cache_identity import make_fingerprint
    from functional_lm.kd.served import open_served_teacher

    from functional_lm.config import ModelConfig
    from functional_lm.kd.cross_setup import choose_tokenizers

    choice = choose_tokenizers({"tokenizer": args.tokenizer, "teacher_tokenizer": args.teacher_tokenizer,
                                "cross_tokenizer": args.cross_tokenizer}, None, None, ModelConfig())
    tokenizer = choice.student
    _check_top_k(args.top_k, tokenizer.real_vocab_size)
    run = {"teacher_url": args.teacher_url, "teacher_model": args.teacher_model,
           "teacher_timeout": args.teacher_timeout, "teacher_concurrency": args.teacher_concurrency}
    vocab = (choice.teacher if choice.cross else tokenizer).real_vocab_size  # 服务器的 id 是教师词表的
    served = open_served_teacher(run, args.top_k, vocab, args.seq_len)  # 分词之前先探测
    if choice.cross:
        return _served_cross_jobs(args, out, document_mask, choice, served)
    data = _prepare(args, tokenizer, None)

    def job(split: str) -> Callable:
        fp = make_fingerprint(tokenizer, data.store, teacher_weights=f"served:{served.model}", split=split,
                              val_fraction=args.val_fraction, split_seed=args.split_seed)
        return lambda stop: build_served_cache(
            served, getattr(data, split), out / split, fingerprint=fp, document_mask=document_mask,
            batch_size=args.batch_size, blocks_per_shard=args.blocks_per_shard, value_dtype=args.value_dtype,
            progress=not args.no_progress, stop=stop)

    splits = ["train"] + (["val"] if len(data.val) > 0 else [])
    return [(split, getattr(data, split), job(split)) for split in splits]


def _served_cross_jobs(args: argparse.Namespace, out: Path, document_mask: bool, choice: Any,
                       served: Any) -> list[tuple[str, Any, Callable]]:
    """服务端教师、另一套分词器：学生的分词器打包，按文本对齐后教师流发给服务器，目标存在学生的位置上。"""
    from functional_lm.config import TrainingConfig
    from functional_lm.kd.cache_identity import make_fingerprint
    from functional_lm.kd.cross_cache import build_cross_teacher_cache
    from functional_lm.kd.cross_served import ServedCrossTeacher
    from functional_lm.kd.cross_setup import check_cross_data

    data = _prepare(args, choice.student, None)
    check_cross_data(choice, data)
    tcfg = TrainingConfig(top_k=args.top_k, temperature=1.0, document_mask=document_mask)
    source = ServedCrossTeacher(served, choice.student, choice.teacher, choice.vocab_map, choice.mode, tcfg)
    print(f"[teacher-cache] cross-tokenizer ({choice.mode}), served: {choice.vocab_map.describe()}", file=sys.stderr)

    def job(split: str) -> Callable:
        fp = make_fingerprint(choice.student, data.store, teacher_weights=f"served:{served.model}", split=split,
                              val_fraction=args.val_fraction, split_seed=args.split_seed)
        return lambda stop: build_cross_teacher_cache(
            source, getattr(data, split), out / split, fingerprint=fp, document_mask=document_mask,
            batch_size=args.batch_size, blocks_per_shard=args.blocks_per_shard, value_dtype=args.value_dtype,
            progress=not args.no_progress, stop=stop, teacher_name=args.teacher_url)

    splits = ["train"] + (["val"] if len(data.val) > 0 else [])
    return [(split, getattr(data, split), job(split)) for split in splits]


def _import_jobs(args: argparse.Namespace, out: Path, document_mask: bool) -> list[tuple[str, Any, Callable]]:
    """导入 JSON lines：分词打包（与 distill 相同），只为训练块建缓存；teacher_weights 由库取文件的 sha256。"""
    from functional_lm.data import load_tokenizer
    from functional_lm.kd.cache_import import import_topk_jsonl
    from functional_lm.kd.cache_identity import make_fingerprint

    tokenizer = load_tokenizer(Path(args.tokenizer) if args.tokenizer else None)
    _check_top_k(args.top_k, tokenizer.real_vocab_size)
    data = _prepare(args, tokenizer, None)
    # teacher_weights=None：import_topk_jsonl 记下 "jsonl-sha256:<文件内容的 sha256>"。
    fp = make_fingerprint(tokenizer, data.store, teacher_weights=None, split="train",
                          val_fraction=args.val_fraction, split_seed=args.split_seed)
    if len(data.val) > 0:
        print(f"note: --import fills only {out / 'train'}; the {len(data.val)} validation blocks get no cached "
              f"targets", file=sys.stderr)
    rows = len(data.train) * data.train.seq_len
    print(f"[teacher-cache] importing {args.import_file}: expecting {rows} rows ({len(data.train)} train blocks × "
          f"{data.train.seq_len} positions)", file=sys.stderr)

    def build(stop: Callable[[], bool]) -> Any:
        return import_topk_jsonl(
            Path(args.import_file).expanduser(), data.train, out / "train", fingerprint=fp, top_k=args.top_k,
            temperature=args.temperature, real_vocab_size=tokenizer.real_vocab_size, document_mask=document_mask,
            value_dtype=args.value_dtype, blocks_per_shard=args.blocks_per_shard, progress=not args.no_progress,
            stop=stop,
        )

    return [("train", data.train, build)]


# ---------------------------------------------------------------- 构建、中断与总结
def _build_all(out: Path, jobs: list[tuple[str, Any, Callable]]) -> None:
    """依次构建各划分；SIGINT / SIGTERM 让构建在分片之间停下，抛 Interrupted（退出码 130）说明怎样继续。"""
    from functional_lm.runs.monitor import stop_on_signals

    again = "the committed shards are kept; rerun the same command to continue"
    try:
        with stop_on_signals() as flag:
            for split, dataset, build in jobs:
                print(f"[teacher-cache] {split}: {len(dataset)} blocks × {dataset.seq_len} tokens → {out / split}",
                      file=sys.stderr)
                status = build(lambda: flag.requested is not None)
                if not status.complete:
                    raise Interrupted(f"{flag.requested or 'stop'} received: {out / split} has {status.shards_done} "
                                      f"of {status.num_shards} shards; {again}")
    except Interrupted:
        raise
    except KeyboardInterrupt:  # 第二次 Ctrl-C：正在写的分片被丢弃，已提交的分片都在
        raise Interrupted(f"interrupted during a shard of {out}; {again}") from None


def _summary(out: Path, splits: list[str]) -> str:
    """一行总结：每个划分的块数与 token 数，合计字节数、每 token 字节数与位置。"""
    from functional_lm.kd.cache_build import human_bytes
    from functional_lm.kd.teacher_cache import TeacherCache

    parts, tokens, nbytes = [], 0, 0
    for split in splits:
        cache = TeacherCache.open(out / split)
        n = cache.num_blocks * cache.seq_len
        parts.append(f"{split} {cache.num_blocks} blocks ({n} tokens)")
        tokens += n
        nbytes += sum(rec["bytes"] for shard in cache.index["shards"] for rec in shard["files"].values())
    per = nbytes / max(tokens, 1)
    return (f"teacher cache complete: {', '.join(parts)}; {human_bytes(nbytes)}, {per:.1f} bytes/token "
            f"(top-k {cache.top_k}, T={cache.temperature:g}, {cache.value_dtype}) in {out}")


def _cmd_teacher_cache(args: argparse.Namespace) -> int:
    document_mask = _check_args(args)
    out = Path(args.output_dir).expanduser()
    make = _import_jobs if args.import_file is not None else _served_jobs if args.teacher_url else _teacher_jobs
    jobs = make(args, out, document_mask)
    _build_all(out, jobs)
    print(_summary(out, [split for split, _, _ in jobs]), file=sys.stderr)
    return 0
