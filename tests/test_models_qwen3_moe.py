"""Qwen3-MoE 家族（``Qwen3MoeForCausalLM``）：与 transformers 逐位一致（logits、梯度、生成），缓存解码、读写往返、
发布的逐专家键布局、拒绝。检查点由 transformers 现场构造（极小的 Qwen3MoeConfig），范数权重随机化。"""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import needs
from functional_lm.config import ModelConfig
from functional_lm.generate import generate
from functional_lm.hf import config_from_hf, load_pretrained, save_pretrained
from functional_lm.layers.moe import load_balancing_loss
from functional_lm.models.cache import init_cache
from functional_lm.models.decoder import forward, param_shapes
from functional_lm.models.routing import router_logits

transformers = needs("transformers")

SETTINGS = {
    # Qwen3-30B-A3B 的形状缩小：每层都是 MoE，权重重新归一，不共享输出头，head_dim ≠ hidden / heads
    "30b-a3b": dict(norm_topk_prob=True, head_dim=12, tie_word_embeddings=False),
    # 第 0 层稠密（mlp_only_layers），之后隔层 MoE（decoder_sparse_step = 2），不归一，共享嵌入
    "sparse-step": dict(num_hidden_layers=4, mlp_only_layers=[0], decoder_sparse_step=2, norm_topk_prob=False,
                        tie_word_embeddings=True),
    # top-1 路由
    "top-1": dict(num_experts_per_tok=1, num_experts=4),
}


def _hf_config(**overrides):
    base = dict(
        vocab_size=131, hidden_size=48, intermediate_size=80, moe_intermediate_size=24, num_experts=8,
        num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=12,
        max_position_embeddings=128, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        tie_word_embeddings=False,
    )
    return transformers.Qwen3MoeConfig(**(base | overrides))


def _hf_model(path=None, dtype=torch.float32, seed=0, **overrides):
    """随机的 transformers Qwen3-MoE；范数权重 N(1, 0.1²)，路由器权重放大，让各 token 选到不同的专家。"""
    torch.manual_seed(seed)
    model = transformers.Qwen3MoeForCausalLM(_hf_config(**overrides)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith("mlp.gate.weight"):
                p.normal_(0.0, 0.5)
    model = model.to(dtype)
    if path is not None:
        model.save_pretrained(path)
    return model


def _ids(vocab, b=2, t=9, seed=0):
    return torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_logits_equal_transformers_float32(tmp_path, setting):
    model = _hf_model(tmp_path, **SETTINGS[setting])
    cfg, params = load_pretrained(tmp_path)
    assert cfg.family == "qwen3_moe"
    moe_layers = [i for i in range(cfg.num_layers) if cfg.is_moe_layer(i)]
    assert moe_layers == [i for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "experts")]
    ids = _ids(cfg.vocab_size)
    with torch.no_grad():
        theirs = model(ids).logits
    assert torch.equal(theirs, forward(params, ids, cfg)), setting


def test_bfloat16_is_close_to_transformers(tmp_path):
    model = _hf_model(tmp_path, dtype=torch.bfloat16)
    cfg, params = load_pretrained(tmp_path)
    ids = _ids(cfg.vocab_size)
    with torch.no_grad():
        theirs = model(ids).logits.float()
    # bf16：路由可能在并列的概率上选出不同专家、SDPA 的 bf16 内核按块累加；实测差在 1e-2 以内
    assert (theirs - forward(params, ids, cfg).float()).abs().max() <= 3e-2


def test_gradients_match_transformers(tmp_path):
    model = _hf_model(tmp_path).train()
    cfg, params = load_pretrained(tmp_path)
    params = {k: v.requires_grad_(True) for k, v in params.items()}
    ids = _ids(cfg.vocab_size)
    model(ids).logits.square().mean().backward()
    forward(params, ids, cfg).square().mean().backward()
    theirs = dict(model.named_parameters())
    for key, value in params.items():
        # 专家权重的梯度在 transformers 的 grouped_mm 反向里按组累加（与我们逐专家的 g_eᵀ x_e 求和顺序不同）
        torch.testing.assert_close(value.grad, theirs[key].grad, rtol=1e-5, atol=1e-7, msg=key)


def test_torch_func_grad_through_the_experts_equals_transformers(tmp_path):
    model = _hf_model(tmp_path).train()
    cfg, params = load_pretrained(tmp_path)
    ids = _ids(cfg.vocab_size)
    model(ids).logits.square().mean().backward()
    grads = torch.func.grad(lambda p: forward(p, ids, cfg).square().mean())(params)  # 专家层的自定义反向也在其中
    theirs = dict(model.named_parameters())
    assert grads.keys() == params.keys()
    for key, value in grads.items():
        torch.testing.assert_close(value, theirs[key].grad, rtol=1e-5, atol=1e-7, msg=key)


def test_greedy_generate_equals_transformers(tmp_path):
    model = _hf_model(tmp_path)
    cfg, params = load_pretrained(tmp_path)
    prompt = _ids(cfg.vocab_size, b=2, t=5, seed=3)
    with torch.no_grad():
        theirs = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(theirs, generate(params, cfg, prompt, max_new_tokens=10, temperature=0.0))


def test_cached_decode_equals_the_full_forward(tmp_path):
    _hf_model(tmp_path, **SETTINGS["sparse-step"])
    cfg, params = load_pretrained(tmp_path)
    ids = _ids(cfg.vocab_size, t=10)
    full = forward(params, ids, cfg)
    cache = init_cache(cfg, batch_size=2, max_len=12)
    logits, cache = forward(params, ids[:, :4], cfg, cache=cache)
    steps = [logits]
    for i in range(4, 10):
        step, cache = forward(params, ids[:, i : i + 1], cfg, cache=cache)
        steps.append(step)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)  # 缓存上的注意力按 S 个槽位求和


def test_round_trip_is_bit_identical_and_transformers_loads_it(tmp_path):
    _hf_model(tmp_path / "hf", **SETTINGS["sparse-step"])
    cfg, params = load_pretrained(tmp_path / "hf")
    save_pretrained(params, cfg, tmp_path / "ours")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours")
    assert type(again).__name__ == "Qwen3MoeForCausalLM"
    again.save_pretrained(tmp_path / "again")
    assert load_pretrained(tmp_path / "again")[0] == cfg
    with safe_open(tmp_path / "ours" / "model.safetensors", "pt") as a, safe_open(tmp_path / "again" / "model.safetensors", "pt") as b:
        assert sorted(a.keys()) == sorted(b.keys())
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())
    ids = _ids(cfg.vocab_size)
    with torch.no_grad():
        assert torch.equal(again(ids).logits, forward(params, ids, cfg))


def _split_experts(path, cfg):
    """把融合的专家张量拆成发布检查点的逐专家键（mlp.experts.{j}.gate_proj / up_proj / down_proj）。"""
    file = path / "model.safetensors"
    with safe_open(file, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    f_width = cfg.moe_intermediate_size
    for key in [k for k in tensors if k.endswith("mlp.experts.gate_up_proj")]:
        prefix = key.removesuffix("gate_up_proj")
        gate_up, down = tensors.pop(key), tensors.pop(prefix + "down_proj")
        for j in range(cfg.num_experts):
            tensors[f"{prefix}{j}.gate_proj.weight"] = gate_up[j, :f_width].clone()
            tensors[f"{prefix}{j}.up_proj.weight"] = gate_up[j, f_width:].clone()
            tensors[f"{prefix}{j}.down_proj.weight"] = down[j].clone()
    save_file(tensors, file, metadata={"format": "pt"})
    return tensors


def test_published_per_expert_keys_load_into_the_same_params(tmp_path):
    _hf_model(tmp_path / "fused")
    cfg, fused = load_pretrained(tmp_path / "fused")
    save_pretrained(fused, cfg, tmp_path / "split")
    split = _split_experts(tmp_path / "split", cfg)
    assert "model.layers.0.mlp.experts.7.up_proj.weight" in split
    cfg2, params = load_pretrained(tmp_path / "split")
    assert cfg2 == cfg and params.keys() == fused.keys() == param_shapes(cfg).keys()
    assert all(torch.equal(params[k], fused[k]) for k in params)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "split")  # transformers 也这样合并
    ids = _ids(cfg.vocab_size)
    with torch.no_grad():
        assert torch.equal(theirs(ids).logits, forward(params, ids, cfg))


def test_a_missing_expert_is_named(tmp_path):
    _hf_model(tmp_path / "fused")
    cfg, fused = load_pretrained(tmp_path / "fused")
    save_pretrained(fused, cfg, tmp_path / "split")
    tensors = _split_experts(tmp_path / "split", cfg)
    del tensors["model.layers.1.mlp.experts.5.down_proj.weight"]
    save_file(tensors, tmp_path / "split" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError) as err:
        load_pretrained(tmp_path / "split")
    message = str(err.value)
    assert "model.safetensors" in message and "model.layers.1.mlp.experts.5.down_proj.weight" in message
    assert "num_experts=8" in message and "\n" not in message


def test_functional_call_on_transformers_module(tmp_path):
    model = _hf_model(tmp_path)
    cfg, params = load_pretrained(tmp_path)
    ids = _ids(cfg.vocab_size)
    with torch.no_grad():
        assert torch.equal(torch.func.functional_call(model, params, (ids,)).logits, forward(params, ids, cfg))


def test_router_logits_give_transformers_aux_loss(tmp_path):
    model = _hf_model(tmp_path, **SETTINGS["sparse-step"])
    cfg, params = load_pretrained(tmp_path)
    ids = _ids(cfg.vocab_size)
    with torch.no_grad():
        out = model(ids, output_router_logits=True)
    logits, routers = router_logits(params, ids, cfg)
    assert torch.equal(logits, out.logits)
    assert len(routers) == len(out.router_logits) == 2  # 只有 MoE 层（第 1、3 层）有路由器
    for ours, theirs in zip(routers, out.router_logits):
        assert torch.equal(ours, theirs)
    aux = load_balancing_loss(routers, cfg.num_experts, cfg.num_experts_per_tok)
    torch.testing.assert_close(aux, out.aux_loss, rtol=1e-6, atol=1e-7)  # transformers 的 aux_loss 未乘系数


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"attention_bias": True}, "attention_bias"),
        ({"num_experts_per_tok": 9}, "num_experts_per_tok"),
        ({"mlp_only_layers": [5]}, "mlp_only_layers"),
        ({"num_experts": None, "num_local_experts": None}, "num_experts"),
    ],
)
def test_refuses_configs_by_field(tmp_path, changes, field):
    _hf_model(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text()) | changes
    with pytest.raises(ValueError) as err:
        config_from_hf(data, source="x/config.json")
    assert "x/config.json" in str(err.value) and field in str(err.value) and "\n" not in str(err.value)


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="num_experts must be > 0 for family 'qwen3_moe'"):
        ModelConfig(family="qwen3_moe", qkv_bias=False)
    with pytest.raises(ValueError, match="num_experts=4 needs an MoE family"):
        ModelConfig(family="qwen3", qkv_bias=False, num_experts=4)
