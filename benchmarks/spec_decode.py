"""Speculative decoding with n-gram drafts: the native engine with and without drafts, and vLLM
with and without its ``ngram`` method (same config), on the same checkpoint, prompts and batch.

    python benchmarks/spec_decode.py                                    # 125m, batches 1 and 16, greedy and sampled
    python benchmarks/spec_decode.py --models tiny --batches 1 --no-vllm
    python benchmarks/spec_decode.py --device cuda --models 1b --dtype bfloat16 --no-vllm

Each run is a fresh process: a warm-up, then ``batch`` prompts of ``--prompt-len`` random tokens
generating ``--max-tokens`` each (``ignore_eos``), timed whole. Reported: output tok/s, the
speed-up of drafts over none within the engine, the share of draft tokens kept, the tokens a
drafted request got per step, and (greedy) whether the tokens equal those without drafts.

What the workload is: random-weight checkpoints (nothing is downloaded). Under greedy decoding
such a model soon repeats itself, so n-gram drafts are mostly kept: the case of outputs that copy
their input (editing, extraction, code). Sampled at temperature 1 over a 32k vocabulary it hardly
repeats: few drafts are found and most are refused, the case where drafting only costs. Real
models lie in between, by task; the speed-up at a given share kept is what this measures.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (  # noqa: E402
    patch_vllm_version,
    print_table,
    pyplot,
    run_isolated,
    vllm_available,
    write_json,
)
from benchmarks.engine_throughput import make_prompts, prepare_models  # noqa: E402

patch_vllm_version()  # vLLM's spawned processes re-import this module


def _spec(k: int, lo: int, hi: int) -> dict:
    return {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_min": lo, "prompt_lookup_max": hi}


def run_native(model: str, vocab: int, batch: int, prompt_len: int, max_tokens: int, temperature: float,
               spec: dict | None, dtype: str, device: str) -> dict:
    from dyn_actor.engine import EngineConfig, LLMEngine
    from dyn_actor.engine.sampling import SamplingParams
    from dyn_actor.engine.spec_decode import SpeculativeConfig

    engine = LLMEngine(EngineConfig(model=model, dtype=dtype, device=device, max_model_len=4096,
                                    kv_cache_memory=None if device == "cuda" else 2 << 30,
                                    speculative=SpeculativeConfig.parse(spec)))
    ids = iter(range(1 << 62))

    def generate(prompts, n_out, seed0=0):
        out: dict[str, list[int]] = {}
        for i, p in enumerate(prompts):
            rid = f"r{next(ids)}"
            out[rid] = []
            sp = SamplingParams(max_tokens=n_out, temperature=temperature, ignore_eos=True,
                                seed=None if temperature == 0 else seed0 + i)
            engine.add_request(rid, p, sp)
        steps = 0
        while engine.has_unfinished_requests():
            for o in engine.step():
                out[o.request_id] += o.new_token_ids
            steps += 1
        return list(out.values()), steps

    generate(make_prompts(2, 64, vocab, 99), 16)  # warm-up
    before = engine.stats()
    t0 = time.perf_counter()
    tokens, steps = generate(make_prompts(batch, prompt_len, vocab, 7), max_tokens)
    wall = time.perf_counter() - t0
    s = engine.stats()
    drafts = s.spec_drafts - before.spec_drafts
    draft_tokens = s.spec_draft_tokens - before.spec_draft_tokens
    accepted = s.spec_accepted_tokens - before.spec_accepted_tokens
    return {"output_tok_s": sum(map(len, tokens)) / wall, "wall_s": wall, "steps": steps,
            "kept": accepted / draft_tokens if draft_tokens else float("nan"),
            "drafted_tokens_per_step": (accepted + drafts) / drafts if drafts else float("nan"),
            "draft_tokens": draft_tokens, "tokens": tokens}


def run_step_cost(model: str, vocab: int, batch: int, prompt_len: int, k: int, dtype: str, device: str,
                  steps: int = 24) -> dict:
    """What a step costs when every request checks ``k`` draft tokens against a plain decode step,
    at the same batch and context: the drafts are forced (each request's last token repeated, nearly
    always refused), so the figure is the rows' cost alone. Tokens a step over this ratio is the
    speed-up a kept share gives."""
    from dyn_actor.engine import EngineConfig, LLMEngine
    from dyn_actor.engine.sampling import SamplingParams
    from dyn_actor.engine.spec_decode import SpeculativeConfig

    out = {}
    for mode in ("plain", "drafted", "plain"):  # plain twice, around the drafted run
        spec = SpeculativeConfig(k, 1, 1) if mode == "drafted" else None
        engine = LLMEngine(EngineConfig(model=model, dtype=dtype, device=device, max_model_len=4096,
                                        kv_cache_memory=None if device == "cuda" else 2 << 30, speculative=spec))
        if spec is not None:
            engine._proposer.propose = lambda tokens, n, buf: [tokens[-1]] * n
        sp = SamplingParams(max_tokens=steps + 8, temperature=0, ignore_eos=True)
        for i, p in enumerate(make_prompts(batch, prompt_len, vocab, 5)):
            engine.add_request(f"r{i}", p, sp)
        for _ in range(4):  # prefill and a few steps of warm-up
            engine.step()
        t0 = time.perf_counter()
        for _ in range(steps):
            engine.step()
        if device == "cuda":
            import torch

            torch.cuda.synchronize()
        ms = 1000 * (time.perf_counter() - t0) / steps
        out.setdefault(mode, []).append(ms)
    plain = statistics.mean(out["plain"])
    return {"plain_step_ms": plain, "drafted_step_ms": out["drafted"][0], "cost_ratio": out["drafted"][0] / plain}


def run_vllm(model: str, vocab: int, batch: int, prompt_len: int, max_tokens: int, temperature: float,
             spec: dict | None, dtype: str, device: str) -> dict:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    patch_vllm_version()
    from vllm import LLM, SamplingParams

    kw = {"speculative_config": spec} if spec else {}
    llm = LLM(model=model, dtype=dtype, max_model_len=4096, seed=0, disable_log_stats=False, **kw)

    def generate(prompts, n_out, seed0=0):
        sps = [SamplingParams(max_tokens=n_out, temperature=temperature, ignore_eos=True,
                              seed=None if temperature == 0 else seed0 + i) for i in range(len(prompts))]
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sps, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]

    def counters() -> dict[str, float]:
        try:
            return {m.name: getattr(m, "value", 0) for m in llm.get_metrics() if "spec_decode" in m.name}
        except Exception:  # noqa: BLE001 - an older vLLM without get_metrics: no acceptance figures
            return {}

    generate(make_prompts(2, 64, vocab, 99), 16)
    before = counters()
    t0 = time.perf_counter()
    tokens = generate(make_prompts(batch, prompt_len, vocab, 7), max_tokens)
    wall = time.perf_counter() - t0
    after = counters()

    def delta(name: str) -> float:
        return after.get(name, 0) - before.get(name, 0)

    draft_tokens = delta("vllm:spec_decode_num_draft_tokens")
    drafts = delta("vllm:spec_decode_num_drafts")
    accepted = delta("vllm:spec_decode_num_accepted_tokens")
    import importlib.metadata

    return {"output_tok_s": sum(map(len, tokens)) / wall, "wall_s": wall, "steps": float("nan"),
            "kept": accepted / draft_tokens if draft_tokens else float("nan"),
            "drafted_tokens_per_step": (accepted + drafts) / drafts if drafts else float("nan"),
            "draft_tokens": draft_tokens, "tokens": tokens, "version": importlib.metadata.version("vllm")}


def plot(rows: list[dict], path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    keys = sorted({(r["model"], r["batch"], r["temperature"]) for r in rows})
    engines = sorted({r["engine"] for r in rows})
    fig, ax = plt.subplots(figsize=(10, 4))
    width = 0.8 / max(1, len(engines))
    for j, eng in enumerate(engines):
        vals = [next((r["speedup"] for r in rows if (r["model"], r["batch"], r["temperature"]) == k
                      and r["engine"] == eng and r["drafts"] == "ngram"), 0) for k in keys]
        ax.bar([i + j * width for i in range(len(keys))], vals, width, label=eng)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xticks([i + width * (len(engines) - 1) / 2 for i in range(len(keys))])
    ax.set_xticklabels([f"{m}\nbatch {b}, T={t:g}" for m, b, t in keys])
    ax.set_ylabel("output tok/s, drafts / none")
    ax.set_title("n-gram speculative decoding: speed-up within each engine")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="125m")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--temperatures", default="0,1")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    ap.add_argument("--lookup", default="2,4", help="prompt_lookup_min,prompt_lookup_max")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--no-vllm", action="store_true")
    ap.add_argument("--cost-only", action="store_true", help="only the step-cost table (native engine)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating none / ngram runs per configuration")
    ap.add_argument("--out", default="spec_decode.json")
    args = ap.parse_args()
    lo, hi = map(int, args.lookup.split(","))
    spec = _spec(args.k, lo, hi)
    models = prepare_models(args.models.split(","))
    engines = [("native", run_native)]
    if not args.no_vllm and vllm_available():
        engines.append(("vllm", run_vllm))
    elif not args.no_vllm:
        print("vLLM: not installed here, so only the native engine runs")
    costs = []
    for mname, (path, vocab) in models.items():
        for batch in map(int, args.batches.split(",")):
            print(f"step cost on {mname}, batch {batch} ...", flush=True)
            res = run_isolated(run_step_cost, path, vocab, batch, args.prompt_len, args.k, args.dtype, args.device)
            costs.append({"model": mname, "batch": batch, "k": args.k, **res})
    rows = []
    for mname, (path, vocab) in ([] if args.cost_only else models.items()):
        for batch in map(int, args.batches.split(",")):
            for temp in map(float, args.temperatures.split(",")):
                for ename, fn in engines:
                    # rounds alternate none / ngram, so that a slow spell of a shared machine falls on both;
                    # the speed-up is the median of each round's ratio
                    runs: dict[str, list[dict]] = {"none": [], "ngram": []}
                    for rnd in range(args.rounds):
                        for drafts in ("none", "ngram"):
                            print(f"running {ename} ({drafts}) on {mname}, batch {batch}, T={temp:g}, "
                                  f"round {rnd + 1} ...", flush=True)
                            res = run_isolated(fn, path, vocab, batch, args.prompt_len, args.max_tokens, temp,
                                               spec if drafts == "ngram" else None, args.dtype, args.device)
                            runs[drafts].append(res)
                            print(f"  {res['output_tok_s']:,.0f} output tok/s, kept {res['kept']:.2f}", flush=True)
                    ratios = [b["output_tok_s"] / a["output_tok_s"] for a, b in zip(runs["none"], runs["ngram"])]
                    for drafts, results in runs.items():
                        tok_s = [r["output_tok_s"] for r in results]
                        last = results[-1]
                        same = ""
                        if drafts == "ngram":
                            same = str(all(r["tokens"] == runs["none"][0]["tokens"] for r in results)) \
                                if temp == 0 else "(sampled)"
                        rows.append({
                            "model": mname, "batch": batch, "temperature": temp, "engine": ename, "drafts": drafts,
                            "output_tok_s": statistics.median(tok_s), "output_tok_s_rounds": tok_s,
                            "speedup": statistics.median(ratios) if drafts == "ngram" else 1.0,
                            "speedup_rounds": "/".join(f"{x:.2f}" for x in ratios) if drafts == "ngram" else "",
                            **{k: last[k] for k in ("kept", "drafted_tokens_per_step", "steps", "draft_tokens")},
                            **({"version": last["version"]} if "version" in last else {}),
                            "same_tokens": same})
    cols = ["model", "batch", "temperature", "engine", "drafts", "output_tok_s", "speedup", "speedup_rounds", "kept",
            "drafted_tokens_per_step", "steps", "same_tokens"]
    print(f"\nn-gram drafts: {spec}; {args.prompt_len}-token prompts, {args.max_tokens} tokens out, "
          f"{args.dtype} on {args.device}")
    if rows:
        print_table(rows, cols)
    print(f"\nwhat a step costs when every request checks {args.k} draft tokens, against a plain decode step")
    print_table(costs, ["model", "batch", "k", "plain_step_ms", "drafted_step_ms", "cost_ratio"])
    out = write_json(args.out, {"config": vars(args), "spec": spec, "rows": rows, "step_cost": costs})
    plot(rows, out.with_suffix(".png"))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
