"""The prefill queue: decode workers push remote prefills, prefill workers pull when they have room.

A pull waits (up to its ``wait``) for work, so an idle prefill worker gets a
request the moment one is pushed, and a busy one is never handed anything.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict

from dyn_actor.actor import Actor
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


class PrefillQueue(Actor):
    Message = PrefillQueueMessage

    def __init__(self) -> None:
        self._items: OrderedDict[str, RemotePrefillRequest] = OrderedDict()
        self._arrived = asyncio.Event()

    def handlers(self):
        return {Push: self.push, Pull: self.pull, Drop: self.drop, Depth: self.depth}

    def push(self, m: Push) -> None:
        self._items[m.request.request_id] = m.request
        self._arrived.set()

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
