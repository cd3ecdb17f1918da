"""教师缓存（functional_lm.kd.teacher_cache）：往返、K = V 时与稠密损失相等、中断后续建逐字节相同、
截断 / 校验和 / 不完整的检测、指纹逐项比对、JSON-lines 导入与逐行报错，以及 float16 与 bfloat16 的舍入误差实测。

全部用 1 层、隐藏 32 的小教师与几百个 token 的打包数据（seq_len = 16，7 个块；blocks_per_shard = 2 → 4 个分片，
最后一个分片只有 1 块，最后一块有补齐）。
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import full_disk_open

import functional_lm.kd.cache_build as cb
import functional_lm.kd.teacher_cache as tc
from functional_lm.config import ModelConfig
from functional_lm.data import pack_documents
from functional_lm.hf import save_pretrained
from functional_lm.losses import (
    distillation_loss,
    sparse_distillation_loss,
    teacher_topk,
)
from functional_lm.models.decoder import forward_hidden, init_params, output_weight
from functional_lm.kd.teacher_cache import (
    FINGERPRINT_FIELDS,
    TeacherCache,
    TeacherCacheDamaged,
    TeacherCacheMismatch,
    check_fingerprint,
    make_fingerprint,
    teacher_weights_fingerprint,
)
from functional_lm.kd.cache_build import build_teacher_cache
from functional_lm.kd.cache_import import import_topk_jsonl

CFG = ModelConfig(
    hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2, intermediate_size=64, vocab_size=211, max_seq_len=64,
)
SEQ = 16
K = 8
T = 2.0


def _documents(seed: int = 0, total: int = 110) -> list[list[int]]:
    """若干篇长 3…20 的短文档（id ∈ [1, 211)），连同分隔符共约 total 个 token：7 个长 17 的块，最后一块有补齐。"""
    rng = np.random.default_rng(seed)
    docs, used = [], 0
    while used < total:
        n = int(rng.integers(3, 21))
        docs.append(rng.integers(1, 211, size=n).tolist())
        used += n + 1
    return docs


@pytest.fixture(scope="module")
def teacher():
    return init_params(CFG, seed=3)


@pytest.fixture(scope="module")
def dataset():
    ds = pack_documents(_documents(), seq_len=SEQ, separator_id=0)
    assert len(ds) == 7 and ds.num_tokens % (SEQ + 1) != 0  # 4 个分片（2+2+2+1），最后一块有补齐
    return ds


def _fingerprint(ds, **changes):
    fp = make_fingerprint("tok-fingerprint", ds.store, teacher_weights="random-teacher-seed-3")
    return {**fp, **changes}


def _build(teacher, ds, out, **kw):
    args = {"top_k": K, "temperature": T, "fingerprint": _fingerprint(ds), "blocks_per_shard": 2, "batch_size": 3,
            "progress": False}
    args.update(kw)
    return build_teacher_cache(teacher, CFG, ds, out, **args)


def _direct(teacher, ds, document_mask, k=K, temperature=T, blocks=None):
    """参照：直接跑教师（document_mask 时带文档编号），float32 logits，再取 teacher_topk；另返回 logits。"""
    blocks = range(len(ds)) if blocks is None else blocks
    ids, _, _, seg = ds.examples(blocks, document_mask)
    segments = torch.from_numpy(seg) if document_mask else None
    hidden = forward_hidden(teacher, torch.from_numpy(ids), CFG, segment_ids=segments)
    logits = F.linear(hidden.float(), output_weight(teacher, CFG).float())
    return (*teacher_topk(logits, k, temperature=temperature), logits)


def _files(directory):
    """目录里除锁文件外的全部文件 → 字节。"""
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file() and p.name != ".lock"}


def _assert_fp16_close(actual, expected):
    """float16 舍入：|误差| ≤ 2⁻¹¹·|x|（加上 1e-6 的计算噪声与次正规数的绝对误差）。"""
    assert torch.all((actual - expected).abs() <= expected.abs() * 2.0**-11 + 1e-6)


# ------------------------------------------------------------------------------------------------ 往返
@pytest.mark.parametrize("document_mask", [True, False])
def test_round_trip_matches_direct_teacher_topk(teacher, dataset, tmp_path, document_mask):
    status = _build(teacher, dataset, tmp_path / "c", document_mask=document_mask)
    assert (status.complete, status.shards_done, status.num_shards, status.shards_written) == (True, 4, 4, 4)
    cache = TeacherCache.open(tmp_path / "c", verify=True)
    assert (cache.num_blocks, cache.seq_len, cache.top_k, cache.temperature) == (7, SEQ, K, T)
    assert cache.fingerprint["document_mask"] is document_mask and set(FINGERPRINT_FIELDS) <= set(cache.fingerprint)

    order = [5, 0, 6, 3, 3]  # 乱序、重复、跨分片
    ids, log_probs, tail = cache.targets(order)
    assert ids.dtype == torch.int64 and log_probs.dtype == torch.float32 and tail.dtype == torch.float32
    assert ids.shape == (5, SEQ, K) and tail.shape == (5, SEQ)
    ref_ids, ref_lp, ref_tail, _ = _direct(teacher, dataset, document_mask, blocks=order)
    assert torch.equal(ids, ref_ids)
    _assert_fp16_close(log_probs, ref_lp)
    assert torch.allclose(tail, ref_tail, rtol=0, atol=1e-6)
    assert float(tail.min()) > 0.01  # K = 8 < V：尾部有可观的质量，比较不是空的


def test_document_mask_runs_the_teacher_with_segment_ids(teacher, dataset, tmp_path):
    _build(teacher, dataset, tmp_path / "c", document_mask=True)
    _, log_probs, _ = TeacherCache.open(tmp_path / "c").targets(range(7))
    _, plain_lp, _, _ = _direct(teacher, dataset, document_mask=False)
    # 有跨文档的块：不带文档编号的教师给出明显不同的分布（证明缓存确实用了 segment_ids）
    assert float((log_probs - plain_lp).abs().max()) > 1e-2


def test_targets_rejects_out_of_range_blocks(teacher, dataset, tmp_path):
    _build(teacher, dataset, tmp_path / "c")
    with pytest.raises(IndexError, match=r"\[0, 7\).*\[7\]"):
        TeacherCache.open(tmp_path / "c").targets([1, 7])


# ------------------------------------------------------------------------------------------------ K = V
@pytest.mark.parametrize("value_dtype, tol", [("float16", 1e-3), ("float32", 1e-5)])
def test_full_vocabulary_cache_reproduces_dense_loss(teacher, dataset, tmp_path, value_dtype, tol):
    _build(teacher, dataset, tmp_path / "c", top_k=CFG.vocab_size, value_dtype=value_dtype)
    ids, log_probs, tail = TeacherCache.open(tmp_path / "c").targets(range(7))
    assert float(tail.abs().max()) < 1e-6
    _, labels, loss_mask, _ = dataset.examples(range(7), True)
    *_, teacher_logits = _direct(teacher, dataset, True)
    student = torch.randn(7, SEQ, CFG.vocab_size, generator=torch.Generator().manual_seed(1)) * 2
    labels, loss_mask = torch.from_numpy(labels), torch.from_numpy(loss_mask)
    dense = distillation_loss(student, teacher_logits, labels, temperature=T, loss_mask=loss_mask)
    sparse = sparse_distillation_loss(student, ids, log_probs, labels, teacher_tail_mass=tail, temperature=T,
                                      loss_mask=loss_mask)
    assert abs(float(sparse) - float(dense)) <= tol
    assert float(dense) > 0.1  # 非平凡的损失


# ------------------------------------------------------------------------------------------------ 值类型
def test_float16_is_more_precise_than_bfloat16_on_log_probs():
    """[−30, 0] 上实测往返误差：float16 ≤ 2⁻⁷（= 0.0078），bfloat16 约大 8 倍（至多 2⁻⁴ = 0.0625）。"""
    x = -torch.rand(100_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64).float() * 30
    errors = {}
    for dtype in ("float16", "bfloat16"):
        back = torch.from_numpy(tc.decode_values(tc.encode_values(x, dtype), dtype))
        err = (back.double() - x.double()).abs()
        errors[dtype] = (float(err.max()), float(err.mean()))
    assert errors["float16"][0] <= 2.0**-7 and errors["bfloat16"][0] <= 2.0**-4
    assert errors["bfloat16"][0] >= 4 * errors["float16"][0]
    assert errors["bfloat16"][1] >= 4 * errors["float16"][1]


def test_bfloat16_storage_round_trips(teacher, dataset, tmp_path):
    _build(teacher, dataset, tmp_path / "c", value_dtype="bfloat16")
    cache = TeacherCache.open(tmp_path / "c", verify=True)
    _, log_probs, _ = cache.targets(range(7))
    _, ref_lp, _, _ = _direct(teacher, dataset, True)
    assert torch.equal(log_probs, ref_lp.to(torch.bfloat16).float())  # 恰为 bfloat16 的就近舍入
    assert (tmp_path / "c" / "logprobs-00000.bin").stat().st_size == 2 * SEQ * K * 2


def test_float16_clamps_instead_of_overflowing():
    raw = tc.encode_values(torch.tensor([-1e6, -3.0, 0.0]), "float16")
    back = tc.decode_values(raw, "float16")
    assert back.tolist() == [-65504.0, -3.0, 0.0]


# ------------------------------------------------------------------------------------------------ 中断与续建
def test_interrupted_build_resumes_to_identical_bytes(teacher, dataset, tmp_path, monkeypatch):
    _build(teacher, dataset, tmp_path / "ref")
    out = tmp_path / "c"
    asked = []
    status = _build(teacher, dataset, out, stop=lambda: len(asked.append(1) or asked) > 2)
    assert (status.complete, status.shards_done, status.shards_written) == (False, 2, 2)
    with pytest.raises(TeacherCacheDamaged, match=r"incomplete \(2 of 4 shards written\).*resume it by rerunning"):
        TeacherCache.open(out)

    real_install, calls = cb._install_file, []

    def crash_on_second_rename(tmp, final):  # 分片 2 的 ids 已改名就位，logprobs 还在临时文件里时“崩溃”
        calls.append(final.name)
        if len(calls) == 2:
            raise RuntimeError("simulated crash")
        real_install(tmp, final)

    monkeypatch.setattr(cb, "_install_file", crash_on_second_rename)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _build(teacher, dataset, out)
    monkeypatch.undo()
    assert (out / "ids-00002.bin").exists() and json.loads((out / "index.json").read_text())["shards"][2] is None
    (out / ".tail-00003.bin.tmp").write_bytes(b"half")  # SIGKILL 留下的临时文件
    (out / ".index.json.tmp-deadbeef").write_text("{")

    status = _build(teacher, dataset, out)
    assert (status.complete, status.shards_done, status.shards_written) == (True, 4, 2)
    assert _files(out) == _files(tmp_path / "ref")  # 每个文件逐字节相同（index.json 也是：没有时间戳）
    again = _build(teacher, dataset, out)
    assert (again.complete, again.shards_written) == (True, 0)


def test_resume_recomputes_a_truncated_shard(teacher, dataset, tmp_path, capsys):
    out = tmp_path / "c"
    _build(teacher, dataset, out)
    reference = _files(out)
    victim = out / "tail-00001.bin"
    victim.write_bytes(victim.read_bytes()[:-4])
    status = _build(teacher, dataset, out)
    assert (status.complete, status.shards_written) == (True, 1)
    assert "shard 1 is damaged (tail-00001.bin" in capsys.readouterr().err
    assert _files(out) == reference


# ------------------------------------------------------------------------------------------------ 损坏检测
@pytest.fixture(scope="module")
def built(teacher, dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("built") / "cache"
    _build(teacher, dataset, out)
    return out


@pytest.fixture()
def copy(built, tmp_path):
    target = tmp_path / "cache"
    shutil.copytree(built, target)
    return target


@pytest.mark.parametrize("name", ["ids-00000.bin", "logprobs-00001.bin", "tail-00003.bin"])
def test_truncated_shard_is_named_on_open(copy, name):
    path = copy / name
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(TeacherCacheDamaged) as info:
        TeacherCache.open(copy)
    assert info.value.file == name and name in str(info.value) and "truncated" in str(info.value)
    assert str(copy) in str(info.value)


def test_missing_shard_file_is_named(copy):
    (copy / "logprobs-00002.bin").unlink()
    with pytest.raises(TeacherCacheDamaged, match=r"logprobs-00002\.bin: file is missing"):
        TeacherCache.open(copy)


def test_checksum_damage_needs_verify(copy):
    path = copy / "tail-00002.bin"
    data = bytearray(path.read_bytes())
    data[5] ^= 0x10
    path.write_bytes(bytes(data))
    TeacherCache.open(copy)  # 大小没变：结构检查看不出
    with pytest.raises(TeacherCacheDamaged, match=r"tail-00002\.bin: checksum [0-9a-f]{8} does not match") as info:
        TeacherCache.open(copy, verify=True)
    assert info.value.file == "tail-00002.bin"


@pytest.mark.parametrize("text, reason", [("{not json", "not readable JSON"), ('{"format": 1}', "not a teacher-cache")])
def test_unreadable_index_is_damage(copy, text, reason):
    (copy / "index.json").write_text(text)
    with pytest.raises(TeacherCacheDamaged, match=reason) as info:
        TeacherCache.open(copy)
    assert info.value.file == "index.json"


def test_incomplete_cache_refused_and_index_lists_committed_shards(teacher, dataset, tmp_path):
    out = tmp_path / "c"
    status = _build(teacher, dataset, out, stop=lambda: True)
    assert (status.complete, status.shards_done) == (False, 0)
    index = json.loads((out / "index.json").read_text())
    assert index["shards"] == [None] * 4 and index["complete"] is False
    with pytest.raises(TeacherCacheDamaged, match=r"incomplete \(0 of 4 .*same settings, same output directory"):
        TeacherCache.open(out)


def test_index_records_sizes_and_crcs(built):
    index = json.loads((built / "index.json").read_text())
    assert index["num_blocks"] == 7 and index["blocks_per_shard"] == 2 and index["complete"] is True
    last = index["shards"][3]
    assert last["blocks"] == [6, 7]
    assert last["files"]["ids-00003.bin"]["bytes"] == SEQ * K * 4
    assert last["files"]["logprobs-00003.bin"]["bytes"] == SEQ * K * 2
    assert last["files"]["tail-00003.bin"]["bytes"] == SEQ * 4
    assert last["files"]["tail-00003.bin"]["crc32"] == tc.crc32_file(built / "tail-00003.bin")


# ------------------------------------------------------------------------------------------------ 指纹
def _changed(teacher, dataset, field):
    """把一个指纹字段改掉的构建参数：(关键字参数, 期望出现在消息里的旧值、新值片段)。"""
    fp = _fingerprint(dataset)
    return {
        "top_k": ({"top_k": 4}, "top-k (--top-k) differs: cache 8, this build 4"),
        "temperature": ({"temperature": 1.0}, "the temperature (--temperature) differs: cache 2.0, this build 1.0"),
        "value_dtype": ({"value_dtype": "float32"},
                        'the stored value type (--value-dtype) differs: cache "float16", this build "float32"'),
        "document_mask": ({"document_mask": False},
                          "the document mask (--document-mask) differs: cache true, this build false"),
        "real_vocab_size": ({"real_vocab_size": 200},
                            "the real vocabulary size (the tokenizer's) differs: cache 211, this build 200"),
        "tokenizer": ({"fingerprint": {**fp, "tokenizer": "other"}}, "the tokenizer differs (another vocabulary"),
        "split": ({"fingerprint": {**fp, "split": {**fp["split"], "split": "val"}}},
                  'the split (train or val) differs: cache "train", this build "val"'),
        "teacher_weights": ({"fingerprint": {**fp, "teacher_weights": "w2"}}, "the teacher's weights differ"),
        "data": ({"fingerprint": {**fp, "data": {**fp["data"], "num_tokens": 1}}},
                 "the data's tokens differ (different text or a different file): the cache was built from 111 tokens, "
                 "this data has 1"),
        "teacher_config": ({"cfg": CFG.replace(rope_theta=500.0)},
                           "the teacher's config.json (rope_theta) differs: cache 1000000.0, this build 500.0"),
    }[field]


@pytest.mark.parametrize("field", ["top_k", "temperature", "value_dtype", "document_mask", "real_vocab_size",
                                   "tokenizer", "split", "teacher_weights", "data", "teacher_config"])
def test_every_fingerprint_mismatch_is_named(teacher, dataset, built, field):
    before = _files(built)
    kw, fragment = _changed(teacher, dataset, field)
    cfg = kw.pop("cfg", CFG)
    args = {"top_k": K, "temperature": T, "fingerprint": _fingerprint(dataset), "blocks_per_shard": 2,
            "progress": False}
    args.update(kw)
    with pytest.raises(TeacherCacheMismatch) as info:
        build_teacher_cache(teacher, cfg, dataset, built, **args)
    assert any(name.split(".")[0] == field for name in info.value.fields), info.value.fields
    assert fragment in str(info.value) and str(built) in str(info.value)
    assert _files(built) == before  # 什么都没动


def test_seq_len_and_layout_mismatch(teacher, built):
    other = pack_documents(_documents(), seq_len=8, separator_id=0)
    fp = make_fingerprint("tok-fingerprint", other.store, teacher_weights="random-teacher-seed-3")
    with pytest.raises(TeacherCacheMismatch, match=r"the block length \(--seq-len\) differs: cache 16, this build 8"):
        build_teacher_cache(teacher, CFG, other, built, top_k=K, temperature=T, fingerprint=fp,
                            blocks_per_shard=2, progress=False)
    ds = pack_documents(_documents(), seq_len=SEQ, separator_id=0)
    with pytest.raises(TeacherCacheMismatch,
                       match=r"blocks per shard \(--blocks-per-shard\) differs: cache 2, this build 3"):
        _build(teacher, ds, built, blocks_per_shard=3)


def test_check_fingerprint_names_all_fields_in_one_paragraph(tmp_path):
    old = {"top_k": 8, "temperature": 2.0, "teacher_config": {"hidden_size": 32, "num_layers": 1}, "same": "x"}
    new = {"top_k": 16, "temperature": 2, "teacher_config": {"hidden_size": 64, "num_layers": 1}, "same": "x",
           "extra": True}
    with pytest.raises(TeacherCacheMismatch) as info:
        check_fingerprint(old, new, tmp_path)
    assert info.value.fields == ["extra", "teacher_config.hidden_size", "top_k"]  # 2 与 2.0 相同
    message = str(info.value)
    assert "extra differs: cache (absent), this build true" in message
    assert "the teacher's config.json (hidden_size) differs: cache 32, this build 64" in message
    assert "top-k (--top-k) differs: cache 8, this build 16" in message and "\n" not in message
    assert str(tmp_path) in message
    check_fingerprint(old, dict(old), tmp_path)  # 相同：不抛


def test_fingerprint_arguments_are_checked(teacher, dataset, tmp_path):
    with pytest.raises(ValueError, match=r"lacks the fields \['teacher_weights'\]"):
        _build(teacher, dataset, tmp_path / "a", fingerprint={k: v for k, v in _fingerprint(dataset).items()
                                                              if k != "teacher_weights"})
    with pytest.raises(ValueError, match="top_k: fingerprint has 4, the build uses 8"):
        _build(teacher, dataset, tmp_path / "b", fingerprint=_fingerprint(dataset, top_k=4))
    assert not (tmp_path / "a" / "index.json").exists()


def test_foreign_directory_is_refused(teacher, dataset, tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"notes\.txt is not a cache file"):
        _build(teacher, dataset, tmp_path / "c")
    assert (tmp_path / "c" / "notes.txt").read_text() == "mine"


def test_teacher_weights_fingerprint(teacher, tmp_path):
    save_pretrained(teacher, CFG, tmp_path / "a")
    save_pretrained(teacher, CFG, tmp_path / "b")
    save_pretrained(init_params(CFG, seed=4), CFG, tmp_path / "c")  # 同结构、不同权重
    fa, fb, fc = (teacher_weights_fingerprint(tmp_path / n) for n in "abc")
    assert fa == fb and fa != fc and fa.startswith("safetensors-sha256:")
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        teacher_weights_fingerprint(tmp_path)


def test_data_fingerprint_tracks_tokens(dataset):
    same = pack_documents(_documents(), seq_len=SEQ, separator_id=0)
    other = pack_documents(_documents(seed=1), seq_len=SEQ, separator_id=0)
    a, b, c = (make_fingerprint("t", d.store, teacher_weights="w")["data"] for d in (dataset, same, other))
    assert a == b and a != c and a["num_tokens"] == dataset.num_tokens


# ------------------------------------------------------------------------------------------------ 导入
SMALL_VOCAB, SMALL_K, SMALL_SEQ = 11, 3, 4


@pytest.fixture()
def small():
    """两篇短文档 → seq_len 4 的 3 个块（共 12 行），最后一块有补齐。"""
    ds = pack_documents([[1, 2, 3, 4, 5], [6, 7, 8, 9]], seq_len=SMALL_SEQ, separator_id=0)
    assert len(ds) == 3
    return ds


def _rows(n):
    """手写的 n 行：第 j 行的 id 是 (j, j+1, j+2) mod 11，概率 0.5、0.25、0.125 − j/1000（尾部 0.125 + j/1000）。"""
    rows = []
    for j in range(n):
        probs = [0.5, 0.25, 0.125 - j / 1000]
        rows.append({"ids": [(j + i) % SMALL_VOCAB for i in range(3)], "logprobs": [math.log(p) for p in probs]})
    return rows


def _write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _import(path, ds, out, **kw):
    fp = make_fingerprint("tok", ds.store, teacher_weights="imported")
    args = {"fingerprint": fp, "top_k": SMALL_K, "temperature": 1.0, "real_vocab_size": SMALL_VOCAB,
            "progress": False, "blocks_per_shard": 2}
    args.update(kw)
    return import_topk_jsonl(path, ds, out, **args)


@pytest.mark.parametrize("value_dtype", ["float16", "float32"])
def test_import_round_trips(small, tmp_path, value_dtype):
    rows = _rows(12)
    status = _import(_write_rows(tmp_path / "t.jsonl", rows), small, tmp_path / "c", value_dtype=value_dtype)
    assert status.complete and status.num_shards == 2
    ids, log_probs, tail = TeacherCache.open(tmp_path / "c", verify=True).targets([2, 0, 1])
    for b_out, block in enumerate([2, 0, 1]):
        for p in range(SMALL_SEQ):
            j = block * SMALL_SEQ + p  # 第 j 行 ↔ 块 j // L 的位置 j % L
            assert ids[b_out, p].tolist() == rows[j]["ids"]
            expected = torch.tensor(rows[j]["logprobs"], dtype=torch.float32)
            if value_dtype == "float32":
                assert torch.equal(log_probs[b_out, p], expected)
            else:
                _assert_fp16_close(log_probs[b_out, p], expected)
            assert abs(float(tail[b_out, p]) - (0.125 + j / 1000)) < 1e-6


def test_import_reproduces_a_built_cache(teacher, dataset, tmp_path):
    """把教师缓存导出成 JSON lines 再导入：ids 与 float32 log 概率文件逐字节相同（对齐约定一致）。"""
    _build(teacher, dataset, tmp_path / "built", value_dtype="float32")
    ids, log_probs, tail = TeacherCache.open(tmp_path / "built").targets(range(len(dataset)))
    lines = [json.dumps({"ids": i.tolist(), "logprobs": lp.tolist()})
             for i, lp in zip(ids.reshape(-1, K), log_probs.reshape(-1, K))]
    (tmp_path / "t.jsonl").write_text("\n".join(lines) + "\n")
    fp = {**_fingerprint(dataset), "teacher_config": CFG.to_dict()}
    import_topk_jsonl(tmp_path / "t.jsonl", dataset, tmp_path / "imported", fingerprint=fp, top_k=K, temperature=T,
                      real_vocab_size=CFG.vocab_size, value_dtype="float32", blocks_per_shard=2, progress=False)
    built, imported = _files(tmp_path / "built"), _files(tmp_path / "imported")
    for s in range(4):
        assert imported[f"ids-{s:05d}.bin"] == built[f"ids-{s:05d}.bin"]
        assert imported[f"logprobs-{s:05d}.bin"] == built[f"logprobs-{s:05d}.bin"]
    _, _, tail_back = TeacherCache.open(tmp_path / "imported").targets(range(len(dataset)))
    assert torch.allclose(tail_back, tail, atol=1e-5)


BAD_ROWS = {
    "not json": ("{oops", "not valid JSON"),
    "not an object": ("[1, 2, 3]", "expected an object"),
    "wrong k": ('{"ids": [1, 2], "logprobs": [-1.0, -2.0]}', "expected 3 ids and 3 logprobs, got 2 and 2"),
    "id out of range": ('{"ids": [1, 2, 11], "logprobs": [-1.0, -2.0, -3.0]}', r"ids must be integers in \[0, 11\)"),
    "negative id": ('{"ids": [-1, 2, 3], "logprobs": [-1.0, -2.0, -3.0]}', r"\[0, 11\)"),
    "duplicate id": ('{"ids": [1, 1, 3], "logprobs": [-1.0, -2.0, -3.0]}', "distinct"),
    "positive logprob": ('{"ids": [1, 2, 3], "logprobs": [0.5, -2.0, -3.0]}', "finite numbers <= 0"),
    "nan logprob": ('{"ids": [1, 2, 3], "logprobs": [NaN, -2.0, -3.0]}', "finite numbers <= 0"),
    "sum above one": ('{"ids": [1, 2, 3], "logprobs": [-0.1, -0.2, -0.3]}', r"sum to 2\.\d+ > 1"),
}


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_import_reports_bad_row_as_file_line(small, tmp_path, case):
    text, reason = BAD_ROWS[case]
    lines = [json.dumps(r) for r in _rows(12)]
    lines[6] = text  # 文件第 7 行 = 第 j = 6 行：块 1（分片 0 内）的位置 2
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=reason) as info:
        _import(path, small, tmp_path / "c")
    assert str(info.value).startswith(f"{path}:7: ")


def test_import_row_count_must_match(small, tmp_path):
    short = _write_rows(tmp_path / "short.jsonl", _rows(11))
    with pytest.raises(ValueError, match=r"ends after 11 rows"):
        _import(short, small, tmp_path / "a")
    long = _write_rows(tmp_path / "long.jsonl", _rows(13))
    with pytest.raises(ValueError) as info:
        _import(long, small, tmp_path / "b")
    assert str(info.value).startswith(f"{long}:13: extra row")
    with pytest.raises(TeacherCacheDamaged, match="incomplete"):
        TeacherCache.open(tmp_path / "b")  # 最后一个分片没有提交


def test_import_default_teacher_weights_is_file_hash(small, tmp_path):
    path = _write_rows(tmp_path / "t.jsonl", _rows(12))
    fp = make_fingerprint("tok", small.store, teacher_weights="x")
    del fp["teacher_weights"]
    import_topk_jsonl(path, small, tmp_path / "c", fingerprint=fp, top_k=SMALL_K, temperature=1.0,
                      real_vocab_size=SMALL_VOCAB, progress=False)
    cache = TeacherCache.open(tmp_path / "c")
    assert cache.fingerprint["teacher_weights"] == "jsonl-sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
    assert cache.fingerprint["teacher_config"] is None and cache.fingerprint["seq_len"] == SMALL_SEQ


def test_batch_targets_are_the_batch_blocks_targets_on_the_device(teacher, dataset, tmp_path):
    # 训练器只问读取器要一批的目标（batch_targets），不碰文件格式：结果与按块号读 targets 逐位相同。
    _build(teacher, dataset, tmp_path / "c")
    cache = TeacherCache.open(tmp_path / "c")
    got = cache.batch_targets(SimpleNamespace(block_ids=torch.tensor([5, 0, 3])), torch.device("cpu"))
    assert len(got) == 3 and got[0].dtype == torch.int64 and got[0].shape == (3, SEQ, K)
    for a, b in zip(got, cache.targets([5, 0, 3])):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match=r"needs batches that carry block_ids \(BatchLoader gives them\)"):
        cache.batch_targets(SimpleNamespace(block_ids=None), torch.device("cpu"))


def test_the_cache_modules_do_not_import_the_trainer():
    code = ("import sys, functional_lm.kd.cache_build, functional_lm.kd.teacher_cache; "
            "print('functional_lm.kd.trainer' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_reading_every_block_keeps_at_most_a_fixed_number_of_shards_mapped(teacher, dataset, tmp_path, monkeypatch):
    # 流式读取：按块号读遍整个缓存时，同时映射的分片至多 _OPEN_SHARDS 个（最久未用的先解除映射），
    # 所以映射进进程的页与缓存总大小无关；读到的值与一次只读一块时相同。上限调到 3，7 个分片就超过它。
    import functional_lm.kd.teacher_cache as module

    monkeypatch.setattr(module, "_OPEN_SHARDS", 3)
    _build(teacher, dataset, tmp_path / "c", blocks_per_shard=1)
    cache = TeacherCache.open(tmp_path / "c")
    assert cache.num_blocks == 7
    first = [t.clone() for t in cache.targets([0])]
    for block in range(cache.num_blocks):
        cache.targets([block])
        assert len(cache._maps) <= 3
    assert 0 not in cache._maps  # 最早的分片已解除映射
    for again, before in zip(cache.targets([0]), first):
        assert torch.equal(again, before)


# ------------------------------------------------------------------------------------------------ 坏输入（issue：外部测试者）
def _flip(path, offset=5):
    """原地翻转文件里的一个字节（大小不变：结构检查看不出）。"""
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x5A
    path.write_bytes(bytes(data))


def _poke(directory, name, block_in_shard, position, value, dtype, width):
    """把分片文件里某块某位置的第一个值改成 value，并把 index.json 里的 CRC-32 改成新内容的：
    模拟“校验和之外”的坏值（例如写入前就坏了），只有取值范围检查能发现。"""
    path = directory / name
    shape = (-1, SEQ, width) if width else (-1, SEQ)
    array = np.memmap(path, dtype, "r+").reshape(shape)
    array[(block_in_shard, position) + ((0,) if width else ())] = value
    array.flush()
    del array
    index = json.loads((directory / "index.json").read_text())
    for entry in index["shards"]:
        if name in entry["files"]:
            entry["files"][name]["crc32"] = tc.crc32_file(path)
    (directory / "index.json").write_text(json.dumps(index))


def test_a_teacher_with_nan_outputs_is_refused_naming_the_blocks_and_the_teacher(dataset, tmp_path):
    # 只有块 4 含有的 token 的嵌入行是 NaN（输出投影不共享嵌入，别的块不受影响）：块 0…3（分片 0、1）照常提交，
    # 分片 2 在块 4 处被拒绝。
    tokens = [set(dataset.examples([b], False)[0].ravel().tolist()) for b in range(len(dataset))]
    only_in_4 = sorted(tokens[4] - set().union(*(tokens[b] for b in range(len(dataset)) if b != 4)))
    assert only_in_4
    untied = CFG.replace(tie_word_embeddings=False)
    poisoned = init_params(untied, seed=3)
    poisoned["model.embed_tokens.weight"][only_in_4[0]] = float("nan")
    out = tmp_path / "c"
    with pytest.raises(cb.NonFiniteTeacher) as info:
        build_teacher_cache(poisoned, untied, dataset, out, top_k=K, temperature=T, fingerprint=_fingerprint(dataset),
                            blocks_per_shard=2, batch_size=1, progress=False, teacher_name="nan-teacher-dir")
    text = str(info.value)
    assert "nan-teacher-dir" in text and "block 4" in text and str(out) in text and "block 5" not in text
    assert info.value.blocks == [4]
    index = json.loads((out / "index.json").read_text())
    assert [entry is not None for entry in index["shards"]] == [True, True, False, False]
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]


def test_all_nan_teacher_is_refused_in_the_first_batch(teacher, dataset, tmp_path):
    poisoned = {**teacher, "model.norm.weight": torch.full_like(teacher["model.norm.weight"], float("nan"))}
    with pytest.raises(cb.NonFiniteTeacher, match=r"blocks 0, 1 ") as info:
        _build(poisoned, dataset, tmp_path / "c")  # 每个分片 2 块：第一批就是分片 0 的块 0、1
    assert str(info.value).startswith("the teacher gives non-finite") and info.value.blocks == [0, 1]


@pytest.mark.parametrize("name, block", [("ids-00001.bin", 2), ("logprobs-00002.bin", 5), ("tail-00003.bin", 6)])
def test_damage_in_place_is_found_on_the_first_read_of_the_shard(copy, name, block):
    _flip(copy / name)
    cache = TeacherCache.open(copy)  # 结构检查（大小）看不出原地的损坏
    cache.targets([0, 1])  # 别的分片照常可读
    with pytest.raises(TeacherCacheDamaged) as info:
        cache.targets([block])
    text = str(info.value)
    assert info.value.file == name and str(copy) in text and "checksum" in text
    assert str(copy / name) in text and "recomputes that shard" in text


def test_each_shard_is_checksummed_once_not_per_batch(teacher, dataset, tmp_path, monkeypatch):
    _build(teacher, dataset, tmp_path / "c", blocks_per_shard=1)
    monkeypatch.setattr(tc, "_OPEN_SHARDS", 3)  # 映射会被换出：换回来时不再重算校验和
    seen = []
    real = tc.crc32_file
    monkeypatch.setattr(tc, "crc32_file", lambda path: seen.append(path.name) or real(path))
    cache = TeacherCache.open(tmp_path / "c")
    assert seen == []  # 打开时不读数据
    for _ in range(3):
        for block in range(7):
            cache.targets([block, (block + 3) % 7])
    assert sorted(seen) == sorted(f"{kind}-{s:05d}.bin" for s in range(7) for kind in ("ids", "logprobs", "tail"))


BAD_VALUES = {  # (文件种类, 值, 原因里的话)
    "id too large": ("ids", 211, r"token ids outside \[0, 211\)"),
    "negative id": ("ids", -1, r"token ids outside \[0, 211\)"),
    "nan log-prob": ("logprobs", np.float16("nan"), "log-probabilities that are not finite"),
    "positive log-prob": ("logprobs", np.float16(0.5), "log-probabilities above 0"),
    "tail above one": ("tail", np.float32(1.5), r"tail mass outside \[0, 1\]"),
    "negative tail": ("tail", np.float32(-0.5), r"tail mass outside \[0, 1\]"),
    "nan tail": ("tail", np.float32("nan"), r"tail mass outside \[0, 1\]"),
}


@pytest.mark.parametrize("case", sorted(BAD_VALUES))
def test_values_out_of_range_are_damage_even_with_a_matching_checksum(copy, case):
    kind, value, reason = BAD_VALUES[case]
    dtype, width = {"ids": ("<i4", K), "logprobs": ("<f2", K), "tail": ("<f4", 0)}[kind]
    _poke(copy, f"{kind}-00001.bin", 1, 5, value, dtype, width)  # 块 3 = 分片 1 的第 2 块
    cache = TeacherCache.open(copy, verify=True)  # 校验和相符
    cache.targets([0, 2])
    with pytest.raises(TeacherCacheDamaged, match=reason) as info:
        cache.targets([6, 3])
    assert info.value.file == f"{kind}-00001.bin" and "block 3" in str(info.value)


def test_float16_minimum_and_a_full_tail_are_legal_values(copy):
    _poke(copy, "logprobs-00001.bin", 1, 5, np.float16(-65504), "<f2", K)  # float16 存 −∞ 的方式
    _poke(copy, "tail-00001.bin", 1, 6, np.float32(1.0), "<f4", 0)
    _, log_probs, tail = TeacherCache.open(copy).targets([3])
    assert float(log_probs[0, 5, 0]) == -65504.0 and float(tail[0, 6]) == 1.0


def test_a_missing_index_says_so_without_advising_to_delete_it(copy):
    (copy / "index.json").unlink()
    with pytest.raises(TeacherCacheDamaged) as info:
        TeacherCache.open(copy)
    text = str(info.value)
    assert f"no teacher cache in {copy}" in text and "index.json is missing" in text
    assert "delete" not in text and "build" in text


def test_incomplete_cache_advice_names_the_build_directory_and_command(teacher, dataset, tmp_path):
    out = tmp_path / "C" / "train"
    _build(teacher, dataset, out, stop=lambda: True)
    with pytest.raises(TeacherCacheDamaged) as info:
        TeacherCache.open(out, build_dir=tmp_path / "C")
    text = str(info.value)
    assert f"teacher cache {out} is incomplete (0 of 4 shards written)" in text
    assert (f"functional-lm teacher-cache --teacher DIR --output-dir {tmp_path / 'C'} --top-k {K} --temperature 2 "
            f"--seq-len {SEQ}") in text
    assert "--blocks-per-shard 2" in text and "is damaged" not in text


def test_a_full_disk_names_the_file_and_keeps_the_committed_shards(teacher, dataset, tmp_path, monkeypatch):
    from functional_lm.errors import StorageError

    _build(teacher, dataset, tmp_path / "ref")
    out = tmp_path / "c"
    monkeypatch.setattr(cb, "open", full_disk_open(".logprobs-00002.bin.tmp"), raising=False)
    with pytest.raises(StorageError) as info:
        _build(teacher, dataset, out)
    monkeypatch.undo()
    text = str(info.value)
    assert str(out / ".logprobs-00002.bin.tmp") in text and "the disk is full" in text and "[ENOSPC]" in text
    assert "2 of 4 shards" in text and "kept" in text and "free some space" in text.lower()
    index = json.loads((out / "index.json").read_text())
    assert [entry is not None for entry in index["shards"]] == [True, True, False, False]
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    status = _build(teacher, dataset, out)  # 腾出空间后原样再建：从分片 2 接着建，结果逐字节相同
    assert (status.complete, status.shards_written) == (True, 2)
    assert _files(out) == _files(tmp_path / "ref")


def test_import_reports_a_binary_file_by_file_and_line(small, tmp_path):
    lines = [json.dumps(r).encode() for r in _rows(12)]
    lines[2] = b"\xff\xfe\x00\x81\x9f binary"
    path = tmp_path / "t.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(ValueError) as info:
        _import(path, small, tmp_path / "c")
    assert str(info.value).startswith(f"{path}:3: ") and "UTF-8" in str(info.value)
