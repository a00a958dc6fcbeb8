"""Bad input over HTTP: an OpenAI error object with the right status, never a 500, and the server keeps serving."""

from __future__ import annotations

import pytest
import requests

from tests.server import Server

MSGS = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def server():
    s = Server("--workers", "1", "--max-model-len", "256", "--kv-cache-memory-gb", "0.1")
    yield s
    s.stop()


CASES = [
    # (route, body (dict, or raw bytes), status)
    ("chat/completions", b"{not json", 400),
    ("chat/completions", b"[1, 2]", 400),
    ("chat/completions", {"messages": "hello"}, 400),
    ("chat/completions", {"messages": []}, 400),
    ("chat/completions", {"messages": MSGS, "max_tokens": "ten"}, 400),
    ("chat/completions", {"messages": MSGS, "max_tokens": -1}, 400),
    ("chat/completions", {"messages": MSGS, "max_tokens": 0}, 400),
    ("chat/completions", {"messages": MSGS, "max_tokens": 10**9}, 400),
    ("chat/completions", {"messages": MSGS, "max_completion_tokens": 10**6}, 400),
    ("chat/completions", {"messages": MSGS, "temperature": "hot"}, 400),
    ("chat/completions", {"messages": MSGS, "temperature": -0.5}, 400),
    ("chat/completions", {"messages": MSGS, "top_p": 2}, 400),
    ("chat/completions", {"messages": MSGS, "n": 0}, 400),
    ("chat/completions", {"messages": MSGS, "n": 1000}, 400),
    ("chat/completions", {"messages": MSGS, "presence_penalty": 0.5}, 400),
    ("chat/completions", {"messages": MSGS, "logit_bias": {"5": 10}}, 400),
    ("chat/completions", {"messages": MSGS, "stop_token_ids": [10**7]}, 400),
    ("chat/completions", {"messages": MSGS, "top_logprobs": 3}, 400),
    ("chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400),
    ("chat/completions", {"messages": [{"role": "user", "content": "x" * 300}]}, 400),
    ("chat/completions", {"messages": MSGS, "model": "gpt-4"}, 404),
    ("chat/completions", {"messages": MSGS, "stream": True, "max_tokens": 10**9}, 400),
    ("completions", {"prompt": []}, 400),
    ("completions", {"prompt": [1, "a", 2.5]}, 400),
    ("completions", {"prompt": [5, 10**6]}, 400),
    ("completions", {"prompt": "x" * 300}, 400),
    ("completions", {"prompt": "hi", "logprobs": 99}, 400),
    ("completions", {"prompt": "hi", "echo": True}, 400),
    ("completions", {"prompt": "hi", "model": "nope"}, 404),
    ("completions", {"prompt": "hi", "min_tokens": 5, "max_tokens": 2}, 400),
    ("completions", {}, 400),
]


@pytest.mark.parametrize("route,body,status", CASES, ids=[f"{i}-{c[0]}" for i, c in enumerate(CASES)])
def test_bad_request(server, route, body, status):
    url = f"{server.base_url}/{route}"
    if isinstance(body, bytes):
        r = requests.post(url, data=body, headers={"Content-Type": "application/json"}, timeout=30)
    else:
        r = requests.post(url, json=body, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"] and "code" in err


def test_wrong_method_and_path(server):
    r = requests.get(server.base_url + "/chat/completions")
    assert r.status_code == 405 and "error" in r.json()
    r = requests.get(server.base_url + "/nope")
    assert r.status_code == 404 and "error" in r.json()


def test_still_serving_after_bad_input(server):
    before = server.pids()
    for route, body, _ in CASES:
        requests.post(f"{server.base_url}/{route}", json=body if isinstance(body, dict) else None, timeout=30)
    r = requests.post(server.base_url + "/chat/completions", json={"messages": MSGS, "max_tokens": 5}, timeout=30)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] is not None
    assert server.pids() == before  # nothing crashed or restarted
    metrics = requests.get(server.url + "/metrics").text
    used = [ln for ln in metrics.splitlines() if ln.startswith("dyn_worker_kv_blocks_used")]
    assert used and all(ln.endswith(" 0") for ln in used)  # no leaked blocks
