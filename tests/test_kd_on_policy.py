"""在线蒸馏（学生写、教师逐 token 打分）：来源的选择、提示、生成批的掩码与梯度、恢复、坏输入。

模型极小（词表必须容纳 Qwen2.5 的 151,665 个真实 token），几步训练。"""

import json

import pytest
import torch

from conftest import QWEN_VOCAB_STUDENT, QWEN_VOCAB_TEACHER, dynamo_graph_count, fresh_dynamo
from functional_lm import TrainingConfig, init_params
from functional_lm.runs.checkpoint import list_checkpoints
from functional_lm.data import Document, PackedDataset, load_tokenizer, prepare_data, tokenize_documents
from functional_lm.data.chat import encode_chat
from functional_lm.generate import generate
from functional_lm.losses import chunked_distillation_loss, distillation_loss
from functional_lm.models.decoder import forward, forward_hidden, output_weight
from functional_lm.kd.on_policy import (
    PromptTable,
    batch_source,
    source_settings,
    make_rollouts,
    rollout_seed,
    scoring_batch,
)
from functional_lm.kd.trainer import train
from functional_lm.kd.objective import Model, distill_loss

pytestmark = pytest.mark.usefixtures("qwen_tokenizer")

STUDENT, TEACHER = QWEN_VOCAB_STUDENT, QWEN_VOCAB_TEACHER


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(None)


@pytest.fixture(scope="module")
def data(tokenizer, tmp_path_factory):
    return prepare_data(
        None, tokenizer=tokenizer, seq_len=32, batch_size=2, val_fraction=0.05, seed=0,
        cache_dir=tmp_path_factory.mktemp("tokens"), model_config=STUDENT, progress=False,
    )


def _student(seed=3):
    params = init_params(STUDENT, seed=seed)
    return Model({k: v * 4.0 if k.endswith("proj.weight") else v for k, v in params.items()}, STUDENT)


def _teacher():
    params = init_params(TEACHER, seed=11)
    return Model({k: v * 8.0 if k.endswith("proj.weight") or k == "lm_head.weight" else v
                  for k, v in params.items()}, TEACHER)


def _tcfg(**changes):
    base = TrainingConfig(
        batch_size=2, learning_rate=1e-2, warmup_steps=2, max_steps=6, log_interval=1, eval_interval=3,
        save_interval=2, eval_batches=1, keep_last=3, prompt_length=8, max_new_tokens=8,
    )
    return base.replace(**changes)


def _train(data, tokenizer, run_dir, tcfg, **kwargs):
    return train(_student(), _teacher(), data, tcfg, run_dir, real_vocab_size=tokenizer.real_vocab_size,
                 progress=False, **kwargs)


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------- 来源与种子
def test_the_source_of_a_step_depends_only_on_seed_and_step():
    tcfg = TrainingConfig(on_policy_fraction=0.5, teacher_generated_fraction=0.25)
    sources = [batch_source(tcfg, step) for step in range(400)]
    assert sources == [batch_source(tcfg, step) for step in range(400)]  # 与调用顺序、全局随机数无关
    share = {s: sources.count(s) / 400 for s in ("student", "teacher", "data")}
    assert share["student"] == pytest.approx(0.5, abs=0.08)
    assert share["teacher"] == pytest.approx(0.25, abs=0.07)
    assert share["data"] == pytest.approx(0.25, abs=0.07)
    assert sources != [batch_source(tcfg.replace(seed=1), step) for step in range(400)]
    assert {batch_source(tcfg.replace(on_policy_fraction=1.0, teacher_generated_fraction=0.0), s) for s in range(50)} == {"student"}
    assert {batch_source(tcfg.replace(on_policy_fraction=0.0, teacher_generated_fraction=0.0), s) for s in range(50)} == {"data"}
    warm = tcfg.replace(on_policy_fraction=1.0, teacher_generated_fraction=0.0, on_policy_start=10)
    assert [batch_source(warm, s) for s in range(12)] == ["data"] * 10 + ["student"] * 2


def test_rollout_seeds_differ_for_every_seed_step_and_block():
    seeds = {rollout_seed(s, t, b) for s in range(3) for t in range(3) for b in range(3)}
    assert len(seeds) == 27 and all(0 <= x < 2**63 for x in seeds)


# ---------------------------------------------------------------- λ = 0
def test_lambda_zero_reproduces_the_trainer_bit_for_bit(data, tokenizer, tmp_path):
    plain = _train(data, tokenizer, tmp_path / "plain", _tcfg(prompt_length=64, max_new_tokens=64))
    # 生成相关的设置全部换掉，但 λ = τ = 0、不做在线验证：训练与以前的训练器逐位相同
    off = _tcfg(on_policy_fraction=0.0, teacher_generated_fraction=0.0, prompt_length=5, max_new_tokens=3,
                generation_temperature=0.3, generation_top_p=0.5, on_policy_divergence="jsd", on_policy_start=2,
                on_policy_eval=False)
    same = _train(data, tokenizer, tmp_path / "off", off)
    for key, value in plain.params.items():
        assert torch.equal(value, same.params[key]), key
    strip = lambda rs: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rs]  # noqa: E731
    assert strip(_records(tmp_path / "plain")) == strip(_records(tmp_path / "off"))
    assert all("sources" not in r and "on_policy_reverse_kl" not in r for r in _records(tmp_path / "off"))


# ---------------------------------------------------------------- 生成批的掩码与梯度
def _rollout_batch(data, tokenizer, tcfg, student=None, step=0):
    rollouts = make_rollouts(data.train_loader.dataset, tokenizer, tcfg, tokenizer.real_vocab_size)
    batch = data.train_loader.batch_at(0, step)
    student = student or _student()
    return rollouts.generated(student.params, student.cfg, batch, step, tcfg.seed), rollouts


def test_the_scoring_pass_sees_what_the_sampler_saw(data, tokenizer):
    # 贪心生成的每个 token 都是打分前向在前一位置的 argmax：左填充、位置与掩码和 KV 缓存里的一致
    student = _student()
    tcfg = _tcfg(generation_temperature=0.0, max_new_tokens=6)
    gen, rollouts = _rollout_batch(data, tokenizer, tcfg, student)
    logits = forward(student.params, gen.input_ids, STUDENT, segment_ids=gen.segment_ids)[..., : tokenizer.real_vocab_size]
    predicted = logits.argmax(-1)
    assert gen.loss_mask.any()
    assert torch.equal(predicted[gen.loss_mask], gen.labels[gen.loss_mask])
    prompt = torch.tensor([rollouts.prompts.prompt(int(b)) for b in data.train_loader.batch_at(0, 0).block_ids[:1]])
    direct = generate(student.params, STUDENT, prompt, 6, eos_token_id=list(rollouts.eos_ids))
    assert direct[0, prompt.shape[1]:].tolist()[: int(gen.loss_mask[0].sum())] == gen.labels[0][gen.loss_mask[0]].tolist()


def test_prompt_padding_and_tokens_after_eos_carry_exactly_zero_loss_and_gradient():
    eos = 7
    prompt = torch.tensor([[0, 0, 11, 12], [21, 22, 23, 24]])
    prompt_mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    new = torch.tensor([[31, eos, 33, 34], [41, 42, 43, 44]])
    gen = scoring_batch(prompt, prompt_mask, new, [eos])
    # 输入位置 i 预测 token i+1：提示（含填充）之后的生成 token 才计损失；第 0 行 EOS 计、EOS 之后不计
    assert gen.loss_mask.tolist() == [[False, False, False, True, True, False, False],
                                      [False, False, False, True, True, True, True]]
    assert gen.labels[0].tolist() == [-100, -100, -100, 31, eos, -100, -100]
    assert gen.segment_ids.tolist() == [[0, 0, 1, 1, 1, 1, 1], [0] * 7]

    cfg = STUDENT.replace(vocab_size=64, max_seq_len=16)
    tcfg_teacher = cfg.replace(tie_word_embeddings=False)
    student, teacher = init_params(cfg, seed=1), init_params(tcfg_teacher, seed=2)
    tcfg = source_settings(TrainingConfig(loss_chunk_size=4))["student"]

    def loss_and_hidden_grad(batch):
        hidden = forward_hidden(student, batch.input_ids, cfg, segment_ids=batch.segment_ids).detach().requires_grad_()
        t_hidden = forward_hidden(teacher, batch.input_ids, tcfg_teacher, segment_ids=batch.segment_ids)
        loss, _ = chunked_distillation_loss(
            hidden, output_weight(student, cfg), batch.labels, teacher_hidden=t_hidden,
            teacher_weight=teacher["lm_head.weight"], chunk_size=4, alpha=tcfg.alpha, temperature=tcfg.temperature,
            divergence=tcfg.divergence, real_vocab_size=64, loss_mask=batch.loss_mask, return_parts=True,
        )
        loss.backward()
        return loss.detach(), hidden.grad

    loss, grad = loss_and_hidden_grad(gen)
    assert loss > 0
    assert torch.count_nonzero(grad[~gen.loss_mask]) == 0  # 提示、填充与 EOS 之后：梯度恰为 0
    assert torch.count_nonzero(grad[gen.loss_mask]) > 0
    # 换掉填充 token 与 EOS 之后的 token：真实 token 看不到它们，损失逐位不变
    other = scoring_batch(prompt.index_put((torch.tensor([0, 0]), torch.tensor([0, 1])), torch.tensor([50, 51])),
                          prompt_mask, new.index_put((torch.tensor([0]), torch.tensor([3])), torch.tensor([60])), [eos])
    assert torch.equal(loss_and_hidden_grad(other)[0], loss)


def test_the_on_policy_gradient_is_the_gradient_of_the_plain_per_token_divergence(data, tokenizer):
    tcfg = _tcfg(on_policy_fraction=1.0, loss_chunk_size=16, temperature=1.5)
    gen, _ = _rollout_batch(data, tokenizer, tcfg)
    student, teacher = _student(), _teacher()
    real = tokenizer.real_vocab_size
    leaves = {k: v.clone().requires_grad_() for k, v in student.params.items()}
    t_hidden = forward_hidden(teacher.params, gen.input_ids, TEACHER, segment_ids=gen.segment_ids)
    loss, _ = distill_loss(leaves, STUDENT, gen, teacher, t_hidden, source_settings(tcfg)["student"], real_vocab_size=real)
    ours = torch.autograd.grad(loss, list(leaves.values()))

    ref_leaves = {k: v.clone().requires_grad_() for k, v in student.params.items()}
    s_logits = forward(ref_leaves, gen.input_ids, STUDENT, segment_ids=gen.segment_ids)
    t_logits = forward(teacher.params, gen.input_ids, TEACHER, segment_ids=gen.segment_ids)
    reference = distillation_loss(s_logits, t_logits, gen.labels, alpha=1.0, temperature=1.5, divergence="reverse_kl",
                                  real_vocab_size=real, loss_mask=gen.loss_mask)
    expected = torch.autograd.grad(reference, list(ref_leaves.values()))
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-6)
    for key, a, b in zip(leaves, ours, expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7, msg=key)


def test_a_row_samples_the_same_continuation_in_any_batch_split(data, tokenizer):
    # 每行的随机数来自 (seed, step, 块号)：四行一起生成与两行两行地生成（= 两个进程各一半）相同
    tcfg = _tcfg(on_policy_fraction=1.0, batch_size=4)
    loader = data.train_loader.relayout()
    rollouts = make_rollouts(loader.dataset, tokenizer, tcfg, tokenizer.real_vocab_size)
    student = Model({k: v.double() for k, v in _student().params.items()}, STUDENT)
    whole = data.train_loader.batch_at(0, 0)
    both = type(whole)(*(torch.cat([x, y]) for x, y in zip(whole, data.train_loader.batch_at(0, 1))))
    together = rollouts.generated(student.params, STUDENT, both, 5, 0)
    halves = [rollouts.generated(student.params, STUDENT, both.rows(i, i + 2), 5, 0) for i in (0, 2)]
    assert torch.equal(together.input_ids, torch.cat([h.input_ids for h in halves]))
    again = rollouts.generated(student.params, STUDENT, both, 6, 0)
    assert not torch.equal(again.input_ids, together.input_ids)  # 下一步采到别的续写


def test_the_compiled_decode_step_is_reused_across_training_steps(data, tokenizer):
    fresh_dynamo()
    tcfg = _tcfg(on_policy_fraction=1.0, compile_generation=True)  # 只编译解码步，训练的前向仍是 eager
    assert tcfg.compiles_generation and not tcfg.compile
    assert _tcfg(compile=True).compiles_generation and not _tcfg().compiles_generation  # auto = 同 compile
    rollouts = make_rollouts(data.train_loader.dataset, tokenizer, tcfg, tokenizer.real_vocab_size)
    student = _student()
    rollouts.generated(student.params, STUDENT, data.train_loader.batch_at(0, 0), 0, 0)
    graphs = dynamo_graph_count()
    assert graphs >= 1
    for step in (1, 2, 3):  # 参数变了、提示变了：同样的形状，不重新追踪
        params = {k: v + 0.01 * step for k, v in student.params.items()}
        rollouts.generated(params, STUDENT, data.train_loader.batch_at(0, step), step, 0)
    assert dynamo_graph_count() == graphs


# ---------------------------------------------------------------- 训练、恢复、验证
def test_on_policy_training_logs_sources_and_the_on_policy_metrics(data, tokenizer, tmp_path):
    tcfg = _tcfg(on_policy_fraction=0.5, teacher_generated_fraction=0.5, max_steps=4, eval_interval=2)
    result = _train(data, tokenizer, tmp_path / "run", tcfg)
    records = _records(tmp_path / "run")
    sources = [s for r in records if r["kind"] == "train" for s in r.get("sources", {"data": 1})]
    assert sources == [batch_source(tcfg, step) for step in range(4)]
    assert set(sources) == {"student", "teacher"}
    evals = [r for r in records if r["kind"] == "eval"]
    assert len(evals) == 2
    for record in evals:
        assert record["on_policy_reverse_kl"] > 0 and record["on_policy_teacher_nll"] > 0
        assert record["on_policy_tokens"] > 0 and "kl_teacher_student" in record
    assert result.final_eval["on_policy_reverse_kl"] == evals[-1]["on_policy_reverse_kl"]


def test_an_interrupted_on_policy_run_resumes_bit_identical(data, tokenizer, tmp_path):
    tcfg = _tcfg(on_policy_fraction=0.5, teacher_generated_fraction=0.25, max_steps=6, save_interval=2,
                 gradient_accumulation_steps=2, batch_size=1)
    straight = _train(data, tokenizer, tmp_path / "a", tcfg)
    assert {batch_source(tcfg, s) for s in range(2, 6)} >= {"student"}  # 恢复之后确有学生写的步

    class Crash(Exception):
        pass

    def crash_at_3(step, _record):
        if step == 3:
            raise Crash

    with pytest.raises(Crash):
        _train(data, tokenizer, tmp_path / "b", tcfg, on_step_end=crash_at_3)
    assert [p.name for p in list_checkpoints(tmp_path / "b" / "checkpoints")] == ["step-00000002"]
    resumed = _train(data, tokenizer, tmp_path / "b", tcfg, resume=True)
    for key, value in straight.params.items():
        assert torch.equal(value, resumed.params[key]), key
    strip = lambda rs: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rs]  # noqa: E731
    assert strip(_records(tmp_path / "a")) == strip(_records(tmp_path / "b"))


# ---------------------------------------------------------------- 对话提示
def _chat_store(tokenizer, conversations):
    docs = [Document(None, messages, "chat.jsonl", i + 1) for i, messages in enumerate(conversations)]
    return tokenize_documents(docs, tokenizer)


CHATS = [
    [{"role": "user", "content": f"Question {i}: what is {i} plus {i}?"},
     {"role": "assistant", "content": f"It is {2 * i}."},
     {"role": "user", "content": "Thanks."}, {"role": "assistant", "content": "You are welcome."}]
    for i in range(12)
]


def test_a_chat_prompt_is_the_conversation_up_to_the_assistant_turn(tokenizer):
    store = _chat_store(tokenizer, CHATS)
    dataset = PackedDataset(store, seq_len=24)
    from functional_lm.data.chat import role_header_ids

    table = PromptTable(dataset, prompt_length=64, user_header=role_header_ids(tokenizer))
    wanted = {tuple(encode_chat(tokenizer, c[:1], add_generation_prompt=True).input_ids) for c in CHATS}
    prompts = [tuple(table.prompt(k)) for k in range(len(dataset))]
    assert set(prompts) == wanted  # 每段对话都被某个块选中，提示与套模板、加生成提示的分词逐 token 相同
    assert tokenizer.decode(list(prompts[0])).endswith("<|im_start|>assistant\n")
    short = PromptTable(dataset, prompt_length=5, user_header=role_header_ids(tokenizer))
    assert [tuple(short.prompt(k)) for k in range(len(dataset))] == [p[-5:] for p in prompts]  # 从左边截


@pytest.mark.parametrize("bad, message", [
    ([{"role": "system", "content": "Be brief."}, {"role": "assistant", "content": "Hello."}], "no user turn"),
    ([{"role": "user", "content": "Hello?"}], "no assistant turn"),
])
def test_a_conversation_that_gives_no_prompt_is_a_clear_error(tokenizer, bad, message):
    store = _chat_store(tokenizer, [bad] + CHATS[:3])
    with pytest.raises(ValueError, match=message) as err:
        make_rollouts(PackedDataset(store, seq_len=24), tokenizer, TrainingConfig(prompt_length=8), 151665)
    assert str(err.value).startswith("chat.jsonl:1: this conversation has")  # 文档自带的来源与行号


# ---------------------------------------------------------------- 坏输入
@pytest.mark.parametrize("changes, message", [
    ({"on_policy_fraction": 1.5}, r"on_policy_fraction must be in \[0, 1\]"),
    ({"on_policy_fraction": -0.1}, r"on_policy_fraction must be in \[0, 1\]"),
    ({"on_policy_fraction": 0.6, "teacher_generated_fraction": 0.6}, "must be <= 1"),
    ({"max_new_tokens": 0}, "max_new_tokens must be > 0"),
    ({"generation_top_p": 1.5}, "generation_top_p"),
    ({"generation_temperature": -1.0}, "generation_temperature"),
    ({"on_policy_divergence": "kl"}, "on_policy_divergence"),
])
def test_bad_on_policy_settings_are_refused(changes, message):
    with pytest.raises(ValueError, match=message):
        TrainingConfig(**changes)


def test_a_rollout_that_overflows_max_seq_len_is_refused_before_training(data, tokenizer, tmp_path):
    with pytest.raises(ValueError, match=r"prompt_length 40 \+ max_new_tokens 30 = 70 overflows max_seq_len 64"):
        _train(data, tokenizer, tmp_path / "run", _tcfg(on_policy_fraction=0.5, prompt_length=40, max_new_tokens=30))
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_on_policy_without_a_teacher_model_is_refused(data, tokenizer, tmp_path):
    with pytest.raises(ValueError, match="need the teacher model"):
        train(_student(), None, data, _tcfg(on_policy_fraction=0.5, alpha=0.0), tmp_path / "run",
              real_vocab_size=tokenizer.real_vocab_size, progress=False)


# ---------------------------------------------------------------- 命令行
@pytest.fixture(scope="module")
def cli_root(tmp_path_factory):
    from conftest import write_teacher_and_data

    return write_teacher_and_data(tmp_path_factory.mktemp("cli"), TEACHER)


def _cli(root, out, data, *extra):
    from functional_lm.cli import main

    return main([
        "distill", "--teacher", str(root / "teacher"), "--data", str(data), "--preset", "tiny",
        "--vocab-size", "151936", "--hidden-size", "16", "--num-heads", "2", "--num-kv-heads", "1",
        "--seq-len", "32", "--batch-size", "2", "--max-steps", "2", "--eval-interval", "2", "--eval-batches", "1",
        "--cache-dir", str(root / "cache"), "--output-dir", str(out), "--no-progress", *extra,
    ])


@pytest.mark.parametrize("extra, message", [
    (["--on-policy-fraction", "1.5"], "TrainingConfig.on_policy_fraction must be in [0, 1]"),
    (["--on-policy-fraction", "0.5", "--prompt-length", "40", "--max-new-tokens", "30"],
     "prompt_length 40 + max_new_tokens 30 = 70 overflows max_seq_len 64"),
])
def test_the_command_line_refuses_bad_on_policy_settings_in_one_paragraph(cli_root, tmp_path, capsys, extra, message):
    assert _cli(cli_root, tmp_path / "run", cli_root / "data.jsonl", *extra) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_the_command_line_names_a_chat_row_without_a_user_turn(cli_root, tmp_path, capsys):
    rows = [{"messages": c} for c in CHATS[:6]]
    rows.insert(2, {"messages": [{"role": "system", "content": "Be brief."}, {"role": "assistant", "content": "Hi."}]})
    data = tmp_path / "chat.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    assert _cli(cli_root, tmp_path / "run", data, "--on-policy-fraction", "1", "--prompt-length", "16",
                "--max-new-tokens", "8", "--val-fraction", "0") == 2
    err = capsys.readouterr().err
    # 点名用户的文件与行（第 3 行），而不是内部的 token 缓存
    assert f"{data}:3: this conversation has no user turn before its first assistant reply" in err
    assert "token cache" not in err and "Traceback" not in err


def test_the_command_line_names_a_chat_row_without_an_assistant_turn(cli_root, tmp_path, capsys):
    rows = [{"messages": c} for c in CHATS[:6]]
    rows.insert(4, {"messages": [{"role": "user", "content": "Anyone there?"}]})
    data = tmp_path / "chat.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    assert _cli(cli_root, tmp_path / "run", data, "--on-policy-fraction", "1", "--prompt-length", "16",
                "--max-new-tokens", "8", "--val-fraction", "0") == 2
    err = capsys.readouterr().err
    assert f"{data}:5: this conversation has no assistant turn" in err
    assert "token cache" not in err and "Traceback" not in err


def test_chat_data_without_any_assistant_turn_is_refused_naming_the_file(cli_root, tmp_path, capsys):
    """离线蒸馏只在助手回复上计损失：一个助手回合都没有的对话文件什么也训练不了。以前运行“成功”结束，
    损失恒为 0、验证什么也没报告；现在在训练开始前点名文件报错。"""
    rows = [{"messages": c[:1]} for c in CHATS[:8]]  # 只有用户回合
    data = tmp_path / "questions.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    assert _cli(cli_root, tmp_path / "run", data) == 2
    err = capsys.readouterr().err
    assert f"{data}: none of the 8 conversations has an assistant turn, so no token counts toward the loss" in err
    assert "token cache" not in err and "Traceback" not in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_an_on_policy_run_from_the_command_line(cli_root, tmp_path, capsys):
    out = tmp_path / "run"
    assert _cli(cli_root, out, cli_root / "data.jsonl", "--on-policy-fraction", "1", "--prompt-length", "8",
                "--max-new-tokens", "8", "--log-interval", "1") == 0
    records = _records(out)
    assert [r.get("sources") for r in records if r["kind"] == "train"] == [{"student": 1}, {"student": 1}]
    assert [r["ce"] for r in records if r["kind"] == "train"] == [None, None]  # 没有数据批：数据上的 CE 不报
    assert records[-1]["kind"] == "eval" and records[-1]["on_policy_reverse_kl"] > 0
    settings = json.loads((out / "run.json").read_text())
    assert settings["training"]["on_policy_fraction"] == 1.0 and settings["training"]["max_new_tokens"] == 8
    report = (out / "report.md").read_text(encoding="utf-8")
    assert "on_policy_reverse_kl" in report
    assert "eval_curves.png" in report and (out / "eval_curves.png").is_file()  # 在线指标的曲线
