"""How long the server takes to start, to answer, to come back from a crash, and to stop.

    python benchmarks/start_stop.py --topologies agg,1p1d --runs 3

For each topology and run: the launcher (``python -m launcher --topology T --port 0``, the
built-in model, default flags otherwise) from the command to its ``ready:`` line; the first
request (a 200-token prompt, 4 tokens out) from sending to its answer; a SIGKILLed engine worker
(``worker 0`` or ``decode 0``) from the kill to the launcher's "is back" line; and SIGINT to the
launcher's exit, idle. Prints the medians and ranges, writes ``benchmarks/results/start_stop.json``.
These are wall-clock times on a shared machine: compare runs of one session, not across hosts.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import print_table, write_json  # noqa: E402
from launcher.processes import launched_processes  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def one_run(topology: str, extra: list[str], timeout: float = 120.0) -> dict[str, float]:
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "launcher", "--topology", topology, "--port", "0", *extra],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log: list[str] = []
    reader = threading.Thread(target=lambda: log.extend(proc.stderr), daemon=True)
    reader.start()
    try:
        url = ""
        for line in proc.stdout:
            if line.startswith("ready: "):
                url = line.split("ready: ", 1)[1].strip()
                break
        if not url:
            raise RuntimeError(f"{topology}: the launcher exited before it was ready:\n{''.join(log)[-2000:]}")
        ready = time.monotonic() - t0
        t1 = time.monotonic()
        r = requests.post(url + "/v1/completions", json={"prompt": "hello " * 200, "max_tokens": 4}, timeout=60)
        r.raise_for_status()
        first = time.monotonic() - t1
        role = "worker 0" if topology == "agg" else "decode 0"
        t2 = time.monotonic()
        os.kill(launched_processes(proc.pid)[role], signal.SIGKILL)
        deadline = time.monotonic() + timeout
        while f"{role} is back" not in "".join(log) and time.monotonic() < deadline:
            time.sleep(0.02)
        back = time.monotonic() - t2
        time.sleep(1.0)  # idle again
        t3 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=timeout)
        stop = time.monotonic() - t3
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return {"ready_s": ready, "first_request_s": first, "worker_back_s": back, "stop_s": stop}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--topologies", default="agg,1p1d")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--launch", default="", help="more launcher flags for every run")
    args = ap.parse_args()
    runs: dict[str, list[dict[str, float]]] = {}
    for i in range(args.runs):  # topologies interleaved, so that drift on the host hits both
        for topology in args.topologies.split(","):
            r = one_run(topology, args.launch.split())
            print(f"{topology} run {i + 1}: " + ", ".join(f"{k} {v:.2f}" for k, v in r.items()), flush=True)
            runs.setdefault(topology, []).append(r)
    rows = []
    for topology, rs in runs.items():
        row: dict = {"topology": topology}
        for k in rs[0]:
            values = [r[k] for r in rs]
            row[k] = f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"
        rows.append(row)
    print()
    print_table(rows, ["topology", "ready_s", "first_request_s", "worker_back_s", "stop_s"])
    path = write_json("start_stop.json", {"runs": runs, "launch": args.launch})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
