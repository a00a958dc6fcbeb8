"""The planner's decision: one pure function from what the system reports to what to change.

``decide(snapshot, config, state)`` looks at one ``Snapshot`` (per-worker load and step time, the
prefill queue's depth and queued prompt tokens, TTFT and ITL over the last window) and returns one ``Decision``: add or remove a prefill
or decode worker, move a worker between the two roles, or nothing, with the numbers behind it.
It keeps none of the pathologies reported of other planners:

- **hysteresis**: it scales up when a target is missed (ratio above 1) and considers scaling
  down only far below it (``down_ratio``), so a load near a threshold moves nothing;
- **the N-1 check**: before removing a worker it projects the load of the ones that remain
  (their share grows by n / (n-1)) and removes only if that projection stays under
  ``keep_under`` of the target: a removal never forces the next tick's addition;
- **cooldown** after every action, and **warm-up**: nothing is decided while a worker is in its
  first ``warmup_s`` (its first steps are slow and would make the planner over-scale);
- **idle goes to the minimum**: with no request in the window and nothing queued it removes
  one worker a cooldown until ``min_prefill`` / ``min_decode`` remain;
- **the budget** (``max_workers``) is never exceeded: at the budget, a role that misses its
  target takes a worker from the other role when that role has slack; failing that (the other
  role is at its minimum) the conditional-disaggregation threshold moves work instead: halved
  (more prompts prefilled remotely) when decode misses its target and prefill has room, doubled
  (more prefilled locally) the other way round, within ``local_prefill_min..local_prefill_max``.

Every decision can be logged as one JSON line (``record``) and replayed offline (``replay``):
the same snapshots through the same function give the same decisions.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import msgspec

ACTIONS = ("none", "add_prefill", "remove_prefill", "add_decode", "remove_decode", "prefill_to_decode",
           "decode_to_prefill", "raise_local_prefill", "lower_local_prefill")


class PlannerConfig(msgspec.Struct, frozen=True, kw_only=True):
    ttft_slo_ms: float = 2000.0
    itl_slo_ms: float = 100.0
    min_prefill: int = 1
    min_decode: int = 1
    max_workers: int = 4
    cooldown_s: float = 20.0
    warmup_s: float = 10.0
    down_ratio: float = 0.4  # consider a removal only below this share of a target
    keep_under: float = 0.8  # ... and only if the survivors' projected load stays below this share
    queue_per_prefill: float = 2.0  # queued remote prefills per prefill worker that count as missing the TTFT target
    # queued prompt tokens per prefill worker that count as missing it (a few long prompts weigh
    # more than many short ones)
    queue_tokens_per_prefill: float = 16384.0
    kv_usage_high: float = 0.9  # decode workers' KV usage that counts as missing the ITL target
    # the conditional-disaggregation threshold (prompts longer than it are prefilled remotely) moves
    # within these bounds when no worker can be added or moved
    local_prefill_min: int = 0
    local_prefill_max: int = 4096
    local_prefill_default: int | None = None  # the launch value, which an idle system goes back to


class WorkerSample(msgspec.Struct, frozen=True):
    name: str
    role: str  # "prefill" | "decode" | "worker" (aggregated)
    age_s: float  # since it became ready
    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0
    step_ms: float | None = None  # the mean time of its engine steps over the window (None: no step)


class Snapshot(msgspec.Struct, frozen=True, kw_only=True):
    t: float
    workers: list[WorkerSample]
    queue_depth: int = 0  # remote prefills waiting in the prefill queue
    queue_tokens: int = 0  # ... and the prompt tokens they still need computed
    requests: int = 0  # requests that finished in the window
    ttft_p90_ms: float | None = None  # over the window (None: no request)
    itl_p90_ms: float | None = None
    max_local_prefill_length: int | None = None  # the decode workers' threshold (None: not disaggregated)


class PlannerState(msgspec.Struct, kw_only=True):
    last_action_t: float | None = None


class Decision(msgspec.Struct, frozen=True, kw_only=True):
    action: str
    reason: str
    numbers: dict[str, float] = {}


def _ratio(value: float | None, target: float) -> float:
    return 0.0 if value is None else value / target


def decide(snap: Snapshot, cfg: PlannerConfig, state: PlannerState | None = None) -> Decision:
    """What to change now, if anything. Pure: the same inputs give the same decision."""
    prefill = [w for w in snap.workers if w.role == "prefill"]
    decode = [w for w in snap.workers if w.role == "decode"]
    n_p, n_d = len(prefill), len(decode)
    ttft = _ratio(snap.ttft_p90_ms, cfg.ttft_slo_ms)
    itl = _ratio(snap.itl_p90_ms, cfg.itl_slo_ms)
    queue = max(snap.queue_depth / cfg.queue_per_prefill,
                snap.queue_tokens / cfg.queue_tokens_per_prefill) / max(n_p, 1)
    kv = max((w.kv_usage for w in decode), default=0.0) / cfg.kv_usage_high
    # a decode step is a token for each running request: its time is the ITL they see, known even
    # in a window where no request finished
    step = max((w.step_ms for w in decode if w.step_ms is not None), default=0.0) / cfg.itl_slo_ms
    prefill_load, decode_load = max(ttft, queue), max(itl, kv, step)
    numbers = {"prefill_workers": n_p, "decode_workers": n_d, "ttft_ratio": round(ttft, 3),
               "itl_ratio": round(itl, 3), "queue_ratio": round(queue, 3), "kv_ratio": round(kv, 3),
               "step_ratio": round(step, 3), "queue_depth": snap.queue_depth, "queue_tokens": snap.queue_tokens,
               "requests": snap.requests}

    def out(action: str, reason: str) -> Decision:
        return Decision(action=action, reason=reason, numbers=numbers)

    if not decode:
        return out("none", "no disaggregated workers to plan")
    warming = [w.name for w in snap.workers if w.age_s < cfg.warmup_s]
    if warming:
        return out("none", f"warming up: {', '.join(warming)}")
    last = state.last_action_t if state is not None else None
    if last is not None and snap.t - last < cfg.cooldown_s:
        return out("none", f"cooldown ({snap.t - last:.0f} of {cfg.cooldown_s:.0f} s)")
    total = n_p + n_d
    busy = any(w.running or w.waiting for w in snap.workers)
    if snap.requests == 0 and snap.queue_depth == 0 and not busy:
        if n_p > cfg.min_prefill:
            return out("remove_prefill", "idle: down to the minimum")
        if n_d > cfg.min_decode:
            return out("remove_decode", "idle: down to the minimum")
        lm, home = snap.max_local_prefill_length, cfg.local_prefill_default
        if lm is not None and home is not None and lm != home:
            numbers["new_max_local_prefill_length"] = home
            return out("lower_local_prefill" if lm > home else "raise_local_prefill",
                       "idle: the threshold goes back to its launch value")
        return out("none", "idle, at the minimum")
    # a missed target: more of that role (or a worker from the other role, at the budget)
    if prefill_load > 1 and prefill_load >= decode_load:
        if total < cfg.max_workers:
            return out("add_prefill", "prefill misses its target (TTFT or queue)")
        if n_d > cfg.min_decode and decode_load * n_d / (n_d - 1) < cfg.keep_under:
            return out("decode_to_prefill", "prefill misses its target at the budget; decode has slack")
        lm = snap.max_local_prefill_length
        if lm is not None and decode_load < cfg.keep_under and lm < cfg.local_prefill_max:
            numbers["new_max_local_prefill_length"] = min(cfg.local_prefill_max, max(2 * lm, 64))
            return out("raise_local_prefill", "prefill misses its target at the budget; the decode workers have "
                                              "room to prefill longer prompts themselves")
        return out("none", "prefill misses its target, but the budget is spent")
    if decode_load > 1:
        if total < cfg.max_workers:
            return out("add_decode", "decode misses its target (ITL or KV usage)")
        if n_p > cfg.min_prefill and prefill_load * n_p / (n_p - 1) < cfg.keep_under:
            return out("prefill_to_decode", "decode misses its target at the budget; prefill has slack")
        lm = snap.max_local_prefill_length
        if lm is not None and prefill_load < cfg.keep_under and lm > cfg.local_prefill_min:
            numbers["new_max_local_prefill_length"] = max(cfg.local_prefill_min, lm // 2)
            return out("lower_local_prefill", "decode misses its target at the budget; the prefill workers have "
                                              "room for more of the prompts")
        return out("none", "decode misses its target, but the budget is spent")
    # far below a target: remove one if the ones that remain stay well under it. Not while the
    # threshold keeps work away from that role on purpose (raised: prompts the prefill workers would
    # take are prefilled locally; lowered: the other way): its slack is the planner's own doing
    lm, home = snap.max_local_prefill_length, cfg.local_prefill_default
    shifted_to_decode = lm is not None and home is not None and lm > home
    shifted_to_prefill = lm is not None and home is not None and lm < home
    if n_p > cfg.min_prefill and prefill_load < cfg.down_ratio and not shifted_to_decode:
        projected = prefill_load * n_p / (n_p - 1)
        numbers["prefill_projected"] = round(projected, 3)
        if projected < cfg.keep_under:
            return out("remove_prefill", "prefill far below its target, and N-1 stay under it")
    if n_d > cfg.min_decode and decode_load < cfg.down_ratio and not shifted_to_prefill:
        projected = decode_load * n_d / (n_d - 1)
        numbers["decode_projected"] = round(projected, 3)
        if projected < cfg.keep_under:
            return out("remove_decode", "decode far below its target, and N-1 stay under it")
    return out("none", "within targets")


class Planner:
    """``decide`` with its state: the cooldown clock starts when a decision is carried out (or, in
    observe mode, would have been)."""

    def __init__(self, cfg: PlannerConfig) -> None:
        self.cfg = cfg
        self.state = PlannerState()

    def tick(self, snap: Snapshot) -> Decision:
        d = decide(snap, self.cfg, self.state)
        if d.action != "none":
            self.state.last_action_t = snap.t
        return d


_enc = msgspec.json.Encoder()


def record(snap: Snapshot, decision: Decision) -> bytes:
    """One JSON line: the snapshot and the decision taken on it."""
    return _enc.encode({"snapshot": snap, "decision": decision}) + b"\n"


def read_log(path: str | Path) -> Iterator[tuple[Snapshot, Decision]]:
    for line in Path(path).read_text().splitlines():
        if line.strip():
            obj = json.loads(line)
            yield (msgspec.convert(obj["snapshot"], Snapshot), msgspec.convert(obj["decision"], Decision))


def replay(snapshots: Iterable[Snapshot], cfg: PlannerConfig) -> list[Decision]:
    """The decisions a fresh planner takes on these snapshots, in order."""
    p = Planner(cfg)
    return [p.tick(s) for s in snapshots]


# ------------------------------------------------------------------ windows of histograms
def window_quantile(before: list[tuple[float, float]], after: list[tuple[float, float]], q: float) -> float | None:
    """The ``q`` quantile of what a cumulative histogram gained between two readings
    (``[(upper bound, cumulative count)]``, ``+Inf`` last), interpolated inside its bucket; None
    when nothing was observed."""
    prev = dict(before)
    counts = [(le, c - prev.get(le, 0.0)) for le, c in after]
    total = counts[-1][1] if counts else 0.0
    if total <= 0:
        return None
    rank, lower, below = q * total, 0.0, 0.0
    for le, c in counts:
        if c >= rank:
            if le == float("inf"):
                return lower
            span = c - below
            return lower + (le - lower) * ((rank - below) / span if span > 0 else 1.0)
        lower, below = le, c
    return lower
