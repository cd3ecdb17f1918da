"""批加载器测试：(input_ids, labels, loss_mask) 的形状与取值，按种子确定的打乱，可保存 / 恢复的位置。"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from functional_lm.data import BatchLoader, pack_documents


@pytest.fixture()
def dataset():
    rng = np.random.default_rng(0)
    docs = [list(rng.integers(1, 1000, size=int(rng.integers(5, 60)))) for _ in range(60)]
    return pack_documents(docs, seq_len=8, separator_id=0)


def _collect(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def test_batch_shapes_dtypes_and_alignment(dataset):
    loader = BatchLoader(dataset, batch_size=4, seed=0)
    batch = next(iter(loader))
    assert batch.input_ids.shape == (4, 8) and batch.input_ids.dtype == torch.int64
    assert batch.labels.shape == (4, 8) and batch.labels.dtype == torch.int64
    assert batch.loss_mask.shape == (4, 8) and batch.loss_mask.dtype == torch.bool
    assert (batch.labels[~batch.loss_mask] == -100).all()
    # 每一行都是某个块：labels 是 input_ids 右移一位。
    order = loader.epoch_order(0)
    for row, block_index in enumerate(order[:4]):
        x, y, m = dataset.example(int(block_index))
        assert batch.input_ids[row].tolist() == x.tolist()
        assert batch.labels[row].tolist() == y.tolist()


def test_epoch_covers_each_block_once_and_shuffle_depends_on_seed(dataset):
    loader = BatchLoader(dataset, batch_size=3, seed=1, drop_last=False)
    batches = list(loader)
    assert len(batches) == len(loader) == -(-len(dataset) // 3)
    seen = torch.cat([b.input_ids for b in batches])
    expected = np.stack([dataset.example(i)[0] for i in range(len(dataset))])
    assert sorted(map(tuple, seen.tolist())) == sorted(map(tuple, expected.tolist()))
    assert not np.array_equal(loader.epoch_order(0), np.arange(len(dataset)))
    assert not np.array_equal(loader.epoch_order(0), loader.epoch_order(1))  # 每轮重新打乱
    same = BatchLoader(dataset, batch_size=3, seed=1)
    assert np.array_equal(same.epoch_order(0), loader.epoch_order(0))
    other = BatchLoader(dataset, batch_size=3, seed=2)
    assert not np.array_equal(other.epoch_order(0), loader.epoch_order(0))
    plain = BatchLoader(dataset, batch_size=3, shuffle=False)
    assert np.array_equal(plain.epoch_order(5), np.arange(len(dataset)))


def _take(loader, k, style):
    """从 loader 取 k 批：style="next" 用 next_batch；"iter" 用 for 循环式的迭代，每轮结束时重新 iter。"""
    if style == "next":
        return [loader.next_batch() for _ in range(k)]
    taken = []
    while len(taken) < k:
        before = len(taken)
        for batch in loader:
            taken.append(batch)
            if len(taken) == k:
                break
        # 一轮取完后新的 for 循环必须开始下一轮；什么也没给出就是加载器坏了（否则这里会死循环）。
        assert len(taken) > before or k == 0, "iter(loader) yielded nothing at an epoch boundary"
    return taken


def _assert_same_batches(got, expected):
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert torch.equal(a.input_ids, b.input_ids)
        assert torch.equal(a.labels, b.labels)
        assert torch.equal(a.loss_mask, b.loss_mask)


@pytest.mark.parametrize("k", [0, 1, 5, 9, 23])
def test_resume_within_the_first_epoch_yields_same_next_batches(dataset, k):
    # k 与后面的 4 批都在第 0 轮之内（每轮 len(loader) = 55 批）；跨轮的情形见下一个测试。
    reference = _take(BatchLoader(dataset, batch_size=4, seed=7), k + 4, "next")
    run = BatchLoader(dataset, batch_size=4, seed=7)
    assert k + 4 < len(run)
    _take(run, k, "iter")
    resumed = BatchLoader(dataset, batch_size=4, seed=0)  # 种子随状态恢复
    resumed.batch_at(0, 0)  # 先按旧种子排过第 0 轮：恢复后必须按存下的种子重新排
    resumed.load_state_dict(run.state_dict())
    _assert_same_batches([resumed.next_batch() for _ in range(4)], reference[k:])


@pytest.mark.parametrize("style", ["next", "iter"])
@pytest.mark.parametrize("delta", [-1, 0, 1])
def test_resume_at_the_epoch_boundary_crosses_into_the_next_epoch(dataset, delta, style):
    after = 6  # 恢复后再取 6 批：k = len-1 时含第 0 轮最后一批与第 1 轮前 5 批
    n = len(BatchLoader(dataset, batch_size=4, seed=7))
    k = n + delta
    uninterrupted = BatchLoader(dataset, batch_size=4, seed=7)
    reference = _take(uninterrupted, k + after, "next")
    # 第 1 轮的第一批确实换了顺序：若恢复后错误地重走第 0 轮，下面的比较必然失败。
    assert not torch.equal(reference[n].input_ids, reference[0].input_ids)
    run = BatchLoader(dataset, batch_size=4, seed=7)
    _take(run, k, style)
    state = run.state_dict()
    assert (state["epoch"], state["position"]) == ((0, k) if k <= n else (1, k - n))
    resumed = BatchLoader(dataset, batch_size=4, seed=0)
    resumed.load_state_dict(state)
    _assert_same_batches(_take(resumed, after, style), reference[k:])
    assert (resumed.state_dict()["epoch"], resumed.state_dict()["position"]) == (1, k + after - n)
    assert resumed.state_dict() == uninterrupted.state_dict()


def test_state_dict_roundtrip_and_mismatch(dataset):
    loader = BatchLoader(dataset, batch_size=4, seed=3)
    loader.next_batch(), loader.next_batch()
    state = loader.state_dict()
    assert state["epoch"] == 0 and state["position"] == 2 and state["seed"] == 3
    other = BatchLoader(dataset, batch_size=5, seed=3)
    with pytest.raises(ValueError, match="batch_size"):
        other.load_state_dict(state)


def test_next_batch_rolls_over_epochs(dataset):
    loader = BatchLoader(dataset, batch_size=4, seed=0)
    n = len(loader)
    for _ in range(n):
        loader.next_batch()
    assert loader.state_dict()["epoch"] == 0 and loader.state_dict()["position"] == n
    loader.next_batch()
    assert loader.state_dict()["epoch"] == 1 and loader.state_dict()["position"] == 1


def test_batch_size_too_large_is_refused(dataset):
    with pytest.raises(ValueError, match="batch_size"):
        BatchLoader(dataset, batch_size=len(dataset) + 1)


def test_batch_at_reads_without_moving_the_position(dataset):
    loader = BatchLoader(dataset, batch_size=4, seed=3)
    first_two = _collect(loader, 2)
    state = loader.state_dict()
    again = loader.batch_at(0, 1)
    assert torch.equal(again.input_ids, first_two[1].input_ids)
    assert torch.equal(again.labels, first_two[1].labels)
    assert loader.state_dict() == state  # 位置不变
    later = loader.batch_at(1, 0)  # 下一轮的第一批：与真正走到那里时相同
    walker = BatchLoader(dataset, batch_size=4, seed=3)
    for _ in range(len(walker)):
        walker.next_batch()
    assert torch.equal(walker.next_batch().input_ids, later.input_ids)
    with pytest.raises(IndexError, match="out of range"):
        loader.batch_at(0, len(loader))


def test_batches_carry_segment_ids_and_the_document_mask_setting():
    from functional_lm.data import BatchLoader, pack_documents

    rng = np.random.default_rng(2)
    docs = [list(rng.integers(1, 500, size=int(rng.integers(1, 20)))) for _ in range(80)]
    dataset = pack_documents(docs, seq_len=16, separator_id=0)
    loader = BatchLoader(dataset, 4, seed=3)
    masked = loader.relayout(document_mask=True)
    plain, doc = loader.batch_at(0, 1), masked.batch_at(0, 1)
    assert plain.segment_ids.shape == plain.input_ids.shape and plain.segment_ids.dtype == torch.int64
    assert torch.equal(plain.segment_ids, doc.segment_ids) and torch.equal(plain.input_ids, doc.input_ids)
    rows = loader.epoch_order(0)[loader._rows(1)]
    assert torch.equal(plain.segment_ids, torch.from_numpy(np.stack([dataset.segments(int(r))[:-1] for r in rows])))
    assert int(doc.loss_mask.sum()) < int(plain.loss_mask.sum())  # 跨文档的标签被遮住
    assert masked.relayout(world_size=1).document_mask  # 换布局时沿用设置
    one = doc.rows(2, 3)
    assert one.segment_ids.shape == (1, 16) and torch.equal(one.labels, doc.labels[2:3])
