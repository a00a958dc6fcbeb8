"""Overlapped decode steps (``async_scheduling``): the engine queues the next graph-replayed decode
step, its input tokens taken on the device, before the host has the tokens of the step before. On
the CPU the device is synchronous, so this checks the bookkeeping: the same tokens, logprobs and
finish reasons as steps taken one at a time, under arrivals, aborts, preemption and stops, and that
no request's blocks are freed while a queued step still writes into them."""

from __future__ import annotations

import concurrent.futures as cf
import random

import pytest
import requests

from dyn_actor.engine import EngineConfig, LLMEngine, SamplingParams
from tests.helpers import eventually, fail_forward_once, random_prompt, run_all
from tests.server import InprocServer


def _engine(overlap: str, blocks: int = 128, max_num_seqs: int = 8, max_model_len: int = 128, **kw) -> LLMEngine:
    return LLMEngine(EngineConfig(dtype="float32", max_model_len=max_model_len, num_kv_blocks=blocks,
                                  async_scheduling=overlap, max_num_seqs=max_num_seqs, **{"cuda_graphs": "on", **kw}))


def _jobs(seed: int, n: int, penalties: bool) -> dict:
    rng = random.Random(seed)
    kinds = [
        lambda: SamplingParams(max_tokens=rng.randint(1, 40), temperature=0, ignore_eos=True),
        lambda: SamplingParams(max_tokens=rng.randint(5, 40), temperature=0.9, top_k=20, seed=rng.randrange(1000)),
        lambda: SamplingParams(max_tokens=30, temperature=0, logprobs=2, stop_token_ids=[rng.randrange(2, 99)]),
        lambda: SamplingParams(max_tokens=25, temperature=1.0, seed=rng.randrange(1000), min_tokens=12,
                               stop_token_ids=list(range(2, 60))),
    ]
    if penalties:  # the token a queued step sampled is counted on the device
        kinds.append(lambda: SamplingParams(max_tokens=20, temperature=0, repetition_penalty=1.3))
    return {f"r{i}": (random_prompt(rng, rng.randint(2, 50)), kinds[i % len(kinds)]()) for i in range(n)}


def _summary(result: dict) -> dict:
    """Tokens, finish reason and logprobs (token, rank, top ids; ``_same`` compares the values with
    a tolerance: rows in batches of other sizes may differ in the last bits)."""
    def lps(outs):
        return [(lp.token_id, lp.logprob, lp.rank, lp.top) for o in outs for lp in (o.logprobs or [])]

    return {rid: (toks, reason, lps(outs)) for rid, (toks, reason, outs) in result.items()}


def _same(got: dict, want: dict) -> bool:
    def close(a, b):
        return a == b or (isinstance(a, float) and isinstance(b, float) and abs(a - b) < 1e-4) or (
            isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b)
            and all(close(x, y) for x, y in zip(a, b)))

    bad = [k for k in want if not close(got.get(k), want[k])]
    assert not bad, {k: (got.get(k), want[k]) for k in bad[:2]}
    return got.keys() == want.keys()


@pytest.mark.parametrize("blocks,penalties,kw", [
    (128, False, {}), (14, False, {}), (128, True, {}),
    # chunked prompts ahead of decoding rows in the schedule (a capped chunk leaves budget for later
    # requests): the decode rows come first in the step's inputs, eagerly and through the graphs
    (128, False, {"max_num_batched_tokens": 32, "long_prefill_token_threshold": 8}),
    (128, True, {"max_num_batched_tokens": 32, "long_prefill_token_threshold": 8, "cuda_graphs": "off"}),
])
def test_overlapped_steps_give_the_tokens_of_steps_one_at_a_time(blocks, penalties, kw):
    jobs = _jobs(3, 17, penalties)
    want = _summary(run_all(_engine("off", blocks, **kw), jobs))
    engine = _engine("on", blocks, **kw)
    steps = 0
    step = engine.step

    def counted():
        nonlocal steps
        steps += 1
        return step()

    engine.step = counted
    got = _summary(run_all(engine, jobs))
    assert _same(got, want)
    # it did overlap: nearly every step (prefills and mixed steps too, through preemption; penalties
    # count a token still on the device there)
    assert engine.overlapped_steps > 0.85 * steps
    assert engine.block_manager.num_used_blocks == 0 and not engine.has_unfinished_requests()
    if blocks == 14:
        assert engine.stats().num_preemptions > 0


def test_requests_that_come_and_go_while_a_step_is_queued():
    """Arrivals at every few steps and aborts at random points (some while their request's next step
    is queued): the others' greedy tokens are those they get alone, no output follows an abort, and
    every block comes back."""
    rng = random.Random(11)
    prompts = {f"r{i}": random_prompt(rng, rng.randint(2, 60)) for i in range(24)}
    params = {rid: SamplingParams(max_tokens=rng.randint(3, 40), temperature=0, ignore_eos=True) for rid in prompts}
    alone = _engine("off")
    want = {rid: run_all(alone, {rid: (p, params[rid])})[rid][0] for rid, p in prompts.items()}

    engine = _engine("on", blocks=40, max_num_seqs=6)
    pending = list(prompts)
    aborted: set[str] = set()
    got: dict[str, list[int]] = {rid: [] for rid in prompts}
    finished: set[str] = set()
    step = 0
    while pending or engine.has_unfinished_requests():
        step += 1
        if pending and step % 3 == 1:
            rid = pending.pop(0)
            engine.add_request(rid, prompts[rid], params[rid])
        live = [r for r in engine.requests if r not in aborted]
        if live and rng.random() < 0.08:
            victim = rng.choice(live)
            assert engine.abort_request(victim)
            aborted.add(victim)
        for out in engine.step():
            assert out.request_id not in aborted and out.request_id not in finished
            got[out.request_id].extend(out.new_token_ids)
            if out.finished:
                finished.add(out.request_id)
        assert step < 5000
    assert aborted and engine.overlapped_steps > 20
    for rid in prompts:
        if rid not in aborted:
            assert got[rid] == want[rid], rid
        else:
            assert got[rid] == want[rid][:len(got[rid])], rid
    assert engine.block_manager.num_used_blocks == 0


def test_blocks_of_a_request_ended_while_its_next_step_is_queued_wait_for_that_step():
    """A request that finishes on a stop token (or is aborted) while the step after is already queued
    keeps its blocks until that step has run: it writes one more token's KV into them, and a block
    handed on meanwhile (to a remote prefill, say) would get it. (One that ends by length is known
    beforehand and left out of the next step.)"""
    prompt = random_prompt(random.Random(1), 20)
    greedy = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    first = run_all(_engine("off"), {"x": (prompt, greedy)})["x"][0]
    stop = next(t for i, t in enumerate(first) if i >= 3 and t not in first[:i])
    engine = _engine("on")
    engine.add_request("short", prompt, SamplingParams(max_tokens=30, temperature=0, ignore_eos=True,
                                                       stop_token_ids=[stop]))
    engine.add_request("long", random_prompt(random.Random(2), 20), greedy)
    ended = None
    for _ in range(20):
        outs = engine.step()
        if any(o.request_id == "short" and o.finished for o in outs):
            ended = engine._inflight
            break
    assert ended is not None and any(r.request_id == "short" for r in ended.reqs)
    assert engine.block_manager.has_request("short")  # held for the queued step
    assert "short" in ended.deferred
    engine.step()
    assert not engine.block_manager.has_request("short")

    while engine._inflight is None or not any(r.request_id == "long" for r in engine._inflight.reqs):
        engine.step()
    assert engine.abort_request("long")
    assert engine.block_manager.has_request("long")
    assert all(o.request_id != "long" for o in engine.step())
    assert not engine.block_manager.has_request("long")
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.block_manager.num_used_blocks == 0


def test_overlap_is_off_on_the_cpu_by_default_and_checked():
    assert not LLMEngine(EngineConfig(dtype="float32", num_kv_blocks=32, max_model_len=64, cuda_graphs="on"))._overlap
    with pytest.raises(ValueError, match="async_scheduling"):
        LLMEngine(EngineConfig(dtype="float32", num_kv_blocks=32, max_model_len=64, async_scheduling="maybe"))


def _complete(base_url: str, prompt: list[int], max_tokens: int) -> list[str]:
    r = requests.post(base_url + "/completions", timeout=120, json={
        "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "logprobs": 0})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["logprobs"]["tokens"]


def _kv_blocks_used(server: InprocServer) -> float:
    text = requests.get(server.url + "/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("dyn_worker_kv_blocks_used"))


@pytest.mark.parametrize("topology", ["agg", "1p1d"])
def test_serving_with_overlapped_steps(topology):
    """Through the worker's engine thread: concurrent requests (in 1p1d the long prompts prefilled
    remotely, joining the decode batch mid-flight) give the tokens of a server without overlap, and
    clients that go away mid-stream leave no block behind."""
    rng = random.Random(7)
    jobs = [(random_prompt(rng, rng.choice([4, 20, 70])), rng.randint(1, 24)) for _ in range(16)]
    ref = InprocServer("--topology", "agg", "--kv-cache-memory-gb", "0.05")
    try:
        with cf.ThreadPoolExecutor(8) as pool:
            want = list(pool.map(lambda j: _complete(ref.base_url, *j), jobs))
    finally:
        ref.stop()
    s = InprocServer("--topology", topology, "--async-scheduling", "on", "--max-local-prefill-length", "16",
                     "--kv-cache-memory-gb", "0.05")
    try:
        with cf.ThreadPoolExecutor(8) as pool:
            got = list(pool.map(lambda j: _complete(s.base_url, *j), jobs))
        assert got == want
        for _ in range(3):  # a stream dropped after its first tokens
            with requests.post(s.base_url + "/completions", stream=True, timeout=30, json={
                    "prompt": [0, 5, 6, 7], "max_tokens": 400, "ignore_eos": True, "stream": True}) as r:
                lines = r.iter_lines()
                next(lines)
                next(lines)
        assert eventually(lambda: _kv_blocks_used(s) == 0, timeout=10)
        assert _complete(s.base_url, [0, 5, 6], 8) == _complete(s.base_url, [0, 5, 6], 8)
        engines = [e for name, e in s.topology.engines.items() if not name.startswith("prefill")]
        assert engines and all(e._overlap for e in engines) and sum(e.overlapped_steps for e in engines) > 20
    finally:
        s.stop()


def test_a_queued_step_that_fails_ends_only_its_requests():
    """The step queued ahead raises (on a GPU: a fault at replay): the tokens of the step before still
    reach their requests, then those requests end with the error; the engine goes on with the rest."""
    engine = _engine("on", max_num_seqs=2)
    greedy = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    for rid in ("a", "b", "c"):  # two fit in a batch: c waits
        engine.add_request(rid, [0, 5, 6, 7], greedy)
    while engine.overlapped_steps == 0:
        engine.step()
    fail_forward_once(engine)
    outs = engine.step()
    ended = [o for o in outs if o.finished]
    assert sorted(o.request_id for o in ended) == ["a", "b"]
    assert all(o.finish_reason == "error" and "illegal memory access" in o.error for o in ended)
    assert any(o.new_token_ids for o in outs)  # the queued step's tokens came first
    tokens = []
    while engine.has_unfinished_requests():
        for o in engine.step():
            assert o.request_id == "c" and o.error is None
            tokens.extend(o.new_token_ids)
    assert len(tokens) == 8
    assert engine.block_manager.num_used_blocks == 0


def test_prompt_scoring_beside_overlapped_steps():
    """A request that scores its prompt (``prompt_logprobs``) makes the steps that score it run one at
    a time; the requests decoding beside it go on overlapped, and everyone gets what they get
    without overlap (the first output carries the prompt's logprobs)."""
    rng = random.Random(4)
    greedy = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    scored = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True, prompt_logprobs=2)
    jobs = {f"r{i}": (random_prompt(rng, rng.randint(5, 60)), scored if i % 3 == 1 else greedy) for i in range(9)}

    def run(overlap: str):
        engine = _engine(overlap, max_num_batched_tokens=32)
        result = run_all(engine, jobs)
        prompts = {k: [(lp.token_id, lp.rank) if lp else None for lp in outs[0].prompt_logprobs or []]
                   for k, (_, _, outs) in result.items()}
        return engine, {k: v[0] for k, v in result.items()}, prompts

    _, want, want_prompts = run("off")
    engine, got, got_prompts = run("on")
    assert got == want and got_prompts == want_prompts
    assert sum(1 for v in got_prompts.values() if v) == 3 and engine.overlapped_steps > 5
