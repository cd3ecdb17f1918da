"""跨分词器的教师缓存：DeepSeek 分词器的极小教师，目标按学生的位置存盘（ids / logprobs / tail + 每个位置的 kind）。

核对三件事：存进去再读出来与在线跨分词器蒸馏的目标逐位相同（value_dtype float32）；从缓存训练与在线训练的
损失相同（教师按不同的批前向，只差浮点归约顺序）；设置与缓存不符、缓存被改坏时一段话。
"""

import json

import numpy as np
import pytest
import torch

from functional_lm import ModelConfig, TrainingConfig, init_params
from functional_lm.cli import main
from functional_lm.data import load_tokenizer, prepare_data
from functional_lm.data.loader import Batch
from functional_lm.data.vocab_bytes import load_teacher_tokenizer
from functional_lm.hf import load_pretrained, save_pretrained
from functional_lm.kd.cache_identity import make_fingerprint
from functional_lm.kd.cross_cache import CrossTeacherCache, build_cross_teacher_cache, open_teacher_cache
from functional_lm.kd.cross_teacher import CrossTokenizerTeacher
from functional_lm.kd.objective import Model
from functional_lm.kd.teacher_cache import TeacherCache, TeacherCacheDamaged
from functional_lm.kd.vocab_map import build_vocab_map

pytestmark = pytest.mark.usefixtures("qwen_tokenizer")

TEACHER = ModelConfig(hidden_size=16, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=32,
                      vocab_size=129280, max_seq_len=64, rope_theta=1e4, tie_word_embeddings=False)
TEXTS = ["北京是中国的首都，人口众多。 The committee reconvened; 2024年12月3日 — naïve café ①②.",
         "Tokenizers disagree about 1234567 and ΑΒΓ, and about ‘quotes’ … too.",
         "def f(x):\n    return x ** 2  # 平方\n"]
K = 8
FLAGS = ["--preset", "tiny", "--vocab-size", "151936", "--hidden-size", "16", "--num-heads", "2", "--num-kv-heads",
         "1", "--seq-len", "32", "--max-steps", "3", "--eval-interval", "3", "--log-interval", "1", "--batch-size",
         "2", "--no-progress"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("xcache")
    save_pretrained(init_params(TEACHER, seed=3), TEACHER, root / "teacher")
    rows = [{"text": f"{i}. {TEXTS[i % 3]} {TEXTS[(i + 1) % 3]}"} for i in range(24)]
    (root / "data.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows), encoding="utf-8")
    return root


def _source(root, mode="hybrid"):
    student, teacher_tok = load_tokenizer(None), load_teacher_tokenizer("deepseek")
    cfg, params = load_pretrained(root / "teacher")
    tcfg = TrainingConfig(top_k=K, temperature=2.0, document_mask=True)
    vmap = build_vocab_map(student, teacher_tok)
    return student, CrossTokenizerTeacher(Model(params, cfg), student, teacher_tok, vmap, mode, tcfg)


@pytest.mark.parametrize("mode", ["hybrid", "uld"])
def test_stored_targets_are_the_online_cross_tokenizer_targets(root, tmp_path, mode):
    student, source = _source(root, mode)
    data = prepare_data([str(root / "data.jsonl")], tokenizer=student, seq_len=32, batch_size=2, val_fraction=0.0,
                        cache_dir=str(tmp_path / "tok"), progress=False)
    fp = make_fingerprint(student, data.store, teacher_weights="tiny", split="train")
    status = build_cross_teacher_cache(source, data.train, tmp_path / "c", fingerprint=fp, batch_size=3,
                                       blocks_per_shard=3, value_dtype="float32", progress=False)
    assert status.complete
    cache = open_teacher_cache(tmp_path / "c", verify=True)
    assert isinstance(cache, CrossTeacherCache) and cache.cross["mode"] == mode
    with pytest.raises(ValueError, match="holds cross-tokenizer targets.*open_teacher_cache"):
        TeacherCache.open(tmp_path / "c").batch_targets(Batch(*([torch.zeros(1, 1)] * 3), None, torch.tensor([0])),
                                                       torch.device("cpu"))
    kinds = set()
    for first in range(0, len(data.train) - 2, 3):  # 与建缓存时同样的批（每个分片一批）：逐位相同
        blocks = list(range(first, first + 3))
        x, y, m, seg = (torch.from_numpy(a) for a in data.train.examples(blocks, True))
        batch = Batch(x.long(), y.long(), m.bool(), seg.long(), torch.tensor(blocks))
        online = source.batch_targets(batch, torch.device("cpu"), batch.segment_ids, count=False)
        stored = cache.batch_targets(batch, torch.device("cpu"), count=False)
        for a, b in zip(stored, online, strict=True):
            assert torch.equal(a, b.to(a.dtype))
        kinds |= set(online.kind.unique().tolist())
    assert kinds == ({0, 1, 2} if mode == "hybrid" else {0, 2})  # 三种目标都真的出现过（uld 没有映射行）


def test_the_kind_file_costs_one_byte_per_token(root, tmp_path):
    student, source = _source(root)
    data = prepare_data([str(root / "data.jsonl")], tokenizer=student, seq_len=32, batch_size=2, val_fraction=0.0,
                        cache_dir=str(tmp_path / "tok"), progress=False)
    fp = make_fingerprint(student, data.store, teacher_weights="tiny", split="train")
    build_cross_teacher_cache(source, data.train, tmp_path / "c", fingerprint=fp, blocks_per_shard=64, progress=False)
    index = json.loads((tmp_path / "c" / "index.json").read_text())
    files = index["shards"][0]["files"]
    tokens = len(data.train) * 32
    assert sum(r["bytes"] for r in files.values()) == tokens * (6 * K + 5)  # float16：K·4 + K·2 + 4 + 1
    assert files["kind-00000.bin"]["bytes"] == tokens
    # 改坏一个 kind 字节（大小不变）：读到时点名 kind 文件与块
    path = tmp_path / "c" / "kind-00000.bin"
    raw = bytearray(path.read_bytes())
    raw[40] = 9
    path.write_bytes(bytes(raw))
    cache = TeacherCache.open(tmp_path / "c")
    cache._verified.add(0)  # 跳过校验和：让取值检查出场（校验和那一层另有测试）
    with pytest.raises(TeacherCacheDamaged, match=r"kind-00000\.bin.*block 1 holds target kinds outside"):
        cache.targets([0, 1, 2])
    with pytest.raises(TeacherCacheDamaged, match=r"kind-00000\.bin.*checksum"):
        TeacherCache.open(tmp_path / "c", verify=True)


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def built(root):
    """命令行：teacher-cache 建跨分词器的缓存（float32 值），distill 从它训练，另一次 distill 在线对齐。"""
    common = ["--data", str(root / "data.jsonl"), "--cache-dir", str(root / "tok"), "--seq-len", "32"]
    assert main(["teacher-cache", "--teacher", str(root / "teacher"), "--teacher-tokenizer", "deepseek",
                 "--output-dir", str(root / "C"), "--top-k", str(K), "--value-dtype", "float32",
                 "--no-progress", *common]) == 0
    cached, online = root / "from-cache", root / "online"
    flags = [*FLAGS, "--data", str(root / "data.jsonl"), "--cache-dir", str(root / "tok")]
    assert main(["distill", "--teacher-cache", str(root / "C"), "--output-dir", str(cached), *flags]) == 0
    assert main(["distill", "--teacher", str(root / "teacher"), "--teacher-tokenizer", "deepseek", "--top-k",
                 str(K), "--output-dir", str(online), *flags]) == 0
    return root / "C", cached, online


def test_training_from_the_cache_equals_training_online(built):
    cache_dir, cached, online = built
    assert (cache_dir / "train" / "kind-00000.bin").is_file() and (cache_dir / "val" / "index.json").is_file()
    a, b = _metrics(cached), _metrics(online)
    train_a, train_b = ([r for r in rows if r["kind"] == "train"] for rows in (a, b))
    assert len(train_a) == 3
    for ra, rb in zip(train_a, train_b, strict=True):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5) and ra["kd"] == pytest.approx(rb["kd"], rel=1e-5)
        for key in ("xtok_mapped", "xtok_uld", "xtok_none"):
            assert ra[key] == pytest.approx(rb[key], abs=1e-12)
        assert 0 < ra["xtok_uld"] < ra["xtok_mapped"]
    eval_a, eval_b = ([r for r in rows if r["kind"] == "eval"] for rows in (a, b))
    assert eval_a[-1]["kl_cache_student"] == pytest.approx(eval_b[-1]["kl_cache_student"], rel=1e-4)
    report = (cached / "report.md").read_text()
    assert "cross_tokenizer" in report and "teacher tokens share their bytes" in report


@pytest.mark.parametrize("extra, words", [
    (["--cross-tokenizer", "uld"], ["--cross-tokenizer uld", "hybrid", "cross_tokenizer"]),
    (["--cross-tokenizer", "off"], ["--cross-tokenizer off", "hybrid"]),
    (["--teacher-tokenizer", "qwen3.5"], ["--teacher-tokenizer qwen3.5", "aligned with"]),
    (["--on-policy-fraction", "1", "--prompt-length", "8", "--max-new-tokens", "8"], ["a teacher cache only holds targets"]),
])
def test_settings_that_disagree_with_a_cross_cache_are_one_paragraph(built, tmp_path, capsys, extra, words):
    cache_dir, _, _ = built
    root = cache_dir.parent
    args = ["distill", "--teacher-cache", str(cache_dir), "--output-dir", str(tmp_path / "bad"), *FLAGS,
            "--data", str(root / "data.jsonl"), "--cache-dir", str(root / "tok"), *extra]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and "\n" not in err
    for word in words:
        assert word in err


def test_teacher_side_options_without_a_teacher_are_one_paragraph(root, tmp_path, capsys):
    (tmp_path / "t.jsonl").write_text('{"ids": [0], "logprobs": [0.0]}\n')
    args = ["teacher-cache", "--import", str(tmp_path / "t.jsonl"), "--teacher-tokenizer", "deepseek",
            "--output-dir", str(tmp_path / "C"), "--top-k", "1", "--data", str(root / "data.jsonl")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and "\n" not in err and "--teacher-tokenizer needs --teacher DIR or --teacher-url URL" in err


def test_a_kind_column_is_read_back_as_written(built):
    """kind 按 uint8 存、按 int64 读回，与文件里的字节逐一相同。"""
    cache_dir, _, _ = built
    cache = TeacherCache.open(cache_dir / "train")
    kinds = cache.targets(np.arange(cache.num_blocks))[3]
    raw = np.concatenate([np.fromfile(cache_dir / "train" / f"kind-{s:05d}.bin", dtype=np.uint8)
                          for s in range(cache.index["num_shards"])])
    assert kinds.dtype == torch.int64 and kinds.reshape(-1).tolist() == raw.tolist()
