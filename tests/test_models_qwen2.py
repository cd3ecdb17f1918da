"""模型级测试：形状、参数量、共享嵌入、因果性、输入校验、编译一致性。"""

import pytest
import torch
from jaxtyping import TypeCheckError

from conftest import dynamo_graph_count, fresh_dynamo, tiny_config
from functional_lm import ModelConfig, count_parameters, forward, forward_hidden, init_params
from functional_lm.models.cache import KVCache, init_cache
from functional_lm.models.decoder import check_params, decode_embeddings, output_weight, param_shapes
from functional_lm.shapes import typecheck, typecheck_enabled

CFG = tiny_config()


def _ids(cfg=CFG, b=2, t=10, seed=0):
    return torch.randint(0, cfg.vocab_size, (b, t), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- default config
def test_default_config_logits_shape_and_parameter_count():
    cfg = ModelConfig()
    params = init_params(cfg)
    # 嵌入 151936·512 + 12 层 × 3,802,880（含 q/k/v 偏置）+ 最终 norm 512。
    assert count_parameters(params) == 123_426_304
    assert abs(count_parameters(params) - 123e6) / 123e6 < 0.05
    ids = torch.randint(0, cfg.vocab_size, (2, 8))
    logits = forward(params, ids, cfg)
    assert logits.shape == (2, 8, 151936)
    assert torch.isfinite(logits).all()


def test_parameter_count_without_bias_and_untied():
    cfg = CFG.replace(qkv_bias=False, tie_word_embeddings=False)
    params = init_params(cfg)
    assert "lm_head.weight" in params
    assert count_parameters(params) == sum(torch.Size(s).numel() for s in param_shapes(cfg).values())


# ---------------------------------------------------------------- init
def test_init_params_keys_values_and_determinism():
    params = init_params(CFG, seed=3)
    assert set(params) == set(param_shapes(CFG))
    assert "lm_head.weight" not in params
    assert "model.layers.1.self_attn.q_proj.bias" in params
    assert "model.layers.0.self_attn.o_proj.bias" not in params
    assert torch.equal(params["model.layers.0.input_layernorm.weight"], torch.ones(64))
    assert torch.equal(params["model.layers.0.self_attn.k_proj.bias"], torch.zeros(32))
    emb = params["model.embed_tokens.weight"]
    assert abs(emb.std().item() - 0.02) < 0.002 and abs(emb.mean().item()) < 0.002
    again = init_params(CFG, seed=3)
    assert all(torch.equal(params[k], again[k]) for k in params)
    other = init_params(CFG, seed=4)
    assert not torch.equal(params["model.embed_tokens.weight"], other["model.embed_tokens.weight"])


def test_init_params_dtype():
    params = init_params(CFG, dtype=torch.bfloat16)
    assert all(v.dtype == torch.bfloat16 for v in params.values())
    assert forward(params, _ids(), CFG).dtype == torch.bfloat16


# ---------------------------------------------------------------- tied embeddings
def test_output_projection_is_the_embedding_tensor():
    params = init_params(CFG)
    assert output_weight(params, CFG) is params["model.embed_tokens.weight"]


def test_tied_embedding_gradient_gets_both_contributions():
    tied = init_params(CFG)
    untied_cfg = CFG.replace(tie_word_embeddings=False)
    untied = dict(tied)
    untied["lm_head.weight"] = tied["model.embed_tokens.weight"].clone()
    ids = _ids()

    def loss(p, cfg):
        return forward(p, ids, cfg).pow(2).mean()

    g_tied = torch.func.grad(loss)(tied, CFG)["model.embed_tokens.weight"]
    g_untied = torch.func.grad(loss)(untied, untied_cfg)
    both = g_untied["model.embed_tokens.weight"] + g_untied["lm_head.weight"]
    torch.testing.assert_close(g_tied, both)
    assert g_untied["model.embed_tokens.weight"].abs().sum() > 0 and g_untied["lm_head.weight"].abs().sum() > 0


# ---------------------------------------------------------------- causality
def test_causality_by_gradient():
    # 对输入嵌入求导：位置 t 的 logits 对 t 之后任何位置的嵌入梯度必须恰好为 0。
    params = init_params(CFG)
    x = torch.randn(1, 8, 64, requires_grad=True)
    positions = torch.arange(8)[None]

    def logits_from(x):
        hidden = decode_embeddings(params, x, CFG, position_ids=positions)
        return hidden @ params["model.embed_tokens.weight"].T

    for t in range(8):
        (grad,) = torch.autograd.grad(logits_from(x)[0, t].sum(), x)
        future = grad[0, t + 1 :]
        assert future.numel() == 0 or future.abs().max() == 0, f"position {t} sees the future"
        assert grad[0, : t + 1].abs().sum(-1).min() > 0, f"position {t} ignores some past token"


def test_causality_of_logits_on_token_changes():
    params = init_params(CFG)
    ids = _ids(b=1, t=12)
    changed = ids.clone()
    changed[0, 7:] = (changed[0, 7:] + 1) % CFG.vocab_size
    a, b = forward(params, ids, CFG), forward(params, changed, CFG)
    torch.testing.assert_close(a[:, :7], b[:, :7])
    assert not torch.allclose(a[:, 7:], b[:, 7:])


# ---------------------------------------------------------------- input validation
def test_token_ids_out_of_range_raise():
    params = init_params(CFG)
    with pytest.raises(ValueError, match=r"\[0, vocab_size=211\).*max 211"):
        forward(params, torch.tensor([[1, 2, 211]]), CFG)
    with pytest.raises(ValueError, match="min -1"):
        forward(params, torch.tensor([[1, -1, 2]]), CFG)


def test_too_long_sequence_raises():
    params = init_params(CFG)
    with pytest.raises(ValueError, match="sequence length 65 exceeds ModelConfig.max_seq_len=64"):
        forward(params, torch.zeros(1, 65, dtype=torch.long), CFG)


def test_non_integer_ids_raise():
    params = init_params(CFG)
    with pytest.raises(TypeCheckError, match="input_ids"):
        forward(params, torch.zeros(1, 4), CFG)
    with typecheck(False):
        with pytest.raises(ValueError, match="integer tensor"):
            forward(params, torch.zeros(1, 4), CFG)


def test_wrong_rank_ids_raise_naming_the_dimension():
    params = init_params(CFG)
    with pytest.raises(TypeCheckError, match="input_ids"):
        forward(params, torch.zeros(4, dtype=torch.long), CFG)


def test_params_missing_or_misshaped_key_raise():
    params = init_params(CFG)
    missing = {k: v for k, v in params.items() if k != "model.layers.1.mlp.up_proj.weight"}
    with pytest.raises(ValueError, match=r"missing keys \['model.layers.1.mlp.up_proj.weight'\]"):
        forward(missing, _ids(), CFG)
    bad = dict(params)
    bad["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(31, 64)
    with pytest.raises(ValueError, match=r"k_proj.weight has shape \(31, 64\), expected \(32, 64\)"):
        forward(bad, _ids(), CFG)
    extra = dict(params, **{"lm_head.weight": torch.zeros(211, 64)})
    with pytest.raises(ValueError, match="tie_word_embeddings=True"):
        check_params(extra, CFG)


def test_one_float64_param_among_float32_is_named():
    params = init_params(CFG)
    key = "model.layers.1.mlp.up_proj.weight"
    params[key] = params[key].double()
    with pytest.raises(ValueError) as info:
        forward(params, _ids(), CFG)
    message = str(info.value)
    assert f"{key} is torch.float64" in message and "most parameters are torch.float32" in message
    assert message.count("model.layers") == 1  # 只点名那一个键


def test_majority_dtype_wins_even_when_the_embedding_is_the_odd_one():
    params = init_params(CFG, dtype=torch.bfloat16)
    params["model.embed_tokens.weight"] = params["model.embed_tokens.weight"].float()
    expected = r"most parameters are torch\.bfloat16, but model\.embed_tokens\.weight is torch\.float32"
    with pytest.raises(ValueError, match=expected):
        check_params(params, CFG)


def test_param_on_another_device_is_named():
    params = init_params(CFG)
    params["model.norm.weight"] = params["model.norm.weight"].to("meta")
    with pytest.raises(ValueError, match=r"model\.embed_tokens\.weight is on cpu, but model\.norm\.weight is on meta"):
        check_params(params, CFG)
    check_params(init_params(CFG), CFG)  # 一致的字典不报错


def test_wrong_hidden_shape_raises_type_check_error_naming_dimension():
    from functional_lm.layers import rms_norm

    with pytest.raises(TypeCheckError) as info:
        rms_norm(torch.randn(2, 3, 64), torch.ones(32), 1e-6)
    message = str(info.value)
    assert message.startswith("functional_lm.layers.rms_norm: argument 'weight'")
    assert "f32[32]" in message and "d=64" in message


def test_typecheck_switch():
    from functional_lm.layers import rms_norm

    assert typecheck_enabled()
    with typecheck(False):
        assert not typecheck_enabled()
        # 关闭检查后，不匹配的形状会在 torch 内部以普通错误失败（或广播），不再是 TypeCheckError。
        with pytest.raises(RuntimeError):
            rms_norm(torch.randn(2, 3, 64), torch.ones(32), 1e-6)
    assert typecheck_enabled()


def test_env_var_disables_checking():
    import subprocess
    import sys

    import os

    code = "from functional_lm.shapes import typecheck_enabled; print(typecheck_enabled())"
    env = dict(os.environ, FUNCTIONAL_LM_TYPECHECK="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ---------------------------------------------------------------- padding & positions
def test_left_padding_matches_unpadded_sequence():
    params = init_params(CFG)
    ids = _ids(b=1, t=6)
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], dim=1)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1]])
    out = forward(params, padded, CFG, attention_mask=mask)
    torch.testing.assert_close(out[:, 3:], forward(params, ids, CFG), atol=1e-5, rtol=1e-5)


def test_forward_hidden_feeds_the_output_projection():
    params = init_params(CFG)
    ids = _ids()
    hidden = forward_hidden(params, ids, CFG)
    assert hidden.shape == (2, 10, 64)
    torch.testing.assert_close(hidden @ params["model.embed_tokens.weight"].T, forward(params, ids, CFG))


# ---------------------------------------------------------------- 缓存路径：forward(..., cache=) -> (logits, cache)
def test_forward_with_a_cache_in_chunks_equals_the_full_forward():
    # 一个前向，缓存可选：分三段（4 + 5 + 1 个 token）接着缓存写，每段的 logits 与一次完整前向的对应位置相同。
    params = init_params(CFG)
    ids = _ids(t=10)
    full = forward(params, ids, CFG)
    cache = init_cache(CFG, batch_size=2, max_len=12)
    pieces = []
    for start, stop in ((0, 4), (4, 9), (9, 10)):
        logits, cache = forward(params, ids[:, start:stop], CFG, cache=cache)
        assert isinstance(cache, KVCache) and int(cache.index) == stop
        pieces.append(logits)
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)
    assert cache.positions.tolist() == [10, 10] and cache.mask[:, :10].all() and not cache.mask[:, 10:].any()


def test_forward_with_a_cache_left_padded_and_its_errors():
    params = init_params(CFG)
    ids = _ids(b=1, t=6)
    padded = torch.cat([torch.zeros(1, 2, dtype=torch.long), ids], dim=1)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1]])
    hidden, cache = forward_hidden(params, padded, CFG, attention_mask=mask, cache=init_cache(CFG, 1, 8))
    torch.testing.assert_close(hidden[:, 2:], forward_hidden(params, ids, CFG), atol=1e-5, rtol=1e-5)
    assert cache.positions.tolist() == [6]
    with pytest.raises(ValueError, match="cache is full"):
        forward(params, ids[:, :1], CFG, cache=cache)
    with pytest.raises(ValueError, match="batch 2 != cache batch 1"):
        forward(params, _ids(b=2, t=2), CFG, cache=init_cache(CFG, 1, 8))
    with pytest.raises(ValueError, match="position_ids"):
        forward(params, ids, CFG, position_ids=torch.arange(6)[None], cache=init_cache(CFG, 1, 8))


# ---------------------------------------------------------------- compile
def test_compiled_forward_equals_eager_with_checking_on():
    fresh_dynamo()
    params = init_params(CFG)
    ids = _ids()
    assert typecheck_enabled()
    compiled = torch.compile(forward, fullgraph=True)
    torch.testing.assert_close(compiled(params, ids, CFG), forward(params, ids, CFG), atol=1e-5, rtol=1e-5)
    assert dynamo_graph_count() == 1  # 整个前向被捕获成一张图（fullgraph），而不是悄悄退回 eager
