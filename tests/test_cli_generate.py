"""``functional-lm generate`` 命令：流式输出与 generate() 一致，分词器可有可无，错误给出清楚的退出码与消息。"""

import json
import subprocess
import sys

import pytest
from conftest import dynamo_graph_count, fresh_dynamo, tiny_config
from functional_lm.cli import main
from functional_lm.generate import generate
from functional_lm.hf import save_pretrained
from functional_lm.model import init_params

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


def test_cuda_request_without_cuda_says_so(model_dir, capsys):
    # 没有 CUDA 的机器上 --device cuda：直说 CUDA 不可用，而不是怪罪 safetensors 文件。
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
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

