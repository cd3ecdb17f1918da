"""打包文档的注意力隔离（segment_ids）：打包行里每篇文档的结果等于这篇文档单独运行的结果。

一行里放 3 篇长度不同的文档（5、9、4 个 token，各自的编号 0、1、2）；分别在 eager（SDPA + 布尔掩码）、
torch.compile(fullgraph=True)（FlexAttention + BlockMask）与 torch.func.vmap（显式公式）之下比较 logits 与梯度；
再与 transformers 的 Qwen2ForCausalLM（从 0 重新数的 position_ids + 显式的 4-D 块对角掩码）比较。
"""

import pytest
import torch

from conftest import dynamo_graph_count, fresh_dynamo, needs
from conftest import tiny_config as _tiny_cfg
from functional_lm.layers import segment_mask, segment_positions
from functional_lm.models.decoder import forward, init_params

transformers = needs("transformers")

CFG = _tiny_cfg()
LENGTHS = (5, 9, 4)
TOL = 1e-5


def _packed(seed: int = 0, rows: int = 1):
    """rows 行打包数据 (rows, 18) 与它们的文档编号；每行的文档各不相同。"""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, CFG.vocab_size, (rows, sum(LENGTHS)), generator=g)
    seg = torch.cat([torch.full((n,), i) for i, n in enumerate(LENGTHS)]).expand(rows, -1).contiguous()
    return ids, seg


def _pieces(x, dim=1):
    return x.split(LENGTHS, dim=dim)


def _alone(params, ids):
    """每篇文档单独运行（各自从位置 0 开始）的 logits，按原顺序拼回一行。"""
    return torch.cat([forward(params, doc, CFG) for doc in _pieces(ids)], dim=1)


def _loss(logits):
    return logits.square().mean(dim=-1).sum()


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, seed=3)


def test_positions_restart_at_every_document():
    _, seg = _packed()
    expected = torch.cat([torch.arange(n) for n in LENGTHS])
    assert torch.equal(segment_positions(seg)[0], expected)


def test_mask_is_causal_within_a_document_and_blocked_across():
    _, seg = _packed()
    mask = segment_mask(seg)[0, 0]
    assert mask[6, 5] and mask[6, 6] and not mask[6, 7]  # 第二篇文档里：看得见本篇之前的 token
    assert not mask[6, 4] and not mask[14, 13]  # 看不见上一篇（4 属于第一篇，13 属于第二篇、14 属于第三篇）
    assert int(mask.sum()) == sum(n * (n + 1) // 2 for n in LENGTHS)


def test_eager_logits_and_gradients_equal_each_document_alone(params):
    ids, seg = _packed()
    packed = forward(params, ids, CFG, segment_ids=seg)
    alone = _alone(params, ids)
    assert (packed - alone).abs().max() <= TOL
    # 没有 segment_ids 时第二、三篇文档看得到前面的文档：结果确实不同（测试能失败）。
    assert (forward(params, ids, CFG) - alone).abs().max() > 1e-2
    leaf = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    g_packed = torch.autograd.grad(_loss(forward(leaf, ids, CFG, segment_ids=seg)), list(leaf.values()))
    g_alone = torch.autograd.grad(_loss(_alone(leaf, ids)), list(leaf.values()))
    for a, b in zip(g_packed, g_alone):
        assert (a - b).abs().max() <= TOL


def test_compiled_fullgraph_training_matches(params):
    # 要反向时 CPU 上不用 FlexAttention（torch 2.13 的 CPU flex 没有反向），编译后的图里是 SDPA + 布尔掩码。
    ids, seg = _packed(rows=2)
    fresh_dynamo()
    compiled = torch.compile(lambda p, x, s: forward(p, x, CFG, segment_ids=s), fullgraph=True)
    leaf = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    logits = compiled(leaf, ids, seg)
    assert dynamo_graph_count() >= 1
    alone = _alone(params, ids)
    assert (logits.detach() - alone).abs().max() <= TOL
    g_compiled = torch.autograd.grad(_loss(logits), list(leaf.values()))
    g_alone = torch.autograd.grad(_loss(_alone(leaf, ids)), list(leaf.values()))
    for a, b in zip(g_compiled, g_alone):
        assert (a - b).abs().max() <= TOL


def test_compiled_inference_uses_flex_attention_and_matches(params):
    # 不求梯度时（教师前向、推理）编译后的图里是 FlexAttention：掩码每批建一次（一个 BlockMask），所有层共用。
    ids, seg = _packed(rows=2, seed=4)
    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append(gm.code)
        return gm.forward

    fn = lambda p, x, s: forward(p, x, CFG, segment_ids=s)  # noqa: E731
    with torch.no_grad():
        fresh_dynamo()
        torch.compile(fn, fullgraph=True, backend=recording_backend)(params, ids, seg)
        assert len(graphs) == 1 and graphs[0].count("flex_attention") >= CFG.num_layers
        assert graphs[0].count("create_block_mask") + graphs[0].count("_create_sparse_block_from_block_mask") <= 2
        fresh_dynamo()
        logits = torch.compile(fn, fullgraph=True)(params, ids, seg)
    assert (logits - _alone(params, ids)).abs().max() <= TOL


def test_vmap_per_example_gradients_with_segment_ids(params):
    ids, seg = _packed(rows=3, seed=1)

    def example_loss(p, one_ids, one_seg):
        return _loss(forward(p, one_ids[None], CFG, segment_ids=one_seg[None]))

    per_example = torch.func.vmap(torch.func.grad(example_loss), in_dims=(None, 0, 0))(params, ids, seg)
    for row in range(ids.shape[0]):
        alone = torch.func.grad(lambda p: _loss(_alone(p, ids[row : row + 1])))(params)
        for key in params:
            assert (per_example[key][row] - alone[key]).abs().max() <= TOL, key
    logits = torch.func.vmap(lambda x, s: forward(params, x[None], CFG, segment_ids=s[None])[0])(ids, seg)
    assert (logits - _alone(params, ids)).abs().max() <= TOL


def test_transformers_with_restarted_positions_and_a_block_diagonal_mask(params):
    from functional_lm.hf import config_to_hf

    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**config_to_hf(CFG))).eval()
    model.load_state_dict(params, strict=False)
    ids, seg = _packed(rows=2, seed=2)
    allowed = segment_mask(seg)  # (b, 1, t, t)，True = 可以看
    additive = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    with torch.no_grad():
        theirs = model(ids, attention_mask=additive, position_ids=segment_positions(seg)).logits
    ours = forward(params, ids, CFG, segment_ids=seg)
    assert (theirs - ours).abs().max() <= TOL


@pytest.mark.parametrize(
    "bad, message",
    [
        (lambda seg: seg[:, :-1], "shape of input_ids"),
        (lambda seg: seg.float(), "integer tensor"),
        (lambda seg: seg.bool(), "integer tensor"),
        (lambda seg: seg.flip(-1), "non-decreasing"),
    ],
)
def test_bad_segment_ids_are_refused_clearly(params, bad, message):
    from jaxtyping import TypeCheckError

    from functional_lm.shapes import typecheck

    ids, seg = _packed()
    # 形状检查开着时，形状与 dtype 错误由 jaxtyping 报出（点名 forward 的 segment_ids 参数）；
    # 关掉时由 check_segment_ids 报出同样清楚的 ValueError。单调性只能读值，总是由后者报出。
    with pytest.raises((ValueError, TypeCheckError), match="segment_ids"):
        forward(params, ids, CFG, segment_ids=bad(seg))
    with typecheck(False), pytest.raises(ValueError, match=message):
        forward(params, ids, CFG, segment_ids=bad(seg))


def test_a_decreasing_row_names_the_row_and_position(params):
    ids, seg = _packed(rows=2)
    seg = seg.clone()
    seg[1, 10] = 0
    with pytest.raises(ValueError, match=r"row 1 goes from 1 to 0 at position 10"):
        forward(params, ids, CFG, segment_ids=seg)


def test_chunked_and_sparse_losses_see_exactly_the_document_masked_token_set():
    # 打包器在文档边界处把标签置为 −100、loss_mask 置为 False；分块损失与稀疏损失不需要任何改动：
    # 两者的值都等于只在保留的 token 上算的普通损失，被遮的 token 上梯度恰好为 0。
    from functional_lm.data import pack_documents
    from functional_lm.losses import chunked_distillation_loss, distillation_loss, sparse_distillation_loss, teacher_topk

    g = torch.Generator().manual_seed(5)
    docs = [torch.randint(1, 40, (n,), generator=g).tolist() for n in (3, 6, 2, 5, 4)]
    ds = pack_documents(docs, seq_len=12, separator_id=0)
    x, labels, loss_mask, seg = (torch.from_numpy(a) for a in ds.examples([0, 1], document_mask=True))
    crossing = torch.from_numpy(
        __import__("numpy").stack([ds.segments(i)[1:] != ds.segments(i)[:-1] for i in (0, 1)])
    )
    assert crossing.any() and not loss_mask[crossing].any()
    keep = loss_mask & (labels != -100)
    hidden = torch.randn(2, 12, 8, generator=g, requires_grad=True)
    weight, t_hidden, t_weight = torch.randn(48, 8, generator=g), torch.randn(2, 12, 8, generator=g), torch.randn(48, 8, generator=g)
    t_logits = t_hidden @ t_weight.T
    plain_on_kept = distillation_loss((hidden @ weight.T)[keep], t_logits[keep], labels[keep])
    chunked = chunked_distillation_loss(hidden, weight, labels, teacher_hidden=t_hidden, teacher_weight=t_weight,
                                        chunk_size=5, loss_mask=loss_mask)
    ids, logp, tail = teacher_topk(t_logits, 48)
    sparse = sparse_distillation_loss(hidden @ weight.T, ids, logp, labels, teacher_tail_mass=tail, loss_mask=loss_mask)
    for loss in (chunked, sparse):
        assert torch.allclose(loss, plain_on_kept, atol=1e-5, rtol=1e-5)
        (grad,) = torch.autograd.grad(loss, hidden)
        assert torch.equal(grad[~keep], torch.zeros_like(grad[~keep])) and grad[keep].abs().sum() > 0


def test_positions_with_left_padding_count_only_real_tokens(params):
    # 左填充的两篇文档：填充与第一篇同号；位置只数真实 token，与没有文档编号时的缺省位置一致。
    seg = torch.tensor([[0, 0, 0, 0, 1, 1]])
    pad = torch.tensor([[0, 0, 1, 1, 1, 1]])
    assert segment_positions(seg, pad).tolist() == [[0, 0, 0, 1, 0, 1]]
    ids = torch.randint(0, CFG.vocab_size, (1, 6), generator=torch.Generator().manual_seed(3))
    first = forward(params, ids, CFG, attention_mask=pad, segment_ids=seg)[:, 2:4]
    alone = forward(params, ids[:, 2:4], CFG)
    assert (first - alone).abs().max() <= TOL


def test_a_prebuilt_mask_and_segment_ids_together_are_refused(params):
    from functional_lm.layers import gqa_attention, sub_params

    _, seg = _packed()
    x = torch.randn(1, seg.shape[1], CFG.hidden_size)
    attn = sub_params(params, "model.layers.0.self_attn.")
    with pytest.raises(ValueError, match="not both"):
        gqa_attention(x, attn, CFG, segment_ids=seg, mask=segment_mask(seg))


def test_segments_of_a_missing_block_is_an_index_error():
    from functional_lm.data import pack_documents

    ds = pack_documents([[1, 2, 3]], seq_len=4, separator_id=0)
    with pytest.raises(IndexError, match="out of range"):
        ds.segments(len(ds))
