"""The caller side: ``ActorRef`` with ``tell`` / ``ask`` / ``stream``, correlation ids, deadlines,
cancellation and heartbeats.

The ref pings the actor every ``heartbeat_interval`` seconds; when no answer
has come for ``dead_after`` seconds the actor is declared dead: every pending
``ask`` and open ``stream`` fails at once with ``ActorDeadError``, calls fail
fast, and ``on_dead`` callbacks run. Nothing waits forever.

A ref declared dead keeps knocking: the moment the actor answers again (it was
only stalled, or a supervisor restarted it at the same endpoint) the ref is
alive again, cancels on the actor the streams it gave up on, and runs its
``on_alive`` callbacks. So a stall costs only its own duration. An actor that was
restarted between two heartbeats (it answers with a new incarnation) is treated
as one that died and came back: what was pending on the old run fails, and the
``on_dead`` then ``on_alive`` callbacks run, so callers re-register with it. Time during
which this process's own event loop was stalled is not held against the peer.
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
from dyn_actor.aio import wait_for
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
        self._starting = False  # in start(wait_ready=...): not declared dead before its first answer
        self._dead: ActorDeadError | None = None
        self._closed = False
        self._on_dead: list[Callable[[ActorRef], None]] = []
        self._on_alive: list[Callable[[ActorRef], None]] = []
        self._orphans: list[int] = []  # asks and streams open when the actor was declared dead: cancelled on revival
        self._tasks: list[asyncio.Task] = []
        self._incarnation = 0  # the actor's run that last answered a ping (0: none yet)
        self.deaths = 0  # times declared dead (each followed by a revival, or not)

    # ---------------------------------------------------------------- lifecycle
    async def start(self, wait_ready: float | None = None) -> ActorRef:
        """Start reading replies and heartbeating; optionally wait until the actor answers a ping."""
        self._last_seen = time.monotonic()
        self._tasks = [asyncio.ensure_future(self._read_loop()), asyncio.ensure_future(self._heartbeat_loop())]
        if wait_ready is not None:
            # an actor still starting (its process importing, loading weights) is waited for, not
            # declared dead after ``dead_after``: the heartbeat loop leaves it alone until then
            self._starting = True
            deadline = time.monotonic() + wait_ready
            try:
                while not self._ever_seen:
                    if self._dead is not None or time.monotonic() > deadline:
                        await self.close()  # no socket or task left behind by a failed start
                        raise ActorDeadError(f"actor {self.name} did not answer within {wait_ready}s")
                    await asyncio.sleep(0.01)
            finally:
                self._starting = False
        return self

    def on_dead(self, callback: Callable[[ActorRef], None]) -> None:
        self._on_dead.append(callback)

    def on_alive(self, callback: Callable[[ActorRef], None]) -> None:
        """Run ``callback(ref)`` each time the actor answers again after being declared dead."""
        self._on_alive.append(callback)

    @property
    def alive(self) -> bool:
        return self._dead is None

    @property
    def closed(self) -> bool:
        return self._closed

    async def close(self) -> None:
        self._closed = True
        self._declare_dead(ActorDeadError(f"ref to {self.name} closed"), notify=False)
        self._dead = ActorDeadError(f"ref to {self.name} closed")
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

    async def try_tell(self, msg: msgspec.Struct) -> bool:
        """``tell`` for a message that is moot once the actor is gone: False instead of an error."""
        try:
            await self.tell(msg)
        except ActorError:
            return False
        return True

    async def ask(self, msg: msgspec.Struct, reply_type: type[T], timeout: float | None = 10.0) -> T:
        """Send and wait for one reply of ``reply_type``; ``asyncio.TimeoutError`` past ``timeout``."""
        self._check()
        cid = next(self._cids)
        fut = asyncio.get_running_loop().create_future()
        self._asks[cid] = fut
        try:
            await self._sock.send(env.encode(env.Call(cid, env.ASK, env.raw(msg))))
            body = await wait_for(fut, timeout)
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
                item = await wait_for(queue.get(), idle_timeout)
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
            was_dead = self._dead is not None
            if was_dead and not self._closed:
                await self._revive()
            try:
                msg = env.decode_envelope(data)
            except msgspec.DecodeError:
                log.warning("dropping an undecodable reply from %s", self.name)
                continue
            if isinstance(msg, env.Pong):
                await self._note_incarnation(msg.incarnation, restarted_unseen=not was_dead)
                continue
            if not isinstance(msg, env.Reply):
                continue
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

    async def _note_incarnation(self, incarnation: int, restarted_unseen: bool) -> None:
        """A pong from a new run of the actor: the old run died, whatever it held is gone. Where its
        death went unseen (the restart fell between two heartbeats), it is declared now. Calls made
        since the restart may have reached the new run: they fail too, and are cancelled there (a
        pull nobody waits for any more must not take the queue's next request)."""
        if not incarnation or incarnation == self._incarnation:
            return
        known, self._incarnation = self._incarnation, incarnation
        if known and restarted_unseen and not self._closed:
            log.warning("actor %s was restarted: what was pending on its last run fails", self.name)
            self._declare_dead(ActorDeadError(f"actor {self.name} was restarted"))
            await self._revive()

    async def _revive(self) -> None:
        self._dead = None
        orphans, self._orphans = self._orphans, []
        for cid in orphans:  # the actor may still be running asks and streams nobody reads: stop them
            await self._cancel(cid)
        log.info("actor %s answers again", self.name)
        self._run_on_alive()

    def _run_on_alive(self) -> None:
        for cb in self._on_alive:
            try:
                cb(self)
            except Exception:
                log.exception("on_alive callback failed")

    async def _heartbeat_loop(self) -> None:
        seq = itertools.count()
        while not self._closed:
            try:
                # a DEALER blocks on send while it has no peer (an inproc actor that stopped, a
                # process being restarted): the ping may not go out, but the check below must run
                await wait_for(self._sock.send(env.encode(env.Ping(next(seq)))), self.heartbeat_interval)
            except asyncio.TimeoutError:
                pass
            t0 = time.monotonic()
            await asyncio.sleep(self.heartbeat_interval)
            now = time.monotonic()
            stalled = now - t0 - self.heartbeat_interval
            if stalled > self.heartbeat_interval:
                # our own loop was held up (a long handler, a frozen process): the peer's answers may
                # be waiting unread in the socket, so that time does not count against it
                self._last_seen += stalled
            if self._starting and not self._ever_seen:
                continue
            if self._dead is None and now - self._last_seen > self.dead_after:
                self._declare_dead(ActorDeadError(f"actor {self.name} stopped answering (no heartbeat for {self.dead_after}s)"))

    def _declare_dead(self, err: ActorDeadError, notify: bool = True) -> None:
        if self._dead is not None:
            return
        self._dead = err
        self.deaths += 1
        for cid, fut in self._asks.items():
            if not fut.done():
                fut.set_exception(err)
                self._orphans.append(cid)  # its handler may still answer later, to nobody: cancelled on revival
        self._orphans.extend(self._streams)
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
