"""Aggregated vs disaggregated serving under a mixed workload, in one run.

    python benchmarks/disagg.py                 # agg --workers 2, then 1p1d, on builtin:tiny
    python benchmarks/disagg.py --device cuda   # on one GPU: the random 1B-shaped bf16 model, GPU-sized load

Steady users send short prompts and decode continuously while long prompts
arrive at random (Poisson). Each topology is started with the launcher, loaded
for ``--duration`` seconds and stopped, one after the other. Reported per
topology: TTFT p50/p99 (short and long requests), inter-token latency p50/p99 of
the short requests (the decode smoothness a long prefill disturbs), output
throughput; a PNG of every short request's inter-token gaps over time. Then, at no
other load, the TTFT of a few fresh 2,000-token prompts (one token each): on 1p1d
they are prefilled remotely, so the difference to agg is what a remote prefill adds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import RESULTS, print_table, pyplot, write_json  # noqa: E402
from benchmarks.serve import ROOT, pct, stop, wait_http  # noqa: E402


async def stream(session, url, prompt, max_tokens, t_start, kind, out):
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True, "ignore_eos": True}
    t0 = time.perf_counter()
    stamps = []
    async with session.post(url + "/v1/completions", json=body) as resp:
        async for raw in resp.content:
            line = raw.strip()
            if line.startswith(b"data: {"):
                obj = json.loads(line[6:])
                if obj.get("choices") and obj["choices"][0].get("text"):
                    stamps.append(time.perf_counter())
    if stamps:
        out.append({"kind": kind, "ttft": stamps[0] - t0, "start": t0 - t_start,
                    "gaps": [(b - t_start, b - a) for a, b in zip(stamps, stamps[1:])], "tokens": len(stamps)})


async def load(url: str, args) -> tuple[list[dict], float]:
    rng = random.Random(0)
    results: list[dict] = []
    t_start = time.perf_counter()
    end = t_start + args.duration

    def prompt(n):
        return [0] + [rng.randrange(2, 99) for _ in range(n - 1)]

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        async def steady():
            while time.perf_counter() < end:
                await stream(session, url, prompt(args.short_len), args.short_out, t_start, "short", results)

        async def arrivals():
            tasks = []
            while time.perf_counter() < end:
                await asyncio.sleep(rng.expovariate(args.long_rate))
                tasks.append(asyncio.ensure_future(
                    stream(session, url, prompt(args.long_len), args.long_out, t_start, "long", results)))
            await asyncio.gather(*tasks)

        await asyncio.gather(arrivals(), *(steady() for _ in range(args.users)))
    return results, time.perf_counter() - t_start


def idle_key(n: int) -> str:
    return "ttft_2k_idle_p50_ms" if n == 2000 else f"ttft_{n}_idle_p50_ms"


async def idle_ttft(url: str, n: int, length: int, seed: int) -> list[float]:
    """TTFT of ``n`` fresh ``length``-token prompts, one at a time, with nothing else running."""
    rng = random.Random(seed)
    out: list[float] = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        for _ in range(n):
            results: list[dict] = []
            prompt = [0] + [rng.randrange(2, 99) for _ in range(length - 1)]
            await stream(session, url, prompt, 2, time.perf_counter(), "idle", results)
            out.extend(r["ttft"] for r in results)
    return out


def summarize(name: str, results: list[dict], duration: float) -> dict:
    short = [r for r in results if r["kind"] == "short"]
    long = [r for r in results if r["kind"] == "long"]
    gaps = [g for r in short for _, g in r["gaps"]]
    return {"topology": name, "requests": len(results), "long_requests": len(long),
            "output_tok_per_s": sum(r["tokens"] for r in results) / duration,
            "ttft_short_p50_ms": pct([r["ttft"] for r in short], 50) * 1e3,
            "ttft_short_p99_ms": pct([r["ttft"] for r in short], 99) * 1e3,
            "ttft_long_p50_ms": pct([r["ttft"] for r in long], 50) * 1e3,
            "ttft_long_p99_ms": pct([r["ttft"] for r in long], 99) * 1e3,
            "itl_p50_ms": pct(gaps, 50) * 1e3, "itl_p99_ms": pct(gaps, 99) * 1e3}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=30)
    ap.add_argument("--users", type=int, default=6)
    ap.add_argument("--short-len", type=int, default=64)
    ap.add_argument("--short-out", type=int, default=64)
    ap.add_argument("--long-len", type=int, default=1536)
    ap.add_argument("--long-out", type=int, default=16)
    ap.add_argument("--long-rate", type=float, default=0.5, help="long prompts per second")
    ap.add_argument("--agg", default="--topology agg --workers 2")
    ap.add_argument("--disagg", default="--topology 1p1d --max-local-prefill-length 256")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                    help="cuda: both topologies on this GPU, the random 1B-shaped bf16 model, and unless given "
                         "--users 48 --long-len 2048 --long-rate 4 --short-out 128")
    ap.add_argument("--model", default=None, help="default: builtin:tiny on the CPU, the random 1B model on cuda")
    ap.add_argument("--kv-cache-memory-gb", type=float, default=None, help="per worker (default 0.5 CPU, 8 cuda)")
    ap.add_argument("--idle-prompts", type=int, default=5, help="prompts of each --idle-lengths timed alone per topology")
    ap.add_argument("--idle-lengths", default="2000", help="comma-separated prompt lengths timed alone (fresh prompts)")
    ap.add_argument("--no-load", action="store_true", help="only the prompts timed alone (what a remote prefill adds)")
    args = ap.parse_args()
    import subprocess

    extra: list[str] = []
    if args.device == "cuda":
        gpu_defaults = {"users": 48, "long_len": 2048, "long_rate": 4.0, "short_out": 128}
        for k, v in gpu_defaults.items():
            if f"--{k.replace('_', '-')}" not in sys.argv:
                setattr(args, k, v)
        if args.model is None:
            from benchmarks.checkpoints import LLAMA_1B, write_random_llama

            args.model = str(write_random_llama(RESULTS / "checkpoints" / "llama-1b-random", LLAMA_1B))
        extra = ["--device", "cuda", "--dtype", "bfloat16", "--max-model-len", "4096"]
    if args.model:
        extra += ["--model", args.model]
    kv_gb = args.kv_cache_memory_gb or (8.0 if args.device == "cuda" else 0.5)

    lengths = [int(x) for x in args.idle_lengths.split(",") if x]
    rows, raw = [], {}
    for name, flags in (("agg", args.agg), ("disagg", args.disagg)):
        port = 8400
        cmd = [sys.executable, "-m", "launcher", "--port", str(port), "--kv-cache-memory-gb", str(kv_gb), *extra,
               *flags.split()]
        proc = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL)
        try:
            url = f"http://127.0.0.1:{port}"
            wait_http(url, proc)
            results, dur = ([], 0.0) if args.no_load else asyncio.run(load(url, args))
            idle = {n: asyncio.run(idle_ttft(url, args.idle_prompts, n, seed=7 + n)) for n in lengths}
        finally:
            stop(proc)
        raw[name] = results
        rows.append({"topology": name} if args.no_load else summarize(name, results, dur))
        for n, ttfts in idle.items():
            rows[-1][idle_key(n)] = pct(ttfts, 50) * 1e3
        if not args.no_load:
            print(f"{name}: {rows[-1]['output_tok_per_s']:.0f} output tok/s, ITL p99 {rows[-1]['itl_p99_ms']:.1f} ms",
                  flush=True)
    print()
    print_table(rows, list(rows[0]))
    a, d = rows
    ratios = {f"remote_prefill_adds_ms_{n}_idle": d[idle_key(n)] - a[idle_key(n)] for n in lengths}
    adds = ", ".join(f"{n:,} tokens {ratios[f'remote_prefill_adds_ms_{n}_idle']:+.1f} ms" for n in lengths)
    if args.no_load:
        print(f"\nwhat a remote prefill adds to TTFT at no load (p50, disagg - agg): {adds}")
    else:
        ratios |= {"itl_p99_disagg_over_agg": d["itl_p99_ms"] / a["itl_p99_ms"],
                   "throughput_disagg_over_agg": d["output_tok_per_s"] / a["output_tok_per_s"]}
        print(f"\n1p1d / agg: ITL p99 {ratios['itl_p99_disagg_over_agg']:.2f}x, "
              f"throughput {ratios['throughput_disagg_over_agg']:.2f}x; a remote prefill at no load adds "
              f"(TTFT p50): {adds}")
    out = write_json(f"disagg{'_cuda' if args.device == 'cuda' else ''}.json",
                     {"args": vars(args), "rows": rows, "ratios": ratios})
    png = RESULTS / "disagg.png"
    plt = pyplot()
    if plt is not None and not args.no_load:
        fig, ax = plt.subplots(figsize=(9, 4))
        for name, results in raw.items():
            pts = [g for r in results if r["kind"] == "short" for g in r["gaps"]]
            ax.scatter([t for t, _ in pts], [g * 1e3 for _, g in pts], s=3, label=name, alpha=0.5)
        ax.set_yscale("log")
        ax.set_xlabel("time (s)")
        ax.set_ylabel("inter-token gap of short requests (ms)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(png, dpi=100)
    print(f"wrote {out}" + (f" and {png}" if png.is_file() and plt is not None and not args.no_load else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
