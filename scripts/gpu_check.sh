#!/usr/bin/env bash
# The GPU checks of the CUDA IPC KV transfer, as one script for a lent GPU machine:
# the GPU-marked tests, then the transfer benchmark (scatter through an IPC mapping vs a
# device-to-device copy of the same bytes). Needs torch with CUDA, triton, msgspec and pytest;
# wheels that the machine lacks can be put in ./wheels (pip installs them offline first).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ls wheels/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --find-links wheels msgspec pytest || true
fi
$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name(0))"
DYN_ACTOR_NATIVE_OPS=0 $PY -m pytest -q -p no:cacheprovider -m gpu tests/test_kv_transfer_gpu.py
$PY benchmarks/kv_transfer.py --gpu-only
