"""跨分词器对齐：同一段文本的学生 token 与教师 token 按字节位置分组，得出每个学生位置的教师目标从哪里来。

字节级 BPE 的每个 token 恰好代表一段原文字节，所以 token 的字节位置就是它前面各 token 字节长度之和：

    学生边界 S = {0, |s₁|, |s₁|+|s₂|, …}，教师边界 T 同理；共同边界 C = S ∩ T 把文本切成若干组，
    每组里学生 token 与教师 token 覆盖同一段字节（一对一、多对一、一对多、多对多）。

一批的教师 token 流：学生的每一行按文档（document_mask 打开时按 segment ids）切成段，段里的学生 token
拼回字节、解码成文本，由教师的分词器重新切分；不是合法 UTF-8 的字节（打包块边缘截断的字符、学生续写里的
半个字符）逐字节换成教师的单字节 token，所以教师读到的字节总与学生的相同，重新分词不必“还原”学生的切分。
学生的特殊 token（<|endoftext|> 等）不当文本发送，而是换成教师词表里对应的特殊 token（kd/vocab_map.py），
两边各成一组；没有对应的，数据里出现时训练前拒绝（Aligner.check_data），学生续写里出现时不发给教师、
不给目标（它与它后面的第一个 token 都只有交叉熵）。教师在自己的流上前向（各段互不注意，同学生）。

学生位置 i 预测下一个 token x_{i+1}；x_{i+1} 所在组的第一个教师 token 在教师流的第 j 位，教师对它的分布
在第 j − 1 位。于是每个学生位置得到一种目标（kind）：

    MAPPED  x_{i+1} 独自成组（组里只有这一个学生 token）：教师第 j − 1 位的分布映射到学生词表；组里有多个教师
            token 时，实际那段文本的概率按链式法则 P(段) = Π_r P_T(t_r | 前文) 计入 x_{i+1}（kd/cross_targets.py），
            组内其余教师位置（inner_rows）提供后面几个因子
    ULD     x_{i+1} 是多个学生 token 的组里的第一个（一对多、多对多）：教师第 j − 1 位的分布与学生分布之间
            比排序后的概率向量（ULD，losses/cross_tokenizer.py）；--cross-tokenizer uld 时所有组都这样
    NONE    组里第二个及以后的学生 token（教师没有“半个 token”的分布）、段首没有前文的 token、
            没有对应的特殊 token 及其后的第一个 token：只有交叉熵

两边是同一个分词器时不重新切分：教师的 token 就是学生的 token（对齐是恒等的，每个位置都是一对一）。
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import numpy as np
import torch

from functional_lm.kd.chat_bridge import MAX_ROLE_BYTES, chat_bridge
from functional_lm.losses.cross_tokenizer import KIND_MAPPED, KIND_NONE, KIND_ULD

if TYPE_CHECKING:
    from functional_lm.data.store import TokenStore
    from functional_lm.data.tokenizer import Tokenizer
    from functional_lm.kd.vocab_map import VocabMap

__all__ = ["KIND_NONE", "KIND_MAPPED", "KIND_ULD", "CrossPlan", "Aligner", "align_bytes"]

IGNORE_INDEX = -100


def align_bytes(student_lengths: np.ndarray, teacher_lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """两串 token 的字节长度 → 各组在两边的起止下标 (G+1,)、(G+1,)：组 g 是学生 token [s_g, s_{g+1})、
    教师 token [t_g, t_{g+1})。两边的总字节数必须相同（调用方已核对它们拼出同一段字节）。"""
    s_starts = np.concatenate([[0], np.cumsum(student_lengths)])
    t_starts = np.concatenate([[0], np.cumsum(teacher_lengths)])
    common = np.intersect1d(s_starts, t_starts, assume_unique=True)
    return np.searchsorted(s_starts, common), np.searchsorted(t_starts, common)


@dataclass
class CrossPlan:
    """一个微批的对齐结果（形状 b t 的数组按学生位置，teacher_* 按教师流）。"""

    teacher_ids: torch.Tensor  # (b, tt) int64：教师的 token 流（段之间不注意，右侧用教师的 pad 补齐）
    teacher_segments: Optional[torch.Tensor]  # (b, tt) int64：教师流的段号（document_mask 时），否则 None
    kind: torch.Tensor  # (b, t) int64：KIND_NONE / KIND_MAPPED / KIND_ULD
    pred_row: torch.Tensor  # (b, t) int64：给出这个位置目标的教师行（展平的 b·tt 下标），−1 = 没有
    first_token: torch.Tensor  # (b, t) int64：组里第一个教师 token 的 id（链式法则拆分它的概率），−1 = 没有
    inner_rows: torch.Tensor  # (b, t, L) int64：组内其余教师 token 的预测行（链式法则的后几个因子），−1 补齐
    inner_tokens: torch.Tensor  # (b, t, L) int64：这些行各自预测的教师 token，0 补齐
    uncovered: int  # 没有发给教师的学生 token 数（没有对应的特殊 token；教师缺单字节 token 的一段）


@dataclass
class _Row:
    """一行的教师流与各学生位置的目标来源（列表，最后拼成张量）。"""

    teacher: list[int]
    segments: list[int]
    targets: dict[int, tuple[int, int, int, list[int]]]  # 学生位置 → (kind, 预测位, 首 token 的位置, inner 预测位)
    uncovered: int = 0


class Aligner:
    """学生批 → CrossPlan。mode：hybrid（能映射的组用映射目标）或 uld（所有组都用 ULD）。"""

    def __init__(self, student: Tokenizer, teacher: Tokenizer, vocab_map: VocabMap, mode: str) -> None:
        self.student, self.teacher, self.vocab_map, self.mode = student, teacher, vocab_map, mode
        self.s_bytes = student.token_bytes()
        self.t_bytes = teacher.token_bytes()
        self.s_special = frozenset(student.special_tokens.values())
        self.s_to_t = vocab_map.student_to_teacher.tolist()
        self.byte_ids = _byte_tokens(self.t_bytes, frozenset(teacher.special_tokens.values()))
        self.bridge = None if vocab_map.identity else chat_bridge(student, teacher)  # 聊天模板的翻译（kd/chat_bridge.py）
        bridged = set() if self.bridge is None else {self.bridge.im_start, self.bridge.im_end}
        # 教师词表里没有对应的学生特殊 token：数据里出现时训练前拒绝（check_data），生成的续写里出现时不给目标
        self.unmatched = sorted(s for s in self.s_special - bridged if s >= len(self.s_to_t) or self.s_to_t[s] < 0)

    # ---------------------------------------------------------------- 一批
    def plan(self, input_ids: torch.Tensor, labels: torch.Tensor, segment_ids: Optional[torch.Tensor]) -> CrossPlan:
        """input_ids / labels (b, t) 与可选的文档编号 → CrossPlan（见模块说明）。"""
        if self.vocab_map.identity:
            return self._identity_plan(input_ids, segment_ids)
        ids, lab = input_ids.cpu().numpy(), labels.cpu().numpy()
        seg = None if segment_ids is None else segment_ids.cpu().numpy()
        rows = [self._row(ids[r], lab[r], None if seg is None else seg[r]) for r in range(ids.shape[0])]
        return self._stack(rows, ids.shape, segment_ids is not None)

    def _identity_plan(self, input_ids: torch.Tensor, segment_ids: Optional[torch.Tensor]) -> CrossPlan:
        """同一个分词器：教师流 = 学生的 token，位置 i 的目标就在教师第 i 行（与同词表蒸馏相同的前向）。"""
        b, t = input_ids.shape
        kind = KIND_MAPPED if self.mode == "hybrid" else KIND_ULD
        rows = torch.arange(b * t, dtype=torch.int64).reshape(b, t)
        return CrossPlan(
            input_ids.cpu(), None if segment_ids is None else segment_ids.cpu(),
            torch.full((b, t), kind, dtype=torch.int64), rows,
            torch.cat([input_ids[:, 1:].cpu(), torch.full((b, 1), -1, dtype=torch.int64)], dim=1),
            torch.full((b, t, 0), -1, dtype=torch.int64), torch.zeros((b, t, 0), dtype=torch.int64), 0,
        )

    # ---------------------------------------------------------------- 一行
    def _row(self, ids: np.ndarray, labels: np.ndarray, seg: Optional[np.ndarray]) -> _Row:
        """一行：按段切开（标签有效时带上最后一个标签 token），逐段建教师流并对齐。"""
        tokens = ids.tolist() + ([int(labels[-1])] if labels[-1] != IGNORE_INDEX else [])
        pieces = [0] * len(tokens) if seg is None else seg.tolist() + [int(seg[-1])] * (len(tokens) - len(ids))
        row = _Row([], [], {})
        start = 0
        for end in range(1, len(tokens) + 1):
            if end == len(tokens) or pieces[end] != pieces[start]:
                self._piece(row, tokens, start, end, pieces[start])
                start = end
        return row

    def _piece(self, row: _Row, tokens: list[int], start: int, end: int, piece: int) -> None:
        """一段（一篇文档在这一行里的部分）：文本片与特殊 token 交替，依次接到教师流上。有模板桥时，
        <|im_start|> + 角色行与 <|im_end|> 换成教师模板的 token（_bridged）。"""
        piece_start = first = len(row.teacher)
        run = p = start
        role: Optional[bytes] = None
        while p <= end:
            if p < end and tokens[p] not in self.s_special:
                p += 1
                continue
            if run < p:
                self._text_run(row, tokens, run, p, piece_start, piece)
            if p == end:
                break
            if self.bridge is not None and tokens[p] in (self.bridge.im_start, self.bridge.im_end):
                p, role, dropped = self._bridged(row, tokens, p, end, piece, role, piece_start,
                                                 first == len(row.teacher))
                piece_start = len(row.teacher) if dropped else piece_start
            elif not self._special(row, tokens[p], p, piece_start, piece):
                piece_start = len(row.teacher)  # 丢掉的特殊 token 之后的第一个教师 token 不给目标（前文缺了它）
                p += 1
            else:
                p += 1
            run = p

    def _bridged(self, row: _Row, tokens: list[int], p: int, end: int, piece: int, role: Optional[bytes],
                 piece_start: int, first: bool) -> tuple[int, Optional[bytes], bool]:
        """模板 token（kd/chat_bridge.py）：<|im_start|> 与其后的角色行换成教师的角色 token；<|im_end|> 换成这个
        回合的结束 token（助手：教师的 eos，目标用 ULD），其后的一个 "\n" 不发。不在任何回合里的 <|im_end|>
        （学生续写里多写的）像没有对应的特殊 token 一样丢掉（计入 uncovered，下一个教师 token 不给目标）。
        返回 (下一个学生位置, 当前角色, 是否丢掉了 token)。"""
        bridge = self.bridge
        if tokens[p] == bridge.im_start:
            line, q = b"", p + 1
            while q < end and tokens[q] not in self.s_special and b"\n" not in line and len(line) <= MAX_ROLE_BYTES:
                line += self.s_bytes[tokens[q]] or b""
                q += 1
            if b"\n" not in line:  # 角色行被块边缘截断或太长：这些 token 不发，下一个教师 token 不给目标
                row.uncovered += q - p
                return q, None, True
            cut = line.index(b"\n") + 1  # "\n\n" 是一个 token：角色行只到第一个换行，其余是内容的字节
            role = line[:cut]
            self._append(row, bridge.header(role, first), piece)
            if line[cut:]:
                self._append(row, self._encode_bytes(line[cut:]) or [], piece)  # 没有目标（学生没有对应的位置）
            return q, role, False
        newline = p + 1 < end and self.s_bytes[tokens[p + 1]] == b"\n"
        if role is None:  # 不在（这一段看得到的）任何回合里：丢掉，连同其后的换行
            row.uncovered += 1 + newline
            return p + 1 + newline, None, True
        ids = bridge.turn_end(role)
        if ids:
            self._record(row, p, KIND_ULD, len(row.teacher), piece_start, [])
            self._append(row, ids, piece)
        return p + 1 + newline, None, False

    @staticmethod
    def _append(row: _Row, ids: list[int], piece: int) -> None:
        row.teacher.extend(ids)
        row.segments.extend([piece] * len(ids))

    def _special(self, row: _Row, token: int, p: int, piece_start: int, piece: int) -> bool:
        """学生的特殊 token → 教师词表里对应的特殊 token（一对一的一组）。没有对应的（只会出现在学生生成的续写里，
        数据里的在训练前由 check_data 拒绝）不发给教师、不给目标，计入 uncovered，返回 False。"""
        mapped = self.s_to_t[token] if token < len(self.s_to_t) else -1
        if mapped < 0:
            row.uncovered += 1
            return False
        self._record(row, p, KIND_MAPPED if self.mode == "hybrid" else KIND_ULD, len(row.teacher), piece_start, [])
        row.teacher.append(mapped)
        row.segments.append(piece)
        return True

    def check_data(self, store: TokenStore, what: str) -> None:
        """数据里出现教师词表没有对应的学生特殊 token 时一段话拒绝（点出第一篇这样的文档）：教师会把它当普通
        文本读，两边看到的不再是同一篇文档。按 16M 个 token 一块扫描 uint32 流。"""
        if not self.unmatched:
            return
        bad = np.asarray(self.unmatched, dtype=np.uint32)
        step = 1 << 24
        for at in range(0, store.num_tokens, step):
            hits = np.flatnonzero(np.isin(store.tokens[at : at + step], bad))
            if hits.size:
                index = at + int(hits[0])
                token = int(store.tokens[index])
                doc = int(np.searchsorted(store.offsets, index, side="right")) - 1
                content = self.s_bytes[token].decode("utf-8", "replace")
                raise ValueError(
                    f"{store.document_origin(doc)} ({what}): the student's special token {content!r} (id {token}) has "
                    f"no counterpart in the teacher's tokenizer ({self.vocab_map.teacher_name}), so the teacher would "
                    f"read it as plain text and the two sides would no longer see the same document; train on text "
                    f"without it (chat data written with the student's template carries <|im_start|> / <|im_end|>), "
                    f"or use a teacher tokenizer that has it")

    def _text_run(self, row: _Row, tokens: list[int], start: int, end: int, piece_start: int, piece: int) -> None:
        """特殊 token 之间的一段普通 token：拼回字节 → 教师分词（_encode_bytes）→ 按字节分组。"""
        data = b"".join(self.s_bytes[x] or b"" for x in tokens[start:end])
        t_ids = self._encode_bytes(data)
        if t_ids is None:
            row.uncovered += end - start
            return
        self._check_bytes(data, t_ids)
        s_len = np.array([len(self.s_bytes[x] or b"") for x in tokens[start:end]])
        t_len = np.array([len(self.t_bytes[x]) for x in t_ids])
        s_bounds, t_bounds = align_bytes(s_len, t_len)
        base = len(row.teacher)
        row.teacher.extend(t_ids)
        row.segments.extend([piece] * len(t_ids))
        for g in range(len(s_bounds) - 1):
            n_s, i0, i1 = s_bounds[g + 1] - s_bounds[g], int(t_bounds[g]), int(t_bounds[g + 1])
            mapped = self.mode == "hybrid" and n_s == 1
            inner = list(range(base + i0, base + i1 - 1)) if mapped else []  # 预测组内第 2… 个教师 token 的行
            self._record(row, start + int(s_bounds[g]), KIND_MAPPED if mapped else KIND_ULD, base + i0, piece_start, inner)

    def _encode_bytes(self, data: bytes) -> Optional[list[int]]:
        """一段字节 → 教师 token：合法的 UTF-8 解码成文本交给教师的分词器；不是合法 UTF-8 的字节（块边缘截断的
        字符、学生续写里的半个字符）逐字节换成教师的单字节 token（字节级 BPE 的 256 个都有），于是教师读到的
        字节与学生的完全相同。教师词表缺某个单字节 token 时返回 None（这一段没有目标）。"""
        out: list[int] = []
        at = 0
        while at < len(data):
            try:
                out += self.teacher.encode(data[at:].decode("utf-8"))
                break
            except UnicodeDecodeError as err:
                if err.start:
                    out += self.teacher.encode(data[at : at + err.start].decode("utf-8"))
                raw = [self.byte_ids[b] for b in data[at + err.start : at + err.end]]
                if min(raw) < 0:
                    return None
                out += raw
                at += err.end
        return out

    def _record(self, row: _Row, p: int, kind: int, tpos: int, piece_start: int, inner: list[int]) -> None:
        """学生 token p（由学生位置 p − 1 预测）的目标来自教师第 tpos − 1 行；段首的教师 token 没有前文。"""
        if p == 0 or tpos == piece_start:
            return
        row.targets[p - 1] = (kind, tpos - 1, tpos, inner)  # token id 在 _stack 里取：那时教师流已经完整

    def _check_bytes(self, s: bytes, t_ids: list[int]) -> None:
        """教师的 token 必须拼出与学生的字节 s 完全相同的字节（否则分组无从谈起）：规范化文本的分词器在这里被拒绝。"""
        t = b"".join(self.t_bytes[x] or b"" for x in t_ids)
        if s != t:
            at = next((i for i, (a, b) in enumerate(zip(s, t)) if a != b), min(len(s), len(t)))
            raise ValueError(
                f"the teacher's tokenizer ({self.vocab_map.teacher_name}) does not reproduce the text it is given "
                f"byte for byte, so its tokens cannot be aligned with the student's: at byte {at} of "
                f"{s[:60].decode('utf-8', 'replace')!r} the student's bytes are {s[at:at + 12]!r} and the teacher's {t[at:at + 12]!r}; "
                f"a tokenizer that normalises text (NFKC, lower-casing, stripping accents) cannot be aligned, use one "
                f"that keeps the bytes (the Qwen, DeepSeek and Llama 3 tokenizers do)"
            )

    # ---------------------------------------------------------------- 拼成张量
    def _stack(self, rows: list[_Row], shape: tuple[int, int], with_segments: bool) -> CrossPlan:
        b, t = shape
        tt = max(1, max(len(r.teacher) for r in rows))
        pad = self.teacher.pad_token_id
        teacher = torch.full((b, tt), pad, dtype=torch.int64)
        segments = torch.zeros((b, tt), dtype=torch.int64)
        width = max([len(v[3]) for r in rows for v in r.targets.values()] + [0])
        kind = torch.zeros((b, t), dtype=torch.int64)
        pred = torch.full((b, t), -1, dtype=torch.int64)
        first = torch.full((b, t), -1, dtype=torch.int64)
        inner_rows = torch.full((b, t, width), -1, dtype=torch.int64)
        inner_tokens = torch.zeros((b, t, width), dtype=torch.int64)
        for r, row in enumerate(rows):
            n = len(row.teacher)
            teacher[r, :n] = torch.tensor(row.teacher, dtype=torch.int64)
            segments[r, :n] = torch.tensor(row.segments, dtype=torch.int64)
            segments[r, n:] = (row.segments[-1] + 1) if row.segments else 0  # 补齐的尾部另算一段
            for i, (k, tp, tf, inner) in row.targets.items():
                kind[r, i], pred[r, i], first[r, i] = k, r * tt + tp, row.teacher[tf]
                if inner:
                    inner_rows[r, i, : len(inner)] = torch.tensor(inner) + r * tt
                    inner_tokens[r, i, : len(inner)] = torch.tensor([row.teacher[q + 1] for q in inner])
        return CrossPlan(teacher, segments if with_segments else None, kind, pred, first, inner_rows, inner_tokens,
                         sum(r.uncovered for r in rows))


def _byte_tokens(table: list, specials: frozenset) -> list[int]:
    """教师词表里代表单个字节 0…255 的（非特殊）token id；没有的为 −1。"""
    out = [-1] * 256
    for i, b in enumerate(table):
        if b is not None and len(b) == 1 and i not in specials and out[b[0]] < 0:
            out[b[0]] = i
    return out
