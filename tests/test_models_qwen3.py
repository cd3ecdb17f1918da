"""Qwen3 稠密家族（``Qwen3ForCausalLM``）：与 transformers 逐位一致、梯度一致、生成一致、缓存一致、读写往返。

检查点都由 transformers 现场构造（``Qwen3Config`` 的极小尺寸），范数权重随机化（QK-norm 的权重若为 1，
漏掉它的实现也会碰巧对上）；几种不寻常的设置：不共享的输出头、head_dim ≠ hidden / heads、共享嵌入。
"""

import json

import pytest
import torch
from safetensors import safe_open

from conftest import needs
from functional_lm.config import ModelConfig, get_preset
from functional_lm.generate import generate
from functional_lm.hf import config_from_hf, load_pretrained, save_pretrained
from functional_lm.models.cache import init_cache
from functional_lm.models.decoder import count_parameters, forward, init_params, param_shapes

transformers = needs("transformers")

SHAPES = {
    # Qwen3-0.6B 的形状：共享嵌入，head_dim 128 ≠ 1024 / 16（这里 24 ≠ 64 / 4）
    "qwen3-0.6b": dict(head_dim=24, tie_word_embeddings=True),
    # Qwen3-8B 的形状：不共享输出头，head_dim = hidden / heads
    "qwen3-8b": dict(head_dim=16, tie_word_embeddings=False),
    # 查询头 = 键值头（无 GQA），不共享
    "mha": dict(num_key_value_heads=4, head_dim=8, tie_word_embeddings=False),
}


def _hf_config(**overrides):
    base = dict(
        vocab_size=173, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=256, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6}, tie_word_embeddings=False,
    )
    return transformers.Qwen3Config(**(base | overrides))


def _hf_model(path=None, dtype=torch.float32, seed=0, **overrides):
    """随机的 transformers Qwen3；范数权重（含 q_norm / k_norm）取 N(1, 0.1²)，让它们真正参与比较。"""
    torch.manual_seed(seed)
    model = transformers.Qwen3ForCausalLM(_hf_config(**overrides)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    model = model.to(dtype)
    if path is not None:
        model.save_pretrained(path)
    return model


def _ids(vocab, b=2, t=9, seed=0):
    return torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_logits_equal_transformers_float32(tmp_path, shape):
    model = _hf_model(tmp_path, **SHAPES[shape])
    cfg, params = load_pretrained(tmp_path)
    assert cfg.family == "qwen3" and cfg.qk_norm and not cfg.qkv_bias
    assert cfg.head_dim == SHAPES[shape]["head_dim"]
    ids = _ids(cfg.vocab_size)
    with torch.no_grad():
        theirs = model(ids).logits
    ours = forward(params, ids, cfg)
    assert torch.equal(theirs, ours), f"max abs difference {(theirs - ours).abs().max():.3e}"


def test_padded_batch_equals_transformers(tmp_path):
    model = _hf_model(tmp_path, head_dim=24)
    cfg, params = load_pretrained(tmp_path)
    ids = _ids(cfg.vocab_size)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # 第 0 行左填充 3 个
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # 我们的缺省位置：左填充行从第一个真实 token 数起
    with torch.no_grad():
        theirs = model(ids, attention_mask=mask, position_ids=positions).logits
    ours = forward(params, ids, cfg, attention_mask=mask)
    real = mask.bool()
    # 真实位置逐位相同；填充位置的输出无人使用（两边对整行被遮的处理不同）
    assert torch.equal(theirs[real], ours[real]), f"{(theirs[real] - ours[real]).abs().max():.3e}"


def test_bfloat16_is_close_to_transformers(tmp_path):
    model = _hf_model(tmp_path, dtype=torch.bfloat16, head_dim=24)
    cfg, params = load_pretrained(tmp_path)
    assert params["model.embed_tokens.weight"].dtype == torch.bfloat16
    ids = _ids(cfg.vocab_size)
    with torch.no_grad():
        theirs = model(ids).logits.float()
    ours = forward(params, ids, cfg).float()
    # bf16 下两边的运算顺序相同，但 SDPA 的 bf16 内核可能按块累加：容差取 bf16 的几个 ulp（logit 量级 ~1）
    assert (theirs - ours).abs().max() <= 2e-2


def test_gradients_equal_transformers(tmp_path):
    model = _hf_model(tmp_path, head_dim=24).train()
    cfg, params = load_pretrained(tmp_path)
    params = {k: v.requires_grad_(True) for k, v in params.items()}
    ids = _ids(cfg.vocab_size)
    model(ids).logits.square().mean().backward()
    forward(params, ids, cfg).square().mean().backward()
    theirs = dict(model.named_parameters())
    assert {"model.layers.0.self_attn.q_norm.weight", "model.layers.0.self_attn.k_norm.weight"} <= set(params)
    for key, value in params.items():
        assert torch.equal(value.grad, theirs[key].grad), f"{key}: {(value.grad - theirs[key].grad).abs().max():.3e}"


def test_greedy_generate_equals_transformers(tmp_path):
    model = _hf_model(tmp_path, head_dim=24)
    cfg, params = load_pretrained(tmp_path)
    prompt = _ids(cfg.vocab_size, b=2, t=5, seed=3)
    with torch.no_grad():
        theirs = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    ours = generate(params, cfg, prompt, max_new_tokens=12, temperature=0.0)
    assert torch.equal(theirs, ours)


def test_cached_decode_equals_the_full_forward():
    cfg = ModelConfig(family="qwen3", qkv_bias=False, attention_head_dim=24, hidden_size=64, num_layers=2, num_heads=4,
                      num_kv_heads=2, intermediate_size=96, vocab_size=97, max_seq_len=64)
    params = init_params(cfg, seed=1)
    for key in params:
        if key.endswith("norm.weight"):
            params[key] = params[key] + 0.1 * torch.randn(params[key].shape, generator=torch.Generator().manual_seed(2))
    ids = _ids(cfg.vocab_size, t=10)
    full = forward(params, ids, cfg)
    cache = init_cache(cfg, batch_size=2, max_len=16)
    logits, cache = forward(params, ids[:, :6], cfg, cache=cache)
    steps = [logits]
    for i in range(6, 10):
        step, cache = forward(params, ids[:, i : i + 1], cfg, cache=cache)
        steps.append(step)
    assert cache.k.shape == (2, 2, 2, 16, 24)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)  # 缓存上的注意力按 S 个槽位求和


def test_round_trip_is_bit_identical_and_transformers_loads_it(tmp_path):
    _hf_model(tmp_path / "hf", head_dim=24)
    cfg, params = load_pretrained(tmp_path / "hf")
    save_pretrained(params, cfg, tmp_path / "ours")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours")
    assert type(again).__name__ == "Qwen3ForCausalLM"
    again.save_pretrained(tmp_path / "again")
    cfg2, params2 = load_pretrained(tmp_path / "again")
    assert cfg2 == cfg
    with safe_open(tmp_path / "ours" / "model.safetensors", "pt") as a, safe_open(tmp_path / "again" / "model.safetensors", "pt") as b:
        assert sorted(a.keys()) == sorted(b.keys())
        for key in a.keys():
            assert torch.equal(a.get_tensor(key), b.get_tensor(key)), key
    ids = _ids(cfg.vocab_size)
    with torch.no_grad():
        assert torch.equal(again(ids).logits, forward(params, ids, cfg))


def test_functional_call_on_transformers_module(tmp_path):
    model = _hf_model(tmp_path, head_dim=24)
    cfg, params = load_pretrained(tmp_path)
    ids = _ids(cfg.vocab_size)
    with torch.no_grad():
        theirs = torch.func.functional_call(model, params, (ids,)).logits
    assert torch.equal(theirs, forward(params, ids, cfg))


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"attention_bias": True}, "attention_bias"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e6, "factor": 2.0}}, "rope_type"),
    ],
)
def test_refuses_what_would_compute_something_else(tmp_path, changes, field):
    _hf_model(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text()) | changes
    with pytest.raises(ValueError) as err:
        config_from_hf(data, source="x/config.json")
    message = str(err.value)
    assert "x/config.json" in message and field in message and "\n" not in message


def test_config_refuses_a_head_dim_on_qwen2_and_bias_on_qwen3():
    with pytest.raises(ValueError, match="attention_head_dim needs family 'qwen3'"):
        ModelConfig(attention_head_dim=24)
    with pytest.raises(ValueError, match="family 'qwen3' has no q/k/v bias"):
        ModelConfig(family="qwen3")


def test_init_params_keys_follow_transformers():
    cfg = get_preset("student-qwen3-123m")
    ours = set(param_shapes(cfg))
    hf = transformers.Qwen3Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim, tie_word_embeddings=cfg.tie_word_embeddings,
    )
    with torch.device("meta"):
        model = transformers.Qwen3ForCausalLM(hf)
    theirs = {k for k in model.state_dict() if k != "lm_head.weight" or not cfg.tie_word_embeddings}
    assert ours == theirs
    assert {k: tuple(v.shape) for k, v in model.state_dict().items() if k in ours} == param_shapes(cfg)


def test_qwen3_student_preset_has_the_expected_size():
    # Qwen2.5 式学生 123,426,304 − 12 层 × (512 + 128 + 128) 个 q/k/v 偏置 + 12 层 × 2 × 64 个 QK-norm 权重
    cfg = get_preset("student-qwen3-123m")
    assert count_parameters(init_params(cfg, dtype=torch.bfloat16)) == 123_426_304 - 12 * 768 + 12 * 128 == 123_418_624
    assert get_preset("student-123m") == ModelConfig()  # 缺省仍是 Qwen2.5 式学生


def _small_qwen3():
    cfg = ModelConfig(family="qwen3", qkv_bias=False, attention_head_dim=12, hidden_size=32, num_layers=2, num_heads=4,
                      num_kv_heads=2, intermediate_size=48, vocab_size=61, max_seq_len=32)
    params = init_params(cfg, seed=5)
    g = torch.Generator().manual_seed(6)
    return cfg, {k: v + 0.1 * torch.randn(v.shape, generator=g) if k.endswith("norm.weight") else v
                 for k, v in params.items()}


def test_packed_documents_equal_separate_forwards():
    # 独立的参照：两篇文档各自单独前向；打包在一行里、带 segment_ids 时每篇的 logits 必须与单独算的相同。
    cfg, params = _small_qwen3()
    a, b = _ids(cfg.vocab_size, b=1, t=5, seed=1), _ids(cfg.vocab_size, b=1, t=7, seed=2)
    packed = torch.cat([a, b], dim=1)
    segments = torch.tensor([[0] * 5 + [1] * 7])
    out = forward(params, packed, cfg, segment_ids=segments)
    torch.testing.assert_close(out[:, :5], forward(params, a, cfg), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[:, 5:], forward(params, b, cfg), rtol=1e-5, atol=1e-5)


def test_torch_func_grad_and_vmap_compose():
    cfg, params = _small_qwen3()
    ids = _ids(cfg.vocab_size, b=3, t=6)

    def loss(p, x):
        return forward(p, x, cfg).logsumexp(-1).mean()

    grads = torch.func.grad(loss)(params, ids)
    assert grads.keys() == params.keys() and grads["model.layers.0.self_attn.q_norm.weight"].abs().sum() > 0
    per_row = torch.func.vmap(lambda x: forward(params, x[None], cfg)[0])(ids)
    torch.testing.assert_close(per_row, forward(params, ids, cfg), rtol=1e-5, atol=1e-5)


def test_wrong_shapes_are_named_by_the_type_checker():
    from jaxtyping import TypeCheckError

    cfg, params = _small_qwen3()
    params["model.layers.1.self_attn.k_norm.weight"] = torch.ones(7)
    with pytest.raises(ValueError, match=r"model.layers.1.self_attn.k_norm.weight has shape \(7,\), expected \(12,\)"):
        forward(params, _ids(cfg.vocab_size), cfg)
    from functional_lm.layers import rms_norm

    with pytest.raises(TypeCheckError, match="rms_norm"):
        rms_norm(torch.ones(2, 3, 12), torch.ones(7), 1e-6)
