"""The planner as a process of its own (``dyn-actor planner 0``), started by the launcher in every
topology unless ``--planner off``.

It only listens to what the system already publishes: each aggregated or decode worker's load
reports (``WorkerLoad``, with its KV events: KV usage, requests, and step counters from which
it takes the mean step time over each window), the prefill queue's depth and queued prompt
tokens, and the frontend's
latency histograms (``FrontendReport``, cumulative buckets, twice a second). Every
``--planner-interval`` seconds it builds a ``Snapshot``, asks ``dyn_actor.planner.decide`` what
to change, logs it (one line with the numbers), appends it to ``--planner-log`` as a JSON line
that ``planner.replay`` reproduces, and publishes a ``PlannerReport`` that the frontend turns
into ``dyn_planner_decisions_total{action}`` and ``GET /v1/planner/state`` (``PlannerView``).
In ``active`` mode it also asks the launcher (through its pipe) to carry the decision out: the
launcher adds and removes prefill and decode workers (a decode worker is announced to the frontend
and to the planner when it is ready; one being removed is drained by the frontend first), moves
one between the roles (drained and stopped, then started in the other role), and has the
frontend set the decode workers' local/remote prefill threshold. A worker's age for the warm-up rule counts from its first load report; prefill
workers publish no load, so they are counted from when the planner started or added them.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import time
from collections.abc import Callable

import msgspec

from dyn_actor.components.disagg_messages import QueueDepth
from dyn_actor.kv.events import KvPublication, WorkerLoad
from dyn_actor.planner import Decision, Planner, PlannerConfig, Snapshot, WorkerSample, record, window_quantile
from dyn_actor.transport import PubSocket, SubSocket

log = logging.getLogger(__name__)

Buckets = list[tuple[float, float]]  # [(upper bound, cumulative count)], +Inf last

#: actions the launcher carries out in active mode
CARRIED_OUT = ("add_prefill", "remove_prefill", "add_decode", "remove_decode", "prefill_to_decode",
               "decode_to_prefill", "raise_local_prefill", "lower_local_prefill")
PENDING_FOR = 300.0  # seconds an asked-for worker counts as warming up before the launcher says it is up


class FrontendReport(msgspec.Struct, frozen=True):
    """What the frontend publishes for the planner: its latency histograms, cumulative."""

    ttft: Buckets
    itl: Buckets
    e2e: Buckets


class PlannerReport(msgspec.Struct, frozen=True):
    """One tick of the planner, as it publishes it to the frontend."""

    mode: str
    interval_s: float
    config: PlannerConfig
    prefill_workers: int
    t: float
    action: str
    reason: str
    numbers: dict[str, float]


async def follow(endpoint: str, decoder: msgspec.msgpack.Decoder, on_message: Callable) -> None:
    """Subscribe to ``endpoint`` and hand each message that decodes to ``on_message`` (until cancelled)."""
    sub = SubSocket(endpoint)
    try:
        while True:
            try:
                msg = decoder.decode(await sub.recv())
            except msgspec.DecodeError:
                continue
            on_message(msg)
    finally:
        sub.close()


def histogram_buckets(hist) -> Buckets:
    """``[(upper bound, cumulative count)]`` of a prometheus-client histogram."""
    out = []
    for metric in hist.collect():
        for s in metric.samples:
            if s.name.endswith("_bucket"):
                out.append((float(s.labels["le"]), s.value))
    return out


def add_reports(reports: list[FrontendReport]) -> FrontendReport:
    """The frontend processes' cumulative histograms as one (bucket by bucket; the same bounds)."""
    def add(field: str) -> Buckets:
        total: dict[float, float] = {}
        for r in reports:
            for bound, count in getattr(r, field):
                total[bound] = total.get(bound, 0.0) + count
        return sorted(total.items())

    return FrontendReport(add("ttft"), add("itl"), add("e2e"))


async def publish_frontend_report(metrics, endpoint: str, interval: float = 0.5) -> None:
    """The frontend's side: its TTFT/ITL/E2E histograms on ``endpoint`` every ``interval`` s."""
    pub = PubSocket(endpoint)
    enc = msgspec.msgpack.Encoder()
    try:
        while True:
            await pub.send(enc.encode(FrontendReport(histogram_buckets(metrics.ttft.metric),
                                                     histogram_buckets(metrics.itl.metric),
                                                     histogram_buckets(metrics.e2e.metric))))
            await asyncio.sleep(interval)
    finally:
        pub.close()


class PlannerView:
    """The frontend's view of the planner: the decisions it publishes, counted and kept."""

    def __init__(self, mode: str, endpoint: str, decisions_counter) -> None:
        self.mode = mode
        self.endpoint = endpoint
        self.counter = decisions_counter
        self.last: PlannerReport | None = None
        self.recent: collections.deque = collections.deque(maxlen=20)
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._read())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _read(self) -> None:
        await follow(self.endpoint, msgspec.msgpack.Decoder(PlannerReport), self._report)

    def _report(self, r: PlannerReport) -> None:
        self.last = r
        if self.counter is not None:
            self.counter.inc(1, r.action)
        self.recent.append({"t": r.t, "action": r.action, "reason": r.reason, "numbers": r.numbers})

    def state(self) -> dict:
        r = self.last
        if r is None:  # the planner has not ticked yet
            return {"mode": self.mode, "recent": []}
        return {"mode": r.mode, "interval_s": r.interval_s, "config": r.config, "prefill_workers": r.prefill_workers,
                "recent": list(self.recent)}


class PlannerProcess:
    """Subscribes, ticks, decides, reports; ``act`` (active mode) carries a decision out."""

    def __init__(self, cfg: PlannerConfig, *, interval: float, workers: dict[str, str], depth_endpoint: str | None,
                 frontend_endpoints: list[str], report_endpoint: str, num_prefill: int, pending_decode: int = 0,
                 pending_prefill: int = 0, log_path: str | None = None, act: Callable[[Decision], None] | None = None) -> None:
        self.planner = Planner(cfg)
        self.interval = interval
        self.workers = workers  # name -> where it publishes its KV events and loads
        self.depth_endpoint = depth_endpoint
        self.frontend_endpoints = frontend_endpoints  # one per frontend process (--frontends)
        self.report_endpoint = report_endpoint
        self.log_path = log_path
        self.act = act
        self.started = time.monotonic()
        self.prefill_started = [self.started] * num_prefill
        self.loads: dict[str, WorkerLoad] = {}
        self.first_seen: dict[str, float] = {}
        self.queue_depth = 0
        self.queue_tokens = 0
        self._steps_before: dict[str, tuple[float, int]] = {}  # per worker, its step counters at the last tick
        self.latest: FrontendReport | None = None  # every frontend's histograms added up
        self._by_frontend: dict[int, FrontendReport] = {}
        self._window_start: FrontendReport | None = None
        self._pub: PubSocket | None = None
        self._tasks: list[asyncio.Task] = []
        self._follows: dict[str, asyncio.Task] = {}
        self._loads_decoder = msgspec.msgpack.Decoder(KvPublication)
        # when each asked-for worker not up yet was asked for (as far as a restarted planner knows: now);
        # it counts as warming up until the launcher says it is up (a vLLM or GPU worker may take minutes)
        self.pending_decode: list[float] = [self.started] * pending_decode
        self.pending_prefill: list[float] = [self.started] * pending_prefill

    @property
    def num_prefill(self) -> int:
        """The prefill workers serving and those asked for that are still starting."""
        return len(self.prefill_started) + len(self.pending_prefill)

    @property
    def mode(self) -> str:
        return "observe" if self.act is None else "active"

    def start(self) -> None:
        self._pub = PubSocket(self.report_endpoint)
        pending = self.pending_decode[:]  # the workers it starts with are not the pending ones
        for name, ep in list(self.workers.items()):
            self.add_worker(name, ep)
        self.pending_decode = pending
        if self.depth_endpoint:
            self._tasks.append(asyncio.ensure_future(follow(
                self.depth_endpoint, msgspec.msgpack.Decoder(QueueDepth), self._depth)))
        for i, ep in enumerate(self.frontend_endpoints):
            self._tasks.append(asyncio.ensure_future(follow(
                ep, msgspec.msgpack.Decoder(FrontendReport), functools.partial(self._frontend, i))))
        self._tasks.append(asyncio.ensure_future(self._run()))

    def stop(self) -> None:
        for t in [*self._tasks, *self._follows.values()]:
            t.cancel()
        if self._pub is not None:
            self._pub.close()

    # ------------------------------------------------------------------ inputs
    def add_worker(self, name: str, endpoint: str) -> None:
        """Follow a worker's load reports (at start, or announced by the launcher when it was added)."""
        self.workers[name] = endpoint
        if name.startswith("decode") and name not in self._follows and self.pending_decode:
            self.pending_decode.pop(0)
        old = self._follows.pop(name, None)
        if old is not None:
            old.cancel()
        self._follows[name] = asyncio.ensure_future(
            follow(endpoint, self._loads_decoder, lambda m, name=name: self._load(name, m)))

    def remove_worker(self, name: str) -> None:
        self.workers.pop(name, None)
        self.loads.pop(name, None)
        self.first_seen.pop(name, None)
        self._steps_before.pop(name, None)
        task = self._follows.pop(name, None)
        if task is not None:
            task.cancel()

    def sync(self, workers: dict[str, str], num_prefill: int, pending_decode: int, pending_prefill: int = 0) -> None:
        """Take the workers as the launcher has them now (``workers``: name -> where it publishes its
        load): what a restarted planner missed while it was starting (workers added, announced or
        retired meanwhile)."""
        for name in [n for n in self.workers if n not in workers]:
            self.remove_worker(name)
        for name, ep in workers.items():
            if self.workers.get(name) != ep or name not in self._follows:
                self.add_worker(name, ep)
        now = time.monotonic()
        del self.prefill_started[num_prefill:]
        self.prefill_started += [now] * (num_prefill - len(self.prefill_started))
        del self.pending_decode[pending_decode:]
        self.pending_decode += [now] * (pending_decode - len(self.pending_decode))
        del self.pending_prefill[pending_prefill:]
        self.pending_prefill += [now] * (pending_prefill - len(self.pending_prefill))

    def on_launcher(self, msg) -> None:
        if msg[0] == "add_worker":
            self.add_worker(msg[1], msg[2])
        elif msg[0] == "remove_worker":
            self.remove_worker(msg[1])
        elif msg[0] == "prefill_up":  # an added prefill worker is ready: its warm-up starts now
            if self.pending_prefill:
                self.pending_prefill.pop(0)
            self.prefill_started.append(time.monotonic())

    def _load(self, name: str, msg) -> None:
        if isinstance(msg, WorkerLoad):  # its KV-event batches travel on the same socket: not ours
            self.loads[name] = msg
            self.first_seen.setdefault(name, time.monotonic())

    def _depth(self, msg: QueueDepth) -> None:
        self.queue_depth, self.queue_tokens = msg.depth, msg.tokens

    def _frontend(self, index: int, msg: FrontendReport) -> None:
        before = self._by_frontend.get(index)
        if before is not None and msg.e2e and before.e2e and msg.e2e[-1][1] < before.e2e[-1][1]:
            self._window_start = None  # that frontend restarted, its counts from zero: no window across it
        self._by_frontend[index] = msg
        reports = list(self._by_frontend.values())
        self.latest = msg if len(reports) == 1 else add_reports(reports)

    # ------------------------------------------------------------------ ticks
    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.tick()
            except Exception:  # noqa: BLE001 - a bad tick is logged; the next one comes
                log.exception("planner tick failed")

    def snapshot(self) -> Snapshot:
        now = time.monotonic()
        before, after = self._window_start, self.latest
        self._window_start = after
        ttft = itl = None
        finished = 0.0
        if before is not None and after is not None:
            ttft = window_quantile(before.ttft, after.ttft, 0.9)
            itl = window_quantile(before.itl, after.itl, 0.9)
            if after.e2e and before.e2e:
                finished = after.e2e[-1][1] - before.e2e[-1][1]
        workers = [WorkerSample(f"prefill-{i}", "prefill", now - t) for i, t in enumerate(self.prefill_started)]
        # a worker asked for and not up yet is warming up (so nothing is decided twice)
        self.pending_decode = [t for t in self.pending_decode if now - t < PENDING_FOR]
        self.pending_prefill = [t for t in self.pending_prefill if now - t < PENDING_FOR]
        workers += [WorkerSample(f"prefill-pending-{i}", "prefill", 0.0) for i in range(len(self.pending_prefill))]
        workers += [WorkerSample(f"decode-pending-{i}", "decode", 0.0) for i in range(len(self.pending_decode))]
        for name in self.workers:
            load = self.loads.get(name)
            if load is None:  # not heard from yet: warming up as far as the planner knows
                workers.append(WorkerSample(name, "decode" if name.startswith("decode") else "worker", 0.0))
                continue
            usage = load.kv_blocks_used / load.kv_blocks_total if load.kv_blocks_total else 0.0
            role = "decode" if name.startswith("decode") else "worker"
            secs, steps = self._steps_before.get(name, (0.0, 0))
            self._steps_before[name] = (load.step_seconds_total, load.steps_total)
            step_ms = (1000 * (load.step_seconds_total - secs) / (load.steps_total - steps)
                       if load.steps_total > steps else None)  # a restarted worker's counters start again: None
            workers.append(WorkerSample(name, role, now - self.first_seen[name], load.requests_running,
                                        load.requests_waiting, usage, step_ms))
        thresholds = [ld.max_local_prefill_length for ld in self.loads.values() if ld.max_local_prefill_length >= 0]
        return Snapshot(t=now - self.started, workers=workers, queue_depth=self.queue_depth,
                        queue_tokens=self.queue_tokens, requests=int(finished),
                        ttft_p90_ms=None if ttft is None else 1000 * ttft,
                        itl_p90_ms=None if itl is None else 1000 * itl,
                        max_local_prefill_length=min(thresholds) if thresholds else None)

    async def tick(self):
        snap = self.snapshot()
        d = self.planner.tick(snap)
        numbers = " ".join(f"{k}={v:g}" for k, v in d.numbers.items())
        if d.action in CARRIED_OUT and self.act is not None:
            log.info("planner: %s: %s; %s", d.action, d.reason, numbers)
            self.act(d)
            now = time.monotonic()
            if d.action in ("add_prefill", "decode_to_prefill"):
                self.pending_prefill.append(now)  # warming up until the launcher says it is up
            if d.action in ("remove_prefill", "prefill_to_decode"):
                # the launcher removes the newest prefill worker: one still starting, if there is one
                if self.pending_prefill:
                    self.pending_prefill.pop()
                elif len(self.prefill_started) > 1:
                    self.prefill_started.pop()
            if d.action in ("add_decode", "prefill_to_decode"):
                self.pending_decode.append(now)
        elif d.action != "none":
            log.info("planner (%s): would %s: %s; %s", self.mode, d.action, d.reason, numbers)
        if self._pub is not None:
            await self._pub.send(msgspec.msgpack.encode(PlannerReport(
                self.mode, self.interval, self.planner.cfg, self.num_prefill, round(snap.t, 1), d.action,
                d.reason, d.numbers)))
        if self.log_path:
            with open(self.log_path, "ab") as fh:
                fh.write(record(snap, d))
        return d
