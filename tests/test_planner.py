"""The planner's decision function on scripted load traces: a toy system whose TTFT and ITL
ratios are a demand shared out over the workers of each role, stepped every 2 s, with the
decisions carried out (a new worker starts its warm-up)."""

from __future__ import annotations

import msgspec

from dyn_actor.planner import (
    ACTIONS,
    Planner,
    PlannerConfig,
    PlannerState,
    Snapshot,
    WorkerSample,
    decide,
    read_log,
    record,
    replay,
)

CFG = PlannerConfig(ttft_slo_ms=1000, itl_slo_ms=100, min_prefill=1, min_decode=1, max_workers=4, cooldown_s=10,
                    warmup_s=6)


def _snap(t, prefill_ages, decode_ages, p_demand, d_demand, requests=10, queue=0, busy=True):
    n_p, n_d = max(len(prefill_ages), 1), max(len(decode_ages), 1)
    w = [WorkerSample(f"prefill-{i}", "prefill", a, running=int(busy)) for i, a in enumerate(prefill_ages)]
    w += [WorkerSample(f"decode-{i}", "decode", a, running=int(busy)) for i, a in enumerate(decode_ages)]
    return Snapshot(t=t, workers=w, queue_depth=queue, requests=requests,
                    ttft_p90_ms=None if not requests else 1000 * p_demand / n_p,
                    itl_p90_ms=None if not requests else 100 * d_demand / n_d)


def simulate(p_demand, d_demand, n_p=1, n_d=1, cfg=CFG, seconds=300, dt=2.0, requests=lambda t: 10, log=None):
    """Run the planner on the toy system; return (decisions with their time, counts over time)."""
    planner = Planner(cfg)
    p_ages, d_ages = [100.0] * n_p, [100.0] * n_d
    decisions, counts = [], []
    t = 0.0
    while t < seconds:
        snap = _snap(t, p_ages, d_ages, p_demand(t), d_demand(t), requests(t))
        d = planner.tick(snap)
        if log is not None:
            log.write(record(snap, d))
        assert d.action in ACTIONS
        if d.action != "none":
            decisions.append((t, d.action))
        if d.action == "add_prefill" or d.action == "decode_to_prefill":
            p_ages.append(0.0)
        if d.action == "add_decode" or d.action == "prefill_to_decode":
            d_ages.append(0.0)
        if d.action in ("remove_prefill", "prefill_to_decode"):
            p_ages.pop()
        if d.action in ("remove_decode", "decode_to_prefill"):
            d_ages.pop()
        counts.append((len(p_ages), len(d_ages)))
        p_ages = [a + dt for a in p_ages]
        d_ages = [a + dt for a in d_ages]
        t += dt
    return decisions, counts


def test_a_growing_prefill_load_adds_prefill_workers():
    decisions, counts = simulate(lambda t: 0.5 + t / 60, lambda t: 0.5)  # demand grows from 0.5 to 5.5
    assert decisions and decisions[0][1] == "add_prefill"
    assert counts[-1] == (3, 1)  # the budget: 4 in all, a decode worker kept
    assert all(p + d <= CFG.max_workers for p, d in counts)


def test_a_steady_load_near_a_threshold_does_not_oscillate():
    # 1.8 on one worker misses the target; on two it is 0.9 (near it): add once, then nothing
    decisions, counts = simulate(lambda t: 1.8, lambda t: 0.5)
    assert decisions == [(0.0, "add_prefill")]
    assert counts[-1] == (2, 1)


def test_scale_down_when_load_drops_and_it_stays_down():
    # 3 prefill workers; demand drops to 0.6: remove to 2 (0.3 each; 2 -> 1 would project 0.6 < 0.8: remove
    # again), then 1 worker at 0.6 stays, and nothing is added back
    decisions, counts = simulate(lambda t: 3.0 if t < 40 else 0.6, lambda t: 0.5, n_p=3)
    assert [a for _, a in decisions] == ["remove_prefill", "remove_prefill"]
    assert counts[-1] == (1, 1)
    t1, t2 = decisions[0][0], decisions[1][0]
    assert t1 >= 40 and t2 - t1 >= CFG.cooldown_s


def test_the_n_minus_1_check_keeps_a_worker_the_survivors_would_need():
    cfg = PlannerConfig(ttft_slo_ms=1000, itl_slo_ms=100, down_ratio=0.5, keep_under=0.8, cooldown_s=10, warmup_s=6)
    # 2 prefill workers at 0.35 of the target each: one alone would be at 0.7, under 0.8 -> removed
    assert decide(_snap(0, [50, 50], [50], 0.7, 0.5), cfg).action == "remove_prefill"
    # at 0.45 each: far enough below (< 0.5) to consider it, but one alone would be at 0.9 -> kept
    d = decide(_snap(0, [50, 50], [50], 0.9, 0.5), cfg)
    assert d.action == "none" and d.numbers["prefill_projected"] == 0.9


def test_nothing_during_warm_up_or_cooldown():
    assert decide(_snap(0, [2.0], [50], 5.0, 0.5), CFG).action == "none"  # a prefill worker is warming up
    state = PlannerState(last_action_t=100.0)
    assert decide(_snap(105, [50], [50], 5.0, 0.5), CFG, state).action == "none"  # 5 s of 10 s cooldown
    assert decide(_snap(111, [50], [50], 5.0, 0.5), CFG, state).action == "add_prefill"


def test_at_the_budget_a_role_takes_a_worker_from_the_other_when_it_has_slack():
    cfg = PlannerConfig(max_workers=3, min_prefill=1, min_decode=1, cooldown_s=10, warmup_s=6)
    # 1 prefill missing its target, 2 decode workers nearly idle: move one
    assert decide(_snap(0, [50], [50, 50], 3.0, 0.2), cfg).action == "decode_to_prefill"
    # both roles miss their targets at the budget: nothing to move, nothing added
    assert decide(_snap(0, [50], [50, 50], 3.0, 3.0), cfg).action == "none"
    decisions, counts = simulate(lambda t: 5.0, lambda t: 5.0, cfg=cfg)
    assert all(p + d <= 3 for p, d in counts)


def test_idle_goes_down_to_the_minimum_and_stays():
    decisions, counts = simulate(lambda t: 0.0, lambda t: 0.0, n_p=2, n_d=2, requests=lambda t: 0)
    assert counts[-1] == (1, 1)
    assert [a for _, a in decisions] == ["remove_prefill", "remove_decode"]


def test_decisions_replay_from_the_log(tmp_path):
    path = tmp_path / "planner.jsonl"
    with open(path, "wb") as log:
        simulate(lambda t: 0.5 + t / 60, lambda t: 1.5 if t > 150 else 0.3, log=log)
    logged = list(read_log(path))
    assert len(logged) == 150 and any(d.action != "none" for _, d in logged)
    assert replay([s for s, _ in logged], CFG) == [d for _, d in logged]


def test_at_the_budget_with_the_other_role_at_its_minimum_the_threshold_moves_work():
    """No worker can be added or moved: the conditional-disaggregation threshold shifts prefill work
    instead, halved when decode misses its target (more prompts go remote), doubled the other way,
    within its bounds; without a threshold (aggregated) nothing happens."""
    cfg = PlannerConfig(ttft_slo_ms=1000, itl_slo_ms=100, max_workers=2, cooldown_s=10, warmup_s=6,
                        local_prefill_min=32, local_prefill_max=1024)

    def snap(p_demand, d_demand, lm):
        s = _snap(0.0, [100.0], [100.0], p_demand, d_demand)
        return Snapshot(t=s.t, workers=s.workers, requests=s.requests, ttft_p90_ms=s.ttft_p90_ms,
                        itl_p90_ms=s.itl_p90_ms, max_local_prefill_length=lm)

    d = decide(snap(0.1, 3.0, 512), cfg)
    assert d.action == "lower_local_prefill" and d.numbers["new_max_local_prefill_length"] == 256
    assert decide(snap(0.1, 3.0, 40), cfg).numbers["new_max_local_prefill_length"] == 32  # not below the floor
    assert decide(snap(0.1, 3.0, 32), cfg).action == "none"  # at the floor: the budget is spent
    assert decide(snap(0.1, 3.0, None), cfg).action == "none"
    d = decide(snap(3.0, 0.1, 512), cfg)
    assert d.action == "raise_local_prefill" and d.numbers["new_max_local_prefill_length"] == 1024
    assert decide(snap(3.0, 0.1, 1024), cfg).action == "none"  # at the ceiling
    assert decide(snap(3.0, 0.9, 512), cfg).action == "none"  # decode has no room to take more
    # with a worker to spare, a worker moves instead (the threshold is the last resort)
    big = PlannerConfig(ttft_slo_ms=1000, itl_slo_ms=100, max_workers=3, cooldown_s=10, warmup_s=6)
    s = _snap(0.0, [100.0, 100.0], [100.0], 0.1, 3.0)
    s = Snapshot(t=0.0, workers=s.workers, requests=10, ttft_p90_ms=s.ttft_p90_ms, itl_p90_ms=s.itl_p90_ms,
                 max_local_prefill_length=512)
    assert decide(s, big).action == "prefill_to_decode"
    # idle: back to the launch value
    home = PlannerConfig(max_workers=2, local_prefill_default=512)
    idle = Snapshot(t=0.0, workers=[WorkerSample("prefill-0", "prefill", 100.0), WorkerSample("decode-0", "decode", 100.0)],
                    requests=0, max_local_prefill_length=2048)
    d = decide(idle, home)
    assert d.action == "lower_local_prefill" and d.numbers["new_max_local_prefill_length"] == 512
    assert decide(msgspec.structs.replace(idle, max_local_prefill_length=512), home).action == "none"
    # a prefill role with slack only because the raised threshold keeps its prompts local keeps its workers
    busy = Snapshot(t=0.0, workers=[WorkerSample("prefill-0", "prefill", 100.0, running=1),
                                    WorkerSample("prefill-1", "prefill", 100.0, running=1),
                                    WorkerSample("decode-0", "decode", 100.0, running=1)],
                    requests=10, ttft_p90_ms=10.0, itl_p90_ms=10.0, max_local_prefill_length=512)
    three = PlannerConfig(max_workers=3, local_prefill_default=512)
    assert decide(busy, three).action == "remove_prefill"
    assert decide(msgspec.structs.replace(busy, max_local_prefill_length=2048), three).action == "none"


def test_queued_prompt_tokens_and_step_time_count_before_any_request_finishes():
    """At the start of a burst no request has finished yet (no TTFT, no ITL in the window): a queue of
    a few long prompts (tokens, not depth) asks for a prefill worker, and decode steps slower than
    the ITL target ask for a decode worker."""
    cfg = PlannerConfig(ttft_slo_ms=1000, itl_slo_ms=100, max_workers=4, cooldown_s=10, warmup_s=6,
                        queue_tokens_per_prefill=8192)
    workers = [WorkerSample("prefill-0", "prefill", 100.0), WorkerSample("decode-0", "decode", 100.0, running=4)]
    quiet = Snapshot(t=0.0, workers=workers, requests=0, queue_depth=1, queue_tokens=2000)
    assert decide(quiet, cfg).action == "none"  # one short prompt queued: within target
    long = msgspec.structs.replace(quiet, queue_tokens=3 * 8000)  # 3 long prompts: 2.9x what one worker takes
    d = decide(long, cfg)
    assert d.action == "add_prefill" and d.numbers["queue_ratio"] == 2.93 and d.numbers["queue_tokens"] == 24000
    # two prefill workers share the same queue: 1.46x each, still missing it
    two = msgspec.structs.replace(long, workers=[*workers, WorkerSample("prefill-1", "prefill", 100.0)])
    assert decide(two, cfg).numbers["queue_ratio"] == 1.465
    slow = [WorkerSample("prefill-0", "prefill", 100.0), WorkerSample("decode-0", "decode", 100.0, running=4,
                                                                      step_ms=250.0)]
    d = decide(msgspec.structs.replace(quiet, workers=slow), cfg)
    assert d.action == "add_decode" and d.numbers["step_ratio"] == 2.5
    # a snapshot logged before these fields existed reads (and replays) as none queued, no step time
    old = msgspec.json.decode(b'{"t": 0, "workers": [{"name": "decode-0", "role": "decode", "age_s": 50.0}], "queue_depth": 1}',
                              type=Snapshot)
    assert old.queue_tokens == 0 and old.workers[0].step_ms is None
