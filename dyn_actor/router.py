"""Pick a worker per request: ``kv`` (cache-aware, the default), ``round-robin`` or ``random``.

``kv`` mode keeps a ``KvIndex`` of the blocks each worker has cached, fed by the
workers' KV-event streams (``apply`` / ``apply_snapshot``), and scores each live
worker with ``kv_cost``:

    overlap_weight * (prefill blocks after the overlap + prefill blocks pending)
        + active decode blocks

where the pending prefill and active blocks are what this router itself has routed
to the worker and not yet seen produce its first token / finish. Lowest cost
wins, ties at random; with a temperature the choice is a softmax sample instead.
Workers whose reported KV usage is above ``busy_threshold`` are skipped while
another has room. Every mode counts load the same way, so the state is
comparable across modes.

Event streams are numbered per worker: a gap (or a load report naming a batch
we never got) makes the stream *resync*: the caller fetches a snapshot from the
worker, and events that arrive meanwhile are held and replayed past it. A
block-size mismatch or a worker that publishes nothing is an error that shows
(``kv_errors``, the log, ``/v1/router/state``), never a silent zero overlap.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from dyn_actor.kv.block_hash import hash_blocks, lora_root
from dyn_actor.kv.events import AllBlocksCleared, BlockRemoved, BlockStored, KvEventBatch, KvSnapshot, WorkerLoad
from dyn_actor.kv.index import KvIndex

log = logging.getLogger(__name__)

ROUTER_MODES = ("kv", "round-robin", "random")


class NoWorkerAvailable(RuntimeError):
    pass


@dataclass
class KvStream:
    """What the router knows about one worker's KV-event stream."""

    state: str = "waiting"  # waiting (nothing yet) | live | resync | block_size_mismatch | silent
    seq: int = 0  # last batch applied
    batches: int = 0
    events: int = 0
    resyncs: int = 0
    last_message: float | None = None  # monotonic time of the last publication
    held: list[KvEventBatch] = field(default_factory=list)  # arrived during a resync


@dataclass
class WorkerEntry:
    name: str
    handle: Any  # what the caller talks to (a WorkerClient)
    in_flight: int = 0
    routed_total: int = 0
    alive: bool = True
    draining: bool = False  # being retired: no new requests, the ones it holds finish
    # load as this router counts it (routed, not yet seen finish / first token)
    active_blocks: int = 0
    pending_prefill_blocks: int = 0
    # load as the worker last reported it
    load: WorkerLoad | None = None
    kv: KvStream = field(default_factory=KvStream)
    added_at: float = field(default_factory=time.monotonic)

    @property
    def kv_usage(self) -> float:
        if self.load is None or not self.load.kv_blocks_total:
            return 0.0
        return self.load.kv_blocks_used / self.load.kv_blocks_total


@dataclass
class Route:
    """One routing decision; hand it back to ``first_token`` and ``end``."""

    entry: WorkerEntry
    prompt_blocks: int = 0
    overlap_blocks: int = 0
    prefill_pending: bool = True
    ended: bool = False


def kv_cost(overlap_blocks: int, prompt_blocks: int, pending_prefill_blocks: int, active_blocks: int,
            overlap_weight: float = 1.0) -> float:
    """Lower is better: the prefill work the worker would have queued, weighted, plus its decode load."""
    prefill = max(0, prompt_blocks - overlap_blocks) + pending_prefill_blocks
    return overlap_weight * prefill + active_blocks


def choose(costs: dict[str, float], temperature: float, rng: random.Random) -> str:
    """The lowest cost (ties at random), or with ``temperature`` > 0 a softmax sample over
    costs scaled to [0, 1], so the temperature means the same at any load."""
    names = list(costs)
    if temperature <= 0 or len(names) == 1:
        best = min(costs.values())
        return rng.choice([n for n in names if costs[n] == best])
    lo, hi = min(costs.values()), max(costs.values())
    span = (hi - lo) or 1.0
    weights = [math.exp(-(costs[n] - lo) / span / temperature) for n in names]
    return rng.choices(names, weights)[0]


class Router:
    MAX_HELD = 4096  # event batches held per worker while its snapshot is awaited

    def __init__(self, mode: str = "kv", block_size: int = 16, overlap_weight: float = 4.0,
                 temperature: float = 0.0, busy_threshold: float = 0.95, silent_after: float = 5.0,
                 seed: int | None = None) -> None:
        if mode not in ROUTER_MODES:
            raise ValueError(f"unknown router mode {mode!r}; choose one of {', '.join(ROUTER_MODES)}")
        if block_size < 0:
            raise ValueError("block_size must be positive (or 0: the first worker's)")
        self.mode = mode
        self.block_size = block_size
        self.overlap_weight = overlap_weight
        self.temperature = temperature
        self.busy_threshold = busy_threshold
        self.silent_after = silent_after
        self.workers: dict[str, WorkerEntry] = {}
        self.index = KvIndex()
        self.kv_errors: dict[tuple[str, str], int] = {}  # (worker, reason) -> count
        self._rr = 0
        self._rng = random.Random(seed)

    # --------------------------------------------------------------- workers
    def add_worker(self, name: str, handle: Any) -> WorkerEntry:
        entry = WorkerEntry(name, handle)
        self.workers[name] = entry
        return entry

    def remove_worker(self, name: str) -> None:
        """The worker is gone: never route to it again, and forget what it had cached."""
        entry = self.workers.get(name)
        if entry is not None:
            entry.alive = False
        self.index.remove_worker(name)

    def drain(self, name: str) -> WorkerEntry | None:
        """Route nothing new to ``name`` (it is being retired); what it holds goes on."""
        entry = self.workers.get(name)
        if entry is not None:
            entry.draining = True
        return entry

    def forget(self, name: str) -> None:
        """A retired worker: gone from routing, the index and the state."""
        self.workers.pop(name, None)
        self.index.remove_worker(name)

    def live_workers(self) -> list[WorkerEntry]:
        return [w for w in self.workers.values() if w.alive and not w.draining]

    # --------------------------------------------------------------- routing
    def pick(self, token_ids: Sequence[int] = (), lora_name: str | None = None) -> Route:
        """The worker for a prompt (of LoRA adapter ``lora_name``, whose blocks hash apart)."""
        live = self.live_workers()
        if not live:
            raise NoWorkerAvailable("no worker is available to take the request")
        prompt_blocks = -(-len(token_ids) // self.block_size)
        if self.mode == "random":
            return Route(self._rng.choice(live), prompt_blocks)
        if self.mode == "round-robin":
            entry = live[self._rr % len(live)]
            self._rr += 1
            return Route(entry, prompt_blocks)
        overlaps = (self.index.overlaps(hash_blocks(token_ids, self.block_size, lora_root(lora_name)))
                    if self.index.num_blocks else {})
        candidates = [w for w in live if w.kv_usage <= self.busy_threshold] or live
        costs = {w.name: kv_cost(overlaps.get(w.name, 0), prompt_blocks, w.pending_prefill_blocks, w.active_blocks,
                                 self.overlap_weight) for w in candidates}
        name = choose(costs, self.temperature, self._rng)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("kv route: %d blocks -> %s; %s", prompt_blocks, name, ", ".join(
                f"{w.name}: overlap {overlaps.get(w.name, 0)} pending {w.pending_prefill_blocks} "
                f"active {w.active_blocks} cost {costs[w.name]:g}" for w in candidates))
        return Route(self.workers[name], prompt_blocks, overlaps.get(name, 0))

    def begin(self, route: Route) -> None:
        e = route.entry
        e.in_flight += 1
        e.routed_total += 1
        e.active_blocks += route.prompt_blocks
        e.pending_prefill_blocks += route.prompt_blocks - route.overlap_blocks

    def first_token(self, route: Route) -> None:
        if route.prefill_pending:
            route.prefill_pending = False
            e = route.entry
            e.pending_prefill_blocks = max(0, e.pending_prefill_blocks - (route.prompt_blocks - route.overlap_blocks))

    def end(self, route: Route) -> None:
        if route.ended:
            return
        self.first_token(route)
        route.ended = True
        e = route.entry
        e.in_flight = max(0, e.in_flight - 1)
        e.active_blocks = max(0, e.active_blocks - route.prompt_blocks)

    # ------------------------------------------------------------ KV events
    def _error(self, worker: str, reason: str, message: str) -> None:
        key = (worker, reason)
        first = key not in self.kv_errors
        self.kv_errors[key] = self.kv_errors.get(key, 0) + 1
        if first:
            log.error("kv router: worker %s: %s", worker, message)

    def check_block_size(self, worker: str, block_size: int) -> bool:
        entry = self.workers.get(worker)
        if self.block_size == 0:  # adopt the first worker's (vLLM chooses its own)
            self.block_size = block_size
            log.info("kv router: hashing %d-token blocks, as worker %s's", block_size, worker)
        if block_size == self.block_size:
            return True
        self._error(worker, "block_size_mismatch",
                    f"its KV blocks hold {block_size} tokens but the router hashes {self.block_size}-token "
                    "blocks: its cache cannot be matched (start every process with the same --block-size)")
        if entry is not None:
            entry.kv.state = "block_size_mismatch"
        self.index.remove_worker(worker)
        return False

    def apply(self, msg: KvEventBatch | WorkerLoad, now: float | None = None) -> bool:
        """Apply one publication from a worker. Returns True when its stream needs a resync
        (the caller then fetches a ``KvSnapshot`` and calls ``apply_snapshot``)."""
        entry = self.workers.get(msg.worker)
        if entry is None or not entry.alive:
            return False
        kv = entry.kv
        kv.last_message = time.monotonic() if now is None else now
        if not self.check_block_size(msg.worker, msg.block_size):
            return False
        if kv.state == "silent":
            log.warning("kv router: worker %s publishes again; resynchronising", msg.worker)
            kv.state = "waiting"  # whatever it did meanwhile is unknown: start from a snapshot
        if isinstance(msg, WorkerLoad):
            entry.load = msg
            if kv.state == "waiting" or (kv.state == "live" and msg.seq > kv.seq):
                return self._start_resync(entry, "missed" if kv.state == "live" else "first contact")
            return False
        if kv.state == "resync":
            if len(kv.held) >= self.MAX_HELD:  # the snapshot is slow in coming: a later one will cover these
                kv.held.clear()
            kv.held.append(msg)
            return False
        if kv.state == "waiting" or msg.seq != kv.seq + 1:
            if msg.seq <= kv.seq:
                return False  # a duplicate of what is already applied
            kv.held.append(msg)
            return self._start_resync(entry, "first contact" if kv.state == "waiting" else "gap")
        self._apply_batch(entry, msg)
        return False

    def _start_resync(self, entry: WorkerEntry, why: str) -> bool:
        kv = entry.kv
        if why != "first contact":
            kv.resyncs += 1
            log.warning("kv router: worker %s: event stream %s after seq %d; resynchronising", entry.name, why, kv.seq)
        kv.state = "resync"
        return True

    def _apply_batch(self, entry: WorkerEntry, batch: KvEventBatch) -> None:
        kv = entry.kv
        for ev in batch.events:
            if isinstance(ev, BlockStored):
                self.index.store(entry.name, ev.block_hashes)
            elif isinstance(ev, BlockRemoved):
                self.index.remove(entry.name, ev.block_hashes)
            elif isinstance(ev, AllBlocksCleared):
                self.index.remove_worker(entry.name)
        kv.seq = batch.seq
        kv.batches += 1
        kv.events += len(batch.events)

    def apply_snapshot(self, snap: KvSnapshot) -> None:
        entry = self.workers.get(snap.worker)
        if entry is None or not entry.alive or not self.check_block_size(snap.worker, snap.block_size):
            return
        kv = entry.kv
        self.index.replace_worker(entry.name, snap.block_hashes)
        kv.seq = snap.seq
        kv.state = "live"
        held, kv.held = sorted(kv.held, key=lambda b: b.seq), []
        for batch in held:
            if batch.seq <= kv.seq:
                continue
            if batch.seq != kv.seq + 1:  # still a hole: another snapshot is needed
                kv.held = [b for b in held if b.seq > kv.seq]
                self._start_resync(entry, "gap")
                return
            self._apply_batch(entry, batch)

    def resync_failed(self, worker: str) -> None:
        """The snapshot could not be fetched: try again on the next publication."""
        entry = self.workers.get(worker)
        if entry is not None and entry.kv.state == "resync":
            entry.kv.state = "waiting"

    def check_silent(self, now: float | None = None) -> list[str]:
        """Mark (and report) live workers that have published nothing for ``silent_after`` seconds."""
        now = time.monotonic() if now is None else now
        silent = []
        for e in self.live_workers():
            if e.kv.state in ("block_size_mismatch", "silent"):
                continue
            last = e.kv.last_message if e.kv.last_message is not None else e.added_at
            if now - last > self.silent_after:
                e.kv.state = "silent"
                self._error(e.name, "no_events", f"no KV events or load reports for {self.silent_after:g}s: "
                            "its cache is invisible to the router (is it publishing?)")
                silent.append(e.name)
        return silent

    # --------------------------------------------------------------- status
    def state(self) -> dict:
        now = time.monotonic()
        workers = []
        for e in self.workers.values():
            load = e.load
            workers.append({
                "name": e.name, "alive": e.alive, "in_flight": e.in_flight, "routed_total": e.routed_total,
                "active_blocks": e.active_blocks, "pending_prefill_blocks": e.pending_prefill_blocks,
                "cached_blocks_indexed": self.index.num_blocks_of(e.name),
                "reported": None if load is None else {
                    "kv_blocks_used": load.kv_blocks_used, "kv_blocks_total": load.kv_blocks_total,
                    "kv_usage": round(e.kv_usage, 4), "requests_waiting": load.requests_waiting,
                    "requests_running": load.requests_running},
                "kv_events": {"state": e.kv.state, "seq": e.kv.seq, "batches": e.kv.batches, "events": e.kv.events,
                              "resyncs": e.kv.resyncs,
                              "seconds_since_last": None if e.kv.last_message is None
                              else round(now - e.kv.last_message, 3)},
                "errors": {reason: n for (w, reason), n in self.kv_errors.items() if w == e.name},
            })
        return {"mode": self.mode, "block_size": self.block_size, "overlap_weight": self.overlap_weight,
                "temperature": self.temperature, "busy_threshold": self.busy_threshold,
                "index": {"blocks": self.index.num_blocks,
                          "entries": sum(self.index.num_blocks_of(w) for w in self.index.workers())},
                "workers": workers}
