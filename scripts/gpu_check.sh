#!/usr/bin/env bash
# Everything that needs a GPU, as one script for a lent GPU machine (ends within about 8 minutes on
# one H100/H200 and prints its summary last):
#   1. the Triton attention kernels against the PyTorch reference, natively on the GPU;
#   2. the engine on the GPU: parity with transformers, tokens independent of batch/cache/schedule;
#   3. the CUDA IPC KV transfer tests and benchmark;
#   4. the launcher on the GPU: agg and 1p1d give the same greedy tokens;
#   5. engine throughput on a random Llama-3.2-1B-shaped bf16 checkpoint (written here).
# Needs torch with CUDA, triton, transformers, msgspec, pyzmq, pytest; wheels the machine lacks can be
# put in ./wheels (pip installs them offline first).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ls wheels/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --find-links wheels msgspec pyzmq pytest setproctitle || true
fi
$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name(0))" || exit 1
summary=()
step() {  # name, command...
    local name=$1; shift
    local t0=$SECONDS
    if "$@"; then summary+=("ok    $name ($((SECONDS - t0)) s)"); else summary+=("FAIL  $name ($((SECONDS - t0)) s)"); fi
}
step "triton kernels vs reference" $PY -m pytest -q -p no:cacheprovider tests/test_triton_attention.py
step "engine on the GPU" $PY -m pytest -q -p no:cacheprovider -m gpu tests/test_engine_gpu.py
step "CUDA IPC transfer tests" env DYN_ACTOR_NATIVE_OPS=0 $PY -m pytest -q -p no:cacheprovider -m gpu tests/test_kv_transfer_gpu.py
step "CUDA IPC transfer benchmark" $PY benchmarks/kv_transfer.py --gpu-only
step "agg and 1p1d on the GPU agree" $PY -m pytest -q -p no:cacheprovider -m gpu tests/test_disagg_gpu.py
step "engine throughput, 1B bf16" timeout 300 $PY benchmarks/engine_throughput.py --device cuda --models 1b \
    --dtype bfloat16 --workloads gpu64,gpu256 --no-vllm --transformers --max-num-seqs 256 --max-num-batched-tokens 8192
echo
echo "== GPU check summary =="
printf '%s\n' "${summary[@]}"
