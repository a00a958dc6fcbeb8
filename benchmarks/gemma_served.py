"""Gemma 3 (a small random text model with sliding-window layers) served, measured as users measure:
``vllm bench serve`` against this project's server and (with ``--vllm``) against ``vllm serve``, both
with their default flags, on ``benchmarks.checkpoints.GEMMA3_SMALL`` (8 layers of 512, 8 heads of 64
over 4 KV heads, six layers over a sliding window of 64 tokens and two global; tied 32k vocabulary;
bfloat16). With ``--windows``, offline instead: the engine's decode step at long contexts with the
checkpoint's windows against the same weights with every layer global.

    python benchmarks/gemma_served.py --vllm              # concurrency 1 and 16, greedy and sampled
    python benchmarks/gemma_served.py --windows --contexts 512,2048,8000

Needs the ``[vllm]`` extra for the served part. Writes ``results/gemma_served.json`` (or
``results/gemma_windows.json``).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import RESULTS, print_table, write_json  # noqa: E402
from benchmarks.lora_served import add_sweep_args, served_sweep  # noqa: E402


def _all_global(model: Path) -> Path:
    """A folder beside ``model`` with the same weights and every layer global (no window)."""
    d = model.with_name(model.name + "-global")
    d.mkdir(exist_ok=True)
    for f in model.iterdir():
        if f.name != "config.json" and not (d / f.name).exists():
            (d / f.name).symlink_to(f.resolve())
    cfg = json.loads((model / "config.json").read_text())
    cfg["layer_types"] = ["full_attention"] * cfg["num_hidden_layers"]
    (d / "config.json").write_text(json.dumps(cfg, indent=2))
    return d


def _decode_ms(model: Path, context: int, batch: int, steps: int, dtype: str) -> tuple[float, list[list[int]]]:
    """Median ms of a decode step of ``batch`` sequences ``context`` tokens long (after their prefill),
    and the greedy tokens of those steps."""
    from dyn_actor.engine import EngineConfig, LLMEngine, SamplingParams

    eng = LLMEngine(EngineConfig(model=str(model), dtype=dtype, max_model_len=context + steps + 8,
                                 kv_cache_memory=2 << 30))
    rng = random.Random(context)
    params = SamplingParams(max_tokens=steps + 2, temperature=0, ignore_eos=True)
    for b in range(batch):
        eng.add_request(str(b), [0] + [rng.randrange(2, 32000) for _ in range(context - 1)], params)
    tokens: dict[str, list[int]] = {str(b): [] for b in range(batch)}
    times = []
    while eng.has_unfinished_requests():
        decoding = all(tokens[k] for k in tokens)
        t0 = time.perf_counter()
        outs = eng.step()
        if decoding:
            times.append(time.perf_counter() - t0)
        for o in outs:
            tokens[o.request_id] += o.new_token_ids
    times.sort()
    return 1000 * times[len(times) // 2], [tokens[str(b)] for b in range(batch)]


def windows(args: argparse.Namespace, model: Path) -> int:
    full = _all_global(model)
    rows = []
    for ctx in map(int, args.contexts.split(",")):
        ms_w, tok_w = _decode_ms(model, ctx, args.batch, args.steps, args.dtype)
        ms_f, tok_f = _decode_ms(full, ctx, args.batch, args.steps, args.dtype)
        same = sum(a == b for x, y in zip(tok_w, tok_f) for a, b in zip(x, y)) / sum(map(len, tok_w))
        rows.append({"context": ctx, "batch": args.batch, "windowed_ms": round(ms_w, 2), "all_global_ms": round(ms_f, 2),
                     "ratio": round(ms_w / ms_f, 3), "same_tokens": round(same, 2)})
        print(rows[-1], flush=True)
    print_table(rows, ["context", "batch", "windowed_ms", "all_global_ms", "ratio", "same_tokens"])
    out = write_json("gemma_windows.json", {"args": vars(args), "rows": rows})
    print(f"wrote {out}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_sweep_args(ap, rounds=1)
    ap.add_argument("--vllm", action="store_true", help="also vllm serve (default flags)")
    ap.add_argument("--windows", action="store_true", help="offline: decode steps with and without the windows")
    ap.add_argument("--contexts", default="512,2048,8000")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--out", default="gemma_served.json")
    args = ap.parse_args()
    from benchmarks.checkpoints import GEMMA3_SMALL, write_random_gemma3

    model = write_random_gemma3(RESULTS / "checkpoints" / "gemma3-small-random")
    if args.windows:
        return windows(args, model)
    rows = served_sweep(str(model), args, 8330)
    out = write_json(args.out, {"args": vars(args), "model": GEMMA3_SMALL, "host": "see docs/benchmarks.md",
                                "rows": rows})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
