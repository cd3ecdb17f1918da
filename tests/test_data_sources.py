"""数据源读取测试：纯文本、JSON lines（text / messages）、parquet、datasets，以及坏输入的报错与跳过计数。"""

from __future__ import annotations

import pytest

from _data_fixtures import write_jsonl

from functional_lm.data import DataError, ReadStats, read_documents


def test_text_file_is_one_document(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("第一行\nsecond line\n", encoding="utf-8")
    docs = list(read_documents(p))
    assert len(docs) == 1
    assert docs[0].text == "第一行\nsecond line\n" and docs[0].messages is None
    assert docs[0].source == str(p) and docs[0].line == 1


def test_jsonl_text_and_messages(tmp_path):
    p = write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"text": "hello"},
            "",  # 空行直接略过
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
            {"content": "custom field", "text": "ignored?"},
        ],
    )
    docs = list(read_documents(p))
    assert [d.line for d in docs] == [1, 3, 4]
    assert docs[0].text == "hello"
    assert docs[1].messages[1]["content"] == "a" and docs[1].text is None
    assert docs[2].text == "ignored?"
    docs = list(read_documents(p, field="content", skip_errors=True))
    assert [d.text for d in docs if d.text is not None] == ["custom field"]


def test_empty_file_error_names_file(tmp_path):
    p = tmp_path / "empty.jsonl"
    p.write_bytes(b"")
    with pytest.raises(DataError, match=r"empty\.jsonl:1: .*empty"):
        list(read_documents(p))
    t = tmp_path / "empty.txt"
    t.write_bytes(b"  \n")
    with pytest.raises(DataError, match=r"empty\.txt:1: .*empty"):
        list(read_documents(t))


def test_missing_field_names_file_and_line(tmp_path):
    p = write_jsonl(tmp_path / "x.jsonl", [{"text": "ok"}, {"body": "no text"}, {"text": "ok2"}])
    with pytest.raises(DataError, match=r"x\.jsonl:2: .*'text'") as info:
        list(read_documents(p))
    assert info.value.line == 2 and info.value.path.endswith("x.jsonl")


def test_invalid_json_and_invalid_utf8_name_the_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_bytes(b'{"text": "ok"}\n{"text": "oops"\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: invalid JSON"):
        list(read_documents(p))
    q = tmp_path / "bin.jsonl"
    q.write_bytes(b'{"text": "ok"}\n{"text": "ok"}\n{"text": "\xff\xfe"}\n')
    with pytest.raises(DataError, match=r"bin\.jsonl:3: invalid UTF-8"):
        list(read_documents(q))
    t = tmp_path / "bin.txt"
    t.write_bytes(b"line one\nline two \xc3\x28\n")
    with pytest.raises(DataError, match=r"bin\.txt:2: invalid UTF-8"):
        list(read_documents(t))


def test_unknown_role_names_file_and_line(tmp_path):
    p = write_jsonl(
        tmp_path / "chat.jsonl",
        [
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
            {"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "beep"}]},
        ],
    )
    with pytest.raises(DataError, match=r"chat\.jsonl:2: .*unknown role 'robot'"):
        list(read_documents(p))


def test_skip_errors_counts_skipped_lines(tmp_path):
    p = tmp_path / "mixed.jsonl"
    p.write_bytes(
        b'{"text": "a"}\n{"nope": 1}\n{"text": "\xff"}\nnot json\n'
        b'{"messages": [{"role": "alien", "content": "x"}]}\n{"text": "b"}\n'
    )
    stats = ReadStats()
    docs = list(read_documents(p, skip_errors=True, stats=stats))
    assert [d.text for d in docs] == ["a", "b"]
    assert stats.documents == 2 and stats.skipped == 4
    assert [int(e.split("mixed.jsonl:")[1].split(":")[0]) for e in stats.errors] == [2, 3, 4, 5]


def test_parquet_text_and_bad_row(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    p = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": ["one", "two", None, "four"]}), p)
    with pytest.raises(DataError, match=r"d\.parquet:3: .*'text'"):
        list(read_documents(p))
    stats = ReadStats()
    docs = list(read_documents(p, skip_errors=True, stats=stats))
    assert [d.text for d in docs] == ["one", "two", "four"] and [d.line for d in docs] == [1, 2, 4]
    assert stats.skipped == 1


def test_hf_datasets_object(tmp_path):
    datasets = pytest.importorskip("datasets")
    from functional_lm.data import read_hf_dataset

    ds = datasets.Dataset.from_dict({"text": ["alpha", "beta", "gamma"]})
    docs = list(read_hf_dataset(ds))
    assert [d.text for d in docs] == ["alpha", "beta", "gamma"]
    ds.save_to_disk(str(tmp_path / "saved"))
    docs = list(read_hf_dataset(str(tmp_path / "saved")))
    assert [d.text for d in docs] == ["alpha", "beta", "gamma"]
    chat = datasets.Dataset.from_list(
        [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}]
    )
    assert list(read_hf_dataset(chat))[0].messages[1]["content"] == "a"
