"""The actor runtime in one process (inproc) and across processes (ipc), including a dead peer."""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import shutil
import signal
import time

import msgspec
import pytest

from dyn_actor.actor import Actor, ActorDeadError, ActorError, ActorRef, ActorServer
from dyn_actor.transport import inproc_endpoint, ipc_endpoint, make_run_dir


class Add(msgspec.Struct, tag="add"):
    a: int
    b: int


class Count(msgspec.Struct, tag="count"):
    n: int
    delay: float = 0.0


class Note(msgspec.Struct, tag="note"):
    text: str


class Boom(msgspec.Struct, tag="boom"):
    pass


class Sleep(msgspec.Struct, tag="sleep"):
    seconds: float


class Hold(msgspec.Struct, tag="hold"):
    """A tell whose handler is busy (awaiting) for ``seconds``."""

    seconds: float


class Int(msgspec.Struct):
    value: int


class Notes(msgspec.Struct, tag="notes"):
    pass


class NoteList(msgspec.Struct):
    items: list[str]


class Calc(Actor):
    Message = Add | Count | Note | Boom | Sleep | Notes | Hold

    def __init__(self) -> None:
        self.notes: list[str] = []
        self.cancelled = 0

    def handlers(self):
        return {Add: self.add, Count: self.count, Note: self.note, Boom: self.boom, Sleep: self.sleep,
                Notes: lambda _m: NoteList(self.notes), Hold: self.hold}

    async def hold(self, m: Hold) -> None:
        await asyncio.sleep(m.seconds)

    def add(self, m: Add) -> Int:
        return Int(m.a + m.b)

    async def count(self, m: Count):
        try:
            for i in range(m.n):
                if m.delay:
                    await asyncio.sleep(m.delay)
                yield Int(i)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise

    def note(self, m: Note) -> None:
        self.notes.append(m.text)

    def boom(self, m: Boom) -> Int:
        raise ValueError("kaboom")

    async def sleep(self, m: Sleep) -> Int:
        try:
            await asyncio.sleep(m.seconds)
        except asyncio.CancelledError:
            self.notes.append(f"sleep {m.seconds} cancelled")
            raise
        return Int(0)


async def _with_actor(endpoint: str, body):
    actor = Calc()
    server = ActorServer(actor, endpoint)
    task = asyncio.ensure_future(server.serve())
    ref = await ActorRef(endpoint, "calc").start(wait_ready=5)
    try:
        await body(ref, actor)
    finally:
        await ref.close()
        server.stop()
        await task


def test_tell_ask_stream_in_process():
    async def body(ref: ActorRef, actor: Calc):
        assert (await ref.ask(Add(2, 3), Int)).value == 5
        await ref.tell(Note("x"))
        await ref.tell(Note("y"))
        assert (await ref.ask(Notes(), NoteList)).items == ["x", "y"]  # tells are handled in order
        assert [i.value async for i in ref.stream(Count(4), Int)] == [0, 1, 2, 3]
        with pytest.raises(ActorError, match="kaboom") as e:
            await ref.ask(Boom(), Int)
        assert e.value.error_type == "ValueError"
        assert (await ref.ask(Add(1, 1), Int)).value == 2  # still serving after a failure
        with pytest.raises(asyncio.TimeoutError):
            await ref.ask(Sleep(5), Int, timeout=0.2)

    asyncio.run(_with_actor(inproc_endpoint("calc-test"), body))


def test_leaving_a_stream_cancels_it_on_the_actor():
    async def body(ref: ActorRef, actor: Calc):
        got = []
        async for i in ref.stream(Count(1000, delay=0.01), Int):
            got.append(i.value)
            if len(got) == 3:
                break
        for _ in range(100):
            if actor.cancelled:
                break
            await asyncio.sleep(0.01)
        assert actor.cancelled == 1

    asyncio.run(_with_actor(inproc_endpoint("calc-cancel"), body))


def _serve_in_child(endpoint: str) -> None:
    asyncio.run(ActorServer(Calc(), endpoint).serve())


def test_across_processes_and_dead_peer_fails_pending_calls(tmp_path):
    run_dir = make_run_dir()
    endpoint = ipc_endpoint(run_dir, "calc")
    proc = mp.get_context("spawn").Process(target=_serve_in_child, args=(endpoint,), daemon=True)
    proc.start()

    async def body():
        ref = await ActorRef(endpoint, "calc", heartbeat_interval=0.1, dead_after=1.0).start(wait_ready=30)
        dead = []
        ref.on_dead(lambda r: dead.append(r))
        assert (await ref.ask(Add(20, 22), Int)).value == 42
        pending = asyncio.ensure_future(ref.ask(Sleep(60), Int, timeout=None))
        stream = ref.stream(Count(10**6, delay=0.05), Int)
        assert (await stream.__anext__()).value == 0
        await asyncio.sleep(0.1)
        os.kill(proc.pid, signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(ActorDeadError):
            await pending
        with pytest.raises(ActorDeadError):
            async for _ in stream:
                pass
        assert time.monotonic() - t0 < 3
        assert dead == [ref] and not ref.alive
        with pytest.raises(ActorDeadError):
            await ref.ask(Add(1, 1), Int)
        await ref.close()

    try:
        asyncio.run(body())
    finally:
        proc.join(5)
        import shutil

        shutil.rmtree(run_dir, ignore_errors=True)


def _spawn_calc(endpoint: str) -> mp.Process:
    proc = mp.get_context("spawn").Process(target=_serve_in_child, args=(endpoint,), daemon=True)
    proc.start()
    return proc


def _run_against_child(body) -> None:
    """``asyncio.run(body(endpoint, proc))`` with a Calc actor in a child process, cleaned up after."""
    run_dir = make_run_dir()
    endpoint = ipc_endpoint(run_dir, "calc")
    proc = _spawn_calc(endpoint)
    try:
        asyncio.run(body(endpoint, proc))
    finally:
        proc.kill()
        proc.join(5)
        shutil.rmtree(run_dir, ignore_errors=True)


def test_a_handler_busy_for_10s_does_not_get_its_actor_declared_dead():
    """Handlers never hold up the mailbox: heartbeats, asks and tells go on while a tell's handler
    and an ask's handler are both busy for 10 s."""

    async def body(endpoint: str, proc: mp.Process):
        ref = await ActorRef(endpoint, "calc", dead_after=2.0).start(wait_ready=30)
        await ref.tell(Hold(10.0))
        slow = asyncio.ensure_future(ref.ask(Sleep(10.0), Int, timeout=30))
        t0 = time.monotonic()
        while time.monotonic() - t0 < 10.5:
            assert ref.alive
            assert (await ref.ask(Add(1, 2), Int, timeout=1.0)).value == 3  # answered at once meanwhile
            await ref.tell(Note("x"))
            await asyncio.sleep(0.5)
        assert (await slow).value == 0 and ref.deaths == 0
        await ref.close()

    _run_against_child(body)


def test_a_ref_reconnects_after_a_stall_and_after_a_restart():
    """A peer frozen past ``dead_after`` is declared dead, then alive again when it answers; one
    restarted at the same endpoint is too."""

    async def body(endpoint: str, proc: mp.Process):
        ref = await ActorRef(endpoint, "calc", heartbeat_interval=0.1, dead_after=1.0).start(wait_ready=30)
        events: list[str] = []
        ref.on_dead(lambda r: events.append("dead"))
        ref.on_alive(lambda r: events.append("alive"))
        stream = ref.stream(Count(10**6, delay=0.05), Int)
        assert (await stream.__anext__()).value == 0
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            await asyncio.sleep(2.0)
            assert events == ["dead"] and not ref.alive
            with pytest.raises(ActorDeadError):
                async for _ in stream:
                    pass
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        t0 = time.monotonic()
        while not ref.alive and time.monotonic() - t0 < 5:
            await asyncio.sleep(0.05)
        assert events == ["dead", "alive"] and time.monotonic() - t0 < 1.0  # costs only the stall
        assert (await ref.ask(Add(2, 2), Int)).value == 4
        # a restart at the same endpoint: the same ref resumes
        proc.kill()
        proc.join(5)
        await asyncio.sleep(1.5)
        assert events == ["dead", "alive", "dead"]
        new = _spawn_calc(endpoint)
        try:
            t0 = time.monotonic()
            while not ref.alive and time.monotonic() - t0 < 30:
                await asyncio.sleep(0.05)
            assert events == ["dead", "alive", "dead", "alive"]
            assert (await ref.ask(Add(3, 4), Int)).value == 7
        finally:
            await ref.close()
            new.kill()
            new.join(5)

    _run_against_child(body)


def test_a_restart_between_two_heartbeats_fails_what_the_old_run_held():
    """A peer restarted faster than ``dead_after`` answers the next ping with a new incarnation: the
    calls pending on its old run fail at once (they would never be answered), ``on_dead`` and then
    ``on_alive`` run once each, so a caller re-registers with the new run."""

    async def body(endpoint: str, proc: mp.Process):
        ref = await ActorRef(endpoint, "calc", heartbeat_interval=0.1, dead_after=60.0).start(wait_ready=30)
        events: list[str] = []
        ref.on_dead(lambda r: events.append("dead"))
        ref.on_alive(lambda r: events.append("alive"))
        pending = asyncio.ensure_future(ref.ask(Sleep(600), Int, timeout=None))
        await asyncio.sleep(0.3)
        proc.kill()
        proc.join(5)
        new = _spawn_calc(endpoint)
        try:
            t0 = time.monotonic()
            with pytest.raises(ActorDeadError, match="restarted"):
                await asyncio.wait_for(pending, 30)
            assert time.monotonic() - t0 < 30 and events == ["dead", "alive"] and ref.alive
            assert (await ref.ask(Add(3, 4), Int)).value == 7
            await asyncio.sleep(0.5)
            assert events == ["dead", "alive"]  # the same run answering again is no restart
        finally:
            await ref.close()
            new.kill()
            new.join(5)

    _run_against_child(body)


def test_an_ask_given_up_during_a_stall_is_cancelled_on_the_actor_when_it_answers_again():
    """An ask failed because its actor stopped answering is cancelled on the actor once it answers
    again: its handler must not answer later to nobody (a prefill queue's pull handing a request to
    a pull its prefill worker had given up on lost that request)."""

    async def body(endpoint: str, proc: mp.Process):
        ref = await ActorRef(endpoint, "calc", heartbeat_interval=0.1, dead_after=1.0).start(wait_ready=30)
        pending = asyncio.ensure_future(ref.ask(Sleep(30.0), Int, timeout=None))
        await asyncio.sleep(0.3)
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            with pytest.raises(ActorDeadError):
                await asyncio.wait_for(pending, 10)
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        t0 = time.monotonic()
        while not ref.alive and time.monotonic() - t0 < 5:
            await asyncio.sleep(0.05)
        assert (await ref.ask(Notes(), NoteList)).items == ["sleep 30.0 cancelled"]
        await ref.close()

    _run_against_child(body)


def test_a_call_that_reached_the_new_run_before_the_restart_was_seen_is_cancelled_there():
    """A restarted peer's new run may get calls before its first pong shows the new incarnation
    (the ref still thought the old run alive). Those fail with the rest and are cancelled on the new
    run: nobody waits for their answer (a prefill queue's pull answered to nobody lost a request)."""

    async def body(endpoint: str, proc: mp.Process):
        ref = await ActorRef(endpoint, "calc", heartbeat_interval=8.0, dead_after=60.0).start(wait_ready=30)
        t_ping = time.monotonic()  # its first ping just went out; the next one comes 8 s later
        proc.kill()
        proc.join(5)
        new = _spawn_calc(endpoint)
        try:
            probe = await ActorRef(endpoint, "probe").start(wait_ready=30)  # the new run is up
            await probe.close()
            assert time.monotonic() - t_ping < 7, "the new run took too long to start for this test"
            pending = asyncio.ensure_future(ref.ask(Sleep(30.0), Int, timeout=None))  # reaches the new run
            with pytest.raises(ActorDeadError, match="restarted"):
                await asyncio.wait_for(pending, 20)
            assert (await ref.ask(Notes(), NoteList)).items == ["sleep 30.0 cancelled"]
        finally:
            await ref.close()
            new.kill()
            new.join(5)

    _run_against_child(body)
