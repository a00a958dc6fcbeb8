"""One 4-bit projection against the same weights in bfloat16, on the CPU: ms a call by rows and threads.

``QuantLinear`` (``linear_w4`` up to ``W4_MAX_ROWS`` rows, else dequantized into a kept buffer + one
GEMM, both also timed at every row count) beside bfloat16's ``linear_bf16`` kernel (up to four rows)
and oneDNN's GEMM (``F.linear``), for Llama-3.2-1B's gate/up (16384 x 2048) and down (2048 x 8192)
shapes, GPTQ group size 128.

    python benchmarks/quant_kernel.py [--rows 1,4,8,16,32,128] [--threads 1,2]

Writes ``results/quant_kernel.json``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import print_table, write_json  # noqa: E402


def _ms(fn, n: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return 1000 * (time.perf_counter() - t0) / n


def main() -> int:
    import torch

    from dyn_actor.engine import quant
    from dyn_actor.engine.quant import QuantConfig, QuantLinear, from_checkpoint
    from dyn_actor.native_ops import LINEAR_BF16_MAX_ROWS, linear_bf16, linear_bf16_lib, native_lib
    from tests.checkpoints import quantize_projection

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="1,4,8,16,32,128")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args()
    lib, bf16_lib = native_lib(), linear_bf16_lib()
    if lib is None or not lib.linear_w4_vectorized():
        print("the C kernel is not built for this CPU (AVX-512 BF16): nothing to measure")
        return 1
    rows = []
    for out, inp in ((16384, 2048), (2048, 8192)):
        torch.manual_seed(0)
        w = torch.randn(out, inp) * 0.02
        tensors, _ = quantize_projection(w, "gptq", 128)
        lin = QuantLinear(from_checkpoint(QuantConfig("gptq", 4, 128, False, True), "proj", tensors), None, lib)
        wb = w.bfloat16().contiguous()
        for th in map(int, args.threads.split(",")):
            torch.set_num_threads(th)
            for m in map(int, args.rows.split(",")):
                x = torch.randn(m, inp).bfloat16()
                row = {"shape": f"{out}x{inp}", "threads": th, "rows": m,
                       "onednn_ms": round(_ms(lambda x=x, wb=wb: torch.nn.functional.linear(x, wb), args.iters), 3)}
                if bf16_lib is not None and m <= LINEAR_BF16_MAX_ROWS:
                    row["bf16_kernel_ms"] = round(_ms(lambda x=x, wb=wb, th=th: linear_bf16(bf16_lib, x, wb, None, th), args.iters), 3)
                kept = quant.W4_MAX_ROWS
                try:
                    quant.W4_MAX_ROWS = 1 << 20
                    row["w4_kernel_ms"] = round(_ms(lambda x=x, lin=lin: lin(x), args.iters), 3)
                    quant.W4_MAX_ROWS = 0
                    row["w4_dequant_gemm_ms"] = round(_ms(lambda x=x, lin=lin: lin(x), args.iters), 3)
                finally:
                    quant.W4_MAX_ROWS = kept
                rows.append(row)
                print(row, flush=True)
    print_table(rows, ["shape", "threads", "rows", "bf16_kernel_ms", "onednn_ms", "w4_kernel_ms", "w4_dequant_gemm_ms"])
    print(f"wrote {write_json('quant_kernel.json', {'args': vars(args), 'rows': rows})}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
