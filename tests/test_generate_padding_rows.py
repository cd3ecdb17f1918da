"""嵌入矩阵的填充行（真实词表之外的行）永远不会被采样：演示打印的采样续写与 ``functional-lm generate`` 都只在
真实词表里取 token。

曾经的失败：演示的 ``--resume --max-steps 8`` 训练完三个学生后采样续写时采到填充 id 151794，离线分词器解码它
抛 KeyError，运行以退出码 1 结束、没有 report.md。这里用一个“偏爱填充行”的模型直接复现：填充行的 logits
远大于任何真实 token，真实 token 里又有一个明显的赢家，所以只在真实词表里采样时续写全是这个赢家。
"""

import json

import pytest
import torch
from conftest import QWEN_VOCAB_STUDENT, tiny_config

from functional_lm.cli import main
from functional_lm.hf import save_pretrained
from functional_lm.models.decoder import init_params


def _prefers_padding(cfg, real_vocab: int, winner: int) -> dict[str, torch.Tensor]:
    """末层归一化只留第 0 维，logits[v] = h₀ · W[v, 0]；h₀ > 0（每个输入 token 的嵌入第 0 维都是正的，
    残差流的第 0 维由它主导）。W[v, 0]：其余真实 token 1，赢家 8，填充行 16 —— 填充行的 logits 最大。"""
    params = init_params(cfg, seed=3)
    params["model.norm.weight"] = torch.zeros(cfg.hidden_size)
    params["model.norm.weight"][0] = 1.0
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        if key in params:
            w = params[key]
            w[:, 0] = 1.0
            w[winner, 0] = 8.0
            w[real_vocab:, 0] = 16.0
    return params


@pytest.mark.usefixtures("qwen_tokenizer")
def test_demo_samples_never_draw_a_padding_row():
    from functional_lm.data import load_tokenizer
    from functional_lm.kd.demo import _samples
    from functional_lm.kd.objective import Model

    tok = load_tokenizer(None)
    (winner,) = tok.encode(" cat")
    assert QWEN_VOCAB_STUDENT.vocab_size > tok.real_vocab_size  # 确实有填充行（151,936 > 151,665）
    model = Model(_prefers_padding(QWEN_VOCAB_STUDENT, tok.real_vocab_size, winner), QWEN_VOCAB_STUDENT)
    prompt = tok.encode("The for statement")
    texts = _samples({"m": model}, tok, [prompt], seed=0)
    assert texts == {"m": f"{'The for statement'!r} → {' cat' * 24!r}"}  # 24 个新 token，全是真实词表里的赢家


def _word_tokenizer(directory, words: int):
    """词表 = w0 … w{words-1} + <|endoftext|>（id = words）的 WordLevel 分词器，比模型的嵌入行数少。"""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(words)} | {"<|endoftext|>": words}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<|endoftext|>"])
    directory.mkdir()
    tok.save(str(directory / "tokenizer.json"))
    config = {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("temperature", ["0", "0.8"])
def test_generate_command_samples_only_the_tokenizers_vocabulary(tmp_path, capsys, temperature):
    cfg = tiny_config()  # 211 行嵌入，分词器只有 101 个 id：110 个填充行
    _word_tokenizer(tmp_path / "tok", words=100)
    save_pretrained(_prefers_padding(cfg, 101, winner=7), cfg, tmp_path / "model", tokenizer=tmp_path / "tok")
    rc = main(["generate", "--model", str(tmp_path / "model"), "--prompt", "w1 w2", "--max-new-tokens", "5",
               "--temperature", temperature])
    assert rc == 0
    assert capsys.readouterr().out == "w7 w7 w7 w7 w7\n"
