"""教师缓存的身份（functional_lm.kd.cache_identity）：数据指纹只看内容（拷到别的路径、touch 之后不变，改一个 token 就变），
旧版本缓存的数据指纹在校验和相符时被接受，差异用文字说明。

数据是真实的磁盘分词缓存（离线 Qwen2.5 分词器，一段纯文本 + 30 行 JSON lines，其中一篇对话，所以有损失掩码）。
参照值在测试里独立算：zlib.crc32 直接作用于 token / 文档边界 / 掩码的小端字节，旧形式的指纹用 crc32_file 读磁盘文件。
"""

from __future__ import annotations

import os
import shutil
import zlib

import numpy as np
import pytest

from _data_fixtures import write_jsonl
from functional_lm.kd.cache_identity import comparable, data_fingerprint, describe, differences
from functional_lm.data import TokenStore, build_token_cache, load_tokenizer
from functional_lm.data.store import crc32_file
from functional_lm.kd.teacher_cache import TeacherCacheMismatch, check_fingerprint

pytestmark = pytest.mark.usefixtures("qwen_tokenizer")  # 需要离线 Qwen2.5 分词器


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(None)


def _write_sources(directory):
    """一段纯文本与 30 行 JSON lines（第 4 行是对话）。"""
    directory.mkdir(parents=True, exist_ok=True)
    txt = directory / "prose.txt"
    txt.write_text("第一段。\nIt has two lines.\n\nSecond paragraph.\n", encoding="utf-8")
    rows = [{"text": f"row {i} 第{i}行 " * (1 + i % 4)} for i in range(30)]
    rows.insert(3, {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
    return [txt, write_jsonl(directory / "rows.jsonl", rows)]


def _store(sources, tok, cache):
    return build_token_cache(sources, tok, cache, num_workers=0, progress=False)


def _reference(store):
    """参照：直接对小端字节求 CRC-32。"""
    crcs = {
        "tokens": zlib.crc32(np.asarray(store.tokens, dtype="<u4").tobytes()),
        "offsets": zlib.crc32(np.asarray(store.offsets, dtype="<i8").tobytes()),
        "mask": zlib.crc32(np.asarray(store.mask, dtype=np.uint8).tobytes()),
    }
    return {"crc32": crcs, "num_tokens": int(len(store.tokens))}


def _legacy(store):
    """这个版本之前的 data 指纹（磁盘形式）：分词缓存的键 + 各文件的 CRC-32（从磁盘文件读）+ token 数。"""
    # 旧版本的分词缓存只有 tokens.bin、offsets.npy（与 mask.bin）；lines.npy 是之后才加的
    files = {p.name: crc32_file(p) for p in sorted(store.path.iterdir()) if p.name not in ("index.json", "lines.npy")}
    return {"key": store.meta["key"], "files": files, "num_tokens": store.num_tokens}


@pytest.fixture(scope="module")
def stores(tok, tmp_path_factory):
    """同一份数据在两个路径（第二份被 touch 过）各建一个分词缓存，再有一份改了一个词的。"""
    root = tmp_path_factory.mktemp("identity")
    here = _write_sources(root / "here")
    there = root / "there"
    shutil.copytree(root / "here", there)
    for path in there.iterdir():
        os.utime(path, (1_000_000_000, 1_000_000_000))  # 另一个修改时间
    edited = _write_sources(root / "edited")
    edited[1].write_text(edited[1].read_text(encoding="utf-8").replace("row 7 ", "row 8 ", 1), encoding="utf-8")
    cache = root / "tokens"
    return (_store(here, tok, cache), _store(sorted(there.iterdir()), tok, cache), _store(edited, tok, cache))


def test_the_data_fingerprint_is_the_content_not_the_path(stores):
    here, there, edited = stores
    assert here.path != there.path and here.meta["key"] != there.meta["key"]  # 分词缓存的键照旧含路径与修改时间
    assert here.mask is not None  # 有对话：掩码也进指纹
    assert data_fingerprint(here) == _reference(here) == data_fingerprint(there)
    memory = TokenStore(np.array(here.tokens), np.array(here.offsets), here.separator_id, np.array(here.mask))
    assert memory.path is None and data_fingerprint(memory) == data_fingerprint(here)  # 现算与读记录的相同
    assert data_fingerprint(edited) != data_fingerprint(here)


def test_an_old_fingerprint_is_accepted_when_its_checksums_match_this_data(stores, tmp_path):
    here, there, edited = stores
    old = {"data": _legacy(here), "split": {"split": "train", "val_fraction": 0.0, "seed": 0}}
    wanted = {"data": data_fingerprint(there), "split": old["split"]}
    assert comparable(old, there) == wanted  # 另一个路径上的同一份数据：旧缓存照常可用
    check_fingerprint(old, wanted, tmp_path, store=there)
    # 内容不同：照旧拒绝，说明里写出这个缓存早于内容指纹
    assert comparable(old, edited) == old
    with pytest.raises(TeacherCacheMismatch) as info:
        check_fingerprint(old, {**wanted, "data": data_fingerprint(edited)}, tmp_path, store=edited)
    assert "the data's tokens differ (different text or a different file; the cache predates content" in str(info.value)
    # 内存形式的旧指纹（key 为 null）：去掉 key 即新指纹
    memory_old = {"data": {"key": None, **data_fingerprint(here)}}
    assert comparable(memory_old, there) == {"data": data_fingerprint(there)}


@pytest.mark.parametrize("found, sentence", [
    ([("split.seed", 0, 5)], "the split seed (--split-seed) differs: cache 0, this run 5"),
    ([("split.val_fraction", 0.2, 0.1)], "the validation fraction (--val-fraction) differs: cache 0.2, this run 0.1"),
    ([("tokenizer", "a" * 64, "b" * 64)], "the tokenizer differs (another vocabulary or other tokenizer files)"),
    ([("teacher_weights", "x", "y")], "the teacher's weights differ (another checkpoint, or its weights changed)"),
    ([("data.crc32.tokens", 1, 2), ("data.num_tokens", 100, 98)],
     "the data's tokens differ (different text or a different file): the cache was built from 100 tokens, "
     "this data has 98"),
    ([("data.crc32.tokens", 1, 2)], "the data's tokens differ (different text or a different file)"),
    ([("data.crc32.offsets", 1, 2)],
     "the data's document boundaries differ (the same tokens cut into other documents)"),
    ([("data.crc32.mask", 1, 2)],
     "the data's loss mask differs (other tokens are trained on: chat data's assistant turns)"),
    ([("teacher_config.hidden_size", 32, 64)],
     "the teacher's config.json (hidden_size) differs: cache 32, this run 64"),
    ([("something", "a", None)], 'something differs: cache "a", this run null'),
])
def test_each_difference_is_one_sentence_in_words(found, sentence):
    assert describe(found, "this run") == [sentence]


def test_data_differences_come_first_as_one_sentence():
    old = {"data": {"crc32": {"tokens": 1, "offsets": 2}, "num_tokens": 9}, "top_k": 8, "tokenizer": "t"}
    new = {"data": {"crc32": {"tokens": 3, "offsets": 4}, "num_tokens": 9}, "top_k": 4, "tokenizer": "t"}
    assert describe(differences(old, new)) == [
        "the data's tokens differ (different text or a different file)",
        "top-k (--top-k) differs: cache 8, this build 4",
    ]
