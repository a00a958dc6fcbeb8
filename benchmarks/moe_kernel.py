"""One sparse MoE layer's experts, timed: the grouped Triton kernel (``triton_moe.fused_experts``)
against the PyTorch forms (``moe.experts_loop``), at the layer shapes of Qwen3-30B-A3B (128 experts
of 2048 x 768, 8 a token) and Mixtral-8x7B (8 of 4096 x 14336, 2 a token), random weights and
routing, from one row (a decode step of one sequence) to a prefill chunk.

    python benchmarks/moe_kernel.py --device cuda                # on a GPU (scripts/gpu_check.sh: ONLY=moe)
    python benchmarks/moe_kernel.py --device cpu --shapes small  # the CPU forms only

For each size it reports milliseconds per layer, the weight bytes the step must read (the experts in
use) over that time, beside a device-to-device copy's bandwidth measured in the same run (the
floor of a memory-bound step), and on a GPU it captures the grouped kernel's step in a CUDA graph,
replays it and checks the result against the eager call (no host sync inside: the property the
decode graphs rely on). Writes ``results/moe_kernel.json``.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import print_table, write_json  # noqa: E402

#: name -> (experts, hidden, expert width, experts a token)
SHAPES = {"qwen3-30b-a3b": (128, 2048, 768, 8), "mixtral-8x7b": (8, 4096, 14336, 2), "small": (32, 512, 256, 4)}


def _timed(fn, device: torch.device, repeat: int) -> float:
    """Best of ``repeat`` calls, in milliseconds."""
    fn()
    best = float("inf")
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def copy_bandwidth(device: torch.device, mib: int = 1024) -> float:
    src = torch.empty(mib << 20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = _timed(lambda: dst.copy_(src), device, 5)
    return 2 * src.numel() / ms / 1e6  # GB/s read + written


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shapes", default="qwen3-30b-a3b,mixtral-8x7b")
    ap.add_argument("--rows", default="1,16,64,256,2048")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--out", default="moe_kernel.json")
    args = ap.parse_args()
    from dyn_actor.engine import moe

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    on_gpu = device.type == "cuda"
    silu_mul = moe.silu_mul_torch
    if on_gpu:
        from dyn_actor.engine import triton_ops
        from dyn_actor.engine.triton_moe import fused_experts

        silu_mul = triton_ops.silu_mul
    copy_gbs = copy_bandwidth(device, 1024 if on_gpu else 256)
    print(f"device copy: {copy_gbs:,.0f} GB/s", flush=True)
    rows_out, failures = [], []
    for name in args.shapes.split(","):
        e, h, inter, top_k = SHAPES[name]
        g = torch.Generator(device="cpu").manual_seed(0)
        w13 = (torch.randn((e, 2 * inter, h), generator=g) / h ** 0.5).to(device=device, dtype=dtype)
        w2 = (torch.randn((e, h, inter), generator=g) / inter ** 0.5).to(device=device, dtype=dtype)
        gate = (torch.randn((e, h), generator=g) / h ** 0.5).to(device=device, dtype=dtype)
        layer = moe.SparseMoe(gate, w13, w2, top_k, True)
        per_expert = (w13[0].numel() + w2[0].numel()) * w13.element_size()
        for t in map(int, args.rows.split(",")):
            x = torch.randn((t, h), generator=g).to(device=device, dtype=dtype)
            weights, experts = layer.route(x)
            in_use = int(torch.unique(experts).numel())
            row = {"shape": name, "rows": t, "experts_in_use": in_use, "weight_mb": in_use * per_expert / 1e6}
            call = (x, w13, w2, weights, experts, silu_mul)
            forms = {"loop": functools.partial(moe.experts_loop, *call)}
            if on_gpu:
                forms["triton"] = functools.partial(fused_experts, *call)
            for form, fn in forms.items():
                ms = _timed(fn, device, args.repeat)
                row[f"{form}_ms"] = ms
                row[f"{form}_gbs"] = in_use * per_expert / ms / 1e6
            if on_gpu:
                want = forms["triton"]()
                ref = forms["loop"]()
                row["max_diff_vs_loop"] = (want.float() - ref.float()).abs().max().item()
                try:
                    graph = torch.cuda.CUDAGraph()
                    stream = torch.cuda.Stream(device)
                    stream.wait_stream(torch.cuda.current_stream(device))
                    with torch.cuda.stream(stream):
                        forms["triton"]()  # warm-up outside the capture
                    torch.cuda.current_stream(device).wait_stream(stream)
                    with torch.cuda.graph(graph):
                        out = forms["triton"]()
                    graph.replay()
                    torch.cuda.synchronize(device)
                    if not torch.equal(out, want):
                        raise AssertionError("the captured step's result differs from the eager call's")
                    row["graph_ms"] = _timed(graph.replay, device, args.repeat)
                    row["graph_gbs"] = in_use * per_expert / row["graph_ms"] / 1e6
                except Exception as exc:  # noqa: BLE001 - say it, measure the other sizes, fail at the end
                    failures.append(f"{name} rows {t}: {type(exc).__name__}: {exc}")
                    torch.cuda.synchronize(device)
            row["copy_gbs"] = copy_gbs
            rows_out.append(row)
            print(f"{name} rows {t}: " + ", ".join(f"{k} {v:.3g}" for k, v in row.items() if k.endswith("_ms")),
                  flush=True)
    cols = ["shape", "rows", "experts_in_use", "weight_mb", "loop_ms", "loop_gbs"]
    if on_gpu:
        cols += ["triton_ms", "triton_gbs", "graph_ms", "graph_gbs", "max_diff_vs_loop"]
    print_table(rows_out, cols + ["copy_gbs"])
    out = write_json(args.out, {"args": vars(args), "device": str(device), "copy_gbs": copy_gbs, "rows": rows_out})
    print(f"wrote {out}")
    for f in failures:
        print("FAILED to capture " + f)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
