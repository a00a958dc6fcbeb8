"""The actor side: a mailbox on a ROUTER socket dispatching typed messages to handlers.

An actor declares ``Message`` (a union of the ``msgspec`` struct types it
accepts, each with a tag) and maps each type to a handler in ``handlers()``.
A handler for a *tell* returns nothing, for an *ask* returns a struct, for a
*stream* returns an async iterator of structs.

The mailbox never waits on a handler: a tell's handler should be a plain
function that enqueues work and returns (plain tell handlers run in arrival
order); a coroutine tell handler, an ask and a stream each run as a task of
their own, and a stream's task is cancelled when the caller cancels it or goes
away. So heartbeats, aborts and the next requests are read whatever the
handlers are doing.

An actor that cannot go on (its engine thread died) calls ``self.stop(error)``:
the mailbox closes and ``serve`` raises ``error``, so the process exits non-zero
and its supervisor restarts it.

Lifecycle: ``on_start`` runs before the mailbox opens, ``on_stop`` after it
closes (always, also after a failure); ``on_failure`` sees an exception a
handler raised (the caller gets it as an ``ActorError`` too).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import msgspec

from dyn_actor.actor import envelope as env
from dyn_actor.transport import RouterSocket

log = logging.getLogger(__name__)


class Actor:
    Message: Any = None  # a msgspec struct type or a union of tagged ones
    _server: ActorServer | None = None

    def stop(self, error: BaseException | None = None) -> None:
        """Close this actor's mailbox; with ``error``, ``serve`` raises it once the actor has stopped."""
        if self._server is not None:
            self._server.stop(error)

    def handlers(self) -> dict[type, Callable[[Any], Any]]:
        raise NotImplementedError

    async def on_start(self) -> None:
        pass

    async def on_stop(self) -> None:
        pass

    def on_failure(self, msg: Any, exc: BaseException) -> None:
        log.exception("%s failed handling %s", type(self).__name__, type(msg).__name__, exc_info=exc)


class ActorServer:
    def __init__(self, actor: Actor, endpoint: str) -> None:
        self.actor = actor
        self.endpoint = endpoint
        self._decoder = msgspec.msgpack.Decoder(actor.Message)
        self._handlers = actor.handlers()
        self._sock: RouterSocket | None = None
        self._tasks: dict[tuple[bytes, int], asyncio.Task] = {}
        self._stopped = asyncio.Event()
        self._failure: BaseException | None = None
        self._tell_tasks: set[asyncio.Task] = set()
        self.incarnation = secrets.randbits(62) | 1  # this run of the actor (never 0: "unknown")

    async def serve(self, ready: Callable[[], Awaitable[None] | None] | None = None) -> None:
        """Start the actor, open the mailbox, and handle messages until ``stop()``."""
        self.actor._server = self
        await self.actor.on_start()
        self._sock = RouterSocket(self.endpoint)
        try:
            if ready is not None:
                r = ready()
                if asyncio.iscoroutine(r):
                    await r
            reader = asyncio.ensure_future(self._read_loop())
            stop = asyncio.ensure_future(self._stopped.wait())
            done, _ = await asyncio.wait({reader, stop}, return_when=asyncio.FIRST_COMPLETED)
            for t in (reader, stop):
                if t not in done:
                    t.cancel()
            if reader in done and reader.exception() is not None:
                raise reader.exception()  # type: ignore[misc]
        finally:
            for task in [*self._tasks.values(), *self._tell_tasks]:
                task.cancel()
            self._sock.close()
            await self.actor.on_stop()
        if self._failure is not None:
            raise self._failure

    @property
    def stopped(self) -> bool:
        """Its mailbox is closed (or closing)."""
        return self._stopped.is_set()

    def stop(self, error: BaseException | None = None) -> None:
        if error is not None and self._failure is None:
            self._failure = error
        self._stopped.set()

    async def _read_loop(self) -> None:
        assert self._sock is not None
        while True:
            peer, data = await self._sock.recv()
            try:
                msg = env.decode_envelope(data)
            except msgspec.DecodeError:
                log.warning("dropping an undecodable message from %r", peer)
                continue
            if isinstance(msg, env.Ping):
                await self._sock.send(peer, env.encode(env.Pong(msg.seq, self.incarnation)))
            elif isinstance(msg, env.Call):
                await self._on_call(peer, msg)
            elif isinstance(msg, env.Cancel):
                task = self._tasks.pop((peer, msg.cid), None)
                if task is not None:
                    task.cancel()

    async def _reply(self, peer: bytes, reply: env.Reply) -> bool:
        assert self._sock is not None
        return await self._sock.send(peer, env.encode(reply))

    async def _on_call(self, peer: bytes, call: env.Call) -> None:
        try:
            body = self._decoder.decode(call.body)
            handler = self._handlers[type(body)]
        except (msgspec.DecodeError, msgspec.ValidationError, KeyError) as e:
            if call.mode != env.TELL:
                await self._reply(peer, env.Reply(call.cid, error=f"bad message: {e}", error_type="BadMessage"))
            return
        if call.mode == env.TELL:
            try:
                r = handler(body)
            except Exception as e:  # a failing tell must not take the mailbox down
                self.actor.on_failure(body, e)
                return
            if asyncio.iscoroutine(r):  # never awaited here: the mailbox goes on reading
                task = asyncio.ensure_future(self._run_tell(r, body))
                self._tell_tasks.add(task)
                task.add_done_callback(self._tell_tasks.discard)
            return
        runner = self._run_ask if call.mode == env.ASK else self._run_stream
        task = asyncio.ensure_future(runner(peer, call.cid, handler, body))
        self._tasks[(peer, call.cid)] = task
        task.add_done_callback(lambda _t, k=(peer, call.cid): self._tasks.pop(k, None))

    async def _run_tell(self, coro, body) -> None:
        try:
            await coro
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self.actor.on_failure(body, e)

    async def _run_ask(self, peer: bytes, cid: int, handler, body) -> None:
        try:
            result = handler(body)
            if asyncio.iscoroutine(result):
                result = await result
            await self._reply(peer, env.Reply(cid, body=env.raw(result), has_body=True))
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self.actor.on_failure(body, e)
            await self._reply(peer, env.Reply(cid, error=str(e), error_type=type(e).__name__))

    async def _run_stream(self, peer: bytes, cid: int, handler, body) -> None:
        it: AsyncIterator | None = None
        try:
            it = handler(body)
            async for item in it:
                if not await self._reply(peer, env.Reply(cid, body=env.raw(item), has_body=True, end=False)):
                    return  # the caller is gone
            await self._reply(peer, env.Reply(cid, end=True))
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self.actor.on_failure(body, e)
            await self._reply(peer, env.Reply(cid, error=str(e), error_type=type(e).__name__))
        finally:
            if it is not None and hasattr(it, "aclose"):
                await it.aclose()
