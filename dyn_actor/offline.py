"""Offline generation from the command line: ``python -m dyn_actor.offline``.

Runs a few prompts through the native engine on the built-in model (or
``--model DIR``) and prints the completions and the throughput.
"""

from __future__ import annotations

import argparse
import sys
import time

DEFAULT_PROMPTS = [
    "The quick brown fox",
    "Once upon a time, in a land far away,",
    "def fibonacci(n):",
    "Paged attention keeps the KV cache in fixed-size blocks so that",
]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dyn_actor.offline", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="builtin:tiny", help="builtin:tiny or a local Hugging Face folder")
    ap.add_argument("--prompt", action="append", help="a prompt (repeatable); default: a few samples")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    args = ap.parse_args(argv)

    from dyn_actor.engine.llm import LLM
    from dyn_actor.engine.model_config import ModelLoadError
    from dyn_actor.engine.sampling import SamplingParams

    t0 = time.perf_counter()
    try:
        llm = LLM(args.model, dtype=args.dtype)
    except ModelLoadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t1 = time.perf_counter()
    try:
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed).validate()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    outs = llm.generate(args.prompt or DEFAULT_PROMPTS, params)
    t2 = time.perf_counter()
    n_out = sum(len(o.output.token_ids) for o in outs)
    for o in outs:
        print(f"--- {o.prompt!r}\n{o.output.text!r}  [{o.output.finish_reason}]")
    print(f"model {llm.engine.model_name}: loaded in {t1 - t0:.2f}s; {len(outs)} prompts, "
          f"{n_out} tokens in {t2 - t1:.2f}s ({n_out / (t2 - t1):.0f} tok/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
