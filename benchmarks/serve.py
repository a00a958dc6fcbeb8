"""Load generator for OpenAI-compatible endpoints: latency percentiles, throughput, goodput.

    # against a running server
    python benchmarks/serve.py --endpoint native=http://127.0.0.1:8000 --concurrency 8
    # start this project's server (and vLLM's, when installed) and compare them in one run: each
    # started alone for its measurement, three rounds in alternating order, medians reported
    python benchmarks/serve.py --launch-native "" --launch-vllm --concurrency 8,32,128 --rounds 3

Requests are streamed ``/v1/completions`` calls with random token-id prompts
(``--input-len``) and ``ignore_eos`` so every request makes ``--output-len``
tokens. Closed loop (``--concurrency``) or open loop (``--request-rate``,
Poisson arrivals). Reports TTFT, inter-token latency (ITL), time per output
token (TPOT) and end-to-end latency at p50/p90/p99, request and token
throughput, and goodput under ``--slo-ttft-ms`` / ``--slo-tpot-ms``. Writes
JSON and a PNG to ``benchmarks/results/``. With ``--overhead`` it also
measures what the frontend, router and sockets add over the engine's own
step time (this project's server only, from its /metrics).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import RESULTS, print_table, pyplot, vllm_available, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Result:
    ok: bool
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int = 0
    error: str = ""


SAMPLING = {"temperature": 0.0}  # --temperature; 1.0 samples (with top_p 1, no seed)
EXTRA_BODY: dict = {}  # --extra-body: more fields for every request (a structured output, say)


CHAT = {"on": False}  # --chat: /v1/chat/completions, the prompt's ids written out as the user's text


def _streamed_token(choice: dict) -> bool:
    """Whether a streamed choice carries a token's output: completions' text; chat's content,
    reasoning or tool calls (not the first chunk's bare role)."""
    if "text" in choice:
        return bool(choice["text"])
    delta = choice.get("delta") or {}
    return bool(delta.get("content") or delta.get("reasoning") or delta.get("tool_calls"))


async def one_request(session: aiohttp.ClientSession, url: str, model: str, prompt: list[int], max_tokens: int) -> Result:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, **SAMPLING, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}, **EXTRA_BODY}
    route = "/v1/completions"
    if CHAT["on"]:
        body["messages"] = [{"role": "user", "content": " ".join(map(str, body.pop("prompt")))}]
        route = "/v1/chat/completions"
    t0 = time.perf_counter()
    last = None
    res = Result(ok=False)
    tokens_seen = 0
    try:
        async with session.post(url + route, json=body) as resp:
            if resp.status != 200:
                res.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                return res
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data: "):
                    continue
                data = line[6:]
                if data == b"[DONE]":
                    break
                obj = json.loads(data)
                if "error" in obj:
                    res.error = str(obj["error"])
                    return res
                if obj.get("usage"):
                    res.output_tokens = obj["usage"]["completion_tokens"]
                    res.prompt_tokens = obj["usage"]["prompt_tokens"]
                if obj.get("choices") and _streamed_token(obj["choices"][0]):
                    now = time.perf_counter()
                    tokens_seen += 1
                    if last is None:
                        res.ttft = now - t0
                    else:
                        res.itl.append(now - last)
                    last = now
    except aiohttp.ClientError as e:
        res.error = f"{type(e).__name__}: {e}"
        return res
    res.e2e = time.perf_counter() - t0
    res.ok = res.output_tokens == max_tokens
    if not res.ok and not res.error:
        res.error = f"got {res.output_tokens} tokens, wanted {max_tokens}"
    return res


async def run_load(url: str, model: str, prompts: list[list[int]], max_tokens: int, concurrency: int | None,
                   rate: float | None, seed: int = 0) -> tuple[list[Result], float]:
    conn = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=3600)
    results: list[Result] = []
    async with aiohttp.ClientSession(connector=conn, timeout=timeout) as session:
        t0 = time.perf_counter()
        if rate:
            rng = random.Random(seed)
            tasks = []
            for p in prompts:
                tasks.append(asyncio.ensure_future(one_request(session, url, model, p, max_tokens)))
                await asyncio.sleep(rng.expovariate(rate))
            results = list(await asyncio.gather(*tasks))
        else:
            queue = list(prompts)

            async def user():
                while queue:
                    p = queue.pop()
                    results.append(await one_request(session, url, model, p, max_tokens))

            await asyncio.gather(*(user() for _ in range(concurrency or 1)))
        return results, time.perf_counter() - t0


def _load_share(job: tuple) -> tuple[list[Result], float]:
    """One client process's share of a load (``--client-procs``), started at the agreed moment."""
    url, model, prompts, max_tokens, concurrency, rate, seed, sampling, start_at = job
    SAMPLING.update(sampling)
    time.sleep(max(0.0, start_at - time.time()))
    return asyncio.run(run_load(url, model, prompts, max_tokens, concurrency, rate, seed))


def load_in_processes(url: str, model: str, prompts: list[list[int]], max_tokens: int, concurrency: int | None,
                      rate: float | None, procs: int) -> tuple[list[Result], float]:
    """``run_load`` split over ``procs`` client processes (each its own event loop, a share of the
    prompts and of the concurrency or rate), so that at GPU token rates the client, which parses
    every streamed event, does not set the pace. The duration is the slowest share's."""
    if procs <= 1:
        return asyncio.run(run_load(url, model, prompts, max_tokens, concurrency, rate))
    import multiprocessing as mp

    start_at = time.time() + 0.5
    jobs = [(url, model, prompts[i::procs], max_tokens,
             None if concurrency is None else concurrency // procs + (i < concurrency % procs),
             None if rate is None else rate / procs, i, dict(SAMPLING), start_at) for i in range(procs)]
    with mp.get_context("fork").Pool(procs) as pool:
        outs = pool.map(_load_share, jobs)
    return [r for rs, _ in outs for r in rs], max(d for _, d in outs)


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))]


def summarize(results: list[Result], duration: float, slo_ttft: float, slo_tpot: float) -> dict:
    ok = [r for r in results if r.ok]
    ttft = [r.ttft for r in ok]
    itl = [x for r in ok for x in r.itl]
    tpot = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    e2e = [r.e2e for r in ok]
    good = [r for r in ok if r.ttft <= slo_ttft and
            (r.output_tokens <= 1 or (r.e2e - r.ttft) / (r.output_tokens - 1) <= slo_tpot)]
    out = {"requests": len(results), "failed": len(results) - len(ok), "duration_s": duration,
           "req_per_s": len(ok) / duration, "output_tok_per_s": sum(r.output_tokens for r in ok) / duration,
           "total_tok_per_s": sum(r.output_tokens + r.prompt_tokens for r in ok) / duration,
           "goodput_req_per_s": len(good) / duration}
    for name, vals in (("ttft", ttft), ("itl", itl), ("tpot", tpot), ("e2e", e2e)):
        for q in (50, 90, 99):
            out[f"{name}_p{q}_ms"] = pct(vals, q) * 1000
        out[f"{name}_mean_ms"] = (statistics.fmean(vals) if vals else float("nan")) * 1000
    errors = [r.error for r in results if not r.ok]
    if errors:
        out["first_error"] = errors[0]
    return out


async def scrape(url: str) -> dict[str, float]:
    async with aiohttp.ClientSession() as s, s.get(url + "/metrics") as r:
        text = await r.text()
    vals: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("dyn_worker_engine_step"):
            name = line.split("{")[0]
            vals[name] = vals.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return vals


async def measure_overhead(url: str, model: str, vocab: int, input_len: int, output_len: int, n: int = 20) -> dict:
    """Sequential requests: the server's latency minus the engine's own step time."""
    rng = random.Random(123)
    prompts = [[0] + [rng.randrange(2, vocab) for _ in range(input_len - 1)] for _ in range(n)]
    before = await scrape(url)
    results, _ = await run_load(url, model, prompts, output_len, 1, None)
    after = await scrape(url)
    ok = [r for r in results if r.ok]
    step_s = after["dyn_worker_engine_step_seconds_total"] - before["dyn_worker_engine_step_seconds_total"]
    steps = after["dyn_worker_engine_steps_total"] - before["dyn_worker_engine_steps_total"]
    mean_step = step_s / steps
    e2e = statistics.fmean(r.e2e for r in ok)
    itl = statistics.fmean(x for r in ok for x in r.itl)
    return {"requests": len(ok), "engine_step_ms": mean_step * 1000, "server_itl_ms": itl * 1000,
            "overhead_per_token_ms": (itl - mean_step) * 1000, "engine_time_per_request_ms": step_s / len(ok) * 1000,
            "server_e2e_ms": e2e * 1000, "overhead_per_request_ms": (e2e - step_s / len(ok)) * 1000}


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 600) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/v1/models", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise RuntimeError(f"{url} did not come up in {timeout}s")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def plot(rows: list[dict], path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for name in sorted({r["endpoint"] for r in rows}):
        rs = sorted((r for r in rows if r["endpoint"] == name), key=lambda r: r["load"])
        xs = [r["load"] for r in rs]
        axes[0].plot(xs, [r["output_tok_per_s"] for r in rs], "o-", label=name)
        axes[1].plot(xs, [r["ttft_p50_ms"] for r in rs], "o-", label=name)
        axes[2].plot(xs, [r["itl_p50_ms"] for r in rs], "o-", label=name)
    for ax, t in zip(axes, ["output tokens/s", "TTFT p50 (ms)", "ITL p50 (ms)"]):
        ax.set_title(t)
        ax.set_xlabel("concurrency / rate")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--endpoint", action="append", default=[], help="NAME=URL of a running server (repeatable)")
    ap.add_argument("--launch-native", default=None, metavar="ARGS",
                    help="start this project's server with these launcher flags (e.g. '--workers 1')")
    ap.add_argument("--baseline-tree", default=None, metavar="DIR",
                    help="also start the native server from another checkout (e.g. a git worktree of an older "
                         "commit), with the --launch-native flags, as the endpoint 'baseline'")
    ap.add_argument("--also-native", action="append", default=[], metavar="ARGS",
                    help="also start this project's server with these launcher flags instead (repeatable; endpoint "
                         "'native-2', 'native-3', ...), e.g. '--frontends 2' beside --launch-native ''")
    ap.add_argument("--launch-vllm", action="store_true", help="also start 'vllm serve' on the same model when vllm is installed")
    ap.add_argument("--model", default=None,
                    help="model folder, or builtin:tiny for a server on the built-in model (default: the built-in "
                         "model saved as a folder)")
    ap.add_argument("--concurrency", default="8", help="comma-separated closed-loop concurrencies")
    ap.add_argument("--request-rate", default=None, help="comma-separated Poisson rates (req/s); replaces --concurrency")
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=1,
                    help="measure each server this many times, alternating their order; report the medians")
    ap.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=True,
                    help="start each launched server only for its own measurement, so it has the machine to "
                         "itself (an idle server beside it was seen to cost the other up to a third here)")
    ap.add_argument("--slo-ttft-ms", type=float, default=1000)
    ap.add_argument("--slo-tpot-ms", type=float, default=100)
    ap.add_argument("--overhead", action="store_true", help="measure the framework's overhead (native server)")
    ap.add_argument("--client-procs", type=int, default=1,
                    help="client processes sharing the load (at GPU token rates one Python client, parsing every "
                         "streamed event, can be the bottleneck)")
    ap.add_argument("--name", default="serve")
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy; 1: sampled")
    ap.add_argument("--chat", action="store_true",
                    help="stream /v1/chat/completions (the prompt's token ids written out as the user's text) "
                         "instead of /v1/completions")
    ap.add_argument("--extra-body", default=None, metavar="JSON",
                    help='more fields for every request, e.g. \'{"guided_json": {...}}\' (a request that '
                         "completes its structured output ends early, ignore_eos or not)")
    args = ap.parse_args()
    SAMPLING["temperature"] = args.temperature
    if args.extra_body:
        EXTRA_BODY.update(json.loads(args.extra_body))
    CHAT["on"] = args.chat

    model = args.model
    if model is None:
        from dyn_actor.engine.builtin import save_builtin

        d = RESULTS / "checkpoints" / "builtin-tiny"
        if not (d / "config.json").is_file():
            save_builtin(d)
        model = str(d)
    if model.startswith("builtin:"):  # a server started on the built-in model (the README's command)
        from dyn_actor.engine.builtin import hf_config

        vocab = hf_config(model)["vocab_size"]
    else:
        vocab = json.loads((Path(model) / "config.json").read_text())["vocab_size"]
    running = dict(e.split("=", 1) for e in args.endpoint)  # servers started elsewhere
    launchers = {}  # name -> (command, env, port) of the servers this run starts
    if args.launch_native is not None:
        launchers["native"] = ([sys.executable, "-m", "launcher", "--model", model, "--port", "8300",
                                "--served-model-name", model, *args.launch_native.split()], None, 8300)
    for i, flags in enumerate(args.also_native, start=2):
        launchers[f"native-{i}"] = ([sys.executable, "-m", "launcher", "--model", model, "--port", str(8302 + i),
                                     "--served-model-name", model, *flags.split()], None, 8302 + i)
        print(f"native-{i}: {flags}")
    if args.baseline_tree:
        tree = str(Path(args.baseline_tree).resolve())
        launchers["baseline"] = ([sys.executable, "-m", "launcher", "--model", model, "--port", "8302",
                                  "--served-model-name", model, *(args.launch_native or "").split()],
                                 {**os.environ, "PYTHONPATH": tree}, 8302)
    if args.launch_vllm:
        if not vllm_available():
            print("vLLM is not installed here: skipping it (it is optional)")
        else:
            launchers["vllm"] = ([sys.executable, str(ROOT / "benchmarks" / "vllm_serve.py"), model, "--port", "8301",
                                  "--dtype", "float32", "--max-model-len", "4096"],
                                 {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2"}, 8301)
    if not running and not launchers:
        ap.error("give --endpoint or --launch-native")
    loads = [float(x) for x in (args.request_rate or args.concurrency).split(",")]
    # fresh prompts at each load (a prompt seen before would be a prefix-cache hit), the same for
    # every endpoint and round; the warm-up's own prompts are not measured
    prompt_sets = []
    for i in range(len(loads)):
        rng = random.Random(1000 * i)
        ps = [[0] + [rng.randrange(2, vocab) for _ in range(args.input_len - 1)]
              for _ in range(args.num_prompts + args.warmup)]
        prompt_sets.append((ps[: args.warmup], ps[args.warmup:]))
    names = [*running, *launchers]
    rows: list[dict] = []
    procs: list[subprocess.Popen] = []

    def measure(name: str, url: str, rnd: int) -> None:
        for load, (warm, prompts) in zip(loads, prompt_sets):
            asyncio.run(run_load(url, model, warm, args.output_len, args.warmup, None))
            results, dur = load_in_processes(
                url, model, prompts, args.output_len,
                None if args.request_rate else int(load), load if args.request_rate else None, args.client_procs)
            rows.append({"endpoint": name, "round": rnd, "load": load,
                         **summarize(results, dur, args.slo_ttft_ms / 1000, args.slo_tpot_ms / 1000)})
            print(f"round {rnd}: {name} @ {load:g}: {rows[-1]['output_tok_per_s']:.0f} output tok/s, "
                  f"TTFT p50 {rows[-1]['ttft_p50_ms']:.0f} ms", flush=True)

    try:
        if not args.isolate:  # every launched server up for the whole run, measured back to back
            for name, (cmd, env, port) in launchers.items():
                procs.append(p := subprocess.Popen(cmd, cwd=env["PYTHONPATH"] if name == "baseline" else ROOT,
                                                   start_new_session=True, env=env,
                                                   stdout=subprocess.DEVNULL,
                                                   stderr=subprocess.DEVNULL if name == "vllm" else None))
                wait_http(f"http://127.0.0.1:{port}", p)
                running[name] = f"http://127.0.0.1:{port}"
        for rnd in range(args.rounds):
            # alternate the order each round, so neither server is always measured first
            order = names if rnd % 2 == 0 else names[::-1]
            for name in order:
                if name in running:
                    measure(name, running[name], rnd)
                    continue
                cmd, env, port = launchers[name]  # --isolate: alone on the machine while measured
                cwd = env["PYTHONPATH"] if name == "baseline" else ROOT
                p = subprocess.Popen(cmd, cwd=cwd, start_new_session=True, env=env, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL if name == "vllm" else None)
                procs.append(p)
                try:
                    wait_http(f"http://127.0.0.1:{port}", p)
                    measure(name, f"http://127.0.0.1:{port}", rnd)
                finally:
                    stop(p)
        if args.rounds > 1:  # the median of each figure over the rounds
            print()
            print_table(rows, ["endpoint", "round", "load", "req_per_s", "output_tok_per_s", "ttft_p50_ms",
                               "itl_p50_ms"])
            runs = rows
            rows = []
            for name in names:
                for load in loads:
                    rs = [r for r in runs if r["endpoint"] == name and r["load"] == load]
                    rows.append({k: (statistics.median(r[k] for r in rs) if isinstance(v, (int, float)) else v)
                                 for k, v in rs[0].items() if k != "round"})
            rows_by_round = runs
        else:
            rows_by_round = rows
        cols = ["endpoint", "load", "failed", "req_per_s", "output_tok_per_s", "goodput_req_per_s", "ttft_p50_ms",
                "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms", "tpot_p50_ms", "e2e_p50_ms", "e2e_p99_ms"]
        print()
        print_table(rows, cols)
        ratios = []
        if len(names) >= 2:
            a, b = names[0], names[1]
            for load in loads:
                ra = next(r for r in rows if r["endpoint"] == a and r["load"] == load)
                rb = next(r for r in rows if r["endpoint"] == b and r["load"] == load)
                ratios.append({"load": load, "req_ratio": ra["req_per_s"] / rb["req_per_s"],
                               "throughput_ratio": ra["output_tok_per_s"] / rb["output_tok_per_s"],
                               "ttft_p50_ratio": ra["ttft_p50_ms"] / rb["ttft_p50_ms"],
                               "itl_p50_ratio": ra["itl_p50_ms"] / rb["itl_p50_ms"]})
            print(f"\n{a} / {b}")
            print_table(ratios, ["load", "req_ratio", "throughput_ratio", "ttft_p50_ratio", "itl_p50_ratio"])
        overhead = None
        if args.overhead and "native" in names:
            url = running.get("native")
            if url is None:  # isolated: start it once more for this
                cmd, env, port = launchers["native"]
                procs.append(p := subprocess.Popen(cmd, cwd=ROOT, start_new_session=True, env=env,
                                                   stdout=subprocess.DEVNULL))
                wait_http(url := f"http://127.0.0.1:{port}", p)
            overhead = asyncio.run(measure_overhead(url, model, vocab, args.input_len, 64))
            print("\nframework overhead (concurrency 1, native server):")
            print_table([overhead], list(overhead))
        out = write_json(f"{args.name}.json", {"args": vars(args), "rows": rows, "ratios": ratios,
                                                "rows_by_round": rows_by_round, "overhead": overhead})
        png = RESULTS / f"{args.name}.png"
        plot(rows, png)
        print(f"\nwrote {out} and {png}")
    finally:
        for p in procs:
            stop(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
