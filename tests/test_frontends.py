"""Several frontend processes on one port (``--frontends N``): the launcher binds the port and hands
each frontend a socket of its own; ``/metrics`` on any of them counts every frontend's requests;
the planner adds up their latency histograms; a frontend that dies is restarted on the port while
the others serve."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys

import pytest
import requests

from dyn_actor.components.planner_process import FrontendReport, add_reports
from launcher.config import ConfigError, parse_args
from launcher.listen import listen_sockets
from tests.helpers import eventually
from tests.server import ROOT, Server


def _close(groups) -> None:
    for group in groups:
        for s in group:
            s.close()


def test_one_frontend_gets_a_plain_socket_and_a_taken_port_is_an_error():
    groups = listen_sockets("127.0.0.1", 0, 1)
    try:
        assert len(groups) == 1 and len(groups[0]) == 1
        sock = groups[0][0]
        assert not sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT)
        with pytest.raises(OSError):
            listen_sockets("127.0.0.1", sock.getsockname()[1], 1)
    finally:
        _close(groups)


def test_several_frontends_share_the_port_and_no_one_else_can_join():
    groups = listen_sockets("127.0.0.1", 0, 3)
    try:
        assert len(groups) == 3
        ports = {g[0].getsockname()[1] for g in groups}
        assert len(ports) == 1
        port = ports.pop()
        assert all(g[0].getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) for g in groups)
        # another server, even one that asks for SO_REUSEPORT itself, is refused the port (the probe)
        with pytest.raises(OSError):
            listen_sockets("127.0.0.1", port, 2)
        with pytest.raises(OSError):
            listen_sockets("127.0.0.1", port, 1)
    finally:
        _close(groups)
    # once they are closed, the port is free again
    _close(listen_sockets("127.0.0.1", port, 2))


def test_frontends_flag_is_checked(tmp_path):
    assert parse_args(["--frontends", "3"]).frontends == 3
    (tmp_path / "c.yaml").write_text("frontends: 2\n")
    assert parse_args(["--config", str(tmp_path / "c.yaml")]).frontends == 2
    assert parse_args(["--api-server-count", "2"]).frontends == 2  # vLLM's name for it
    for bad in ("0", "33"):
        with pytest.raises(ConfigError, match="--frontends must be between 1 and 32"):
            parse_args(["--frontends", bad])


def test_the_planner_adds_up_the_frontends_histograms():
    inf = float("inf")
    a = FrontendReport([(0.1, 1.0), (1.0, 3.0), (inf, 4.0)], [(0.01, 10.0), (inf, 12.0)], [(inf, 4.0)])
    b = FrontendReport([(0.1, 0.0), (1.0, 2.0), (inf, 2.0)], [(0.01, 5.0), (inf, 5.0)], [(inf, 2.0)])
    total = add_reports([a, b])
    assert total.ttft == [(0.1, 1.0), (1.0, 5.0), (inf, 6.0)]
    assert total.itl == [(0.01, 15.0), (inf, 17.0)]
    assert total.e2e == [(inf, 6.0)]


def _metric(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.M)
    assert m is not None, f"{name} not in /metrics"
    return float(m.group(1))


def test_two_frontends_serve_one_port_and_count_together():
    s = Server("--frontends", "2", "--kv-cache-memory-gb", "0.1")
    try:
        pids = s.pids()
        assert "frontend 0" in pids and "frontend 1" in pids, pids
        sent = 0
        for i in range(24):  # a new connection each: the kernel spreads them over the two
            stream = i % 2 == 0
            r = requests.post(s.base_url + "/completions", timeout=60, stream=stream,
                              json={"prompt": f"request {i}", "max_tokens": 4, "stream": stream,
                                    "temperature": 0})
            assert r.status_code == 200, r.text
            body = r.text
            if stream:
                assert body.rstrip().endswith("data: [DONE]"), body
            sent += 1
        # each frontend has a router of its own: between them they routed every request
        seen: dict[int, int] = {}
        for _ in range(60):
            state = requests.get(s.base_url + "/router/state", timeout=10).json()
            seen[state["frontend"]] = sum(w["routed_total"] for w in state["workers"])
            if len(seen) == 2:
                break
        assert set(seen) == {0, 1}, seen
        assert sum(seen.values()) == sent, seen
        assert all(n > 0 for n in seen.values()), seen  # both served some
        # /metrics on either frontend counts them all
        for _ in range(4):
            text = requests.get(s.url + "/metrics", timeout=10).text
            assert _metric(text, 'dyn_requests_total{outcome="success"}') == sent
            assert _metric(text, 'dyn_router_decisions_total{worker="worker-0"}') == sent
            assert _metric(text, "dyn_time_to_first_token_seconds_count") == sent
            assert _metric(text, "dyn_requests_in_flight") == 0
            assert _metric(text, 'dyn_worker_kv_blocks_total{worker="worker-0"}') > 0
        # the worker's gauges: the most recent of what the frontends last heard from it (a few times a second)
        eventually(lambda: _metric(requests.get(s.url + "/metrics", timeout=10).text,
                                   'dyn_worker_kv_blocks_used{worker="worker-0"}') == 0, timeout=10, interval=0.2)
        # frontend 1 dies: frontend 0 takes every new connection meanwhile, and frontend 1 comes back
        os.kill(s.pids()["frontend 1"], signal.SIGKILL)
        eventually(lambda: "frontend 1 exited unexpectedly" in s.log(), timeout=10, interval=0.05)
        for i in range(10):
            r = requests.post(s.base_url + "/completions", json={"prompt": f"meanwhile {i}", "max_tokens": 2},
                              timeout=30)
            assert r.status_code == 200, r.text
        sent += 10
        eventually(lambda: "frontend 1 is back" in s.log(), timeout=30, interval=0.2)
        seen_again = set()
        for _ in range(60):
            seen_again.add(requests.get(s.base_url + "/router/state", timeout=10).json()["frontend"])
            if len(seen_again) == 2:
                break
        assert seen_again == {0, 1}
        # what the dead frontend counted still counts
        text = requests.get(s.url + "/metrics", timeout=10).text
        assert _metric(text, 'dyn_requests_total{outcome="success"}') == sent
        assert _metric(text, "dyn_requests_in_flight") == 0
        # another launcher on the same port fails at once, with the reason
        port = s.url.rsplit(":", 1)[1]
        other = subprocess.run([sys.executable, "-m", "launcher", "--port", port], cwd=ROOT, capture_output=True,
                               text=True, timeout=60)
        assert other.returncode == 1
        assert f"error: cannot listen on 127.0.0.1:{port}: Address already in use" in other.stderr, other.stderr
    finally:
        code, err = s.stop()
    assert code == 0, err[-2000:]
    run_dir = re.search(r"run directory (\S+)", err)
    assert run_dir is not None
    assert not os.path.exists(run_dir.group(1))  # the frontends' metrics files went with it


def test_the_planner_takes_no_latency_window_across_a_frontend_restart():
    from dyn_actor.components.planner_process import PlannerProcess
    from dyn_actor.planner import PlannerConfig

    p = PlannerProcess(PlannerConfig(), interval=1.0, workers={}, depth_endpoint=None,
                       frontend_endpoints=["ipc:///nowhere-0", "ipc:///nowhere-1"], report_endpoint="ipc:///nowhere",
                       num_prefill=0)
    inf = float("inf")

    def report(slow: float, total: float) -> FrontendReport:  # ``total`` requests, ``slow`` of them over 1 s
        b = [(0.1, total - slow), (1.0, total - slow), (inf, total)]
        return FrontendReport(b, b, b)

    p._frontend(0, report(0, 100))
    p._frontend(1, report(0, 100))
    p.snapshot()  # the window starts here
    p._frontend(0, report(10, 110))
    p._frontend(1, report(10, 110))
    assert p.snapshot().ttft_p90_ms is not None  # 20 new requests, 20 slow
    p._frontend(1, report(10, 400))
    p._frontend(0, report(0, 5))  # frontend 0 restarted: its counts begin again
    snap = p.snapshot()
    assert snap.ttft_p90_ms is None and snap.requests == 0  # no window that would count -105 requests
    p._frontend(0, report(5, 10))
    p._frontend(1, report(15, 405))
    snap = p.snapshot()
    assert snap.ttft_p90_ms is not None and snap.requests == 10


def test_a_restarted_frontend_catches_up_with_the_workers_that_changed_while_it_started():
    from launcher.__main__ import catch_up

    endpoints = {"decode-0": "ipc://d0", "decode-1": "ipc://d1", "decode-2": "ipc://d2"}
    draining = {"decode-1": {0}}
    # started with decode-0, decode-1 and decode-3; since then decode-2 was added, decode-1 began
    # draining and decode-3 was retired
    got = catch_up({"decode-0", "decode-1", "decode-3"}, endpoints, draining, 30.0)
    assert got == [("retire_worker", "decode-1", 30.0), ("add_worker", "decode-2", "ipc://d2"),
                   ("retire_worker", "decode-3", 0.0)]
    assert catch_up(set(endpoints) - {"decode-1"}, endpoints, draining, 30.0) == []  # nothing changed
