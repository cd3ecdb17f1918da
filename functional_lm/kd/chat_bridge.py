"""跨分词器时的聊天模板：学生的对话按学生的 ChatML 模板写成 token，教师读到的是**它自己的模板**。

学生（Qwen2.5）::

    <|im_start|>system\\n{系统}<|im_end|>\\n<|im_start|>user\\n{用户}<|im_end|>\\n<|im_start|>assistant\\n{助手}<|im_end|>\\n

DeepSeek-V3 / R1 的教师读到::

    <｜begin▁of▁sentence｜>{系统}<｜User｜>{用户}<｜Assistant｜>{助手}<｜end▁of▁sentence｜>

对齐（kd/alignment.py 调用）：各条消息的**内容**照常按字节对齐（两边是同一段文本）；模板部分按 token 翻译：

    <|im_start|> + 角色行 "user\\n"   → 教师的角色 token（system 没有；一篇对话的第一个角色前先放教师的 BOS）
    <|im_end|>（助手回合）           → 教师的 eos；其后的 "\\n" 不发
    <|im_end|>（其他回合）           → 不发；其后的 "\\n" 不发

模板 token 没有目标（它们本来就不计损失）；助手回合的 <|im_end|> 计损失，它的目标是教师在同一处对 eos 的预测——
两个 id 没有对应（词表映射里教师的 eos 对应学生的 <|endoftext|>），所以这个位置用 ULD（排序概率，不需要 id 对应）。
计损失的掩码跟着文本走：助手内容的每个学生 token 仍由它自己的字节组得到目标。

教师词表里就有 <|im_start|> 的（Qwen3.5）不需要翻译（两边同一个模板）；既没有 ChatML 也没有 DeepSeek 角色 token 的
教师没有桥：数据里的 <|im_start|> 在训练前一段话拒绝（Aligner.check_data）。
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from functional_lm.data.tokenizer import Tokenizer

__all__ = ["ChatBridge", "chat_bridge"]

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
DEEPSEEK_ROLES = {"user": "<｜User｜>", "assistant": "<｜Assistant｜>"}
DEEPSEEK_BOS = "<｜begin▁of▁sentence｜>"
MAX_ROLE_BYTES = 32  # 角色行（"assistant\n"）至多这么长：更长的说明 <|im_start|> 后面不是角色行


@dataclass(frozen=True)
class ChatBridge:
    """学生 ChatML 模板 → 教师模板的翻译表（见模块说明）。"""

    im_start: int  # 学生的 <|im_start|> id
    im_end: int  # 学生的 <|im_end|> id
    headers: dict[bytes, list[int]]  # 角色行的字节（b"user\n"）→ 教师的 token（system → []）
    bos: Optional[int]  # 一篇对话的第一个角色前放的教师 token
    turn_ends: dict[bytes, list[int]] = field(default_factory=dict)  # 角色行 → <|im_end|> 换成的教师 token

    def header(self, role: bytes, first: bool) -> list[int]:
        """角色行 role 换成的教师 token；first：这一段里的第一个角色（前面加 BOS）。不认识的角色：不发。"""
        ids = self.headers.get(role, [])
        return ([self.bos] if first and self.bos is not None else []) + ids

    def turn_end(self, role: Optional[bytes]) -> list[int]:
        """角色为 role 的回合的 <|im_end|> 换成的教师 token（助手回合：教师的 eos；其他：不发）。"""
        return self.turn_ends.get(role, []) if role is not None else []


def chat_bridge(student: Tokenizer, teacher: Tokenizer) -> Optional[ChatBridge]:
    """两个分词器之间的模板桥：学生有 ChatML、教师没有 ChatML 而有 DeepSeek 的角色 token 时给出；否则 None。"""
    start, end = student.token_to_id(IM_START), student.token_to_id(IM_END)
    if start is None or end is None or IM_START in teacher.special_tokens:
        return None
    roles = {name: teacher.special_tokens.get(token) for name, token in DEEPSEEK_ROLES.items()}
    if None in roles.values():
        return None
    headers = {b"system\n": [], b"user\n": [roles["user"]], b"assistant\n": [roles["assistant"]]}
    return ChatBridge(start, end, headers, teacher.special_tokens.get(DEEPSEEK_BOS),
                      {b"assistant\n": [teacher.eos_token_id]})
