"""The frontend's side of the workers' KV-event streams: subscribe, feed the router, resync.

One SUB socket per worker. Each publication (msgpack ``KvEventBatch`` or
``WorkerLoad``) goes to ``Router.apply``; when that asks for a resync, a
``KvSnapshotRequest`` goes to the worker's actor and the answer to
``Router.apply_snapshot``. A watchdog reports workers that publish nothing.
"""

from __future__ import annotations

import asyncio
import logging

import msgspec

from dyn_actor.actor import ActorError, ActorRef
from dyn_actor.components.messages import KvSnapshotRequest
from dyn_actor.kv.events import KvPublication, KvSnapshot
from dyn_actor.router import Router
from dyn_actor.transport import SubSocket

log = logging.getLogger(__name__)


class KvEventFeed:
    def __init__(self, router: Router, watch_interval: float = 1.0) -> None:
        self.router = router
        self._decoder = msgspec.msgpack.Decoder(KvPublication)
        self._socks: dict[str, SubSocket] = {}
        self._tasks: dict[str, asyncio.Task] = {}
        self._resyncing: set[str] = set()
        self._watch_interval = watch_interval
        self._watchdog: asyncio.Task | None = None

    def start(self) -> None:
        self._watchdog = asyncio.ensure_future(self._watch())

    def add(self, worker: str, endpoint: str, ref: ActorRef) -> None:
        """Follow ``worker``'s KV events (again, after ``remove``: a worker that came back)."""
        self.remove(worker)
        sock = self._socks[worker] = SubSocket(endpoint)
        self._tasks[worker] = asyncio.ensure_future(self._read(worker, sock, ref))

    def remove(self, worker: str) -> None:
        task = self._tasks.pop(worker, None)
        if task is not None:
            task.cancel()
        sock = self._socks.pop(worker, None)
        if sock is not None:
            sock.close()

    async def close(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
        for w in list(self._tasks):
            self.remove(w)

    async def _read(self, worker: str, sock: SubSocket, ref: ActorRef) -> None:
        while True:
            data = await sock.recv()
            try:
                msg = self._decoder.decode(data)
            except msgspec.DecodeError:
                log.warning("kv router: dropping an undecodable publication from %s", worker)
                continue
            if msg.worker != worker:
                log.warning("kv router: publication for %s arrived on %s's stream", msg.worker, worker)
                continue
            if self.router.apply(msg) and worker not in self._resyncing:
                self._resyncing.add(worker)
                asyncio.ensure_future(self._resync(worker, ref))

    async def _resync(self, worker: str, ref: ActorRef) -> None:
        try:
            snap = await ref.ask(KvSnapshotRequest(), KvSnapshot, timeout=5.0)
        except (ActorError, asyncio.TimeoutError) as e:
            log.warning("kv router: snapshot of %s failed (%s); retrying on its next publication", worker, e)
            self.router.resync_failed(worker)
        else:
            self.router.apply_snapshot(snap)
        finally:
            self._resyncing.discard(worker)
        if self.router.workers.get(worker) is not None and self.router.workers[worker].kv.state == "resync":
            self._resyncing.add(worker)  # the snapshot left a hole: go again
            asyncio.ensure_future(self._resync(worker, ref))

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self._watch_interval)
            self.router.check_silent()
