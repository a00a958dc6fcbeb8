"""The prefill queue: decode workers push remote prefills, prefill workers pull when they have room.

A pull waits (up to its ``wait``) for work, so an idle prefill worker gets a
request the moment one is pushed, and a busy one is never handed anything. On a
box with several GPUs a pull names the cards its worker writes into directly
(``Pull.near``), and gets the oldest request for one of those first.
The queue publishes its depth on every change (and twice a second, so that a
silent queue is noticed), so decode workers never ask for it per request. It
watches (by heartbeat) every decode worker that pushed to it; when one dies,
its queued requests are dropped: nobody would read their KV. It watches every
prefill worker that pulled from it too: a ``Drop`` of a request already pulled
is passed on to the prefill worker that took it, and when that worker stops
answering, the decode workers are told (``PrefillLost``) at once rather than at
their deadline.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict

import msgspec

from dyn_actor.actor import Actor, ActorRef
from dyn_actor.aio import wait_for
from dyn_actor.components.disagg_messages import (
    CancelPrefill,
    Depth,
    Drop,
    Leave,
    PrefillLost,
    PrefillQueueMessage,
    Pull,
    Pulled,
    Push,
    QueueDepth,
    RemotePrefillRequest,
)
from dyn_actor.transport import PubSocket

log = logging.getLogger(__name__)

PUBLISH_INTERVAL = 0.5
NEAR_SCAN = 64  # queued requests a pull looks through for one on a card near its puller
PULLED_REMEMBERED = 4096  # pulled request ids kept, to pass a late Drop on to the puller


class PrefillQueue(Actor):
    Message = PrefillQueueMessage

    def __init__(self, depth_endpoint: str | None = None) -> None:
        self._items: OrderedDict[str, RemotePrefillRequest] = OrderedDict()
        self._arrived = asyncio.Event()
        self._decoders: dict[str, ActorRef] = {}  # endpoint -> heartbeat watch of a decode worker
        # request id -> (endpoint of the prefill worker that pulled it, endpoint of its decode worker)
        self._pulled: OrderedDict[str, tuple[str, str]] = OrderedDict()
        self._pullers: dict[str, ActorRef] = {}
        self._waiting: dict[str, list[_Waiting]] = {}  # puller endpoint -> its pulls waiting for work
        self._depth_endpoint = depth_endpoint
        self._pub: PubSocket | None = None
        self._publisher: asyncio.Task | None = None
        self._changed = asyncio.Event()
        self.dropped = 0

    def handlers(self):
        return {Push: self.push, Pull: self.pull, Drop: self.drop, Depth: self.depth, Leave: self.leave}

    async def on_start(self) -> None:
        if self._depth_endpoint:
            self._pub = PubSocket(self._depth_endpoint)
            self._publisher = asyncio.ensure_future(self._publish())

    async def on_stop(self) -> None:
        if self._publisher is not None:
            self._publisher.cancel()
        if self._pub is not None:
            self._pub.close()
        refs = [*self._decoders.values(), *self._pullers.values()]
        self._decoders, self._pullers = {}, {}
        for ref in refs:
            await ref.close()

    async def _publish(self) -> None:
        assert self._pub is not None
        while True:
            await self._pub.send(msgspec.msgpack.encode(self.depth(None)))
            self._changed.clear()
            try:
                await wait_for(self._changed.wait(), PUBLISH_INTERVAL)
            except asyncio.TimeoutError:
                pass

    def _set_changed(self) -> None:
        self._changed.set()

    def push(self, m: Push) -> None:
        r = m.request
        ref = self._decoders.get(r.decode_endpoint)
        if ref is None:
            ref = self._decoders[r.decode_endpoint] = ActorRef(r.decode_endpoint, r.decode_worker)
            ref.on_dead(self._decoder_died)
            asyncio.ensure_future(ref.start())
        elif not ref.alive:
            return  # from a decode worker not answering now: it takes its queued work back itself
        self._items[r.request_id] = r
        self._arrived.set()
        self._set_changed()

    def _decoder_died(self, ref: ActorRef) -> None:
        gone = [rid for rid, r in self._items.items() if r.decode_endpoint == ref.endpoint]
        for rid in gone:
            del self._items[rid]
        self.dropped += len(gone)
        self._set_changed()
        if gone:
            log.warning("decode worker %s stopped answering: dropped its %d queued prefills", ref.name, len(gone))

    def drop(self, m: Drop) -> None:
        if self._items.pop(m.request_id, None) is not None:
            self._set_changed()
            return
        pulled = self._pulled.pop(m.request_id, None)
        if pulled is not None and pulled[0] in self._pullers:
            asyncio.ensure_future(self._pullers[pulled[0]].try_tell(CancelPrefill(m.request_id)))

    def _watch_puller(self, name: str, endpoint: str) -> None:
        if endpoint in self._pullers:
            return
        ref = self._pullers[endpoint] = ActorRef(endpoint, name)
        ref.on_dead(self._puller_died)
        asyncio.ensure_future(ref.start())

    def _puller_died(self, ref: ActorRef) -> None:
        lost = [(rid, decode_ep) for rid, (ep, decode_ep) in self._pulled.items() if ep == ref.endpoint]
        for rid, decode_ep in lost:
            del self._pulled[rid]
            decoder = self._decoders.get(decode_ep)
            if decoder is not None:
                asyncio.ensure_future(decoder.try_tell(PrefillLost(rid)))
        log.warning("prefill worker %s stopped answering: %d requests it pulled go back to their decode workers",
                    ref.name, len(lost))

    def depth(self, m: Depth | None) -> QueueDepth:
        """How many requests are queued, and the prompt tokens they still need computed (the planner
        weighs a few long prompts above many short ones)."""
        return QueueDepth(len(self._items), sum(uncached_tokens(r) for r in self._items.values()))

    async def pull(self, m: Pull) -> Pulled:
        for rid in m.finished:  # no Drop or PrefillLost needs to reach these any more
            self._pulled.pop(rid, None)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, m.wait)
        me = _Waiting()
        waiting = self._waiting.setdefault(m.puller_endpoint, [])
        waiting.append(me)
        try:
            while not self._items and not me.left:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return Pulled(None)
                self._arrived.clear()
                try:
                    await wait_for(self._arrived.wait(), remaining)
                except asyncio.TimeoutError:
                    return Pulled(None)
        finally:
            waiting.remove(me)
            if not waiting and self._waiting.get(m.puller_endpoint) is waiting:
                del self._waiting[m.puller_endpoint]
        if me.left:
            return Pulled(None)
        rid = self._pick(m.near)
        req = self._items.pop(rid)
        self._set_changed()
        if m.puller_endpoint:
            self._watch_puller(m.puller, m.puller_endpoint)
            self._pulled[rid] = (m.puller_endpoint, req.decode_endpoint)
            while len(self._pulled) > PULLED_REMEMBERED:
                self._pulled.popitem(last=False)
        return Pulled(req)

    async def leave(self, m: Leave) -> None:
        """Answer ``m.puller_endpoint``'s waiting pulls with nothing, now (it is draining). A
        coroutine, so that it runs after the tasks of the calls read before it: a pull sent just
        before the ``Leave`` is waiting by then."""
        for w in self._waiting.get(m.puller_endpoint, []):
            w.left = True
        self._arrived.set()

    def _pick(self, near: list[str]) -> str:
        """The request a pull gets: the oldest whose pool is on a card the puller writes into
        directly (among the first ``NEAR_SCAN`` queued), else the oldest. A pull never waits for a
        nearer puller: it always gets something, so nothing starves."""
        oldest = next(iter(self._items))
        if not near:
            return oldest
        for i, (rid, r) in enumerate(self._items.items()):
            if i >= NEAR_SCAN:
                break
            if r.pool.card in near:
                return rid
        return oldest


class _Waiting:
    """One pull waiting for work; ``left``: its puller is draining, answer it with nothing."""

    __slots__ = ("left",)

    def __init__(self) -> None:
        self.left = False


def uncached_tokens(r: RemotePrefillRequest) -> int:
    """The prompt tokens a prefill worker will compute for ``r``: all but its cached leading blocks."""
    return max(0, len(r.prompt_token_ids) - r.num_computed_blocks * r.block_size)


def depth_endpoint(queue_endpoint: str) -> str:
    """Where the prefill queue at ``queue_endpoint`` publishes its depth."""
    if queue_endpoint.startswith("ipc://"):
        return queue_endpoint.removesuffix(".sock") + "-depth.sock"
    return queue_endpoint + "-depth"
