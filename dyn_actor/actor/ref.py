"""The caller side: ``ActorRef`` with ``tell`` / ``ask`` / ``stream``, correlation ids, deadlines,
cancellation and heartbeats.

The ref pings the actor every ``heartbeat_interval`` seconds; when no answer
has come for ``dead_after`` seconds the actor is declared dead: every pending
``ask`` and open ``stream`` fails at once with ``ActorDeadError`` and
``on_dead`` callbacks run. Nothing waits forever.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

import msgspec

from dyn_actor.actor import envelope as env
from dyn_actor.transport import DealerSocket

log = logging.getLogger(__name__)
T = TypeVar("T")


class ActorError(RuntimeError):
    """The actor answered with an error (its handler raised)."""

    def __init__(self, message: str, error_type: str | None = None) -> None:
        super().__init__(message)
        self.error_type = error_type


class ActorDeadError(ActorError):
    """The actor stopped answering heartbeats (or the ref was closed)."""


_END = object()


class ActorRef:
    def __init__(
        self,
        endpoint: str,
        name: str = "",
        heartbeat_interval: float = 0.25,
        dead_after: float = 2.0,
    ) -> None:
        self.endpoint = endpoint
        self.name = name or endpoint
        self.heartbeat_interval = heartbeat_interval
        self.dead_after = dead_after
        self._sock = DealerSocket(endpoint, identity=f"{os.getpid()}-{id(self)}".encode())
        self._cids = itertools.count(1)
        self._asks: dict[int, asyncio.Future] = {}
        self._streams: dict[int, asyncio.Queue] = {}
        self._last_seen = time.monotonic()
        self._ever_seen = False
        self._dead: ActorDeadError | None = None
        self._on_dead: list[Callable[[ActorRef], None]] = []
        self._tasks: list[asyncio.Task] = []

    # ---------------------------------------------------------------- lifecycle
    async def start(self, wait_ready: float | None = None) -> ActorRef:
        """Start reading replies and heartbeating; optionally wait until the actor answers a ping."""
        self._last_seen = time.monotonic()
        self._tasks = [asyncio.ensure_future(self._read_loop()), asyncio.ensure_future(self._heartbeat_loop())]
        if wait_ready is not None:
            deadline = time.monotonic() + wait_ready
            while not self._ever_seen:
                if self._dead is not None or time.monotonic() > deadline:
                    await self.close()  # no socket or task left behind by a failed start
                    raise ActorDeadError(f"actor {self.name} did not answer within {wait_ready}s")
                await asyncio.sleep(0.01)
        return self

    def on_dead(self, callback: Callable[[ActorRef], None]) -> None:
        self._on_dead.append(callback)

    @property
    def alive(self) -> bool:
        return self._dead is None

    async def close(self) -> None:
        self._declare_dead(ActorDeadError(f"ref to {self.name} closed"), notify=False)
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._sock.close()

    # -------------------------------------------------------------------- calls
    def _check(self) -> None:
        if self._dead is not None:
            raise self._dead

    async def tell(self, msg: msgspec.Struct) -> None:
        """Send and forget."""
        self._check()
        await self._sock.send(env.encode(env.Call(next(self._cids), env.TELL, env.raw(msg))))

    async def ask(self, msg: msgspec.Struct, reply_type: type[T], timeout: float | None = 10.0) -> T:
        """Send and wait for one reply of ``reply_type``; ``asyncio.TimeoutError`` past ``timeout``."""
        self._check()
        cid = next(self._cids)
        fut = asyncio.get_running_loop().create_future()
        self._asks[cid] = fut
        try:
            await self._sock.send(env.encode(env.Call(cid, env.ASK, env.raw(msg))))
            body = await asyncio.wait_for(fut, timeout)
        except (asyncio.TimeoutError, asyncio.CancelledError):
            await self._cancel(cid)
            raise
        finally:
            self._asks.pop(cid, None)
        return msgspec.msgpack.decode(body, type=reply_type)

    async def stream(
        self, msg: msgspec.Struct, item_type: type[T], idle_timeout: float | None = None
    ) -> AsyncIterator[T]:
        """Send and iterate the replies. Leaving the loop early cancels the stream on the actor."""
        self._check()
        cid = next(self._cids)
        queue: asyncio.Queue = asyncio.Queue()
        self._streams[cid] = queue
        decoder = msgspec.msgpack.Decoder(item_type)
        finished = False
        try:
            await self._sock.send(env.encode(env.Call(cid, env.STREAM, env.raw(msg))))
            while True:
                item = await asyncio.wait_for(queue.get(), idle_timeout)
                if item is _END:
                    finished = True
                    return
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                yield decoder.decode(item)
        finally:
            self._streams.pop(cid, None)
            if not finished:
                await self._cancel(cid)

    async def _cancel(self, cid: int) -> None:
        if self._dead is None:
            try:
                await self._sock.send(env.encode(env.Cancel(cid)))
            except Exception:  # best effort
                pass

    # ---------------------------------------------------------------- internals
    async def _read_loop(self) -> None:
        while True:
            data = await self._sock.recv()
            self._last_seen = time.monotonic()
            self._ever_seen = True
            try:
                msg = env.decode_envelope(data)
            except msgspec.DecodeError:
                log.warning("dropping an undecodable reply from %s", self.name)
                continue
            if not isinstance(msg, env.Reply):
                continue  # Pong: liveness already noted
            err = ActorError(msg.error, msg.error_type) if msg.error is not None else None
            fut = self._asks.get(msg.cid)
            if fut is not None:
                if not fut.done():
                    fut.set_exception(err) if err else fut.set_result(msg.body)
                continue
            queue = self._streams.get(msg.cid)
            if queue is not None:
                if err is not None:
                    queue.put_nowait(err)
                else:
                    if msg.has_body:
                        queue.put_nowait(msg.body)
                    if msg.end:
                        queue.put_nowait(_END)

    async def _heartbeat_loop(self) -> None:
        seq = itertools.count()
        while self._dead is None:
            try:
                # a DEALER blocks on send while it has no peer (an inproc actor that stopped): the
                # ping may not go out, but the liveness check below must still run
                await asyncio.wait_for(self._sock.send(env.encode(env.Ping(next(seq)))), self.heartbeat_interval)
            except asyncio.TimeoutError:
                pass
            await asyncio.sleep(self.heartbeat_interval)
            if time.monotonic() - self._last_seen > self.dead_after:
                self._declare_dead(ActorDeadError(f"actor {self.name} stopped answering (no heartbeat for {self.dead_after}s)"))

    def _declare_dead(self, err: ActorDeadError, notify: bool = True) -> None:
        if self._dead is not None:
            return
        self._dead = err
        for fut in self._asks.values():
            if not fut.done():
                fut.set_exception(err)
        for queue in self._streams.values():
            queue.put_nowait(err)
        if notify:
            for cb in self._on_dead:
                try:
                    cb(self)
                except Exception:
                    log.exception("on_dead callback failed")

    def __repr__(self) -> str:
        return f"ActorRef({self.name!r}, alive={self.alive})"
