"""``--engine vllm --topology 1p1d --planner active`` (skipped unless vLLM is installed; ``.ci/run``
installs it for a second pass): the planner's run-time change of the local/remote threshold reaches
our KV connector inside vLLM's scheduler process. A prompt longer than the threshold the planner
sets, but shorter than the one at launch, is prefilled here before the change and remotely after."""

from __future__ import annotations

import os

import pytest
import requests

from dyn_actor.components.vllm_worker import patch_vllm_version
from tests.helpers import Load, wait_threshold_below
from tests.server import Server

pytestmark = pytest.mark.vllm
patch_vllm_version()
if os.environ.get("DYN_REQUIRE_VLLM") == "1":
    import vllm  # noqa: F401
else:
    vllm = pytest.importorskip("vllm", reason="vLLM is not installed (pip install -e '.[vllm]')")

SHORT = {"prompt": [0, 11, 12, 13, 14], "max_tokens": 8, "ignore_eos": True}


def _counts(s: Server) -> tuple[float, float]:
    text = requests.get(s.url + "/metrics", timeout=10).text
    values = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in ("dyn_local_prefills_total", "dyn_remote_prefills_total"):
            values[name] = float(value)
    return values.get("dyn_local_prefills_total", 0.0), values.get("dyn_remote_prefills_total", 0.0)


def _complete(s: Server, prompt: list[int]) -> None:
    r = requests.post(s.base_url + "/completions", timeout=120, json={"prompt": prompt, "max_tokens": 4})
    assert r.status_code == 200, r.text


def test_the_active_planner_moves_the_threshold_inside_vllm(builtin_dir):
    """1p1d at --max-workers 2 with an ITL target nothing meets: no worker can be added or moved, so
    the planner halves the decode worker's max_local_prefill_length (512 at launch)."""
    s = Server("--engine", "vllm", "--topology", "1p1d", "--model", str(builtin_dir), "--dtype", "float32",
               "--max-model-len", "1024", "--kv-cache-memory-gb", "1", "--planner", "active", "--max-workers", "2",
               "--ttft-slo-ms", "1000000", "--itl-slo-ms", "0.01", "--planner-interval", "0.5",
               "--planner-cooldown", "1", "--planner-warmup", "1", timeout=420)
    fresh = [[0] + [7 + (13 * k + seed) % 80 for k in range(299)] for seed in (1, 2)]  # 300 tokens, cached nowhere
    load = None
    try:
        local, remote = _counts(s)
        _complete(s, fresh[0])
        assert _counts(s) == (local + 1, remote)  # 300 <= 512: here
        load = Load(s, SHORT, 2)
        policy = wait_threshold_below(s, 300, timeout=90)
        assert policy["decode-0"]["max_local_prefill_length"] < 300, policy
        assert "planner: lower_local_prefill to 256" in s.log(), s.log()[-3000:]
        load.stop()
        assert load.done and not load.failures, load.failures
        local, remote = _counts(s)
        _complete(s, fresh[1])
        assert _counts(s) == (local, remote + 1)  # 300 > the planner's threshold: remote
    finally:
        if load is not None:
            load.stop()
        code, err = s.stop()
    assert code == 0, err[-2000:]
    assert "did not stop" not in err, err[-3000:]
