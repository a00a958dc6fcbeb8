"""Pick a worker per request: ``round-robin`` or ``random`` (``kv`` comes with KV events).

The router counts each worker's in-flight requests (what it routed and has
not seen finish) and never picks a worker that is gone. ``pick`` gets the
prompt's token ids so a cache-aware policy can plug in behind the same call.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

ROUTER_MODES = ("round-robin", "random")


class NoWorkerAvailable(RuntimeError):
    pass


@dataclass
class WorkerEntry:
    name: str
    handle: Any  # what the caller talks to (an ActorRef)
    in_flight: int = 0
    routed_total: int = 0
    alive: bool = True


class Router:
    def __init__(self, mode: str = "round-robin", seed: int | None = None) -> None:
        if mode not in ROUTER_MODES:
            raise ValueError(f"unknown router mode {mode!r}; choose one of {', '.join(ROUTER_MODES)}")
        self.mode = mode
        self.workers: dict[str, WorkerEntry] = {}
        self._rr = 0
        self._rng = random.Random(seed)

    def add_worker(self, name: str, handle: Any) -> WorkerEntry:
        entry = WorkerEntry(name, handle)
        self.workers[name] = entry
        return entry

    def remove_worker(self, name: str) -> None:
        entry = self.workers.get(name)
        if entry is not None:
            entry.alive = False

    def live_workers(self) -> list[WorkerEntry]:
        return [w for w in self.workers.values() if w.alive]

    def pick(self, token_ids: Sequence[int] = ()) -> WorkerEntry:
        live = self.live_workers()
        if not live:
            raise NoWorkerAvailable("no worker is available to take the request")
        if self.mode == "random":
            entry = self._rng.choice(live)
        else:
            entry = live[self._rr % len(live)]
            self._rr += 1
        return entry

    def begin(self, entry: WorkerEntry) -> None:
        entry.in_flight += 1
        entry.routed_total += 1

    def end(self, entry: WorkerEntry) -> None:
        entry.in_flight = max(0, entry.in_flight - 1)
