"""The worker actor and the frontend's WorkerClient in one process (inproc://), no launcher."""

from __future__ import annotations

import asyncio

import pytest

from dyn_actor.actor import ActorError, ActorRef, ActorServer
from dyn_actor.components.messages import StatsRequest, WorkerStats
from dyn_actor.components.worker import Worker
from dyn_actor.components.worker_client import WorkerClient
from dyn_actor.engine import EngineConfig, LLMEngine, SamplingParams
from dyn_actor.transport import inproc_endpoint
from tests.helpers import run_all

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


async def _with_worker(name: str, body, worker_too: bool = False):
    engine = LLMEngine(EngineConfig(num_kv_blocks=64, max_model_len=512))
    endpoint = inproc_endpoint(name)
    worker = Worker(name, engine)
    server = ActorServer(worker, endpoint)
    task = asyncio.ensure_future(server.serve())
    ref = await ActorRef(endpoint, name).start(wait_ready=5)
    client = WorkerClient(name, ref)
    client.start()
    try:
        await (body(client, engine, worker) if worker_too else body(client, engine))
    finally:
        await ref.close()
        server.stop()
        await task


def test_concurrent_requests_match_the_engine_alone():
    prompts = {f"r{i}": [0] + [5 + i + j for j in range(10 + 7 * i)] for i in range(4)}
    expected = run_all(LLMEngine(EngineConfig(num_kv_blocks=64, max_model_len=512)),
                       {k: (p, GREEDY) for k, p in prompts.items()})

    async def body(client: WorkerClient, engine: LLMEngine):
        async def one(rid):
            toks = []
            async for d in client.generate(rid, prompts[rid], GREEDY):
                toks.extend(d.token_ids)
            return rid, toks

        got = dict(await asyncio.gather(*(one(r) for r in prompts)))
        assert got == {k: v[0] for k, v in expected.items()}
        stats = await client.ref.ask(StatsRequest(), WorkerStats)
        assert stats.kv_blocks_used == 0 and stats.generated_tokens == 48

    asyncio.run(_with_worker("w-concurrent", body))


def test_leaving_early_aborts_and_bad_input_is_an_error():
    async def body(client: WorkerClient, engine: LLMEngine):
        n = 0
        async for d in client.generate("long", [0, 5, 6], SamplingParams(max_tokens=400, ignore_eos=True)):
            n += len(d.token_ids)
            if n >= 3:
                break
        for _ in range(100):
            if engine.block_manager.num_used_blocks == 0 and not engine.has_unfinished_requests():
                break
            await asyncio.sleep(0.01)
        assert engine.block_manager.num_used_blocks == 0
        # the frontend checks requests (tests/test_bad_input.py); the worker trusts them but asserts
        # what a step relies on, so a malformed one ends alone instead of failing a batch
        with pytest.raises(ActorError, match="token ids") as e:
            async for _ in client.generate("bad", [0, 10**6], GREEDY):
                pass
        assert e.value.error_type == "AssertionError"

    asyncio.run(_with_worker("w-abort", body))


def test_a_burst_of_32_requests_is_admitted_at_one_engine_step():
    """The mailbox does not wait for the engine thread: requests that arrive while the engine thread
    is busy (held here by a command of the test's) queue up and reach the engine at one step
    boundary, so all 32 get their first token in the same step."""
    import threading

    from dyn_actor.components.messages import GenerateRequest, OutputBatch, Subscribe

    async def body(client: WorkerClient, engine: LLMEngine, worker: Worker):
        ref = client.ref
        steps: list[set[str]] = []  # request ids that got their first token, per output batch
        seen: set[str] = set()
        done = asyncio.Event()
        ids = [f"burst-{i}" for i in range(32)]

        async def watch():
            async for batch in ref.stream(Subscribe(), OutputBatch):
                firsts = {it.request_id for it in batch.items if it.request_id not in seen}
                if firsts:
                    seen.update(firsts)
                    steps.append(firsts)
                if seen >= set(ids):
                    done.set()

        watcher = asyncio.ensure_future(watch())
        await asyncio.sleep(0.2)
        busy, release = threading.Event(), threading.Event()
        held = worker._thread.submit(lambda engine: (busy.set(), release.wait(30)))
        assert await asyncio.get_running_loop().run_in_executor(None, busy.wait, 10)
        for i, rid in enumerate(ids):
            await ref.tell(GenerateRequest(rid, [0, 5 + i, 6, 7], SamplingParams(max_tokens=2, temperature=0)))
        for _ in range(1000):  # every request is in the engine thread's queue, behind the held command
            if worker._thread._cmds.qsize() >= len(ids):
                break
            await asyncio.sleep(0.01)
        assert worker._thread._cmds.qsize() >= len(ids)
        release.set()
        await held
        await asyncio.wait_for(done.wait(), 30)
        watcher.cancel()
        assert len(steps) == 1, [len(s) for s in steps]

    asyncio.run(_with_worker("w-burst", body, worker_too=True))


def test_a_worker_whose_engine_thread_dies_stops_instead_of_lingering():
    """The engine thread raising ends the actor: ``serve`` raises, so its process exits (and the
    launcher restarts it), and the request in flight ends with an error rather than hanging."""
    engine = LLMEngine(EngineConfig(num_kv_blocks=64, max_model_len=512))

    def broken_step():
        raise RuntimeError("device lost")

    engine.step = broken_step

    async def main():
        endpoint = inproc_endpoint("w-dies")
        server = ActorServer(Worker("w-dies", engine), endpoint)
        task = asyncio.ensure_future(server.serve())
        ref = await ActorRef(endpoint, "w-dies", heartbeat_interval=0.1, dead_after=0.5).start(wait_ready=5)
        client = WorkerClient("w-dies", ref)
        client.start()
        with pytest.raises(ActorError):
            async for _ in client.generate("r", [0, 5, 6], GREEDY):
                pass
        with pytest.raises(RuntimeError, match="engine thread died"):
            await asyncio.wait_for(task, 5)
        await ref.close()

    asyncio.run(main())


def test_a_failing_step_is_an_error_for_its_requests_and_the_worker_goes_on():
    async def body(client: WorkerClient, engine: LLMEngine):
        forward = engine.model.forward

        def broken(*args, **kwargs):
            engine.model.forward = forward  # fails once
            raise RuntimeError("device lost")

        engine.model.forward = broken
        with pytest.raises(ActorError, match="device lost") as e:
            async for _ in client.generate("doomed", [0, 5, 6], GREEDY):
                pass
        assert e.value.error_type == "EngineError"  # the server's fault: a 500, not a 400
        toks = []
        async for d in client.generate("next", [0, 5, 6], GREEDY):
            toks.extend(d.token_ids)
        assert len(toks) == 12 and engine.block_manager.num_used_blocks == 0

    asyncio.run(_with_worker("w-step-fails", body))


def test_outputs_a_command_produces_are_published_before_the_steps_after_it():
    """A command's own outputs (a remote prefill's first token) must reach the subscribers before
    the tokens of the steps that follow it. A done callback of the command's future would run after
    step outputs already queued on a busy event loop: ``submit_publishing`` keeps them in order."""
    import time

    from dyn_actor.components.engine_thread import EngineThread
    from dyn_actor.engine.engine import RequestOutput

    async def main():
        engine = LLMEngine(EngineConfig(num_kv_blocks=64, max_model_len=512))
        events: list[str] = []
        loop = asyncio.get_running_loop()
        thread = EngineThread(engine, loop, lambda outs: events.extend(f"step:{o.request_id}" for o in outs))
        thread.start()
        try:
            def start(rid):
                def cmd(e):
                    e.add_request(rid, [0, 5, 6], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
                    return [RequestOutput(request_id=rid, new_token_ids=[1])]
                return cmd

            fut = thread.submit(start("late"))  # the order a done callback gives
            fut.add_done_callback(lambda f: events.append(f"first:{f.result()[0].request_id}"))
            time.sleep(0.3)  # the event loop is busy while the engine thread runs the command and steps
            await asyncio.sleep(0.2)
            assert events.index("first:late") > events.index("step:late")
            thread.submit_publishing(start("kept"), lambda outs: events.append(f"first:{outs[0].request_id}"))
            time.sleep(0.3)
            await asyncio.sleep(0.2)
            assert events.index("first:kept") < events.index("step:kept")
        finally:
            thread.stop()

    asyncio.run(main())


def test_each_frontend_gets_its_own_requests_and_one_leaving_aborts_only_its_own():
    """Two frontends subscribed to one worker (``--frontends 2``): each stream carries only the
    outputs of the requests its owner started; when one stream ends (its frontend went away), the
    worker aborts that frontend's requests and the other's run on to the end."""
    from dyn_actor.components.messages import GenerateRequest, OutputBatch, Subscribe

    async def main():
        engine = LLMEngine(EngineConfig(num_kv_blocks=64, max_model_len=512))
        ep = inproc_endpoint("w-owners")
        server = ActorServer(Worker("w-owners", engine), ep)
        task = asyncio.ensure_future(server.serve())
        ref_a = await ActorRef(ep, "w-owners").start(wait_ready=5)
        ref_b = await ActorRef(ep, "w-owners").start(wait_ready=5)
        a = WorkerClient("w-owners", ref_a)
        a.start()
        assert await a.subscribed(5)
        seen_by_b: list[str] = []
        b_done = asyncio.Event()
        b_started = asyncio.Event()

        async def b_stream(stop_after: str):
            async for batch in ref_b.stream(Subscribe("frontend-b"), OutputBatch):
                b_started.set()
                for it in batch.items:
                    seen_by_b.append(it.request_id)
                    if it.request_id == stop_after and it.delta is not None and it.delta.finished:
                        b_done.set()
                        return
                    if it.request_id == "rb-long" and seen_by_b.count("rb-long") >= 3:
                        return  # frontend b goes away with rb-long running

        async def a_tokens(rid: str, prompt: list[int], params: SamplingParams) -> list[int]:
            toks = []
            async for d in a.generate(rid, prompt, params):
                toks.extend(d.token_ids)
            return toks

        try:
            reader = asyncio.ensure_future(b_stream("rb"))
            await asyncio.wait_for(b_started.wait(), 5)
            await ref_b.tell(GenerateRequest("rb", [0, 7, 8, 9], GREEDY, "frontend-b"))
            got = await a_tokens("ra", [0, 5, 6, 7, 8], GREEDY)
            await asyncio.wait_for(b_done.wait(), 30)
            await reader
            assert len(got) == 12
            assert set(seen_by_b) == {"rb"}  # nothing of a's request reached b's stream
            # b again, with a long request; it leaves after three deltas while a's runs on
            seen_by_b.clear()
            b_started.clear()
            reader = asyncio.ensure_future(b_stream("never"))
            await asyncio.wait_for(b_started.wait(), 5)
            long = SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)
            await ref_b.tell(GenerateRequest("rb-long", [0, 9, 9], long, "frontend-b"))
            a_long = asyncio.ensure_future(a_tokens("ra-long", [0, 5, 5], SamplingParams(
                max_tokens=60, temperature=0, ignore_eos=True)))
            await asyncio.wait_for(reader, 30)
            assert len(await asyncio.wait_for(a_long, 60)) == 60  # a's request was not touched
            for _ in range(200):
                if engine.block_manager.num_used_blocks == 0 and not engine.has_unfinished_requests():
                    break
                await asyncio.sleep(0.01)
            assert not engine.has_unfinished_requests()  # rb-long was aborted, not left to run 400 tokens
            assert engine.block_manager.num_used_blocks == 0
            stats = await ref_a.ask(StatsRequest(), WorkerStats)
            assert stats.generated_tokens < 12 + 12 + 60 + 100
        finally:
            await ref_a.close()
            await ref_b.close()
            server.stop()
            await task

    asyncio.run(main())
