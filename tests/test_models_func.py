"""torch.func 组合与 Hugging Face Qwen2 参照实现的一致性。"""

import pytest
import torch
import torch.nn.functional as F

from conftest import needs, tiny_config
from functional_lm import forward, init_params

transformers = needs("transformers")  # 用到时才导入

CFG = tiny_config()


def _ids(b=3, t=9, seed=0, cfg=CFG):
    return torch.randint(0, cfg.vocab_size, (b, t), generator=torch.Generator().manual_seed(seed))


def _randomize_biases(params, seed=1):
    """init 的偏置是 0；比较时换成非零随机值，让偏置路径真正参与。"""
    gen = torch.Generator().manual_seed(seed)
    out = dict(params)
    for key, value in params.items():
        if key.endswith(".bias"):
            out[key] = torch.randn(value.shape, generator=gen) * 0.05
        elif key.endswith("norm.weight"):
            out[key] = 1.0 + torch.randn(value.shape, generator=gen) * 0.1
    return out


def _next_token_loss(params, ids, cfg=CFG):
    logits = forward(params, ids, cfg)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


# ---------------------------------------------------------------- grad / vmap / jvp
def test_grad_and_value_matches_autograd():
    params = init_params(CFG)
    ids = _ids()
    grads, value = torch.func.grad_and_value(_next_token_loss)(params, ids)
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    ref = _next_token_loss(leaves, ids)
    ref.backward()
    torch.testing.assert_close(value, ref.detach())
    assert set(grads) == set(params)
    for key in params:
        torch.testing.assert_close(grads[key], leaves[key].grad, atol=1e-6, rtol=1e-5)


def test_vmap_grad_gives_per_example_gradients():
    params = init_params(CFG)
    ids = _ids(b=3, t=7)

    def single_loss(p, one_ids):
        return _next_token_loss(p, one_ids[None])

    per_example = torch.func.vmap(torch.func.grad(single_loss), in_dims=(None, 0))(params, ids)
    for i in range(ids.shape[0]):
        loop = torch.func.grad(single_loss)(params, ids[i])
        for key in ("model.embed_tokens.weight", "model.layers.1.self_attn.q_proj.bias", "model.norm.weight"):
            torch.testing.assert_close(per_example[key][i], loop[key], atol=1e-6, rtol=1e-5)
    # 每个样本的梯度互不相同（确实是逐样本的）。
    emb = per_example["model.embed_tokens.weight"]
    assert not torch.allclose(emb[0], emb[1])


def test_jvp_through_the_model_matches_finite_difference():
    params = {k: v.double() for k, v in init_params(CFG).items()}
    ids = _ids(b=1, t=6)
    tangent = {k: torch.randn_like(v) for k, v in params.items()}
    _, jvp_out = torch.func.jvp(lambda p: forward(p, ids, CFG), (params,), (tangent,))
    eps = 1e-6
    plus = forward({k: v + eps * tangent[k] for k, v in params.items()}, ids, CFG)
    minus = forward({k: v - eps * tangent[k] for k, v in params.items()}, ids, CFG)
    torch.testing.assert_close(jvp_out, (plus - minus) / (2 * eps), atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------- transformers parity
def _hf_model(cfg):
    hf_cfg = transformers.Qwen2Config(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_seq_len,
        rope_theta=cfg.rope_theta,
        rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_word_embeddings,
        attention_dropout=0.0,
    )
    return transformers.Qwen2ForCausalLM(hf_cfg).eval()


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_functional_call_on_transformers_qwen2_matches_forward(tied, bias):
    cfg = CFG.replace(tie_word_embeddings=tied, qkv_bias=bias)
    params = _randomize_biases(init_params(cfg, seed=5))
    model = _hf_model(cfg)
    hf_params = dict(params)
    if not bias:
        # HF 的 Qwen2 总带 q/k/v 偏置：无偏置配置等价于偏置恒为 0。
        for name, value in model.named_parameters():
            if name.endswith(".bias"):
                hf_params[name] = torch.zeros_like(value)
    ids = _ids()
    with torch.no_grad():
        theirs = torch.func.functional_call(model, hf_params, (ids,)).logits
        ours = forward(params, ids, cfg)
    diff = (theirs - ours).abs().max().item()
    assert diff <= 1e-5, f"max abs difference {diff:.3e}"


def test_functional_call_uses_our_dict_unchanged():
    # 同一个字典、不做任何改名 / 转置：键集合恰好是 HF 模块的参数名（共享的 lm_head 只出现一次）。
    params = _randomize_biases(init_params(CFG, seed=2))
    model = _hf_model(CFG)
    assert set(params) == {name for name, _ in model.named_parameters()}
    assert all(params[n].shape == p.shape for n, p in model.named_parameters())
    ids = _ids()
    with torch.no_grad():
        out = torch.func.functional_call(model, params, (ids,), tie_weights=True).logits
    assert (out - forward(params, ids, CFG)).abs().max().item() <= 1e-5


def test_parity_with_llama_without_bias():
    # 另一个独立参照：Llama（attention_bias=False）在结构上就是无 q/k/v 偏置的 Qwen2。
    cfg = CFG.replace(qkv_bias=False, tie_word_embeddings=False)
    params = _randomize_biases(init_params(cfg, seed=7))
    llama_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_seq_len, rope_theta=cfg.rope_theta, rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
    )
    model = transformers.LlamaForCausalLM(llama_cfg).eval()
    assert set(params) == {name for name, _ in model.named_parameters()}
    ids = _ids()
    with torch.no_grad():
        theirs = torch.func.functional_call(model, params, (ids,)).logits
    assert (theirs - forward(params, ids, cfg)).abs().max().item() <= 1e-5


def test_parity_with_padding_mask_and_bfloat16():
    params = _randomize_biases(init_params(CFG, seed=9))
    model = _hf_model(CFG)
    ids = _ids(b=2, t=8)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # 第一条左填充 3 个
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        theirs = torch.func.functional_call(
            model, params, (ids,), {"attention_mask": mask, "position_ids": positions}
        ).logits
    ours = forward(params, ids, CFG, attention_mask=mask)
    real = mask.bool()
    assert (theirs - ours)[real].abs().max().item() <= 1e-5

    bf16 = {k: v.bfloat16() for k, v in params.items()}
    model_bf16 = model.to(torch.bfloat16)
    with torch.no_grad():
        theirs16 = torch.func.functional_call(model_bf16, bf16, (ids,)).logits.float()
    ours16 = forward(bf16, ids, CFG).float()
    assert (theirs16 - ours16).abs().max().item() <= 2e-2
