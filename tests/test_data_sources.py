"""数据源读取测试：纯文本（按段 / 整文件 / 按行切分）、JSON lines（text / messages）、parquet、datasets，
坏输入的报错与跳过计数，未知扩展名的拒绝，以及“像路径却不存在”不去 hub 上找。"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

from _data_fixtures import write_jsonl

from functional_lm.data import TEXT_SPLITS, ReadStats, as_source, read_documents
from functional_lm.errors import DataError
from functional_lm.data.sources import looks_like_path


def test_text_file_is_one_document_with_text_split_file(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("第一行\nsecond line\n\nthird line\n", encoding="utf-8")
    docs = list(read_documents(p, text_split="file"))
    assert len(docs) == 1
    assert docs[0].text == "第一行\nsecond line\n\nthird line\n" and docs[0].messages is None
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


# ------------------------------------------------------------------ 纯文本的切分方式（text_split）

# 行号：1、2 空白（第 2 行只有空格）；3-4 第一段（第 4 行带缩进与行尾空格）；5 空、6 只有空白与全角空格、7 空；
# 8-9 第二段（CRLF 换行）；10-11 空；12 第三段（文件末尾没有换行）。
SPLIT_SAMPLE = (
    "\n   \n第一段第一行\n  indented second line  \n\n \t\u3000 \n\n"
    "second paragraph\r\nwith CRLF\r\n\n\nthird"
)


def test_text_splits_constant_and_default_is_paragraph(tmp_path):
    assert TEXT_SPLITS == ("paragraph", "file", "line")
    p = tmp_path / "notes.txt"
    p.write_text(SPLIT_SAMPLE, encoding="utf-8")
    default = [(d.text, d.line) for d in read_documents(p)]
    explicit = [(d.text, d.line) for d in read_documents(p, text_split="paragraph")]
    assert default == explicit and len(default) == 3


def test_paragraph_split_keeps_text_inside_and_reports_start_lines(tmp_path):
    p = tmp_path / "notes.txt"
    p.write_text(SPLIT_SAMPLE, encoding="utf-8")
    docs = list(read_documents(p, text_split="paragraph"))
    # 段内原样保留（缩进、行尾空格、段内 CRLF），只去掉段末那个换行；空白行（含全角空格行）只做分隔。
    assert [d.text for d in docs] == [
        "第一段第一行\n  indented second line  ",
        "second paragraph\r\nwith CRLF",
        "third",
    ]
    assert [d.line for d in docs] == [3, 8, 12]
    assert all(d.source == str(p) and d.messages is None for d in docs)


def test_line_split_gives_each_non_blank_line(tmp_path):
    p = tmp_path / "notes.txt"
    p.write_text(SPLIT_SAMPLE, encoding="utf-8")
    docs = list(read_documents(p, text_split="line"))
    assert [d.text for d in docs] == [
        "第一段第一行", "  indented second line  ", "second paragraph", "with CRLF", "third",
    ]
    assert [d.line for d in docs] == [3, 4, 8, 9, 12]


def test_file_split_is_the_whole_file(tmp_path):
    p = tmp_path / "notes.txt"
    p.write_text(SPLIT_SAMPLE, encoding="utf-8")
    docs = list(read_documents(p, text_split="file"))
    assert [(d.text, d.line) for d in docs] == [(SPLIT_SAMPLE, 1)]


def test_invalid_text_split_names_argument_and_choices(tmp_path):
    p = tmp_path / "notes.txt"
    p.write_text("a\n\nb\n", encoding="utf-8")
    pattern = r"text_split='paragraphs'.*'paragraph', 'file', 'line'"
    with pytest.raises(ValueError, match=pattern):
        read_documents(p, text_split="paragraphs")
    with pytest.raises(ValueError, match=pattern):
        as_source(p, text_split="paragraphs")


def test_invalid_utf8_in_a_paragraph_names_its_line_and_skips_the_paragraph(tmp_path):
    p = tmp_path / "mixed.txt"
    # 第二段（3-5 行）里有两处坏字节：报第一处（第 4 行第 5 列）。
    p.write_bytes(b"ok one\n\nstill fine\nbad \xff here\nsame \xfe paragraph\n\ngood\n")
    with pytest.raises(DataError, match=r"mixed\.txt:4: invalid UTF-8 at column 5"):
        list(read_documents(p))
    stats = ReadStats()
    docs = list(read_documents(p, skip_errors=True, stats=stats))
    assert [(d.text, d.line) for d in docs] == [("ok one", 1), ("good", 7)]
    assert stats.documents == 2 and stats.skipped == 1 and stats.errors[0].startswith(f"{p}:4:")
    # 按行切时只跳过坏的那两行。
    stats = ReadStats()
    docs = list(read_documents(p, text_split="line", skip_errors=True, stats=stats))
    assert [d.line for d in docs] == [1, 3, 7] and stats.skipped == 2


def test_paragraph_split_streams_large_files_with_right_line_numbers(tmp_path):
    p = tmp_path / "big.txt"
    with open(p, "w", encoding="utf-8") as f:
        for i in range(5000):  # 每段 3 行 + 1 个空行
            f.write(f"paragraph {i} line a\nline b\nline c\n\n")
    docs = read_documents(p)
    first = next(docs)
    assert first.text == "paragraph 0 line a\nline b\nline c" and first.line == 1
    rest = list(docs)
    assert len(rest) == 4999
    assert rest[-1].line == 4 * 4999 + 1 and rest[-1].text.startswith("paragraph 4999 ")


# ------------------------------------------------------------------ 扩展名

@pytest.mark.parametrize("name", ["paper.pdf", "table.csv", "data.jsonl.gz"])
def test_unknown_suffix_is_refused_listing_supported_ones(tmp_path, name):
    p = tmp_path / name
    p.write_bytes(b"%PDF-1.4 binary \x00\x01")
    suffix = Path(name).suffix
    with pytest.raises(ValueError, match=rf"{name}: no reader handles '\{suffix}' files") as info:
        read_documents(p)
    message = str(info.value)
    for supported in (".jsonl", ".json", ".parquet", ".txt", ".md"):
        assert supported in message
    with pytest.raises(ValueError, match="no reader handles"):
        as_source(p)  # 构造数据源时就拒绝，不等到分词


def test_no_suffix_is_text_and_kind_text_forces_any_suffix(tmp_path):
    readme = tmp_path / "README"
    readme.write_text("title\n\nbody\n", encoding="utf-8")
    assert [d.text for d in read_documents(readme)] == ["title", "body"]
    csv = tmp_path / "t.csv"
    csv.write_text("a,b\n1,2\n", encoding="utf-8")
    assert [d.text for d in read_documents(csv, kind="text", text_split="line")] == ["a,b", "1,2"]


def test_text_split_is_part_of_the_text_fingerprint_only(tmp_path):
    txt = tmp_path / "n.txt"
    txt.write_text("a\n\nb\n", encoding="utf-8")
    fps = {split: as_source(txt, text_split=split).fingerprint for split in TEXT_SPLITS}
    assert len(set(fps.values())) == 3
    jl = write_jsonl(tmp_path / "d.jsonl", [{"text": "x"}])
    assert as_source(jl, text_split="line").fingerprint == as_source(jl, text_split="file").fingerprint
    assert [d.text for d in as_source(txt, text_split="line").documents()] == ["a", "b"]
    assert [d.text for d in as_source(txt, text_split="file").documents()] == ["a\n\nb\n"]


# ------------------------------------------------------------------ 本地路径 vs hub 数据集名

class _FakeDatasets(types.ModuleType):
    """替身 datasets 模块：记录 load_dataset 的调用，并像断网时那样失败。"""

    class DatasetDict(dict):
        pass

    def __init__(self) -> None:
        super().__init__("datasets")
        self.calls: list[tuple[str, str]] = []

    def load_dataset(self, name, split=None):
        self.calls.append((name, split))
        raise ConnectionError(f"Couldn't reach '{name}' on the Hub (LocalEntryNotFoundError)\nsecond line")

    def load_from_disk(self, name):
        raise AssertionError("load_from_disk must not be called")


@pytest.mark.parametrize(
    "item", ["missing.jsonl", "data/missing.txt", "./x", "~/flm-surely-missing.txt", "a/b/c", "notes.v2", "my data"]
)
def test_missing_local_looking_path_is_file_not_found_without_datasets(tmp_path, monkeypatch, item):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "datasets", None)  # 任何 `import datasets` 都会失败
    with pytest.raises(FileNotFoundError, match=r"data file not found: "):
        as_source(item)
    with pytest.raises(FileNotFoundError, match="data file not found"):
        as_source(Path("no-such-dir") / "nope")  # PathLike 一律当路径


def test_hub_id_goes_to_load_dataset_and_failure_is_one_paragraph(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fake = _FakeDatasets()
    monkeypatch.setitem(sys.modules, "datasets", fake)
    for item in ("missing.jsonl", "data/missing.txt", "./x"):
        with pytest.raises(FileNotFoundError):
            as_source(item)
    assert fake.calls == []  # 像路径的字符串从不到 hub 上找
    with pytest.raises(ValueError, match=r"'owner/name' is neither a local file nor a dataset") as info:
        as_source("owner/name")
    assert fake.calls == [("owner/name", "train")]
    message = str(info.value)
    assert "ConnectionError: Couldn't reach 'owner/name'" in message and "second line" not in message
    assert "offline" in message and str(tmp_path) in message
    assert info.value.__cause__ is None and info.value.__suppress_context__  # 不附原始回溯链


def test_looks_like_path_table():
    for name in ("missing.jsonl", "data/missing.txt", "./x", "../x", "/abs", "~/x", "a/b/c", "x.v2", "org/t.csv",
                 "a b", "win\\path", ""):
        assert looks_like_path(name), name
    for name in ("wikitext", "allenai/c4", "teknium/OpenHermes-2.5", "HuggingFaceFW/fineweb-edu", "squad_v2"):
        assert not looks_like_path(name), name


def test_not_a_parquet_file_names_the_file(tmp_path):
    pytest.importorskip("pyarrow")
    p = tmp_path / "fake.parquet"
    p.write_text("this is text, not parquet\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"fake\.parquet:1: not a parquet file \(") as info:
        list(read_documents(p))
    assert info.value.path == str(p) and info.value.line == 1
    with pytest.raises(DataError, match=r"fake\.parquet:1: not a parquet file"):
        list(read_documents(p, skip_errors=True))  # 整个文件坏了不是“一行坏了”，不能跳过


def test_dataset_without_the_requested_split_names_the_splits(monkeypatch):
    fake = _FakeDatasets()
    fake.load_dataset = lambda name, split=None: fake.DatasetDict(validation=[{"text": "v"}])
    monkeypatch.setitem(sys.modules, "datasets", fake)
    with pytest.raises(ValueError, match=r"dataset owner/name has no split 'train' \(it has \['validation'\]\)"):
        as_source("owner/name")
    assert [d.text for d in as_source("owner/name", split="validation").documents()] == ["v"]
