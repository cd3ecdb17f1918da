"""打包测试：定长 max_seq_len+1 的块、文档间 <|endoftext|> 分隔、标签掩码、按种子的确定性打乱与验证集划分。"""

from __future__ import annotations

import numpy as np
import pytest

from functional_lm.config import get_preset
from functional_lm.data import IGNORE_INDEX, TokenStore, pack, pack_documents, split_documents

SEP = 999


def _docs(rng: np.random.Generator, n: int) -> list[list[int]]:
    return [list(rng.integers(0, 500, size=int(rng.integers(1, 40)))) for _ in range(n)]


def test_every_token_appears_exactly_once_in_order():
    docs = _docs(np.random.default_rng(0), 50)
    ds = pack_documents(docs, seq_len=16, separator_id=SEP)
    stream = [t for d in docs for t in d + [SEP]]
    blocks = [ds.block(i) for i in range(len(ds))]
    assert all(b.tokens.shape == (17,) for b in blocks)
    assert len(ds) == -(-len(stream) // 17)
    flat = np.concatenate([b.tokens[b.valid] for b in blocks]).tolist()
    assert flat == stream
    # 只有最后一块可能有填充，填充处 valid=False 且为 pad id。
    assert all(b.valid.all() for b in blocks[:-1])
    pad = blocks[-1].tokens[~blocks[-1].valid]
    assert (pad == SEP).all() and len(pad) == len(ds) * 17 - len(stream)


def test_example_labels_and_mask():
    docs = [[1, 2, 3], [4, 5]]
    ds = pack_documents(docs, seq_len=4, separator_id=0)  # 流：1 2 3 0 4 5 0 → 块 [1 2 3 0 4] [5 0 pad pad pad]
    x, y, m = ds.example(0)
    assert x.tolist() == [1, 2, 3, 0] and y.tolist() == [2, 3, 0, 4] and m.tolist() == [True] * 4
    x, y, m = ds.example(1)
    assert x.tolist() == [5, 0, 0, 0]
    assert y.tolist() == [0, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]
    assert m.tolist() == [True, False, False, False]


def test_chat_masks_carry_into_labels():
    # 文档 0 是对话：只有 [20, 21] 是助手 token；对话后面的分隔符不计损失。文档 1 是纯文本。
    docs = [[10, 11, 20, 21, 12], [30, 31]]
    masks = [[False, False, True, True, False], None]
    ds = pack_documents(docs, seq_len=8, separator_id=0, masks=masks)
    x, y, m = ds.example(0)
    assert x.tolist() == [10, 11, 20, 21, 12, 0, 30, 31]
    assert y.tolist() == [IGNORE_INDEX, 20, 21, IGNORE_INDEX, IGNORE_INDEX, 30, 31, 0]
    assert m.tolist() == [False, True, True, False, False, True, True, True]


def test_store_from_documents_layout():
    store = TokenStore.from_documents([[5, 6], [7]], separator_id=1, masks=[None, [False]])
    assert store.tokens.dtype == np.uint32
    assert store.tokens.tolist() == [5, 6, 1, 7, 1]
    assert store.offsets.tolist() == [0, 3, 5]
    assert store.mask.tolist() == [True, True, True, False, False]
    assert store.num_documents == 2 and store.num_tokens == 5


def test_split_is_deterministic_disjoint_and_complete():
    train, val = split_documents(100, val_fraction=0.1, seed=3)
    assert len(val) == 10 and len(train) == 90
    assert sorted(train.tolist() + val.tolist()) == list(range(100))
    assert (np.diff(train) > 0).all() and (np.diff(val) > 0).all()  # 保持原顺序
    t2, v2 = split_documents(100, val_fraction=0.1, seed=3)
    assert v2.tolist() == val.tolist()
    _, v3 = split_documents(100, val_fraction=0.1, seed=4)
    assert v3.tolist() != val.tolist()
    assert len(split_documents(5, 0.0, 0)[1]) == 0
    assert len(split_documents(5, 0.01, 0)[1]) == 1  # 比例 > 0 时验证集至少一篇
    with pytest.raises(ValueError, match="val_fraction"):
        split_documents(5, 1.0, 0)


def test_pack_split_streams_cover_their_documents():
    docs = _docs(np.random.default_rng(1), 40)
    store = TokenStore.from_documents(docs, separator_id=SEP)
    train, val = pack(store, seq_len=8, val_fraction=0.25, seed=0)
    _, val_ids = split_documents(40, 0.25, 0)
    val_stream = [t for i in val_ids for t in docs[i] + [SEP]]
    got = np.concatenate([val.block(i).tokens[val.block(i).valid] for i in range(len(val))])
    assert got.tolist() == val_stream
    assert train.num_tokens + val.num_tokens == store.num_tokens


def test_block_size_larger_than_model_max_seq_len_is_refused():
    store = TokenStore.from_documents([[1, 2, 3]], separator_id=0)
    cfg = get_preset("tiny")  # max_seq_len = 128
    with pytest.raises(ValueError, match=r"seq_len=256.*max_seq_len=128"):
        pack(store, seq_len=256, model_config=cfg)
    train, _ = pack(store, seq_len=128, model_config=cfg)
    assert len(train) == 1


def test_token_ids_outside_student_vocab_are_refused():
    store = TokenStore.from_documents([[1, 2, 300]], separator_id=0)
    with pytest.raises(ValueError, match=r"300.*256"):
        pack(store, seq_len=4, model_config=get_preset("tiny"))


# ---------------------------------------------------------------- 文档编号与文档掩码（issue 13）
def test_segment_ids_follow_documents_and_start_at_zero_in_every_block():
    docs = [[1, 2, 3], [4, 5]]
    ds = pack_documents(docs, seq_len=4, separator_id=0)  # 流：1 2 3 0 | 4 5 0 → 块 [1 2 3 0 4] [5 0 pad pad pad]
    assert ds.segments(0).tolist() == [0, 0, 0, 0, 1]  # 分隔符属于它前面的文档
    assert ds.segments(1).tolist() == [0, 0, 1, 1, 1]  # 块从第二篇文档的中间开始；补齐的尾部另算一篇


def test_document_mask_masks_only_the_label_that_starts_the_next_document():
    docs = [[10, 11, 20, 21, 12], [30, 31]]
    masks = [[False, False, True, True, False], None]
    ds = pack_documents(docs, seq_len=8, separator_id=0, masks=masks)
    x0, y0, m0 = ds.example(0)
    x1, y1, m1 = ds.example(0, document_mask=True)
    assert x1.tolist() == x0.tolist()
    # 只有第 5 个位置（输入是文档 0 的分隔符，标签 30 是下一篇的第一个 token）变成不计损失。
    assert [i for i in range(8) if m0[i] != m1[i]] == [5]
    assert y1[5] == IGNORE_INDEX and not m1[5]
    assert y1.tolist()[:5] == y0.tolist()[:5] and y1.tolist()[6:] == y0.tolist()[6:]


def test_many_documents_segment_ids_match_the_separators():
    rng = np.random.default_rng(1)
    docs = [list(rng.integers(1, 500, size=int(rng.integers(1, 12)))) for _ in range(60)]
    ds = pack_documents(docs, seq_len=31, separator_id=0)
    for i in range(len(ds) - 1):  # 最后一块有补齐
        tokens, seg = ds.block(i).tokens, ds.segments(i)
        assert seg[0] == 0 and (np.diff(seg) >= 0).all()
        # 编号恰好在每个分隔符之后加一（分隔符是它所在文档的最后一个 token）。
        assert (np.diff(seg) == (tokens[:-1] == 0)).all()
        x, y, m, s = ds.examples([i], document_mask=True)
        assert s[0].tolist() == seg[:-1].tolist()
        crossing = seg[1:] != seg[:-1]
        assert (~m[0][crossing]).all() and (y[0][crossing] == IGNORE_INDEX).all()
