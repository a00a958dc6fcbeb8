"""What a streamed token costs the frontend processes, with one frontend and with several.

    python benchmarks/frontend_cost.py --frontends 1,2 --launch "--workers 2" --concurrency 128
    python benchmarks/frontend_cost.py --launch "" --chat --variant plain= \\
        --variant "parsers=--reasoning-parser deepseek_r1 --tool-call-parser hermes" \\
        --variant-body 'parsers={"tools": [{"type": "function", "function": {"name": "f"}}]}'

Starts the server once per ``--frontends`` value or per ``--variant`` (launcher flags to compare;
each alone on the machine, rounds in alternating order), streams the same load through ``benchmarks/serve.py``'s client, and reads the CPU time
(user + system, from ``/proc``) that the frontend processes and the engine processes spent over
the measured load. Prints output tokens a second, the frontends' CPU microseconds a streamed
token (all of them together) and the busiest frontend's share of a core, the engine processes' CPU
a token, and ITL percentiles; writes ``benchmarks/results/frontend_cost.json`` (with variants,
``frontend_cost_variants.json``).

On a machine whose cores the engines need (a 2-vCPU host), more frontends cannot raise throughput;
what this shows there is whether the cost a token stays the same when it is spread over processes
(each frontend decodes only its own requests' outputs). Where the frontend is the bottleneck (GPU
token rates), the throughput column is the point.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import print_table, write_json  # noqa: E402
from benchmarks.serve import load_in_processes, pct, stop, wait_http  # noqa: E402
from launcher.processes import launched_processes  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime


def measure(case: dict, args, model: str, prompts, warm) -> dict:
    """One server start with ``case`` ({"label", "frontends", "flags", "body"}) under the load."""
    from benchmarks.serve import EXTRA_BODY

    n = case["frontends"]
    EXTRA_BODY.clear()
    EXTRA_BODY.update(case["body"])
    port = 8340 + n
    cmd = [sys.executable, "-m", "launcher", "--model", model, "--port", str(port), "--frontends", str(n),
           *args.launch.split(), *case["flags"].split()]
    proc = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url, proc)
        load_in_processes(url, model, warm, args.output_len, args.concurrency, None, args.client_procs)
        pids = launched_processes(proc.pid)
        fronts = {k: v for k, v in pids.items() if k.startswith("frontend")}
        engines = {k: v for k, v in pids.items() if k.split()[0] in ("worker", "decode", "prefill")}
        before = {k: cpu_seconds(v) for k, v in {**fronts, **engines}.items()}
        t0 = time.monotonic()
        results, dur = load_in_processes(url, model, prompts, args.output_len, args.concurrency, None,
                                         args.client_procs)
        wall = time.monotonic() - t0
        used = {k: cpu_seconds(v) - before[k] for k, v in {**fronts, **engines}.items()}
    finally:
        stop(proc)
    ok = [r for r in results if r.ok]
    tokens = sum(r.output_tokens for r in ok)
    itl = [x for r in ok for x in r.itl]
    front_cpu = sum(used[k] for k in fronts)
    return {"case": case["label"], "frontends": n, "failed": len(results) - len(ok), "output_tok_per_s": tokens / dur,
            "frontend_us_per_token": 1e6 * front_cpu / tokens,
            "busiest_frontend_core_share": max(used[k] for k in fronts) / wall,
            "engine_us_per_token": 1e6 * sum(used[k] for k in engines) / tokens,
            "itl_p50_ms": 1000 * pct(itl, 50), "itl_p99_ms": 1000 * pct(itl, 99)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frontends", default="1,2", help="comma-separated --frontends values to compare")
    ap.add_argument("--launch", default="--workers 2", help="the launcher's other flags")
    ap.add_argument("--model", default="builtin:tiny")
    ap.add_argument("--concurrency", type=int, default=128)
    ap.add_argument("--num-prompts", type=int, default=512)
    ap.add_argument("--input-len", type=int, default=16)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--client-procs", type=int, default=1)
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=FLAGS",
                    help="compare these launcher flag sets (repeatable; one frontend each) instead of --frontends")
    ap.add_argument("--variant-body", action="append", default=[], metavar="NAME=JSON",
                    help="more request fields for one variant's load (its tools, say)")
    ap.add_argument("--chat", action="store_true", help="stream /v1/chat/completions instead of /v1/completions")
    ap.add_argument("--temperature", type=float, default=0.0)
    args = ap.parse_args()
    import json

    from benchmarks.serve import CHAT, SAMPLING

    SAMPLING["temperature"] = args.temperature
    CHAT["on"] = args.chat
    if args.model.startswith("builtin:"):
        from dyn_actor.engine.builtin import hf_config

        vocab = hf_config(args.model)["vocab_size"]
    else:
        vocab = json.loads((Path(args.model) / "config.json").read_text())["vocab_size"]
    rng = random.Random(0)
    prompts = [[0] + [rng.randrange(2, vocab) for _ in range(args.input_len - 1)]
               for _ in range(args.num_prompts + args.concurrency)]
    warm, prompts = prompts[: args.concurrency], prompts[args.concurrency:]
    bodies = dict(v.split("=", 1) for v in args.variant_body)
    if args.variant:
        cases = [{"label": name, "frontends": 1, "flags": flags, "body": json.loads(bodies.get(name, "{}"))}
                 for name, flags in (v.split("=", 1) for v in args.variant)]
    else:
        cases = [{"label": f"{n} frontends", "frontends": n, "flags": "", "body": {}}
                 for n in (int(x) for x in args.frontends.split(","))]
    runs = []
    for rnd in range(args.rounds):
        for case in cases if rnd % 2 == 0 else cases[::-1]:
            row = measure(case, args, args.model, prompts, warm)
            runs.append({"round": rnd, **row})
            print(f"round {rnd}: {case['label']}: {row['output_tok_per_s']:.0f} tok/s, "
                  f"{row['frontend_us_per_token']:.1f} us a token in the frontends", flush=True)
    rows = []
    for case in cases:
        rs = [r for r in runs if r["case"] == case["label"]]
        rows.append({"case": case["label"], **{k: statistics.median(r[k] for r in rs) for k in rs[0]
                                               if k not in ("round", "case")}})
    print()
    print_table(rows, ["case", "frontends", "failed", "output_tok_per_s", "frontend_us_per_token",
                       "busiest_frontend_core_share", "engine_us_per_token", "itl_p50_ms", "itl_p99_ms"])
    path = write_json("frontend_cost_variants.json" if args.variant else "frontend_cost.json", {"args": vars(args), "runs": runs, "medians": rows})
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
