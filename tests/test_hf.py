"""Hugging Face Qwen2 检查点的读写：与 transformers 的逐位一致性、各种布局、以及清楚的拒绝。

所有检查点都由 transformers 现场构造（``Qwen2ForCausalLM(config).save_pretrained``），形状模仿真实模型
（Qwen2.5-0.5B 共享嵌入、Qwen2.5-7B 不共享且词表 152064、DeepSeek-R1-Distill-Qwen-1.5B 不共享且 θ=10000），
但隐藏维度极小，文件只有几 MB。
"""

import json
import os
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import needs
from conftest import tiny_config as _tiny_cfg
from functional_lm.hf import config_from_hf, load_pretrained, save_pretrained
from functional_lm.models.decoder import forward, init_params

transformers = needs("transformers")  # 用到时才导入


# ---------------------------------------------------------------- 与 transformers 版本相关的小工具
def _installed_major(package: str) -> int:
    """已安装版本的主版本号（未安装时为 0），不导入包本身。"""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return int(version(package).split(".")[0])
    except PackageNotFoundError:
        return 0


_TRANSFORMERS_MAJOR = _installed_major("transformers")


def _rope_kwargs(theta, scaling=None):
    """按 transformers 版本传 RoPE 设置：5.x 读 ``rope_parameters``；4.x 读顶层 ``rope_theta`` + ``rope_scaling``。

    4.x 不认识 ``rope_parameters``，会把它当作无关属性静默忽略（θ 退回缺省值），所以必须分开写。
    """
    if _TRANSFORMERS_MAJOR >= 5:
        return {"rope_parameters": {"rope_type": "default", "rope_theta": theta, **(scaling or {})}}
    return {"rope_theta": theta, "rope_scaling": scaling}


def _config_theta(config):
    """从 transformers 的配置对象读回 θ（5.x 在 rope_parameters 里，4.x 在顶层）。"""
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and "rope_theta" in params:
        return params["rope_theta"]
    return config.rope_theta


def _auto_dtype():
    """from_pretrained 按检查点自身 dtype 加载：5.x 的参数名是 dtype，4.x 是 torch_dtype（缺省还是 float32）。"""
    return {"dtype": "auto"} if _TRANSFORMERS_MAJOR >= 5 else {"torch_dtype": "auto"}


def _saved_dtype(config_json):
    """config.json 里记录的 dtype：5.x 写 ``dtype``，4.x 写 ``torch_dtype``。"""
    return config_json.get("dtype", config_json.get("torch_dtype"))


# ---------------------------------------------------------------- 构造检查点的工具
def _hf_config(rope_scaling=None, **overrides):
    base = dict(
        vocab_size=211, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6,
        tie_word_embeddings=True, attention_dropout=0.0,
    )
    base.update(overrides)
    theta = base.pop("rope_theta")
    config = transformers.Qwen2Config(**_rope_kwargs(theta, rope_scaling), **base)
    assert _config_theta(config) == theta, "transformers ignored the RoPE θ we passed"
    return config


def _hf_checkpoint(path, dtype=torch.float32, seed=0, **overrides):
    """构造一个随机的 transformers Qwen2 检查点并保存；偏置与范数权重也随机化，让它们真正参与比较。"""
    torch.manual_seed(seed)
    model = transformers.Qwen2ForCausalLM(_hf_config(**overrides)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0.0, 0.1)
            elif name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    model = model.to(dtype)
    model.save_pretrained(path)
    return model


def _ids(vocab, b=2, t=7, seed=0):
    return torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(seed))


def _max_diff(a, b):
    return (a.float() - b.float()).abs().max().item()


def _assert_bit_identical(theirs, ours, what="logits"):
    """README 承诺 float32 eager 下与 transformers 逐位一致：torch.equal，失败时报告最大差。"""
    assert theirs.dtype == ours.dtype == torch.float32
    assert theirs.shape == ours.shape
    assert torch.equal(theirs, ours), f"{what}: max abs difference {_max_diff(theirs, ours):.3e}"


def _rewrite_config(path, **changes):
    cfg_file = Path(path) / "config.json"
    data = json.loads(cfg_file.read_text())
    for key, value in changes.items():
        if value is _DELETE:
            data.pop(key, None)
        else:
            data[key] = value
    cfg_file.write_text(json.dumps(data))


_DELETE = object()


def _rewrite_weights(path, edit):
    file = Path(path) / "model.safetensors"
    with safe_open(file, framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


# ---------------------------------------------------------------- 与 transformers 的一致性
SHAPES = {
    # Qwen2.5-0.5B：共享嵌入，词表 151936，θ = 1e6
    "qwen2.5-0.5b": dict(vocab_size=151936, hidden_size=16, tie_word_embeddings=True, rope_theta=1e6),
    # Qwen2.5-7B：不共享，词表 152064
    "qwen2.5-7b": dict(vocab_size=152064, hidden_size=16, tie_word_embeddings=False, rope_theta=1e6),
    # DeepSeek-R1-Distill-Qwen-1.5B：不共享，θ = 10000，131072 个位置，滑窗字段存在但关闭
    "r1-distill-1.5b": dict(
        vocab_size=151936, hidden_size=16, tie_word_embeddings=False, rope_theta=10000.0,
        max_position_embeddings=131072, use_sliding_window=False, sliding_window=4096, max_window_layers=21,
    ),
}


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_logits_match_transformers_float32(tmp_path, shape):
    model = _hf_checkpoint(tmp_path, **SHAPES[shape])
    cfg, params = load_pretrained(tmp_path)
    assert cfg.vocab_size == SHAPES[shape]["vocab_size"]
    assert cfg.tie_word_embeddings == SHAPES[shape]["tie_word_embeddings"]
    assert cfg.rope_theta == SHAPES[shape]["rope_theta"]
    assert cfg.qkv_bias and cfg.num_layers == 2 and cfg.num_kv_heads == 2
    assert ("lm_head.weight" in params) == (not cfg.tie_word_embeddings)
    assert all(v.dtype == torch.float32 for v in params.values())
    ids = _ids(cfg.vocab_size)
    with torch.no_grad():
        theirs = model(ids).logits
    _assert_bit_identical(theirs, forward(params, ids, cfg), shape)


def test_bfloat16_checkpoint_loads_as_bfloat16_and_matches(tmp_path):
    model = _hf_checkpoint(tmp_path, dtype=torch.bfloat16)
    assert _saved_dtype(json.loads((tmp_path / "config.json").read_text())) == "bfloat16"
    cfg, params = load_pretrained(tmp_path)
    assert {v.dtype for v in params.values()} == {torch.bfloat16}
    ids = _ids(cfg.vocab_size)
    with torch.no_grad():
        theirs = model(ids).logits
    ours = forward(params, ids, cfg)
    assert ours.dtype == torch.bfloat16
    assert _max_diff(theirs, ours) <= 2e-2
    # 显式要求 float32：按张量转换，数值就是 bf16 值的精确放大。
    _, params32 = load_pretrained(tmp_path, dtype=torch.float32)
    assert {v.dtype for v in params32.values()} == {torch.float32}
    assert torch.equal(params32["model.norm.weight"], params["model.norm.weight"].float())


def test_older_config_layout_with_top_level_rope_theta(tmp_path):
    model = _hf_checkpoint(tmp_path, rope_theta=12345.0, tie_word_embeddings=False)
    # 真实的旧版 Qwen2.5 config.json：rope_theta 在顶层，torch_dtype，rope_scaling 为 null，还有滑窗字段。
    _rewrite_config(
        tmp_path, rope_parameters=_DELETE, dtype=_DELETE, layer_types=_DELETE, rope_theta=12345.0,
        torch_dtype="float32", rope_scaling=None, use_sliding_window=False, sliding_window=32768,
        max_window_layers=21, transformers_version="4.43.1",
    )
    cfg, params = load_pretrained(tmp_path)
    assert cfg.rope_theta == 12345.0
    ids = _ids(cfg.vocab_size)
    with torch.no_grad():
        theirs = model(ids).logits
    _assert_bit_identical(theirs, forward(params, ids, cfg))


def test_config_mapping_fields():
    cfg = config_from_hf(
        {
            "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 152064,
            "hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 3, "num_attention_heads": 8,
            "num_key_value_heads": 2, "max_position_embeddings": 131072, "rope_theta": 1e6,
            "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "attention_dropout": 0.1, "hidden_act": "silu",
            "head_dim": 8,
        }
    )
    assert cfg.vocab_size == 152064 and cfg.hidden_size == 64 and cfg.intermediate_size == 160
    assert cfg.num_layers == 3 and cfg.num_heads == 8 and cfg.num_kv_heads == 2
    assert cfg.max_seq_len == 131072 and cfg.rope_theta == 1e6 and cfg.norm_eps == 1e-5
    assert cfg.tie_word_embeddings is False and cfg.dropout == 0.1 and cfg.qkv_bias is True
    # num_key_value_heads 缺省时与 transformers 一样等于查询头数
    cfg2 = config_from_hf({"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                           "num_attention_heads": 4, "vocab_size": 50})
    assert cfg2.num_kv_heads == 4


# ---------------------------------------------------------------- 往返与 transformers 读取我们的输出
def test_round_trip_is_bit_identical_and_transformers_loads_it(tmp_path):
    _hf_checkpoint(tmp_path / "src", tie_word_embeddings=False, rope_theta=10000.0)
    cfg, params = load_pretrained(tmp_path / "src")
    save_pretrained(params, cfg, tmp_path / "out")
    cfg2, params2 = load_pretrained(tmp_path / "out")
    assert cfg2 == cfg
    assert params2.keys() == params.keys()
    for key in params:
        assert params2[key].dtype == params[key].dtype
        assert torch.equal(params2[key], params[key]), key
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = _ids(cfg.vocab_size)
    with torch.no_grad():
        theirs = model(ids).logits
    _assert_bit_identical(theirs, forward(params, ids, cfg))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_our_params_tied_is_loaded_by_transformers(tmp_path, dtype):
    cfg = _tiny_cfg()
    params = {k: v.to(dtype) for k, v in init_params(cfg, seed=3).items()}
    save_pretrained(params, cfg, tmp_path)
    with safe_open(tmp_path / "model.safetensors", framework="pt") as f:
        keys = set(f.keys())
    assert "lm_head.weight" not in keys  # 共享嵌入只存一份
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, **_auto_dtype()).eval()
    assert model.dtype == dtype
    ids = _ids(cfg.vocab_size)
    with torch.no_grad():
        theirs = model(ids).logits
    if dtype == torch.float32:
        _assert_bit_identical(theirs, forward(params, ids, cfg))
    else:  # README 只承诺 float32 逐位一致；bf16 给 bf16 量级的容差
        assert _max_diff(theirs, forward(params, ids, cfg)) <= 2e-2
    cfg2, params2 = load_pretrained(tmp_path)
    assert cfg2 == cfg and all(torch.equal(params2[k], params[k]) for k in params)


def test_bias_free_config_is_saved_with_zero_biases_and_reloads_bias_free(tmp_path):
    cfg = _tiny_cfg(qkv_bias=False, tie_word_embeddings=False)
    params = init_params(cfg, seed=4)
    save_pretrained(params, cfg, tmp_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(model.model.layers[0].self_attn.q_proj.bias, torch.zeros(cfg.hidden_size))
    ids = _ids(cfg.vocab_size)
    with torch.no_grad():
        theirs = model(ids).logits
    _assert_bit_identical(theirs, forward(params, ids, cfg))
    cfg2, params2 = load_pretrained(tmp_path)
    assert cfg2 == cfg and params2.keys() == params.keys()


def test_sharded_save_and_load(tmp_path):
    cfg = _tiny_cfg(tie_word_embeddings=False)
    params = init_params(cfg, seed=5)
    save_pretrained(params, cfg, tmp_path, max_shard_size=40_000)
    shards = sorted(p.name for p in tmp_path.glob("model-*.safetensors"))
    assert len(shards) >= 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(params)
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in params.values())
    assert not (tmp_path / "model.safetensors").exists()
    cfg2, params2 = load_pretrained(tmp_path)
    assert cfg2 == cfg and all(torch.equal(params2[k], params[k]) for k in params)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = _ids(cfg.vocab_size)
    with torch.no_grad():
        _assert_bit_identical(model(ids).logits, forward(params, ids, cfg))


def test_save_copies_tokenizer_files(tmp_path):
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    (tok_dir / "tokenizer.json").write_text('{"fake": true}')
    (tok_dir / "tokenizer_config.json").write_text('{"eos_token": "<|endoftext|>"}')
    (tok_dir / "unrelated.txt").write_text("x")
    cfg = _tiny_cfg()
    save_pretrained(init_params(cfg), cfg, tmp_path / "out", tokenizer=tok_dir)
    assert (tmp_path / "out" / "tokenizer.json").read_text() == '{"fake": true}'
    assert (tmp_path / "out" / "tokenizer_config.json").exists()
    assert not (tmp_path / "out" / "unrelated.txt").exists()
    with pytest.raises(ValueError, match="no tokenizer files"):
        save_pretrained(init_params(cfg), cfg, tmp_path / "out2", tokenizer=tmp_path / "out2_missing")


def test_tied_checkpoint_with_stored_lm_head(tmp_path):
    _hf_checkpoint(tmp_path)
    _rewrite_weights(tmp_path, lambda t: t.__setitem__("lm_head.weight", t["model.embed_tokens.weight"].clone()))
    cfg, params = load_pretrained(tmp_path)
    assert cfg.tie_word_embeddings and "lm_head.weight" not in params
    # 不相等的 lm_head：拒绝，并点名键
    _rewrite_weights(tmp_path, lambda t: t["lm_head.weight"].add_(1.0))
    with pytest.raises(ValueError, match=r"lm_head\.weight.*model\.safetensors|model\.safetensors.*lm_head\.weight"):
        load_pretrained(tmp_path)


# ---------------------------------------------------------------- 原子写入
def test_interrupted_save_leaves_no_half_checkpoint(tmp_path, monkeypatch):
    import functional_lm.hf as hf

    cfg = _tiny_cfg(tie_word_embeddings=False)
    old = init_params(cfg, seed=1)
    save_pretrained(old, cfg, tmp_path / "ckpt")
    calls = {"n": 0}
    real_write = hf._write_shard

    def failing_write(tensors, file):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("simulated crash")
        real_write(tensors, file)

    monkeypatch.setattr(hf, "_write_shard", failing_write)
    new = init_params(cfg, seed=2)
    with pytest.raises(KeyboardInterrupt):
        save_pretrained(new, cfg, tmp_path / "ckpt", max_shard_size=40_000)
    with pytest.raises(KeyboardInterrupt):
        calls["n"] = 0
        save_pretrained(new, cfg, tmp_path / "fresh", max_shard_size=40_000)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # 没有临时目录残留，也没有半个 fresh
    _, params = load_pretrained(tmp_path / "ckpt")  # 旧检查点完好
    assert all(torch.equal(params[k], old[k]) for k in old)
    monkeypatch.setattr(hf, "_write_shard", real_write)
    save_pretrained(new, cfg, tmp_path / "ckpt")  # 覆盖已有检查点
    _, params = load_pretrained(tmp_path / "ckpt")
    assert all(torch.equal(params[k], new[k]) for k in new)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_save_refuses_mismatched_params(tmp_path):
    cfg = _tiny_cfg()
    params = init_params(cfg)
    params["model.norm.weight"] = torch.ones(3)
    with pytest.raises(ValueError, match=r"model\.norm\.weight"):
        save_pretrained(params, cfg, tmp_path / "x")
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------- 拒绝
@pytest.fixture
def ckpt(tmp_path):
    _hf_checkpoint(tmp_path, tie_word_embeddings=False)
    return tmp_path


def test_refuses_other_architecture(ckpt):
    _rewrite_config(ckpt, architectures=["LlamaForCausalLM"], model_type="llama")
    with pytest.raises(ValueError, match=r"config\.json.*LlamaForCausalLM.*Qwen2ForCausalLM"):
        load_pretrained(ckpt)


def test_refuses_missing_key(ckpt):
    _rewrite_weights(ckpt, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"missing.*model\.layers\.1\.mlp\.up_proj\.weight"):
        load_pretrained(ckpt)


def test_refuses_extra_key(ckpt):
    _rewrite_weights(ckpt, lambda t: t.__setitem__("model.layers.0.mystery.weight", torch.zeros(2)))
    with pytest.raises(ValueError, match=r"model\.safetensors.*model\.layers\.0\.mystery\.weight"):
        load_pretrained(ckpt)


def test_refuses_shape_that_disagrees_with_config(ckpt):
    _rewrite_config(ckpt, intermediate_size=48)
    with pytest.raises(ValueError, match=r"model\.safetensors.*mlp\.\w+_proj\.weight.*\(64, 32\).*48"):
        load_pretrained(ckpt)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_refuses_corrupted_safetensors(ckpt, damage):
    file = ckpt / "model.safetensors"
    raw = file.read_bytes()
    if damage == "truncate":
        file.write_bytes(raw[: len(raw) // 2])
    else:
        file.write_bytes(b"\x20\x00\x00\x00\x00\x00\x00\x00" + b"{not json at all, definitely}xx" + raw[40:])
    with pytest.raises(ValueError, match=r"model\.safetensors"):
        load_pretrained(ckpt)


def test_refuses_invalid_config(ckpt):
    _rewrite_config(ckpt, num_attention_heads=5)
    with pytest.raises(ValueError, match=r"config\.json.*num_heads"):
        load_pretrained(ckpt)


@pytest.mark.parametrize(
    "changes, field",
    [
        (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}), r"rope_type 'yarn'"),
        (dict(rope_parameters={"rope_type": "dynamic", "rope_theta": 1e6, "factor": 1.0}), r"rope_type 'dynamic'"),
        (dict(rope_parameters={"rope_type": "linear", "rope_theta": 1e6, "factor": 2.0}), r"linear.*factor 2\.0"),
        (dict(rope_parameters={"rope_type": "linear", "rope_theta": 1e6}), r"linear.*factor None"),
        # 旧布局：顶层 rope_theta + rope_scaling
        (dict(rope_parameters=_DELETE, rope_theta=1e6, rope_scaling={"type": "linear", "factor": 4.0}),
         r"linear.*factor 4\.0"),
        (dict(hidden_act="gelu"), r"hidden_act 'gelu'"),
        (dict(use_sliding_window=True, sliding_window=0, max_window_layers=0), r"sliding_window must be a positive"),
    ],
)
def test_refuses_configs_that_would_compute_something_else(ckpt, changes, field):
    _rewrite_config(ckpt, **changes)
    with pytest.raises(ValueError, match=r"config\.json.*" + field):
        load_pretrained(ckpt)


# ---------------------------------------------------------------- 能跑就接受：与 transformers 逐位一致
def test_swish_is_silu(tmp_path):
    model = _hf_checkpoint(tmp_path, hidden_act="swish")
    assert json.loads((tmp_path / "config.json").read_text())["hidden_act"] == "swish"
    cfg, params = load_pretrained(tmp_path)
    ids = _ids(cfg.vocab_size)
    with torch.no_grad():
        theirs = model(ids).logits
    _assert_bit_identical(theirs, forward(params, ids, cfg))


def _rope_blocks(config_json):
    """config.json 里所有 RoPE 设置块（新布局 rope_parameters、旧布局 rope_scaling）。"""
    return [b for b in (config_json.get("rope_parameters"), config_json.get("rope_scaling")) if b]


@pytest.mark.parametrize("factor", [1.0, 1])
def test_linear_rope_with_factor_one_matches_transformers(tmp_path, factor):
    model = _hf_checkpoint(tmp_path, rope_theta=5e5, rope_scaling={"rope_type": "linear", "factor": factor})
    saved = json.loads((tmp_path / "config.json").read_text())
    assert any(b.get("rope_type", b.get("type")) == "linear" for b in _rope_blocks(saved))  # 真的写进了检查点
    cfg, params = load_pretrained(tmp_path)
    assert cfg.rope_theta == 5e5
    ids = _ids(cfg.vocab_size, t=20)  # 位置越多，错误的缩放越容易显出来
    with torch.no_grad():
        theirs = model(ids).logits
    _assert_bit_identical(theirs, forward(params, ids, cfg))


def test_linear_rope_with_factor_one_in_the_older_layout(tmp_path):
    _hf_checkpoint(tmp_path, rope_theta=5e5)
    _rewrite_config(tmp_path, rope_parameters=_DELETE, rope_theta=5e5, rope_scaling={"type": "linear", "factor": 1.0})
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()  # transformers 读同一个 config.json
    cfg, params = load_pretrained(tmp_path)
    assert cfg.rope_theta == 5e5
    ids = _ids(cfg.vocab_size, t=20)
    with torch.no_grad():
        theirs = model(ids).logits
    _assert_bit_identical(theirs, forward(params, ids, cfg))


WINDOW = 5


def _sliding_checkpoint(path):
    """第 1 层（max_window_layers=1 之后的层）用宽 WINDOW 的滑窗；sdpa 与 eager 在 transformers 5 中都实现滑窗。"""
    return _hf_checkpoint(
        path, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1, max_position_embeddings=64,
        attn_implementation="sdpa",
    )


def test_sliding_window_checkpoint_loads_limited_to_the_window(tmp_path):
    model = _sliding_checkpoint(tmp_path)
    with pytest.warns(UserWarning, match=rf"sliding_window={WINDOW}\).*limited to {WINDOW} tokens"):
        cfg, params = load_pretrained(tmp_path)
    assert cfg.max_seq_len == WINDOW
    ids = _ids(cfg.vocab_size, t=WINDOW)
    with torch.no_grad():
        theirs = model(ids).logits
    _assert_bit_identical(theirs, forward(params, ids, cfg))
    with pytest.raises(ValueError, match=rf"sequence length {WINDOW + 1} exceeds ModelConfig\.max_seq_len={WINDOW}"):
        forward(params, _ids(cfg.vocab_size, t=WINDOW + 1), cfg)


@pytest.mark.skipif(_TRANSFORMERS_MAJOR < 5, reason="transformers 4.x 的 sdpa 路径忽略滑窗（4.45.2 实测），无从对照")
def test_sliding_window_starts_to_differ_one_token_past_the_limit(tmp_path):
    # 钉住边界：transformers 的滑窗在长度 WINDOW + 1 时才与全因果注意力不同，所以 max_seq_len = WINDOW 恰好。
    model = _sliding_checkpoint(tmp_path)
    with pytest.warns(UserWarning):
        cfg, params = load_pretrained(tmp_path)
    ids = _ids(cfg.vocab_size, t=WINDOW + 1)
    full = forward(params, ids, cfg.replace(max_seq_len=WINDOW + 1))  # 解除限制后的全因果注意力
    with torch.no_grad():
        theirs = model(ids).logits
    _assert_bit_identical(theirs[:, :WINDOW], full[:, :WINDOW], "positions inside the window")
    assert _max_diff(theirs[:, WINDOW], full[:, WINDOW]) > 1e-3


def test_sliding_window_layers_follow_transformers_rules():
    base = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=50,
                max_position_embeddings=4096, use_sliding_window=True, sliding_window=1024)
    with pytest.warns(UserWarning, match="limited to 1024 tokens"):
        assert config_from_hf(dict(base, max_window_layers=1)).max_seq_len == 1024  # 第 1 层用滑窗
    with pytest.warns(UserWarning, match="limited to 1024 tokens"):  # layer_types 优先于 max_window_layers
        layer_types = ["full_attention", "sliding_attention"]
        assert config_from_hf(dict(base, max_window_layers=2, layer_types=layer_types)).max_seq_len == 1024
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 下面这些都等价于全注意力：不限制、不警告
        assert config_from_hf(dict(base, max_window_layers=2)).max_seq_len == 4096  # 没有层用滑窗
        assert config_from_hf(dict(base, max_window_layers=0, use_sliding_window=False)).max_seq_len == 4096
        assert config_from_hf(dict(base, max_window_layers=0, sliding_window=4096)).max_seq_len == 4096


def test_refuses_missing_config_field(ckpt):
    _rewrite_config(ckpt, hidden_size=_DELETE)
    with pytest.raises(ValueError, match=r"config\.json.*hidden_size"):
        load_pretrained(ckpt)


def test_never_unpickles_a_checkpoint(tmp_path, monkeypatch):
    _hf_checkpoint(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle bytes")

    def no_torch_load(*args, **kwargs):
        raise AssertionError("torch.load must never be called")

    monkeypatch.setattr(torch, "load", no_torch_load)
    with pytest.raises(ValueError, match=r"pytorch_model\.bin.*safetensors"):
        load_pretrained(tmp_path)


def test_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing"):
        load_pretrained(tmp_path / "nothing" / "here" / "at-all")


def test_sharded_index_pointing_at_missing_key(tmp_path):
    cfg = _tiny_cfg()
    save_pretrained(init_params(cfg), cfg, tmp_path, max_shard_size=40_000)
    index_file = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    num_shards = len(set(index["weight_map"].values()))
    index["weight_map"]["model.norm.weight"] = f"model-00001-of-{num_shards:05d}.safetensors"  # 实际在最后一片
    index_file.write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"model-00001-of-\d+\.safetensors.*model\.norm\.weight"):
        load_pretrained(tmp_path)


def test_device_argument(tmp_path):
    _hf_checkpoint(tmp_path)
    _, params = load_pretrained(tmp_path, device="cpu", dtype=torch.float64)
    assert all(v.device.type == "cpu" and v.dtype == torch.float64 for v in params.values())
    assert os.path.isdir(tmp_path)


def test_gradients_match_transformers_bit_for_bit(tmp_path):
    # 无掩码的因果注意力两边都用 SDPA 的 enable_gqa（不复制 k、v）：反向里 g 个查询头对同一个键值头的
    # 贡献在内核里按同样的顺序求和，所以连梯度也逐位相同；若一边先复制 k、v 再求和，k/v 投影的梯度会差在舍入量级。
    model = _hf_checkpoint(tmp_path).train()
    cfg, params = load_pretrained(tmp_path)
    params = {k: v.requires_grad_(True) for k, v in params.items()}
    ids = _ids(cfg.vocab_size)
    model(ids).logits.square().mean().backward()
    forward(params, ids, cfg).square().mean().backward()
    theirs = dict(model.named_parameters())
    for key, value in params.items():
        assert torch.equal(value.grad, theirs[key].grad), key
