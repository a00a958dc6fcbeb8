"""The planner in observe mode on a real 1p1d server: it ticks, logs, counts and shows what it
would change, and its JSON-lines log replays to the same decisions."""

from __future__ import annotations

import threading
import time

import msgspec
import requests

from dyn_actor.planner import PlannerConfig, read_log, replay
from tests.server import Server


def test_observe_mode_decides_logs_and_replays(tmp_path):
    log = tmp_path / "planner.jsonl"
    # a TTFT target no prompt can meet: once the workers are warm, the planner would add a prefill worker
    s = Server("--topology", "1p1d", "--max-local-prefill-length", "8", "--kv-cache-memory-gb", "0.1",
               "--planner-interval", "0.5", "--planner-log", str(log), "--ttft-slo-ms", "0.5", "--max-workers", "3")
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


def test_planner_flags():
    s = Server("--planner", "off", "--kv-cache-memory-gb", "0.1")
    try:
        assert requests.get(s.base_url + "/planner/state", timeout=10).json()["mode"] == "off"
    finally:
        s.stop()


def test_active_mode_is_refused_with_one_line():
    import subprocess
    import sys

    from tests.server import ROOT

    r = subprocess.run([sys.executable, "-m", "launcher", "--planner", "active"], cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and "--planner active is not available yet" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
