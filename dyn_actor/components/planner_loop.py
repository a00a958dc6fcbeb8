"""The planner in the frontend process: every ``--planner-interval`` seconds it
builds a ``Snapshot`` from what the frontend already knows (the decode workers' load as they
publish it, the prefill queue's depth, the TTFT/ITL histograms over the last interval), asks
``dyn_actor.planner.decide`` what to change, and logs, counts (``dyn_planner_decisions_total``)
and shows (``GET /v1/planner/state``) the decision; with ``--planner-log PATH`` each tick is
appended as a JSON line that ``planner.replay`` reproduces. It carries nothing out: the
launcher cannot add or remove workers while serving yet (``--planner active`` is refused).
The prefill workers are counted as launched (the frontend does not talk to them)."""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable

from dyn_actor.planner import Planner, PlannerConfig, Snapshot, WorkerSample, record, window_quantile

log = logging.getLogger(__name__)


def _buckets(hist) -> list[tuple[float, float]]:
    """``[(upper bound, cumulative count)]`` of a prometheus-client histogram."""
    out = []
    for metric in hist.collect():
        for s in metric.samples:
            if s.name.endswith("_bucket"):
                out.append((float(s.labels["le"]), s.value))
    return out


class PlannerLoop:
    def __init__(self, frontend, cfg: PlannerConfig, num_prefill: int, interval: float = 2.0,
                 log_path: str | None = None, act: Callable[[str], None] | None = None) -> None:
        self.frontend = frontend
        self.planner = Planner(cfg)
        self.act = act
        self.prefill_started = [time.monotonic()] * num_prefill
        self.interval = interval
        self.log_path = log_path
        self.started = time.monotonic()
        self.recent: collections.deque = collections.deque(maxlen=20)
        self._task: asyncio.Task | None = None
        m = frontend.metrics
        self._last = (_buckets(m.ttft.metric), _buckets(m.itl.metric), _buckets(m.e2e.metric))

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                self.tick()
            except Exception:  # noqa: BLE001 - a planner bug must not take the frontend down
                log.exception("planner tick failed")

    def snapshot(self) -> Snapshot:
        f, now = self.frontend, time.monotonic()
        m = f.metrics
        ttft, itl, e2e = _buckets(m.ttft.metric), _buckets(m.itl.metric), _buckets(m.e2e.metric)
        (t0, i0, e0), self._last = self._last, (ttft, itl, e2e)
        finished = (e2e[-1][1] - e0[-1][1]) if e2e and e0 else 0.0
        q_ttft, q_itl = window_quantile(t0, ttft, 0.9), window_quantile(i0, itl, 0.9)
        workers = [WorkerSample(f"prefill-{i}", "prefill", now - t) for i, t in enumerate(self.prefill_started)]
        for e in f.router.live_workers():
            load = e.load
            workers.append(WorkerSample(e.name, "decode", now - e.added_at,
                                        load.requests_running if load else e.in_flight,
                                        load.requests_waiting if load else 0, e.kv_usage))
        return Snapshot(t=now - self.started, workers=workers, queue_depth=int(f.queue_depth), requests=int(finished),
                        ttft_p90_ms=None if q_ttft is None else 1000 * q_ttft,
                        itl_p90_ms=None if q_itl is None else 1000 * q_itl)

    def tick(self):
        snap = self.snapshot()
        d = self.planner.tick(snap)
        self.frontend.metrics.planner_decisions.inc(1, d.action)
        numbers = " ".join(f"{k}={v:g}" for k, v in d.numbers.items())
        if d.action in ("add_prefill", "remove_prefill") and self.act is not None:
            log.info("planner: %s: %s; %s", d.action, d.reason, numbers)
            self.act(d.action)
            if d.action == "add_prefill":
                self.prefill_started.append(time.monotonic())
            else:
                self.prefill_started.pop()
        elif d.action != "none":
            tail = "" if self.act is None else " (not carried out: only prefill workers are scaled so far)"
            log.info("planner (observe): would %s: %s; %s%s", d.action, d.reason, numbers, tail)
        self.recent.append({"t": round(snap.t, 1), "action": d.action, "reason": d.reason, "numbers": d.numbers})
        if self.log_path:
            with open(self.log_path, "ab") as fh:
                fh.write(record(snap, d))
        return d

    def state(self) -> dict:
        return {"mode": "observe" if self.act is None else "active", "interval_s": self.interval,
                "config": self.planner.cfg, "prefill_workers": len(self.prefill_started), "recent": list(self.recent)}
