"""KV 缓存生成的测试：缓存解码 = 完整前向，贪心 = transformers generate（含左填充批次），采样的性质与报错。"""

import pytest
import torch

from conftest import dynamo_graph_count, fresh_dynamo, needs, tiny_config
from functional_lm.generate import (
    KVCache,
    compiled_decode_step,
    decode_step,
    generate,
    generate_stream,
    init_cache,
    left_pad,
    logits_to_probs,
    prefill,
    sample,
)
from functional_lm.models.decoder import forward, init_params

transformers = needs("transformers")  # 用到时才导入

CFG = tiny_config()


def _params(cfg=CFG, seed=0, dtype=torch.float32, std_scale=5.0):
    """随机参数；矩阵放大 std_scale 倍让 logits 拉开，argmax 不会处在近似平局上。"""
    gen = torch.Generator().manual_seed(seed + 100)
    params = {}
    for key, value in init_params(cfg, seed=seed).items():
        if key.endswith(".bias"):
            value = torch.randn(value.shape, generator=gen) * 0.1
        elif not key.endswith("norm.weight"):
            value = value * std_scale
        params[key] = value.to(dtype)
    return params


def _ids(b, t, seed=0, cfg=CFG):
    return torch.randint(0, cfg.vocab_size, (b, t), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- 缓存解码 = 完整前向
def test_cached_decoding_equals_full_forward_at_every_step():
    params = _params()
    ids = _ids(2, 12, seed=1)
    prompt_len = 5
    cache = init_cache(CFG, batch_size=2, max_len=16)
    assert cache.k.shape == (CFG.num_layers, 2, CFG.num_kv_heads, 16, CFG.head_dim)
    logits, cache = prefill(params, CFG, ids[:, :prompt_len], cache)
    full = forward(params, ids, CFG)
    torch.testing.assert_close(logits, full[:, prompt_len - 1], atol=1e-5, rtol=1e-5)
    for pos in range(prompt_len, ids.shape[1]):
        logits, cache = decode_step(params, CFG, ids[:, pos], cache)
        assert int(cache.index) == pos + 1
        torch.testing.assert_close(logits, full[:, pos], atol=1e-5, rtol=1e-5)


def test_cached_decoding_with_left_padding_equals_unpadded_forward():
    params = _params()
    long, short = _ids(1, 9, seed=2)[0], _ids(1, 6, seed=3)[0]
    ids, mask = left_pad([long[:6].tolist(), short[:3].tolist()], pad_id=0)
    assert mask.tolist()[1] == [0, 0, 0, 1, 1, 1]
    cache = init_cache(CFG, batch_size=2, max_len=12)
    logits, cache = prefill(params, CFG, ids, cache, attention_mask=mask)
    refs = [forward(params, long[None], CFG)[0], forward(params, short[None], CFG)[0]]
    torch.testing.assert_close(logits[0], refs[0][5], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits[1], refs[1][2], atol=1e-5, rtol=1e-5)
    for step in range(3):
        token = torch.stack([long[6 + step], short[3 + step]])
        logits, cache = decode_step(params, CFG, token, cache)
        torch.testing.assert_close(logits[0], refs[0][6 + step], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(logits[1], refs[1][3 + step], atol=1e-5, rtol=1e-5)


def test_cache_is_data_in_data_out():
    # 纯函数：输入缓存不被修改，输出是一份新的缓存（同样的形状，静态）。
    params = _params()
    cache0 = init_cache(CFG, batch_size=1, max_len=8)
    _, cache1 = prefill(params, CFG, _ids(1, 3), cache0)
    k_before = cache1.k.clone()
    _, cache2 = decode_step(params, CFG, torch.tensor([4]), cache1)
    assert isinstance(cache2, KVCache) and cache2.k.shape == cache1.k.shape
    assert torch.equal(cache1.k, k_before) and int(cache1.index) == 3 and int(cache2.index) == 4
    assert not cache0.mask.any() and cache2.mask[0, :4].all() and not cache2.mask[0, 4:].any()
    assert cache2.positions.tolist() == [4]


def test_compiled_decode_step_matches_eager():
    fresh_dynamo()
    params = _params()
    # 形状（b=1，S=9）与下面 generate(compile=True) 的相同，编译结果被复用，测试更快
    cache = init_cache(CFG, batch_size=1, max_len=9)
    _, cache = prefill(params, CFG, _ids(1, 4), cache)
    step = compiled_decode_step()
    eager_cache, compiled_cache = cache, cache
    for token in ([3], [9], [0]):
        token = torch.tensor(token)
        eager_logits, eager_cache = decode_step(params, CFG, token, eager_cache)
        compiled_logits, compiled_cache = step(params, CFG, token, compiled_cache)
        torch.testing.assert_close(compiled_logits, eager_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(compiled_cache.k, eager_cache.k, atol=1e-5, rtol=1e-5)
    assert dynamo_graph_count() == 1  # 一张解码步的图，三步都复用它（没有重新追踪）


# ---------------------------------------------------------------- 与 transformers generate 逐 token 一致


def _hf_model(params, cfg):
    hf_cfg = transformers.Qwen2Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads, max_position_embeddings=cfg.max_seq_len,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta}, rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_word_embeddings,
    )
    model = transformers.Qwen2ForCausalLM(hf_cfg).to(next(iter(params.values())).dtype).eval()
    model.load_state_dict(params, strict=False)
    return model


def _hf_greedy(model, ids, mask, n, eos=None, pad=0):
    with torch.no_grad():
        return model.generate(
            ids, attention_mask=mask, do_sample=False, max_new_tokens=n, pad_token_id=pad,
            eos_token_id=eos, min_new_tokens=0,
        )


def test_greedy_equals_transformers_generate_single_prompt():
    params = _params(dtype=torch.float64)
    model = _hf_model(params, CFG)
    ids = _ids(1, 7, seed=4)
    theirs = _hf_greedy(model, ids, torch.ones_like(ids), 20)
    ours = generate(params, CFG, ids, max_new_tokens=20, temperature=0.0)
    assert ours.tolist() == theirs.tolist()
    assert ours.shape == (1, 27)


def test_greedy_equals_transformers_generate_batched_with_left_padding():
    params = _params(dtype=torch.float64, seed=1)
    model = _hf_model(params, CFG)
    prompts = [_ids(1, n, seed=10 + n)[0].tolist() for n in (8, 3, 5)]
    ids, mask = left_pad(prompts, pad_id=0)
    theirs = _hf_greedy(model, ids, mask, 16)
    ours = generate(params, CFG, prompts, max_new_tokens=16)
    assert ours.tolist() == theirs.tolist()
    # 每条的续写与单独生成完全相同（填充不影响结果）
    for row, prompt in enumerate(prompts):
        alone = generate(params, CFG, [prompt], max_new_tokens=16)
        assert ours[row, 8:].tolist() == alone[0, len(prompt):].tolist()


def test_stops_at_eos_like_transformers():
    params = _params(dtype=torch.float64, seed=2)
    model = _hf_model(params, CFG)
    prompts = [_ids(1, n, seed=20 + n)[0].tolist() for n in (6, 4)]
    pad = 1
    ids, mask = left_pad(prompts, pad_id=pad)
    free = generate(params, CFG, ids, attention_mask=mask, max_new_tokens=12)
    eos = int(free[0, 6 + 3])  # 第一条第 4 个新 token 当作 eos
    theirs = _hf_greedy(model, ids, mask, 12, eos=eos, pad=pad)
    ours = generate(params, CFG, ids, attention_mask=mask, max_new_tokens=12, eos_token_id=eos, pad_token_id=pad)
    assert ours.tolist() == theirs.tolist()
    new = ours[0, 6:].tolist()
    first = new.index(eos)
    assert first <= 3 and all(t == pad for t in new[first + 1 :])
    # 两行都遇到 eos（多个 eos id）：全部结束即提前停止，长度与 transformers 相同
    eos_ids = [int(free[0, 6 + 3]), int(free[1, 6 + 2])]
    theirs = _hf_greedy(model, ids, mask, 12, eos=eos_ids, pad=pad)
    ours = generate(params, CFG, ids, attention_mask=mask, max_new_tokens=12, eos_token_id=eos_ids, pad_token_id=pad)
    assert ours.shape[1] <= 6 + 4
    assert ours.tolist() == theirs.tolist()


# ---------------------------------------------------------------- 采样
def test_top_k_one_equals_greedy():
    params = _params(seed=3)
    ids = _ids(2, 5, seed=5)
    greedy = generate(params, CFG, ids, max_new_tokens=10)
    sampled = generate(params, CFG, ids, max_new_tokens=10, temperature=1.3, top_k=1, seed=123)
    assert sampled.tolist() == greedy.tolist()


def test_sampling_is_deterministic_for_a_seed_and_varies_with_it():
    params = _params(seed=4, std_scale=1.0)  # 较平的分布，采样确实随机
    ids = _ids(2, 4, seed=6)
    a = generate(params, CFG, ids, max_new_tokens=12, temperature=1.0, seed=7)
    b = generate(params, CFG, ids, max_new_tokens=12, temperature=1.0, seed=7)
    c = generate(params, CFG, ids, max_new_tokens=12, temperature=1.0, seed=8)
    assert a.tolist() == b.tolist()
    assert a.tolist() != c.tolist()


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.125, 0.5, 0.125, 0.25]]))
    # 排序后 0.5, 0.25, 0.125, 0.125；累计 0.5, 0.75, 0.875, 1.0
    keep = lambda p: (logits_to_probs(logits, temperature=1.0, top_p=p) > 0).tolist()[0]
    assert keep(0.5) == [False, True, False, False]  # 0.5 本身已达到 p
    assert keep(0.6) == [False, True, False, True]
    assert keep(0.75) == [False, True, False, True]
    assert keep(0.8) == [True, True, False, True]  # 两个 0.125 并列时按稳定排序取下标小的
    assert keep(0.01) == [False, True, False, False]  # 至少保留一个
    probs = logits_to_probs(logits, temperature=1.0, top_p=0.75)
    torch.testing.assert_close(probs, torch.tensor([[0.0, 2 / 3, 0.0, 1 / 3]]))


def test_top_k_and_temperature_in_probs():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    probs = logits_to_probs(logits, temperature=0.5, top_k=2)
    expected = torch.softmax(torch.tensor([3.0, 2.0]) / 0.5, dim=0)
    torch.testing.assert_close(probs, torch.tensor([[0.0, expected[0], expected[1], 0.0]]))
    assert sample(logits, temperature=0.0).tolist() == [1]


def test_sampling_frequencies_follow_the_truncated_distribution():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05])).expand(4000, -1)
    gen = torch.Generator().manual_seed(0)
    draws = sample(logits, temperature=1.0, top_p=0.7, generator=gen)
    counts = torch.bincount(draws, minlength=4).float() / 4000
    assert counts[2] == 0 and counts[3] == 0
    assert abs(counts[0].item() - 0.625) < 0.03  # 0.5 / 0.8


# ---------------------------------------------------------------- 流式
def test_streaming_yields_the_same_tokens_one_step_at_a_time():
    params = _params(seed=5)
    ids = _ids(2, 4, seed=7)
    full = generate(params, CFG, ids, max_new_tokens=6)
    steps = list(generate_stream(params, CFG, ids, max_new_tokens=6))
    assert len(steps) == 6 and all(s.shape == (2,) for s in steps)
    assert torch.stack(steps, dim=1).tolist() == full[:, 4:].tolist()


def test_generate_with_compiled_step_matches_eager(monkeypatch):
    import functional_lm.generate as gen

    used = []
    real = gen.compiled_decode_step
    monkeypatch.setattr(gen, "compiled_decode_step", lambda *a: used.append(a) or real(*a))
    params = _params(seed=6)
    ids = _ids(1, 4, seed=8)
    assert generate(params, CFG, ids, max_new_tokens=5, compile=True).tolist() == \
        generate(params, CFG, ids, max_new_tokens=5).tolist()
    assert used == [()]  # compile=True 真的走了编译的解码步（其编译由上一个测试证明）


# ---------------------------------------------------------------- 报错
def test_prompt_longer_than_cache_raises():
    params = _params()
    with pytest.raises(ValueError, match=r"prompt.*10.*cache.*8"):
        generate(params, CFG, _ids(1, 10), max_new_tokens=1, max_cache_len=8)
    with pytest.raises(ValueError, match=r"prompt.*10.*cache.*8"):
        prefill(params, CFG, _ids(1, 10), init_cache(CFG, batch_size=1, max_len=8))


def test_max_new_tokens_overflowing_cache_raises():
    params = _params()
    with pytest.raises(ValueError, match=r"max_new_tokens.*cache"):
        generate(params, CFG, _ids(1, 5), max_new_tokens=10, max_cache_len=8)
    with pytest.raises(ValueError, match=r"max_seq_len"):
        generate(params, CFG, _ids(1, 5), max_new_tokens=CFG.max_seq_len)
    cache = init_cache(CFG, batch_size=1, max_len=4)
    _, cache = prefill(params, CFG, _ids(1, 4), cache)
    with pytest.raises(ValueError, match=r"cache is full"):
        decode_step(params, CFG, torch.tensor([1]), cache)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(temperature=-1.0), "temperature"),
        (dict(temperature=1.0, top_k=0), "top_k"),
        (dict(temperature=1.0, top_p=0.0), "top_p"),
        (dict(temperature=1.0, top_p=1.5), "top_p"),
        (dict(max_new_tokens=0), "max_new_tokens"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    kwargs = {"max_new_tokens": 3, **kwargs}
    with pytest.raises(ValueError, match=match):
        generate(_params(), CFG, _ids(1, 3), **kwargs)


def test_right_padding_and_empty_rows_are_refused():
    params = _params()
    ids = _ids(2, 4)
    with pytest.raises(ValueError, match="left"):
        generate(params, CFG, ids, max_new_tokens=2, attention_mask=torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]))
    with pytest.raises(ValueError, match="no real token"):
        generate(params, CFG, ids, max_new_tokens=2, attention_mask=torch.tensor([[0, 0, 0, 0], [1, 1, 1, 1]]))
    with pytest.raises(ValueError, match="vocab_size"):
        generate(params, CFG, [[CFG.vocab_size + 3]], max_new_tokens=2)


def test_per_row_seeds_sample_each_row_from_its_distribution_independently_of_the_batch():
    # 每行一个种子：逆 CDF 抽样的频率符合分布（概率为 0 的 token 从不出现），一行的结果与同批的其他行无关
    from functional_lm.generate import sample

    probs = torch.tensor([0.5, 0.0, 0.3, 0.15, 0.05])
    logits = probs.log().expand(4000, 5).contiguous()
    gens = [torch.Generator().manual_seed(s) for s in range(4000)]
    tokens = sample(logits, 1.0, generator=gens)
    freq = torch.bincount(tokens, minlength=5).float() / 4000
    assert freq[1] == 0
    torch.testing.assert_close(freq, probs, atol=0.025, rtol=0)
    alone = [int(sample(logits[:1], 1.0, generator=[torch.Generator().manual_seed(s)])[0]) for s in range(50)]
    assert alone == tokens[:50].tolist()
    with pytest.raises(ValueError, match="one generator per row"):
        sample(logits[:3], 1.0, generator=gens[:2])
