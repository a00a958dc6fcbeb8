"""The planner on a real 1p1d server: in observe mode it ticks, logs, counts and shows what it
would change, and its JSON-lines log replays to the same decisions; in active mode it adds a
prefill worker under load and removes it after."""

from __future__ import annotations

import os
import signal
import threading
import time

import msgspec
import requests

from dyn_actor.kv.events import WorkerLoad
from dyn_actor.planner import PlannerConfig, read_log, replay
from tests.helpers import Load, eventually, wait_threshold_below
from tests.server import InprocServer, Server

SHORT = {"prompt": "a short prompt", "max_tokens": 8, "ignore_eos": True}


def test_observe_mode_decides_logs_and_replays(tmp_path):
    log = tmp_path / "planner.jsonl"
    # a TTFT target no prompt can meet: once the workers are warm, the planner would add a prefill worker
    s = InprocServer("--topology", "1p1d", "--max-local-prefill-length", "8", "--kv-cache-memory-gb", "0.1",
                     "--planner-interval", "0.5", "--planner-log", str(log), "--ttft-slo-ms", "0.5",
                     "--max-workers", "3")
    stop = threading.Event()

    def load():
        while not stop.is_set():
            requests.post(s.base_url + "/completions", timeout=30,
                          json={"prompt": "a longer prompt than eight tokens", "max_tokens": 4})

    t = threading.Thread(target=load, daemon=True)
    try:
        idle = requests.get(s.base_url + "/planner/state", timeout=10).json()
        assert idle["mode"] == "observe"
        t.start()
        deadline = time.monotonic() + 40
        state = idle
        while time.monotonic() < deadline:
            state = requests.get(s.base_url + "/planner/state", timeout=10).json()
            if any(r["action"] == "add_prefill" for r in state["recent"]):
                break
            time.sleep(0.5)
        stop.set()
        t.join(30)
        add = [r for r in state["recent"] if r["action"] == "add_prefill"]
        assert add and add[0]["numbers"]["ttft_ratio"] > 1, state
        metrics = requests.get(s.url + "/metrics", timeout=10).text
        assert 'dyn_planner_decisions_total{action="add_prefill"}' in metrics
        assert "planner (observe): would add_prefill" in s.log()
        cfg = msgspec.convert(state["config"], PlannerConfig)
    finally:
        stop.set()
        s.stop()
    logged = list(read_log(log))
    assert len(logged) >= 4
    assert replay([snap for snap, _ in logged], cfg) == [d for _, d in logged]
    # the decode worker's step time over each window reached it from the worker's load reports
    steps = [w.step_ms for snap, _ in logged for w in snap.workers if w.role == "decode" and w.step_ms]
    assert steps and all(0 < ms < 10_000 for ms in steps)


def test_planner_flags():
    s = InprocServer("--planner", "off", "--kv-cache-memory-gb", "0.1")
    try:
        assert requests.get(s.base_url + "/planner/state", timeout=10).json()["mode"] == "off"
    finally:
        s.stop()


def test_active_mode_adds_a_prefill_worker_under_load_and_removes_it_after():
    """--planner active: a burst of long prompts missing the TTFT target adds a prefill worker
    (the launcher starts it while serving); the planner, killed, comes back counting it; when the
    burst is over the planner removes it (it finishes what it pulled, then exits). No request
    fails; nothing is left after stop."""
    s = Server("--topology", "1p1d", "--planner", "active", "--max-workers", "3", "--max-local-prefill-length", "8",
               "--ttft-slo-ms", "1", "--planner-interval", "0.5", "--planner-cooldown", "2", "--planner-warmup", "1",
               "--kv-cache-memory-gb", "0.1")
    load = None
    try:
        load = Load(s, {"prompt": "a long prompt " * 30, "max_tokens": 4}, 3)
        eventually(lambda: "prefill 1 is up (added by the planner" in s.log(), timeout=60, interval=0.5)
        assert "prefill 1 is up (added by the planner" in s.log(), s.log()[-3000:]
        assert "prefill 1" in s.pids()
        # the planner killed now comes back knowing the worker it added (its start arguments alone
        # would say one prefill worker)
        up_for = requests.get(s.base_url + "/planner/state", timeout=10).json()["recent"][-1]["t"]
        os.kill(s.pids()["planner 0"], signal.SIGKILL)
        eventually(lambda: "planner 0 is back" in s.log(), timeout=30, interval=0.2)

        def new_report() -> dict | None:
            state = requests.get(s.base_url + "/planner/state", timeout=10).json()
            return state if state["recent"][-1]["t"] < up_for else None

        state = eventually(new_report, timeout=20, interval=0.2)
        assert state and state["prefill_workers"] == 2, state
        load.stop()
        eventually(lambda: "prefill 1 stopped (removed by the planner" in s.log(), timeout=60, interval=0.5)
        assert "prefill 1 stopped (removed by the planner" in s.log(), s.log()[-3000:]
        assert "prefill 1" not in s.pids() and "prefill 0" in s.pids()
        assert load.done and not load.failures, load.failures
        state = requests.get(s.base_url + "/planner/state", timeout=10).json()
        assert state["mode"] == "active" and state["prefill_workers"] == 1
        assert requests.post(s.base_url + "/completions", timeout=60,
                             json={"prompt": "a long prompt " * 30, "max_tokens": 4}).status_code == 200
    finally:
        if load is not None:
            load.stop()
        code, err = s.stop()
    assert code == 0, err[-2000:]


def test_active_mode_adds_a_decode_worker_routes_to_it_and_drains_it_away():
    """--planner active on decode: inter-token latency over its target adds a decode worker; the
    launcher announces it to the frontends (which route to it) and to the planner; once traffic
    stops the planner removes it: every frontend drains it, then the launcher stops it and its KV
    segment goes. No request fails. Two frontends: the planner adds up their latencies, and the
    launcher waits for both to have drained the worker."""
    s = Server("--topology", "1p1d", "--frontends", "2", "--planner", "active", "--max-workers", "3",
               "--ttft-slo-ms", "1000000",
               "--itl-slo-ms", "0.01", "--planner-interval", "0.5", "--planner-cooldown", "2",
               "--planner-warmup", "1", "--kv-cache-memory-gb", "0.1")
    load = None
    try:
        load = Load(s, SHORT, 3)
        deadline = time.monotonic() + 60
        routed = 0
        while time.monotonic() < deadline and not routed:
            workers = {w["name"]: w for w in requests.get(s.base_url + "/router/state", timeout=10).json()["workers"]}
            routed = workers.get("decode-1", {}).get("routed_total", 0)
            time.sleep(0.5)
        assert "decode 1 is up (added by the planner" in s.log(), s.log()[-3000:]
        assert "decode 1" in s.pids()  # (its segment is checked for at the end)
        assert routed > 0, workers  # the frontend routes to the new worker
        load.stop()
        eventually(lambda: "decode 1 stopped (removed by the planner" in s.log(), timeout=60, interval=0.5)
        log = s.log()
        assert "decode 1 drained" in log and "decode 1 stopped (removed by the planner" in log, log[-3000:]
        assert "decode 1" not in s.pids() and "decode 0" in s.pids()
        names = [w["name"] for w in requests.get(s.base_url + "/router/state", timeout=10).json()["workers"]]
        assert names == ["decode-0"]
        assert load.done and not load.failures, load.failures
        assert requests.post(s.base_url + "/completions", timeout=60,
                             json={"prompt": "again", "max_tokens": 4}).status_code == 200
    finally:
        if load is not None:
            load.stop()
        code, err = s.stop()
    assert code == 0, err[-2000:]
    assert not s.segments_left()


def test_active_mode_moves_a_prefill_worker_to_decode_at_the_budget():
    """At the budget (--max-workers 3, 2p1d), decode missing its target and prefill with slack: the
    planner moves a prefill worker to decode (the launcher stops it, then starts a decode worker
    in its place, announced and routed to); when traffic stops, the extra decode worker is
    drained away. No request fails."""
    s = Server("--topology", "2p1d", "--planner", "active", "--max-workers", "3", "--ttft-slo-ms", "1000000",
               "--itl-slo-ms", "0.01", "--planner-interval", "0.5", "--planner-cooldown", "2",
               "--planner-warmup", "1", "--kv-cache-memory-gb", "0.1")
    load = None
    try:
        load = Load(s, SHORT, 3)
        eventually(lambda: "decode 1 is up (added by the planner" in s.log(), timeout=90, interval=0.5)
        log = s.log()
        assert "planner: prefill_to_decode" in log and "prefill 1 stopped (removed by the planner" in log, log[-3000:]
        assert "decode 1 is up (added by the planner" in log, log[-3000:]
        assert log.index("prefill 1 stopped (removed") < log.index("decode 1 is up")  # drained first
        pids = s.pids()
        assert "prefill 1" not in pids and {"prefill 0", "decode 0", "decode 1"} <= set(pids)
        load.stop()
        eventually(lambda: "decode 1 stopped (removed by the planner" in s.log(), timeout=60, interval=0.5)
        assert "decode 1 stopped (removed by the planner" in s.log(), s.log()[-3000:]
        assert load.done and not load.failures, load.failures
    finally:
        if load is not None:
            load.stop()
        code, err = s.stop()
    assert code == 0, err[-2000:]


def test_active_mode_moves_the_threshold_when_no_worker_can_be_added():
    """1p1d at --max-workers 2: decode misses its target, no worker can be added or moved (prefill is
    at its minimum): the planner halves the decode workers' max_local_prefill_length instead."""
    s = Server("--topology", "1p1d", "--planner", "active", "--max-workers", "2", "--ttft-slo-ms", "1000000",
               "--itl-slo-ms", "0.01", "--planner-interval", "0.5", "--planner-cooldown", "1",
               "--planner-warmup", "1", "--kv-cache-memory-gb", "0.1")
    load = None
    try:
        load = Load(s, SHORT, 2)
        policy = wait_threshold_below(s, 512, timeout=60)
        assert policy["decode-0"]["max_local_prefill_length"] <= 256, policy
        assert "planner: lower_local_prefill to 256" in s.log(), s.log()[-3000:]
        assert "add_decode" not in s.log() and "prefill_to_decode" not in s.log()  # the budget holds
        load.stop()
        assert not load.failures, load.failures
    finally:
        if load is not None:
            load.stop()
        code, err = s.stop()
    assert code == 0, err[-2000:]


def test_a_restarted_planner_takes_the_workers_as_they_are_now(tmp_path):
    """What the launcher tells a planner that comes back (``sync``): the workers serving now, the
    prefill workers staying and the decode workers still starting, whatever it started with."""
    import asyncio

    from dyn_actor.components.planner_process import PlannerProcess

    def roles(p: PlannerProcess) -> list[str]:
        return sorted(w.name if w.name.startswith("decode-") and "pending" not in w.name else w.role
                      for w in p.snapshot().workers)

    async def scenario() -> None:
        p = PlannerProcess(PlannerConfig(), interval=60.0, workers={"decode-0": f"ipc://{tmp_path}/d0"},
                           depth_endpoint=None, frontend_endpoints=[], report_endpoint=f"ipc://{tmp_path}/report",
                           num_prefill=1, pending_decode=1)
        p.start()
        try:  # started with decode-0, one prefill worker, and a decode worker asked for and still starting
            assert roles(p) == ["decode", "decode-0", "prefill"]
            p.sync({"decode-0": f"ipc://{tmp_path}/d0", "decode-1": f"ipc://{tmp_path}/d1"}, 2, 0)
            assert roles(p) == ["decode-0", "decode-1", "prefill", "prefill"]
            p.sync({"decode-1": f"ipc://{tmp_path}/d1"}, 1, 1, 1)
            assert roles(p) == ["decode", "decode-1", "prefill", "prefill"] and p.num_prefill == 2
            assert p.pending_prefill and set(p._follows) == {"decode-1"}
        finally:
            p.stop()

    asyncio.run(scenario())


def test_an_added_prefill_worker_warms_up_from_when_it_is_up(tmp_path):
    """A prefill worker the planner asked for counts as warming up (so nothing more is decided) until
    the launcher says it is up, however long it takes to start (a vLLM worker on a busy CPU took
    2.7 minutes); its warm-up runs from then."""
    import asyncio

    from dyn_actor.components.planner_process import PlannerProcess

    async def scenario() -> None:
        cfg = PlannerConfig(warmup_s=0.3)
        p = PlannerProcess(cfg, interval=60.0, workers={"decode-0": f"ipc://{tmp_path}/d0"}, depth_endpoint=None,
                           frontend_endpoints=[], report_endpoint=f"ipc://{tmp_path}/report", num_prefill=1,
                           pending_prefill=1)
        p.start()
        try:
            p._load("decode-0", WorkerLoad("decode-0", 0, 16, 0, 100, 0, 0))  # heard from: warm after 0.3 s
            await asyncio.sleep(0.5)  # past the warm-up since it was asked for: not up, still warming up
            ages = {w.name: w.age_s for w in p.snapshot().workers}
            assert ages["prefill-pending-0"] == 0.0 and ages["prefill-0"] >= 0.5 and p.num_prefill == 2
            assert p.planner.tick(p.snapshot()).reason == "warming up: prefill-pending-0"
            p.on_launcher(("prefill_up", "prefill-1"))
            ages = {w.name: w.age_s for w in p.snapshot().workers}
            assert sorted(ages) == ["decode-0", "prefill-0", "prefill-1"] and ages["prefill-1"] < 0.3 and p.num_prefill == 2
            await asyncio.sleep(0.4)
            assert "warming up" not in p.planner.tick(p.snapshot()).reason
        finally:
            p.stop()

    asyncio.run(scenario())
