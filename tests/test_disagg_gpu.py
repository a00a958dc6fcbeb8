"""Disaggregation on one GPU (skipped without one; run by ``scripts/gpu_check.sh``): 1p1d with
every prefill remote gives agg's greedy tokens, the decode worker's pool is CUDA IPC memory that
the prefill worker writes into, a killed prefill worker costs no tokens, and a worker killed
mid-request leaves no device memory held on the card (a prefill worker that kept a dead decode
worker's pool mapped would keep that pool's memory allocated)."""

from __future__ import annotations

import os
import random
import signal
import threading
import time

import pytest
import requests
import torch

from tests.helpers import eventually, metric
from tests.server import Server

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
LENGTHS = [3, 17, 300, 2000]
FLAGS = ("--device", "cuda", "--dtype", "float32", "--max-model-len", "2100", "--kv-cache-memory-gb", "0.5")


def _prompts() -> list[list[int]]:
    rng = random.Random(12)
    return [[0] + [rng.randrange(2, 99) for _ in range(n - 1)] for n in LENGTHS]


def _tokens(s: Server, prompt: list[int]) -> list[str]:
    r = requests.post(s.base_url + "/completions", timeout=120, json={
        "prompt": prompt, "max_tokens": 16, "temperature": 0, "ignore_eos": True, "logprobs": 0})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["logprobs"]["tokens"]


def test_1p1d_on_one_gpu_matches_agg_with_and_without_a_prefix_hit():
    agg = Server("--topology", "agg", *FLAGS)
    try:
        assert "cuda" in requests.get(agg.url + "/health", timeout=10).json()["devices"]["worker-0"]
        want = [_tokens(agg, p) for p in _prompts()]
    finally:
        agg.stop()
    s = Server("--topology", "1p1d", "--max-local-prefill-length", "0", *FLAGS)
    try:
        for round_ in range(2):  # the second round hits the decode side's prefix cache
            assert [_tokens(s, p) for p in _prompts()] == want, f"round {round_}"
        assert metric(s, "dyn_remote_prefills_total") == 2 * len(LENGTHS)
        assert metric(s, "dyn_kv_transfer_bytes_total") > 0
        os.kill(s.pids()["prefill 0"], signal.SIGKILL)  # restarted; meanwhile the decode side computes
        assert _tokens(s, _prompts()[-1]) == want[-1]
        assert eventually(lambda: metric(s, "dyn_worker_kv_blocks_used") == 0)
    finally:
        code, err = s.stop()
    assert code == 0, err[-2000:]


def _free_mib() -> float:
    return torch.cuda.mem_get_info()[0] / (1 << 20)


def _kill_mid_request(s: Server, role: str) -> None:
    """Kill ``role`` while a long prompt is being prefilled remotely; wait until it is back."""
    old = s.pids()[role]
    backs = s.log().count(f"{role} is back")
    errors: list[BaseException] = []

    def request() -> None:
        try:
            requests.post(s.base_url + "/completions", timeout=120, json={
                "prompt": _prompts()[-1], "max_tokens": 64, "ignore_eos": True})
        except BaseException as e:  # noqa: BLE001 - a failed request is allowed here, a hung one is not
            errors.append(e)

    t = threading.Thread(target=request)
    t.start()
    time.sleep(0.05)
    os.kill(old, signal.SIGKILL)
    t.join(150)
    assert not t.is_alive(), "a request hung after the kill"
    assert eventually(lambda: s.log().count(f"{role} is back") > backs, timeout=90), f"{role} did not come back"


def test_killed_workers_leave_no_device_memory_held():
    torch.cuda.init()
    s = Server("--topology", "1p1d", "--max-local-prefill-length", "0", *FLAGS)
    try:
        for _ in range(2):  # both sides' allocators see every size first
            for p in _prompts():
                _tokens(s, p)
        level = _free_mib()
        pool_mib = 0.5 * 1024  # --kv-cache-memory-gb: what a pool kept mapped would hold
        for role in ("decode 0", "prefill 0"):
            _kill_mid_request(s, role)
            for _ in range(2):  # the restarted process's allocator sees the same sizes
                for p in _prompts():
                    _tokens(s, p)
            assert eventually(lambda: _free_mib() > level - pool_mib / 2, timeout=30), \
                f"after killing {role}: {level - _free_mib():.0f} MiB of the card still held"
            assert eventually(lambda: metric(s, "dyn_worker_kv_blocks_used") == 0, timeout=15)
            assert metric(s, "dyn_worker_kv_blocks_fenced") == 0
    finally:
        code, err = s.stop()
    assert code == 0, err[-2000:]
    assert eventually(lambda: _free_mib() > level + 2 * pool_mib, timeout=30)  # the server's memory is back too
