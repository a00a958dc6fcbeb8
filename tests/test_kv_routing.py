"""KV-aware routing through the launcher: conversations stick to the worker that holds their
prefix, unique prompts spread, a killed worker leaves routing at once, disaggregated too."""

from __future__ import annotations

import concurrent.futures as cf
import os
import random
import signal
import string
import time

import requests

from tests.server import InprocServer, Server

BS = 16


def _text(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(string.ascii_letters + " ") for _ in range(n))


def _complete(s: Server, prompt: str, max_tokens: int = 12) -> dict:
    r = requests.post(s.base_url + "/completions", timeout=60,
                      json={"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200, r.text
    return r.json()


def _decisions(s: Server) -> dict[str, float]:
    text = requests.get(s.url + "/metrics", timeout=10).text
    out = {}
    for line in text.splitlines():
        if line.startswith("dyn_router_decisions_total{"):
            out[line.split('"')[1]] = float(line.rsplit(" ", 1)[1])
    return out


def _state(s: Server) -> dict:
    return requests.get(s.base_url + "/router/state", timeout=10).json()


def _converse(s: Server, rng: random.Random, convs: list[str], turns: int) -> list[list[int]]:
    """Each turn of each conversation: prompt = history + a new user message. Returns, per
    conversation and turn after the first, (cached tokens reported, previous prompt's full blocks)."""
    prev_len = [0] * len(convs)
    checks = []
    for turn in range(turns):
        for i in range(len(convs)):
            prompt = convs[i] + f"\nuser: {_text(rng, 40)}\nassistant:"
            r = _complete(s, prompt)
            if turn > 0:
                checks.append((r["usage"]["prompt_tokens_details"]["cached_tokens"], prev_len[i] // BS * BS))
            prev_len[i] = r["usage"]["prompt_tokens"]
            convs[i] = prompt + r["choices"][0]["text"]
    return checks


def test_conversations_stick_unique_prompts_spread_dead_worker_leaves():
    # not restarted: a restart (a second or so here) could come before the frontend declared it dead
    s = Server("--topology", "agg", "--workers", "3", "--router", "kv", "--kv-cache-memory-gb", "0.05",
               "--restart-policy", "never")
    try:
        rng = random.Random(0)
        # 7 conversations on 3 workers: round-robin would move each one to another worker every turn
        convs = [f"system: you are assistant {i}. {_text(rng, 150)}" for i in range(7)]
        checks = _converse(s, rng, convs, turns=4)
        # every later turn found at least the whole previous prompt cached: it went to the worker
        # that served the conversation before (a random pick would miss 2 times in 3)
        assert all(cached >= expected > 0 for cached, expected in checks), checks
        state = _state(s)
        assert state["mode"] == "kv" and state["index"]["blocks"] > 0
        assert all(w["kv_events"]["state"] == "live" and w["errors"] == {} for w in state["workers"])

        # unique prompts, 6 at a time: spread within a reasonable balance
        before = _decisions(s)
        with cf.ThreadPoolExecutor(6) as pool:
            list(pool.map(lambda p: _complete(s, p, 8), [_text(rng, 200) for _ in range(30)]))
        after = _decisions(s)
        share = {w: after[w] - before.get(w, 0) for w in after}
        assert sum(share.values()) == 30 and min(share.values()) >= 5, share

        # kill the worker holding some conversations: it leaves the index and routing at once
        victim = "worker-1"
        os.kill(s.pids()["worker 1"], signal.SIGKILL)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            w = {x["name"]: x for x in _state(s)["workers"]}[victim]
            if not w["alive"]:
                break
            time.sleep(0.1)
        assert not w["alive"] and w["cached_blocks_indexed"] == 0
        before = _decisions(s)
        for c in convs:  # every conversation goes on, on the survivors
            _complete(s, c + "\nuser: again\nassistant:", 4)
        after = _decisions(s)
        assert after.get(victim, 0) == before.get(victim, 0)
    finally:
        s.stop()


def test_a_killed_worker_comes_back_restarted_with_nothing_indexed():
    """Killed and restarted (the default policy; here the restart can come within the frontend's
    heartbeat limit, and the frontend then learns of it from the new run's pong): the frontend
    forgets what the old run had cached and routes to the new one, whose prefix cache is empty."""
    s = Server("--topology", "agg", "--workers", "2", "--router", "kv", "--kv-cache-memory-gb", "0.05")
    try:
        prompt = _text(random.Random(3), 300)
        _complete(s, prompt, 4)
        held = [w for w in _state(s)["workers"] if w["cached_blocks_indexed"] > 0]
        assert len(held) == 1, _state(s)
        victim = held[0]["name"]
        role = victim.replace("-", " ")  # "worker 0": its process, and how the launcher names it
        os.kill(s.pids()[role], signal.SIGKILL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and f"{role} is back" not in s.log():
            time.sleep(0.1)
        assert f"{role} is back" in s.log(), s.log()[-3000:]
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            w = {x["name"]: x for x in _state(s)["workers"]}[victim]
            if w["alive"] and w["cached_blocks_indexed"] == 0 and w["kv_events"]["state"] == "live":
                break
            time.sleep(0.1)
        assert w["alive"] and w["cached_blocks_indexed"] == 0, w
        # the same prompt again: nothing of it is cached anywhere now, and it is served
        assert _complete(s, prompt, 4)["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    finally:
        s.stop()


def test_kv_routing_in_a_disaggregated_topology():
    """1p2d: the router picks the decode worker; a repeated long prompt finds its prefix there,
    so the decode worker prefills only the uncached rest (locally, being short)."""
    s = InprocServer("--topology", "1p2d", "--router", "kv", "--max-local-prefill-length", "64",
               "--kv-cache-memory-gb", "0.05")
    try:
        rng = random.Random(1)
        base = _text(rng, 400)
        first = _complete(s, base)
        assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        for _ in range(4):
            r = _complete(s, base + _text(rng, 20))
            assert r["usage"]["prompt_tokens_details"]["cached_tokens"] >= len(base) // BS * BS - BS
        text = requests.get(s.url + "/metrics", timeout=10).text
        remote = sum(float(x.rsplit(" ", 1)[1]) for x in text.splitlines()
                     if x.startswith("dyn_remote_prefills_total"))
        assert remote == 1  # only the first, uncached prompt was long enough to go remote
        workers = {w["name"]: w for w in _state(s)["workers"]}
        assert set(workers) == {"decode-0", "decode-1"}
        assert sum(w["cached_blocks_indexed"] > 0 for w in workers.values()) == 1
    finally:
        s.stop()
