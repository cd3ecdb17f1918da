"""``functional-lm`` 命令行：argparse 子命令结构。

每个子命令是一个 ``register(subparsers)`` 函数：建子解析器、声明参数、``set_defaults(func=...)``；
新增子命令（例如后续的 ``distill``）只需写一个这样的函数并加入 ``SUBCOMMANDS``。

    functional-lm generate --model DIR (--prompt TEXT | --prompt-ids 1,2,3) [--max-new-tokens N]
                           [--temperature T --top-k K --top-p P --seed S --dtype D --device DEV --compile]

错误（坏参数、坏检查点）打印到 stderr 并返回退出码 2。
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

__all__ = ["main", "build_parser", "SUBCOMMANDS"]

_DTYPES = ("auto", "float32", "bfloat16", "float16", "float64")


# ---------------------------------------------------------------- 分词器
class _RawTokenizer:
    """``tokenizers.Tokenizer`` 的薄包装（数据模块的 load_tokenizer 不可用时的退路）。"""

    def __init__(self, directory: Path) -> None:
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_file(str(directory / "tokenizer.json"))
        self.eos_token_id: Optional[int] = None
        config_file = directory / "tokenizer_config.json"
        if config_file.exists():
            eos = json.loads(config_file.read_text(encoding="utf-8")).get("eos_token")
            eos = eos.get("content") if isinstance(eos, dict) else eos
            self.eos_token_id = self._tok.token_to_id(eos) if isinstance(eos, str) else None

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)


def _load_tokenizer(directory: Path) -> Any:
    """检查点目录里有分词器时加载它：优先 functional_lm.data.load_tokenizer，否则退回 tokenizers。"""
    if not (directory / "tokenizer.json").exists() and not (directory / "vocab.json").exists():
        return None
    try:
        from functional_lm.data import load_tokenizer
    except ImportError:
        load_tokenizer = None
    if load_tokenizer is not None:
        try:
            return load_tokenizer(directory)
        except Exception as err:  # 数据模块拒绝时（例如缺少约定的特殊 token）退回原始 tokenizers
            print(f"functional-lm: load_tokenizer failed ({err}); using tokenizers directly", file=sys.stderr)
    if not (directory / "tokenizer.json").exists():
        return None
    return _RawTokenizer(directory)


def _config_eos(directory: Path) -> Optional[list[int]]:
    """generation_config.json / config.json 里的 eos_token_id（int 或列表）。"""
    for name in ("generation_config.json", "config.json"):
        file = directory / name
        if file.exists():
            eos = json.loads(file.read_text(encoding="utf-8")).get("eos_token_id")
            if eos is not None:
                return [eos] if isinstance(eos, int) else list(eos)
    return None


# ---------------------------------------------------------------- generate 子命令
def _parse_ids(text: str) -> list[int]:
    parts = [p for p in re.split(r"[,\s]+", text.strip()) if p]
    if not parts or not all(re.fullmatch(r"\d+", p) for p in parts):
        raise ValueError(f"--prompt-ids must be non-negative integers separated by commas or spaces, got {text!r}")
    return [int(p) for p in parts]


def _register_generate(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("generate", help="从检查点目录流式生成续写", description="流式生成：边生成边打印。")
    p.add_argument("--model", required=True, help="Qwen2 检查点目录（config.json + *.safetensors）或 hub id")
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="文本提示（需要目录里有分词器）")
    prompt.add_argument("--prompt-ids", help="token id 提示，例如 1,2,3")
    p.add_argument(
        "--max-new-tokens", type=int, default=None, help="最多生成多少个新 token（默认 64，且不超出 max_seq_len）"
    )
    p.add_argument("--temperature", type=float, default=0.0, help="采样温度；0 为贪心（默认）")
    p.add_argument("--top-k", type=int, default=None, help="只在概率最高的 k 个 token 中采样")
    p.add_argument("--top-p", type=float, default=None, help="核采样：累计概率达到 p 的最小集合")
    p.add_argument("--seed", type=int, default=0, help="采样随机种子")
    p.add_argument("--dtype", choices=_DTYPES, default="auto", help="参数 dtype；auto = 检查点自己的 dtype")
    p.add_argument("--device", default="cpu", help="设备，例如 cpu、cuda")
    p.add_argument("--compile", action="store_true", help="用 torch.compile 编译解码步")
    p.add_argument("--ignore-eos", action="store_true", help="不在 eos 处停止")
    p.set_defaults(func=_cmd_generate)


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


def _cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from functional_lm.generate import generate_stream
    from functional_lm.hf import load_pretrained, resolve_checkpoint

    directory = resolve_checkpoint(args.model)
    tokenizer = _load_tokenizer(directory)
    if args.prompt is not None:
        if tokenizer is None:
            raise ValueError(f"{directory} has no tokenizer (tokenizer.json); pass token ids with --prompt-ids")
        prompt = list(tokenizer.encode(args.prompt))
    else:
        prompt = _parse_ids(args.prompt_ids)
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    cfg, params = load_pretrained(directory, dtype=dtype, device=args.device)
    max_new = args.max_new_tokens
    if max_new is None:  # 缺省 64，但不超出模型的位置上限
        max_new = max(1, min(64, cfg.max_seq_len - len(prompt)))
    eos = None
    if not args.ignore_eos:
        tok_eos = getattr(tokenizer, "eos_token_id", None)
        eos = [tok_eos] if tok_eos is not None else _config_eos(directory)
    stream = _TextStream(tokenizer) if tokenizer is not None else None
    out = sys.stdout
    for token in generate_stream(
        params, cfg, [prompt], max_new, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, eos_token_id=eos, seed=args.seed, compile=args.compile,
    ):
        token_id = int(token[0])
        if eos is not None and token_id in eos:
            break
        out.write(stream.push(token_id) if stream is not None else f"{token_id} ")
        out.flush()
    out.write("\n")
    out.flush()
    return 0


# ---------------------------------------------------------------- 入口
def _register_distill(subparsers: argparse._SubParsersAction) -> None:
    from functional_lm.distill import register

    register(subparsers)


SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_register_generate, _register_distill]


def build_parser() -> argparse.ArgumentParser:
    """顶层解析器：每个子命令由 SUBCOMMANDS 中的一个注册函数加入。"""
    parser = argparse.ArgumentParser(
        prog="functional-lm", description="函数式 Qwen2 / Qwen2.5：生成与知识蒸馏 / functional Qwen2 tools"
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in SUBCOMMANDS:
        register(subparsers)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """命令行入口；返回退出码（0 成功，2 参数或输入错误）。"""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as err:
        print(f"functional-lm {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
