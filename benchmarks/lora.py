"""LoRA adapters: what serving requests through adapters costs against the base model alone, in the
native engine and in vLLM (its ``enable_lora`` with LoRARequests), same checkpoint, adapters, prompts
and batch.

    python benchmarks/lora.py                                   # 125m, batches 1 and 16, rank 16
    python benchmarks/lora.py --models tiny --batches 1,16,64 --no-vllm
    python benchmarks/lora.py --device cuda --models 1b --dtype bfloat16 --no-vllm

Each run is a fresh process: a warm-up, then ``batch`` prompts of ``--prompt-len`` random tokens
generating ``--max-tokens`` each (greedy, ``ignore_eos``), timed whole. Four cases per engine:

- ``base``: no adapter loaded (the plain engine);
- ``loaded``: ``--adapters`` adapters loaded, every request on the base model (what having them costs);
- ``one``: every request through adapter 0;
- ``mixed``: the requests spread round-robin over every adapter and the base model (one step holds all).

Reported: output tok/s and its ratio to ``base`` within the engine (the median over ``--rounds``
rounds, each running the four cases in turn, so that a slow spell of a shared machine falls on all),
and whether the ``one`` case's tokens equal those of the checkpoint with that adapter merged into
its weights (native engine; checked once, outside the timing).
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
    RESULTS,
    patch_vllm_version,
    print_table,
    pyplot,
    run_isolated,
    vllm_available,
    write_json,
)
from benchmarks.engine_throughput import make_prompts, prepare_models  # noqa: E402

patch_vllm_version()  # vLLM's spawned processes re-import this module

CASES = ("base", "loaded", "one", "mixed")


def _assignments(case: str, batch: int, names: list[str]) -> list[str | None]:
    if case in ("base", "loaded"):
        return [None] * batch
    if case == "one":
        return [names[0]] * batch
    choices = [*names, None]
    return [choices[i % len(choices)] for i in range(batch)]


def run_native(model: str, vocab: int, adapters: dict[str, str], case: str, batch: int, prompt_len: int,
               max_tokens: int, dtype: str, device: str) -> dict:
    from dyn_actor.engine import EngineConfig, LLMEngine
    from dyn_actor.engine.sampling import SamplingParams

    engine = LLMEngine(EngineConfig(model=model, dtype=dtype, device=device, max_model_len=4096,
                                    kv_cache_memory=None if device == "cuda" else 2 << 30,
                                    lora_modules=None if case == "base" else adapters, max_lora_rank=64))
    ids = iter(range(1 << 62))
    names = list(adapters)

    def generate(prompts, n_out, loras):
        out: dict[str, list[int]] = {}
        for p, lora in zip(prompts, loras):
            rid = f"r{next(ids)}"
            out[rid] = []
            engine.add_request(rid, p, SamplingParams(max_tokens=n_out, temperature=0, ignore_eos=True),
                               lora_name=lora)
        while engine.has_unfinished_requests():
            for o in engine.step():
                out[o.request_id] += o.new_token_ids
        return list(out.values())

    generate(make_prompts(2, 64, vocab, 99), 16, _assignments(case, 2, names))  # warm-up
    loras = _assignments(case, batch, names)
    t0 = time.perf_counter()
    tokens = generate(make_prompts(batch, prompt_len, vocab, 7), max_tokens, loras)
    wall = time.perf_counter() - t0
    return {"output_tok_s": sum(map(len, tokens)) / wall, "wall_s": wall, "tokens": tokens}


def run_vllm(model: str, vocab: int, adapters: dict[str, str], case: str, batch: int, prompt_len: int,
             max_tokens: int, dtype: str, device: str) -> dict:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    patch_vllm_version()
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    kw = {} if case == "base" else {"enable_lora": True, "max_loras": len(adapters), "max_cpu_loras": len(adapters),
                                    "max_lora_rank": 64}
    llm = LLM(model=model, dtype=dtype, max_model_len=4096, seed=0, **kw)
    requests = {n: LoRARequest(n, i + 1, p) for i, (n, p) in enumerate(adapters.items())}
    names = list(adapters)

    def generate(prompts, n_out, loras):
        sp = SamplingParams(max_tokens=n_out, temperature=0, ignore_eos=True)
        lr = [None if n is None else requests[n] for n in loras]
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False,
                            lora_request=lr if any(lr) else None)
        return [list(o.outputs[0].token_ids) for o in outs]

    generate(make_prompts(2, 64, vocab, 99), 16, _assignments(case, 2, names))
    loras = _assignments(case, batch, names)
    t0 = time.perf_counter()
    tokens = generate(make_prompts(batch, prompt_len, vocab, 7), max_tokens, loras)
    wall = time.perf_counter() - t0
    import importlib.metadata

    return {"output_tok_s": sum(map(len, tokens)) / wall, "wall_s": wall, "tokens": tokens,
            "version": importlib.metadata.version("vllm")}


def merged_tokens(model: str, adapter: str, vocab: int, batch: int, prompt_len: int, max_tokens: int,
                  dtype: str, device: str) -> list[list[int]]:
    """The ``one`` case's reference: the adapter merged into the weights (W + scale B A), served plainly."""
    import json

    from safetensors.torch import load_file

    from dyn_actor.engine import EngineConfig, LLMEngine
    from dyn_actor.engine.loader import load_model
    from dyn_actor.engine.sampling import SamplingParams

    loaded = load_model(model)
    acfg = json.loads((Path(adapter) / "adapter_config.json").read_text())
    scale = acfg["lora_alpha"] / acfg["r"]
    lw = load_file(str(Path(adapter) / "adapter_model.safetensors"))
    w = dict(loaded.weights)
    for key, a in lw.items():
        if ".lora_A." in key:
            target = key.replace("base_model.model.", "").replace(".lora_A.weight", ".weight")
            b = lw[key.replace(".lora_A.", ".lora_B.")]
            w[target] = (w[target].float() + scale * b.float() @ a.float()).to(w[target].dtype)
    loaded.weights = w
    engine = LLMEngine(EngineConfig(model=model, dtype=dtype, device=device, max_model_len=4096,
                                    kv_cache_memory=None if device == "cuda" else 2 << 30), loaded=loaded)
    for i, p in enumerate(make_prompts(batch, prompt_len, vocab, 7)):
        engine.add_request(f"m{i}", p, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))
    out: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            out.setdefault(o.request_id, []).extend(o.new_token_ids)
    return [out[f"m{i}"] for i in range(batch)]


def plot(rows: list[dict], path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    keys = sorted({(r["model"], r["batch"]) for r in rows})
    series = [(e, c) for e in sorted({r["engine"] for r in rows}) for c in CASES[1:]]
    fig, ax = plt.subplots(figsize=(10, 4))
    width = 0.8 / max(1, len(series))
    for j, (eng, case) in enumerate(series):
        vals = [next((r["vs_base"] for r in rows if (r["model"], r["batch"]) == k and r["engine"] == eng
                      and r["case"] == case), 0) for k in keys]
        ax.bar([i + j * width for i in range(len(keys))], vals, width, label=f"{eng} {case}")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xticks([i + width * (len(series) - 1) / 2 for i in range(len(keys))])
    ax.set_xticklabels([f"{m}\nbatch {b}" for m, b in keys])
    ax.set_ylabel("output tok/s / base model's")
    ax.set_title("LoRA: throughput through adapters, within each engine")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="125m")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--adapters", type=int, default=4, help="adapters loaded (the mixed case uses them all)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--no-vllm", action="store_true")
    ap.add_argument("--engines", default="native,vllm", help="which engines run (vllm where installed)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default="lora.json")
    args = ap.parse_args()
    from benchmarks.checkpoints import write_random_lora

    models = prepare_models(args.models.split(","))
    wanted = args.engines.split(",")
    engines = [("native", run_native)] if "native" in wanted else []
    if "vllm" in wanted and not args.no_vllm and vllm_available():
        engines.append(("vllm", run_vllm))
    elif "vllm" in wanted and not args.no_vllm:
        print("vLLM: not installed here, so only the native engine runs")
    rows = []
    for mname, (path, vocab) in models.items():
        adapters = {f"lora{i}": str(write_random_lora(path, RESULTS / "checkpoints" / f"{mname}-lora{i}-r{args.rank}",
                                                      args.rank, seed=i)) for i in range(args.adapters)}
        for batch in map(int, args.batches.split(",")):
            merged = run_isolated(merged_tokens, path, adapters["lora0"], vocab, batch, args.prompt_len,
                                  args.max_tokens, args.dtype, args.device) if any(
                                      e == "native" for e, _ in engines) else None
            for ename, fn in engines:
                runs: dict[str, list[dict]] = {c: [] for c in CASES}
                for rnd in range(args.rounds):
                    for case in CASES:
                        print(f"running {ename} ({case}) on {mname}, batch {batch}, round {rnd + 1} ...", flush=True)
                        res = run_isolated(fn, path, vocab, adapters, case, batch, args.prompt_len, args.max_tokens,
                                           args.dtype, args.device)
                        runs[case].append(res)
                        print(f"  {res['output_tok_s']:,.0f} output tok/s", flush=True)
                for case in CASES:
                    ratios = [r["output_tok_s"] / b["output_tok_s"] for r, b in zip(runs[case], runs["base"])]
                    tok_s = [r["output_tok_s"] for r in runs[case]]
                    rows.append({
                        "model": mname, "batch": batch, "engine": ename, "case": case, "rank": args.rank,
                        "adapters": 0 if case == "base" else args.adapters,
                        "output_tok_s": statistics.median(tok_s), "runs_tok_s": tok_s,
                        "vs_base": statistics.median(ratios),
                        "equals_merged": str(all(r["tokens"] == merged for r in runs[case]))
                        if case == "one" and merged is not None else "",
                        "version": runs[case][-1].get("version", "")})
    print(f"LoRA rank {args.rank}, {args.prompt_len} in / {args.max_tokens} out, greedy ({args.dtype}, "
          f"{args.device}); vs_base: the median of {args.rounds} rounds' ratios")
    print_table(rows, ["model", "batch", "engine", "case", "adapters", "output_tok_s", "vs_base", "equals_merged"])
    out = write_json(args.out, {"args": vars(args), "rows": rows})
    plot(rows, out.with_suffix(".png"))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
