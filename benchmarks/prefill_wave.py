"""The CPU engine's prefill of one wave of prompts, two variants of one part side by side in one run.

    python benchmarks/prefill_wave.py                  # 8 prompts of 128 tokens (a wave at concurrency 8)
    python benchmarks/prefill_wave.py --prompts 16 --len 256
    python benchmarks/prefill_wave.py --compare attention

The engine of an aggregated worker with the launcher's default threads (built-in model, float32)
steps a wave of fresh prompts (one output token each) until it is done. ``--compare ops``: the
fused C ops (``native_ops.CpuFusedOps``: norm with residual add, RoPE, SiLU-mul) against PyTorch's;
``--compare attention``: the prompts' attention as one batched call (``model.fresh_prompt_groups``)
against one call per prompt. The two alternate, wave by wave, in one process, so both see the same
machine. Prints the p50 and the ratio; writes JSON.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import print_table, write_json  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--len", type=int, default=128)
    ap.add_argument("--waves", type=int, default=20, help="waves per variant (after 3 warm-up waves each)")
    ap.add_argument("--compare", choices=("ops", "attention"), default="ops")
    args = ap.parse_args()

    from dyn_actor.engine import model
    from dyn_actor.protocol import SamplingParams
    from launcher.config import parse_args, with_default_threads
    from launcher.services import build_engine

    engine = build_engine(with_default_threads(parse_args([]), 1, False), "worker")
    fused_ops = engine.model.cpu_ops
    if fused_ops is None:
        print("the fused ops are not available here (no C compiler, or not float32 on the CPU)")
        return 1
    rng = random.Random(0)
    count = 0

    def wave() -> float:
        nonlocal count
        for _ in range(args.prompts):
            count += 1
            engine.add_request(f"r{count}", [0] + [rng.randrange(2, 99) for _ in range(args.len - 1)],
                               SamplingParams(max_tokens=1))
        t0 = time.perf_counter()
        while engine.has_unfinished_requests():
            engine.step()
        return time.perf_counter() - t0

    pad_factor = model.FRESH_PAD_FACTOR

    def use(name: str) -> None:
        engine.model.cpu_ops = None if name == "pytorch" else fused_ops
        model.FRESH_PAD_FACTOR = 0.0 if name == "per-prompt" else pad_factor  # 0: every prompt alone

    names = ("fused", "pytorch") if args.compare == "ops" else ("batched", "per-prompt")
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(3 + args.waves):
        for name in names if i % 2 == 0 else names[::-1]:
            use(name)
            t = wave()
            if i >= 3:
                times[name].append(t)
    rows = [{args.compare: name, "waves": len(ts), "p50_ms": statistics.median(ts) * 1e3, "min_ms": min(ts) * 1e3}
            for name, ts in times.items()]
    print(f"{args.prompts} x {args.len}-token prompts, one wave at a time")
    print_table(rows, list(rows[0]))
    ratio = rows[0]["p50_ms"] / rows[1]["p50_ms"]
    print(f"{names[0]} / {names[1]}: {ratio:.2f}x")
    out = write_json(f"prefill_wave_{args.compare}.json", {"args": vars(args), "rows": rows, "ratio": ratio})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
