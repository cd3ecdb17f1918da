"""MoE 层函数与 transformers 自己的模块逐位对照：Qwen3MoeSparseMoeBlock、DeepseekV3MoE（权重拷入）、
load_balancing_loss_func；以及“按专家分组”的性质：没被选中的专家一次也不算，每个专家只做一次矩阵乘。"""

import pytest
import torch

from conftest import needs
from functional_lm.config import ModelConfig
from functional_lm.layers import moe
from functional_lm.layers.moe import (
    deepseek_moe_ffn,
    grouped_experts,
    load_balancing_loss,
    moe_ffn,
    route_grouped_sigmoid,
    route_softmax,
)

transformers = needs("transformers")


def _qwen3_moe(norm_topk_prob=True, experts=8, k=2):
    hf = transformers.Qwen3MoeConfig(hidden_size=32, moe_intermediate_size=24, num_experts=experts,
                                     num_experts_per_tok=k, norm_topk_prob=norm_topk_prob)
    cfg = ModelConfig(family="qwen3_moe", qkv_bias=False, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2,
                      intermediate_size=64, vocab_size=64, num_experts=experts, num_experts_per_tok=k,
                      moe_intermediate_size=24, norm_topk_prob=norm_topk_prob)
    hf._experts_implementation = "grouped_mm"  # transformers 5 整个模型的缺省专家实现（单独的模块缺省是逐专家循环）
    torch.manual_seed(0)
    block = transformers.models.qwen3_moe.modeling_qwen3_moe.Qwen3MoeSparseMoeBlock(hf).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.3)
    return cfg, block, {k: v.detach() for k, v in block.state_dict().items()}


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_qwen3_moe_block_equals_transformers(norm_topk_prob):
    cfg, block, mlp = _qwen3_moe(norm_topk_prob)
    assert set(mlp) == {"gate.weight", "experts.gate_up_proj", "experts.down_proj"}
    x = torch.randn(3, 7, 32)
    with torch.no_grad():
        theirs = block(x)
    assert torch.equal(moe_ffn(x, mlp, cfg), theirs)


def test_softmax_router_renormalises_only_when_asked():
    logits = torch.randn(5, 8)
    w, e = route_softmax(logits, 3, True)
    torch.testing.assert_close(w.sum(-1), torch.ones(5))
    probs = logits.softmax(-1)
    w2, e2 = route_softmax(logits, 3, False)
    assert torch.equal(e, e2) and torch.equal(w2, probs.gather(1, e2))


def _deepseek(n_group=4, topk_group=2, shared=1, norm=True):
    hf = transformers.DeepseekV3Config(hidden_size=32, moe_intermediate_size=16, n_routed_experts=16,
                                       num_experts_per_tok=4, n_group=n_group, topk_group=topk_group,
                                       n_shared_experts=shared, routed_scaling_factor=2.5, norm_topk_prob=norm)
    cfg = ModelConfig(family="deepseek_v3", qkv_bias=False, hidden_size=32, num_layers=1, num_heads=4,
                      num_kv_heads=4, intermediate_size=64, vocab_size=64, num_experts=16, num_experts_per_tok=4,
                      moe_intermediate_size=16, n_group=n_group, topk_group=topk_group, n_shared_experts=shared,
                      routed_scaling_factor=2.5, norm_topk_prob=norm, kv_lora_rank=8, qk_nope_head_dim=8,
                      qk_rope_head_dim=4, v_head_dim=8)
    hf._experts_implementation = "grouped_mm"
    torch.manual_seed(1)
    block = transformers.models.deepseek_v3.modeling_deepseek_v3.DeepseekV3MoE(hf).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.3)
        block.gate.e_score_correction_bias.normal_(0, 0.5)  # 非零的修正偏置：它改变选择，但不进权重
    return cfg, block, {k: v.detach() for k, v in block.state_dict().items()}


@pytest.mark.parametrize("n_group, topk_group, norm", [(4, 2, True), (1, 1, True), (4, 1, False), (8, 3, True)])
def test_deepseek_moe_equals_transformers(n_group, topk_group, norm):
    cfg, block, mlp = _deepseek(n_group, topk_group, norm=norm)
    x = torch.randn(2, 9, 32)
    with torch.no_grad():
        theirs = block(x)
    assert torch.equal(deepseek_moe_ffn(x, mlp, cfg), theirs)


def test_deepseek_router_equals_transformers_and_the_bias_only_selects():
    cfg, block, mlp = _deepseek()
    x = torch.randn(40, 32)
    with torch.no_grad():
        logits, their_w, their_e = block.gate(x)
    ours_w, ours_e = route_grouped_sigmoid(logits, mlp["gate.e_score_correction_bias"], cfg)
    # topk(sorted=False) 的顺序两边相同（同一个算子、同样的输入），但按专家号排序后比较更稳
    a, b = ours_e.sort(-1), their_e.sort(-1)
    assert torch.equal(a.values, b.values)
    assert torch.equal(ours_w.gather(1, a.indices), their_w.gather(1, b.indices))
    without = route_grouped_sigmoid(logits, torch.zeros(16), cfg)[1].sort(-1).values
    assert not torch.equal(without, a.values)  # 偏置确实改变了某些 token 的选择
    picked = logits.sigmoid().gather(1, ours_e) * 2.5
    torch.testing.assert_close(ours_w, picked / picked.sum(-1, keepdim=True) * 2.5, rtol=1e-6, atol=1e-6)


def test_group_limit_keeps_every_choice_inside_the_chosen_groups():
    cfg, _, _ = _deepseek(n_group=4, topk_group=1)
    logits = torch.randn(50, 16)
    _, experts = route_grouped_sigmoid(logits, torch.zeros(16), cfg)
    groups = experts // 4
    assert torch.equal(groups, groups[:, :1].expand_as(groups))  # topk_group = 1：四个专家全在同一组


def _reference_experts(x, weights, experts, gate_up, down):
    """独立的参照：对每个 token、每个被选中的专家逐个计算（最直接的写法）。"""
    out = torch.zeros_like(x)
    for i in range(x.shape[0]):
        for j in range(experts.shape[1]):
            e = int(experts[i, j])
            gate, up = (gate_up[e] @ x[i]).chunk(2)
            out[i] += weights[i, j] * (down[e] @ (torch.nn.functional.silu(gate) * up))
    return out


def test_grouped_experts_equal_the_per_token_definition_and_have_gradients():
    torch.manual_seed(2)
    x = torch.randn(11, 16, requires_grad=True)
    gate_up, down = torch.randn(6, 20, 16, requires_grad=True), torch.randn(6, 16, 10, requires_grad=True)
    weights, experts = torch.rand(11, 2), torch.randint(0, 6, (11, 2))
    experts[:, 1] = (experts[:, 0] + 1) % 6  # 每个 token 两个不同的专家
    ours = grouped_experts(x, weights, experts, gate_up, down)
    torch.testing.assert_close(ours, _reference_experts(x, weights, experts, gate_up, down), rtol=1e-5, atol=1e-5)
    ours.square().sum().backward()
    assert x.grad.abs().sum() > 0 and gate_up.grad.abs().sum() > 0


def test_an_expert_no_token_picked_is_never_computed(monkeypatch):
    calls = []
    real = torch.nn.functional.linear

    def counting(rows, weight, bias=None):
        calls.append((tuple(rows.shape), weight.data_ptr()))
        return real(rows, weight, bias)

    monkeypatch.setattr(moe.F, "linear", counting)
    gate_up, down = torch.randn(8, 12, 16), torch.randn(8, 16, 6)
    experts = torch.tensor([[1, 5], [5, 1], [1, 3]])  # 只有 1、3、5 号专家被选中
    grouped_experts(torch.randn(3, 16), torch.rand(3, 2), experts, gate_up, down)
    used = {gate_up[e].data_ptr() for e in (1, 3, 5)} | {down[e].data_ptr() for e in (1, 3, 5)}
    assert {ptr for _, ptr in calls} == used  # 没被选中的专家的权重一次也没读
    assert len(calls) == 6  # 每个被选中的专家：一次 [gate; up]、一次 down
    assert sorted(shape[0] for shape, _ in calls) == [1, 1, 2, 2, 3, 3]  # 每次只算分给它的 token（不是全部 3 个）


def test_the_compiled_path_equals_eager_and_has_gradients():
    torch.manual_seed(3)
    x, gate_up, down = torch.randn(9, 16), torch.randn(4, 12, 16), torch.randn(4, 16, 6)
    weights, experts = torch.rand(9, 2), torch.randint(0, 4, (9, 2))
    experts[:, 1] = (experts[:, 0] + 1) % 4
    eager = grouped_experts(x, weights, experts, gate_up, down)
    compiled = torch.compile(grouped_experts, fullgraph=True, dynamic=False)
    with torch.no_grad():
        assert torch.equal(compiled(x, weights, experts, gate_up, down), eager)  # 同一个专家循环，只是不透明
    w1 = gate_up.clone().requires_grad_(True)
    compiled(x, weights, experts, w1, down).square().sum().backward()
    w2 = gate_up.clone().requires_grad_(True)
    grouped_experts(x, weights, experts, w2, down).square().sum().backward()
    torch.testing.assert_close(w1.grad, w2.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("masked", [False, True])
def test_load_balancing_loss_equals_transformers(masked):
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

    torch.manual_seed(4)
    layers = tuple(torch.randn(2 * 6, 8) for _ in range(3))
    mask = torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1]]) if masked else None
    theirs = load_balancing_loss_func(layers, 8, 2, mask)
    torch.testing.assert_close(load_balancing_loss(layers, 8, 2, mask), theirs, rtol=1e-6, atol=1e-6)
    uniform = (torch.zeros(4, 8),)
    assert float(load_balancing_loss(uniform, 8, 2)) == pytest.approx(2.0)  # 完全均衡：E · Σ (k/E)(1/E) = k
