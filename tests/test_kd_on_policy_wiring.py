"""在线蒸馏的接线（训练器层面）：谁写这一步、用哪一步的种子、top-p 是否生效、在线指标算的是不是反向 KL。

这些测试不看 on_policy 模块内部，而是截下训练器真正拿去训练的批（包住 ``train.optimizer_step``：
它收到的微批就是这一步的训练数据，调用时学生参数正是“这一步的参数”），再用独立的办法重算应有的续写：

    学生写的步  续写 = generate(这一步开始时的学生参数, 提示, 种子 rollout_seed(seed, 步, 块号))
    教师写的步  续写 = generate(教师参数, 同上)

数据是两篇随机 id 的文档（恰好打成两个块、batch 2）：每一步看到的都是同一组提示，所以“两个不同的步采到
不同的续写”在同样的提示上检验。top-p 用打分前向重算每个位置的分布（softmax(z / T) 只在真实词表上），
核对每个采到的 token 都落在它那一步的核（nucleus）里；在线指标对照直接用 log_softmax 写出的
KL(P_S ‖ P_T) = Σ_v P_S(v) · (log P_S(v) − log P_T(v)) 与教师 NLL −log P_T(y)，在同样的采样 token 上平均。
"""

import numpy as np
import pytest
import torch

from conftest import QWEN_VOCAB_STUDENT, QWEN_VOCAB_TEACHER
from functional_lm import TrainingConfig, init_params
from functional_lm.data import PackedDataset, load_tokenizer
from functional_lm.data.loader import BatchLoader
from functional_lm.data.pipeline import DataBundle
from functional_lm.data.store import TokenStore
from functional_lm.generate import generate
from functional_lm.models.decoder import forward
from functional_lm.kd.on_policy import batch_source, make_rollouts, rollout_seed
from functional_lm.kd.trainer import train
from functional_lm.kd.evaluate import evaluate_on_policy
from functional_lm.kd.objective import Model

pytestmark = pytest.mark.usefixtures("qwen_tokenizer")

STUDENT, TEACHER = QWEN_VOCAB_STUDENT, QWEN_VOCAB_TEACHER
SEQ, P, N = 32, 8, 8  # 块长、提示长、续写长


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(None)


def _bundle(tokenizer, documents, batch_size=2):
    """几篇 id 列表 → 训练器要的 DataBundle（没有验证集）。"""
    store = TokenStore.from_documents(documents, separator_id=tokenizer.eos_token_id)
    train_set = PackedDataset(store, SEQ)
    empty = PackedDataset(store, SEQ, np.zeros(0, dtype=np.int64))
    return DataBundle(tokenizer, store, train_set, empty, BatchLoader(train_set, batch_size, seed=0), None)


@pytest.fixture(scope="module")
def two_blocks(tokenizer):
    """两篇 32 个 token 的随机文档，各带分隔符 = 66 个 token = 恰好两个 33 个 token 的块：每一步都是这两个块。"""
    rng = np.random.default_rng(7)
    data = _bundle(tokenizer, [rng.integers(0, 150_000, 32).tolist() for _ in range(2)])
    assert len(data.train) == 2
    return data


def _student():
    params = init_params(STUDENT, seed=3)
    return Model({k: v * 4.0 if k.endswith("proj.weight") else v for k, v in params.items()}, STUDENT)


def _teacher(head_scale=8.0):
    """随机教师；head_scale 放大输出投影。在线指标的测试用尖锐的教师（40 倍）：两个几乎均匀的分布之间
    KL(P‖Q) 与 KL(Q‖P) 只差万分之一，分不出方向；教师尖锐时两者差 20%。"""
    params = init_params(TEACHER, seed=11)
    scale = {k: 8.0 for k in params if k.endswith("proj.weight")} | {"lm_head.weight": head_scale}
    return Model({k: v * scale.get(k, 1.0) for k, v in params.items()}, TEACHER)


def _tcfg(**changes):
    base = TrainingConfig(
        batch_size=2, learning_rate=3e-2, warmup_steps=1, max_steps=6, log_interval=1, eval_interval=100,
        save_interval=100, prompt_length=P, max_new_tokens=N, seed=0,
    )
    return base.replace(**changes)


def _captured_run(monkeypatch, data, tcfg, run_dir):
    """跑一次训练，截下每一步：来源、这一步开始时的学生参数（拷贝）与训练器拿去训练的微批。"""
    import functional_lm.kd.trainer as trainer

    steps, original = [], trainer.optimizer_step

    def spy(stepper, micro, lr, source="data"):
        snapshot = {k: v.detach().clone() for k, v in stepper.params.items()}
        steps.append({"source": source, "params": snapshot, "micro": [b.to("cpu") for b in micro]})
        return original(stepper, micro, lr, source)

    monkeypatch.setattr(trainer, "optimizer_step", spy)
    train(_student(), _teacher(), data, tcfg, run_dir, real_vocab_size=data.tokenizer.real_vocab_size,
          progress=False)
    assert len(steps) == tcfg.max_steps
    return steps


def _continuation(batch, row):
    """训练批第 row 行里生成的 token（到第一个 EOS 为止，含 EOS）：计损失的标签正是它们。"""
    return batch.labels[row][batch.loss_mask[row]].tolist()


def _prompt(data, block):
    """块的提示：纯文本数据取块的前 P 个 token（这里每个块都满 P 个，不用左填充）。"""
    return data.train.block(block).tokens[:P].tolist()


def _expected(params, cfg, data, block, step, tcfg, rollouts):
    """独立重算：用给定参数、这一步的种子，为一个块的提示写续写；截到第一个 EOS（含）。"""
    out = generate(
        params, cfg, torch.tensor([_prompt(data, block)]), N, temperature=tcfg.generation_temperature,
        top_p=None if tcfg.generation_top_p >= 1.0 else tcfg.generation_top_p, eos_token_id=list(rollouts.eos_ids),
        pad_token_id=rollouts.pad_id, seed=[rollout_seed(tcfg.seed, step, block)], max_cache_len=P + N,
        vocab_limit=data.tokenizer.real_vocab_size,
    )[0, P:].tolist()
    for i, token in enumerate(out):
        if token in rollouts.eos_ids:
            return out[: i + 1]
    return out


def _rollouts(data, tcfg):
    return make_rollouts(data.train, data.tokenizer, tcfg, data.tokenizer.real_vocab_size)


# ---------------------------------------------------------------- 谁写、哪一步的种子
def test_each_step_is_written_by_its_scheduled_source_with_its_own_seed(two_blocks, monkeypatch, tmp_path):
    tcfg = _tcfg(on_policy_fraction=0.5, teacher_generated_fraction=0.5)
    schedule = [batch_source(tcfg, step) for step in range(tcfg.max_steps)]
    assert {"student", "teacher"} <= set(schedule[1:])  # 第 0 步之后两种来源都有（否则测不出种子与写者）
    steps = _captured_run(monkeypatch, two_blocks, tcfg, tmp_path / "run")
    rollouts, teacher, first = _rollouts(two_blocks, tcfg), _teacher(), steps[0]["params"]
    stale = 0  # 学生参数变了、续写也随之变了的次数：证明“这一步的参数”这一条核对有分辨力
    for step, (record, source) in enumerate(zip(steps, schedule)):
        assert record["source"] == source, step
        (batch,) = record["micro"]
        for row, block in enumerate(batch.block_ids.tolist()):
            assert batch.input_ids[row, :P].tolist() == _prompt(two_blocks, block)
            writer = (record["params"], STUDENT) if source == "student" else (teacher.params, TEACHER)
            got = _continuation(batch, row)
            assert got == _expected(*writer, two_blocks, block, step, tcfg, rollouts), (step, source, block)
            other = (teacher.params, TEACHER) if source == "student" else (record["params"], STUDENT)
            assert got != _expected(*other, two_blocks, block, step, tcfg, rollouts), (step, source, block)
            if source == "student" and step > 0:
                stale += got != _expected(first, STUDENT, two_blocks, block, step, tcfg, rollouts)
    assert stale > 0


def test_two_steps_never_sample_the_same_continuation_from_the_same_prompts(two_blocks, monkeypatch, tmp_path):
    tcfg = _tcfg(on_policy_fraction=1.0, learning_rate=1e-6)  # 学生几乎不动：续写的不同只能来自种子
    steps = _captured_run(monkeypatch, two_blocks, tcfg, tmp_path / "run")
    seen: dict[int, list[tuple[int, list[int]]]] = {}
    for step, record in enumerate(steps):
        (batch,) = record["micro"]
        for row, block in enumerate(batch.block_ids.tolist()):
            seen.setdefault(block, []).append((step, _continuation(batch, row)))
    assert sorted(seen) == [0, 1] and all(len(v) == tcfg.max_steps for v in seen.values())
    for block, rows in seen.items():
        continuations = [tuple(c) for _, c in rows]
        assert len(set(continuations)) == len(continuations), (block, rows)


# ---------------------------------------------------------------- top-p
def _nucleus_violations(record, tcfg, real):
    """采到的 token 不在它那一步分布的核里的个数。核 = 按概率从大到小、累计概率（不含自己）< top_p 的 token。"""
    (batch,) = record["micro"]
    logits = forward(record["params"], batch.input_ids, STUDENT, segment_ids=batch.segment_ids)[..., :real]
    probs = torch.softmax(logits[batch.loss_mask].double() / tcfg.generation_temperature, dim=-1)
    tokens = batch.labels[batch.loss_mask]
    ordered, order = probs.sort(dim=-1, descending=True)
    before = ordered.cumsum(dim=-1) - ordered  # 排在它前面的概率之和
    rank = (order == tokens[:, None]).float().argmax(dim=-1)
    mass_before = before.gather(1, rank[:, None]).squeeze(1)
    return int((mass_before >= tcfg.generation_top_p + 1e-9).sum()), int(tokens.numel())


def test_every_sampled_token_lies_in_the_nucleus_of_its_step(two_blocks, monkeypatch, tmp_path):
    tcfg = _tcfg(on_policy_fraction=1.0, generation_top_p=0.3, max_steps=3)
    real = two_blocks.tokenizer.real_vocab_size
    nucleus = _captured_run(monkeypatch, two_blocks, tcfg, tmp_path / "nucleus")
    for step, record in enumerate(nucleus):
        bad, total = _nucleus_violations(record, tcfg, real)
        assert total > 0 and bad == 0, step
    # 同样的种子、同样的初始参数，只是不截核：第 0 步的续写不同，且多数 token 落在 0.3 的核外（截核确实起了作用）
    full = _captured_run(monkeypatch, two_blocks, tcfg.replace(generation_top_p=1.0), tmp_path / "full")
    assert nucleus[0]["micro"][0].labels.tolist() != full[0]["micro"][0].labels.tolist()
    outside, total = _nucleus_violations(full[0], tcfg, real)
    assert outside > total // 2


# ---------------------------------------------------------------- 在线指标
def _direct_on_policy_metrics(student, teacher, batches, real):
    """直接算：每个生成位置 KL(P_S ‖ P_T) 与 −log P_T(y)，在全部生成 token 上平均（T = 1，只在真实词表上）。"""
    kl, nll, n = 0.0, 0.0, 0
    for batch in batches:
        log_s = torch.log_softmax(forward(student.params, batch.input_ids, student.cfg,
                                          segment_ids=batch.segment_ids)[..., :real].double(), dim=-1)
        log_t = torch.log_softmax(forward(teacher.params, batch.input_ids, teacher.cfg,
                                          segment_ids=batch.segment_ids)[..., :real].double(), dim=-1)
        mask, labels = batch.loss_mask, batch.labels
        kl += float((log_s.exp() * (log_s - log_t)).sum(-1)[mask].sum())
        nll += float(-log_t[mask].gather(1, labels[mask][:, None]).sum())
        n += int(mask.sum())
    return kl / n, nll / n, n


def test_the_on_policy_metric_is_the_reverse_kl_on_the_students_samples(two_blocks):
    tcfg = _tcfg(on_policy_fraction=1.0)
    student, teacher, real = _student(), _teacher(head_scale=40.0), two_blocks.tokenizer.real_vocab_size
    loader, rollouts = BatchLoader(two_blocks.train, 2, shuffle=False, drop_last=False), _rollouts(two_blocks, tcfg)
    scores = evaluate_on_policy(student, teacher, loader, rollouts, tcfg, real_vocab_size=real)
    # 同样的采样 token：验证的种子是 (seed, "eval", 块号)，与训练步的种子分开
    gen = rollouts.generated(student.params, STUDENT, loader.batch_at(0, 0), "eval", tcfg.seed)
    for row, block in enumerate(gen.block_ids.tolist()):
        assert _continuation(gen, row) == _expected(student.params, STUDENT, two_blocks, block, "eval", tcfg, rollouts)
    kl, nll, n = _direct_on_policy_metrics(student, teacher, [gen], real)
    forward_kl = _direct_on_policy_metrics(teacher, student, [gen], real)[0]  # 若把方向弄反，会得到这个数
    assert scores["on_policy_tokens"] == n
    assert scores["on_policy_reverse_kl"] == pytest.approx(kl, rel=1e-5)
    assert scores["on_policy_teacher_nll"] == pytest.approx(nll, rel=1e-5)
    assert abs(forward_kl - kl) > 0.1 * kl  # 两个方向确实分得开


def test_the_trainer_logs_the_reverse_kl_of_the_students_current_samples(two_blocks, tokenizer, tmp_path):
    # 训练器层面：带验证集的运行，最后一次验证的在线指标 = 最终学生在验证提示上采样后直接算的反向 KL
    rng = np.random.default_rng(8)
    docs = [rng.integers(0, 150_000, 32).tolist() for _ in range(4)]
    store = TokenStore.from_documents(docs, separator_id=tokenizer.eos_token_id)
    train_set = PackedDataset(store, SEQ, np.array([0, 1]))
    val_set = PackedDataset(store, SEQ, np.array([2, 3]))
    val_loader = BatchLoader(val_set, 2, shuffle=False, drop_last=False)
    data = DataBundle(tokenizer, store, train_set, val_set, BatchLoader(train_set, 2, seed=0), val_loader)
    tcfg = _tcfg(on_policy_fraction=1.0, max_steps=2, eval_interval=1)
    teacher = _teacher(head_scale=40.0)
    result = train(_student(), teacher, data, tcfg, tmp_path / "run", real_vocab_size=tokenizer.real_vocab_size,
                   progress=False)
    student = Model(result.params, STUDENT)
    rollouts = make_rollouts(val_set, tokenizer, tcfg, tokenizer.real_vocab_size)
    gen = rollouts.generated(student.params, STUDENT, val_loader.batch_at(0, 0), "eval", tcfg.seed)
    kl, nll, n = _direct_on_policy_metrics(student, teacher, [gen], tokenizer.real_vocab_size)
    assert result.final_eval["on_policy_tokens"] == n
    assert result.final_eval["on_policy_reverse_kl"] == pytest.approx(kl, rel=1e-4)
    assert result.final_eval["on_policy_teacher_nll"] == pytest.approx(nll, rel=1e-4)


# ---------------------------------------------------------------- 教师缓存不能给生成的 token 打分
@pytest.fixture(scope="module")
def teacher_cache(two_blocks, tmp_path_factory):
    """两个块的训练集的教师缓存（top-k 4、T = 2），与 _tcfg(top_k=4) 的运行对得上。"""
    from functional_lm.kd.cache_build import build_teacher_cache
    from functional_lm.kd.teacher_cache import TeacherCache, make_fingerprint

    out = tmp_path_factory.mktemp("teacher-cache")
    fp = make_fingerprint(two_blocks.tokenizer, two_blocks.store, teacher_weights="random-teacher-11")
    build_teacher_cache(_teacher().params, TEACHER, two_blocks.train, out, top_k=4, temperature=2.0, fingerprint=fp,
                        real_vocab_size=two_blocks.tokenizer.real_vocab_size, document_mask=True, progress=False)
    return TeacherCache.open(out)


@pytest.mark.parametrize("with_teacher, message", [
    (True, "a teacher cache cannot grade generated tokens"),
    (False, "a teacher cache only holds targets for the data's own tokens"),
])
@pytest.mark.parametrize("fractions", [{"on_policy_fraction": 0.5}, {"teacher_generated_fraction": 0.5}])
def test_a_teacher_cache_with_generated_batches_is_refused(two_blocks, teacher_cache, tmp_path, with_teacher,
                                                           message, fractions):
    # 缓存只存了数据本身 token 上的教师目标，生成的续写没有目标：开始训练之前拒绝，什么都不写
    real = two_blocks.tokenizer.real_vocab_size
    tcfg = _tcfg(top_k=4, temperature=2.0, **fractions)
    with pytest.raises(ValueError, match=message):
        train(_student(), _teacher() if with_teacher else None, two_blocks, tcfg, tmp_path / "run",
              real_vocab_size=real, progress=False, teacher_cache=teacher_cache)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    # 同一个缓存、λ = τ = 0：照常训练（拒绝的只是生成批，不是缓存本身）
    ok = train(_student(), None, two_blocks, _tcfg(top_k=4, temperature=2.0, max_steps=1), tmp_path / "plain",
               real_vocab_size=real, progress=False, teacher_cache=teacher_cache)
    assert ok.step == 1
