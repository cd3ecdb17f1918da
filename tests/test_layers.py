"""纯函数层的测试：形状、数学性质，以及与独立写法（显式公式、普通多头注意力）的一致性。"""

import math

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange
from jaxtyping import TypeCheckError

from functional_lm.config import ModelConfig
from functional_lm.layers import (
    STREAMING_MAX_ROWS,
    KVSlot,
    apply_rope,
    attend,
    cache_attention_mask,
    fusion_barrier,
    gqa_attention,
    linear,
    rms_norm,
    rope_tables,
    streaming_linear,
    sub_params,
    swiglu,
    transformer_block,
)
from functional_lm.models.decoder import init_params, layer_params

CFG = ModelConfig(
    hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64,
    vocab_size=97, max_seq_len=64, rope_theta=10000.0,
)


def _attn_weights(cfg, seed=0):
    params = init_params(cfg, seed=seed)
    layer = layer_params(params, cfg, 0)
    attn = sub_params(layer, "self_attn.")
    # 偏置默认为 0，这里给非零值，让偏置路径真正参与比较。
    gen = torch.Generator().manual_seed(seed + 1)
    for name in ("q_proj.bias", "k_proj.bias", "v_proj.bias"):
        if name in attn:
            attn[name] = torch.randn(attn[name].shape, generator=gen) * 0.1
    return layer, attn


# ---------------------------------------------------------------- RMSNorm
def test_rms_norm_shape_and_unit_rms():
    x = torch.randn(3, 5, 32) * 7.0 + 2.0
    y = rms_norm(x, torch.ones(32), 1e-6)
    assert y.shape == x.shape
    rms = y.pow(2).mean(-1).sqrt()
    torch.testing.assert_close(rms, torch.ones_like(rms), atol=1e-4, rtol=0)


def test_rms_norm_matches_formula_and_applies_weight():
    x = torch.randn(4, 16, dtype=torch.float64)
    w = torch.randn(16, dtype=torch.float64)
    expected = x / torch.sqrt((x**2).mean(-1, keepdim=True) + 1e-5) * w
    torch.testing.assert_close(rms_norm(x, w, 1e-5), expected)


def test_rms_norm_keeps_low_precision_dtype():
    x = torch.randn(2, 8, dtype=torch.bfloat16)
    y = rms_norm(x, torch.ones(8, dtype=torch.bfloat16), 1e-6)
    assert y.dtype == torch.bfloat16


def test_rms_norm_rejects_wrong_weight_shape():
    with pytest.raises(TypeCheckError, match="rms_norm"):
        rms_norm(torch.randn(2, 8), torch.ones(7), 1e-6)


# ---------------------------------------------------------------- RoPE
def _rope(positions, e=16, theta=10000.0):
    pos = torch.tensor([positions])
    return rope_tables(pos, e, theta)


def test_rope_keeps_shape_and_differs_by_position():
    x = torch.randn(1, 2, 6, 16)
    cos, sin = _rope(list(range(6)))
    y = apply_rope(x, cos, sin)
    assert y.shape == x.shape
    # 同一个向量放在不同位置上，编码结果不同；位置 0 不旋转。
    same = x[:, :, :1].expand(-1, -1, 6, -1)
    rotated = apply_rope(same, cos, sin)
    torch.testing.assert_close(rotated[:, :, 0], same[:, :, 0])
    for p in range(1, 6):
        assert not torch.allclose(rotated[:, :, p], rotated[:, :, 0], atol=1e-4)


def test_rope_preserves_norm():
    x = torch.randn(2, 3, 7, 16, dtype=torch.float64)
    cos, sin = rope_tables(torch.arange(7).expand(2, -1), 16, 10000.0, torch.float64)
    torch.testing.assert_close(apply_rope(x, cos, sin).norm(dim=-1), x.norm(dim=-1))


def test_rope_dot_product_depends_only_on_relative_position():
    q = torch.randn(1, 1, 1, 16, dtype=torch.float64)
    k = torch.randn(1, 1, 1, 16, dtype=torch.float64)

    def score(pq, pk):
        cq, sq = rope_tables(torch.tensor([[pq]]), 16, 10000.0, torch.float64)
        ck, sk = rope_tables(torch.tensor([[pk]]), 16, 10000.0, torch.float64)
        return (apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum()

    base = score(5, 2)
    for shift in (1, 10, 100):
        # 角度按 Qwen2 的做法在 float32 中计算，所以容差取 float32 量级。
        torch.testing.assert_close(score(5 + shift, 2 + shift), base, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(score(5, 3), base)


def test_rope_uses_rotate_half_pairs():
    # e = 4：第 0 维与第 2 维是一对，旋转角 p·θ^0 = p。
    x = torch.tensor([[[[1.0, 0.0, 0.0, 0.0]]]])
    cos, sin = rope_tables(torch.tensor([[1]]), 4, 10000.0)
    y = apply_rope(x, cos, sin)[0, 0, 0]
    torch.testing.assert_close(y, torch.tensor([math.cos(1.0), 0.0, math.sin(1.0), 0.0]))


def test_rope_inverse_frequencies():
    cos, sin = rope_tables(torch.tensor([[1]]), 8, 100.0, torch.float64)
    angles = torch.atan2(sin, cos)[0, 0]
    expected = torch.tensor([100.0 ** (-2 * i / 8) for i in range(4)], dtype=torch.float64)
    torch.testing.assert_close(angles, torch.cat([expected, expected]), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- attention
def _plain_mha(x, attn, cfg, positions):
    """独立写法：每个查询头配一组自己的 K/V，显式 softmax 与上三角 −∞ 遮罩。"""
    e = cfg.head_dim
    q = F.linear(x, attn["q_proj.weight"], attn.get("q_proj.bias"))
    k = F.linear(x, attn["k_proj.weight"], attn.get("k_proj.bias"))
    v = F.linear(x, attn["v_proj.weight"], attn.get("v_proj.bias"))
    q, k, v = (rearrange(z, "b t (n e) -> b n t e", e=e) for z in (q, k, v))
    cos, sin = rope_tables(positions, e, cfg.rope_theta, x.dtype)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    t = x.shape[1]
    scores = q @ k.transpose(-1, -2) / math.sqrt(e)
    scores = scores.masked_fill(torch.triu(torch.ones(t, t, dtype=torch.bool), 1), float("-inf"))
    out = scores.softmax(-1) @ v
    return F.linear(rearrange(out, "b n t e -> b t (n e)"), attn["o_proj.weight"])


def test_gqa_shape():
    _, attn = _attn_weights(CFG)
    x = torch.randn(2, 9, 32)
    assert gqa_attention(x, attn, CFG).shape == (2, 9, 32)


def test_gqa_with_kv_heads_equal_to_heads_is_plain_mha():
    cfg = CFG.replace(num_kv_heads=4)
    _, attn = _attn_weights(cfg)
    x = torch.randn(2, 9, 32)
    pos = torch.arange(9).expand(2, -1)
    torch.testing.assert_close(gqa_attention(x, attn, cfg), _plain_mha(x, attn, cfg, pos), atol=1e-5, rtol=1e-5)


def test_gqa_equals_mha_with_duplicated_kv_weights():
    # GQA 的头扩展等价于：把每个 KV 头的投影行复制 g 份后做普通多头注意力。
    _, attn = _attn_weights(CFG)
    g, e = CFG.num_queries_per_kv, CFG.head_dim
    mha = dict(attn)
    for name in ("k_proj.weight", "v_proj.weight", "k_proj.bias", "v_proj.bias"):
        w = rearrange(attn[name], "(k e) ... -> k e ...", e=e)
        mha[name] = rearrange(torch.stack([w] * g, dim=1), "k g e ... -> (k g e) ...")
    x = torch.randn(2, 7, 32)
    pos = torch.arange(7).expand(2, -1)
    torch.testing.assert_close(gqa_attention(x, attn, CFG), _plain_mha(x, mha, CFG, pos), atol=1e-5, rtol=1e-5)


def test_gqa_explicit_positions_and_padding_mask():
    _, attn = _attn_weights(CFG)
    x = torch.randn(1, 6, 32)
    # 左填充 2 个：真实部分应等于单独跑那 4 个 token（位置从 0 开始）。
    mask = torch.tensor([[0, 0, 1, 1, 1, 1]])
    pos = torch.tensor([[0, 0, 0, 1, 2, 3]])
    padded = gqa_attention(x, attn, CFG, position_ids=pos, attention_mask=mask)
    alone = gqa_attention(x[:, 2:], attn, CFG)
    torch.testing.assert_close(padded[:, 2:], alone, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(padded).all()
    # 整体平移位置不改变结果（只依赖相对位置），拉伸间距则改变（RoPE 生效）：
    shifted = gqa_attention(x[:, 2:], attn, CFG, position_ids=torch.arange(4)[None] + 3)
    torch.testing.assert_close(shifted, alone, atol=1e-5, rtol=1e-5)
    stretched = gqa_attention(x[:, 2:], attn, CFG, position_ids=torch.arange(4)[None] * 3)
    assert not torch.allclose(stretched, alone, atol=1e-4)


def test_attention_is_causal():
    _, attn = _attn_weights(CFG)
    x = torch.randn(1, 8, 32)
    y = gqa_attention(x, attn, CFG)
    x2 = x.clone()
    x2[:, 5:] += torch.randn(1, 3, 32)
    y2 = gqa_attention(x2, attn, CFG)
    torch.testing.assert_close(y[:, :5], y2[:, :5])
    assert not torch.allclose(y[:, 5:], y2[:, 5:])


def test_attend_rejects_bad_head_layout():
    with pytest.raises(TypeCheckError):
        attend(torch.randn(1, 4, 3, 8), torch.randn(1, 2, 3, 6), torch.randn(1, 2, 3, 8))


def test_gqa_rejects_wrong_projection_shape():
    _, attn = _attn_weights(CFG)
    attn["q_proj.weight"] = torch.randn(32, 31)
    with pytest.raises(TypeCheckError, match="linear"):
        gqa_attention(torch.randn(1, 4, 32), attn, CFG)


# ---------------------------------------------------------------- SwiGLU
def test_swiglu_shape_and_formula():
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    gate, up, down = (torch.randn(s, dtype=torch.float64) for s in ((64, 32), (64, 32), (32, 64)))
    y = swiglu(x, gate, up, down)
    g = x @ gate.T
    expected = ((g * torch.sigmoid(g)) * (x @ up.T)) @ down.T
    assert y.shape == x.shape
    torch.testing.assert_close(y, expected)


def test_swiglu_rejects_mismatched_ffn_width():
    with pytest.raises(TypeCheckError, match="swiglu"):
        swiglu(torch.randn(2, 8), torch.randn(16, 8), torch.randn(15, 8), torch.randn(8, 16))


# ---------------------------------------------------------------- block
def _rope_for(x, cfg):
    return rope_tables(torch.arange(x.shape[1]).expand(x.shape[0], -1), cfg.head_dim, cfg.rope_theta)


def test_block_keeps_shape_and_changes_values():
    layer, _ = _attn_weights(CFG)
    x = torch.randn(2, 6, 32)
    y = transformer_block(x, layer, CFG, rope=_rope_for(x, CFG))
    assert y.shape == x.shape
    assert not torch.allclose(y, x)


def test_block_with_zero_weights_is_identity():
    layer, _ = _attn_weights(CFG)
    zero = {k: torch.zeros_like(v) for k, v in layer.items()}
    x = torch.randn(2, 6, 32)
    torch.testing.assert_close(transformer_block(x, zero, CFG, rope=_rope_for(x, CFG)), x)


def test_block_residual_carries_gradient():
    layer, _ = _attn_weights(CFG)
    zero = {k: torch.zeros_like(v) for k, v in layer.items()}
    x = torch.randn(1, 3, 32, requires_grad=True)
    transformer_block(x, zero, CFG, rope=_rope_for(x, CFG)).sum().backward()
    torch.testing.assert_close(x.grad, torch.ones_like(x))


def test_block_with_a_cache_slot_equals_the_block_without_and_returns_its_keys():
    # 同一个块：把 t 个 token 写进 S = t + 3 个槽位的空缓存（只前 t 个是真实 token），输出与不带缓存时相同，
    # 返回的槽在前 t 个槽位存着 RoPE 之后的键与值，其余槽位不动；输入的缓存不被修改。
    layer, _ = _attn_weights(CFG)
    x = torch.randn(2, 5, 32)
    rope = _rope_for(x, CFG)
    empty = torch.zeros(2, CFG.num_kv_heads, 8, CFG.head_dim)
    slots = torch.arange(5)
    filled = torch.zeros(2, 8, dtype=torch.bool).index_fill(1, slots, True)
    mask = cache_attention_mask(filled, slots)
    y, kv = transformer_block(x, layer, CFG, rope=rope, mask=mask, kv=KVSlot(empty, empty.clone(), slots))
    torch.testing.assert_close(y, transformer_block(x, layer, CFG, rope=rope), atol=1e-5, rtol=1e-5)
    assert isinstance(kv, KVSlot) and kv.k.shape == empty.shape and torch.equal(kv.slots, slots)
    assert not empty.any() and not kv.k[:, :, 5:].any() and not kv.v[:, :, 5:].any()
    normed = rms_norm(x, layer["input_layernorm.weight"], CFG.norm_eps)
    v = F.linear(normed, layer["self_attn.v_proj.weight"], layer["self_attn.v_proj.bias"])
    v = rearrange(v, "b t (k e) -> b k t e", e=CFG.head_dim)
    torch.testing.assert_close(kv.v[:, :, :5], v)


def test_attention_over_a_cache_needs_its_mask():
    layer, attn = _attn_weights(CFG)
    x = torch.randn(1, 1, 32)
    empty = torch.zeros(1, CFG.num_kv_heads, 4, CFG.head_dim)
    with pytest.raises(ValueError, match="cache needs its prebuilt mask"):
        gqa_attention(x, attn, CFG, kv=KVSlot(empty, empty, torch.tensor([0])))


# ---------------------------------------------------------------- 解码步的流式矩阵-向量乘
@pytest.mark.parametrize("rows", [1, 3])
def test_streaming_linear_equals_torch_linear(rows):
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 1, 48, generator=gen)
    w = torch.randn(80, 48, generator=gen)
    b = torch.randn(80, generator=gen)
    torch.testing.assert_close(streaming_linear(x, w), F.linear(x, w), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(streaming_linear(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-5)


def test_streaming_linear_accumulates_bf16_in_float32():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 256, generator=gen).bfloat16()
    w = torch.randn(64, 256, generator=gen).bfloat16()
    out = streaming_linear(x, w)
    assert out.dtype == torch.bfloat16
    # float32 累加后只在最后舍入一次：与 float64 参考之差不超过 bf16 的半个最低位（相对 2⁻⁸）
    exact = x.double() @ w.double().T
    assert ((out.double() - exact).abs() <= exact.abs() * 2**-8 + 1e-6).all()


def _compiled_code(fn, *args):
    from torch._inductor.utils import run_and_get_code

    out, code = run_and_get_code(torch.compile(fn, fullgraph=True, dynamic=False), *args)
    return out, "\n".join(code)


def test_compiled_linear_streams_few_rows_and_keeps_gemm_for_many():
    """编译时：行数 ≤ STREAMING_MAX_ROWS 的 linear 不再调用 GEMM（融合成一次读权重的循环），结果不变；
    行数更多时仍是 GEMM。"""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(96, 64, generator=gen)
    b = torch.randn(96, generator=gen)
    few = torch.randn(STREAMING_MAX_ROWS, 64, generator=gen)
    many = torch.randn(STREAMING_MAX_ROWS + 1, 64, generator=gen)
    torch._dynamo.reset()
    out, code = _compiled_code(lambda x: linear(torch.tanh(x), w, b), few)
    torch.testing.assert_close(out, F.linear(torch.tanh(few), w, b), rtol=1e-5, atol=1e-5)
    assert "extern_kernels.mm" not in code and "extern_kernels.addmm" not in code
    out, code = _compiled_code(lambda x: linear(torch.tanh(x), w, b), many)
    torch.testing.assert_close(out, F.linear(torch.tanh(many), w, b), rtol=1e-5, atol=1e-5)
    assert "extern_kernels.addmm" in code or "extern_kernels.mm" in code


def test_fusion_barrier_is_identity_with_identity_gradient():
    x = torch.randn(3, 5, requires_grad=True)
    y = fusion_barrier(x)
    assert torch.equal(y, x) and y.data_ptr() != x.data_ptr()  # 值相同、是新的一块内存
    (y * torch.arange(5.0)).sum().backward()
    assert torch.equal(x.grad, torch.arange(5.0).expand(3, 5))


def test_compiled_streaming_linear_gradients_match_eager():
    """少行 linear 在编译下走流式求和（含 fusion_barrier）：对输入、权重、偏置的梯度与 eager 的 F.linear 相同。"""
    gen = torch.Generator().manual_seed(1)
    x0, w0, b0 = torch.randn(3, 40, generator=gen), torch.randn(24, 40, generator=gen), torch.randn(24, generator=gen)

    def loss(fn, x, w, b):
        return (fn(torch.sin(x), w, b) ** 2).sum()

    eager = [t.clone().requires_grad_() for t in (x0, w0, b0)]
    loss(F.linear, *eager).backward()
    compiled = [t.clone().requires_grad_() for t in (x0, w0, b0)]
    torch.compile(lambda *a: loss(linear, *a), fullgraph=True)(*compiled).backward()
    for got, want in zip(compiled, eager):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-5, atol=1e-5)
