"""The prefill queue: decode workers push remote prefills, prefill workers pull when they have room.

A pull waits (up to its ``wait``) for work, so an idle prefill worker gets a
request the moment one is pushed, and a busy one is never handed anything.
The queue watches (by heartbeat) every decode worker that pushed to it; when
one dies, its queued requests are dropped: nobody would read their KV.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict

from dyn_actor.actor import Actor, ActorRef
from dyn_actor.components.disagg_messages import (
    Depth,
    Drop,
    PrefillQueueMessage,
    Pull,
    Pulled,
    Push,
    QueueDepth,
    RemotePrefillRequest,
)

log = logging.getLogger(__name__)


class PrefillQueue(Actor):
    Message = PrefillQueueMessage

    def __init__(self) -> None:
        self._items: OrderedDict[str, RemotePrefillRequest] = OrderedDict()
        self._arrived = asyncio.Event()
        self._decoders: dict[str, ActorRef] = {}  # endpoint -> heartbeat watch of a decode worker
        self.dropped = 0

    def handlers(self):
        return {Push: self.push, Pull: self.pull, Drop: self.drop, Depth: self.depth}

    async def on_stop(self) -> None:
        refs, self._decoders = list(self._decoders.values()), {}
        for ref in refs:
            await ref.close()

    async def push(self, m: Push) -> None:
        r = m.request
        ref = self._decoders.get(r.decode_endpoint)
        if ref is None:
            ref = self._decoders[r.decode_endpoint] = await ActorRef(r.decode_endpoint, r.decode_worker).start()
            ref.on_dead(self._decoder_died)
        elif not ref.alive:
            return  # from a decode worker already known dead
        self._items[r.request_id] = r
        self._arrived.set()

    def _decoder_died(self, ref: ActorRef) -> None:
        if self._decoders.get(ref.endpoint) is ref:
            del self._decoders[ref.endpoint]  # a restarted worker at the same endpoint gets a new watch
        gone = [rid for rid, r in self._items.items() if r.decode_endpoint == ref.endpoint]
        for rid in gone:
            del self._items[rid]
        self.dropped += len(gone)
        log.warning("decode worker %s is gone: dropped its %d queued prefills", ref.name, len(gone))

    def drop(self, m: Drop) -> None:
        self._items.pop(m.request_id, None)

    def depth(self, m: Depth) -> QueueDepth:
        return QueueDepth(len(self._items))

    async def pull(self, m: Pull) -> Pulled:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, m.wait)
        while not self._items:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return Pulled(None)
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except asyncio.TimeoutError:
                return Pulled(None)
        _, req = self._items.popitem(last=False)
        return Pulled(req)
