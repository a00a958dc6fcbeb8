"""The frontend's side of the workers: one ``WorkerClient`` per worker (its output stream,
demultiplexed per request; abort on leaving), and ``connect_workers``, which registers them with
the router and keeps them registered across stalls and restarts."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator

from dyn_actor.actor import ActorDeadError, ActorError, ActorRef
from dyn_actor.aio import wait_for
from dyn_actor.components.kv_events import KvEventFeed
from dyn_actor.components.messages import (
    AbortRequest,
    GenerateRequest,
    InfoRequest,
    OutputBatch,
    Subscribe,
    TokenDelta,
    WorkerInfo,
)
from dyn_actor.protocol import SamplingParams
from dyn_actor.router import Router

log = logging.getLogger(__name__)


class WorkerClient:
    """The frontend's side of one worker: one ``Subscribe`` stream of per-step ``OutputBatch``es,
    demultiplexed into a queue per request. The stream and the requests name the same owner, so
    that the worker sends this frontend its own requests' outputs only (not those of other
    frontends), and aborts them if this frontend goes away."""

    def __init__(self, name: str, ref: ActorRef) -> None:
        self.name = name
        self.ref = ref
        self.owner = uuid.uuid4().hex[:16]
        self._queues: dict[str, asyncio.Queue] = {}
        self._dead: ActorError | None = None
        self._task: asyncio.Task | None = None
        self.info: WorkerInfo | None = None  # what the worker said it is, at its last (re)join
        self._subscribed = asyncio.Event()  # the worker has registered the stream (its first, empty batch came)

    def start(self) -> None:
        """Open (or, after the worker came back, reopen) the output stream."""
        self._dead = None
        self._subscribed.clear()
        self._task = asyncio.ensure_future(self._pump())

    async def subscribed(self, timeout: float) -> bool:
        """Wait until the worker has the stream: a request sent before that could have its first
        outputs published to nobody."""
        try:
            await wait_for(self._subscribed.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    async def _pump(self) -> None:
        try:
            async for batch in self.ref.stream(Subscribe(self.owner), OutputBatch):
                self._subscribed.set()
                for item in batch.items:
                    q = self._queues.get(item.request_id)
                    if q is not None:
                        q.put_nowait(item)
            err: ActorError = ActorDeadError(f"{self.name} closed its output stream")
        except ActorDeadError as e:
            err = e
        except ActorError as e:
            err = ActorDeadError(f"{self.name}: {e}")
        self._dead = err
        queues, self._queues = self._queues, {}
        for q in queues.values():  # those requests are lost with the stream: each ends with the error
            q.put_nowait(err)

    async def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[TokenDelta]:
        """The request's deltas; leaving early aborts it on the worker."""
        if self._dead is not None:
            raise self._dead
        q: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = q
        finished = False
        try:
            await self.ref.tell(GenerateRequest(request_id, prompt_ids, params, self.owner))
            while True:
                item = await q.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                if item.error is not None:
                    finished = True
                    raise ActorError(item.error, item.error_type)
                yield item.delta
                if item.delta.finished:
                    finished = True
                    return
        finally:
            self._queues.pop(request_id, None)
            if not finished and self._dead is None and self.ref.alive:
                # fire and forget: this may run while the request's task is being cancelled
                asyncio.ensure_future(self.ref.tell(AbortRequest(request_id)))


async def connect_workers(endpoints: dict[str, str], router: Router, wait: float = 60.0,
                          feed: KvEventFeed | None = None, rejoin_interval: float = 1.0) -> WorkerInfo:
    """Open refs to every worker, register them with the router (and their KV-event streams with
    ``feed``), return the first worker's info.

    A worker whose heartbeat lapses is routed around at once. It may only have been stalled, or
    its supervisor restarts it at the same endpoint: its ref keeps knocking, and a worker that
    answers again is asked who it is, subscribed to afresh and routed to.
    """
    info = None
    for name, ep in endpoints.items():
        i = await _connect_worker(name, ep, router, feed, rejoin_interval, wait)
        info = info or i
    assert info is not None
    return info


async def _connect_worker(name: str, ep: str, router: Router, feed: KvEventFeed | None, rejoin_interval: float,
                          wait: float) -> WorkerInfo:
    ref = await ActorRef(ep, name).start(wait_ready=wait)
    try:
        i = await ref.ask(InfoRequest(), WorkerInfo, timeout=wait)
    except BaseException:
        await ref.close()
        raise
    client = WorkerClient(name, ref)

    async def join(info: WorkerInfo, timeout: float) -> None:
        client.info = info
        client.start()
        if not await client.subscribed(timeout):  # routed to only once its outputs have a reader
            log.warning("worker %s took over %.0f s to accept the output stream; routing to it anyway", name, timeout)
        router.add_worker(name, client)
        router.check_block_size(name, info.block_size)
        if feed is not None and info.kv_events_endpoint:
            feed.add(name, info.kv_events_endpoint, ref)

    def on_dead(_ref: ActorRef) -> None:
        router.remove_worker(name)
        if feed is not None:
            feed.remove(name)
        log.error("worker %s stopped answering; routing around it", name)

    async def rejoin() -> None:
        # the worker answers again (it was stalled, or restarted at the same endpoint): it may be a
        # new process, so ask who it is before routing to it
        try:
            info = await ref.ask(InfoRequest(), WorkerInfo, timeout=max(rejoin_interval, 5.0))
        except (ActorError, asyncio.TimeoutError):
            return  # dead again: the next revival tries again
        log.warning("worker %s answers again; routing to it", name)
        await join(info, max(rejoin_interval, 5.0))

    ref.on_dead(on_dead)
    ref.on_alive(lambda _ref: asyncio.ensure_future(rejoin()))
    await join(i, wait)
    return i
