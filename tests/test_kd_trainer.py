"""蒸馏训练器的端到端测试：损失下降、按间隔验证与保存、transformers 可加载、逐位一致的恢复、
SIGINT 干净退出、NaN 停止。模型极小（词表必须容纳 Qwen2.5 的 151,665 个真实 token）。"""

import json
import math
import os
import signal

import pytest
import torch

from conftest import QWEN_VOCAB_STUDENT, QWEN_VOCAB_TEACHER, dynamo_graph_count, fresh_dynamo
from functional_lm import TrainingConfig, init_params
from functional_lm.runs.checkpoint import list_checkpoints, load_checkpoint
from functional_lm.hf import load_pretrained, save_pretrained
from functional_lm.models.decoder import forward
from functional_lm.kd.trainer import train
from functional_lm.kd.step import learning_rate, no_weight_decay
from functional_lm.kd.objective import Model
from functional_lm.errors import NonFiniteLossError

pytestmark = pytest.mark.usefixtures("qwen_tokenizer")  # 需要离线 Qwen2.5 分词器
from functional_lm.data import load_tokenizer, prepare_data  # noqa: E402

STUDENT, TEACHER = QWEN_VOCAB_STUDENT, QWEN_VOCAB_TEACHER


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(None)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("token-cache")


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """磁盘上的随机小教师检查点（未共享嵌入），由我们的 save_pretrained 写出、load_pretrained 读回。"""
    path = tmp_path_factory.mktemp("teacher") / "teacher"
    params = init_params(TEACHER, seed=11)
    params = {k: v * 8.0 if k.endswith("proj.weight") or k == "lm_head.weight" else v for k, v in params.items()}
    save_pretrained(params, TEACHER, path)
    return path


def _data(tokenizer, cache_dir, batch_size=2):
    return prepare_data(
        None, tokenizer=tokenizer, seq_len=32, batch_size=batch_size, val_fraction=0.05, seed=0,
        cache_dir=cache_dir, model_config=STUDENT, progress=False,
    )


def _teacher(teacher_dir):
    cfg, params = load_pretrained(teacher_dir)
    return Model(params, cfg)


def _run(tokenizer, cache_dir, teacher_dir, run_dir, tcfg, data=None, **kwargs):
    student = Model(init_params(STUDENT, seed=3), STUDENT)
    return train(
        student, _teacher(teacher_dir), data or _data(tokenizer, cache_dir), tcfg, run_dir,
        real_vocab_size=tokenizer.real_vocab_size, progress=False, **kwargs,
    )


def _tcfg(**changes):
    base = TrainingConfig(
        batch_size=2, learning_rate=1e-2, warmup_steps=2, max_steps=6, log_interval=2,
        eval_interval=3, save_interval=2, eval_batches=1, keep_last=2,
    )
    return base.replace(**changes)


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------- 单元
def test_schedule_warmup_then_cosine():
    tcfg = TrainingConfig(learning_rate=1.0, warmup_steps=4)
    lrs = [learning_rate(s, tcfg, 12) for s in range(12)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lrs[4] == 1.0 and all(a > b for a, b in zip(lrs[4:], lrs[5:]))
    assert lrs[-1] == pytest.approx(0.5 * (1 + torch.cos(torch.tensor(torch.pi * 7 / 8)).item()))


def test_no_weight_decay_on_norms_and_biases():
    assert no_weight_decay("model.layers.0.self_attn.q_proj.bias")
    assert no_weight_decay("model.layers.3.input_layernorm.weight") and no_weight_decay("model.norm.weight")
    assert not no_weight_decay("model.embed_tokens.weight")
    assert not no_weight_decay("model.layers.0.mlp.up_proj.weight")


# ---------------------------------------------------------------- 端到端
def test_end_to_end_distillation(tokenizer, cache_dir, teacher_dir, tmp_path):
    transformers = pytest.importorskip("transformers")
    tcfg = _tcfg(
        max_steps=24, log_interval=4, eval_interval=8, save_interval=8, keep_last=5, warmup_steps=4,
        learning_rate=3e-2,
    )
    result = _run(tokenizer, cache_dir, teacher_dir, tmp_path, tcfg)
    assert result.step == 24 and not result.interrupted
    records = _metrics(tmp_path)
    train_loss = [r["loss"] for r in records if r["kind"] == "train"]
    assert len(train_loss) == 6
    # 目标函数 α·T²·KD + (1−α)·CE 在训练日志与固定的验证批上都下降。
    assert sum(train_loss[-2:]) < 0.9 * sum(train_loss[:2]), f"distillation loss did not fall: {train_loss}"
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [8, 16, 24]
    assert evals[-1]["val_loss"] < 0.9 * evals[0]["val_loss"]
    for key in ("val_kd", "val_ce", "student_ppl", "teacher_ppl", "kl_teacher_student", "top1_agreement"):
        assert key in result.final_eval
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == [
        "step-00000008", "step-00000016", "step-00000024",
    ]
    # 保存的学生能被 transformers 加载，logits 与我们的前向相等。
    ckpt = result.last_checkpoint
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(ckpt).eval()
    ids = torch.randint(0, tokenizer.real_vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = hf_model(ids).logits
    ours = forward(result.params, ids, STUDENT)
    assert (theirs - ours).abs().max().item() <= 1e-5


def test_pure_distillation_term_falls(tokenizer, cache_dir, teacher_dir, tmp_path):
    # α = 1：只剩 T²·KD(教师 ‖ 学生)，验证批上的 KD 必须下降（随机教师与数据无关，CE 项会与它拉扯）。
    tcfg = _tcfg(alpha=1.0, max_steps=12, eval_interval=4, save_interval=100, learning_rate=3e-2)
    _run(tokenizer, cache_dir, teacher_dir, tmp_path, tcfg)
    val_kd = [r["val_kd"] for r in _metrics(tmp_path) if r["kind"] == "eval"]
    assert len(val_kd) == 3 and val_kd[0] > val_kd[1] > val_kd[2], val_kd


def test_keep_last_rotates_checkpoints(tokenizer, cache_dir, teacher_dir, tmp_path):
    _run(tokenizer, cache_dir, teacher_dir, tmp_path, _tcfg(max_steps=6, save_interval=1, keep_last=2))
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step-00000005", "step-00000006"]
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]


def test_resume_after_crash_is_bit_identical(tokenizer, cache_dir, teacher_dir, tmp_path):
    tcfg = _tcfg(max_steps=6, save_interval=2, gradient_accumulation_steps=2, log_interval=1)
    straight = _run(tokenizer, cache_dir, teacher_dir, tmp_path / "a", tcfg)

    class Crash(Exception):
        pass

    def crash_at_3(step, _record):
        if step == 3:
            raise Crash  # 模拟进程在第 3 步后被杀：第 3 步的进度没有存盘

    with pytest.raises(Crash):
        _run(tokenizer, cache_dir, teacher_dir, tmp_path / "b", tcfg, on_step_end=crash_at_3)
    assert [p.name for p in list_checkpoints(tmp_path / "b" / "checkpoints")] == ["step-00000002"]
    resumed = _run(tokenizer, cache_dir, teacher_dir, tmp_path / "b", tcfg, resume=True)
    assert resumed.step == 6
    logged = [r["step"] for r in _metrics(tmp_path / "b") if r["kind"] == "train"]
    assert logged == [1, 2, 3, 4, 5, 6]  # 崩溃前写出的第 3 步记录被丢掉后重算，没有重复
    assert [r["step"] for r in _metrics(tmp_path / "b") if r["kind"] == "eval"] == [3, 6]
    for key, value in straight.params.items():
        assert torch.equal(value, resumed.params[key]), key
    _, _, tensors, state = load_checkpoint(resumed.last_checkpoint)
    assert state["step"] == 6 and state["loader"]["position"] == straight_loader_position(tcfg)


def straight_loader_position(tcfg):
    return 6 * tcfg.gradient_accumulation_steps  # 一轮远未用完，位置就是已取的批数


def test_sigint_saves_and_exits_cleanly(tokenizer, cache_dir, teacher_dir, tmp_path):
    tcfg = _tcfg(max_steps=6, save_interval=100)

    def interrupt_at_2(step, _record):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)

    previous = signal.getsignal(signal.SIGINT)
    result = _run(tokenizer, cache_dir, teacher_dir, tmp_path, tcfg, on_step_end=interrupt_at_2)
    assert result.interrupted and result.step == 2
    assert signal.getsignal(signal.SIGINT) is previous  # 处理器已还原
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step-00000002"]
    resumed = _run(tokenizer, cache_dir, teacher_dir, tmp_path, tcfg, resume=True)
    assert resumed.step == 6 and not resumed.interrupted


def test_non_finite_loss_stops_without_saving_it(tokenizer, cache_dir, teacher_dir, tmp_path):
    tcfg = _tcfg(max_steps=6, save_interval=2)
    student = Model(init_params(STUDENT, seed=3), STUDENT)

    def poison_at_3(step, _record):
        if step == 3:
            raise_nan.append(True)

    raise_nan: list[bool] = []
    teacher = _teacher(teacher_dir)
    original = teacher.params["model.norm.weight"]

    def poisoned_step(step, record):
        if step == 3:  # 第 4 步起教师输出 NaN
            teacher.params["model.norm.weight"] = torch.full_like(original, float("nan"))

    with pytest.raises(NonFiniteLossError, match=r"step 4.*last good checkpoint: .*step-00000002"):
        train(
            student, teacher, _data(tokenizer, cache_dir), tcfg, tmp_path,
            real_vocab_size=tokenizer.real_vocab_size, progress=False, on_step_end=poisoned_step,
        )
    names = [p.name for p in list_checkpoints(tmp_path / "checkpoints")]
    assert names == ["step-00000002"]
    for ckpt in list_checkpoints(tmp_path / "checkpoints"):
        _, params, _, _ = load_checkpoint(ckpt)
        assert all(torch.isfinite(v).all() for v in params.values())


def test_cross_entropy_only_training_without_teacher(tokenizer, cache_dir, tmp_path):
    # 没有教师（演示教师的预训练）：α 必须为 0，损失只有交叉熵且下降。
    with pytest.raises(ValueError, match="needs alpha=0"):
        train(Model(init_params(STUDENT), STUDENT), None, _data(tokenizer, cache_dir), _tcfg(), tmp_path / "x",
              progress=False)
    tcfg = _tcfg(alpha=0.0, max_steps=12, eval_interval=4, save_interval=100, learning_rate=3e-2)
    result = train(
        Model(init_params(STUDENT, seed=3), STUDENT), None, _data(tokenizer, cache_dir), tcfg, tmp_path,
        real_vocab_size=tokenizer.real_vocab_size, progress=False,
    )
    evals = [r for r in _metrics(tmp_path) if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [4, 8, 12]
    assert evals[0]["val_ce"] > evals[1]["val_ce"] > evals[2]["val_ce"]
    assert "val_kd" not in result.final_eval and result.final_eval["student_ppl"] > 1.0


def test_chunked_cross_entropy_matches_plain():
    from functional_lm.kd.objective import chunked_cross_entropy

    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 7, 8, generator=gen, requires_grad=True)
    weight = torch.randn(50, 8, generator=gen, requires_grad=True)
    labels = torch.randint(0, 45, (2, 7), generator=gen)
    mask = torch.rand(2, 7, generator=gen) > 0.3
    labels[0, 0] = -100
    chunked = chunked_cross_entropy(hidden, weight, labels, mask, real_vocab_size=45, chunk_size=4)
    g_chunked = torch.autograd.grad(chunked, (hidden, weight))
    logits = hidden @ weight[:45].T
    target = torch.where(mask, labels, -100)
    plain = torch.nn.functional.cross_entropy(logits.reshape(-1, 45), target.reshape(-1), ignore_index=-100)
    g_plain = torch.autograd.grad(plain, (hidden, weight))
    torch.testing.assert_close(chunked, plain)
    for a, b in zip(g_chunked, g_plain):
        torch.testing.assert_close(a, b)
    assert g_chunked[1][45:].abs().max() == 0  # 填充行没有梯度


def test_compile_and_bf16_options(tokenizer, cache_dir, teacher_dir, tmp_path):
    # TrainingConfig.compile：编译真的发生（dynamo 捕获了图），损失轨迹与 eager 相同。
    fresh_dynamo()
    base = _tcfg(max_steps=3, log_interval=1, save_interval=100, eval_interval=100)
    eager = _run(tokenizer, cache_dir, teacher_dir, tmp_path / "eager", base)
    compiled = _run(tokenizer, cache_dir, teacher_dir, tmp_path / "compiled", base.replace(compile=True))
    assert dynamo_graph_count() >= 2  # 学生与教师的前向（至少），没有悄悄退回 eager
    assert len(eager.history) == len(compiled.history) == 3
    for a, b in zip(eager.history, compiled.history):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)


def test_bf16_runs_stay_within_the_measured_bound_of_fp32(tokenizer, cache_dir, teacher_dir, tmp_path):
    # 每个记录的步上，bf16（学生 autocast、教师 bf16 权重）的损失与 fp32 的相对误差 ≤ 5e-4。
    # 这台机器上 6 步实测的最大相对误差：学生 autocast 8e-6，教师 bf16 6.4e-5，两者同时 6.3e-5。
    base = _tcfg(max_steps=6, log_interval=1, save_interval=100, eval_interval=100)
    reference = _run(tokenizer, cache_dir, teacher_dir, tmp_path / "fp32", base)
    for name, changes in (("student", {"bf16": True}), ("teacher", {"teacher_bf16": True}),
                          ("both", {"bf16": True, "teacher_bf16": True})):
        low = _run(tokenizer, cache_dir, teacher_dir, tmp_path / name, base.replace(**changes))
        assert len(low.history) == len(reference.history) == 6
        errors = [abs(a["loss"] - b["loss"]) / b["loss"] for a, b in zip(low.history, reference.history)]
        assert max(errors) <= 5e-4, (name, errors)
        assert max(errors) > 0, name  # bf16 真的起了作用，而不是原样走了 fp32


def test_training_into_a_directory_that_holds_a_run_is_refused(tokenizer, cache_dir, teacher_dir, tmp_path):
    from functional_lm.errors import RunDirError

    _run(tokenizer, cache_dir, teacher_dir, tmp_path, _tcfg(max_steps=2, save_interval=2))
    with pytest.raises(RunDirError, match=r"already holds a training run \(checkpoints step-00000002"):
        _run(tokenizer, cache_dir, teacher_dir, tmp_path, _tcfg(max_steps=2, save_interval=2))
    assert [r["step"] for r in _metrics(tmp_path) if r["kind"] == "train"] == [2]


def test_progress_bar_says_when_it_pauses_to_evaluate(tokenizer, cache_dir, teacher_dir, tmp_path, monkeypatch):
    import functional_lm.kd.trainer as train_module

    descriptions = []

    postfixes = []

    class Bar:
        def update(self, n=1): descriptions.append(("step",))
        def set_description(self, text): descriptions.append(text)
        def set_postfix(self, ordered_dict=None, **kw): postfixes.append(dict(ordered_dict or {}) | kw)
        def write(self, text): pass
        def close(self): pass

    monkeypatch.setattr(train_module, "progress_bar", lambda *a, **k: Bar())
    _run(tokenizer, cache_dir, teacher_dir, tmp_path, _tcfg(max_steps=2, eval_interval=1, save_interval=100))
    # 第 1 步之后验证一次（说明暂停、再恢复），结束时的最终验证同样如此。
    assert descriptions == [("step",), "distill (evaluating)", "distill", ("step",), "distill (evaluating)", "distill"]
    (logged,) = [r for r in _metrics(tmp_path) if r["kind"] == "train"]  # log_interval 2：第 2 步一条
    assert postfixes == [{"loss": f"{logged['loss']:.4f}", "kd": f"{logged['kd']:.4f}", "ce": f"{logged['ce']:.4f}",
                          "lr": f"{logged['lr']:.2e}", "tok/s": f"{logged['tokens_per_s']:.0f}"}]


def test_without_the_bar_every_record_is_one_line(tokenizer, cache_dir, teacher_dir, tmp_path, capsys):
    """progress=False（命令行的 --no-progress）：不画进度条，每条训练记录与验证记录各打印一行（stderr），
    字段与进度条的后缀相同；数值与 metrics.jsonl 里的记录一致。"""
    _run(tokenizer, cache_dir, teacher_dir, tmp_path, _tcfg(max_steps=5, log_interval=2, eval_interval=4, save_interval=100))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("[train] step")]
    expected = []
    for r in _metrics(tmp_path):
        if r["kind"] == "train":
            expected.append(f"[train] step {r['step']}/5: loss {r['loss']:.4f}, kd {r['kd']:.4f}, ce {r['ce']:.4f}, "
                            f"lr {r['lr']:.2e}, tok/s {r['tokens_per_s']:.0f}")
        else:
            shown = ", ".join(f"{k} {v:.4g}" for k, v in r.items() if k not in ("kind", "step", "val_tokens"))
            expected.append(f"[train] step {r['step']}/5 validation: {shown}")
    assert [r["step"] for r in _metrics(tmp_path)] == [2, 4, 4, 5, 5]  # 训练 2、4、5（最后一步），验证 4、5
    assert lines == expected
    assert "val_ce" in lines[2] and "top1_agreement" in lines[2]
    assert "distill:" not in err and "step/s" not in err and "it/s" not in err  # 没有 tqdm 进度条


def test_a_signal_on_a_save_step_saves_once(tokenizer, cache_dir, teacher_dir, tmp_path, monkeypatch):
    import functional_lm.kd.saver as train_module

    saved = []
    real_save = train_module.save_checkpoint
    monkeypatch.setattr(train_module, "save_checkpoint", lambda root, step, *a, **k: saved.append(step) or real_save(root, step, *a, **k))

    def interrupt_at_2(step, _record):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)

    result = _run(tokenizer, cache_dir, teacher_dir, tmp_path, _tcfg(max_steps=6, save_interval=2), on_step_end=interrupt_at_2)
    assert result.interrupted and result.step == 2 and saved == [2]


# ---------------------------------------------------------------- 恢复：轮次边界与 dropout 的随机数
@pytest.fixture(scope="module")
def small_data_file(tmp_path_factory):
    """12 篇短文档：seq_len 32、batch 2 时训练集 11 块，一轮 5 批——几步之内就跨过轮次边界。"""
    path = tmp_path_factory.mktemp("small") / "small.jsonl"
    rows = [{"text": f"Doc {i}: " + "the quick brown fox jumps over the lazy dog. " * 3} for i in range(12)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def _small_run(tokenizer, cache_dir, teacher_dir, run_dir, tcfg, data_file, student_cfg=STUDENT, **kwargs):
    data = prepare_data(
        [str(data_file)], tokenizer=tokenizer, seq_len=32, batch_size=tcfg.batch_size, val_fraction=0.1, seed=0,
        cache_dir=cache_dir, model_config=student_cfg, progress=False,
    )
    assert len(data.train_loader) == 5
    return train(
        Model(init_params(student_cfg, seed=3), student_cfg), _teacher(teacher_dir), data, tcfg, run_dir,
        real_vocab_size=tokenizer.real_vocab_size, progress=False, **kwargs,
    )


class _Crash(Exception):
    pass


def _crash_at(step_to_crash):
    def callback(step, _record):
        if step == step_to_crash:
            raise _Crash

    return callback


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_resume_from_the_checkpoint_that_ends_an_epoch_is_bit_identical(
    tokenizer, cache_dir, teacher_dir, small_data_file, tmp_path, dropout
):
    # 一轮 5 批：第 5 步的检查点正好结束第 0 轮（位置 = 5 = len），恢复后第 6 步起读第 1 轮的新顺序。
    # dropout > 0 时结果还取决于恢复的 torch RNG 状态（删掉 restore_rng 这个测试就失败）。
    student = STUDENT.replace(dropout=dropout)
    tcfg = _tcfg(max_steps=8, save_interval=5, log_interval=1, eval_interval=100)
    straight = _small_run(tokenizer, cache_dir, teacher_dir, tmp_path / "a", tcfg, small_data_file, student)
    with pytest.raises(_Crash):
        _small_run(tokenizer, cache_dir, teacher_dir, tmp_path / "b", tcfg, small_data_file, student,
                   on_step_end=_crash_at(7))
    _, _, _, state = load_checkpoint(tmp_path / "b" / "checkpoints" / "step-00000005")
    assert state["loader"]["epoch"] == 0 and state["loader"]["position"] == 5  # 恰好读完第 0 轮
    resumed = _small_run(tokenizer, cache_dir, teacher_dir, tmp_path / "b", tcfg, small_data_file, student,
                         resume=True)
    assert resumed.step == 8
    for key, value in straight.params.items():
        assert torch.equal(value, resumed.params[key]), key
    assert [r["loss"] for r in straight.history[-3:]] == [r["loss"] for r in resumed.history]


def test_dropout_is_off_in_eval_and_reproducible_in_training():
    cfg = STUDENT.replace(vocab_size=300, dropout=0.3)
    params = init_params(cfg, seed=1)
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    plain = forward(params, ids, cfg.replace(dropout=0.0))
    assert torch.equal(forward(params, ids, cfg), plain)  # 验证 / 推理：dropout 不起作用
    torch.manual_seed(7)
    first = forward(params, ids, cfg, training=True)
    torch.manual_seed(7)
    again = forward(params, ids, cfg, training=True)
    assert torch.equal(first, again)  # 同一种子：同样的 dropout 掩码
    assert not torch.allclose(first, plain, atol=1e-4)  # 训练时 dropout 确实改变了输出
    assert not torch.equal(forward(params, ids, cfg, training=True), first)  # 不同的随机数：不同的掩码


# ---------------------------------------------------------------- 梯度累积、优化器
def test_accumulation_equals_the_big_batch(tokenizer, cache_dir, teacher_dir, tmp_path):
    # batch 4 × 累积 1 与 batch 2 × 累积 2 每步读同样的 4 个块；梯度按全局有效 token 数归一化，参数应相同。
    big = _run(tokenizer, cache_dir, teacher_dir, tmp_path / "big",
               _tcfg(batch_size=4, max_steps=3, save_interval=100, eval_interval=100, log_interval=1),
               data=_data(tokenizer, cache_dir, batch_size=4))
    small = _run(tokenizer, cache_dir, teacher_dir, tmp_path / "small",
                 _tcfg(batch_size=2, gradient_accumulation_steps=2, max_steps=3, save_interval=100,
                       eval_interval=100, log_interval=1))
    for key, value in big.params.items():
        torch.testing.assert_close(value, small.params[key], rtol=1e-5, atol=1e-6, msg=key)
    for a, b in zip(big.history, small.history):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)


def test_optimizer_groups_and_a_tiny_clip_bounds_the_update(tokenizer, cache_dir, teacher_dir, tmp_path):
    from functional_lm.kd.step import build_optimizer

    params = init_params(STUDENT, seed=3)
    names = {id(v): k for k, v in params.items()}
    decay, keep = build_optimizer(params, TrainingConfig(weight_decay=0.1)).param_groups
    assert decay["weight_decay"] == 0.1 and keep["weight_decay"] == 0.0
    assert sorted(names[id(p)] for p in keep["params"]) == sorted(
        k for k in params if k.endswith((".bias", "norm.weight"))
    )
    assert sorted(names[id(p)] for p in decay["params"]) == [
        "model.embed_tokens.weight", *sorted(f"model.layers.0.{n}.weight" for n in (
            "mlp.down_proj", "mlp.gate_proj", "mlp.up_proj", "self_attn.k_proj", "self_attn.o_proj",
            "self_attn.q_proj", "self_attn.v_proj"))
    ]
    # AdamW 的第一步 ≈ lr·g/(|g| + ε)：裁剪到 1e-12 后 |g| ≪ ε = 1e-8，每个元素的更新 ≤ lr·1e-12/1e-8；
    # 不裁剪（clip = 1e9）时更新约为 lr。
    for clip, bound in ((1e-12, 1e-2 * 1e-12 / 1e-8), (1e9, None)):
        tcfg = _tcfg(max_steps=1, warmup_steps=0, weight_decay=0.0, gradient_clip=clip, save_interval=100,
                     eval_interval=100, log_interval=1)
        result = _run(tokenizer, cache_dir, teacher_dir, tmp_path / f"clip{clip}", tcfg)
        moved = max((result.params[k] - v).abs().max().item() for k, v in params.items())
        assert result.history[0]["grad_norm"] > 1e-3  # 记录的是裁剪前的范数
        if bound is not None:
            assert moved <= bound * 1.01, moved
        else:
            assert moved == pytest.approx(tcfg.learning_rate, rel=0.01)


# ---------------------------------------------------------------- 验证的数值
def test_evaluation_of_a_teacher_identical_to_the_student(tokenizer, cache_dir):
    from functional_lm.kd.evaluate import evaluate

    data = _data(tokenizer, cache_dir)
    student = Model(init_params(STUDENT, seed=5), STUDENT)
    twin = Model({k: v.clone() for k, v in student.params.items()}, STUDENT)
    scores = evaluate(student, twin, data.val_loader, _tcfg(), real_vocab_size=tokenizer.real_vocab_size,
                      max_batches=2)
    assert scores["kl_teacher_student"] == pytest.approx(0.0, abs=1e-6)
    assert scores["val_kd"] == pytest.approx(0.0, abs=1e-6)
    assert scores["top1_agreement"] == 1.0
    assert scores["student_ppl"] == pytest.approx(scores["teacher_ppl"], rel=1e-6)


def test_evaluation_against_a_hand_computed_case(tokenizer, cache_dir, teacher_dir):
    # 学生的最终范数权重为 0 ⇒ 隐藏状态为 0 ⇒ logits 全为 0 ⇒ 在真实词表上均匀分布：
    # CE = ln V，困惑度 = V；KL(教师 ‖ 均匀) = ln V − H(P)，H(P) 用 torch.softmax 在教师的完整 logits 上直接算。
    from functional_lm.kd.evaluate import evaluate
    from functional_lm.kd.objective import count_valid_tokens

    data = _data(tokenizer, cache_dir)
    params = init_params(STUDENT, seed=5)
    params["model.norm.weight"] = torch.zeros_like(params["model.norm.weight"])
    teacher = _teacher(teacher_dir)
    V = tokenizer.real_vocab_size
    scores = evaluate(Model(params, STUDENT), teacher, data.val_loader, _tcfg(), real_vocab_size=V, max_batches=1)
    assert scores["val_ce"] == pytest.approx(math.log(V), rel=1e-6)
    assert scores["student_ppl"] == pytest.approx(V, rel=1e-4)
    batch = data.val_loader.batch_at(0, 0)
    valid = (batch.labels != -100) & batch.loss_mask
    with torch.no_grad():
        logits = forward(teacher.params, batch.input_ids, teacher.cfg)[..., :V].double()
    p = logits.softmax(-1)
    entropy = -(p * p.log()).sum(-1)
    expected = (math.log(V) - entropy)[valid].mean().item()
    assert scores["kl_teacher_student"] == pytest.approx(expected, rel=1e-4)
    assert scores["val_tokens"] == count_valid_tokens(batch)
    # 学生 logits 全相等，argmax 取第 0 列；一致率 = 教师 argmax 恰为 0 的比例
    agree = (logits.argmax(-1) == 0)[valid].double().mean().item()
    assert scores["top1_agreement"] == pytest.approx(agree)


def test_training_leaves_the_callers_parameters_untouched(tokenizer, cache_dir, teacher_dir, tmp_path):
    student = Model(init_params(STUDENT, seed=3), STUDENT)
    before = {k: v.clone() for k, v in student.params.items()}
    result = train(student, _teacher(teacher_dir), _data(tokenizer, cache_dir),
                   _tcfg(max_steps=2, save_interval=100, eval_interval=100), tmp_path,
                   real_vocab_size=tokenizer.real_vocab_size, progress=False)
    assert all(torch.equal(student.params[k], before[k]) for k in before)  # 训练在自己的拷贝上进行
    assert not all(torch.equal(result.params[k], before[k]) for k in before)


def test_training_leaves_the_shape_check_switch_alone(tokenizer, cache_dir, teacher_dir, tmp_path, monkeypatch):
    import functional_lm.kd.step as train_module
    from functional_lm.shapes import typecheck, typecheck_enabled

    seen = []
    real = train_module.teacher_hidden_states
    monkeypatch.setattr(train_module, "teacher_hidden_states",
                        lambda *a: seen.append(typecheck_enabled()) or real(*a))
    with typecheck(False):
        _run(tokenizer, cache_dir, teacher_dir, tmp_path, _tcfg(max_steps=2, save_interval=100, eval_interval=100))
    assert seen == [False, False]  # 用户关掉的检查，训练中途（教师前向时）不会被打开


def test_throughput_excludes_evaluation_and_saving(monkeypatch):
    import functional_lm.runs.monitor as monitor
    from functional_lm.kd.step import StepStats

    clock = iter([0.0, 10.0, 40.0, 50.0, 50.0])  # 开始；暂停开始；暂停结束；记录；记录后重新计时
    monkeypatch.setattr(monitor.time, "perf_counter", lambda: next(clock))
    window = monitor.Window()
    window.add(StepStats(1.0, 0.5, 2.0, 1.0, 1e-3, tokens=1000))
    with window.paused():  # 验证 / 保存用了 30 秒
        pass
    record = window.record(1, StepStats(1.0, 0.5, 2.0, 1.0, 1e-3, tokens=1000))
    assert record["tokens_per_s"] == pytest.approx(1000 / 20.0)  # 50 − 30 = 20 秒的训练


# ---------------------------------------------------------------- 文档掩码（issue 13）
def _spy_segment_ids(monkeypatch):
    """记下每次解码（学生、教师、验证）收到的 segment_ids。"""
    import functional_lm.models.decoder as model_module

    seen, real = [], model_module.decode_embeddings

    def spy(*args, **kwargs):
        seen.append(kwargs.get("segment_ids"))
        return real(*args, **kwargs)

    monkeypatch.setattr(model_module, "decode_embeddings", spy)
    return seen


def _short_documents(tokenizer, cache_dir, tmp_path):
    """短文档的数据：32 个 token 的块里总有好几篇。"""
    short = tmp_path / "short.jsonl"
    short.write_text("\n".join(json.dumps({"text": f"Note {i}: tea at {i % 7} o'clock."}) for i in range(120)))
    return prepare_data(
        [str(short)], tokenizer=tokenizer, seq_len=32, batch_size=2, val_fraction=0.05, seed=0,
        cache_dir=cache_dir, model_config=STUDENT, progress=False,
    )


def test_evaluate_scores_the_tokens_of_its_own_document_mask(tokenizer, cache_dir, tmp_path):
    # 验证的标签与注意力用同一个设置：传进来的加载器设置不同时，evaluate 自己换成 tcfg.document_mask 的那一种。
    from functional_lm.kd.evaluate import evaluate

    data = _short_documents(tokenizer, cache_dir, tmp_path)
    student = Model(init_params(STUDENT, seed=3), STUDENT)
    tcfg = _tcfg(alpha=0.0)
    real = tokenizer.real_vocab_size
    given = evaluate(student, None, data.val_loader, tcfg, real_vocab_size=real)
    matched = evaluate(student, None, data.val_loader.relayout(document_mask=True), tcfg, real_vocab_size=real)
    old = evaluate(student, None, data.val_loader, tcfg.replace(document_mask=False), real_vocab_size=real)
    assert given == matched
    assert given["val_tokens"] < old["val_tokens"]  # 跨文档的标签不计入


def test_document_mask_off_runs_the_previous_computation(tokenizer, cache_dir, teacher_dir, tmp_path, monkeypatch):
    # document_mask=False：模型从不收到 segment_ids（注意力跨文档、位置不重数），标签与打包器以前给的完全相同；
    # 这正是以前的训练器的输入，所以轨迹逐位相同。打开时每次前向都带着编号，结果确实不同。
    seen = _spy_segment_ids(monkeypatch)
    data = _short_documents(tokenizer, cache_dir, tmp_path)
    off = _run(tokenizer, cache_dir, teacher_dir, tmp_path / "off", _tcfg(max_steps=3, document_mask=False), data)
    assert seen and all(s is None for s in seen)
    seen.clear()
    on = _run(tokenizer, cache_dir, teacher_dir, tmp_path / "on", _tcfg(max_steps=3), data)
    assert seen and all(isinstance(s, torch.Tensor) for s in seen)
    assert any(int(s.max()) > 0 for s in seen)  # 真有多篇文档打包在同一行
    assert any(not torch.equal(off.params[k], on.params[k]) for k in off.params)
    # 关掉时加载器交出的批就是以前的批：标签里没有因为文档边界而多出的 −100。
    plain = data.train_loader.batch_at(0, 0)
    masked = data.train_loader.relayout(document_mask=True).batch_at(0, 0)
    assert int((plain.labels == -100).sum()) < int((masked.labels == -100).sum())


# ---------------------------------------------------------------- 稀疏教师：在线 top-k 与教师缓存（issue 14）
def _cache_for(data, teacher_dir, tmp_path, tokenizer, top_k, temperature=2.0):
    from functional_lm.kd.cache_build import build_teacher_cache
    from functional_lm.kd.teacher_cache import TeacherCache, make_fingerprint

    teacher = _teacher(teacher_dir)
    fp = make_fingerprint(tokenizer, data.store, teacher_weights="test-teacher", split="train", val_fraction=0.05, seed=0)
    build_teacher_cache(
        teacher.params, teacher.cfg, data.train_loader.dataset, tmp_path / "cache", top_k=top_k,
        temperature=temperature, fingerprint=fp, real_vocab_size=tokenizer.real_vocab_size, batch_size=2,
        blocks_per_shard=8, progress=False,
    )
    return TeacherCache.open(tmp_path / "cache", verify=True)


def test_a_student_distilled_from_the_cache_equals_the_live_top_k_student(tokenizer, cache_dir, teacher_dir, tmp_path):
    data = _short_documents(tokenizer, cache_dir, tmp_path)  # 小数据：缓存要覆盖训练集的每一个块
    tcfg = _tcfg(max_steps=4, top_k=8)
    live = _run(tokenizer, cache_dir, teacher_dir, tmp_path / "live", tcfg, data)
    cache = _cache_for(data, teacher_dir, tmp_path, tokenizer, top_k=8)
    student = Model(init_params(STUDENT, seed=3), STUDENT)
    cached = train(student, None, data, tcfg, tmp_path / "cached", real_vocab_size=tokenizer.real_vocab_size,
                   progress=False, teacher_cache=cache)
    for key, value in live.params.items():
        assert (value - cached.params[key]).abs().max() <= 1e-6, key
    dense = _run(tokenizer, cache_dir, teacher_dir, tmp_path / "dense", tcfg.replace(top_k=0), data)
    assert any(not torch.equal(dense.params[k], live.params[k]) for k in live.params)  # 稀疏确实不同于稠密


def test_a_cache_that_does_not_match_the_run_is_refused_by_field(tokenizer, cache_dir, teacher_dir, tmp_path):
    data = _short_documents(tokenizer, cache_dir, tmp_path)
    cache = _cache_for(data, teacher_dir, tmp_path, tokenizer, top_k=8)
    student = Model(init_params(STUDENT, seed=3), STUDENT)
    with pytest.raises(ValueError, match=r"top_k: the cache has 8, this run uses 16.*temperature: the cache has 2.0"):
        train(student, None, data, _tcfg(top_k=16, temperature=1.5), tmp_path / "run",
              real_vocab_size=tokenizer.real_vocab_size, progress=False, teacher_cache=cache)
