"""Soak: mixed load on ``1p1d`` for ``--minutes``, with stalls, disconnects and a leak check.

    python -m benchmarks.soak --minutes 30

Starts the server with the launcher (default flags unless ``--launcher-args``), then keeps
``--clients`` clients busy: prompts of 10-1,500 random tokens, 8-64 output tokens, streamed;
10% of clients leave early. Every ``--stall-every`` seconds one random process of the topology
(decode worker, prefill worker, prefill queue, frontend) is frozen with SIGSTOP for
``--stall-seconds``. Each minute it records, per process, the resident memory; and the
requests finished, errors, clients that left, and the p50/p99 end-to-end latency. At the end it
lets the load finish and checks that no KV block is held or fenced and no request is in
flight. Prints a table; writes ``benchmarks/results/soak.json`` (and ``soak.png`` with
matplotlib). Exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

from benchmarks.common import RESULTS, print_table, pyplot, write_json
from launcher.processes import launched_processes

ROOT = Path(__file__).resolve().parent.parent
ROLES = ("decode 0", "prefill 0", "prefill-queue 0", "frontend 0")


def rss_mib(pid: int) -> float:
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    v = sorted(values)
    return v[min(len(v) - 1, int(q * len(v)))]


class Stats:
    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.done = self.errors = self.left = 0

    def take(self) -> dict:
        row = {"done": self.done, "errors": self.errors, "left": self.left,
               "p50_s": pct(self.latencies, 0.5), "p99_s": pct(self.latencies, 0.99)}
        self.latencies, self.done, self.errors, self.left = [], 0, 0, 0
        return row


async def client(session: aiohttp.ClientSession, url: str, rng: random.Random, stats: Stats, stop: asyncio.Event,
                 vocab: int) -> None:
    while not stop.is_set():
        prompt = [0] + [rng.randrange(2, vocab) for _ in range(rng.randint(10, 1500) - 1)]
        leave_after = rng.randint(1, 5) if rng.random() < 0.1 else None
        body = {"prompt": prompt, "max_tokens": rng.randint(8, 64), "stream": True, "ignore_eos": True,
                "temperature": rng.choice([0.0, 0.8])}
        t0 = time.monotonic()
        events, ok = 0, False
        try:
            async with session.post(url + "/v1/completions", json=body,
                                    timeout=aiohttp.ClientTimeout(total=120)) as r:
                if r.status == 200:
                    async for line in r.content:
                        if line.startswith(b"data: [DONE]"):
                            ok = True
                            break
                        if line.startswith(b"data: {"):
                            if b'"error"' in line[:20]:
                                break
                            events += 1
                            if leave_after is not None and events >= leave_after:
                                break
        except (aiohttp.ClientError, asyncio.TimeoutError):
            pass
        if leave_after is not None and events >= leave_after:
            stats.left += 1
        elif ok:
            stats.done += 1
            stats.latencies.append(time.monotonic() - t0)
        else:
            stats.errors += 1
            await asyncio.sleep(0.2)  # a failing server is not hammered


async def metrics(session: aiohttp.ClientSession, url: str) -> dict[str, float]:
    async with session.get(url + "/metrics") as r:
        text = await r.text()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        out[name] = out.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


async def soak(args: argparse.Namespace, url: str, launcher: subprocess.Popen) -> dict:
    rng = random.Random(args.seed)
    stats = Stats()
    stop = asyncio.Event()
    rows: list[dict] = []
    stalls: list[dict] = []
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        clients = [asyncio.ensure_future(client(session, url, random.Random(rng.random()), stats, stop, 99))
                   for _ in range(args.clients)]
        t0 = time.monotonic()
        next_stall = t0 + args.stall_every
        for minute in range(1, args.minutes + 1):
            while time.monotonic() < t0 + 60 * minute:
                await asyncio.sleep(1.0)
                if args.stall_every and time.monotonic() >= next_stall:
                    next_stall += args.stall_every
                    role = rng.choice(ROLES)
                    pid = launched_processes(launcher.pid).get(role)
                    if pid is not None:
                        os.kill(pid, signal.SIGSTOP)
                        await asyncio.sleep(args.stall_seconds)
                        os.kill(pid, signal.SIGCONT)
                        stalls.append({"minute": minute, "role": role, "seconds": args.stall_seconds})
                        print(f"  stalled {role} for {args.stall_seconds:.0f}s", flush=True)
            pids = launched_processes(launcher.pid)
            row = {"minute": minute, **stats.take()}
            row.update({f"rss_{r.replace(' 0', '').replace('-', '_')}_mib": rss_mib(pids.get(r, -1)) for r in ROLES})
            rows.append(row)
            print(f"  minute {minute}: {json.dumps(row)}", flush=True)
        stop.set()
        await asyncio.wait(clients, timeout=150)
        hung = sum(not c.done() for c in clients)
        for c in clients:
            c.cancel()
        await asyncio.sleep(3.0)  # aborts of the clients that were cut off reach the workers
        final = {}
        for _ in range(30):
            final = await metrics(session, url)
            if not (final.get("dyn_worker_kv_blocks_used") or final.get("dyn_worker_kv_blocks_fenced")
                    or final.get("dyn_requests_in_flight")):
                break
            await asyncio.sleep(1.0)
    return {"rows": rows, "stalls": stalls, "hung_clients": hung,
            "kv_blocks_used_at_end": final.get("dyn_worker_kv_blocks_used", float("nan")),
            "kv_blocks_fenced_at_end": final.get("dyn_worker_kv_blocks_fenced", float("nan")),
            "in_flight_at_end": final.get("dyn_requests_in_flight", float("nan")),
            "remote_prefills": final.get("dyn_remote_prefills_total", 0.0),
            "local_prefills": final.get("dyn_local_prefills_total", 0.0),
            "remote_prefill_timeouts": final.get("dyn_worker_remote_prefill_timeouts_total", 0.0)}


def plot(rows: list[dict], path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    minutes = [r["minute"] for r in rows]
    for key in rows[0]:
        if key.startswith("rss_"):
            a.plot(minutes, [r[key] for r in rows], label=key[4:-4])
    a.set_xlabel("minute")
    a.set_ylabel("RSS (MiB)")
    a.legend()
    b.plot(minutes, [r["p99_s"] for r in rows], label="p99 e2e (s)")
    b.plot(minutes, [r["errors"] for r in rows], label="errors")
    b.set_xlabel("minute")
    b.legend()
    fig.tight_layout()
    fig.savefig(path)
    print(f"wrote {path}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=int, default=30)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--stall-every", type=float, default=180.0, help="seconds between SIGSTOPs (0: none)")
    ap.add_argument("--stall-seconds", type=float, default=3.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--launcher-args", default="", help="extra launcher flags, e.g. '--kv-cache-memory-gb 0.5'")
    args = ap.parse_args()
    # the port: one the launcher picks and binds itself, read from its ready line
    cmd = [sys.executable, "-m", "launcher", "--topology", "1p1d", "--port", "0", *args.launcher_args.split()]
    launcher = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    url = ""
    try:
        for line in launcher.stdout:  # type: ignore[union-attr]
            if line.startswith("ready: "):
                url = line.split("ready: ", 1)[1].strip()
                break
        if not url:
            print("error: the server did not start", file=sys.stderr)
            return 1
        print(f"soak: {args.minutes} min, {args.clients} clients, 1p1d at {url}", flush=True)
        result = asyncio.run(soak(args, url, launcher))
    finally:
        launcher.send_signal(signal.SIGTERM)
        try:
            launcher.wait(timeout=60)
        except subprocess.TimeoutExpired:
            launcher.kill()
    result["launcher_exit_code"] = launcher.returncode
    rows = result["rows"]
    print_table(rows, list(rows[0]))
    checks = {"no hung clients": result["hung_clients"] == 0,
              "no KV blocks held at the end": result["kv_blocks_used_at_end"] == 0,
              "no KV blocks fenced at the end": result["kv_blocks_fenced_at_end"] == 0,
              "nothing in flight at the end": result["in_flight_at_end"] == 0,
              "clean stop": launcher.returncode == 0}
    result["checks"] = checks
    for name, ok in checks.items():
        print(f"{'ok  ' if ok else 'FAIL'} {name}")
    print(f"remote prefills {result['remote_prefills']:.0f}, local {result['local_prefills']:.0f}, "
          f"remote-prefill timeouts {result['remote_prefill_timeouts']:.0f}; stalls: "
          + ", ".join(f"{s['role']} (min {s['minute']})" for s in result["stalls"]))
    print(f"wrote {write_json('soak.json', result)}")
    plot(rows, RESULTS / "soak.png")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
