"""``functional-lm generate`` 命令：流式输出与 generate() 一致，分词器可有可无，错误给出清楚的退出码与消息。"""

import json
import subprocess
import sys

import pytest
from conftest import dynamo_graph_count, fresh_dynamo, tiny_config
from functional_lm.cli import main
from functional_lm.generate import generate
from functional_lm.hf import save_pretrained
from functional_lm.models.decoder import init_params

CFG = tiny_config()
EOS_WORD = "<|endoftext|>"


def _params():
    return {k: (v * 5 if k.endswith("proj.weight") or k.endswith("embed_tokens.weight") else v)
            for k, v in init_params(CFG, seed=11).items()}


def _word_tokenizer(directory):
    """词表 = w0 … w209 + <|endoftext|>（id 210）的 WordLevel 分词器，按空白切分。"""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(CFG.vocab_size - 1)} | {EOS_WORD: CFG.vocab_size - 1}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([EOS_WORD])
    directory.mkdir()
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": EOS_WORD, "pad_token": EOS_WORD}))
    return tok


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    save_pretrained(_params(), CFG, root / "plain")
    tok = _word_tokenizer(root / "tok")
    save_pretrained(_params(), CFG, root / "with_tok", tokenizer=root / "tok")
    return root, tok


def test_prompt_ids_stream_the_greedy_continuation(model_dir, capsys):
    root, _ = model_dir
    rc = main(["generate", "--model", str(root / "plain"), "--prompt-ids", "1,2,3", "--max-new-tokens", "6"])
    out = capsys.readouterr().out
    expected = generate(_params(), CFG, [[1, 2, 3]], max_new_tokens=6)[0, 3:].tolist()
    assert rc == 0
    assert [int(x) for x in out.split()] == expected


def test_compile_flag_gives_the_same_greedy_continuation(model_dir, capsys):
    """--compile 走编译的解码步（CPU 上少行 linear 改为流式求和）：贪心结果与 eager 相同。"""
    root, _ = model_dir
    fresh_dynamo()
    rc = main(["generate", "--model", str(root / "plain"), "--prompt-ids", "1,2,3", "--max-new-tokens", "6",
               "--compile"])
    out = capsys.readouterr().out
    assert dynamo_graph_count() == 1  # 解码步真的被编译（一张图，5 步复用）
    expected = generate(_params(), CFG, [[1, 2, 3]], max_new_tokens=6)[0, 3:].tolist()
    assert rc == 0
    assert [int(x) for x in out.split()] == expected


def test_sampling_options_are_passed_through(model_dir, capsys):
    root, _ = model_dir
    args = ["--temperature", "0.9", "--top-k", "20", "--top-p", "0.9", "--seed", "5"]
    rc = main(["generate", "--model", str(root / "plain"), "--prompt-ids", "4 5", "--max-new-tokens", "5", *args])
    out = capsys.readouterr().out
    expected = generate(_params(), CFG, [[4, 5]], max_new_tokens=5, temperature=0.9, top_k=20, top_p=0.9, seed=5)
    assert rc == 0 and [int(x) for x in out.split()] == expected[0, 2:].tolist()


def test_text_prompt_uses_the_checkpoint_tokenizer(model_dir, capsys):
    root, tok = model_dir
    rc = main(["generate", "--model", str(root / "with_tok"), "--prompt", "w1 w2 w3", "--max-new-tokens", "7"])
    captured = capsys.readouterr()
    out = captured.out
    assert captured.err == ""  # 分词器正常加载，没有退回或告警
    eos = CFG.vocab_size - 1
    new = generate(_params(), CFG, [[1, 2, 3]], max_new_tokens=7, eos_token_id=eos)[0, 3:].tolist()
    new = new[: new.index(eos)] if eos in new else new
    assert rc == 0
    assert out == tok.decode(new) + "\n"
    assert out.strip()  # 确实输出了文本


def test_text_prompt_without_tokenizer_is_a_clear_error(model_dir, capsys):
    root, _ = model_dir
    rc = main(["generate", "--model", str(root / "plain"), "--prompt", "hello"])
    err = capsys.readouterr().err
    assert rc == 2 and "tokenizer" in err and "--prompt-ids" in err


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--prompt-ids", "1,x,3"], "prompt-ids"),
        (["--prompt-ids", "1,999"], "vocab_size"),
        (["--prompt-ids", "1", "--top-p", "1.5"], "--top-p must be in (0, 1] (1 = off), got 1.5"),
        (["--prompt-ids", ",".join(["1"] * 64)], "the prompt has 64 tokens, but this model reads at most 64"),
        (["--prompt-ids", "1", "--max-new-tokens", "0"], "--max-new-tokens must be > 0, got 0"),
        (["--prompt-ids", "1", "--device", "tpu9"], "'tpu9' is not a device name"),
    ],
)
def test_bad_arguments_exit_with_2(model_dir, capsys, extra, match):
    root, _ = model_dir
    rc = main(["generate", "--model", str(root / "plain"), *extra])
    err = capsys.readouterr().err
    assert rc == 2 and match in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1  # 一段话，没有回溯


def test_cuda_request_without_cuda_says_so(model_dir, capsys, monkeypatch):
    # 没有 CUDA 的机器上 --device cuda：直说 CUDA 不可用，而不是怪罪 safetensors 文件。
    # 在 GPU 机器上也要跑（套件不允许 cuda 标记以外的跳过）：把 CUDA 藏起来，模拟一台没有 GPU 的机器。
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    root, _ = model_dir
    rc = main(["generate", "--model", str(root / "plain"), "--prompt-ids", "1", "--device", "cuda"])
    err = capsys.readouterr().err
    assert rc == 2 and "CUDA is not available" in err and "safetensors" not in err


def test_too_many_new_tokens_stop_at_the_model_length_with_a_note(model_dir, capsys):
    # 请求 500 个新 token，但 1 个 token 的提示之后只剩 63 个位置：生成 63 个，并在 stderr 说明。
    root, _ = model_dir
    rc = main(["generate", "--model", str(root / "plain"), "--prompt-ids", "1", "--max-new-tokens", "500"])
    captured = capsys.readouterr()
    expected = generate(_params(), CFG, [[1]], max_new_tokens=63)[0, 1:].tolist()
    assert rc == 0 and [int(x) for x in captured.out.split()] == expected
    assert "at most 63 new tokens" in captured.err and "prompt has 1 tokens" in captured.err
    assert "cache" not in captured.err and "left_pad" not in captured.err


def test_missing_model_dir_exits_with_2(tmp_path, capsys):
    rc = main(["generate", "--model", str(tmp_path / "nope" / "a" / "b"), "--prompt-ids", "1"])
    assert rc == 2 and "does not exist" in capsys.readouterr().err


def test_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0 and "generate" in capsys.readouterr().out


def test_module_entry_point_runs(model_dir):
    root, _ = model_dir
    proc = subprocess.run(
        [sys.executable, "-m", "functional_lm.cli", "generate", "--model", str(root / "plain"),
         "--prompt-ids", "7,8", "--max-new-tokens", "3", "--dtype", "float32"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    expected = generate(_params(), CFG, [[7, 8]], max_new_tokens=3)[0, 2:].tolist()
    assert [int(x) for x in proc.stdout.split()] == expected


# ---------------------------------------------------------------- 坏模型、坏分词器、坏提示：一段话
def _one_line(err):
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err.strip()


@pytest.fixture(scope="module")
def nan_model(tmp_path_factory):
    """范数权重全是 NaN 的检查点（其余同 _params()）。"""
    import torch

    directory = tmp_path_factory.mktemp("nan") / "model"
    params = {k: torch.full_like(v, float("nan")) if k.endswith("norm.weight") else v for k, v in _params().items()}
    save_pretrained(params, CFG, directory)
    return directory


@pytest.mark.parametrize("sampling", [[], ["--temperature", "0.8"]], ids=["greedy", "sampling"])
def test_nan_weights_are_refused_naming_the_model(nan_model, capsys, sampling):
    rc = main(["generate", "--model", str(nan_model), "--prompt-ids", "1,2,3", "--max-new-tokens", "3", *sampling])
    captured = capsys.readouterr()
    line = _one_line(captured.err)
    assert rc == 2 and captured.out == ""  # 没有打印任何（无意义的）token
    assert str(nan_model) in line and "NaN" in line and "model.layers.0.input_layernorm.weight" in line
    assert "5 of its weight tensors" in line  # 2 层 × 2 个范数 + 最后的范数


def test_overflow_in_float16_is_a_run_failure_with_a_hint(tmp_path, capsys):
    # 权重有限，但嵌入大到 float16 的 logits 溢出（|logit| ≈ 64·3e4 > 65504）；float32 中正常。
    import torch

    params = {k: (torch.full_like(v, 3e4) if k.endswith("embed_tokens.weight") else v) for k, v in _params().items()}
    save_pretrained(params, CFG, tmp_path / "big")
    assert main(["generate", "--model", str(tmp_path / "big"), "--prompt-ids", "1", "--max-new-tokens", "2"]) == 0
    capsys.readouterr()
    rc = main(["generate", "--model", str(tmp_path / "big"), "--prompt-ids", "1", "--max-new-tokens", "2",
               "--dtype", "float16"])
    line = _one_line(capsys.readouterr().err)
    assert rc == 1 and str(tmp_path / "big") in line and "--dtype float32" in line and "float16" in line


def test_nan_during_decoding_is_reported_after_the_stream(model_dir, monkeypatch, capsys):
    # 提示的 logits 有限，之后每个解码步都是 NaN：token 照常流出，流结束时报错（没有逐 token 同步），退出码 1。
    import torch

    import functional_lm.generate as gen

    real_step = gen.decode_step
    monkeypatch.setattr(gen, "decode_step", lambda *a: (lambda out: (out[0] * float("nan"), out[1]))(real_step(*a)))
    root, _ = model_dir
    rc = main(["generate", "--model", str(root / "plain"), "--prompt-ids", "1,2", "--max-new-tokens", "4"])
    captured = capsys.readouterr()
    line = _one_line(captured.err)
    assert rc == 1 and "while generating" in line and str(root / "plain") in line
    first = generate(_params(), CFG, [[1, 2]], max_new_tokens=1)[0, 2:].tolist()
    assert [int(x) for x in captured.out.split()] == first + [0, 0, 0]  # argmax(NaN) = 0：照常流出，最后才报错
    stream = gen.generate_stream(_params(), CFG, [[1, 2]], 4, check_finite=True)
    tokens = [next(stream) for _ in range(4)]
    assert len(tokens) == 4 and all(isinstance(t, torch.Tensor) for t in tokens)
    with pytest.raises(gen.NonFiniteLogits, match="while generating"):
        next(stream)


@pytest.mark.parametrize("damage", [
    lambda text: text[: len(text) // 3],  # 截断
    lambda text: text.replace('"model"', '"modle"').replace("{", "[", 3),  # 乱码
], ids=["truncated", "garbled"])
def test_damaged_tokenizer_json_names_the_file(model_dir, tmp_path, capsys, damage):
    import shutil

    root, _ = model_dir
    copy = tmp_path / "model"
    shutil.copytree(root / "with_tok", copy)
    file = copy / "tokenizer.json"
    file.write_text(damage(file.read_text(encoding="utf-8")), encoding="utf-8")
    rc = main(["generate", "--model", str(copy), "--prompt", "w1 w2", "--max-new-tokens", "2"])
    line = _one_line(capsys.readouterr().err)
    assert rc == 2 and str(file) in line and "unexpected" not in line and "probably a bug" not in line


def test_prompt_that_is_not_utf8_is_refused_naming_the_argument(model_dir):
    root, _ = model_dir
    proc = subprocess.run(
        [sys.executable, "-m", "functional_lm", "generate", "--model", str(root / "with_tok"),
         "--prompt", b"w1 \xff\xfe"],
        capture_output=True, timeout=120,
    )
    err = proc.stderr.decode("utf-8", "replace")
    line = _one_line(err)
    assert proc.returncode == 2 and proc.stdout == b""
    assert "--prompt is not valid UTF-8" in line and "0xff" in line and "byte offset 3" in line
    assert "TypeError" not in line and "probably a bug" not in line


def test_model_that_is_a_file_says_so(model_dir, capsys):
    root, _ = model_dir
    rc = main(["generate", "--model", str(root / "plain" / "config.json"), "--prompt-ids", "1"])
    line = _one_line(capsys.readouterr().err)
    assert rc == 2 and "is a file" in line and "config.json and *.safetensors" in line
    assert "does not exist" not in line


@pytest.mark.parametrize("ids", [["--prompt-ids", "-1,2"], ["--prompt-ids=-1,2"], ["--prompt-ids", "3,-7"],
                                 ["--prompt-ids", "-1"]])
def test_negative_prompt_ids_name_the_option_and_the_range(model_dir, capsys, ids):
    root, _ = model_dir
    rc = main(["generate", "--model", str(root / "plain"), *ids])
    line = _one_line(capsys.readouterr().err)
    assert rc == 2 and "--prompt-ids" in line and "[0, vocab_size)" in line and "expected one argument" not in line


def test_prompt_ids_past_the_vocabulary_name_the_range(model_dir, capsys):
    root, _ = model_dir
    rc = main(["generate", "--model", str(root / "plain"), "--prompt-ids", "1,211"])
    line = _one_line(capsys.readouterr().err)
    assert rc == 2 and "--prompt-ids: token id 211" in line and f"[0, {CFG.vocab_size})" in line



def test_a_non_finite_step_that_picks_eos_is_still_reported(model_dir, monkeypatch, capsys):
    # 第一个解码步的 logits 在 eos 上是 +inf：argmax 取到 eos、流就此结束；命令不能因为遇到 eos 就不做最后的核对。
    import functional_lm.generate as gen

    eos = CFG.vocab_size - 1
    real_step = gen.decode_step

    def step(*args):
        logits, cache = real_step(*args)
        return logits.index_fill(-1, logits.new_tensor([eos]).long(), float("inf")), cache

    monkeypatch.setattr(gen, "decode_step", step)
    root, tok = model_dir
    rc = main(["generate", "--model", str(root / "with_tok"), "--prompt", "w1 w2", "--max-new-tokens", "5"])
    captured = capsys.readouterr()
    first = generate(_params(), CFG, [[1, 2]], max_new_tokens=1)[0, 2:].tolist()
    assert first != [eos]
    assert rc == 1 and "while generating" in _one_line(captured.err)
    assert captured.out == tok.decode(first) + "\n"  # 只有第一个 token，eos 本身不打印
