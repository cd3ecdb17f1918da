"""DeepSeek-V3 家族（``DeepseekV3ForCausalLM``）：MLA + DeepSeekMoE + YaRN，与 transformers 逐位一致；
MLA 的缓存只存潜变量与 RoPE 键，缓存解码等于完整前向，贪心生成与 transformers 相同，读写往返，拒绝。

检查点由 transformers 现场构造（极小的 DeepseekV3Config）：范数权重 N(1, 0.1²)，路由器放大，修正偏置非零。
"""

import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import needs
from functional_lm.config import ModelConfig, YarnScaling
from functional_lm.generate import generate
from functional_lm.hf import config_from_hf, load_pretrained, save_pretrained
from functional_lm.layers.rope import yarn_tables
from functional_lm.models.cache import cache_bytes_per_token, init_cache
from functional_lm.models.decoder import forward

transformers = needs("transformers")

YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32,
        "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}
SETTINGS = {
    # DeepSeek-V3 的形状缩小：q LoRA，第 0 层稠密，8 个专家分 2 组、只在 1 组里选，共享专家，交错的 RoPE
    "v3": dict(),
    # q_lora_rank = None（DeepSeek-V2-Lite 式的直接 q 投影），共享嵌入
    "no-q-lora": dict(q_lora_rank=None, tie_word_embeddings=True),
    # YaRN ×4 与 mscale_all_dim（softmax 缩放乘 mscale²），4 组选 2 组，不归一
    "yarn": dict(rope_parameters=YARN, n_group=4, topk_group=2, norm_topk_prob=False),
    # 不交错的 RoPE，两层都是 MoE，两个共享专家
    "plain-rope": dict(rope_interleave=False, first_k_dense_replace=0, n_shared_experts=2),
}


def _hf_config(**overrides):
    base = dict(
        vocab_size=97, hidden_size=48, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2, n_group=2,
        topk_group=1, first_k_dense_replace=1, n_shared_experts=1, q_lora_rank=24, kv_lora_rank=16,
        qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=12, max_position_embeddings=128, routed_scaling_factor=2.5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=False,
    )
    return transformers.DeepseekV3Config(**(base | overrides))


def _hf_model(path=None, dtype=torch.float32, seed=0, **overrides):
    torch.manual_seed(seed)
    model = transformers.DeepseekV3ForCausalLM(_hf_config(**overrides)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "layernorm.weight")):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith("mlp.gate.weight"):
                p.normal_(0.0, 0.5)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0.0, 0.3)
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
    assert cfg.family == "deepseek_v3" and cfg.uses_mla
    ids = _ids(cfg.vocab_size)
    with torch.no_grad():
        theirs = model(ids).logits
    assert torch.equal(theirs, forward(params, ids, cfg)), setting


def test_padded_batch_and_packed_documents(tmp_path):
    model = _hf_model(tmp_path)
    cfg, params = load_pretrained(tmp_path)
    ids = _ids(cfg.vocab_size)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        theirs = model(ids, attention_mask=mask, position_ids=positions).logits
    ours = forward(params, ids, cfg, attention_mask=mask)
    real = mask.bool()
    torch.testing.assert_close(ours[real], theirs[real], rtol=1e-5, atol=1e-6)  # 带掩码时两边 SDPA 的内核不同
    a, b = ids[:1, :4], ids[:1, 4:]
    packed = forward(params, ids[:1], cfg, segment_ids=torch.tensor([[0] * 4 + [1] * 5]))
    torch.testing.assert_close(packed[:, 4:], forward(params, b, cfg), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed[:, :4], forward(params, a, cfg), rtol=1e-5, atol=1e-5)


def test_bfloat16_is_close_to_transformers(tmp_path):
    model = _hf_model(tmp_path, dtype=torch.bfloat16)
    cfg, params = load_pretrained(tmp_path)
    ids = _ids(cfg.vocab_size)
    with torch.no_grad():
        theirs = model(ids).logits.float()
    # bf16：路由器在 float32 中（两边相同），其余在 bf16 中按同样的顺序计算；SDPA 的 bf16 内核按块累加
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
        if key.endswith("e_score_correction_bias"):
            assert value.grad is None or not value.grad.any()  # 只参与选择（topk），没有梯度
            continue
        # 专家的梯度在 transformers 的 grouped_mm 反向里按组累加，求和顺序与我们逐专家的不同
        torch.testing.assert_close(value.grad, theirs[key].grad, rtol=1e-5, atol=1e-7, msg=key)


def test_yarn_tables_equal_transformers_rope_init():
    hf = _hf_config(rope_parameters=YARN)
    rotary = transformers.models.deepseek_v3.modeling_deepseek_v3.DeepseekV3RotaryEmbedding(hf)
    positions = torch.arange(100)[None]
    theirs = rotary(torch.zeros(1, dtype=torch.float32), positions)
    scaling = YarnScaling(factor=4.0, original_max_position_embeddings=32, mscale=1.0, mscale_all_dim=1.0)
    ours = yarn_tables(positions, 4, 10000.0, scaling)
    assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])
    # 独立的参照：r = 4 时两对维度；i(β) = r·ln(L₀/(2πβ))/(2 ln θ) 给出斜坡 [0, 1]（取整后），ω_0 在外推端、ω_1 在插值端
    omega = 1.0 / 10000.0 ** (torch.arange(0, 4, 2).float() / 4)
    low = math.floor(4 * math.log(32 / (32 * 2 * math.pi)) / (2 * math.log(10000.0)))
    assert low == -1 or low == 0
    expected = torch.stack([omega[0], omega[1] / 4.0])
    torch.testing.assert_close(ours[0][0, 7, :2], (7 * expected).cos(), rtol=1e-6, atol=1e-6)


def test_greedy_generate_equals_transformers(tmp_path):
    model = _hf_model(tmp_path, **SETTINGS["yarn"])
    cfg, params = load_pretrained(tmp_path)
    prompt = _ids(cfg.vocab_size, b=2, t=5, seed=3) + 1  # 不含 pad id 0
    with torch.no_grad():
        theirs = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=10, do_sample=False,
                                eos_token_id=None, pad_token_id=0)
    assert torch.equal(theirs, generate(params, cfg, prompt, max_new_tokens=10, temperature=0.0))


def test_the_mla_cache_holds_the_latent_and_decodes_like_the_full_forward(tmp_path):
    _hf_model(tmp_path)
    cfg, params = load_pretrained(tmp_path)
    ids = _ids(cfg.vocab_size, t=10)
    full = forward(params, ids, cfg)
    cache = init_cache(cfg, batch_size=2, max_len=12)
    assert cache.k.shape == (3, 2, 1, 12, 16) and cache.v.shape == (3, 2, 1, 12, 4)  # 潜变量 c = 16，RoPE 键 r = 4
    logits, cache = forward(params, ids[:, :4], cfg, cache=cache)
    steps = [logits]
    for i in range(4, 10):
        step, cache = forward(params, ids[:, i : i + 1], cfg, cache=cache)
        steps.append(step)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)  # 缓存上的注意力按 S 个槽位求和


def test_cache_bytes_per_token():
    # DeepSeek-V3 的真实尺寸：61 层，128 头，c = 512，r = 64，e = 192，ev = 128
    cfg = ModelConfig(family="deepseek_v3", qkv_bias=False, hidden_size=7168, num_layers=61, num_heads=128,
                      num_kv_heads=128, intermediate_size=18432, vocab_size=129280, kv_lora_rank=512,
                      qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, q_lora_rank=1536, num_experts=256,
                      num_experts_per_tok=8, moe_intermediate_size=2048, n_group=8, topk_group=4, n_shared_experts=1,
                      first_k_dense_replace=3)
    sizes = cache_bytes_per_token(cfg, torch.bfloat16)
    assert sizes["cache"] == 61 * (512 + 64) * 2 == 70_272
    assert sizes["per_head_kv"] == 61 * 128 * (192 + 128) * 2 == 4_997_120  # 约 71 倍
    gqa = ModelConfig()
    assert cache_bytes_per_token(gqa, torch.float32) == {"cache": 12 * 2 * 2 * 64 * 4, "per_head_kv": 12 * 2 * 2 * 64 * 4}


def test_round_trip_is_bit_identical_and_transformers_loads_it(tmp_path):
    _hf_model(tmp_path / "hf", **SETTINGS["yarn"])
    cfg, params = load_pretrained(tmp_path / "hf")
    assert cfg.rope_scaling == YarnScaling(factor=4.0, original_max_position_embeddings=32, mscale=1.0,
                                           mscale_all_dim=1.0)
    save_pretrained(params, cfg, tmp_path / "ours")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours")
    assert type(again).__name__ == "DeepseekV3ForCausalLM"
    again.save_pretrained(tmp_path / "again")
    assert load_pretrained(tmp_path / "again")[0] == cfg
    with safe_open(tmp_path / "ours" / "model.safetensors", "pt") as a, safe_open(tmp_path / "again" / "model.safetensors", "pt") as b:
        assert sorted(a.keys()) == sorted(b.keys())
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())
    ids = _ids(cfg.vocab_size)
    with torch.no_grad():
        # transformers 读回的权重是 safetensors 映射里未按 64 字节对齐的切片，CPU 矩阵乘内核对不齐的
        # 指针走另一条累加路径（末位差 ~1e-8）；拷贝成对齐的张量后才是逐位可比的同一计算。
        for p in again.parameters():
            p.data = p.data.clone()
        assert torch.equal(again(ids).logits, forward(params, ids, cfg))


def test_multi_token_prediction_layers_are_skipped_with_a_note(tmp_path):
    _hf_model(tmp_path)
    cfg, params = load_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors |= {k.replace("model.layers.2.", "model.layers.3."): v.clone() for k, v in tensors.items()
                if k.startswith("model.layers.2.")}  # 发布的检查点在第 num_hidden_layers 层放一个 MTP 层
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    data = json.loads((tmp_path / "config.json").read_text()) | {"num_nextn_predict_layers": 1}
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.warns(UserWarning, match="multi-token-prediction layer"):
        cfg2, params2 = load_pretrained(tmp_path)
    assert params2.keys() == params.keys()


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"quantization_config": {"quant_method": "fp8"}}, "quantization_config"),
        ({"attention_bias": True}, "attention_bias"),
        ({"topk_method": "greedy"}, "topk_method"),
        ({"scoring_func": "softmax"}, "scoring_func"),
        ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4, "factor": 2.0}}, "rope_type"),
        ({"kv_lora_rank": None}, "kv_lora_rank"),
    ],
)
def test_refuses_configs_by_field(tmp_path, changes, field):
    _hf_model(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text()) | changes
    with pytest.raises(ValueError) as err:
        config_from_hf(data, source="x/config.json")
    assert "x/config.json" in str(err.value) and field in str(err.value) and "\n" not in str(err.value)


def test_functional_call_on_transformers_module(tmp_path):
    model = _hf_model(tmp_path)
    cfg, params = load_pretrained(tmp_path)
    ids = _ids(cfg.vocab_size)
    with torch.no_grad():
        assert torch.equal(torch.func.functional_call(model, params, (ids,)).logits, forward(params, ids, cfg))


def test_qwen3_with_yarn_equals_transformers(tmp_path):
    torch.manual_seed(0)
    rope = {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0, "original_max_position_embeddings": 32}
    hf = transformers.Qwen3Config(vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=128,
                                  rope_parameters=rope)
    model = transformers.Qwen3ForCausalLM(hf).eval()
    model.save_pretrained(tmp_path)
    cfg, params = load_pretrained(tmp_path)
    assert cfg.rope_scaling.factor == 4.0
    ids = _ids(cfg.vocab_size, t=60)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, forward(params, ids, cfg))
