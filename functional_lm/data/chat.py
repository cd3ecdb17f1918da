"""对话格式：把 ``messages``（role/content 列表）按 Qwen2.5 聊天模板渲染成文本，并给出“只在助手 token 上
计损失”的掩码。

两条渲染路径，结果逐字相同（测试保证）：
    * 内置的 Python ChatML 渲染器：Qwen2.5 模板去掉工具定义部分（支持 system/user/assistant/tool 角色），
      离线默认分词器用它，无需 jinja2；
    * 教师目录自带的 jinja 模板（tokenizer_config.json 的 chat_template）：用 jinja2 渲染；为了找出助手回复在
      渲染结果中的位置，先把每条助手内容换成一个私用区哨兵串，渲染后定位哨兵再换回原文。

掩码规则：助手回复的内容及紧随其后的回合结束特殊 token（Qwen 的 ``<|im_end|>``）计损失；
``<|im_start|>assistant\\n`` 这类角色前缀、系统 / 用户 / 工具内容和回合之间的换行都不计。
token 是否计损失看它的起始字符是否落在助手区间内。
"""

from __future__ import annotations

import bisect
import json
import unicodedata
from typing import Any, NamedTuple, Sequence

__all__ = [
    "ROLES",
    "QWEN25_DEFAULT_SYSTEM",
    "QWEN25_CHAT_TEMPLATE",
    "ChatEncoding",
    "validate_messages",
    "render_chat",
    "encode_chat",
]

ROLES = ("system", "user", "assistant", "tool")
QWEN25_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

# Qwen2.5-Instruct 的 chat_template（tokenizer_config.json 原文）。
QWEN25_CHAT_TEMPLATE = (
    "{%- if tools %}\n"
    "    {{- '<|im_start|>system\\n' }}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- messages[0]['content'] }}\n"
    "    {%- else %}\n"
    "        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}\n"
    "    {%- endif %}\n"
    '    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n'
    'You are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}\n'
    "    {%- for tool in tools %}\n"
    '        {{- "\\n" }}\n'
    "        {{- tool | tojson }}\n"
    "    {%- endfor %}\n"
    '    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and '
    "arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, "
    '\\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}\n'
    "{%- else %}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    "    {%- else %}\n"
    "        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
    "assistant.<|im_end|>\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    '    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or '
    '(message.role == "assistant" and not message.tool_calls) %}\n'
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    '    {%- elif message.role == "assistant" %}\n'
    "        {{- '<|im_start|>' + message.role }}\n"
    "        {%- if message.content %}\n"
    "            {{- '\\n' + message.content }}\n"
    "        {%- endif %}\n"
    "        {%- for tool_call in message.tool_calls %}\n"
    "            {%- if tool_call.function is defined %}\n"
    "                {%- set tool_call = tool_call.function %}\n"
    "            {%- endif %}\n"
    "            {{- '\\n<tool_call>\\n{\"name\": \"' }}\n"
    "            {{- tool_call.name }}\n"
    "            {{- '\", \"arguments\": ' }}\n"
    "            {{- tool_call.arguments | tojson }}\n"
    "            {{- '}\\n</tool_call>' }}\n"
    "        {%- endfor %}\n"
    "        {{- '<|im_end|>\\n' }}\n"
    '    {%- elif message.role == "tool" %}\n'
    '        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}\n'
    "            {{- '<|im_start|>user' }}\n"
    "        {%- endif %}\n"
    "        {{- '\\n<tool_response>\\n' }}\n"
    "        {{- message.content }}\n"
    "        {{- '\\n</tool_response>' }}\n"
    '        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}\n'
    "            {{- '<|im_end|>\\n' }}\n"
    "        {%- endif %}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
Span = tuple[int, int]  # 助手区间 [start, end)，字符下标


class ChatEncoding(NamedTuple):
    """一段对话的分词结果：token id 与等长的“是否计损失”掩码。"""

    input_ids: list[int]
    assistant_mask: list[bool]


def validate_messages(messages: Any) -> None:
    """检查对话结构；出错抛 ValueError，消息里写明第几条消息、哪里不对。"""
    if not isinstance(messages, (list, tuple)):
        raise ValueError(f"messages must be a list of {{role, content}} dicts, got {type(messages).__name__}")
    if not messages:
        raise ValueError("messages is empty")
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise ValueError(f"message {i} must be a dict with 'role' and 'content', got {msg!r}")
        role = msg.get("role")
        if role not in ROLES:
            raise ValueError(f"message {i} has unknown role {role!r} (expected one of {', '.join(ROLES)})")
        if not isinstance(msg.get("content"), str) and not (role == "assistant" and msg.get("tool_calls")):
            raise ValueError(f"message {i} ({role}) needs a string 'content', got {msg.get('content')!r}")


def _render_chatml(messages: Sequence[dict], add_generation_prompt: bool) -> tuple[str, list[Span]]:
    """Qwen2.5 模板（无 tools）的 Python 版本，同时记录助手区间（内容 + <|im_end|>）。"""
    parts: list[str] = []
    spans: list[Span] = []
    length = 0

    def emit(text: str) -> None:
        nonlocal length
        parts.append(text)
        length += len(text)

    system = messages[0]["content"] if messages[0]["role"] == "system" else QWEN25_DEFAULT_SYSTEM
    emit(f"{IM_START}system\n{system}{IM_END}\n")
    for i, msg in enumerate(messages):
        role = msg["role"]
        if role == "system" and i == 0:
            continue
        if role == "tool":
            if i == 0 or messages[i - 1]["role"] != "tool":
                emit(f"{IM_START}user")
            emit(f"\n<tool_response>\n{msg['content']}\n</tool_response>")
            if i == len(messages) - 1 or messages[i + 1]["role"] != "tool":
                emit(f"{IM_END}\n")
            continue
        if role == "assistant" and msg.get("tool_calls"):
            raise ValueError(f"message {i}: assistant tool_calls need the jinja chat template (pass template=)")
        emit(f"{IM_START}{role}\n")
        start = length
        emit(f"{msg['content']}{IM_END}")
        if role == "assistant":
            spans.append((start, length))
        emit("\n")
    if add_generation_prompt:
        emit(f"{IM_START}assistant\n")
    return "".join(parts), spans


def _sentinel(i: int) -> str:
    """私用区字符包起来的编号，正常文本里不会出现。"""
    return f"\ue000{i}\ue001"


def _render_jinja(
    template: str,
    messages: Sequence[dict],
    add_generation_prompt: bool,
    special_tokens: Sequence[str],
) -> tuple[str, list[Span]]:
    """用 jinja 模板渲染；先用哨兵替换助手内容，渲染后定位并换回，得到助手区间。"""
    try:
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise ImportError("rendering a model's own chat template needs jinja2 (pip install jinja2)") from None

    def raise_exception(message: str) -> None:
        raise ValueError(f"chat template error: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = raise_exception
    masked = []
    originals = {}
    for i, msg in enumerate(messages):
        msg = dict(msg)
        if msg["role"] == "assistant" and msg.get("content"):
            originals[_sentinel(i)] = msg["content"]
            msg["content"] = _sentinel(i)
        masked.append(msg)
    rendered = env.from_string(template).render(
        messages=masked, add_generation_prompt=add_generation_prompt
    )
    # 依次把哨兵换回原文，并把紧随其后的特殊 token（回合结束符）并入区间。
    closers = sorted(special_tokens, key=len, reverse=True)
    out, spans, cursor = [], [], 0
    length = 0
    for marker, content in originals.items():
        at = rendered.find(marker, cursor)
        if at < 0:
            raise ValueError("the chat template altered assistant content; cannot locate assistant tokens")
        out.append(rendered[cursor:at])
        length += at - cursor
        start = length
        out.append(content)
        length += len(content)
        cursor = at + len(marker)
        closer = next((c for c in closers if rendered.startswith(c, cursor)), "")
        out.append(closer)
        length += len(closer)
        cursor += len(closer)
        spans.append((start, length))
    out.append(rendered[cursor:])
    return "".join(out), spans


def render_chat(
    messages: Sequence[dict],
    *,
    template: str | None = None,
    add_generation_prompt: bool = False,
    special_tokens: Sequence[str] = (IM_END, "<|endoftext|>"),
    force_jinja: bool = False,
) -> tuple[str, list[Span]]:
    """渲染对话，返回 (文本, 助手区间列表)。

    template 为 None 或就是内置的 Qwen2.5 模板时走 Python 渲染器（除非 force_jinja）；否则用 jinja2 渲染。
    """
    validate_messages(messages)
    if template is None or (template == QWEN25_CHAT_TEMPLATE and not force_jinja):
        return _render_chatml(messages, add_generation_prompt)
    return _render_jinja(template, messages, add_generation_prompt, special_tokens)


def _nfc_messages(messages: Sequence[dict]) -> list[dict]:
    """先对内容做 NFC（Qwen 的规范化），使渲染文本的字符下标与分词器看到的一致。"""
    out = []
    for msg in messages:
        msg = dict(msg)
        if isinstance(msg.get("content"), str):
            msg["content"] = unicodedata.normalize("NFC", msg["content"])
        out.append(msg)
    return out


def spans_to_mask(starts: Sequence[int], spans: Sequence[Span]) -> list[bool]:
    """token 起始字符下标 → 是否落在某个（按起点排序的）助手区间内。"""
    lefts = [a for a, _ in spans]
    mask = []
    for s in starts:
        k = bisect.bisect_right(lefts, s) - 1
        mask.append(k >= 0 and s < spans[k][1])
    return mask


def encode_chat(tokenizer: Any, messages: Sequence[dict], *, add_generation_prompt: bool = False) -> ChatEncoding:
    """渲染 + 整串分词（与教师对整段文本分词的结果一致）+ 助手掩码。"""
    messages = _nfc_messages(messages) if isinstance(messages, (list, tuple)) else messages
    text, spans = render_chat(
        messages,
        template=tokenizer.chat_template,
        add_generation_prompt=add_generation_prompt,
        special_tokens=list(tokenizer.special_tokens),
    )
    ids, starts = tokenizer.encode_with_offsets(text)
    return ChatEncoding(list(ids), spans_to_mask(starts, spans))


def role_header_ids(tokenizer: Any, role: str = "user") -> list[int]:
    """对话模板里一个角色回合开头的 token（Qwen 的 ChatML：``<|im_start|>user``；DeepSeek：``<｜User｜>``）。

    做法与模板无关：渲染 [system 哨兵 a, role 哨兵 b]，取 a 与 b 之间的文本，去掉上一回合的结束特殊 token
    与两端空白，剩下的就是这个角色的回合标记。在线蒸馏用它核对每条提示里确有用户回合。"""
    first, second = "\ue002", "\ue003"
    text, _ = render_chat(
        [{"role": "system", "content": first}, {"role": role, "content": second}],
        template=tokenizer.chat_template, special_tokens=list(tokenizer.special_tokens),
    )
    between = text[text.index(first) + 1 : text.index(second)].strip()
    for closer in sorted(tokenizer.special_tokens, key=len, reverse=True):
        if between.startswith(closer) and closer not in (IM_START,):
            between = between[len(closer) :].strip()
            break
    if not between:
        raise ValueError(f"the chat template has no marker for {role!r} turns; cannot locate them in the data")
    return list(tokenizer.encode(between))
