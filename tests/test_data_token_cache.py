"""磁盘 token 缓存测试：uint32 memmap + JSON 索引，多进程分词与单进程结果一致，再次分词时复用，
源文件改动后重建，坏输入的报错与跳过计数。"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

pytestmark = pytest.mark.usefixtures("qwen_tokenizer")  # 需要离线 Qwen2.5 分词器

from _data_fixtures import write_jsonl  # noqa: E402

from functional_lm.data import TokenStore, build_token_cache, load_tokenizer
from functional_lm.errors import DataError


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


def test_text_split_changes_documents_and_cache_key(tok, tmp_path):
    txt = tmp_path / "notes.txt"
    txt.write_text("one\ntwo\n\nthree\n\n\nfour\n", encoding="utf-8")
    cache = tmp_path / "c"
    build = lambda split: build_token_cache(  # noqa: E731
        [txt], tok, cache, num_workers=0, progress=False, text_split=split
    )
    para, whole, lines = build("paragraph"), build("file"), build("line")
    assert [para.num_documents, whole.num_documents, lines.num_documents] == [3, 1, 4]
    assert len({para.path, whole.path, lines.path}) == 3  # 切法进了缓存键：各建各的
    sep = tok.separator_token_id
    assert para.tokens.tolist() == (
        tok.encode("one\ntwo") + [sep] + tok.encode("three") + [sep] + tok.encode("four") + [sep]
    )
    assert build("file").meta["reused"] is True and build("paragraph").meta["reused"] is True
    with pytest.raises(ValueError, match=r"text_split='lines'.*expected one of"):
        build("lines")


def test_single_txt_file_with_val_fraction_is_accepted(tok, tmp_path):
    from functional_lm.data import prepare_data

    notes = tmp_path / "notes.txt"
    notes.write_text("\n\n".join(f"Paragraph {i}: some notes about topic {i}." for i in range(40)), encoding="utf-8")
    data = prepare_data(
        [notes], tokenizer=tok, seq_len=8, batch_size=2, val_fraction=0.05, cache_dir=tmp_path / "c",
        num_workers=0, progress=False,
    )
    assert data.store.num_documents == 40
    assert len(data.val.doc_ids) == 2 and len(data.train.doc_ids) == 38
    with pytest.raises(ValueError, match="leaves no training documents out of 1"):
        prepare_data(
            [notes], tokenizer=tok, seq_len=8, batch_size=2, val_fraction=0.05, cache_dir=tmp_path / "c",
            num_workers=0, progress=False, text_split="file",
        )
    with pytest.raises(ValueError, match=r"text_split='para'"):
        prepare_data([notes], tokenizer="/nonexistent/tokenizer", text_split="para")  # 先于加载分词器报错


@pytest.mark.parametrize("workers", [0, 2])
def test_every_document_knows_its_file_and_line(tok, tmp_path, workers):
    """错误消息要点名用户的文件与行（而不是内部的 token 缓存）：缓存记下每篇文档的来源文件与行号，
    与读取器给 Document 的 (source, line) 相同——空行、被跳过的坏行与纯文本的分段都不打乱对应。"""
    from functional_lm.data import ReadStats, as_source

    prose = tmp_path / "prose.txt"
    prose.write_text("First paragraph.\nStill first.\n\n\nSecond one.\n\nThird.\n", encoding="utf-8")
    rows = ['{"text": "a"}', "", '{"messages": [{"role": "user", "content": "hi"}, '
            '{"role": "assistant", "content": "yo"}]}', "not json", '{"text": "b"}']
    chat = write_jsonl(tmp_path / "chat.jsonl", rows)
    files = [prose, chat]
    store = build_token_cache(files, tok, tmp_path / "cache", num_workers=workers, chunk_size=2,
                              progress=False, skip_errors=True)
    expected = [f"{d.source}:{d.line}" for f in files for d in as_source(f).documents(True, ReadStats())]
    assert expected == [f"{prose}:1", f"{prose}:5", f"{prose}:7", f"{chat}:1", f"{chat}:3", f"{chat}:5"]
    assert [store.document_origin(i) for i in range(store.num_documents)] == expected
    assert store.description == f"{prose}, {chat}"
    again = build_token_cache(files, tok, tmp_path / "cache", num_workers=workers, chunk_size=2,
                              progress=False, skip_errors=True)
    assert again.meta["reused"] is True
    assert [again.document_origin(i) for i in range(again.num_documents)] == expected


def test_a_cache_without_line_numbers_still_names_the_file(tok, sources, tmp_path):
    """行号文件出现之前建的缓存（index.json 里没有 has_lines）：点名文件与文档序号（从 1 数）。"""
    store = build_token_cache(sources, tok, tmp_path / "cache", num_workers=0, progress=False)
    index = json.loads((store.path / "index.json").read_text())
    del index["has_lines"], index["files"]["lines.npy"]
    for entry in index["sources"]:
        del entry["documents"]
    (store.path / "index.json").write_text(json.dumps(index))
    (store.path / "lines.npy").unlink()
    old = TokenStore.open(store.path, verify=True)
    assert old.document_origin(5) == f"document 6 of {sources[0]}, {sources[1]}"
    assert old.description == f"{sources[0]}, {sources[1]}"
    assert TokenStore.from_documents([[1, 2]], separator_id=0).document_origin(0) == "document 1 of the data"
