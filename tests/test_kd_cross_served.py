"""跨分词器的服务端教师的数学（不起服务器）：服务器会给的东西（教师流上每一位的 top-K、实际 token 的 log P）
由本地教师的完整分布现场算出，再核对 served_cross_targets：

* ULD 行与本地跨分词器教师的 ULD 行相同（教师自己的 top-K 与尾部，差 float16 取整）；
* MAPPED 行的每一项等于本地**完整**映射分布 P̃ 在同一个学生 id 上的值（含链式法则的拆分），尾部 = 1 − Σ 这些项；
* 每行的学生 id 互不相同（不足 K 项时填的 id 不与保留的重复）。

对真实 vLLM 的端到端检查在 tests/test_kd_served_vllm.py（标记 vllm）。
"""

import pytest
import torch

from functional_lm import ModelConfig, init_params
from functional_lm.data import load_tokenizer
from functional_lm.data.vocab_bytes import load_teacher_tokenizer
from functional_lm.kd.alignment import KIND_MAPPED, KIND_ULD, Aligner
from functional_lm.kd.cross_served import served_cross_targets
from functional_lm.kd.cross_targets import cross_targets
from functional_lm.kd.served import ServedTargets
from functional_lm.kd.teacher_cache import stored_log_probs
from functional_lm.losses.common import teacher_log_probs
from functional_lm.models.decoder import forward_hidden, output_weight
from functional_lm.kd.vocab_map import build_vocab_map

pytestmark = pytest.mark.usefixtures("qwen_tokenizer")

TEXT = ("北京是中国的首都，人口众多。 The international committee reconvened; 2024年12月3日 — naïve café ①②. "
        "Tokenizers disagree about 1234567 and ΑΒΓ, über-naïve coöperation.")
K = 8


@pytest.fixture(scope="module")
def setup():
    student_tok, teacher_tok = load_tokenizer(None), load_teacher_tokenizer("deepseek")
    vmap = build_vocab_map(student_tok, teacher_tok)
    cfg = ModelConfig(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64,
                      vocab_size=129280, max_seq_len=256, rope_theta=1e4, tie_word_embeddings=False)
    params = init_params(cfg, seed=5)
    params["lm_head.weight"] = params["lm_head.weight"] * 40  # 尖一些的分布：top-K 之外的质量不至于占满
    ids = student_tok.encode(TEXT)
    x, y = torch.tensor([ids[:-1]]), torch.tensor([ids[1:]])
    return student_tok, teacher_tok, vmap, cfg, params, x, y


def _served_view(log_p, stream):
    """服务器会给的：每一位的 top-K（log P 经 float16 取整，同 ServedTeacher.fetch）、尾部、下一个 token 的 log P。"""
    top, top_ids = log_p.topk(K, dim=-1)
    actual = torch.full(stream.shape, float("nan"))
    actual[:, :-1] = log_p[:, :-1].gather(-1, stream[:, 1:, None])[..., 0]
    tail = (1 - top.double().exp().sum(-1)).clamp(0, 1).float()
    return ServedTargets(top_ids, stored_log_probs(top), tail, actual)


def _both(setup, mode, big_k):
    student_tok, teacher_tok, vmap, cfg, params, x, y = setup
    plan = Aligner(student_tok, teacher_tok, vmap, mode).plan(x, y, None)
    with torch.no_grad():
        hidden = forward_hidden(params, plan.teacher_ids, cfg)
        log_p = teacher_log_probs(hidden.float() @ output_weight(params, cfg).float().T, teacher_tok.real_vocab_size,
                                  1.0, torch.float32)
    served = served_cross_targets(_served_view(log_p, plan.teacher_ids), plan, vmap, y, top_k=K)
    local = cross_targets(hidden, output_weight(params, cfg), plan, vmap, y, top_k=big_k, temperature=1.0,
                          teacher_real_vocab=teacher_tok.real_vocab_size, student_real_vocab=student_tok.real_vocab_size)
    return plan, served, local


def test_uld_rows_are_the_teachers_own_top_k(setup):
    plan, served, local = _both(setup, "uld", K)
    rows = plan.kind == KIND_ULD
    assert rows.sum() > 10 and torch.equal(served.kind, plan.kind)
    torch.testing.assert_close(served.log_p[rows], local.log_p[rows], rtol=2**-10, atol=1e-6)
    torch.testing.assert_close(served.tail[rows], local.tail[rows], rtol=0, atol=1e-5)


def test_mapped_entries_equal_the_full_mapped_distribution(setup):
    real = setup[0].real_vocab_size
    # 本地取 top-129,280：P̃ 的非零项至多是共有的 84,031 个 token（加上链式法则的标签），所以这就是完整的 P̃
    plan, served, local = _both(setup, "hybrid", setup[1].real_vocab_size)
    mapped = plan.kind == KIND_MAPPED
    chained = (plan.inner_rows >= 0).any(-1)
    assert mapped.sum() > 20 and bool(chained[mapped].any())  # 链式法则的行真的出现了
    dense = torch.full((*plan.kind.shape, real), float("-inf")).scatter(-1, local.ids, local.log_p)[mapped]
    ids, lp, tail = served.ids[mapped], served.log_p[mapped], served.tail[mapped]
    assert all(len(set(row)) == K for row in ids.tolist())  # 一行里 id 互不相同（含填的 id）
    used = lp > -1e4
    assert used.sum() > 5 * mapped.sum()
    torch.testing.assert_close(lp[used], dense.gather(-1, ids)[used], rtol=2**-9, atol=1e-5)
    kept = torch.where(used, lp.double().exp(), torch.zeros((), dtype=torch.float64)).sum(-1)
    torch.testing.assert_close(tail.double(), 1 - kept, rtol=0, atol=2e-3)


def test_the_chain_rule_moves_the_span_probability_from_the_first_token_to_the_label(setup):
    """组里有多个教师 token 时：t₁ 的质量减去 P(段)，标签加上 P(段)。随机教师的 t₁ 几乎从不在 top-K 里、
    后几个因子也很小，所以这里把服务器的回答改成“t₁ 在 top-K 里、后几个因子都是 0.9”，再与手算的值比。"""
    student_tok, teacher_tok, vmap, cfg, params, x, y = setup
    plan = Aligner(student_tok, teacher_tok, vmap, "hybrid").plan(x, y, None)
    with torch.no_grad():
        hidden = forward_hidden(params, plan.teacher_ids, cfg)
        log_p = teacher_log_probs(hidden.float() @ output_weight(params, cfg).float().T, teacher_tok.real_vocab_size,
                                  1.0, torch.float32)
    view = _served_view(log_p, plan.teacher_ids)
    t2s = vmap.teacher_to_student
    rows = [(b, i) for b, i in ((plan.kind == KIND_MAPPED) & (plan.inner_rows >= 0).any(-1)).nonzero().tolist()
            if t2s[plan.first_token[b, i]] >= 0]
    assert rows, "the text should have a many-to-one group whose first teacher token has a student counterpart"
    flat_ids, flat_lp = view.ids.view(-1, K), view.log_probs.view(-1, K)
    actual = view.actual_log_probs.view(-1)
    expected = {}
    for b, i in rows:
        pred, t1 = int(plan.pred_row[b, i]), int(plan.first_token[b, i])
        flat_ids[pred, -1], flat_lp[pred, -1] = t1, -0.5  # P(t₁) = e^-0.5，放进 top-K
        inner = [r for r in plan.inner_rows[b, i].tolist() if r >= 0]
        actual[pred] = -0.5
        actual[inner] = torch.tensor(0.9).log()
        span = 0.9 ** len(inner) * float(torch.tensor(-0.5).exp())
        expected[(b, i)] = (int(t2s[t1]), float(torch.tensor(-0.5).exp()) - span, int(y[b, i]), span)
    served = served_cross_targets(view, plan, vmap, y, top_k=K)
    for (b, i), (first, first_p, label, span) in expected.items():
        got = dict(zip(served.ids[b, i].tolist(), served.log_p[b, i].double().exp().tolist()))
        assert got[first] == pytest.approx(first_p, rel=2**-9)
        assert got[label] >= span * (1 - 2**-9)


def test_a_batch_without_many_to_one_groups_works(setup):
    """整批都是一对一的组（inner_rows 宽度为 0）：映射行照常建出。"""
    student_tok, teacher_tok, vmap, cfg, params, _, _ = setup
    ids = student_tok.encode("the cat sat on the mat")
    x, y = torch.tensor([ids[:-1]]), torch.tensor([ids[1:]])
    plan = Aligner(student_tok, teacher_tok, vmap, "hybrid").plan(x, y, None)
    assert plan.inner_rows.shape[-1] == 0
    log_p = torch.randn(*plan.teacher_ids.shape, teacher_tok.real_vocab_size).log_softmax(-1)
    served = served_cross_targets(_served_view(log_p, plan.teacher_ids), plan, vmap, y, top_k=K)
    assert (served.kind == KIND_MAPPED).sum() == len(ids) - 1 and torch.isfinite(served.tail).all()
