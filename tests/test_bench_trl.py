"""bench_trl 的纯函数：不装 TRL 也能导入与核对（TRL 本身不在测试环境里，基准本身不在测试中运行）。

    * chat_pairs：提示与回复的 token 数按 transformers 的聊天模板（TRL 的整理器走的那条路）独立核对；
    * 设置映射：我们的命令行由本项目的解析器解析，TRL 的 β 与我们的散度用 TRL 的 GKD 公式独立重算后比较；
    * mask_newline_after_turn 与 StepClock 用手算的例子核对。
"""

import importlib
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

BENCH_DIR = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def bench_trl():
    sys.path.insert(0, str(BENCH_DIR))
    before = set(sys.modules)
    try:
        yield importlib.import_module("bench_trl")
    finally:
        sys.path.remove(str(BENCH_DIR))
        for name in set(sys.modules) - before:
            if name == "_bench_common" or name.startswith("bench_"):
                del sys.modules[name]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """(本项目的离线分词器, 同一份文件由 transformers 加载的分词器)。"""
    import transformers

    from functional_lm.data import load_tokenizer, save_default_tokenizer

    directory = save_default_tokenizer(tmp_path_factory.mktemp("tok"))
    return load_tokenizer(directory), transformers.AutoTokenizer.from_pretrained(directory)


def test_importing_needs_no_trl(bench_trl):
    assert "trl" not in sys.modules  # TRL 只在 TRL 一侧的子进程里导入


def test_chat_pairs_have_the_exact_lengths_transformers_sees(bench_trl, tokenizers):
    ours, hf = tokenizers
    pairs = bench_trl.chat_pairs(ours, 6, prompt_tokens=64, completion_tokens=64, seed=0)
    im_end, newline = hf.convert_tokens_to_ids("<|im_end|>"), hf("\n", add_special_tokens=False).input_ids
    for pair in pairs:
        messages = pair["messages"]
        assert [m["role"] for m in messages] == ["user", "assistant"]
        # TRL 的 DataCollatorForChatML：提示 = 除最后一条外套模板并加生成提示，整条 = 全部套模板
        prompt = hf(hf.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False),
                    add_special_tokens=False).input_ids
        full = hf(hf.apply_chat_template(messages, tokenize=False), add_special_tokens=False).input_ids
        assert len(prompt) == 64 and len(full) == 64 + 64 + 1  # 回复 64（内容 + <|im_end|>），再加模板的换行
        assert full[:64] == prompt and full[-2] == im_end and full[-1:] == newline
        assert hf.decode(full[64:-2]) == messages[1]["content"]


def test_chat_pairs_are_deterministic_and_seeded(bench_trl, tokenizers):
    ours, _ = tokenizers
    make = lambda seed: bench_trl.chat_pairs(ours, 3, 40, 16, seed=seed)  # noqa: E731
    assert make(0) == make(0)
    assert make(0) != make(1)
    with pytest.raises(ValueError, match="chat template"):
        bench_trl.chat_pairs(ours, 1, prompt_tokens=10, completion_tokens=16)  # 提示比模板本身还短


def test_chat_pairs_refuse_a_word_that_is_not_one_token(bench_trl, tokenizers, monkeypatch):
    monkeypatch.setattr(bench_trl, "WORDS", ["mountain"])  # 离线 Qwen 分词器里 "mountain" 不是一个 token
    with pytest.raises(ValueError, match="not a single token"):
        bench_trl.chat_pairs(tokenizers[0], 1, 40, 16)


def _args(bench_trl, *extra):
    return bench_trl.parse_args(list(extra))


def test_our_command_line_is_the_setting(bench_trl):
    # 我们一侧的命令行由本项目的解析器接受，字段正是设定规定的那些
    from functional_lm.cli import build_parser

    args = _args(bench_trl)
    work = {"teacher": "T", "data": "D.jsonl", "run": "R", "cache": "C", "seq_len": 129}
    for name, setting in bench_trl.ROWS.items():
        ns = vars(build_parser().parse_args(bench_trl.ours_argv(setting, work, args)))
        assert (ns["command"], ns["teacher"], ns["data"], ns["output_dir"], ns["seq_len"]) == ("distill", "T", ["D.jsonl"], "R", 129)
        assert {k: ns["field_" + k] for k in ("hidden_size", "num_layers", "num_heads", "num_kv_heads",
                                               "intermediate_size", "vocab_size")} == \
            {"hidden_size": "256", "num_layers": "4", "num_heads": "4", "num_kv_heads": "2",
             "intermediate_size": "1024", "vocab_size": "151936"}
        assert (ns["field_batch_size"], ns["field_max_steps"], ns["field_alpha"], ns["field_temperature"]) == ("4", "7", "1", "1")
        if setting.on_policy:
            assert (ns["field_on_policy_fraction"], ns["field_on_policy_divergence"], ns["field_max_new_tokens"],
                    ns["field_prompt_length"]) == ("1", "reverse_kl", "64", "64")
            assert "field_divergence" not in ns
        else:
            assert ns["field_divergence"] == setting.divergence and "field_on_policy_fraction" not in ns


def test_trl_config_maps_our_defaults(bench_trl):
    from functional_lm import TrainingConfig

    args, tcfg = _args(bench_trl), TrainingConfig()
    for setting in bench_trl.ROWS.values():
        kw = bench_trl.gkd_config_kwargs(setting, args, "out")
        assert (kw["lmbda"], kw["beta"], kw["temperature"], kw["max_new_tokens"]) == (setting.lmbda, setting.beta, 1.0, 64)
        assert kw["bf16"] is False and kw["gradient_checkpointing"] is False
        assert (kw["per_device_train_batch_size"], kw["gradient_accumulation_steps"], kw["max_steps"]) == (4, 1, 7)
        assert (kw["learning_rate"], kw["weight_decay"], kw["max_grad_norm"], kw["warmup_steps"]) == \
            (tcfg.learning_rate, tcfg.weight_decay, tcfg.gradient_clip, tcfg.warmup_steps)
        assert kw["train_sampling_strategy"] == "sequential" and kw["save_strategy"] == "no"
    on = bench_trl.ROWS["reverse_kl_on_policy"]
    assert on.lmbda == 1.0 and on.on_policy and not bench_trl.ROWS["forward_kl"].on_policy


def _trl_generalized_jsd(student_logits, teacher_logits, beta):
    """TRL GKDTrainer.generalized_jsd_loss 的定义（温度 1，逐 token，不归约），照它的文档与 GKD 论文式 (1) 重写。"""
    s, t = F.log_softmax(student_logits, -1), F.log_softmax(teacher_logits, -1)
    if beta == 0:
        return (t.exp() * (t - s)).sum(-1)  # KL(教师 ‖ 学生)
    if beta == 1:
        return (s.exp() * (s - t)).sum(-1)  # KL(学生 ‖ 教师)
    m = torch.logsumexp(torch.stack([s + torch.log1p(torch.tensor(-beta)), t + torch.log(torch.tensor(beta))]), 0)
    return beta * (t.exp() * (t - m)).sum(-1) + (1 - beta) * (s.exp() * (s - m)).sum(-1)


def test_trl_beta_is_our_divergence(bench_trl):
    # 每一行：TRL 的 β 下的广义 JSD 与我们映射到的散度（温度 1）逐 token 相等
    from functional_lm.losses import token_divergence

    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(5, 7, 50, generator=g, dtype=torch.float64), torch.randn(5, 7, 50, generator=g, dtype=torch.float64)
    for setting in bench_trl.ROWS.values():
        ours = token_divergence(student, teacher, divergence=setting.divergence, temperature=1.0, beta=0.5)
        torch.testing.assert_close(ours, _trl_generalized_jsd(student, teacher, setting.beta), rtol=1e-5, atol=1e-7)


def test_newline_after_turn_leaves_the_labels(bench_trl):
    im_end, nl = 7, 3
    ids = torch.tensor([[1, 2, 3, 4, 7, 3], [3, 7, 5, 7, 3, 3]])
    labels = torch.tensor([[-100, -100, 3, 4, 7, 3], [-100, 7, 5, 7, 3, 3]])
    out = bench_trl.mask_newline_after_turn(ids, labels, im_end, nl)
    assert out.tolist() == [[-100, -100, 3, 4, 7, -100], [-100, 7, 5, 7, -100, 3]]  # 只有 <|im_end|> 之后的那个换行
    assert labels[0, -1] == 3  # 不改输入的张量


def test_step_clock_times_between_step_ends(bench_trl):
    clock = bench_trl.StepClock()
    clock.ends = [(10.0, 1.0, 100.0), (13.0, 3.0, 150.0), (14.0, 4.5, 160.0), (19.0, 8.0, 170.0), (21.0, 9.0, 200.0)]
    clock.begins = [(9.0, 0.5, 90.0), (12.0, 2.0, 140.0), (13.5, 4.0, 155.0), (15.0, 5.0, 165.0), (20.5, 8.5, 190.0)]
    out = bench_trl.StepClock.summary(clock, warmup=2)  # 第 3、4、5 步：13→14、14→19 与 19→21
    assert out["all_step_s"] == [1.0, 5.0, 2.0] and out["step_s"] == 2.0
    assert out["all_cpu_s"] == [1.5, 3.5, 1.0] and out["cpu_s"] == 1.5
    assert out["begin_to_end_s"] == 0.5 and out["peak_rss_mib"] == 200.0 and out["steps"] == 5
