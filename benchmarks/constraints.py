"""What vLLM's ``allowed_token_ids`` and ``bad_words`` cost a decode step on the native engine, in one run.

    python benchmarks/constraints.py                       # built-in model, 32 requests x 64 tokens
    python benchmarks/constraints.py --model DIR --requests 64 --tokens 128

The same greedy batch four ways, alternated round by round: no constraints; every request with
``allowed_token_ids`` (``--allowed`` ids, the tokens the plain run drew among them); every request
with ``bad_words`` (``--words`` one-token words that the plain run never drew, and as many two-token
ones: the mask is built each step, the Python pass over the spellings is the cost); and both. The
table gives output tokens a second (median of the rounds) and the ratio to the plain batch. On the
built-in model a step is short, so the host's share (and this cost) is the largest it gets.
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="builtin:tiny")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--allowed", type=int, default=256)
    ap.add_argument("--words", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    from dyn_actor.engine import EngineConfig, LLMEngine, SamplingParams

    engine = LLMEngine(EngineConfig(model=args.model, num_kv_blocks=2048, max_model_len=1024))
    vocab = engine.model_config.vocab_size
    rng = random.Random(0)
    prompts = [[rng.randrange(3, vocab) for _ in range(32)] for _ in range(args.requests)]

    def run(params: SamplingParams) -> tuple[float, list[list[int]]]:
        out: dict[str, list[int]] = {}
        t0 = time.perf_counter()
        for i, p in enumerate(prompts):
            engine.add_request(f"r{i}", p, params)
        while engine.has_unfinished_requests():
            for o in engine.step():
                out.setdefault(o.request_id, []).extend(o.new_token_ids)
        dt = time.perf_counter() - t0
        return sum(map(len, out.values())) / dt, [out[f"r{i}"] for i in range(len(prompts))]

    base = dict(max_tokens=args.tokens, temperature=0.0, ignore_eos=True)
    _, drawn = run(SamplingParams(**base))  # (also the warm-up)
    seen = sorted({t for toks in drawn for t in toks})
    allowed = sorted(set(seen[: args.allowed]) | set(rng.sample(range(vocab), min(vocab, args.allowed))))[: args.allowed]
    unseen = [t for t in range(vocab) if t not in set(seen)] or list(range(vocab))
    words = [[rng.choice(unseen)] for _ in range(args.words)] + \
            [[rng.choice(seen), rng.choice(unseen)] for _ in range(args.words)]
    cases = {
        "plain": SamplingParams(**base),
        "allowed_token_ids": SamplingParams(**base, allowed_token_ids=allowed),
        "bad_words": SamplingParams(**base, bad_words_ids=words),
        "both": SamplingParams(**base, allowed_token_ids=allowed, bad_words_ids=words),
    }
    rates: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(args.rounds):
        for k, sp in cases.items():
            rates[k].append(run(sp)[0])
    plain = statistics.median(rates["plain"])
    rows = [{"case": k, "tok_s": round(statistics.median(v)), "vs_plain": round(statistics.median(v) / plain, 3)}
            for k, v in rates.items()]
    print(f"{args.model}: {args.requests} requests x {args.tokens} tokens, greedy; {len(allowed)} allowed ids, "
          f"{len(words)} bad-word spellings ({args.words} of two tokens)")
    print_table(rows, ["case", "tok_s", "vs_plain"])
    print(f"wrote {write_json('constraints.json', {'args': vars(args), 'rows': rows, 'rates': rates})}")


if __name__ == "__main__":
    main()
