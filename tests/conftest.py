"""测试共用的小配置与工具。"""

import pytest
import torch

from functional_lm.config import ModelConfig


def tiny_config(**changes) -> ModelConfig:
    """2 层、隐藏 64 的小模型；测试只在与默认配置相关时才用 123M 配置。"""
    base = ModelConfig(
        hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128,
        vocab_size=211, max_seq_len=64, rope_theta=10000.0,
    )
    return base.replace(**changes)


@pytest.fixture(autouse=True)
def _deterministic_threads():
    # 机器只有 2 个核；固定线程数让数值与耗时都更稳定。
    torch.manual_seed(0)
    yield


def _isolated_cache() -> None:
    """测试不写用户的 ~/.cache/functional_lm：整个测试会话（及其子进程）用一个临时缓存根目录。"""
    import os
    import tempfile

    os.environ["FUNCTIONAL_LM_CACHE"] = tempfile.mkdtemp(prefix="flm-test-cache-")


_isolated_cache()
