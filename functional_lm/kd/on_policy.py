"""在线（on-policy）蒸馏：学生自己写续写，教师给每个生成的 token 打分（GKD / 反向 KL / SeqKD）。

离线蒸馏只在数据（或教师）写的前缀上训练学生；推理时学生却以自己写的前缀为条件，错误会累积。
在线蒸馏从学生采样续写，在这些 token 上让学生逼近教师（GKD：Agarwal et al., 2024；MiniLLM / DistiLLM；
Qwen3 小模型的“逐 token 反向 KL”做法）。本模块把训练器的一批数据变成一批生成的序列：

    来源    每个优化步整批来自一个来源：u ~ U[0, 1) 只由 (seed, step) 决定，
            u < λ（on_policy_fraction）→ 学生写；u < λ + τ（teacher_generated_fraction）→ 教师写（SeqKD）；
            否则 → 数据本身（与以前的训练器逐位相同）。on_policy_start 之前的步一律用数据（离线预热）。
    提示    纯文本：块的前 P 个 token（P = prompt_length）；对话：块里第一段开始的对话（没有则是块首所在的那段）
            在第一个助手 token 之前的部分——正是套上聊天模板、加了生成提示（``<|im_start|>assistant\\n``）的
            对话——从左边截到 P 个 token。提示左填充到固定宽度 P。
    生成    用项目自己的 ``generate``（KV 缓存，缓存长度固定为 P + N，编译的解码步跨步复用、不重新追踪），
            在 no_grad 下进行，遇 EOS 停止；每行的随机数来自 (seed, step, 块号) 播种的生成器，所以一行的续写与
            它分到哪个进程、和谁同批无关，恢复的运行采到与不间断运行相同的续写。
    打分    序列 = [提示 | 续写]（b, P + N），输入取前 P + N − 1 个、标签取后 P + N − 1 个；只有生成的 token
            （到第一个 EOS 为止，含 EOS）计损失，提示、左填充与 EOS 之后的 token 的标签为 −100。
            左填充与真实 token 用文档编号分开（填充 0、真实 1）：真实 token 的位置从 0 数起、看不到填充，
            与生成时 KV 缓存里的位置和掩码完全相同。
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
import torch

from functional_lm.config import ModelConfig, TrainingConfig
from functional_lm.data.loader import Batch
from functional_lm.data.packing import IGNORE_INDEX
from functional_lm.generate import generate, left_pad
from functional_lm.shapes import Int, Tensor

if TYPE_CHECKING:
    from functional_lm.data.pipeline import DataBundle

__all__ = [
    "SOURCES",
    "ON_POLICY_METRICS",
    "batch_source",
    "rollout_seed",
    "PromptTable",
    "scoring_batch",
    "Rollouts",
    "SourceSettings",
    "source_settings",
    "rollouts_for",
    "end_of_text_ids",
    "make_rollouts",
]

SOURCES = ("data", "teacher", "student")  # 一步的整批由谁写：数据、教师（SeqKD）、学生（在线）
# 在线验证指标（kd.evaluate.evaluate_on_policy）：学生采样的续写上教师的逐 token 反向 KL 与 NLL。
ON_POLICY_METRICS = ("on_policy_reverse_kl", "on_policy_teacher_nll")


def batch_source(tcfg: TrainingConfig, step: int) -> str:
    """第 step 步（从 0 计）整批的来源：u ~ U[0, 1) 由 (seed, step) 决定（不碰全局随机数状态），
    u < λ → "student"，u < λ + τ → "teacher"，否则 "data"；on_policy_start 之前总是 "data"。"""
    if not tcfg.generates or step < tcfg.on_policy_start:
        return "data"
    u = torch.rand((), generator=torch.Generator().manual_seed(rollout_seed(tcfg.seed, step, -1))).item()
    if u < tcfg.on_policy_fraction:
        return "student"
    return "teacher" if u < tcfg.on_policy_fraction + tcfg.teacher_generated_fraction else "data"


def rollout_seed(seed: int, step: int | str, block: int) -> int:
    """(seed, step, 块号) → 63 位种子（BLAKE2b 摘要的前 8 字节）：不同的三元组得到互不相关的随机数流。"""
    digest = hashlib.blake2b(f"{seed}:{step}:{block}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


SourceSettings = dict[str, TrainingConfig]  # 来源（SOURCES 之一）→ 这一来源的批用的损失设置


def source_settings(tcfg: TrainingConfig) -> SourceSettings:
    """每个来源的损失设置。数据批：原样（on_policy_estimator 取 topk）。学生写的批：α = 1（自己的样本没有金标准，不加交叉熵）、
    散度 on_policy_divergence。教师写的批：散度与 α 同数据批（教师的样本就是标签，SeqKD 的交叉熵照常）。
    生成批总带着“填充 / 真实”编号，所以打开 document_mask 让前向按编号遮住左填充。"""
    plain = tcfg.replace(on_policy_estimator="topk")  # 采样估计只用于学生自己写的批
    return {
        "data": plain,
        "teacher": plain.replace(document_mask=True),
        "student": tcfg.replace(alpha=1.0, divergence=tcfg.on_policy_divergence, document_mask=True),
    }


# ---------------------------------------------------------------- 提示
class PromptTable:
    """每个块 → 它的提示（token 列表）。纯文本数据直接取块前缀；对话数据在建表时把每个块的提示区间算好，
    并核对每段被选中的对话确有助手回合、且助手回合之前有用户回合（坏数据在训练开始前就报错）。"""

    def __init__(self, dataset: Any, prompt_length: int, user_header: Optional[Sequence[int]] = None) -> None:
        self.dataset, self.length = dataset, prompt_length
        self.chat = dataset.store.mask is not None
        self.header = list(user_header) if user_header else None
        if self.chat:
            self.ranges = np.array([self._chat_range(k) for k in range(len(dataset))], dtype=np.int64).reshape(-1, 2)

    def _chosen_document(self, block: int) -> int:
        """块里第一段开始的文档；块内没有文档开始时，块首所在的那一段。返回数据集内的文档序号。"""
        starts = self.dataset.doc_stream_start
        first, stop = block * self.dataset.block_size, (block + 1) * self.dataset.block_size
        d = int(np.searchsorted(starts, first, side="left"))
        if d < len(starts) - 1 and starts[d] < stop:
            return d
        return int(np.searchsorted(starts, first, side="right")) - 1

    def _where(self, doc: int) -> str:
        """数据集内第 doc 篇文档在用户数据里的位置（``文件:行``），错误消息用。"""
        return self.dataset.store.document_origin(int(self.dataset.doc_ids[doc]))

    def _chat_range(self, block: int) -> tuple[int, int]:
        """对话提示在数据流中的区间 [a, z)：z 是第一个助手 token，a = max(文档起点, z − P)。
        整篇都计损失的文档（混在对话里的纯文本）返回 (−1, −1)，表示取块前缀。"""
        ds = self.dataset
        doc = self._chosen_document(block)
        begin, end = int(ds.doc_stream_start[doc]), int(ds.doc_stream_start[doc + 1])
        mask = ds.stream_mask(begin, end)
        if not mask.any():
            raise ValueError(f"{self._where(doc)}: this conversation has no assistant turn, so it gives no prompt for "
                             "on-policy distillation (every conversation needs a user turn followed by an assistant reply)")
        first = int(np.argmax(mask))
        if first == 0:
            return -1, -1
        if self.header is not None and not _contains(ds.stream_tokens(begin, begin + first), self.header):
            raise ValueError(f"{self._where(doc)}: this conversation has no user turn before its first assistant reply; "
                             "on-policy distillation prompts the student with the conversation up to the assistant "
                             "turn, which needs a user turn")
        return max(begin, begin + first - self.length), begin + first

    def prompt(self, block: int) -> list[int]:
        """第 block 个块的提示 token（至少一个，至多 P 个）。"""
        ds = self.dataset
        if self.chat and self.ranges[block, 0] >= 0:
            a, z = (int(x) for x in self.ranges[block])
            return ds.stream_tokens(a, z).tolist()
        blk = ds.block(block)
        real = int(blk.valid[: self.length].sum())
        return blk.tokens[: max(real, 1)].tolist()

    def batch(self, blocks: Sequence[int], pad_id: int) -> tuple[Int[Tensor, "b p"], Int[Tensor, "b p"]]:
        """一组块的提示左填充成固定宽度 P：(ids, attention_mask)，1 = 真实 token。"""
        return left_pad([self.prompt(int(block)) for block in blocks], pad_id, width=self.length)


def _contains(tokens: np.ndarray, pattern: Sequence[int]) -> bool:
    """tokens 里是否出现连续的子序列 pattern。"""
    n = len(pattern)
    if len(tokens) < n:
        return False
    windows = np.lib.stride_tricks.sliding_window_view(tokens, n)
    return bool((windows == np.asarray(pattern, dtype=tokens.dtype)).all(axis=1).any())


# ---------------------------------------------------------------- 打分用的批
def scoring_batch(
    prompt_ids: Int[Tensor, "b p"],
    prompt_mask: Int[Tensor, "b p"],
    new_tokens: Int[Tensor, "b n"],
    eos_ids: Sequence[int],
    block_ids: Optional[Int[Tensor, "b"]] = None,
) -> Batch:
    """[提示 | 续写] → 训练批：输入 = 序列[:-1]，标签 = 序列[1:]，只在生成的 token 上计损失。

    生成的 token j 有效 ⇔ 它之前（不含它）没有 EOS：第一个 EOS 本身计损失（学生要学会停下），之后的不计。
    文档编号：有左填充的行填充处为 0、真实 token 为 1；没有填充的行全为 0（一整篇）。"""
    full = torch.cat([prompt_ids, new_tokens], dim=1)
    eos = torch.as_tensor(list(eos_ids), dtype=new_tokens.dtype, device=new_tokens.device)
    is_eos = torch.isin(new_tokens, eos).long()
    generated = (is_eos.cumsum(dim=1) - is_eos) == 0  # 之前没有 EOS 的生成 token
    target = torch.cat([torch.zeros_like(prompt_mask, dtype=torch.bool), generated], dim=1)[:, 1:]
    padded = (prompt_mask[:, :1] == 0).long()  # 这一行有左填充
    segments = torch.cat([prompt_mask.long(), torch.ones_like(new_tokens)], dim=1) * padded
    labels = torch.where(target, full[:, 1:], torch.full_like(full[:, 1:], IGNORE_INDEX))
    return Batch(full[:, :-1], labels, target, segments[:, :-1], block_ids)


# ---------------------------------------------------------------- 生成
@dataclass
class Rollouts:
    """把数据批换成生成批所需的一切：提示表、EOS、填充 id、生成设置与真实词表大小。"""

    prompts: PromptTable
    eos_ids: tuple[int, ...]
    pad_id: int
    tcfg: TrainingConfig
    real_vocab_size: int

    def generated(
        self, params: Mapping[str, Tensor], cfg: ModelConfig, batch: Batch, step: int | str, seed: int
    ) -> Batch:
        """用 params（学生或教师）为这一批的每个块写续写，返回打分用的批（在 CPU 上，形状 b × (P + N − 1)）。

        第 i 行的随机数来自 rollout_seed(seed, step, 块号_i)，与进程、同批的其他行无关。"""
        blocks = [int(b) for b in batch.block_ids]
        ids, mask = self.prompts.batch(blocks, self.pad_id)
        device = next(iter(params.values())).device
        t = self.tcfg
        with torch.no_grad():
            out = generate(
                params, cfg, ids.to(device), t.max_new_tokens, attention_mask=mask.to(device),
                temperature=t.generation_temperature, top_p=None if t.generation_top_p >= 1.0 else t.generation_top_p,
                eos_token_id=list(self.eos_ids), pad_token_id=self.pad_id,
                seed=[rollout_seed(seed, step, b) for b in blocks], max_cache_len=t.prompt_length + t.max_new_tokens,
                compile=t.compiles_generation, vocab_limit=self.real_vocab_size,
            ).cpu()
        new = out[:, t.prompt_length :]
        if new.shape[1] < t.max_new_tokens:  # 全部遇到 EOS 而提前停下：补齐到固定的 N（形状不变，编译不重来）
            new = torch.cat([new, new.new_full((new.shape[0], t.max_new_tokens - new.shape[1]), self.pad_id)], dim=1)
        return scoring_batch(ids, mask, new, self.eos_ids, batch.block_ids)


def end_of_text_ids(tokenizer: Any, pad_id: int) -> tuple[int, ...]:
    """续写在这些 token 处停下：分词器的 eos、数据的文档分隔符（纯文本的文档结尾）与 ``<|im_end|>``（助手回合结尾）。"""
    found = [getattr(tokenizer, "eos_token_id", None), pad_id]
    if tokenizer is not None and hasattr(tokenizer, "token_to_id"):
        found.append(tokenizer.token_to_id("<|im_end|>"))
    return tuple(dict.fromkeys(int(i) for i in found if i is not None))


def make_rollouts(dataset: Any, tokenizer: Any, tcfg: TrainingConfig, real_vocab_size: int) -> Rollouts:
    """为一个打包数据集建提示表（对话数据此时核对每段对话），连同 EOS、填充 id 组成 Rollouts。"""
    from functional_lm.data.chat import role_header_ids

    header = role_header_ids(tokenizer) if dataset.store.mask is not None and tokenizer is not None else None
    table = PromptTable(dataset, tcfg.prompt_length, header)
    return Rollouts(table, end_of_text_ids(tokenizer, dataset.pad_id), dataset.pad_id, tcfg, real_vocab_size)


def rollouts_for(data: DataBundle, split: str, tcfg: TrainingConfig, real_vocab_size: int) -> Optional[Rollouts]:
    """训练集（有生成批时）或验证集（在线验证打开时）的 Rollouts（提示表；对话数据在这里核对每段对话）；
    用不到或没有这个划分时为 None。"""
    loader = data.train_loader if split == "train" else data.val_loader
    if loader is None or not (tcfg.generates if split == "train" else tcfg.evaluates_on_policy):
        return None
    return make_rollouts(loader.dataset, getattr(data, "tokenizer", None), tcfg, real_vocab_size)
