"""The prefill queue on its own: pull order, long-poll, and dropping the work of a dead decode worker."""

from __future__ import annotations

import asyncio

from dyn_actor.actor import Actor, ActorRef, ActorServer
from dyn_actor.components.disagg_messages import Depth, Drop, Pull, Pulled, Push, QueueDepth, RemotePrefillRequest
from dyn_actor.components.prefill_queue import PrefillQueue
from dyn_actor.engine.sampling import SamplingParams
from dyn_actor.kv.descriptor import KvPoolDescriptor
from dyn_actor.transport import inproc_endpoint


class Idle(Actor):
    """Stands in for a decode worker: answers heartbeats, nothing else."""

    Message = Depth

    def handlers(self):
        return {Depth: lambda m: QueueDepth(0)}


def _req(rid: str, decoder: str, n: int = 3, computed_blocks: int = 0) -> RemotePrefillRequest:
    desc = KvPoolDescriptor("shm", "none", [8, 1, 2, 4, 1, 1], "float32")  # blocks of 4 tokens
    return RemotePrefillRequest(rid, list(range(n)), SamplingParams(), decoder, inproc_endpoint(decoder), desc,
                                list(range(-(-n // 4))), computed_blocks, 4)


async def _scenario() -> None:
    queue = PrefillQueue()
    servers = {"queue": ActorServer(queue, inproc_endpoint("pq"))}
    for name in ("dec-a", "dec-b"):
        servers[name] = ActorServer(Idle(), inproc_endpoint(name))
    tasks = [asyncio.ensure_future(s.serve()) for s in servers.values()]
    ref = await ActorRef(inproc_endpoint("pq"), "queue").start(wait_ready=5)
    try:
        # a pull waits for work, then gets it in push order
        waiting = asyncio.ensure_future(ref.ask(Pull(wait=5.0), Pulled))
        await asyncio.sleep(0.1)
        assert not waiting.done()
        await ref.tell(Push(_req("a1", "dec-a")))
        assert (await waiting).request.request_id == "a1"
        for rid, dec in [("a2", "dec-a"), ("b1", "dec-b"), ("a3", "dec-a"), ("b2", "dec-b")]:
            await ref.tell(Push(_req(rid, dec)))
        assert (await ref.ask(Depth(), QueueDepth)) == QueueDepth(4, 12)  # prompt tokens queued, for the planner
        await ref.tell(Push(_req("b3", "dec-b", n=10, computed_blocks=1)))  # 4 of its 10 tokens cached
        assert (await ref.ask(Depth(), QueueDepth)) == QueueDepth(5, 18)
        await ref.tell(Drop("b3"))
        assert (await ref.ask(Depth(), QueueDepth)) == QueueDepth(4, 12)
        # decode worker a stops answering: its queued work goes, b's stays, in order
        servers["dec-a"].stop()
        for _ in range(100):
            if (await ref.ask(Depth(), QueueDepth)).depth == 2:
                break
            await asyncio.sleep(0.1)
        assert queue.dropped == 2 and (await ref.ask(Depth(), QueueDepth)).tokens == 6
        got = [(await ref.ask(Pull(wait=0.1), Pulled)).request for _ in range(3)]
        assert [r.request_id if r else None for r in got] == ["b1", "b2", None]
        assert (await ref.ask(Depth(), QueueDepth)) == QueueDepth(0, 0)
        # a push from the dead worker afterwards is queued again only with a fresh watch, which
        # finds it dead within its heartbeat limit as well
    finally:
        await ref.close()
        for s in servers.values():
            s.stop()
        await asyncio.gather(*tasks, return_exceptions=True)


def test_queue_drops_the_work_of_a_dead_decode_worker():
    asyncio.run(_scenario())
