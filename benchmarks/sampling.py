"""One step's sampling: the engine's sampler against the exponential race it replaced, in one run.

    python benchmarks/sampling.py                          # 64 rows, vocabularies of 32k and 128k
    python benchmarks/sampling.py --rows 8,64 --vocab 32000 --device cuda

For each case (greedy; temperature 1; temperature 1 with top-p 0.9; temperature 1 with a seed per
row) both samplers draw from the same random logits, alternating call by call; the table gives
the median milliseconds of each and their ratio. ``race`` is the sampler as ``dyn_actor`` had it up
to f01c895: top-p by sorting each row whole, softmax, then ``argmax(p / E)`` with one ``E ~ Exp(1)``
for every vocabulary entry (a seeded row's drawn on the CPU from its own generator, then copied
over); ``engine`` is ``dyn_actor.engine.sampling.sample``, which finds top-p among each row's
largest logits and inverts each row's cumulative distribution at one uniform number. Greedy rows
take the same path in both (the row is the control). ``--scale 8`` makes the logits peaked, so the
top-p nucleus is narrow, as with a trained model; with plain random logits it is thousands of
tokens wide and the whole row decides. On a GPU the engine finds those rows' thresholds with a
Triton kernel (``triton_sampling``, nothing read back); the ``top-p 0.9`` case there also times the
engine with sorting instead (``sort_ms``: it first reads back which rows need it). Writes JSON.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import print_table, write_json  # noqa: E402

CASES = {
    "greedy": dict(temperature=0.0),
    "temperature 1": dict(temperature=1.0),
    "top-p 0.9": dict(temperature=1.0, top_p=0.9),
    "seeded": dict(temperature=1.0),
}


def race_sample(logits, params, generators):
    """The exponential race (the engine's draw before f01c895), for the comparison."""
    import torch

    from dyn_actor.engine.sampling import sort_top_k_top_p

    if all(p.greedy for p in params):
        return logits.argmax(dim=-1).tolist()
    dev = logits.device
    temps = torch.tensor([p.temperature for p in params], dtype=torch.float32, device=dev)
    x = logits / temps.unsqueeze(1)
    top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32, device=dev)
    x = sort_top_k_top_p(x, None, top_p if any(p.top_p < 1.0 for p in params) else None)
    probs = x.softmax(dim=-1)
    noise = torch.empty_like(probs).exponential_()
    for i, g in enumerate(generators):
        if g is not None:
            row = torch.empty(probs.shape[1], dtype=probs.dtype).exponential_(generator=g)
            noise[i] = row if dev.type == "cpu" else row.to(dev, non_blocking=True)
    return (probs / noise).argmax(dim=-1).tolist()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="64", help="comma-separated batch sizes")
    ap.add_argument("--vocab", default="32000,128256", help="comma-separated vocabulary sizes")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch threads on the CPU (a decode worker's: 1)")
    ap.add_argument("--calls", type=int, default=15, help="timed calls per sampler and case")
    ap.add_argument("--scale", type=float, default=3.0,
                    help="logits ~ N(0, scale^2): 3 gives a top-p 0.9 nucleus of thousands of tokens in a 32k "
                         "vocabulary (every row sorted whole), 8 one of tens (as a trained model's)")
    args = ap.parse_args()

    import torch

    from dyn_actor.engine import sampling
    from dyn_actor.engine.sampling import make_generator, sample
    from dyn_actor.native_ops import keep_freed_heap
    from dyn_actor.protocol import SamplingParams

    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    if dev.type == "cpu":
        keep_freed_heap()  # as the engine has it on the CPU

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    rows = []
    for n in (int(r) for r in args.rows.split(",")):
        for vocab in (int(v) for v in args.vocab.split(",")):
            logits = torch.randn(n, vocab, device=dev) * args.scale
            for case, kw in CASES.items():
                params = [SamplingParams(**kw, seed=i if case == "seeded" else None) for i in range(n)]

                def run(fn, logits=logits, params=params) -> float:
                    gens = [make_generator(p.seed) for p in params]
                    x = logits.clone()
                    sync()
                    t0 = time.perf_counter()
                    fn(x, params, gens)
                    sync()
                    return time.perf_counter() - t0

                samplers = {"engine": lambda x, p, g: sample(x, p, g).token_ids, "race": race_sample}
                if dev.type == "cuda" and kw.get("top_p", 1.0) < 1.0:
                    def sort_sample(x, p, g):
                        sampling.DEVICE_WIDE_TOP_P = False
                        try:
                            return sample(x, p, g).token_ids
                        finally:
                            sampling.DEVICE_WIDE_TOP_P = None
                    samplers["sort"] = sort_sample
                times: dict[str, list[float]] = {k: [] for k in samplers}
                for i in range(2 + args.calls):
                    for name in (list(samplers) if i % 2 == 0 else list(samplers)[::-1]):
                        t = run(samplers[name])
                        if i >= 2:
                            times[name].append(t)
                eng, race = (statistics.median(times[k]) * 1e3 for k in ("engine", "race"))
                rows.append({"rows": n, "vocab": vocab, "case": case, "engine_ms": eng, "race_ms": race,
                             "engine/race": eng / race,
                             "sort_ms": statistics.median(times["sort"]) * 1e3 if "sort" in times else None})
                print_table(rows[-1:], list(rows[-1]))
    print()
    print(f"one step's sampling on {args.device} ({args.threads} thread(s) on the CPU), logits N(0, {args.scale:g}^2), "
          f"median of {args.calls} calls")
    print_table(rows, list(rows[0]))
    out = write_json(f"sampling_{dev.type}_scale{args.scale:g}.json", {"args": vars(args), "rows": rows})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
