"""The prefill queue on its own: pull order, long-poll, and dropping the work of a dead decode worker."""

from __future__ import annotations

import asyncio
import contextlib

from dyn_actor.actor import Actor, ActorRef, ActorServer
from dyn_actor.components.disagg_messages import (
    Depth,
    Drop,
    Leave,
    Pull,
    Pulled,
    Push,
    QueueDepth,
    RemotePrefillRequest,
)
from dyn_actor.components.prefill_queue import PrefillQueue
from dyn_actor.engine.sampling import SamplingParams
from dyn_actor.kv.descriptor import KvPoolDescriptor
from dyn_actor.transport import inproc_endpoint


class Idle(Actor):
    """Stands in for a decode worker: answers heartbeats, nothing else."""

    Message = Depth

    def handlers(self):
        return {Depth: lambda m: QueueDepth(0)}


def _req(rid: str, decoder: str, n: int = 3, computed_blocks: int = 0, card: str = "") -> RemotePrefillRequest:
    desc = KvPoolDescriptor("shm", "none", [8, 1, 2, 4, 1, 1], "float32", card=card)  # blocks of 4 tokens
    return RemotePrefillRequest(rid, list(range(n)), SamplingParams(), decoder, inproc_endpoint(decoder), desc,
                                list(range(-(-n // 4))), computed_blocks, 4)


@contextlib.asynccontextmanager
async def _queue_beside(name: str, peers: tuple[str, ...]):
    """A prefill queue serving at ``name`` with an ``Idle`` actor for each of ``peers`` (decode or
    prefill workers it watches): (the queue, a ref to it); all stopped after."""
    queue = PrefillQueue()
    servers = [ActorServer(queue, inproc_endpoint(name)), *(ActorServer(Idle(), inproc_endpoint(p)) for p in peers)]
    tasks = [asyncio.ensure_future(s.serve()) for s in servers]
    ref = await ActorRef(inproc_endpoint(name), "queue").start(wait_ready=5)
    try:
        yield queue, ref, servers
    finally:
        await ref.close()
        for server in servers:
            server.stop()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _scenario() -> None:
    async with _queue_beside("pq", ("dec-a", "dec-b")) as (queue, ref, servers):
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
        servers[1].stop()  # dec-a
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


def test_queue_drops_the_work_of_a_dead_decode_worker():
    asyncio.run(_scenario())


async def _near_scenario() -> None:
    """On a box with several GPUs a pull names the cards its worker writes into directly, and gets the
    oldest request for one of them first; with none queued, the oldest of all (nothing waits for a
    nearer puller)."""
    async with _queue_beside("pq-near", ("dec-0", "dec-1")) as (queue, ref, servers):
        for rid, dec, card in [("x1", "dec-0", "GPU-0"), ("x2", "dec-0", "GPU-0"), ("y1", "dec-1", "GPU-1"),
                               ("x3", "dec-0", "GPU-0"), ("y2", "dec-1", "GPU-1")]:
            await ref.tell(Push(_req(rid, dec, card=card)))

        async def pull(near: list[str]) -> str | None:
            r = (await ref.ask(Pull(wait=0.1, near=near), Pulled)).request
            return r.request_id if r else None

        assert await pull(["GPU-1"]) == "y1"  # the oldest for its own card, not the oldest overall
        assert await pull(["GPU-2", "GPU-0"]) == "x1"  # a peer card's counts too
        assert await pull([]) == "x2"  # no preference: the oldest
        assert await pull(["GPU-1"]) == "y2"
        assert await pull(["GPU-1"]) == "x3"  # none for its cards left: the oldest of the others
        assert await pull(["GPU-1"]) is None


def test_a_pull_gets_the_oldest_request_for_a_card_near_its_worker_first():
    asyncio.run(_near_scenario())


async def _leave_scenario() -> None:
    """A draining prefill worker's waiting pulls come back empty at its ``Leave``, not at the end of
    their wait; another puller's pulls go on waiting, and get the next request."""
    async with _queue_beside("pq-leave", ("dec", "pf-1")) as (queue, ref, servers):
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        mine = [asyncio.ensure_future(ref.ask(Pull(30.0, "pf-0", "ep-0"), Pulled)) for _ in range(2)]
        other = asyncio.ensure_future(ref.ask(Pull(30.0, "pf-1", inproc_endpoint("pf-1")), Pulled))
        await asyncio.sleep(0.1)
        await ref.tell(Leave("ep-0"))
        got = await asyncio.wait_for(asyncio.gather(*mine), 5)
        assert [p.request for p in got] == [None, None] and loop.time() - t0 < 5
        await asyncio.sleep(0.1)
        assert not other.done()
        # a pull sent right before the Leave (read in the same batch) is answered at once too
        late = asyncio.ensure_future(ref.ask(Pull(30.0, "pf-0", "ep-0"), Pulled))
        await asyncio.sleep(0)  # the pull is sent, then at once the Leave
        await ref.tell(Leave("ep-0"))
        assert (await asyncio.wait_for(late, 5)).request is None
        await ref.tell(Push(_req("r1", "dec")))
        assert (await asyncio.wait_for(other, 5)).request.request_id == "r1"
        assert not queue._waiting  # nothing left registered


def test_leave_answers_the_draining_pullers_waiting_pulls_at_once():
    asyncio.run(_leave_scenario())
