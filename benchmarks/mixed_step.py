"""Steps that compute prompt tokens beside running decodes: eager against the piecewise graphs.

    python benchmarks/mixed_step.py --device cuda          # the random 1B-shaped bf16 checkpoint
    python benchmarks/mixed_step.py --model tiny --steps 10 # the built-in model (CPU: both eager-speed)

Under a steady stream of arrivals most steps are mixed: the running requests' decode tokens and a
new prompt's chunk. Those steps cannot replay the decode graphs; ``piecewise_graphs`` replays
everything but attention from graphs captured per bucket of token counts (``piecewise.py``). This
keeps ``--batch`` requests decoding and adds one fresh prompt of each ``--prompt-lens`` length at
every step, in an engine with the pieces and one without, alternating, and reports the median time
of those mixed steps (and of pure decode steps, for scale). Then, since an overlapped step cannot
be timed alone, the mean step time over a stream of such steps (a prompt joins every other step, no
wait in between) with the pieces, overlapped steps off and on (``async_scheduling``). Prints a
table; writes JSON.
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
    ap.add_argument("--model", default="1b", choices=["1b", "tiny"])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on the CPU")
    ap.add_argument("--batch", type=int, default=64, help="requests decoding throughout")
    ap.add_argument("--prompt-lens", default="16,128,512", help="lengths of the prompts that join, one per step")
    ap.add_argument("--steps", type=int, default=30, help="mixed steps measured per length and variant")
    args = ap.parse_args()

    import torch

    from benchmarks.engine_throughput import prepare_models
    from dyn_actor.engine import EngineConfig, LLMEngine, SamplingParams

    path, vocab = prepare_models([args.model])[args.model]
    dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    lens = [int(x) for x in args.prompt_lens.split(",")]
    engines = {}
    for variant in ("eager", "pieces", "overlap"):
        engines[variant] = LLMEngine(EngineConfig(
            model=path, dtype=dtype, device=args.device, max_num_seqs=args.batch + 2, max_model_len=4096,
            kv_cache_memory=None if args.device == "cuda" else 2 << 30,
            async_scheduling="on" if variant == "overlap" else "off",
            attention="triton" if args.device == "cuda" else "auto",
            piecewise_graphs="off" if variant == "eager" else ("auto" if args.device == "cuda" else "off")))
    rng = random.Random(0)
    count = 0

    def prompt(n: int) -> list[int]:
        return [0] + [rng.randrange(2, vocab) for _ in range(n - 1)]

    def timed(engine) -> float:
        sync()
        t0 = time.perf_counter()
        engine.step()
        sync()
        return time.perf_counter() - t0

    rows = []
    for engine in engines.values():  # the decoding batch, prefilled
        for _ in range(args.batch):
            count += 1
            engine.add_request(f"d{count}", prompt(128), SamplingParams(max_tokens=100_000, ignore_eos=True,
                                                                          temperature=0))
        while engine.scheduler.waiting or any(r.num_computed_tokens < r.num_prompt_tokens
                                              for r in engine.requests.values()):
            engine.step()
    def stream(engine, n: int) -> float:
        """Mean seconds a step over ``args.steps`` mixed and as many decode steps, no wait between."""
        nonlocal count
        for _ in range(3):  # warm-up
            count += 1
            engine.add_request(f"w{count}", prompt(n), SamplingParams(max_tokens=1))
            engine.step()
        sync()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            count += 1
            engine.add_request(f"s{count}", prompt(n), SamplingParams(max_tokens=1))
            engine.step()
            engine.step()
        sync()
        return (time.perf_counter() - t0) / (2 * args.steps)

    timed_alone = ("eager", "pieces")
    for n in lens:
        times: dict[str, list[float]] = {v: [] for v in timed_alone}
        decode: dict[str, list[float]] = {v: [] for v in timed_alone}
        for i in range(args.steps + 3):
            for v in timed_alone:
                engine = engines[v]
                count += 1
                engine.add_request(f"p{count}", prompt(n), SamplingParams(max_tokens=1))  # done after its prefill
                t_mixed = timed(engine)
                t_decode = timed(engine)
                if i >= 3:
                    times[v].append(t_mixed)
                    decode[v].append(t_decode)
        row = {"prompt_len": n, "tokens": args.batch + n}
        for v in timed_alone:
            row[f"{v}_ms"] = 1000 * statistics.median(times[v])
        row["ratio"] = row["pieces_ms"] / row["eager_ms"]
        for v in timed_alone:
            row[f"decode_{v}_ms"] = 1000 * statistics.median(decode[v])
        row["stream_stepwise_ms"] = 1000 * stream(engines["pieces"], n)
        row["stream_overlap_ms"] = 1000 * stream(engines["overlap"], n)
        rows.append(row)
        print(f"  prompt {n}: eager {row['eager_ms']:.2f} ms, pieces {row['pieces_ms']:.2f} ms; a stream of steps "
              f"{row['stream_stepwise_ms']:.2f} ms one at a time, {row['stream_overlap_ms']:.2f} ms overlapped",
              flush=True)
    print(f"\nmixed steps: {args.batch} decoding + one fresh prompt ({args.model}, {dtype}, {args.device}); "
          f"median of {args.steps}; ratio = pieces / eager; stream_*: mean step over mixed and decode steps "
          f"in turn, with the pieces, overlapped steps off / on")
    print_table(rows, list(rows[0]))
    pieces = engines["pieces"].pieces
    print("pieces: " + (f"buckets up to {pieces.max_tokens} tokens" if pieces is not None else "none (not captured)"))
    out = write_json("mixed_step.json", {"args": vars(args), "rows": rows})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
