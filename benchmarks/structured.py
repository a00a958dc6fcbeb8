"""What structured outputs cost the native engine, in one run: decode steps of a batch whose
requests follow a grammar against the same batch sampling freely, and how long a grammar takes
to compile.

    python benchmarks/structured.py                       # built-in model (99 tokens) and a 32k-vocabulary one
    python benchmarks/structured.py --models 125m --batch 8,32 --tokens 48

For each model and batch size, three workloads run on the engine directly, one after the other,
each ``--tokens`` tokens a request with ``ignore_eos`` (so each takes the same number of decode
steps): ``free`` (no constraint, the control), ``regex`` (``[a-z ]{4000}``: never finishes within
the run, one character class, cheap masks) and ``json`` (an object schema with strings, numbers,
an enum and an array; requests that complete their object early end there, so ``ms/step`` is the
fair column). ``overhead`` is a workload's ms per decode step over ``free``'s. Compile times: the
first compile in a process (which imports xgrammar, and with it transformers), a new schema after
that, and the same schema again (xgrammar's cache). The 32k model is ``benchmarks/checkpoints.py``'s
random 125M Llama (12 layers of 768), whose vocabulary is the built-in one padded with synthetic
words. Writes JSON.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import print_table, write_json  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "score": {"type": "number"},
        "kind": {"enum": ["person", "robot", "other"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 4},
    },
    "required": ["name", "age", "score", "kind", "tags"],
    "additionalProperties": False,
}


def _engine(model: str):
    from dyn_actor.engine import EngineConfig, LLMEngine

    return LLMEngine(EngineConfig(model=model, num_kv_blocks=2048, max_model_len=1024, max_num_seqs=256))


def _run(engine, batch: int, tokens: int, spec) -> dict:
    from dyn_actor.engine import SamplingParams

    prompt = engine.tokenizer.encode("Describe one thing as JSON: ")
    for i in range(batch):
        engine.add_request(f"r{i}", prompt, SamplingParams(max_tokens=tokens, temperature=1.0, seed=i,
                                                           ignore_eos=True, structured=spec))
    # the first steps admit and prefill the batch; decode steps are timed from the first whole-batch one
    steps, out, t0 = 0, 0, None
    while engine.has_unfinished_requests():
        outs = engine.step()
        if t0 is None:
            if len(outs) == batch:
                t0 = time.perf_counter()
            continue
        steps += 1
        out += len(outs)
    dt = time.perf_counter() - t0
    return {"decode_steps": steps, "ms_per_step": 1000 * dt / max(1, steps), "out_tok_s": out / dt}


def _compile_times(engine) -> dict:
    from dyn_actor.protocol import StructuredOutput

    g = engine.grammars
    t = time.perf_counter()
    g.compile(StructuredOutput(regex="[a-z]")).result()
    first = time.perf_counter() - t
    t = time.perf_counter()
    g.compile(StructuredOutput(json=json.dumps(SCHEMA))).result()
    fresh = time.perf_counter() - t
    t = time.perf_counter()
    g.compile(StructuredOutput(json=json.dumps(SCHEMA))).result()
    cached = time.perf_counter() - t
    return {"first_compile_ms": 1000 * first, "schema_compile_ms": 1000 * fresh, "cached_compile_ms": 1000 * cached}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="builtin,125m")
    ap.add_argument("--batch", default="8,32")
    ap.add_argument("--tokens", type=int, default=48)
    args = ap.parse_args()

    from benchmarks.checkpoints import write_random_llama
    from dyn_actor.protocol import StructuredOutput

    specs = {"free": None, "regex": StructuredOutput(regex="[a-z ]{4000}"),
             "json": StructuredOutput(json=json.dumps(SCHEMA))}
    rows = []
    compiles = {}
    tmp = tempfile.mkdtemp(prefix="dyn-actor-structured-")
    try:
        for name in args.models.split(","):
            model = "builtin:tiny" if name == "builtin" else str(write_random_llama(Path(tmp) / name))
            engine = _engine(model)
            vocab = engine.model_config.vocab_size
            compiles[name] = {"vocab": vocab, **_compile_times(engine)}
            for batch in (int(b) for b in args.batch.split(",")):
                base = None
                for kind, spec in specs.items():
                    r = _run(engine, batch, args.tokens, spec)
                    base = base or r["ms_per_step"]
                    rows.append({"model": name, "vocab": vocab, "batch": batch, "workload": kind, **r,
                                 "overhead": r["ms_per_step"] / base})
                    print(f"{name} batch {batch} {kind}: {r['ms_per_step']:.2f} ms/step", flush=True)
            engine.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # the 125M checkpoint is half a gigabyte
    print()
    print_table([{**r, "ms_per_step": f"{r['ms_per_step']:.2f}", "out_tok_s": f"{r['out_tok_s']:,.0f}",
                  "overhead": f"{r['overhead']:.2f}x"} for r in rows],
                ["model", "vocab", "batch", "workload", "decode_steps", "ms_per_step", "out_tok_s", "overhead"])
    print()
    print_table([{"model": k, **{c: f"{v:,.1f}" if isinstance(v, float) else v for c, v in d.items()}}
                 for k, d in compiles.items()],
                ["model", "vocab", "first_compile_ms", "schema_compile_ms", "cached_compile_ms"])
    path = write_json("structured.json", {"rows": rows, "compile": compiles, "tokens": args.tokens})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
