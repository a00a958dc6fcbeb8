#!/usr/bin/env bash
# Everything that needs a GPU, as one script for a lent GPU machine (ends within about 8 minutes on
# one H100/H200 and prints its summary last):
#   correctness, run side by side (each is small next to the card):
#     kernels  the Triton attention, fused elementwise and top-p kernels against PyTorch, up to serving
#              sizes;
#     engine   the engine on the GPU: parity with transformers, tokens independent of batch/cache/schedule;
#     ipc      the CUDA IPC KV transfer tests;
#     disagg   the launcher on the GPU: agg and 1p1d give the same greedy tokens, killed workers leave no
#              device memory held;
#     faults   the fault matrix (tests/test_fault_matrix.py) with every server on the GPU (about 3 min);
#   then the measurements, one at a time (alone on the card):
#     kvbench  the KV transfer benchmark (direct pool-to-pool kernel vs index_copy_ vs a device copy,
#              and the move kernel's configs);
#     samp     one step's sampling on the device (benchmarks/sampling.py: the engine's draw vs the
#              exponential race it replaced, 64 rows of a 128k vocabulary; flat rows, then peaked ones
#              as a trained model's; top-p's whole-row kernel against sorting);
#     asweep   the decode-attention kernel's configs (benchmarks/attention_sweep.py); thru then runs
#              with the best one (DYN_ACTOR_DECODE_TUNING), which the summary prints;
#     thru     engine throughput on a random Llama-3.2-1B-shaped bf16 checkpoint (written here), with
#              transformers' generate() in the same run and a torch profiler summary of decode steps;
#              last, the engine with its decode steps taken one at a time (--stepwise: overlap off);
#     mixed    steps of 64 decodes plus a fresh prompt, eager against the piecewise graphs, and a
#              stream of them with overlapped steps off and on
#              (benchmarks/mixed_step.py);
#     dbench   benchmarks/disagg.py --device cuda: agg (2 workers on the card) vs 1p1d under mixed load;
#   not in the default list (the script would pass its 8 minutes), run with ONLY="fe spec moe" after it:
#     fe       serving the 1B model over HTTP with one frontend process against four (--frontends 4),
#              256 streams, four client processes (benchmarks/serve.py);
#     spec     n-gram speculative decoding on the 1B bf16 model, drafts vs none at batches 1 and 16,
#              greedy and sampled (benchmarks/spec_decode.py; the engine test of drafted steps is in
#              the default list, in tests/test_engine_gpu.py);
#     moe      one mixture-of-experts layer (Qwen3-30B-A3B's and Mixtral-8x7B's shapes, bf16): the grouped
#              Triton kernel against the PyTorch forms from 1 row to 2,048, weight bandwidth beside a
#              device copy, and the kernel's step captured in a CUDA graph and checked against eager
#              (benchmarks/moe_kernel.py; the engine test of MoE checkpoints is in the default list).
# ONLY="kernels thru" runs a subset; FAULTS_BESIDE=1 lets the fault matrix run beside the
# measurements (to save time; their numbers are then not for reporting); THRU_EXTRA replaces thru's
# "--transformers --stepwise". Needs torch with CUDA, triton, transformers, msgspec, pyzmq,
# setproctitle, pytest, aiohttp; the three a lent machine lacks come as wheels: run
# scripts/gpu_wheels.sh first and carry .whl (device tool: carry [".whl"], command
# "bash scripts/gpu_check.sh", timeout_s 560). Logs and results go to $OUT (or /tmp/gpu_check).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LOG=${OUT:-/tmp/gpu_check}
ONLY=${ONLY:-kernels engine ipc disagg faults kvbench samp asweep thru mixed dbench}
THRU_EXTRA=${THRU_EXTRA---transformers --stepwise}
FAULTS_BESIDE=${FAULTS_BESIDE:-0}
mkdir -p "$LOG"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# wheels the machine lacks: fetched here beforehand with scripts/gpu_wheels.sh into .whl (carried)
for d in .whl wheels; do
    if ls $d/*.whl >/dev/null 2>&1; then
        $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $d/*.whl \
            && export PYTHONPATH="$PYTHONPATH:/tmp/site"
        if ls $d/ifmissing/*.whl >/dev/null 2>&1 && ! $PY -c "import pydantic" 2>/dev/null; then
            $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
                $d/ifmissing/*.whl
        fi
        break
    fi
done
$PY -c "import msgspec, zmq, setproctitle" || { echo "missing msgspec/pyzmq/setproctitle: run scripts/gpu_wheels.sh here and carry .whl"; exit 1; }
$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name(0))" || exit 1
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader || true
summary=()
declare -A pids names started
want() { [[ " $ONLY " == *" $1 "* ]]; }
launch() {  # key, name, limit_s, command...: in the background, output to $LOG/key.log
    local key=$1 name=$2 limit=$3; shift 3
    want "$key" || return 0
    names[$key]=$name; started[$key]=$SECONDS
    timeout -k 10 "$limit" "$@" >"$LOG/$key.log" 2>&1 &
    pids[$key]=$!
}
collect() {  # key: wait for it and add its line to the summary
    local key=$1 rc
    want "$key" || return 0
    wait "${pids[$key]}"; rc=$?
    local took=$((SECONDS - started[$key]))
    if [ $rc -eq 0 ]; then
        summary+=("ok    ${names[$key]} (${took} s)")
    else
        summary+=("FAIL  ${names[$key]} (rc $rc, ${took} s; $LOG/$key.log)")
        echo "---- ${names[$key]}: last lines of $key.log"
        tail -n 30 "$LOG/$key.log"
    fi
}
PYT=($PY -m pytest -q -p no:cacheprovider)
launch kernels "triton kernels vs reference" 200 "${PYT[@]}" tests/test_triton_attention.py tests/test_triton_ops.py \
    tests/test_triton_sampling.py
launch engine "engine on the GPU" 290 "${PYT[@]}" -m gpu tests/test_engine_gpu.py
launch ipc "CUDA IPC transfer tests" 150 env DYN_ACTOR_NATIVE_OPS=0 "${PYT[@]}" -m gpu tests/test_kv_transfer_gpu.py
launch disagg "agg and 1p1d on the GPU agree, no device memory held after kills" 320 "${PYT[@]}" -m gpu tests/test_disagg_gpu.py
launch faults "fault matrix on the GPU" ${FAULTS_LIMIT:-300} env DYN_TEST_SERVER_FLAGS="--device cuda --dtype float32" \
    "${PYT[@]}" tests/test_fault_matrix.py
A=(kernels ipc engine disagg)
[ "$FAULTS_BESIDE" = 1 ] || A+=(faults)
for k in "${A[@]}"; do collect $k; done
# the correctness logs in one file (at most 8 files come back from a lent machine)
for k in "${A[@]}"; do
    if [ -f "$LOG/$k.log" ]; then echo "==== $k"; cat "$LOG/$k.log"; rm "$LOG/$k.log"; fi
done >"$LOG/tests.log"
launch kvbench "CUDA IPC transfer benchmark" 90 $PY benchmarks/kv_transfer.py --gpu-only --sweep
collect kvbench
want kvbench && grep -v "^ *$" "$LOG/kvbench.log" | head -n 12
launch samp "sampling on the device" 90 bash -c "$PY benchmarks/sampling.py --device cuda --rows 64 --vocab 128256 \
    && $PY benchmarks/sampling.py --device cuda --rows 64 --vocab 128256 --scale 8"
collect samp
want samp && grep -A7 "^one step" "$LOG/samp.log"
launch asweep "decode attention sweep" 150 $PY benchmarks/attention_sweep.py
collect asweep
if want asweep; then
    head -n 20 "$LOG/asweep.log"
    best=$(grep "^BEST " "$LOG/asweep.log" | cut -c6-)
    [ -n "$best" ] && export DYN_ACTOR_DECODE_TUNING="$best" && summary+=("      thru ran with DYN_ACTOR_DECODE_TUNING=$best")
fi
launch thru "engine throughput, 1B bf16" 240 $PY benchmarks/engine_throughput.py --device cuda --models 1b \
    --dtype bfloat16 --workloads gpu64,gpu256 --no-vllm $THRU_EXTRA --max-num-seqs 256 \
    --max-num-batched-tokens 8192 --profile "$LOG/profile"
collect thru
want thru && { grep -A8 "^model " "$LOG/thru.log" || grep "output tok/s" "$LOG/thru.log"; } \
    && grep "decode-step floor\|profiled:" "$LOG/thru.log"
launch mixed "mixed steps: eager vs piecewise graphs, overlap off vs on" 150 $PY benchmarks/mixed_step.py --device cuda --steps 20
collect mixed
want mixed && grep -A5 "^prompt_len" "$LOG/mixed.log" && grep "^pieces:" "$LOG/mixed.log"
launch dbench "disagg.py --device cuda" 240 $PY benchmarks/disagg.py --device cuda --duration 20
collect dbench
want dbench && tail -n 7 "$LOG/dbench.log"
fe_run() {  # the 1B checkpoint (thru writes the same one), then one frontend against four
    local ck
    ck=$($PY -c "from benchmarks.checkpoints import LLAMA_1B, write_random_llama
from benchmarks.common import RESULTS
print(write_random_llama(RESULTS / 'checkpoints' / 'llama-1b-random', LLAMA_1B))") || return 1
    $PY benchmarks/serve.py --model "$ck" --launch-native "--device cuda" --also-native "--device cuda --frontends 4" \
        --concurrency 256 --input-len 128 --output-len 256 --num-prompts 1024 --warmup 32 --client-procs 4 \
        --name frontends_gpu
}
export -f fe_run
export PY
launch fe "serving the 1B model: one frontend vs four" 300 bash -c fe_run
collect fe
want fe && grep -A3 "^endpoint " "$LOG/fe.log" | tail -n 3
launch spec "n-gram speculative decoding, 1B bf16" 240 $PY benchmarks/spec_decode.py --device cuda --models 1b \
    --dtype bfloat16 --no-vllm --batches 1,16 --max-tokens 128 --rounds 2 --out spec_decode_gpu.json
collect spec
want spec && grep -A12 "^n-gram drafts" "$LOG/spec.log"
launch moe "one MoE layer's experts: grouped Triton kernel vs PyTorch, eager and captured" 120 \
    $PY benchmarks/moe_kernel.py --device cuda --out moe_kernel_gpu.json
collect moe
want moe && grep -A14 "^shape " "$LOG/moe.log"
if [ "$FAULTS_BESIDE" = 1 ]; then collect faults; want faults && tail -n 5 "$LOG/faults.log"; fi
echo
echo "== GPU check summary =="
printf '%s\n' "${summary[@]}"
