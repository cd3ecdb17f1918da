"""磁盘 token 缓存的损坏检测与自动重建、写失败（磁盘满 / 只读）的报错。

损坏的方式：截断 tokens.bin、等长翻转 tokens.bin / mask.bin / lines.npy 的一个字节（只有校验和能发现）、
index.json 写成垃圾、删掉 offsets.npy 或 lines.npy。每种都要：build_token_cache（或 prepare_data）打印一行“damaged … rebuilding”，
重建出的数据与全新构建逐 token 相同，之后再调用就复用；直接 TokenStore.open 则报出文件名与重建办法。
"""

from __future__ import annotations

import errno
import json
import os
import zlib

import numpy as np
import pytest

pytestmark = pytest.mark.usefixtures("qwen_tokenizer")  # 需要离线 Qwen2.5 分词器

from _data_fixtures import write_jsonl  # noqa: E402

import functional_lm.data.token_cache as cache_mod  # noqa: E402
from functional_lm.data import DocumentSource, TokenStore, build_token_cache, load_tokenizer, prepare_data
from functional_lm.errors import CacheDamagedError, CacheWriteError
from functional_lm.data.store import CACHE_FORMAT_VERSION  # noqa: E402


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(None)


@pytest.fixture()
def sources(tmp_path):
    txt = tmp_path / "prose.txt"
    txt.write_text("第一段。\nIt has two lines.\n\nSecond paragraph.\n", encoding="utf-8")
    rows = [{"text": f"row {i} 第{i}行 " * (1 + i % 4)} for i in range(30)]
    rows.insert(3, {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
    return [txt, write_jsonl(tmp_path / "rows.jsonl", rows)]


def _build(sources, tok, cache, chunk_size=128):
    return build_token_cache(sources, tok, cache, num_workers=0, progress=False, chunk_size=chunk_size)


def _snapshot(store):
    return store.tokens.tolist(), store.offsets.tolist(), store.mask.tolist()


def _flip_byte(path, where):
    data = bytearray(path.read_bytes())
    data[where] ^= 0x01
    path.write_bytes(bytes(data))


def _truncate_tokens(d):
    with open(d / "tokens.bin", "r+b") as f:
        f.truncate(os.path.getsize(d / "tokens.bin") - 6)


DAMAGE = {
    "truncated tokens.bin": ("tokens.bin", _truncate_tokens),
    "flipped byte in tokens.bin": ("tokens.bin", lambda d: _flip_byte(d / "tokens.bin", 40)),
    "flipped byte in mask.bin": ("mask.bin", lambda d: _flip_byte(d / "mask.bin", 3)),
    "garbage index.json": ("index.json", lambda d: (d / "index.json").write_bytes(b"\x00{not json")),
    "deleted offsets.npy": ("offsets.npy", lambda d: (d / "offsets.npy").unlink()),
    # np.load 忽略尾部多余的字节，只有 index.json 记下的字节数能发现。
    "appended bytes to offsets.npy": ("offsets.npy", lambda d: open(d / "offsets.npy", "ab").write(b"\0" * 8)),
    "deleted lines.npy": ("lines.npy", lambda d: (d / "lines.npy").unlink()),
    "flipped byte in lines.npy": ("lines.npy", lambda d: _flip_byte(d / "lines.npy", 130)),
}


@pytest.mark.parametrize("chunk_size", [2, 128])  # 2：对话出现前已写过 token，掩码文件要回填
def test_index_records_sizes_and_crc32_of_each_file(tok, sources, tmp_path, chunk_size):
    store = _build(sources, tok, tmp_path / "cache", chunk_size=chunk_size)
    index = json.loads((store.path / "index.json").read_text())
    assert index["version"] == CACHE_FORMAT_VERSION == 2
    assert sorted(index["files"]) == ["lines.npy", "mask.bin", "offsets.npy", "tokens.bin"]
    for name, entry in index["files"].items():
        raw = (store.path / name).read_bytes()
        assert entry == {"bytes": len(raw), "crc32": zlib.crc32(raw)}
    assert index["files"]["tokens.bin"]["bytes"] == 4 * store.num_tokens


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_cache_is_rebuilt_and_equals_a_fresh_build(tok, sources, tmp_path, capfd, damage):
    fresh = _snapshot(_build(sources, tok, tmp_path / "fresh"))
    cache = tmp_path / "cache"
    first = _build(sources, tok, cache)
    file, hurt = DAMAGE[damage]
    hurt(first.path)
    capfd.readouterr()
    rebuilt = _build(sources, tok, cache)
    err = capfd.readouterr().err
    assert f"token cache {first.path} is damaged ({file}: " in err and err.rstrip().endswith("rebuilding")
    assert len(err.strip().splitlines()) == 1
    assert rebuilt.meta["reused"] is False and rebuilt.path == first.path
    assert _snapshot(rebuilt) == fresh
    assert sorted(p.name for p in cache.iterdir()) == [first.path.name]  # 没有残留的临时 / 旧目录
    again = _build(sources, tok, cache)
    assert again.meta["reused"] is True and _snapshot(again) == fresh


def test_prepare_data_rebuilds_a_damaged_cache(tok, sources, tmp_path, capfd):
    cache = tmp_path / "cache"
    kwargs = dict(tokenizer=tok, seq_len=16, batch_size=2, cache_dir=cache, num_workers=0, progress=False)
    first = prepare_data(sources, **kwargs)
    expected = first.train_loader.batch_at(0, 0).input_ids.tolist()
    (first.store.path / "index.json").write_text("[1, 2", encoding="utf-8")
    capfd.readouterr()
    second = prepare_data(sources, **kwargs)
    assert "is damaged (index.json: not readable JSON" in capfd.readouterr().err
    assert second.store.meta["reused"] is False
    assert second.train_loader.batch_at(0, 0).input_ids.tolist() == expected


@pytest.mark.parametrize(
    "damage", ["truncated tokens.bin", "garbage index.json", "deleted offsets.npy", "appended bytes to offsets.npy",
               "deleted lines.npy"]
)
def test_open_damaged_directory_names_file_and_how_to_rebuild(tok, sources, tmp_path, damage):
    store = _build(sources, tok, tmp_path / "cache")
    file, hurt = DAMAGE[damage]
    hurt(store.path)
    with pytest.raises(ValueError, match=rf"{store.path} is damaged \({file}: .*delet.*build_token_cache") as info:
        TokenStore.open(store.path)  # 结构检查不读全量数据也能发现
    assert isinstance(info.value, CacheDamagedError) and info.value.file == file


def test_open_with_verify_catches_flipped_bytes_and_out_of_range_ids(tok, sources, tmp_path):
    store = _build(sources, tok, tmp_path / "cache")
    d = store.path
    _flip_byte(d / "tokens.bin", 40)
    TokenStore.open(d)  # 大小不变：便宜的结构检查看不出来
    with pytest.raises(CacheDamagedError, match=r"tokens\.bin: checksum [0-9a-f]{8} does not match"):
        TokenStore.open(d, verify=True)
    # 把一个 id 改成越界值并同步改掉校验和：校验和相符，但 id 超出分词器范围。
    tokens = np.fromfile(d / "tokens.bin", dtype=np.uint32)
    tokens[7] = 200_000
    tokens.tofile(d / "tokens.bin")
    index = json.loads((d / "index.json").read_text())
    index["files"]["tokens.bin"]["crc32"] = zlib.crc32((d / "tokens.bin").read_bytes())
    (d / "index.json").write_text(json.dumps(index))
    with pytest.raises(CacheDamagedError, match=r"tokens\.bin: token id 200000 is out of range .*151665"):
        TokenStore.open(d, verify=True)


def test_inconsistent_offsets_are_damage(tok, sources, tmp_path):
    store = _build(sources, tok, tmp_path / "cache")
    offsets = np.load(store.path / "offsets.npy")
    offsets[2], offsets[3] = offsets[3], offsets[2]  # 不再递增；大小不变
    np.save(store.path / "offsets.npy", offsets)
    with pytest.raises(CacheDamagedError, match=r"offsets\.npy: offsets must rise strictly"):
        TokenStore.open(store.path)


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_while_writing_tokens_is_a_clear_error_and_leaves_nothing(tok, sources, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setattr(cache_mod._Writer, "write", _no_space)
    with pytest.raises(CacheWriteError, match=rf"in {cache} while writing the token data \(tokens\.bin") as info:
        _build(sources, tok, cache)
    assert isinstance(info.value, ValueError) and info.value.errno == errno.ENOSPC
    assert "No space left on device" in str(info.value) and "free some disk space" in str(info.value)
    assert list(cache.iterdir()) == []  # 临时目录已删


def test_read_only_cache_dir_is_a_clear_error(tok, sources, tmp_path, monkeypatch):
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(cache_mod.tempfile, "mkdtemp", read_only)
    pattern = r"while writing a temporary directory: Read-only file system; .*read-only"
    with pytest.raises(CacheWriteError, match=pattern):
        _build(sources, tok, tmp_path / "cache")


def test_index_write_failure_names_index_and_cleans_up(tok, sources, tmp_path, monkeypatch):
    original = cache_mod.Path.write_text

    def failing(self, *args, **kwargs):
        if self.name == "index.json":
            raise OSError(errno.EDQUOT, "Disk quota exceeded")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cache_mod.Path, "write_text", failing)
    cache = tmp_path / "cache"
    with pytest.raises(CacheWriteError, match=r"while writing the index \(index\.json\): Disk quota exceeded"):
        _build(sources, tok, cache)
    assert list(cache.iterdir()) == []


def test_source_read_errors_are_not_blamed_on_the_cache(tok, tmp_path):
    def read(skip, stats):
        raise PermissionError(errno.EACCES, "Permission denied", "secret.txt")
        yield  # pragma: no cover - 让它成为生成器

    src = DocumentSource("secret.txt", "fp", read)
    with pytest.raises(PermissionError, match="secret.txt"):
        build_token_cache([src], tok, tmp_path / "cache", num_workers=0, progress=False)
    assert list((tmp_path / "cache").iterdir()) == []
