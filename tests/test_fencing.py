"""Fencing: a remote prefill that misses its deadline can never write into blocks that were reused.

In one process (inproc actors, the test playing the prefill worker): a write
grant asked for after the deadline is refused; blocks granted before it stay
out of circulation until the writer is known to be done. On real processes: a
prefill worker frozen with SIGSTOP past the deadline, the blocks reused by
other requests, then the worker let go: the others' cached KV is unchanged.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import signal
import time

import requests

from dyn_actor.actor import Actor, ActorRef, ActorServer
from dyn_actor.components.decode_worker import DecodeWorker
from dyn_actor.components.disagg import DisaggPolicy
from dyn_actor.components.disagg_messages import (
    BeginWrite,
    Pull,
    Pulled,
    RemotePrefillDone,
    WriteGrant,
    WriteState,
    WriteStatus,
)
from dyn_actor.components.messages import StatsRequest, WorkerStats
from dyn_actor.components.prefill_queue import PrefillQueue, depth_endpoint
from dyn_actor.components.worker_client import WorkerClient
from dyn_actor.engine import EngineConfig, LLMEngine, SamplingParams
from tests.helpers import eventually, metric, random_prompt, run_all
from tests.server import Server, own_segments

GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)


class FakeWriter(Actor):
    """Plays the prefill worker's side of a fence: says whether it is still writing."""

    Message = WriteStatus

    def __init__(self) -> None:
        self.active = True

    def handlers(self):
        return {WriteStatus: lambda m: WriteState(self.active)}


def _engine() -> LLMEngine:
    return LLMEngine(EngineConfig(num_kv_blocks=64, max_model_len=512, shared_kv=True))


async def _fence_scenario() -> None:
    rng = random.Random(3)
    prompts = {"granted": random_prompt(rng, 100), "late": random_prompt(rng, 90)}
    expected = run_all(LLMEngine(EngineConfig(num_kv_blocks=64, max_model_len=512)),
                       {k: (p, GREEDY) for k, p in prompts.items()})
    q_ep, d_ep, w_ep = "inproc://fq", "inproc://fdecode", "inproc://fwriter"
    engine = _engine()
    writer = FakeWriter()
    decode = DecodeWorker("decode-0", engine, d_ep, q_ep, DisaggPolicy(0, 8, remote_prefill_timeout=0.5))
    servers = [ActorServer(PrefillQueue(depth_endpoint(q_ep)), q_ep), ActorServer(decode, d_ep),
               ActorServer(writer, w_ep)]
    tasks = []
    for s in servers:
        tasks.append(asyncio.ensure_future(s.serve()))
        await asyncio.sleep(0.05)
    queue = await ActorRef(q_ep, "queue").start(wait_ready=5)
    ref = await ActorRef(d_ep, "decode").start(wait_ready=5)
    client = WorkerClient("decode-0", ref)
    client.start()

    async def run(rid):
        toks = []
        async for d in client.generate(rid, prompts[rid], GREEDY):
            toks.extend(d.token_ids)
        return toks

    async def stats() -> WorkerStats:
        return await ref.ask(StatsRequest(), WorkerStats)

    try:
        await asyncio.sleep(0.7)  # the decode worker has heard the queue's depth
        # 1. granted before the deadline, then silent: the blocks are fenced, the prompt computed afresh
        job = asyncio.ensure_future(run("granted"))
        r = (await queue.ask(Pull(wait=5.0, puller="fake", puller_endpoint=w_ep), Pulled)).request
        assert r is not None and r.request_id == "granted"
        grant = await ref.ask(BeginWrite("granted", "fake", w_ep, os.getpid()), WriteGrant)
        assert grant.ok
        assert await asyncio.wait_for(job, 20) == expected["granted"][0]
        s = await stats()
        assert s.remote_prefill_timeouts == 1
        assert s.kv_blocks_fenced == len(r.block_ids)
        assert all(engine.block_manager.blocks[b].ref_cnt > 0 for b in r.block_ids)  # not reusable
        await asyncio.sleep(1.5)  # the writer still says it is writing: the fence holds
        assert (await stats()).kv_blocks_fenced == len(r.block_ids)
        writer.active = False  # the writer is done (its report lost): the next check lifts the fence
        for _ in range(50):
            if (await stats()).kv_blocks_fenced == 0:
                break
            await asyncio.sleep(0.1)
        s = await stats()
        assert s.kv_blocks_fenced == 0 and s.kv_blocks_used == 0
        # a late report of the same request is ignored
        await ref.tell(RemotePrefillDone("granted", 1))

        # 2. the deadline passes before anyone asks to write: the grant is refused, nothing fenced
        job = asyncio.ensure_future(run("late"))
        r = (await queue.ask(Pull(wait=5.0, puller="fake", puller_endpoint=w_ep), Pulled)).request
        assert r is not None and r.request_id == "late"
        await asyncio.sleep(0.8)
        assert not (await ref.ask(BeginWrite("late", "fake", w_ep, os.getpid()), WriteGrant)).ok
        assert await asyncio.wait_for(job, 20) == expected["late"][0]
        s = await stats()
        assert s.remote_prefill_timeouts == 2 and s.kv_blocks_fenced == 0 and s.kv_blocks_used == 0

        # 3. the frontend goes away (its stream ends) after a grant: the blocks wait for the writer
        job = asyncio.ensure_future(run("granted"))
        r = (await queue.ask(Pull(wait=5.0, puller="fake", puller_endpoint=w_ep), Pulled)).request
        assert (await ref.ask(BeginWrite("granted", "fake", w_ep, os.getpid()), WriteGrant)).ok
        client._task.cancel()  # the frontend's subscription ends: every request of it is aborted
        await asyncio.sleep(0.3)
        assert all(engine.block_manager.blocks[b].ref_cnt > 0 for b in r.block_ids[:-1])  # not freed yet
        await ref.tell(RemotePrefillDone("granted", 1))  # the writer is done: now they go
        for _ in range(50):
            if (await stats()).kv_blocks_used == 0:
                break
            await asyncio.sleep(0.1)
        s = await stats()
        assert s.kv_blocks_used == 0 and s.kv_blocks_fenced == 0 and s.remote_prefill_timeouts == 2
        job.cancel()
        client.start()  # the frontend is back

        # 4. a remote prefill that completes: its first token is streamed first, even when the next
        #    step's tokens are ready before the event loop gets to it
        job = asyncio.ensure_future(run("late"))
        r = (await queue.ask(Pull(wait=5.0, puller="fake", puller_endpoint=w_ep), Pulled)).request
        assert r is not None and (await ref.ask(BeginWrite("late", "fake", w_ep, os.getpid()), WriteGrant)).ok
        await ref.tell(RemotePrefillDone("late", 77))
        await asyncio.sleep(0.02)  # the decode worker hands it to its engine thread ...
        time.sleep(0.3)  # ... which resumes the request and runs steps while the event loop is held up
        toks = await asyncio.wait_for(job, 20)
        assert toks[0] == 77 and len(toks) == GREEDY.max_tokens
    finally:
        await queue.close()
        await ref.close()
        for s in servers:
            s.stop()
        await asyncio.gather(*tasks)


def test_a_write_granted_before_the_deadline_fences_the_blocks_and_a_late_one_is_refused():
    before = set(own_segments())
    asyncio.run(_fence_scenario())
    assert set(own_segments()) <= before  # no segment of ours is left


# ------------------------------------------------------------------ real processes


def _complete(s: Server, prompt: list[int]) -> dict:
    r = requests.post(s.base_url + "/completions", timeout=60, json={
        "prompt": prompt, "max_tokens": 4, "temperature": 0, "ignore_eos": True, "logprobs": 0})
    assert r.status_code == 200, r.text
    c = r.json()["choices"][0]
    return {"tokens": c["logprobs"]["tokens"], "logprobs": c["logprobs"]["token_logprobs"]}


def _policy(s: Server, max_local: int) -> None:
    r = requests.post(s.url + "/v1/disagg/policy", json={"max_local_prefill_length": max_local}, timeout=10)
    assert r.status_code == 200, r.text


def _close(a: dict, b: dict) -> bool:
    return a["tokens"] == b["tokens"] and max(abs(x - y) for x, y in zip(a["logprobs"], b["logprobs"])) < 1e-3


def test_a_frozen_prefill_worker_never_corrupts_reused_blocks():
    """The outside tester's case, 10 times: a long prompt goes remote to a prefill worker that is
    frozen past the 0.5 s deadline; the decode worker computes it itself and frees its blocks;
    other prompts reuse them and are cached; the prefill worker is let go (its late work would
    land in those blocks); the others, asked again from the prefix cache, answer exactly the same.
    (The tester's prompt had 2,000 tokens; a quarter of that, in a pool a quarter the size, fills
    the pool the same way in a quarter of the time.)"""
    s = Server("--topology", "1p1d", "--max-local-prefill-length", "0", "--remote-prefill-timeout", "0.5",
               "--kv-cache-memory-gb", "0.005")
    rng = random.Random(7)
    try:
        prefill = s.pids()["prefill 0"]
        for i in range(10):
            _policy(s, 0)
            os.kill(prefill, signal.SIGSTOP)
            try:
                late = random_prompt(rng, 500)
                first = _complete(s, late)  # times out remotely, computed by the decode worker
                # three more prompts fill 75 of the pool's 81 blocks: they reuse the freed ones
                _policy(s, 100_000)
                others = [random_prompt(rng, 400) for _ in range(3)]
                answers = [_complete(s, p) for p in others]
            finally:
                os.kill(prefill, signal.SIGCONT)
            time.sleep(1.0)  # the prefill worker's late work, if any, has landed by now
            again = [_complete(s, p) for p in others]
            for a, b in zip(answers, again):
                assert _close(a, b), f"round {i}: cached KV changed: {a} vs {b}"
            assert _close(first, _complete(s, late)), f"round {i}: the timed-out prompt's answer differs"
            assert eventually(lambda n=i + 1: metric(s, "dyn_worker_remote_prefill_timeouts_total") == n)
        # and the prefill worker still serves: a long prompt goes remote again
        _policy(s, 0)
        remote = metric(s, "dyn_remote_prefills_total")
        _complete(s, random_prompt(rng, 600))
        assert metric(s, "dyn_remote_prefills_total") == remote + 1
        assert eventually(lambda: metric(s, "dyn_worker_kv_blocks_fenced") == 0)
        assert eventually(lambda: metric(s, "dyn_worker_kv_blocks_used") == 0)
    finally:
        code, err = s.stop()
    assert code == 0, err[-3000:]
    assert err.count("timed out after 0.5s") == 10, err[-3000:]
    assert not re.search(r"\bERROR\b", err), err[-3000:]
