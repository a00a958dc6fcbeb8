"""KV-aware routing vs round-robin vs random on a multi-turn, shared-system-prompt workload.

    python benchmarks/router.py        # agg --workers 6 on builtin:tiny, the three routers one after the other

The workload: ``--groups`` groups of conversations, each group sharing a system prompt;
``--conversations`` users, each holding one conversation of ``--turns`` turns. A
turn's prompt is the system prompt, the whole history (earlier user messages and the
answers the server gave) and a new user message, so each conversation is a growing
prefix. Every user runs its turns one after another with a think time between them
(exponential, mean ``--think-time``), all users at once. The same seeded workload runs
against each router on a freshly started launcher with the same topology and KV cache.

Sizing, and why: each worker's KV cache (``--kv-cache-memory-gb``) holds about twice
its share of the conversations (18 conversations of up to ~2.3k tokens over 6 workers:
~7k tokens each, in a 13k-token cache), but far less than all of them. That is the
situation KV-aware routing is for: kept on one worker, every conversation stays cached;
spread over all workers, each worker would need every conversation and LRU evicts
them. The defaults run 6 single-threaded workers on a 2-core machine
(``--extra "--torch-threads 1"``); more workers per core starve heartbeats.

Reported per router: TTFT p50/p99 (all turns, and turns after the first), prefix-cache
hit rate (cached prompt tokens / prompt tokens, from the usage the server returns), the
share of later turns that found their previous prompt cached (``kept_prefix``), output
throughput, and each worker's number of requests (max share / fair share). Writes JSON
and a PNG. Targets (issue 5): kv's TTFT p50 <= 0.4x round-robin's, its hit rate >= 3x,
and no worker above 1.5x its fair share.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import string
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import RESULTS, print_table, pyplot, write_json  # noqa: E402
from benchmarks.serve import ROOT, pct, stop, wait_http  # noqa: E402

ALPHABET = string.ascii_letters + string.digits + " .,"


def _text(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(ALPHABET) for _ in range(n))


async def turn(session: aiohttp.ClientSession, url: str, prompt: str, max_tokens: int) -> dict:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft = None
    text = []
    usage = None
    async with session.post(url + "/v1/completions", json=body) as resp:
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {await resp.text()}")
        async for raw in resp.content:
            line = raw.strip()
            if not line.startswith(b"data: {"):
                continue
            obj = json.loads(line[6:])
            if obj.get("error"):
                raise RuntimeError(f"the server ended the stream with an error: {obj['error']}")
            if obj.get("choices"):
                if ttft is None:
                    ttft = time.perf_counter() - t0
                text.append(obj["choices"][0].get("text", ""))
            if obj.get("usage"):
                usage = obj["usage"]
    assert usage is not None and ttft is not None
    return {"ttft": ttft, "text": "".join(text), "prompt_tokens": usage["prompt_tokens"],
            "cached_tokens": usage["prompt_tokens_details"]["cached_tokens"],
            "completion_tokens": usage["completion_tokens"], "end": time.perf_counter()}


async def user(session, url: str, system: str, seed: int, args, out: list[dict]) -> None:
    rng = random.Random(seed)
    history = system
    prev_prompt = 0
    for t in range(args.turns):
        if args.think_time > 0:  # users read and type: arrivals do not line up across users
            await asyncio.sleep(rng.expovariate(1 / args.think_time))
        prompt = history + f"\nUser: {_text(rng, args.user_len)}\nAssistant:"
        r = await turn(session, url, prompt, args.answer_len)
        r["turn"] = t
        # the previous turn's prompt is a prefix of this one: on the worker that served it, its full
        # blocks are cached (unless evicted); a lower hit means another worker or an eviction
        r["kept_prefix"] = r["cached_tokens"] >= prev_prompt // args.block_size * args.block_size
        prev_prompt = r["prompt_tokens"]
        out.append(r)
        history = prompt + r["text"]


async def run_workload(url: str, args) -> tuple[list[dict], float]:
    rng = random.Random(args.seed)
    systems = [f"System {g}: {_text(rng, args.system_len)}" for g in range(args.groups)]
    out: list[dict] = []
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        t0 = time.perf_counter()
        await asyncio.gather(*(user(session, url, systems[c % args.groups], args.seed * 1000 + c, args, out)
                               for c in range(args.conversations)))
        return out, time.perf_counter() - t0


def scrape(url: str) -> tuple[dict[str, float], float, float]:
    """(requests routed per worker, prompt tokens the router predicted cached, that the workers reported)."""
    import urllib.request

    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        text = r.read().decode()

    def per_worker(name: str) -> dict[str, float]:
        return {line.split('"')[1]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                if line.startswith(name + "{")}

    return (per_worker("dyn_router_decisions_total"),
            sum(per_worker("dyn_router_predicted_overlap_tokens_total").values()),
            sum(per_worker("dyn_worker_prefix_cache_hit_tokens_total").values()))


def summarize(mode: str, results: list[dict], duration: float, per_worker: dict[str, float],
              predicted: float) -> dict:
    ttft = [r["ttft"] * 1e3 for r in results]
    later = [r["ttft"] * 1e3 for r in results if r["turn"] > 0]
    prompt = sum(r["prompt_tokens"] for r in results)
    cached = sum(r["cached_tokens"] for r in results)
    fair = len(results) / max(1, len(per_worker))
    return {"router": mode, "requests": len(results), "ttft_p50_ms": pct(ttft, 50), "ttft_p99_ms": pct(ttft, 99),
            "ttft_p50_later_turns_ms": pct(later, 50), "hit_rate": cached / prompt,
            "predicted_hit_rate": predicted / prompt,  # what the router's index expected (kv mode)
            "kept_prefix": sum(r["kept_prefix"] for r in results if r["turn"] > 0) / max(1, len(later)),
            "output_tok_per_s": sum(r["completion_tokens"] for r in results) / duration,
            "max_share_over_fair": max(per_worker.values()) / fair if per_worker else 0.0,
            "per_worker": " ".join(f"{int(v)}" for _, v in sorted(per_worker.items()))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=6)
    ap.add_argument("--groups", type=int, default=4, help="groups sharing one system prompt")
    ap.add_argument("--conversations", type=int, default=18)
    ap.add_argument("--turns", type=int, default=10)
    ap.add_argument("--system-len", type=int, default=256, help="characters (= tokens on builtin:tiny)")
    ap.add_argument("--user-len", type=int, default=128)
    ap.add_argument("--answer-len", type=int, default=64)
    ap.add_argument("--think-time", type=float, default=1.0, help="mean seconds between a user's turns (exponential)")
    ap.add_argument("--kv-cache-memory-gb", type=float, default=0.025, help="per worker (0.025 = 13k tokens on tiny)")
    ap.add_argument("--routers", default="kv,round-robin,random")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--extra", default="--torch-threads 1", help="more launcher flags, for every router")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    rows, raw = [], {}
    for mode in args.routers.split(","):
        port = 8450
        cmd = [sys.executable, "-m", "launcher", "--port", str(port), "--topology", "agg", "--workers",
               str(args.workers), "--router", mode, "--kv-cache-memory-gb", str(args.kv_cache_memory_gb),
               "--block-size", str(args.block_size),
               *args.extra.split()]
        proc = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL)
        try:
            url = f"http://127.0.0.1:{port}"
            wait_http(url, proc)
            results, dur = asyncio.run(run_workload(url, args))
            per_worker, predicted, _ = scrape(url)
        finally:
            stop(proc)
        raw[mode] = results
        rows.append(summarize(mode, results, dur, per_worker, predicted))
        r = rows[-1]
        print(f"{mode}: TTFT p50 {r['ttft_p50_ms']:.0f} ms, hit rate {r['hit_rate']:.2f}, "
              f"{r['output_tok_per_s']:.0f} tok/s, per worker {r['per_worker']}", flush=True)
    print()
    print_table(rows, list(rows[0]))
    by = {r["router"]: r for r in rows}
    ratios = {}
    if "kv" in by and "round-robin" in by:
        kv, rr = by["kv"], by["round-robin"]
        ratios = {"ttft_p50_kv_over_rr": kv["ttft_p50_ms"] / rr["ttft_p50_ms"],
                  "ttft_p99_kv_over_rr": kv["ttft_p99_ms"] / rr["ttft_p99_ms"],
                  "hit_rate_kv_over_rr": kv["hit_rate"] / max(rr["hit_rate"], 1e-9),
                  "throughput_kv_over_rr": kv["output_tok_per_s"] / rr["output_tok_per_s"],
                  "kv_max_share_over_fair": kv["max_share_over_fair"]}
        print(f"\nkv / round-robin: TTFT p50 {ratios['ttft_p50_kv_over_rr']:.2f}x (target <= 0.4), "
              f"hit rate {ratios['hit_rate_kv_over_rr']:.2f}x (target >= 3), "
              f"throughput {ratios['throughput_kv_over_rr']:.2f}x; "
              f"kv's busiest worker {ratios['kv_max_share_over_fair']:.2f}x its fair share (target <= 1.5)")
    requests = {m: [{k: r[k] for k in ("turn", "ttft", "prompt_tokens", "cached_tokens", "kept_prefix")} for r in res]
                for m, res in raw.items()}
    out = write_json("router.json", {"args": vars(args), "rows": rows, "ratios": ratios, "requests": requests})
    png = RESULTS / "router.png"
    plt = pyplot()
    if plt is not None:
        fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
        names = [r["router"] for r in rows]
        axes[0].bar([f"{n}\np50" for n in names], [r["ttft_p50_ms"] for r in rows], color="tab:blue")
        axes[0].bar([f"{n}\np99" for n in names], [r["ttft_p99_ms"] for r in rows], color="tab:orange")
        axes[0].set_ylabel("TTFT (ms)")
        axes[0].tick_params(axis="x", labelsize=7)
        axes[1].bar(names, [r["hit_rate"] for r in rows])
        axes[1].set_ylabel("prefix-cache hit rate")
        for i, r in enumerate(rows):
            shares = [int(x) for x in r["per_worker"].split()]
            width = 0.8 / max(1, len(shares))
            axes[2].bar([i - 0.4 + width * (j + 0.5) for j in range(len(shares))], shares, width=width * 0.9)
        axes[2].axhline(rows[0]["requests"] / max(1, len(rows[0]["per_worker"].split())), color="gray", ls="--",
                        lw=1, label="fair share")
        axes[2].legend(fontsize=7)
        axes[2].set_xticks(range(len(names)), names)
        axes[2].set_ylabel("requests per worker")
        fig.suptitle(f"{args.conversations} conversations x {args.turns} turns, {args.groups} shared system prompts, "
                     f"agg --workers {args.workers}")
        fig.tight_layout()
        fig.savefig(png, dpi=100)
    print(f"wrote {out} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
