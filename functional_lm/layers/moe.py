"""混合专家（MoE）的纯函数：两种路由、按专家分组的专家计算、两种 MoE 前馈层与负载均衡损失。

图例：n 个 token（b·t 摊平），d 隐藏，E 路由专家数，k 每个 token 选的专家数（num_experts_per_tok），
f 每个专家的 SwiGLU 宽度（moe_intermediate_size），m = n·k 条“token → 专家”的指派。

参数（一层 ``mlp.`` 之下，transformers 5 的融合布局，参数字典保留的就是这一种）：
    gate.weight (E, d)                       路由器
    experts.gate_up_proj (E, 2f, d)          每个专家的 [gate; up] 两个投影叠在一起（前 f 行是 gate）
    experts.down_proj (E, d, f)              每个专家的 down 投影
    gate.e_score_correction_bias (E,)        DeepSeek-V3：只参与选择的偏置
    shared_experts.{gate,up,down}_proj.weight  DeepSeek-V3：每个 token 都经过的共享专家（宽 f·n_shared）

专家计算按专家分组：把 m 条指派按专家号排序，每个专家对自己那一段连续的 token 做一次矩阵乘
（逐个“被选中的专家”调用 F.linear；torch.compile 之下包成一个不透明的算子 grouped_linear），
从不逐 token 循环，也从不让每个专家算每个 token。运算顺序与 transformers 5 的缺省专家实现（grouped_mm：
排序、分组矩阵乘、乘权重、逆置换、对 k 个位置求和）相同，所以与它逐位一致。
"""

from collections.abc import Mapping
from typing import Optional

import torch
import torch.nn.functional as F
from einops import rearrange

from functional_lm.config import ModelConfig
from functional_lm.layers import linear, swiglu
from functional_lm.shapes import Float, Integer, Tensor, typechecked

__all__ = [
    "route_softmax", "route_grouped_sigmoid", "expert_counts", "grouped_experts", "moe_ffn", "deepseek_moe_ffn",
    "load_balancing_loss",
]


@typechecked
def route_softmax(
    logits: Float[Tensor, "n E"], k: int, norm_topk_prob: bool
) -> tuple[Float[Tensor, "n k"], Integer[Tensor, "n k"]]:
    """Qwen3-MoE 的路由：p = softmax(logits)（float32），取概率最高的 k 个专家；
    norm_topk_prob 时把这 k 个概率重新归一，w_j = p_j / Σ_{选中} p；最后转回 logits 的 dtype。"""
    probs = logits.softmax(dim=-1, dtype=torch.float32)
    weights, experts = probs.topk(k, dim=-1)
    if norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(logits.dtype), experts


@typechecked
def route_grouped_sigmoid(
    logits: Float[Tensor, "n E"], correction_bias: Float[Tensor, "E"], cfg: ModelConfig
) -> tuple[Float[Tensor, "n k"], Integer[Tensor, "n k"]]:
    """DeepSeek-V3 的路由（noaux_tc）：得分 s = σ(logits)；选择用 s + b（b = e_score_correction_bias，
    只影响选哪几个，不进权重）。

    分组限制：E 个专家分成 n_group 组，组分 = 组内 (s + b) 最高两个之和；只在组分最高的 topk_group 组里
    选 (s + b) 最高的 k 个专家。权重取被选专家的原始得分 s_j；norm_topk_prob 时 w_j = s_j / (Σ s + 1e-20)；
    最后乘 routed_scaling_factor。全部在 float32 中计算（transformers 的路由器也如此）。
    """
    scores = logits.float().sigmoid()
    choice = scores + correction_bias.float()
    grouped = rearrange(choice, "n (g e) -> n g e", g=cfg.n_group)
    group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # (n, g)
    top_groups = group_scores.topk(cfg.topk_group, dim=-1, sorted=False).indices
    keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter(1, top_groups, True)  # (n, g)
    keep = rearrange(keep[..., None].expand_as(grouped), "n g e -> n (g e)")
    experts = choice.masked_fill(~keep, float("-inf")).topk(cfg.num_experts_per_tok, dim=-1, sorted=False).indices
    weights = scores.gather(1, experts)
    if cfg.norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * cfg.routed_scaling_factor, experts


def expert_counts(experts: Tensor, num_experts: int) -> Tensor:
    """每个专家被指派的次数 (E,)：scatter_add 而不是 bincount（输出长度静态，torch.compile 可追踪）。"""
    flat = experts.reshape(-1)
    return torch.zeros(num_experts, dtype=torch.int64, device=flat.device).scatter_add(0, flat, torch.ones_like(flat))


def _expert_loop(rows: Tensor, weight: Tensor, counts: Tensor) -> Tensor:
    """按专家排好序的 rows (m, i) 与每个专家的权重 (E, o, i)：第 e 段 rows 乘 W_eᵀ，返回 (m, o)。

    逐个“至少被选中一次”的专家做一次 F.linear（循环的是专家，不是 token）。与 transformers 在 CPU 上的
    grouped_mm 逐位相同；torch 2.13 的 CPU grouped_mm 没有可用的反向、编译时只收 bf16，所以不用它。
    """
    pieces = rows.split(counts.tolist())
    return torch.cat([F.linear(piece, weight[e]) for e, piece in enumerate(pieces) if piece.shape[0] > 0])


def _expert_loop_backward(grad: Tensor, rows: Tensor, weight: Tensor, counts: Tensor) -> tuple[Tensor, Tensor]:
    """_expert_loop 的反向：∂L/∂rows_e = g_e W_e，∂L/∂W_e = g_eᵀ rows_e（没被选中的专家梯度为 0）。

    梯度按专家直接写进一个 (E, o, i) 的张量；若交给 autograd 逐段求导，每个 weight[e] 的反向都会生成
    一份完整的 (E, o, i) 零张量再累加（E 个专家就是 E 份），这正是要避开的。
    """
    grad_rows = _expert_loop(grad, weight.transpose(1, 2), counts)
    grad_weight = torch.zeros_like(weight)
    for e, (g, r) in enumerate(zip(grad.split(counts.tolist()), rows.split(counts.tolist()))):
        if g.shape[0] > 0:
            grad_weight[e] = g.T @ r
    return grad_rows, grad_weight


class GroupedLinear(torch.autograd.Function):
    """eager 下的分组线性层：前向即 _expert_loop，反向即 _expert_loop_backward。

    写成带 setup_context 的 autograd.Function，torch.func.grad / vjp 也能穿过它（torch.library 的自定义算子
    不能）；vmap 不行：每个专家的段长来自数据（counts.tolist()）。
    """

    @staticmethod
    def forward(rows: Tensor, weight: Tensor, counts: Tensor) -> Tensor:
        return _expert_loop(rows, weight, counts)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, grad: Tensor):
        rows, weight, counts = ctx.saved_tensors
        return (*_expert_loop_backward(grad, rows, weight, counts), None)


@torch.library.custom_op("functional_lm::grouped_linear", mutates_args=())
def grouped_linear(rows: Tensor, weight: Tensor, counts: Tensor) -> Tensor:
    """_expert_loop 的不透明算子形式：torch.compile 把它当作一个整体（每段的长度依赖数据，追踪不进去），
    图不必在这里断开；输出形状 (m, o) 是静态的。"""
    return _expert_loop(rows, weight, counts)


@grouped_linear.register_fake
def _grouped_linear_fake(rows: Tensor, weight: Tensor, counts: Tensor) -> Tensor:
    return rows.new_empty(rows.shape[0], weight.shape[1])


def _grouped_linear_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


@torch.library.custom_op("functional_lm::grouped_linear_backward", mutates_args=())
def grouped_linear_backward(grad: Tensor, rows: Tensor, weight: Tensor, counts: Tensor) -> tuple[Tensor, Tensor]:
    """grouped_linear 的反向（同样不透明，编译时 AOTAutograd 不追踪进去）：
    ∂L/∂rows_e = g_e W_e，∂L/∂W_e = g_eᵀ rows_e（没被选中的专家梯度为 0）。"""
    return _expert_loop_backward(grad, rows, weight, counts)


@grouped_linear_backward.register_fake
def _grouped_linear_backward_fake(grad: Tensor, rows: Tensor, weight: Tensor, counts: Tensor) -> tuple[Tensor, Tensor]:
    return torch.empty_like(rows), torch.empty_like(weight)


def _grouped_linear_backward(ctx, grad: Tensor):
    rows, weight, counts = ctx.saved_tensors
    grad_rows, grad_weight = grouped_linear_backward(grad, rows, weight, counts)
    return grad_rows, grad_weight, None


grouped_linear.register_autograd(_grouped_linear_backward, setup_context=_grouped_linear_setup)


def _per_expert(rows: Tensor, weight: Tensor, counts: Tensor) -> Tensor:
    """eager（与 torch.func.grad）下用 GroupedLinear；torch.compile 追踪时用不透明算子 grouped_linear
    （段长依赖数据，dynamo 追踪不进 autograd.Function 的循环）。"""
    if torch.compiler.is_compiling():
        return grouped_linear(rows, weight, counts)
    return GroupedLinear.apply(rows, weight, counts)


@typechecked
def grouped_experts(
    x: Float[Tensor, "n d"],
    weights: Float[Tensor, "n k"],
    experts: Integer[Tensor, "n k"],
    gate_up: Float[Tensor, "E ff d"],
    down: Float[Tensor, "E d f"],
) -> Float[Tensor, "n d"]:
    """y_i = Σ_{j ∈ 选中(i)} w_ij · down_j( SiLU(gate_j(x_i)) ⊙ up_j(x_i) )，按专家分组计算。

    1. m = n·k 条指派按专家号排序（与 transformers 的 grouped_mm 路径同一个 torch.sort），取出排好序的
       token 向量 (m, d)，每个专家对自己的一段做 [gate; up] 投影、SwiGLU、down 投影，再乘路由权重；
    2. 按排序的逆置换放回 (n, k, d)，对 k 个位置求和（按位置顺序累加，与 transformers 的 reshape + sum 相同）。
    """
    n, k = experts.shape
    sorted_experts, perm = torch.sort(experts.reshape(-1))  # perm[r]：排序后第 r 条是哪一条指派（token = perm // k）
    counts = expert_counts(sorted_experts, gate_up.shape[0])
    gate, up = _per_expert(x[perm // k], gate_up, counts).chunk(2, dim=-1)  # 各 (m, f)
    out = _per_expert(F.silu(gate) * up, down, counts)  # (m, d)
    out = out * weights.reshape(-1)[perm, None]  # 权重可能是 float32（DeepSeek）：先乘、求和，再转回 x 的 dtype
    unsorted = torch.empty_like(out).index_copy(0, perm, out)  # 第 perm[r] 条 ← 排序后的第 r 条
    return rearrange(unsorted, "(n k) d -> n k d", k=k).sum(dim=1).to(x.dtype)


@typechecked
def moe_ffn(x: Float[Tensor, "b t d"], mlp: Mapping[str, Tensor], cfg: ModelConfig) -> Float[Tensor, "b t d"]:
    """Qwen3-MoE 的稀疏前馈层：softmax 路由选 k 个专家，按专家分组计算（无共享专家）。"""
    flat = rearrange(x, "b t d -> (b t) d")
    weights, experts = route_softmax(linear(flat, mlp["gate.weight"]), cfg.num_experts_per_tok, cfg.norm_topk_prob)
    out = grouped_experts(flat, weights, experts, mlp["experts.gate_up_proj"], mlp["experts.down_proj"])
    return rearrange(out, "(b t) d -> b t d", b=x.shape[0])


@typechecked
def deepseek_moe_ffn(x: Float[Tensor, "b t d"], mlp: Mapping[str, Tensor], cfg: ModelConfig) -> Float[Tensor, "b t d"]:
    """DeepSeekMoE：路由专家（分组限制的 sigmoid 路由，float32 的路由器）+ 每个 token 都经过的共享专家。

    y = Σ_j w_j · expert_j(x) + shared(x)，shared 是一个宽 f·n_shared_experts 的 SwiGLU。
    """
    flat = rearrange(x, "b t d -> (b t) d")
    logits = F.linear(flat.float(), mlp["gate.weight"].float())  # 路由器在 float32 中（同 transformers）
    weights, experts = route_grouped_sigmoid(logits, mlp["gate.e_score_correction_bias"], cfg)
    routed = grouped_experts(flat, weights, experts, mlp["experts.gate_up_proj"], mlp["experts.down_proj"])
    shared = swiglu(x, mlp["shared_experts.gate_proj.weight"], mlp["shared_experts.up_proj.weight"],
                    mlp["shared_experts.down_proj.weight"])
    return rearrange(routed, "(b t) d -> b t d", b=x.shape[0]) + shared


def load_balancing_loss(
    router_logits: list[Tensor] | tuple[Tensor, ...],
    num_experts: int,
    k: int,
    attention_mask: Optional[Tensor] = None,
) -> Tensor:
    """Switch Transformer 式的负载均衡辅助损失（Qwen3-MoE 的 router_aux_loss；MoE 学生用，冻结的教师不需要）。

    把各层的路由 logits (n, E) 拼在一起，p = softmax(logits)，取 top-k 得到指派掩码：
        f_e = 被指派给专家 e 的 token 比例（对 k 个位置分别求平均），P_e = 路由给专家 e 的平均概率，
        loss = E · Σ_e f_e · P_e（完全均衡时为 k）。
    attention_mask (b, t) 给出时只在真实 token 上求平均（各层的 n = b·t）。系数（router_aux_loss_coef）由调用者乘。
    """
    logits = torch.cat([layer.float() for layer in router_logits], dim=0)  # (L·n, E)
    probs = logits.softmax(dim=-1)
    chosen = F.one_hot(probs.topk(k, dim=-1).indices, num_experts).float()  # (L·n, k, E)
    if attention_mask is None:
        tokens_per_expert = chosen.mean(dim=0)  # (k, E)
        prob_per_expert = probs.mean(dim=0)  # (E,)
    else:
        real = attention_mask.reshape(-1).float().repeat(len(router_logits))  # (L·n,)
        tokens_per_expert = (chosen * real[:, None, None]).sum(dim=0) / real.sum()
        prob_per_expert = (probs * real[:, None]).sum(dim=0) / real.sum()
    return (tokens_per_expert * prob_per_expert[None, :]).sum() * num_experts
