"""``functional-lm generate``：从检查点目录流式生成续写（边生成边打印）。

    functional-lm generate --model DIR (--prompt TEXT | --prompt-ids 1,2,3) [--max-new-tokens N]
                           [--temperature T --top-k K --top-p P --seed S --dtype D --device DEV --compile]

参数在导入 torch 之前核对（``check_args``）；分词器读检查点目录里的 tokenizer.json（没有时只收 --prompt-ids）。
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

__all__ = ["register", "attach_dash_values"]

_DTYPES = ("auto", "float32", "bfloat16", "float16", "float64")


class _RawTokenizer:
    """``tokenizers.Tokenizer`` 的薄包装（数据模块的 load_tokenizer 不可用时的退路）。"""

    def __init__(self, directory: Path) -> None:
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_file(str(directory / "tokenizer.json"))
        self.eos_token_id: Optional[int] = None
        config_file = directory / "tokenizer_config.json"
        if config_file.exists():
            eos = _read_json(config_file).get("eos_token")
            eos = eos.get("content") if isinstance(eos, dict) else eos
            self.eos_token_id = self._tok.token_to_id(eos) if isinstance(eos, str) else None

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)


def _load_tokenizer(directory: Path) -> Any:
    """检查点目录里有分词器时加载它：优先 functional_lm.data.load_tokenizer，否则退回 tokenizers。

    两条路都失败（tokenizer.json 损坏、被截断……）时抛出一段话的 ValueError，点名文件与两个原因。"""
    if not (directory / "tokenizer.json").exists() and not (directory / "vocab.json").exists():
        return None
    try:
        from functional_lm.data import load_tokenizer
    except ImportError:
        load_tokenizer = None
    reason = None
    if load_tokenizer is not None:
        try:
            return load_tokenizer(directory)
        except Exception as err:  # 数据模块拒绝时（例如缺少约定的特殊 token）退回原始 tokenizers
            reason = " ".join(str(err).split()) or type(err).__name__
    file = directory / "tokenizer.json"
    if not file.exists():  # 只有 vocab.json：没有可退回的 tokenizer.json，当作没有分词器（同以前）
        if reason is not None:
            print(f"functional-lm: load_tokenizer failed ({reason}); continuing without a tokenizer", file=sys.stderr)
        return None
    try:
        raw = _RawTokenizer(directory)
    except Exception as err:  # tokenizers 对坏文件抛出的是裸 Exception
        detail = " ".join(str(err).split()) or type(err).__name__
        if reason is None:
            reason = (f"{file} is not a readable tokenizer ({detail}); copy the tokenizer files again from where "
                      f"the model came from")
        else:
            reason = f"{reason} (the tokenizers library cannot read {file.name} either: {detail})"
        raise ValueError(f"cannot load the tokenizer of {directory}: {reason}") from None
    if reason is not None:
        print(f"functional-lm: load_tokenizer failed ({reason}); using tokenizers directly", file=sys.stderr)
    return raw


def _read_json(file: Path) -> dict[str, Any]:
    """读 JSON 对象；坏文件报一段话的 ValueError（点名文件）。"""
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{file} is not valid JSON ({err}); the file is damaged") from None
    if not isinstance(data, dict):
        raise ValueError(f"{file} must contain a JSON object, found {type(data).__name__}")
    return data


def _config_eos(directory: Path) -> Optional[list[int]]:
    """generation_config.json / config.json 里的 eos_token_id（int 或列表）。"""
    for name in ("generation_config.json", "config.json"):
        file = directory / name
        if file.exists():
            eos = _read_json(file).get("eos_token_id")
            if eos is not None:
                return [eos] if isinstance(eos, int) else list(eos)
    return None


def _parse_ids(text: str) -> list[int]:
    """--prompt-ids 的文字 → token id 列表：逗号或空白分隔的非负整数（上界 vocab_size 在读到模型配置后核对）。"""
    parts = [p for p in re.split(r"[,\s]+", text.strip()) if p]
    if not parts or not all(re.fullmatch(r"[+-]?\d+", p) for p in parts):
        raise ValueError(f"--prompt-ids must be non-negative integers separated by commas or spaces, got {text!r}")
    ids = [int(p) for p in parts]
    negative = [i for i in ids if i < 0]
    if negative:
        raise ValueError(
            f"--prompt-ids: token ids must be in [0, vocab_size) of the model, got {negative[0]} in {text!r}"
        )
    return ids


def _check_utf8(text: str, option: str) -> None:
    """命令行文字必须是合法 UTF-8：Python 把 argv 里的坏字节解码成代理字符（surrogateescape），分词器收不下。"""
    try:
        text.encode("utf-8")
        return
    except UnicodeEncodeError:
        pass
    try:
        raw = text.encode("utf-8", "surrogateescape")  # 还原 argv 里原来的字节
        raw.decode("utf-8")
        detail = "it contains invalid characters"
    except UnicodeDecodeError as err:
        detail = f"byte 0x{raw[err.start]:02x} at byte offset {err.start} is not UTF-8"
    except UnicodeEncodeError as err:
        detail = f"it contains the lone surrogate U+{ord(text[err.start]):04X} at character {err.start}"
    raise ValueError(
        f"{option} is not valid UTF-8 text ({detail}); pass the prompt as UTF-8 (check the terminal's or the "
        f"script's encoding), or give token ids with --prompt-ids"
    )


def _check_generate_args(args: argparse.Namespace) -> None:
    """导入 torch 之前能查的都在这里查：数值的范围（与 distill 同一套 config.Bounds）、提示、--model 不是文件。"""
    from functional_lm.config import POSITIVE_INT, SAMPLING_TEMPERATURE, SEED, TOP_P

    model = Path(args.model).expanduser()
    if model.is_file():
        raise NotADirectoryError(
            f"--model {args.model} is a file; expected a checkpoint directory containing config.json and "
            f"*.safetensors (or a hub id)"
        )
    if args.max_new_tokens is not None:
        POSITIVE_INT.check("--max-new-tokens", args.max_new_tokens)
    SAMPLING_TEMPERATURE.check("--temperature", args.temperature)
    if args.top_k is not None:
        POSITIVE_INT.check("--top-k", args.top_k)
    if args.top_p is not None:
        TOP_P.check("--top-p", args.top_p)
    SEED.check("--seed", args.seed)
    if args.prompt is not None:
        _check_utf8(args.prompt, "--prompt")
        if not args.prompt:
            raise ValueError("--prompt is empty: give some text, or token ids with --prompt-ids")
    else:
        _parse_ids(args.prompt_ids)


def attach_dash_values(argv: list[str]) -> list[str]:
    """``--prompt-ids -1,2`` → ``--prompt-ids=-1,2``：argparse 把以 '-' 开头的值当成选项（报“expected one
    argument”）；连上之后值照常到达 _parse_ids，由它给出清楚的消息。"""
    out: list[str] = []
    i = 0
    while i < len(argv):
        if argv[i] == "--prompt-ids" and i + 1 < len(argv) and re.fullmatch(r"-\d[\d,\s+-]*", argv[i + 1]):
            out.append(f"--prompt-ids={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "generate", help="从检查点目录流式生成续写 / stream a continuation from a checkpoint",
        description="流式生成：边生成边打印 / streaming generation: tokens are printed as they are produced.",
    )
    p.add_argument("--model", required=True, help="检查点目录（Qwen2 / Qwen3 / Qwen3-MoE / DeepSeek-V3，config.json + "
                   "*.safetensors）或 hub id / checkpoint directory (Qwen2, Qwen3, Qwen3-MoE, DeepSeek-V3: config.json + "
                   "*.safetensors) or hub id")
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="文本提示（需要目录里有分词器）/ text prompt (needs the checkpoint's tokenizer)")
    prompt.add_argument("--prompt-ids", help="token id 提示，例如 1,2,3 / prompt as token ids, e.g. 1,2,3")
    p.add_argument("--max-new-tokens", type=int, default=None, help="最多生成多少个新 token（默认 64）；超出模型的"
                   "最大长度时在那里停下 / at most this many new tokens (default 64); stops at the model's maximum "
                   "length")
    p.add_argument("--temperature", type=float, default=0.0, help="采样温度；0 为贪心（默认）/ sampling "
                   "temperature; 0 = greedy (default)")
    p.add_argument("--top-k", type=int, help="只在概率最高的 k 个 token 中采样 / sample among the k most likely tokens")
    p.add_argument("--top-p", type=float, help="核采样：累计概率达到 p 的最小集合 / nucleus sampling threshold p")
    p.add_argument("--seed", type=int, default=0, help="采样随机种子（默认 0）/ sampling seed (default 0)")
    p.add_argument("--dtype", choices=_DTYPES, default="auto", help="参数 dtype；auto = 检查点自己的 / parameter "
                   "dtype; auto = the checkpoint's own")
    p.add_argument("--device", default="auto", help="设备：auto（有 CUDA 用 CUDA）、cpu、cuda、cuda:N / device: "
                   "auto (CUDA when present), cpu, cuda, cuda:N")
    p.add_argument("--compile", action="store_true", help="用 torch.compile 编译解码步 / torch.compile the decode step")
    p.add_argument("--ignore-eos", action="store_true", help="不在 eos 处停止 / do not stop at eos")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="出错时显示 Python 回溯 / show Python tracebacks on errors")
    p.set_defaults(func=_cmd_generate, check_args=_check_generate_args)


class _TextStream:
    """增量解码：每次解码全部新 token，只打印新增的后缀；末尾是不完整 UTF-8（U+FFFD）时先不打印。"""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer, self.ids, self.printed = tokenizer, [], ""

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd") or not text.startswith(self.printed):
            return ""
        new, self.printed = text[len(self.printed) :], text
        return new


def _new_token_budget(requested: Optional[int], prompt_len: int, max_len: int) -> int:
    """新 token 数：默认 64；不超过模型剩下的位置（超出时在 stderr 说明并截短）。requested >= 1 已在启动时查过。"""
    room = max_len - prompt_len
    if room < 1:
        raise ValueError(
            f"the prompt has {prompt_len} tokens, but this model reads at most {max_len} (max_position_embeddings); "
            f"shorten the prompt"
        )
    if requested is None:
        return min(64, room)
    if requested > room:
        print(
            f"note: generating at most {room} new tokens: the prompt has {prompt_len} tokens and the model "
            f"reads at most {max_len}",
            file=sys.stderr,
        )
    return min(requested, room)


def _stop_ids(tokenizer: Any, directory: Path) -> Optional[list[int]]:
    """停止的 token：分词器的 eos 与 generation_config.json / config.json 里的 eos_token_id 的并集。"""
    ids = list(_config_eos(directory) or [])
    tok_eos = getattr(tokenizer, "eos_token_id", None)
    if tok_eos is not None and tok_eos not in ids:
        ids.insert(0, tok_eos)
    return ids or None


def _check_ids_in_vocab(prompt: Sequence[int], vocab_size: int, directory: Path) -> None:
    """--prompt-ids 的每个 id 都在 [0, vocab_size) 中（上界取自模型的 config.json）。"""
    outside = [i for i in prompt if not 0 <= i < vocab_size]
    if outside:
        raise ValueError(
            f"--prompt-ids: token id {outside[0]} is outside the vocabulary of {directory}: ids must be in "
            f"[0, {vocab_size}) (vocab_size={vocab_size})"
        )


def _nonfinite_error(directory: Path, params: Any, in_prompt: bool) -> Exception:
    """模型给出 NaN / inf 的 logits：权重本身非有限 → 坏的检查点（输入错误）；否则是数值溢出（运行失败）。"""
    import torch

    from functional_lm.errors import RunFailure

    bad = [name for name, value in params.items() if not bool(torch.isfinite(value).all())]
    dtype = str(next(iter(params.values())).dtype).removeprefix("torch.")
    where = "on the prompt" if in_prompt else "while generating (the tokens printed so far are meaningless)"
    if bad:
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        return ValueError(
            f"the model in {directory} cannot generate: {len(bad)} of its weight tensors contain NaN or inf "
            f"({shown}), so its logits are non-finite {where}; the checkpoint is damaged or comes from a run "
            f"that diverged"
        )
    return RunFailure(
        f"the model in {directory} produced non-finite logits (NaN or inf) {where} although its weights are "
        f"finite: the activations overflowed in --dtype {dtype}; try --dtype float32"
    )


def _prompt_ids(args: argparse.Namespace, tokenizer: Any, directory: Path) -> list[int]:
    """--prompt 经分词器编码，或 --prompt-ids 原样解析。"""
    if args.prompt_ids is not None:
        return _parse_ids(args.prompt_ids)
    if tokenizer is None:
        raise ValueError(f"{directory} has no tokenizer (tokenizer.json); pass token ids with --prompt-ids")
    prompt = list(tokenizer.encode(args.prompt))
    if not prompt:
        raise ValueError("--prompt is empty: it encodes to no tokens")
    return prompt


def _cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from functional_lm.devices import resolve_device
    from functional_lm.generate import generate_stream
    from functional_lm.errors import NonFiniteLogits
    from functional_lm.hf import load_pretrained, resolve_checkpoint

    device = resolve_device(args.device)
    directory = resolve_checkpoint(args.model)
    tokenizer = _load_tokenizer(directory)
    prompt = _prompt_ids(args, tokenizer, directory)
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    cfg, params = load_pretrained(directory, dtype=dtype, device=device)
    if args.prompt_ids is not None:
        _check_ids_in_vocab(prompt, cfg.vocab_size, directory)
    max_new = _new_token_budget(args.max_new_tokens, len(prompt), cfg.max_seq_len)
    eos = None if args.ignore_eos else _stop_ids(tokenizer, directory)
    stream = _TextStream(tokenizer) if tokenizer is not None else None
    out = sys.stdout
    tokens = generate_stream(
        params, cfg, [prompt], max_new, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, eos_token_id=eos, seed=args.seed, compile=args.compile, check_finite=True,
        vocab_limit=getattr(tokenizer, "real_vocab_size", None),  # 嵌入的填充行（分词器之外的 id）不会被采到
    )
    try:
        for token in tokens:  # 遇 eos 时流自己结束（不 break：流在最后一个 token 之后核对 logits 是否有限）
            token_id = int(token[0])
            if eos is None or token_id not in eos:
                out.write(stream.push(token_id) if stream is not None else f"{token_id} ")
                out.flush()
    except NonFiniteLogits as err:
        if not err.in_prompt:
            out.write("\n")  # 已经打印的 token 之后换行，错误另起一行
        raise _nonfinite_error(directory, params, err.in_prompt) from err
    out.write("\n")
    out.flush()
    return 0
