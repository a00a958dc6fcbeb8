"""Faults: client disconnects, a worker killed mid-stream, Ctrl-C, a worker that cannot start."""

from __future__ import annotations

import glob
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import requests

from tests.helpers import eventually
from tests.server import ROOT, Server


def _metric_values(url: str, name: str) -> list[float]:
    text = requests.get(url + "/metrics", timeout=10).text
    return [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{")]


def _stream(server: Server, max_tokens: int = 3000):
    resp = requests.post(server.base_url + "/completions", stream=True, timeout=30, json={
        "prompt": "tell me a long story", "max_tokens": max_tokens, "stream": True, "ignore_eos": True})
    assert resp.status_code == 200
    return resp


def test_client_disconnect_frees_kv_blocks():
    server = Server("--workers", "1", "--max-model-len", "4096", "--kv-cache-memory-gb", "0.25")
    try:
        resp = _stream(server)
        lines = resp.iter_lines()
        for _ in range(5):
            next(lines)
        assert eventually(lambda: sum(_metric_values(server.url, "dyn_worker_kv_blocks_used")) > 0)
        resp.close()  # the client goes away mid-stream
        t0 = time.monotonic()
        while time.monotonic() - t0 < 5:
            if sum(_metric_values(server.url, "dyn_worker_kv_blocks_used")) == 0 \
                    and sum(_metric_values(server.url, "dyn_worker_requests_running")) == 0:
                break
            time.sleep(0.1)
        elapsed = time.monotonic() - t0
        assert sum(_metric_values(server.url, "dyn_worker_kv_blocks_used")) == 0
        assert elapsed < 2.0, f"request still running {elapsed:.1f}s after the client left"
        # a non-streaming request whose client times out is aborted too
        with pytest.raises(requests.exceptions.ReadTimeout):
            requests.post(server.base_url + "/completions", timeout=1.0,
                          json={"prompt": "x", "max_tokens": 3500, "ignore_eos": True})
        time.sleep(1.5)
        assert sum(_metric_values(server.url, "dyn_worker_requests_running")) == 0
    finally:
        server.stop()


def test_worker_killed_mid_stream():
    server = Server("--workers", "2", "--router", "round-robin", "--max-model-len", "4096", "--kv-cache-memory-gb", "0.25")
    try:
        pids = server.pids()
        assert set(pids) == {"worker 0", "worker 1", "frontend 0", "planner 0"}
        streams = [_stream(server), _stream(server)]  # round-robin: one on each worker
        iters = [s.iter_lines() for s in streams]
        for it in iters:
            next(it)
        os.kill(pids["worker 0"], signal.SIGKILL)
        t0 = time.monotonic()
        ended_with_error = []
        # read each stream until it ends or 8 s pass; the one on the dead worker must end with an error event
        for it in iters:
            while time.monotonic() - t0 < 8:
                try:
                    line = next(it)
                except StopIteration:
                    break
                if line.startswith(b"data: {") and b'"error"' in line:
                    ended_with_error.append(time.monotonic() - t0)
                    break
                if line == b"data: [DONE]":
                    break
        for s in streams:
            s.close()
        assert len(ended_with_error) == 1 and ended_with_error[0] < 5
        for _ in range(4):  # new requests all go to the surviving worker
            r = requests.post(server.base_url + "/completions", json={"prompt": "ok", "max_tokens": 3}, timeout=30)
            assert r.status_code == 200
        # the launcher restarts it; once it answers, the frontend routes to it again
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and requests.get(server.url + "/health").json().get("workers") != 2:
            time.sleep(0.2)
        assert _metric_values(server.url, "dyn_worker_up") == [1.0, 1.0]
        assert server.pids()["worker 0"] != pids["worker 0"]
        before = _decisions(server).get("worker-0", 0)
        for _ in range(4):
            assert _complete_ok(server)
        assert _decisions(server).get("worker-0", 0) >= before + 2  # round-robin uses it again
    finally:
        code, err = server.stop()
    assert re.search(r"worker 0 exited unexpectedly \(exit code -9\)", err)
    assert "restarting worker 0" in err and "worker 0 is back" in err


def test_ctrl_c_leaves_nothing_behind():
    server = Server("--workers", "2", "--kv-cache-memory-gb", "0.1")
    pids = server.pids()
    assert len(pids) == 4  # 2 workers, the frontend, the planner
    fork_server = _fork_server_of(server.proc.pid)
    assert fork_server is not None  # on the CPU the children fork from it
    requests.post(server.base_url + "/completions", json={"prompt": "x", "max_tokens": 2}, timeout=30)
    t0 = time.monotonic()
    code, err = server.stop(signal.SIGINT)
    assert time.monotonic() - t0 < 10
    assert code == 0, err
    run_dir = re.search(r"run directory (\S+)", err).group(1)
    assert not os.path.exists(run_dir) and not glob.glob(run_dir + "*")
    assert not server.segments_left()
    for pid in pids.values():
        assert not os.path.exists(f"/proc/{pid}") or "zombie" in open(f"/proc/{pid}/status").read().lower()
    assert not os.path.exists(f"/proc/{fork_server}")  # stopped and reaped by the launcher, not left an orphan


def _fork_server_of(launcher_pid: int) -> int | None:
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                title = f.read().decode(errors="replace")
        except (OSError, ValueError):
            continue
        if ppid == launcher_pid and title.startswith("dyn-actor fork server"):
            return int(entry)
    return None


def test_sigterm_stops_too():
    server = Server("--workers", "1", "--kv-cache-memory-gb", "0.1")
    pids = server.pids()
    code, _ = server.stop(signal.SIGTERM)
    assert code == 0
    assert all(not os.path.exists(f"/proc/{p}") for p in pids.values())


def _launch_fail(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launcher", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_worker_that_cannot_start_makes_the_launcher_fail(tmp_path):
    from dyn_actor.engine.builtin import save_builtin

    # a folder with a tokenizer and no weights: the frontend starts, the worker cannot
    folder = save_builtin(tmp_path / "no-weights")
    for f in folder.glob("*.safetensors"):
        f.unlink()
    # ... and stops at once: the frontend, still waiting for the worker, is not drained for 30 s
    r = _launch_fail("--model", str(folder), "--port", "0", timeout=25)
    assert r.returncode == 1
    assert "error: worker 0: " in r.stderr and "has no *.safetensors weights" in r.stderr, r.stderr
    assert "ready:" not in r.stdout
    # no folder at all: whichever process reports first, one error line names it
    r = _launch_fail("--model", str(tmp_path / "missing"), "--port", "0")
    assert r.returncode == 1 and "ready:" not in r.stdout
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and "missing' does not exist" in errors[0], r.stderr


def test_bad_flags_are_one_line_errors(tmp_path):
    r = _launch_fail("--topology", "banana")
    assert r.returncode == 2 and r.stderr.strip().startswith("error: unknown topology")
    assert len(r.stderr.strip().splitlines()) == 1
    cfg = tmp_path / "c.yaml"
    cfg.write_text("workers: 2\nbogus_key: 1\n")
    r = _launch_fail("--config", str(cfg))
    assert r.returncode == 2 and "unknown key 'bogus_key'" in r.stderr
    # a file's values pass the flags' own checks: what the flag refuses, the file may not set
    for text, words in (("router: foo\n", ("--router", "invalid choice", "'foo'")),
                        ("dtype: float8\n", ("--dtype", "invalid choice")),
                        ("workers: many\n", ("--workers", "invalid int value")),
                        ("enforce_eager: maybe\n", ("enforce_eager", "true or false"))):
        cfg.write_text(text)
        r = _launch_fail("--config", str(cfg))
        assert r.returncode == 2 and all(w in r.stderr for w in words), (text, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1


def test_config_file_sets_flags(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps({"workers": 2, "max-model-len": 300, "kv-cache-memory-gb": 0.1,
                               "served-model-name": "tiny"}))
    server = Server("--config", str(cfg))
    try:
        assert len(server.pids()) == 4  # 2 workers, the frontend, the planner
        data = requests.get(server.base_url + "/models", timeout=10).json()["data"][0]
        assert data["id"] == "tiny" and data["max_model_len"] == 300
    finally:
        server.stop()


def test_api_key():
    server = Server("--workers", "1", "--kv-cache-memory-gb", "0.1", "--api-key", "sekret")
    try:
        r = requests.get(server.base_url + "/models", timeout=10)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        r = requests.get(server.base_url + "/models", headers={"Authorization": "Bearer sekret"}, timeout=10)
        assert r.status_code == 200
        assert requests.get(server.url + "/health", timeout=10).status_code == 200
    finally:
        server.stop()


def test_no_worker_left_is_503():
    server = Server("--workers", "1", "--kv-cache-memory-gb", "0.1", "--restart-policy", "never")
    try:
        os.kill(server.pids()["worker 0"], signal.SIGKILL)
        deadline = time.monotonic() + 6
        status = None
        while time.monotonic() < deadline:
            r = requests.post(server.base_url + "/completions", json={"prompt": "x", "max_tokens": 2}, timeout=10)
            status = r.status_code
            if status == 503:
                break
            time.sleep(0.2)
        assert status == 503 and r.json()["error"]["type"] == "service_unavailable"
        assert requests.get(server.url + "/health", timeout=10).status_code == 503
    finally:
        server.stop()


def test_a_stalled_worker_is_routed_around_then_rejoins():
    """SIGSTOP a worker past its heartbeat limit: the frontend routes around it; once it runs
    again it is connected afresh and gets requests again."""
    s = Server("--topology", "agg", "--workers", "2", "--router", "round-robin")
    try:
        pid = s.pids()["worker 1"]
        os.kill(pid, signal.SIGSTOP)
        try:
            time.sleep(3.0)  # past the 2 s heartbeat limit
            up = _metrics_worker_up(s)
            assert up == {"worker-0": 1.0, "worker-1": 0.0}, up
            for _ in range(4):  # all on the survivor meanwhile
                assert _complete_ok(s)
        finally:
            os.kill(pid, signal.SIGCONT)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _metrics_worker_up(s).get("worker-1") != 1.0:
            time.sleep(0.2)
        assert _metrics_worker_up(s) == {"worker-0": 1.0, "worker-1": 1.0}
        before = _decisions(s).get("worker-1", 0)
        for _ in range(4):
            assert _complete_ok(s)
        assert _decisions(s).get("worker-1", 0) >= before + 2  # round-robin uses it again
    finally:
        s.stop()


def _metric_lines(s: Server, prefix: str) -> dict[str, float]:
    text = requests.get(s.url + "/metrics", timeout=10).text
    return {line.split('"')[1]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line.startswith(prefix + "{")}


def _metrics_worker_up(s: Server) -> dict[str, float]:
    return _metric_lines(s, "dyn_worker_up")


def _decisions(s: Server) -> dict[str, float]:
    return _metric_lines(s, "dyn_router_decisions_total")


def _complete_ok(s: Server) -> bool:
    r = requests.post(s.base_url + "/completions", timeout=30, json={"prompt": "Hi", "max_tokens": 3, "ignore_eos": True})
    return r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
