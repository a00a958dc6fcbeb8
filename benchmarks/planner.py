"""A load that changes shape over time, against static topologies and the active planner, in one run.

    python benchmarks/planner.py                # builtin:tiny on the CPU, ~3.5 minutes

Phases (``--phase`` seconds each): short chat (``--users`` streaming users with 64-token
prompts), then the same plus a burst of long prompts (``--long-len`` tokens, Poisson at
``--long-rate`` a second), then idle. Topologies, one after the other: static ``agg --workers
2``, static ``1p1d``, and ``1p1d --planner active --max-workers 3`` (the planner may add a
prefill worker during the burst and remove it after). Reported per topology: the fraction of
requests within the TTFT target and within the ITL target (their mean gap), TTFT p50/p99,
output tok/s, and engine-process-seconds (what the topology held, from the planner's log for the
active run); a PNG of the active run's prefill workers over time with its decisions.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import RESULTS, print_table, pyplot, write_json  # noqa: E402
from benchmarks.disagg import stream  # noqa: E402
from benchmarks.serve import ROOT, pct, stop, wait_http  # noqa: E402


async def load(url: str, args) -> tuple[list[dict], float]:
    rng = random.Random(0)
    results: list[dict] = []
    t0 = time.perf_counter()
    chat_end, burst_end = t0 + 2 * args.phase, t0 + 2 * args.phase

    def prompt(n):
        return [0] + [rng.randrange(2, 99) for _ in range(n - 1)]

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        async def user():
            while time.perf_counter() < chat_end:
                await stream(session, url, prompt(64), args.short_out, t0, "short", results)

        async def burst():
            await asyncio.sleep(args.phase)
            tasks = []
            while time.perf_counter() < burst_end:
                tasks.append(asyncio.ensure_future(stream(session, url, prompt(args.long_len), 8, t0, "long", results)))
                await asyncio.sleep(rng.expovariate(args.long_rate))
            await asyncio.gather(*tasks)

        await asyncio.gather(burst(), *(user() for _ in range(args.users)))
        await asyncio.sleep(max(0.0, t0 + 3 * args.phase - time.perf_counter()))  # the idle phase
    return results, time.perf_counter() - t0


def summarize(name: str, results: list[dict], duration: float, args, process_seconds: float) -> dict:
    ttft = [r["ttft"] for r in results]
    itl = [sum(g for _, g in r["gaps"]) / len(r["gaps"]) for r in results if r["gaps"]]
    return {"topology": name, "requests": len(results),
            "ttft_ok": sum(t * 1e3 <= args.ttft_slo_ms for t in ttft) / max(1, len(ttft)),
            "itl_ok": sum(g * 1e3 <= args.itl_slo_ms for g in itl) / max(1, len(itl)),
            "ttft_p50_ms": pct(ttft, 50) * 1e3, "ttft_p99_ms": pct(ttft, 99) * 1e3,
            "output_tok_per_s": sum(r["tokens"] for r in results) / duration,
            "process_seconds": process_seconds}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--phase", type=float, default=20.0, help="seconds of each phase (chat, burst, idle)")
    ap.add_argument("--users", type=int, default=4)
    ap.add_argument("--short-out", type=int, default=32)
    ap.add_argument("--long-len", type=int, default=1536)
    ap.add_argument("--long-rate", type=float, default=3.0)
    ap.add_argument("--ttft-slo-ms", type=float, default=150.0)
    ap.add_argument("--itl-slo-ms", type=float, default=50.0)
    args = ap.parse_args()
    common = ["--kv-cache-memory-gb", "0.5", "--max-local-prefill-length", "256"]
    log = Path(tempfile.mkdtemp()) / "planner.jsonl"
    runs = [("agg x2 (static)", ["--topology", "agg", "--workers", "2"], 2),
            ("1p1d (static)", ["--topology", "1p1d", "--planner", "off"], 2),
            ("1p1d + planner", ["--topology", "1p1d", "--planner", "active", "--max-workers", "3",
                                "--ttft-slo-ms", str(args.ttft_slo_ms), "--itl-slo-ms", str(args.itl_slo_ms),
                                "--planner-interval", "1", "--planner-cooldown", "5", "--planner-warmup", "3",
                                "--planner-log", str(log)], None)]
    rows, timeline = [], []
    for name, flags, processes in runs:
        port = 8410
        cmd = [sys.executable, "-m", "launcher", "--port", str(port), *common, *flags]
        proc = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL)
        try:
            url = f"http://127.0.0.1:{port}"
            wait_http(url, proc)
            results, dur = asyncio.run(load(url, args))
        finally:
            stop(proc)
        if processes is None:  # the planner's log: engine processes at every tick
            ticks = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
            counts = [(t["snapshot"]["t"], sum(1 for w in t["snapshot"]["workers"]), t["decision"]["action"])
                      for t in ticks]
            process_seconds = sum(n for _, n, _ in counts) * 1.0  # one tick a second
            timeline = counts
        else:
            process_seconds = processes * dur
        rows.append(summarize(name, results, dur, args, process_seconds))
        print(f"{name}: {rows[-1]['requests']} requests, TTFT within target {rows[-1]['ttft_ok']:.0%}", flush=True)
    print()
    print_table(rows, list(rows[0]))
    decisions = [(round(t, 1), a) for t, _, a in timeline if a != "none"]
    print("\nplanner decisions (s since start, action):", decisions)
    out = write_json("planner.json", {"args": vars(args), "rows": rows, "decisions": decisions,
                                      "timeline": timeline})
    plt = pyplot()
    if plt is not None and timeline:
        fig, ax = plt.subplots(figsize=(8, 3))
        ax.step([t for t, _, _ in timeline], [n for _, n, _ in timeline], where="post")
        for t, a in decisions:
            ax.axvline(t, color="red" if a.startswith("add") else "green", alpha=0.4)
        ax.set_xlabel("s")
        ax.set_ylabel("engine processes")
        ax.set_title("1p1d + planner: workers over time (red: add, green: remove)")
        fig.tight_layout()
        fig.savefig(RESULTS / "planner.png", dpi=100)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
