"""The Triton decode-attention kernel's shape, swept on a GPU: which programs / tile / warps / stages
read the paged KV fastest at serving sizes of the Llama-3.2-1B shape (32 query heads over 8 KV
heads, head_dim 64, bf16, blocks of 16, block tables 256 wide as the engine's graphs have them).

    python benchmarks/attention_sweep.py        # prints a table; the best config last, as JSON

Shapes: 64 sequences of ~200 tokens, 256 of ~1,100, 8 of ~4,000 (random lengths around those,
blocks scattered over the pool). Time: CUDA events over 20 calls after a warm-up; GB/s = the KV
bytes the sequences' contexts hold / time. Best: the smallest geometric mean, over the shapes, of
time / the shape's best time.
"""

from __future__ import annotations

import itertools
import json
import math
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import print_table, write_json  # noqa: E402
from dyn_actor.engine.triton_attention import paged_decode_attention  # noqa: E402

SHAPES = [(64, 200), (256, 1100), (8, 4000)]
NH, NKV, D, BS, MAX_BLOCKS = 32, 8, 64, 16, 256


def main() -> int:
    if not torch.cuda.is_available():
        print("no GPU: nothing to sweep")
        return 0
    dev = "cuda"
    rng = random.Random(0)
    cases = []
    for b, ctx in SHAPES:
        lens = [max(1, min(MAX_BLOCKS * BS, int(rng.gauss(ctx, ctx * 0.1)))) for _ in range(b)]
        nblocks = sum(-(-n // BS) for n in lens) + 1
        kc = torch.randn((nblocks, BS, NKV, D), device=dev, dtype=torch.bfloat16)
        vc = torch.randn_like(kc)
        order = torch.randperm(nblocks - 1).tolist()
        table = torch.zeros((b, MAX_BLOCKS), dtype=torch.long)
        k = 0
        for i, n in enumerate(lens):
            need = -(-n // BS)
            table[i, :need] = torch.tensor(order[k:k + need])
            k += need
        q = torch.randn((b, NH, D), device=dev, dtype=torch.bfloat16)
        kv_bytes = sum(lens) * NKV * D * 2 * 2
        cases.append((b, ctx, q, kc, vc, table.to(dev), torch.tensor(lens, device=dev), kv_bytes))
    configs = [dict(programs=p, tile_tokens=t, num_warps=w, num_stages=s)
               for p, t, w, s in itertools.product((1024, 4096, 16384), (32, 64, 128), (4, 8), (1, 2, 3))]
    rows = []
    for cfg in configs:
        row = dict(cfg)
        for b, ctx, q, kc, vc, table, lens, kv_bytes in cases:
            fn = lambda q=q, kc=kc, vc=vc, t=table, n=lens, c=cfg: paged_decode_attention(  # noqa: E731
                q, kc, vc, t, n, D ** -0.5, tuning=c)
            try:
                fn()
                torch.cuda.synchronize()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(20):
                    fn()
                end.record()
                torch.cuda.synchronize()
                us = start.elapsed_time(end) * 1000 / 20
            except Exception as e:  # noqa: BLE001 - a config the compiler rejects (shared memory, say)
                print(f"{cfg}: {type(e).__name__}: {str(e)[:100]}")
                us = float("inf")
            row[f"us_{b}x{ctx}"] = us
            row[f"GBps_{b}x{ctx}"] = kv_bytes / us / 1e3
        rows.append(row)
    keys = [f"us_{b}x{c}" for b, c in SHAPES]
    best_t = {k: min(r[k] for r in rows) for k in keys}
    for r in rows:
        r["score"] = math.exp(sum(math.log(r[k] / best_t[k]) for k in keys) / len(keys))
    rows.sort(key=lambda r: r["score"])
    print_table(rows[:15], ["programs", "tile_tokens", "num_warps", "num_stages", *keys,
                            *(f"GBps_{b}x{c}" for b, c in SHAPES), "score"])
    default = next((r for r in rows if r["programs"] == 1024 and r["tile_tokens"] == 64 and r["num_warps"] == 4
                    and r["num_stages"] == 3), None)
    if default:
        print("the previous default:", {k: round(default[k], 1) for k in keys}, f"score {default['score']:.2f}")
    best = {k: rows[0][k] for k in ("programs", "tile_tokens", "num_warps", "num_stages")}
    write_json("attention_sweep.json", {"rows": rows, "best": best})
    print("BEST " + json.dumps(best))
    return 0


if __name__ == "__main__":
    sys.exit(main())
