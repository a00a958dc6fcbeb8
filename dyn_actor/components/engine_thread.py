"""The engine's own thread: runs ``engine.step()`` in a loop; the actor's event loop submits commands
to it (applied at the next step boundary) and gets each step's outputs and KV events back."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from dyn_actor.engine.engine import LLMEngine, RequestOutput
from dyn_actor.kv.events import KvEvent

log = logging.getLogger(__name__)
BURST_WINDOW = 0.005  # seconds an idle engine thread waits for the rest of a burst of commands


class EngineThread:
    """Runs ``engine.step()`` in a loop on its own thread; other threads submit commands."""

    IDLE_WAIT = 0.5  # seconds an idle engine thread sleeps unless woken (a command, a grammar compiled)

    def __init__(self, engine: LLMEngine, loop: asyncio.AbstractEventLoop, on_outputs: Callable[[list[RequestOutput]], None],
                 on_kv_events: Callable[[int, list[KvEvent]], None] | None = None,
                 on_fatal: Callable[[BaseException], None] | None = None):
        self.engine = engine
        self._loop = loop
        self._on_outputs = on_outputs
        self._on_kv_events = on_kv_events
        self._on_fatal = on_fatal
        self.dead: BaseException | None = None
        self.kv_seq = 0  # KV event batches handed out so far (engine thread only)
        self._cmds: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        engine.wake = self._wake.set  # a grammar compiled off this thread: its request can be scheduled
        self._stop = False
        self.step_seconds = 0.0
        self.steps = 0
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=5)

    def submit(self, fn: Callable[[LLMEngine], Any]) -> asyncio.Future:
        """Run ``fn(engine)`` on the engine thread before its next step; await the result. Every
        command pending at a step boundary runs there, so a burst is admitted at one step."""
        fut = self._loop.create_future()
        if self.dead is not None:
            fut.set_exception(RuntimeError(f"the engine thread died: {self.dead}"))
            return fut
        self._cmds.put((fn, fut))
        self._wake.set()
        return fut

    def submit_publishing(self, fn: Callable[[LLMEngine], list[RequestOutput]],
                          publish: Callable[[list[RequestOutput]], None]) -> asyncio.Future:
        """``submit`` for a command that produces outputs itself: they reach ``publish`` on the loop in
        order with the outputs of the steps before and after it (through the same queue)."""

        def cmd(engine: LLMEngine) -> None:
            outputs = fn(engine)
            if outputs:
                self._loop.call_soon_threadsafe(publish, outputs)

        return self.submit(cmd)

    def _resolve(self, fut: asyncio.Future, result: Any, exc: BaseException | None) -> None:
        if fut.done():
            return
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(result)

    def _run(self) -> None:
        try:
            self._loop_steps()
        except BaseException as e:  # noqa: BLE001 - whatever killed the thread, the worker must not linger
            log.critical("engine thread died: %s: %s", type(e).__name__, e, exc_info=e)
            self.dead = e
            if self._on_fatal is not None:
                self._loop.call_soon_threadsafe(self._on_fatal, e)

    def _loop_steps(self) -> None:
        engine = self.engine
        while not self._stop:
            self._wake.clear()
            while True:
                try:
                    fn, fut = self._cmds.get_nowait()
                except queue.Empty:
                    break
                try:
                    result, exc = fn(engine), None
                except Exception as e:
                    result, exc = None, e
                self._loop.call_soon_threadsafe(self._resolve, fut, result, exc)
            self._drain_kv_events()
            if engine.has_work():
                t0 = time.perf_counter()
                outputs = engine.step()
                self.step_seconds += time.perf_counter() - t0
                self.steps += 1
                if outputs:
                    self._loop.call_soon_threadsafe(self._on_outputs, outputs)
                self._drain_kv_events()
            elif self._wake.wait(timeout=self.IDLE_WAIT):
                self._settle_burst()

    def _settle_burst(self) -> None:
        """Woken from idle by a command: let the rest of a burst land (a few ms at most), so requests
        that arrive together are admitted at one step rather than the first one alone."""
        deadline = time.monotonic() + BURST_WINDOW
        n = self._cmds.qsize()
        while time.monotonic() < deadline:
            time.sleep(BURST_WINDOW / 10)
            m = self._cmds.qsize()
            if m == n:
                return
            n = m

    def _drain_kv_events(self) -> None:
        """Hand the block manager's new events to the publisher as one numbered batch (engine thread)."""
        events = self.engine.drain_kv_events()
        if events and self._on_kv_events is not None:
            self.kv_seq += 1
            self._loop.call_soon_threadsafe(self._on_kv_events, self.kv_seq, events)

    def kv_snapshot(self, engine: LLMEngine) -> tuple[int, list[int]]:
        """(seq, every cached block hash), consistent with the event stream: events up to ``seq`` are
        reflected in it, later ones are not. Run on the engine thread (through ``submit``)."""
        self._drain_kv_events()
        return self.kv_seq, engine.block_manager.cached_hashes()
