"""Disaggregation on one GPU (skipped without one; run by ``scripts/gpu_check.sh``): 1p1d with
every prefill remote gives agg's greedy tokens, the decode worker's pool is CUDA IPC memory that
the prefill worker writes into, and a killed prefill worker costs no tokens."""

from __future__ import annotations

import os
import random
import signal

import pytest
import requests
import torch

from tests.helpers import eventually
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


def _metric(s: Server, name: str) -> float:
    text = requests.get(s.url + "/metrics", timeout=10).text
    return sum(float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines() if ln.startswith((name + " ", name + "{")))


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
        assert _metric(s, "dyn_remote_prefills_total") == 2 * len(LENGTHS)
        assert _metric(s, "dyn_kv_transfer_bytes_total") > 0
        os.kill(s.pids()["prefill 0"], signal.SIGKILL)  # restarted; meanwhile the decode side computes
        assert _tokens(s, _prompts()[-1]) == want[-1]
        assert eventually(lambda: _metric(s, "dyn_worker_kv_blocks_used") == 0)
    finally:
        code, err = s.stop()
    assert code == 0, err[-2000:]
