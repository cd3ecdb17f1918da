"""分块蒸馏损失：从最终隐藏状态与输出投影出发，逐块计算 logits、损失和梯度，从不持有整批全词表 logits。

每块 c 个 token：z = h_c·Wᵀ，ℓ_c = (α·T²·Σ_c D + (1−α)·Σ_c CE)/N，g = ∂ℓ_c/∂z 在前向中就算好（前向 / 反向 KL
用解析式，其余散度与稀疏教师在块上用 autograd），随即 ∂h_c = g·W[:V]、∂W[:V] += gᵀ·h_c；反向只把存好的梯度
乘上上游梯度。峰值内存 O(chunk × vocab)，值与梯度等于普通版（``distillation_loss`` / ``sparse_distillation_loss``）::

    前向 KL：∂[α·T²·KL(P‖Q)/N]/∂z_s = α·T·(Q − P)/N
    反向 KL：∂[α·T²·KL(Q‖P)/N]/∂z_s = α·T·Q ⊙ (log Q − log P − KL(Q‖P))/N
    CE：     ∂[(1−α)·CE/N]/∂z_s     = (1−α)·(softmax(z_s) − onehot(label))/N

公开函数：``chunked_distillation_loss``（稠密教师）与 ``chunked_sparse_distillation_loss``（稀疏 top-k 教师）。
形状图例与约定见 ``common``。
"""

import dataclasses
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange

from functional_lm.losses.common import (
    LossSpec,
    Number,
    check_ids,
    compute_dtype,
    objective,
    resolve_real_vocab,
    teacher_log_probs,
    token_divisor,
    valid_mask,
)
from functional_lm.losses.cross_tokenizer import cross_token_terms
from functional_lm.losses.divergences import dense_token_terms, kl_terms
from functional_lm.losses.sparse import check_topk, sparse_token_terms
from functional_lm.shapes import Bool, Float, Integer, Tensor, typechecked

# ================================================================================================
# 分块损失：从隐藏状态出发，逐块计算 logits、损失和梯度
# ================================================================================================

TeacherChunkFn = Callable[[slice], Tensor]


def _teacher_chunk_fn(
    teacher_hidden: Tensor | None, teacher_weight: Tensor | None, teacher_logits_fn: TeacherChunkFn | None
) -> tuple[TeacherChunkFn, bool]:
    """把两种教师给法统一成"行切片 → 该块教师 logits (c, vt)"的函数；第二个返回值表示
    这块 logits 是否由本模块新算出（是则可以原地改写，省一次复制）。"""
    has_pair = teacher_hidden is not None or teacher_weight is not None
    if has_pair == (teacher_logits_fn is not None):
        raise ValueError(
            "give the teacher either as teacher_hidden + teacher_weight or as teacher_logits_fn (exactly one)"
        )
    if teacher_logits_fn is not None:
        return teacher_logits_fn, False  # 调用方可能返回其缓存的视图：不能原地改写
    if teacher_hidden is None or teacher_weight is None:
        raise ValueError("teacher_hidden and teacher_weight must be given together")
    flat = rearrange(teacher_hidden, "... dt -> (...) dt")
    return (lambda rows: F.linear(flat[rows], teacher_weight)), True


def _row_chunks(num_rows: int, chunk_size: int) -> list[slice]:
    """把 [0, n) 切成长度 chunk_size 的连续行段（最后一段可以更短）。"""
    return [slice(start, min(start + chunk_size, num_rows)) for start in range(0, num_rows, chunk_size)]


def _chunk_rows(valid: Tensor, chunk_size: int, compact: bool) -> list[slice | Tensor]:
    """分块的行。compact 且有不计损失的行时只取计损失的行（按原顺序的下标张量，每块 chunk_size 行），
    否则是连续的行段。不计损失的行（提示、填充、被遮的标签）对损失与梯度的贡献恰为 0，跳过它们就省下
    它们的 (行 × 词表) 计算——在线蒸馏的批里这是一半的行。"""
    if compact and not bool(valid.all()):
        kept = valid.nonzero().squeeze(1)
        return [kept[part] for part in _row_chunks(kept.numel(), chunk_size)]
    return _row_chunks(valid.numel(), chunk_size)


def _num_rows(rows: slice | Tensor) -> int:
    return rows.stop - rows.start if isinstance(rows, slice) else rows.numel()


def _chunk_teacher_logits(teacher_fn: TeacherChunkFn, rows: slice | Tensor) -> Tensor:
    """取一块教师 logits（不求梯度），并检查行数。"""
    with torch.no_grad():
        logits = teacher_fn(rows)
    expected = _num_rows(rows)
    if logits.ndim != 2 or logits.shape[0] != expected:
        where = f"rows {rows.start}:{rows.stop}" if isinstance(rows, slice) else f"{expected} rows"
        raise ValueError(f"teacher logits for {where} must have shape ({expected}, vt), got {tuple(logits.shape)}")
    return logits


@dataclass(frozen=True)
class _ChunkContext:
    """分块计算中各块共用的只读量。"""

    weight: Tensor  # 学生输出投影 (vs, d)
    teacher_fn: TeacherChunkFn | None  # 行段 → 教师 logits (c, vt)；稀疏教师时为 None
    teacher_owned: bool  # 教师 logits 是否为本模块新算出（可原地改写）
    spec: LossSpec
    real_vocab_size: int | None
    divisor: int | Tensor  # 归一化分母 N
    need_grad: bool
    compiled: bool = False  # 前向 KL 的逐元素部分是否走 torch.compile 融合的版本
    sparse_fn: Callable[[slice], tuple[Tensor, Tensor, Tensor | None]] | None = None  # 行段 → (top-k id, log P, 尾部)
    terms_fn: Callable | None = None  # 稀疏目标的逐 token 项（缺省 sparse_token_terms；跨分词器为 cross_token_terms）
    compact: bool = False  # 只算计损失的行（教师一侧接受下标张量时：教师隐藏状态或稀疏目标，见 _chunk_rows）


def _chunk_logits(ctx: _ChunkContext, h_chunk: Tensor, rows: slice | Tensor) -> tuple[Tensor, Tensor, int]:
    """一块的学生 logits z = h_c·Wᵀ（不建图）、教师 logits，以及真实词表大小 V。"""
    with torch.no_grad():
        student = F.linear(h_chunk, ctx.weight)
    teacher = _chunk_teacher_logits(ctx.teacher_fn, rows)
    real = resolve_real_vocab(ctx.weight.shape[0], teacher.shape[-1], ctx.real_vocab_size)
    return student, teacher, real


_CPU_BLOCK_ELEMS = 1 << 18  # CPU 上每个行块的元素预算（float32 1 MiB）
_ACCEL_SUB_BLOCKS = 16  # 其他设备上一块至多再切成 16 个行块


def _sub_blocks(x: Tensor) -> list[slice]:
    """快速路径里逐行归约（KL、logsumexp）用的行块划分，使临时张量远小于一块 (c × V) 缓冲区。

    CPU：每块 ≤ 2^18 个元素（V = 151,665 时 1 行）——临时张量留在缓存里，而且 glibc 的堆能反复复用这些小块，
    不会被撑大（基准尺寸下实测 c/16 行的块使峰值 RSS 多约 120 MiB）。
    GPU 等：至多 16 块（每块 ⌈c/16⌉ 行），控制核启动次数；缓存分配器没有上面的问题。"""
    rows, cols = x.shape[0], x.shape[-1]
    per_block = max(1, _CPU_BLOCK_ELEMS // cols) if x.device.type == "cpu" else -(-rows // _ACCEL_SUB_BLOCKS)
    return _row_chunks(rows, per_block)


def _blocked_logsumexp(x: Tensor) -> Tensor:
    """logsumexp(x, dim=-1, keepdim=True)，按行块求：torch.logsumexp 内部要一个与输入一样大的临时张量
    (x − max)，分块后它只有一个行块大，快速路径的峰值因此保持在 3 个 (c × V) 缓冲区。"""
    out = x.new_empty(x.shape[0], 1)
    for rows in _sub_blocks(x):
        torch.logsumexp(x[rows], dim=-1, keepdim=True, out=out[rows])
    return out


@torch.no_grad()
def _kl_rows_then_probs_(log_p: Tensor, log_q: Tensor) -> Tensor:
    """按行块求 KL(P‖Q)（公式同 ``kl_terms``），并把 log_p 原地换成 p = exp(log p)。

    每块的 p 只求一次 exp：先用它算 KL，再写回 log_p 的位置；临时张量只有一个行块大（见 ``_sub_blocks``），
    因此不会在已有的 (c × V) 缓冲区之外再多占一整块。"""
    kd = log_p.new_empty(log_p.shape[0])  # 预先分配结果：循环里不留小张量，免得把 glibc 堆切碎
    for rows in _sub_blocks(log_p):
        block = log_p[rows]
        p = block.exp()
        kd[rows] = kl_terms(p, block, log_q[rows])
        block.copy_(p)
    return kd


@torch.no_grad()
def _reverse_kl_rows_then_grad_(log_p: Tensor, log_q: Tensor) -> Tensor:
    """按行块求 KL(Q‖P)（公式同 ``kl_terms``），并把 log_q 原地换成 Q ⊙ (log Q − log P − KL)。

    这正是反向 KL 对学生 logits 的梯度（乘 1/T 之前）：∂KL(Q‖P)/∂z_j = (q_j/T)·(d_j − Σ_v q_v d_v)，
    d = log Q − log P（Σ_v q_v ∂log q_v/∂z_j = Σ_v q_v(δ_vj − q_j)/T = 0）。Σ_v q_v d_v 用已经算好的 KL 代入
    （二者只差 ``_mass_correction`` 的舍入级修正）。临时张量只有一个行块大，log_p 的缓冲区被当作 d 的草稿。"""
    kd = log_q.new_empty(log_q.shape[0])
    for rows in _sub_blocks(log_q):
        lq, d = log_q[rows], log_p[rows]
        q = lq.exp()
        kd[rows] = kl_terms(q, lq, d)
        d.sub_(lq).neg_()  # d = log Q − log P（改写 log P 的缓冲区）
        # 学生被屏蔽的列（z = −∞）：q = 0、d = −∞，0·(−∞) = NaN 换成 0（那一列的梯度本来就是 0）
        lq.copy_(q.mul_(d.sub_(kd[rows].unsqueeze(-1))).nan_to_num_(nan=0.0, posinf=math.inf, neginf=-math.inf))
    return kd


@torch.no_grad()
def _fused_kl_chunk(
    ctx: _ChunkContext, h_chunk: Tensor, rows: slice | Tensor, labels: Tensor, valid: Tensor
) -> tuple[Tensor, Tensor, Tensor, int]:
    """前向 KL（规格书默认）与反向 KL（在线蒸馏默认）的快速路径：不建 autograd 图，直接写出解析梯度，
    原地复用缓冲区，并尽早释放不再需要的块张量（峰值约 3 个 (c × vocab) 张量）。

        前向：∂[α·T²·KL(P‖Q)/N]/∂z_s = α·T·(Q − P)/N           （Q = softmax(z_s/T)，P = softmax(z_t/T)）
        反向：∂[α·T²·KL(Q‖P)/N]/∂z_s = α·T·Q ⊙ (log Q − log P − KL(Q‖P))/N
        ∂[(1−α)·CE/N]/∂z_s           = (1−α)·(softmax(z_s) − onehot(label))/N

    数值与 ``dense_token_terms`` 的公式逐项相同（KL 用同一个 ``kl_terms``，CE = lse(z) − z[label]）。
    缓冲区顺序：学生 z、教师 log P、log Q 三块；KL 按行块求值的同时把其中一块原地换成梯度。
    返回 (D, CE, ∂loss/∂z_s 的真实词表列部分, V)。
    """
    spec, temperature = ctx.spec, ctx.spec.temperature
    student, teacher, real = _chunk_logits(ctx, h_chunk, rows)
    if ctx.compiled and spec.divergence == "forward_kl":
        kd, ce, grad = _compiled_forward_kl_terms()(
            student[:, :real], teacher[:, :real], labels, valid, temperature, spec.alpha, ctx.divisor
        )
        return kd, ce, grad, real
    dtype = compute_dtype(student)
    log_p = teacher_log_probs(teacher, real, temperature, dtype, inplace=ctx.teacher_owned)
    del teacher
    z = student[:, :real].to(dtype)
    del student
    log_q = z / temperature
    lse_t = _blocked_logsumexp(log_q)
    log_q.sub_(lse_t)  # log Q = z/T − logsumexp(z/T)
    scale = valid.to(dtype) / ctx.divisor  # 有效 token 为 1/N，其余为 0
    weight = (spec.alpha * temperature * scale).unsqueeze(-1)
    if spec.divergence == "reverse_kl":
        kd = _reverse_kl_rows_then_grad_(log_p, log_q)  # 此后 log_q 的缓冲区里是 Q ⊙ (d − KL)
        grad = log_q.mul_(weight)  # α·T·Q ⊙ (d − KL)/N
    else:
        kd = _kl_rows_then_probs_(log_p, log_q)  # KL(P‖Q)；此后 log_p 的缓冲区里是 P
        grad = log_q.exp_().sub_(log_p).mul_(weight)  # α·T·(Q − P)/N
    del log_p, log_q
    lse_1 = lse_t if temperature == 1.0 else _blocked_logsumexp(z)
    ce = _cross_entropy_and_grad_(grad, z, lse_1, labels, valid, (1.0 - spec.alpha) * scale if spec.alpha < 1.0 else None)
    return torch.where(valid, kd, 0.0), torch.where(valid, ce, 0.0), grad, real


@torch.no_grad()
def _cross_entropy_and_grad_(
    grad: Tensor, z: Tensor, lse_1: Tensor, labels: Tensor, valid: Tensor, w_ce: Tensor | None
) -> Tensor:
    """CE = lse(z) − z[label]（T = 1），并在给了权重 w_ce（= (1−α)/N，α < 1 时）时把 w_ce·(softmax(z) − onehot)
    加进 grad（z 被原地改写）。"""
    safe = torch.where(valid, labels, 0).unsqueeze(-1)
    ce = (lse_1 - z.gather(-1, safe)).squeeze(-1)
    if w_ce is not None:
        w = w_ce.unsqueeze(-1)
        grad.add_(z.sub_(lse_1).exp_().mul_(w))  # + (1−α)·softmax(z)/N（z 不再需要，原地改写）
        grad.scatter_add_(-1, safe, -w)  # − (1−α)·onehot/N
    return ce


def _forward_kl_terms(
    student: Tensor, teacher: Tensor, labels: Tensor, valid: Tensor, temperature: float, alpha: float,
    divisor: int | Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """前向 KL 快速路径的同一组公式，写成无原地操作的纯函数，交给 torch.compile 融合成少数几趟遍历。

    输入为真实词表列上的学生 / 教师 logits (c, V)；返回逐 token 的 D、CE（无效 token 为 0）与
    ∂loss/∂z_s = α·T·(Q − P)/N + (1−α)·(softmax(z_s) − onehot)/N。
    """
    dtype = compute_dtype(student)
    z, t = student.to(dtype), teacher.to(dtype)
    log_p = torch.log_softmax(t / temperature, dim=-1).clamp(min=torch.finfo(dtype).min)
    p = log_p.exp()
    log_q = torch.log_softmax(z / temperature, dim=-1)
    q = log_q.exp()
    kd = kl_terms(p, log_p, log_q)  # KL(P‖Q)，与其他路径同一个公式
    lse_1 = torch.logsumexp(z, dim=-1, keepdim=True)
    safe = torch.where(valid, labels, 0).unsqueeze(-1)
    ce = (lse_1 - z.gather(-1, safe)).squeeze(-1)  # CE = lse(z) − z[label]
    scale = (valid.to(dtype) / divisor).unsqueeze(-1)  # 有效 token 为 1/N，其余为 0
    grad = (alpha * temperature) * scale * (q - p) + (1.0 - alpha) * scale * (z - lse_1).exp()
    grad = grad.scatter_add(-1, safe, -(1.0 - alpha) * scale)
    return torch.where(valid, kd, 0.0), torch.where(valid, ce, 0.0), grad


_FUSED = ("forward_kl", "reverse_kl")  # 有解析梯度快速路径的散度（_fused_kl_chunk）


@functools.lru_cache(maxsize=None)
def _compiled_forward_kl_terms():
    """编译过的 ``_forward_kl_terms``（进程内只编译一次；最后一块更短时再特化一次）。"""
    return torch.compile(_forward_kl_terms, fullgraph=True)


def _generic_chunk(
    ctx: _ChunkContext, h_chunk: Tensor, rows: slice | Tensor, labels: Tensor, valid: Tensor
) -> tuple[Tensor, Tensor, Tensor | None, int]:
    """任意散度：在这一块上建小图，用 autograd 求 ∂loss/∂z_s（只对真实词表列）。"""
    student, teacher, real = _chunk_logits(ctx, h_chunk, rows)
    leaf = student[:, :real].detach().requires_grad_(ctx.need_grad)
    with torch.enable_grad():
        kd, ce = dense_token_terms(leaf, teacher, labels, valid, ctx.spec, real)
        if not ctx.need_grad:
            return kd.detach(), ce.detach(), None, real
        (grad,) = torch.autograd.grad(objective(kd.sum(), ce.sum(), ctx.spec) / ctx.divisor, leaf)
    return kd.detach(), ce.detach(), grad, real


def _sparse_chunk(
    ctx: _ChunkContext, h_chunk: Tensor, rows: slice | Tensor, labels: Tensor, valid: Tensor
) -> tuple[Tensor, Tensor, Tensor | None, int]:
    """稀疏教师的一块：学生 logits z = h_c·Wᵀ（不建图），在这一块上用 autograd 求 ∂loss/∂z（只对真实词表列）。"""
    with torch.no_grad():
        student = F.linear(h_chunk, ctx.weight)
    real = resolve_real_vocab(ctx.weight.shape[0], None, ctx.real_vocab_size)
    sparse = ctx.sparse_fn(rows)
    leaf = student[:, :real].detach().requires_grad_(ctx.need_grad)
    with torch.enable_grad():
        kd, ce = (ctx.terms_fn or sparse_token_terms)(leaf, sparse, labels, valid, ctx.spec, real)
        if not ctx.need_grad:
            return kd.detach(), ce.detach(), None, real
        (grad,) = torch.autograd.grad(objective(kd.sum(), ce.sum(), ctx.spec) / ctx.divisor, leaf)
    return kd.detach(), ce.detach(), grad, real


class _ChunkedDistillation(torch.autograd.Function):
    """前向时逐块完成"logits → 损失 → ∂损失/∂logits → ∂h、∂W"，反向只把存好的梯度乘上上游梯度。

    每块：z = h_c·Wᵀ（c × vs），ℓ_c = (α·T²·Σ_c D + (1−α)·Σ_c CE)/N，g = ∂ℓ_c/∂z（前向与反向 KL 用解析式，
    其余散度由同一个 ``dense_token_terms`` 经 autograd 求得），然后 ∂h_c = g·W[:V]，∂W[:V] += gᵀ·h_c
    （填充行 W[V:] 的梯度恒为 0）。任意时刻只存在一块的 (c × vocab) 张量；总损失 = Σ_c ℓ_c。
    教师一侧接受下标时，块只由计损失的行组成（见 _chunk_rows），不计损失的行的 ∂h 为 0。
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, valid, chunk_ctx, chunk_size):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        chunk_ctx = dataclasses.replace(chunk_ctx, need_grad=need_h or need_w)
        fused = chunk_ctx.spec.divergence in _FUSED and chunk_ctx.need_grad and chunk_ctx.sparse_fn is None
        chunk_fn = _sparse_chunk if chunk_ctx.sparse_fn is not None else _fused_kl_chunk if fused else _generic_chunk
        acc_dtype = compute_dtype(weight)  # ∂W 在至少 float32 中累加
        grad_hidden = torch.zeros_like(hidden) if need_h else None
        grad_weight = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device) if need_w else None
        kd_total = ce_total = torch.zeros((), dtype=acc_dtype, device=hidden.device)
        for rows in _chunk_rows(valid, chunk_size, chunk_ctx.compact):
            h_chunk = hidden[rows]
            kd, ce, grad, real = chunk_fn(chunk_ctx, h_chunk, rows, labels[rows], valid[rows])
            kd_total, ce_total = kd_total + kd.sum(), ce_total + ce.sum()
            if need_h and isinstance(rows, slice):
                torch.mm(grad.to(weight.dtype), weight[:real], out=grad_hidden[rows])  # ∂h_c = g·W[:V]
            elif need_h:  # 只算了计损失的行：其余行的 ∂h 保持 0
                grad_hidden.index_copy_(0, rows, grad.to(weight.dtype) @ weight[:real])
            if need_w:
                grad_weight[:real].addmm_(grad.to(acc_dtype).T, h_chunk.to(acc_dtype))  # ∂W[:V] += gᵀ·h_c
            del grad
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        divisor = chunk_ctx.divisor
        loss = objective(kd_total, ce_total, chunk_ctx.spec) / divisor
        kd_mean, ce_mean = kd_total / divisor, ce_total / divisor
        ctx.mark_non_differentiable(kd_mean, ce_mean)
        return loss, kd_mean, ce_mean

    @staticmethod
    def backward(ctx, grad_loss, _grad_kd, _grad_ce):
        grad_hidden, grad_weight = ctx.saved_tensors
        if not torch.equal(grad_loss, torch.ones_like(grad_loss)):  # 上游梯度为 1（最常见）时免去一次复制
            grad_hidden = None if grad_hidden is None else grad_hidden * grad_loss.to(grad_hidden.dtype)
            grad_weight = None if grad_weight is None else grad_weight * grad_loss.to(grad_weight.dtype)
        if grad_weight is not None:
            grad_weight = grad_weight.to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None


@typechecked
def chunked_distillation_loss(
    student_hidden: Float[Tensor, "*batch d"],
    student_weight: Float[Tensor, "vs d"],
    labels: Integer[Tensor, "*batch"],
    *,
    teacher_hidden: Float[Tensor, "*batch dt"] | None = None,
    teacher_weight: Float[Tensor, "vt dt"] | None = None,
    teacher_logits_fn: TeacherChunkFn | None = None,
    chunk_size: int = 256,
    alpha: Number = 0.5,
    temperature: Number = 2.0,
    divergence: str = "forward_kl",
    ignore_index: int = -100,
    beta: Number = 0.5,
    skew_lambda: Number = 0.1,
    real_vocab_size: int | None = None,
    loss_mask: Bool[Tensor, "*batch"] | None = None,
    num_tokens: int | Tensor | None = None,
    return_parts: bool = False,
    compile: bool = False,
) -> Float[Tensor, ""] | tuple[Float[Tensor, ""], dict[str, Tensor]]:
    """分块蒸馏损失：值与梯度等于 ``distillation_loss(h·Wᵀ, 教师 logits, labels, ...)``，
    但任何时刻只存在 chunk_size 个 token 的 (token × vocab) 张量。

    参数：
        student_hidden：学生最终（norm 之后）的隐藏状态；student_weight：输出投影 (vs, d)，
            共享嵌入时就传 ``params["model.embed_tokens.weight"]`` 本身，梯度会与嵌入查表的梯度相加。
        教师二选一：``teacher_hidden`` + ``teacher_weight``（教师 logits = h_t·W_tᵀ），或
            ``teacher_logits_fn(rows: slice) -> (c, vt)``，rows 是展平后 token 轴上的行段。
        chunk_size：每块的 token 数（不必整除 token 总数）。其余参数同 ``distillation_loss``。
        compile：前向 KL 时把每块的逐元素计算（两个 log-softmax、KL、CE 与解析梯度）交给 torch.compile
            融合（首次调用有编译开销；CPU 上每块快数倍）；其他散度不受影响。

    梯度在前向中逐块算好（同 Liger 的 fused linear cross-entropy），反向只做缩放；因此不支持二阶导，
    也不支持 torch.func 变换（请用普通版）。
    """
    spec = LossSpec(divergence, temperature, alpha, beta, skew_lambda, ignore_index)
    _check_chunk_size(chunk_size)
    teacher_fn, teacher_owned = _teacher_chunk_fn(teacher_hidden, teacher_weight, teacher_logits_fn)
    if teacher_weight is not None:
        resolve_real_vocab(student_weight.shape[0], teacher_weight.shape[0], real_vocab_size)
    return _run_chunked(
        student_hidden, student_weight, labels, loss_mask, spec, chunk_size,
        label_vocab=real_vocab_size or student_weight.shape[0], real_vocab_size=real_vocab_size,
        num_tokens=num_tokens, return_parts=return_parts,
        teacher_fn=teacher_fn, teacher_owned=teacher_owned, compiled=compile,
    )


def _check_chunk_size(chunk_size: int) -> None:
    """分块的 token 数必须是正整数。"""
    if isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")


def _run_chunked(
    student_hidden: Tensor, student_weight: Tensor, labels: Tensor, loss_mask: Tensor | None, spec: LossSpec,
    chunk_size: int, *, label_vocab: int, real_vocab_size: int | None, num_tokens: int | Tensor | None,
    return_parts: bool, teacher_fn: TeacherChunkFn | None = None, teacher_owned: bool = False,
    compiled: bool = False, sparse_fn: Callable | None = None, terms_fn: Callable | None = None,
) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
    """两种分块损失（稠密教师给 teacher_fn，稀疏教师给 sparse_fn）共用的一段：展平 token 轴、有效掩码、
    核对标签、归一化分母 N，再交给 _ChunkedDistillation。"""
    hidden = rearrange(student_hidden, "... d -> (...) d")
    flat_labels = rearrange(labels, "... -> (...)")
    valid = valid_mask(flat_labels, None if loss_mask is None else rearrange(loss_mask, "... -> (...)"), spec.ignore_index)
    check_ids(flat_labels, valid, label_vocab, "labels")
    chunk_ctx = _ChunkContext(
        student_weight, teacher_fn, teacher_owned, spec, real_vocab_size, token_divisor(valid, num_tokens), True,
        compiled=compiled, sparse_fn=sparse_fn, terms_fn=terms_fn, compact=teacher_owned or sparse_fn is not None,
    )
    loss, kd_mean, ce_mean = _ChunkedDistillation.apply(hidden, student_weight, flat_labels, valid, chunk_ctx, chunk_size)
    if not return_parts:
        return loss
    return loss, {"kd": kd_mean, "ce": ce_mean}


@typechecked
def chunked_sparse_distillation_loss(
    student_hidden: Float[Tensor, "*batch d"],
    student_weight: Float[Tensor, "vs d"],
    labels: Integer[Tensor, "*batch"],
    teacher_topk_ids: Integer[Tensor, "*batch topk"],
    teacher_topk_log_probs: Float[Tensor, "*batch topk"],
    *,
    teacher_tail_mass: Float[Tensor, "*batch"] | None = None,
    chunk_size: int = 256,
    alpha: Number = 0.5,
    temperature: Number = 2.0,
    divergence: str = "forward_kl",
    ignore_index: int = -100,
    beta: Number = 0.5,
    skew_lambda: Number = 0.1,
    real_vocab_size: int | None = None,
    loss_mask: Bool[Tensor, "*batch"] | None = None,
    num_tokens: int | Tensor | None = None,
    return_parts: bool = False,
) -> Float[Tensor, ""] | tuple[Float[Tensor, ""], dict[str, Tensor]]:
    """分块的稀疏教师损失：值与梯度等于 ``sparse_distillation_loss(h·Wᵀ, ids, log P, labels, ...)``，
    但任何时刻只存在 chunk_size 个 token 的学生 logits（教师缓存与在线 top-k 蒸馏用它）。

    教师只给 top-k id、温度 T 下的 log 概率与尾部质量（``teacher_topk`` 或 ``TeacherCache.targets`` 的结果）；
    梯度在前向中逐块算好，反向只做缩放（与 ``chunked_distillation_loss`` 同一个机制）。
    """
    spec = LossSpec(divergence, temperature, alpha, beta, skew_lambda, ignore_index)
    _check_chunk_size(chunk_size)
    real = resolve_real_vocab(student_weight.shape[0], None, real_vocab_size)
    ids = rearrange(teacher_topk_ids, "... k -> (...) k")
    check_topk(ids, real)
    log_p = rearrange(teacher_topk_log_probs, "... k -> (...) k")
    tail = None if teacher_tail_mass is None else rearrange(teacher_tail_mass, "... -> (...)")
    sparse_fn = lambda rows: (ids[rows], log_p[rows], None if tail is None else tail[rows])  # noqa: E731
    return _run_chunked(
        student_hidden, student_weight, labels, loss_mask, spec, chunk_size, label_vocab=real,
        real_vocab_size=real_vocab_size, num_tokens=num_tokens, return_parts=return_parts, sparse_fn=sparse_fn,
    )


@typechecked
def chunked_cross_tokenizer_loss(
    student_hidden: Float[Tensor, "*batch d"],
    student_weight: Float[Tensor, "vs d"],
    labels: Integer[Tensor, "*batch"],
    target_ids: Integer[Tensor, "*batch topk"],
    target_log_probs: Float[Tensor, "*batch topk"],
    target_tail: Float[Tensor, "*batch"],
    kind: Integer[Tensor, "*batch"],
    *,
    chunk_size: int = 256,
    alpha: Number = 0.5,
    temperature: Number = 2.0,
    divergence: str = "forward_kl",
    real_vocab_size: int | None = None,
    loss_mask: Bool[Tensor, "*batch"] | None = None,
    num_tokens: int | Tensor | None = None,
    return_parts: bool = False,
) -> Float[Tensor, ""] | tuple[Float[Tensor, ""], dict[str, Tensor]]:
    """跨分词器的分块损失（losses/cross_tokenizer.py）：映射目标的行与稀疏损失相同，ULD 行比较排序后的概率，
    其余行只有交叉熵；与 ``chunked_sparse_distillation_loss`` 同一个分块引擎，同样只存在一块的学生 logits。"""
    spec = LossSpec(divergence, temperature, alpha)
    _check_chunk_size(chunk_size)
    real = resolve_real_vocab(student_weight.shape[0], None, real_vocab_size)
    ids = rearrange(target_ids, "... k -> (...) k")
    check_topk(ids, real)
    log_p = rearrange(target_log_probs, "... k -> (...) k")
    tail, kinds = rearrange(target_tail, "... -> (...)"), rearrange(kind, "... -> (...)")
    sparse_fn = lambda rows: (ids[rows], log_p[rows], tail[rows], kinds[rows])  # noqa: E731
    return _run_chunked(
        student_hidden, student_weight, labels, loss_mask, spec, chunk_size, label_vocab=real,
        real_vocab_size=real_vocab_size, num_tokens=num_tokens, return_parts=return_parts, sparse_fn=sparse_fn,
        terms_fn=cross_token_terms,
    )
