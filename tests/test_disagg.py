"""Disaggregated prefill/decode: determinism against agg, concurrency, faults, cleanup. Through the
launcher where processes are the point (kills, segments of a dead process), else in one process."""

from __future__ import annotations

import concurrent.futures as cf
import os
import random
import signal
import threading
import time

import pytest
import requests

from tests.helpers import eventually, metric
from tests.server import InprocServer, Server, own_segments, segments_of

LENGTHS = [3, 15, 16, 17, 32, 40, 77, 130]


def _prompts() -> list[list[int]]:
    rng = random.Random(11)
    return [[0] + [rng.randrange(2, 99) for _ in range(n - 1)] for n in LENGTHS]


def _complete(server: Server, prompt: list[int], max_tokens: int = 16) -> dict:
    r = requests.post(server.base_url + "/completions", timeout=120, json={
        "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "logprobs": 0})
    assert r.status_code == 200, r.text
    return r.json()


def _tokens(resp: dict) -> list[str]:
    return resp["choices"][0]["logprobs"]["tokens"]


@pytest.fixture(scope="module")
def agg_tokens():
    s = InprocServer("--topology", "agg", "--kv-cache-memory-gb", "0.1")
    try:
        return [_tokens(_complete(s, p)) for p in _prompts()]
    finally:
        s.stop()


def test_1p1d_matches_agg_and_really_goes_remote(agg_tokens):
    s = Server("--topology", "1p1d", "--max-local-prefill-length", "0", "--kv-cache-memory-gb", "0.1")
    try:
        assert set(s.pids()) == {"prefill-queue 0", "decode 0", "prefill 0", "frontend 0", "planner 0"}
        prompts = _prompts()
        for p, want in zip(prompts, agg_tokens):
            assert _tokens(_complete(s, p)) == want, f"{len(p)}-token prompt"
        assert metric(s, "dyn_remote_prefills_total") == len(prompts)
        assert metric(s, "dyn_local_prefills_total") == 0
        assert metric(s, "dyn_kv_transfer_bytes_total") > 0
        # again: the decode side now has the prefixes cached; only the rest is prefilled remotely
        hits = metric(s, "dyn_prefix_cache_hit_tokens_total")
        for p, want in zip(prompts, agg_tokens):
            assert _tokens(_complete(s, p)) == want
        assert metric(s, "dyn_prefix_cache_hit_tokens_total") > hits
        assert eventually(lambda: metric(s, "dyn_worker_kv_blocks_used") == 0)
    finally:
        code, err = s.stop()
    assert code == 0, err
    assert not s.segments_left()  # the decode worker's shared KV pool is gone


def test_short_prompts_stay_local():
    s = InprocServer("--topology", "1p1d", "--max-local-prefill-length", "64", "--kv-cache-memory-gb", "0.1")
    try:
        _complete(s, [0] + [5] * 20)
        _complete(s, [0] + [6] * 100)
        assert metric(s, "dyn_local_prefills_total") == 1 and metric(s, "dyn_remote_prefills_total") == 1
        text = requests.get(s.url + "/metrics", timeout=10).text
        assert "dyn_prefill_queue_depth 0" in text and "dyn_remote_prefill_latency_seconds_count 1" in text
        # the threshold changes at run time, without a restart
        r = requests.post(s.base_url + "/disagg/policy", json={"max_local_prefill_length": 1000}, timeout=10)
        assert r.json() == {"workers": {"decode-0": {"max_local_prefill_length": 1000, "max_prefill_queue_size": 8}}}
        _complete(s, [0] + [7] * 100)
        assert metric(s, "dyn_local_prefills_total") == 2 and metric(s, "dyn_remote_prefills_total") == 1
        # a bad value is refused and changes nothing, not even the good one beside it
        assert requests.post(s.base_url + "/disagg/policy", json={"max_local_prefill_length": 5,
                                                                  "max_prefill_queue_size": -1},
                             timeout=10).status_code == 400
        assert requests.get(s.base_url + "/disagg/policy", timeout=10).json() == r.json()
    finally:
        s.stop()


def test_a_restarted_decode_worker_keeps_the_policy_set_while_serving():
    """Thresholds set by ``POST /v1/disagg/policy``: a decode worker killed and restarted comes back
    with them, not with those it was launched with, and prefills by them."""
    s = Server("--topology", "1p1d", "--max-local-prefill-length", "64", "--kv-cache-memory-gb", "0.1")
    try:
        r = requests.post(s.base_url + "/disagg/policy", json={"max_local_prefill_length": 1000,
                                                               "max_prefill_queue_size": 3}, timeout=10)
        assert r.json() == {"workers": {"decode-0": {"max_local_prefill_length": 1000, "max_prefill_queue_size": 3}}}
        os.kill(s.pids()["decode 0"], signal.SIGKILL)
        eventually(lambda: "decode 0 is back" in s.log(), timeout=30, interval=0.2)

        def policy():
            got = requests.get(s.base_url + "/disagg/policy", timeout=10)
            return got.status_code == 200 and got.json()["workers"] and got.json()

        assert eventually(policy, timeout=15, interval=0.2) == r.json()
        local = metric(s, "dyn_local_prefills_total")
        _complete(s, [0] + [7] * 100)  # over the launch threshold, under the one set: here
        assert metric(s, "dyn_local_prefills_total") == local + 1
    finally:
        code, err = s.stop()
    assert code == 0, err[-2000:]


@pytest.mark.parametrize("topology", ["2p1d", "1p2d"])
def test_64_concurrent_requests(topology):
    s = InprocServer("--topology", topology, "--max-local-prefill-length", "16", "--kv-cache-memory-gb", "0.1")
    try:
        rng = random.Random(3)
        jobs = [([0] + [rng.randrange(2, 99) for _ in range(rng.choice([5, 20, 60, 150]))], rng.randint(1, 12))
                for _ in range(64)]
        with cf.ThreadPoolExecutor(16) as pool:
            results = list(pool.map(lambda j: _complete(s, j[0], j[1]), jobs))
        for (prompt, n), r in zip(jobs, results):
            assert r["usage"]["completion_tokens"] == n and r["usage"]["prompt_tokens"] == len(prompt)
        assert metric(s, "dyn_remote_prefills_total") > 0
        time.sleep(0.5)
        assert eventually(lambda: metric(s, "dyn_worker_kv_blocks_used") == 0)
        assert eventually(lambda: metric(s, "dyn_worker_requests_running") == 0)
    finally:
        s.stop()


def test_killed_decode_worker_leaves_no_segment():
    s = Server("--topology", "1p1d", "--kv-cache-memory-gb", "0.1")
    pid = s.pids()["decode 0"]
    assert segments_of([pid])
    os.kill(pid, signal.SIGKILL)
    code, err = s.stop()
    assert not s.segments_left(), err


def test_dead_prefill_worker_falls_back_to_local(agg_tokens):
    s = Server("--topology", "1p1d", "--max-local-prefill-length", "0", "--remote-prefill-timeout", "2",
               "--kv-cache-memory-gb", "0.1")
    try:
        os.kill(s.pids()["prefill 0"], signal.SIGKILL)
        t0 = time.monotonic()
        prompt = _prompts()[-1]
        assert _tokens(_complete(s, prompt)) == agg_tokens[-1]
        assert time.monotonic() - t0 < 10
        assert metric(s, "dyn_local_prefills_total") == 1
        assert eventually(lambda: metric(s, "dyn_worker_kv_blocks_used") == 0)
    finally:
        s.stop()


def test_disconnect_during_remote_prefill_leaks_nothing():
    s = InprocServer("--topology", "1p1d", "--max-local-prefill-length", "0", "--kv-cache-memory-gb", "0.1")
    try:
        for _ in range(5):
            with pytest.raises(requests.exceptions.ReadTimeout):
                requests.post(s.base_url + "/completions", timeout=0.05,
                              json={"prompt": [0] + [7] * 300, "max_tokens": 2000, "ignore_eos": True})
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and metric(s, "dyn_worker_kv_blocks_used") > 0:
            time.sleep(0.2)
        assert eventually(lambda: metric(s, "dyn_worker_kv_blocks_used") == 0)
        assert _complete(s, [0, 5, 6])["usage"]["completion_tokens"] == 16
    finally:
        s.stop()


def test_killed_decode_worker_does_not_stall_the_other():
    """1p2d, every prefill remote: SIGKILL one decode worker while prefills for both are queued.
    Its requests fail with an error, the other worker's complete, the queue empties, and the
    prefill worker goes on serving."""
    s = Server("--topology", "1p2d", "--max-local-prefill-length", "0", "--max-prefill-queue-size", "100",
               "--router", "round-robin", "--kv-cache-memory-gb", "0.1")
    try:
        rng = random.Random(5)
        prompts = [[0] + [rng.randrange(2, 99) for _ in range(400)] for _ in range(12)]

        def run(p):
            r = requests.post(s.base_url + "/completions", timeout=120,
                              json={"prompt": p, "max_tokens": 4, "ignore_eos": True})
            return r.status_code, r.json()

        with cf.ThreadPoolExecutor(12) as pool:
            futs = [pool.submit(run, p) for p in prompts]
            time.sleep(1.0)
            os.kill(s.pids()["decode 0"], signal.SIGKILL)
            results = [f.result() for f in futs]
        ok = [body for code, body in results if code == 200]
        failed = [body for code, body in results if code != 200]
        assert all(b["usage"]["completion_tokens"] == 4 for b in ok)
        assert all("error" in b for b in failed)
        assert len(ok) >= 6  # at least decode 1's share
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and metric(s, "dyn_prefill_queue_depth") > 0:
            time.sleep(0.2)
        assert metric(s, "dyn_prefill_queue_depth") == 0
        assert _complete(s, prompts[0], 3)["usage"]["completion_tokens"] == 3
    finally:
        s.stop()


def test_an_in_process_topology_serves_disaggregated_and_leaves_nothing():
    """``InprocServer`` (the launcher's actors on one event loop): a remote prefill goes through the
    queue and the shared-memory pool as between processes; after stop no segment or thread is left,
    and a second topology in the same process does the same."""
    before = set(own_segments())
    threads = {t.name for t in threading.enumerate()}
    for _ in range(2):
        s = InprocServer("--topology", "1p1d", "--max-local-prefill-length", "0", "--kv-cache-memory-gb", "0.05")
        try:
            assert set(s.pids()) == {"prefill-queue 0", "decode 0", "prefill 0"}
            assert _complete(s, [0] + [5] * 40, 4)["usage"]["completion_tokens"] == 4
            assert metric(s, "dyn_remote_prefills_total") == 1 and metric(s, "dyn_kv_transfer_bytes_total") > 0
        finally:
            s.stop()
        assert set(own_segments()) <= before
        assert {t.name for t in threading.enumerate() if t.is_alive()} <= threads
