"""对话格式测试：Qwen2.5 聊天模板的渲染（与 jinja 模板、transformers apply_chat_template 一致）
以及只在助手 token 上计损失的掩码。"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.usefixtures("qwen_tokenizer")  # 需要离线 Qwen2.5 分词器

from _data_fixtures import qwen_tokenizer_dir  # noqa: E402

from functional_lm.data import load_tokenizer  # noqa: E402
from functional_lm.data.chat import (  # noqa: E402
    QWEN25_CHAT_TEMPLATE,
    QWEN25_DEFAULT_SYSTEM,
    render_chat,
    validate_messages,
)

CHAT = [
    {"role": "user", "content": "2+2=?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "再加一？"},
    {"role": "assistant", "content": "5。"},
]

CASES = [
    CHAT,
    [{"role": "system", "content": "Be terse."}] + CHAT,
    [
        {"role": "user", "content": "weather?"},
        {"role": "tool", "content": "sunny"},
        {"role": "tool", "content": "25C"},
        {"role": "assistant", "content": "  Sunny, 25C.\n"},
    ],
]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(None)


def test_render_matches_hand_written_chatml():
    text, spans = render_chat(CHAT)
    expected = (
        f"<|im_start|>system\n{QWEN25_DEFAULT_SYSTEM}<|im_end|>\n"
        "<|im_start|>user\n2+2=?<|im_end|>\n"
        "<|im_start|>assistant\n4<|im_end|>\n"
        "<|im_start|>user\n再加一？<|im_end|>\n"
        "<|im_start|>assistant\n5。<|im_end|>\n"
    )
    assert text == expected
    # 助手片段 = 内容 + 紧随其后的 <|im_end|>。
    assert [text[a:b] for a, b in spans] == ["4<|im_end|>", "5。<|im_end|>"]


@pytest.mark.parametrize("messages", CASES)
@pytest.mark.parametrize("gen", [False, True])
def test_python_renderer_equals_jinja_template(messages, gen):
    pytest.importorskip("jinja2")
    py_text, py_spans = render_chat(messages, add_generation_prompt=gen)
    j_text, j_spans = render_chat(
        messages, template=QWEN25_CHAT_TEMPLATE, add_generation_prompt=gen, force_jinja=True
    )
    assert py_text == j_text
    assert py_spans == j_spans


@pytest.mark.parametrize("messages", CASES)
def test_renderer_equals_transformers_apply_chat_template(messages):
    transformers = pytest.importorskip("transformers")
    auto = transformers.AutoTokenizer.from_pretrained(str(qwen_tokenizer_dir()))
    ref = auto.apply_chat_template(messages, tokenize=False)
    assert render_chat(messages)[0] == ref
    ids = load_tokenizer(None).apply_chat_template(messages).input_ids
    assert ids == auto.encode(ref, add_special_tokens=False)


def test_assistant_mask_on_hand_made_example(tok):
    enc = tok.apply_chat_template(CHAT)
    ids, mask = enc.input_ids, enc.assistant_mask
    assert len(ids) == len(mask)
    masked = [i for i, m in zip(ids, mask) if m]
    # 只有两段助手回复（各自连同 <|im_end|>）计损失。
    assert masked == tok.encode("4") + [151645] + tok.encode("5。") + [151645]
    assert tok.decode(masked) == "4<|im_end|>5。<|im_end|>"
    # 掩码在助手回复处是连续的两段：前面是 "<|im_start|>assistant\n"。
    first = mask.index(True)
    assert ids[first - 3 : first] == [151644, 77091, 198]
    assert mask[first : first + 2] == [True, True] and mask[first + 2] is False  # 之后的 "\n" 不计


def test_teacher_template_gives_same_mask(tok):
    pytest.importorskip("jinja2")
    hf_tok = load_tokenizer(qwen_tokenizer_dir())
    a = tok.apply_chat_template(CASES[2])
    b = hf_tok.apply_chat_template(CASES[2])
    assert a.input_ids == b.input_ids and a.assistant_mask == b.assistant_mask
    assert any(a.assistant_mask)


def test_generation_prompt_has_no_loss(tok):
    enc = tok.apply_chat_template(CHAT[:1], add_generation_prompt=True)
    assert enc.input_ids[-3:] == [151644, 77091, 198]
    assert not any(enc.assistant_mask)


@pytest.mark.parametrize(
    "messages, pattern",
    [
        ([{"role": "wizard", "content": "hi"}], r"message 0.*unknown role 'wizard'"),
        ([{"role": "user"}], r"message 0.*content"),
        ([{"role": "user", "content": 3}], r"message 0.*content"),
        ("not a list", r"list"),
        ([], r"empty"),
    ],
)
def test_validate_messages_errors(messages, pattern):
    with pytest.raises(ValueError, match=pattern):
        validate_messages(messages)
