"""The HTTP edge on a real server: API key on every route, JSON-only POSTs, the Host check, body
size, parser errors, and clients that leave in crowds."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import threading
import time

import aiohttp
import pytest
import requests

from dyn_actor.components.http_edge import EdgePolicy
from tests.server import InprocServer, Server

KEY = "sekret-key-123"
GOOD = {"Authorization": f"Bearer {KEY}"}
ROUTES = [
    ("GET", "/v1/models", None), ("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 2}),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
    ("POST", "/tokenize", {"prompt": "hi"}), ("POST", "/detokenize", {"tokens": [5, 6]}),
    ("GET", "/v1/router/state", None), ("GET", "/v1/disagg/policy", None),
    ("POST", "/v1/disagg/policy", {"max_local_prefill_length": 7}),
    ("GET", "/load", None), ("GET", "/v1/models/builtin:tiny", None),
]


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    path = tmp_path_factory.mktemp("key") / "key"
    path.write_text(KEY + "\n")
    s = InprocServer("--topology", "1p1d", "--kv-cache-memory-gb", "0.1", "--api-key-file", str(path))
    yield s
    s.stop()


def test_every_route_but_health_ping_and_metrics_needs_the_key(keyed: Server):
    for method, route, body in ROUTES:
        r = requests.request(method, keyed.url + route, json=body, timeout=30)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", (route, r.text)
        r = requests.request(method, keyed.url + route, json=body, headers={"Authorization": "Bearer nope"}, timeout=30)
        assert r.status_code == 401, route
        r = requests.request(method, keyed.url + route, json=body, headers=GOOD, timeout=30)
        assert r.status_code == 200, (route, r.text)
    health = requests.get(keyed.url + "/health", timeout=10)
    assert health.status_code == 200 and health.json()["devices"] == {"decode-0": "cpu"}
    assert requests.get(keyed.url + "/metrics", timeout=10).status_code == 200
    assert requests.post(keyed.url + "/ping", timeout=10).status_code == 200  # a load balancer's check, no key
    # the key came from a file: it is in no process's command line
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert KEY not in ps


def test_posts_must_be_json(keyed: Server):
    before = requests.get(keyed.url + "/v1/disagg/policy", headers=GOOD, timeout=10).json()
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
        r = requests.post(keyed.url + "/v1/disagg/policy", data='{"max_local_prefill_length": 1}',
                          headers={**GOOD, "Content-Type": ctype}, timeout=10)
        assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type"
    assert requests.get(keyed.url + "/v1/disagg/policy", headers=GOOD, timeout=10).json() == before


def test_host_header_must_name_the_server(keyed: Server):
    for host in ("attacker.example", "attacker.example:8000", "localhost.attacker.example"):
        r = requests.get(keyed.url + "/health", headers={"Host": host}, timeout=10)
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_host", host
    for host in ("localhost", f"localhost:{keyed.port}", f"127.0.0.1:{keyed.port}", "[::1]:80"):
        assert requests.get(keyed.url + "/health", headers={"Host": host}, timeout=10).status_code == 200, host


def test_host_policy_unit():
    loop = EdgePolicy("127.0.0.1")
    assert loop.host_allowed("localhost:8000") and loop.host_allowed("127.0.0.1") and loop.host_allowed("[::1]:1")
    assert not loop.host_allowed("10.0.0.5") and not loop.host_allowed("evil.test") and not loop.host_allowed(None)
    assert EdgePolicy("127.0.0.1", allowed_hosts=frozenset({"api.internal"})).host_allowed("api.internal:443")
    assert EdgePolicy("127.0.0.1", allowed_hosts=frozenset({"*"})).host_allowed("anything")
    wide = EdgePolicy("0.0.0.0")
    assert wide.host_allowed("10.0.0.5:8000") and wide.host_allowed(socket.gethostname())
    assert not wide.host_allowed("evil.test")


def test_key_from_the_environment_and_a_warning_when_open(tmp_path):
    env_key = "from-env-456"
    os.environ["DYN_API_KEY"] = env_key
    try:
        s = Server("--workers", "1", "--kv-cache-memory-gb", "0.1")
    finally:
        del os.environ["DYN_API_KEY"]
    try:
        assert requests.get(s.base_url + "/models", timeout=10).status_code == 401
        assert requests.get(s.base_url + "/models", headers={"Authorization": f"Bearer {env_key}"},
                            timeout=10).status_code == 200
    finally:
        s.stop()
    s = Server("--workers", "1", "--kv-cache-memory-gb", "0.1", "--host", "0.0.0.0", "--metrics-require-key",
               "--api-key", "k")
    try:
        assert requests.get(s.url.replace("0.0.0.0", "127.0.0.1") + "/metrics", timeout=10).status_code == 401
    finally:
        _, err = s.stop()
    assert "warning: serving on" not in err
    s = Server("--workers", "1", "--kv-cache-memory-gb", "0.1", "--host", "0.0.0.0")
    _, err = s.stop()
    assert err.count("warning: serving on 0.0.0.0") == 1 and "without --api-key" in err


@pytest.fixture(scope="module")
def open_server():
    s = Server("--topology", "1p1d", "--kv-cache-memory-gb", "0.1", "--max-model-len", "4096")
    yield s
    s.stop()


def _timed_completions(s: Server, n: int, out: list[float]) -> None:
    for _ in range(n):
        t0 = time.monotonic()
        r = requests.post(s.base_url + "/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=30)
        assert r.status_code == 200
        out.append(time.monotonic() - t0)
        time.sleep(0.05)


def test_a_huge_body_is_refused_unread_and_others_keep_being_served(open_server: Server):
    s = open_server
    latencies: list[float] = []
    other = threading.Thread(target=_timed_completions, args=(s, 20, latencies))
    other.start()
    body = b'{"prompt": "' + b"a" * (64 << 20) + b'"}'
    t0 = time.monotonic()
    r = requests.post(s.base_url + "/completions", data=body, headers={"Content-Type": "application/json"}, timeout=60)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    refused = time.monotonic() - t0
    assert refused < 5
    # a body just under the limit is read and tokenized off the event loop
    text = "hello world " * 120_000  # 1.4 MB: seconds of tokenizing, none of it on the event loop
    r = requests.post(s.url + "/tokenize", json={"prompt": text}, timeout=60)
    assert r.status_code == 200 and r.json()["count"] > 1_000_000
    other.join()
    print(f"64 MiB body refused in {refused:.2f}s; others' slowest request meanwhile {max(latencies):.2f}s")
    assert max(latencies) < 1.0, latencies


def test_parser_errors_are_json_and_one_log_line(open_server: Server):
    r = requests.get(open_server.url + "/v1/models?" + "x" * 20_000, timeout=10)
    assert 400 <= r.status_code < 500 and r.json()["error"]["message"]
    r = requests.get(open_server.url + "/health", headers={f"X-H{i}": "v" for i in range(200)}, timeout=10)
    assert 400 <= r.status_code < 500 and "error" in r.json()
    time.sleep(0.3)
    assert "Traceback" not in open_server.log()


async def _crowd(url: str, n: int) -> None:
    """``n`` streaming clients that all leave: half before their first token, half right after it."""
    body = {"prompt": "tell me a long story", "max_tokens": 2000, "ignore_eos": True, "stream": True}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        async def early():
            task = asyncio.ensure_future(session.post(url, json=body))
            await asyncio.sleep(0.05)
            task.cancel()

        async def after_first():
            async with session.post(url, json=body) as r:
                async for _ in r.content:
                    break

        await asyncio.gather(*(early() if i % 2 else after_first() for i in range(n)), return_exceptions=True)


def test_300_clients_leaving_at_once_free_every_block(open_server: Server):
    s = open_server
    asyncio.run(_crowd(s.base_url + "/completions", 300))
    t0 = time.monotonic()
    used = None
    while time.monotonic() - t0 < 10:
        text = requests.get(s.url + "/metrics", timeout=10).text
        used = sum(float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines()
                   if ln.startswith(("dyn_worker_kv_blocks_used{", "dyn_worker_requests_running{",
                                     "dyn_worker_requests_waiting{")))
        if used == 0:
            break
        time.sleep(0.1)
    assert used == 0
    print(f"300 clients left: every block free {time.monotonic() - t0:.2f}s later")
    assert time.monotonic() - t0 < 2.0, f"blocks freed only after {time.monotonic() - t0:.1f}s"
