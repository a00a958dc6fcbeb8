"""The host's share of a decode step: what the engine does around the forward pass, per phase.

    python benchmarks/decode_host.py                  # batches of 8, 64 and 256, greedy and sampled
    python benchmarks/decode_host.py --batch 64 --steps 400

On a GPU a decode step of a 1B model is ~1.6 ms of device time replayed from a CUDA graph; what the
host does before and after the replay (schedule, write the step's inputs, sample, account for the
new tokens) leaves the device idle unless it is overlapped (docs/gpu-runs: ~0.9 ms of a 2.5-ms
step on an H100). This measures that host work on this machine with the forward pass replaced by a
stand-in that returns logits at once, through the same path the graphs use (``cuda_graphs="on"``
on the CPU: bucketing, padding, the host table), so the figure is the host's alone and is not
disturbed by the CPU model's own compute. Built-in model, prompts of 40 tokens, ``ignore_eos``.
Prints the median microseconds of each phase per step; writes JSON.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import print_table, write_json  # noqa: E402

PHASES = ("schedule", "inputs", "account", "sample", "outputs")


def measure(batch: int, temperature: float, steps: int, vocab: int) -> dict:
    import torch

    from dyn_actor.engine.engine import EngineConfig, LLMEngine
    from dyn_actor.engine.sampling import sample
    from dyn_actor.protocol import SamplingParams

    engine = LLMEngine(EngineConfig(cuda_graphs="on", max_num_seqs=batch, max_model_len=2048,
                                    num_kv_blocks=batch * (2048 // 16)))
    rng = random.Random(0)
    for i in range(batch):
        engine.add_request(f"r{i}", [0] + [rng.randrange(2, 99) for _ in range(39)],
                           SamplingParams(max_tokens=steps + 20, temperature=temperature, ignore_eos=True))
    while engine.scheduler.waiting or any(r.num_computed_tokens < r.num_prompt_tokens for r in engine.requests.values()):
        engine.step()  # the prompts, with the real model
    g = engine.graphs
    for b in g.buckets:  # the replay of each bucket: nothing; its output: fixed logits
        g._replays[b] = (lambda: None, torch.randn(b, vocab))
    times: dict[str, list[float]] = {p: [] for p in PHASES}
    pc = time.perf_counter
    for i in range(steps + 10):
        t0 = pc()
        sched = engine.scheduler.schedule()
        t1 = pc()
        out, samplers = engine._decode_from_graph(sched.scheduled)
        t2 = pc()
        for req, n in sched.scheduled:
            req.num_computed_tokens += n
            engine.block_manager.cache_full_blocks(req.request_id, req.all_token_ids, req.num_computed_tokens)
        t3 = pc()
        result = sample(out, [r.params for r in samplers], [r.generator for r in samplers])
        t4 = pc()
        for req, tok, lp in zip(samplers, result.token_ids, result.logprobs):
            engine._emit(req, tok, lp)
        t5 = pc()
        if i >= 10:
            for p, t in zip(PHASES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
                times[p].append(t)
    row = {"batch": batch, "temperature": temperature}
    for p in PHASES:
        row[f"{p}_us"] = statistics.median(times[p]) * 1e6
    row["total_us"] = sum(row[f"{p}_us"] for p in PHASES)
    row["per_row_us"] = row["total_us"] / batch
    for overlap in ("off", "on"):
        row[f"step_{overlap}_us"] = whole_step(batch, temperature, steps, vocab, overlap)
    return row


def whole_step(batch: int, temperature: float, steps: int, vocab: int, overlap: str) -> float:
    """Median microseconds of one ``engine.step()`` call in steady decoding, the forward pass stubbed
    out as above, with overlapped steps off or on: the host's work either way (on a GPU, overlapped,
    it runs while the device computes the step queued before)."""
    import torch

    from dyn_actor.engine.engine import EngineConfig, LLMEngine
    from dyn_actor.protocol import SamplingParams

    engine = LLMEngine(EngineConfig(cuda_graphs="on", async_scheduling=overlap, max_num_seqs=batch,
                                    max_model_len=2048, num_kv_blocks=batch * (2048 // 16)))
    rng = random.Random(0)
    for i in range(batch):
        engine.add_request(f"r{i}", [0] + [rng.randrange(2, 99) for _ in range(39)],
                           SamplingParams(max_tokens=steps + 40, temperature=temperature, ignore_eos=True))
    while engine.scheduler.waiting or any(r.num_computed_tokens < r.num_prompt_tokens for r in engine.requests.values()):
        engine.step()
    g = engine.graphs
    for b in g.buckets:
        g._replays[b] = (lambda: None, torch.randn(b, vocab))
    times = []
    pc = time.perf_counter
    for i in range(steps + 10):
        t0 = pc()
        engine.step()
        if i >= 10:
            times.append(pc() - t0)
    if overlap == "on":
        assert engine.overlapped_steps >= steps, engine.overlapped_steps
    return statistics.median(times) * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", default="8,64,256", help="comma-separated batch sizes")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--vocab", type=int, default=128,
                    help="columns of the stand-in logits (small: the sampling phase is then its host overhead, "
                         "as on a GPU, where the work itself is on the device)")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)
    rows = [measure(b, t, args.steps, args.vocab) for b in (int(x) for x in args.batch.split(",")) for t in (0.0, 1.0)]
    print(f"host time of a decode step, microseconds (median of {args.steps} steps; the forward pass stubbed out; "
          f"{args.vocab}-column logits)")
    print_table(rows, list(rows[0]))
    out = write_json("decode_host.json", {"args": vars(args), "rows": rows})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
