"""Bad input over HTTP: an OpenAI error object with the right status, never a 500, and the server keeps serving."""

from __future__ import annotations

import pytest
import requests

from tests.helpers import eventually
from tests.server import InprocServer

MSGS = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module", params=["agg", "1p1d"])
def server(request):
    s = InprocServer("--topology", request.param, "--max-model-len", "256", "--kv-cache-memory-gb", "0.1",
               "--max-local-prefill-length", "8")
    yield s
    s.stop()


BIG = [2**63, 2**64, 10**30, -(2**63) - 1]
DEEP = b"[" * 10_000 + b"]" * 10_000


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
    ("chat/completions", {"messages": MSGS, "presence_penalty": 3}, 400),
    ("chat/completions", {"messages": MSGS, "repetition_penalty": 0}, 400),
    ("chat/completions", {"messages": MSGS, "logit_bias": {"five": 10}}, 400),
    ("chat/completions", {"messages": MSGS, "logit_bias": {"-1": 10}}, 400),
    ("chat/completions", {"messages": MSGS, "logit_bias": {"5": "ten"}}, 400),
    ("chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "logit_bias": {"5": 1e999}}', 400),
    ("chat/completions", {"messages": MSGS, "logit_bias": [5, 10]}, 400),
    ("completions", {"prompt": "hi", "logit_bias": {"100000": 5}}, 400),  # outside the vocabulary
    ("completions", {"prompt": "hi", "logit_bias": {str(2**70): 5}}, 400),
    ("chat/completions", {"messages": MSGS, "stop_token_ids": [10**7]}, 400),
    ("completions", {"prompt": "hi", "allowed_token_ids": []}, 400),
    ("completions", {"prompt": "hi", "allowed_token_ids": [100000]}, 400),  # outside the vocabulary
    ("chat/completions", {"messages": MSGS, "allowed_token_ids": [-1]}, 400),
    ("chat/completions", {"messages": MSGS, "allowed_token_ids": 5}, 400),
    ("chat/completions", {"messages": MSGS, "bad_words": [""]}, 400),
    ("chat/completions", {"messages": MSGS, "bad_words": "word"}, 400),
    ("completions", {"prompt": "hi", "bad_words": ["w"] * 200}, 400),
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
    ("completions", {"prompt": "hi", "max_tokens": 0}, 400),  # 0 only with echo
    ("completions", {"prompt": "hi", "model": "nope"}, 404),
    ("completions", {"prompt": "hi", "min_tokens": 5, "max_tokens": 2}, 400),
    ("completions", {}, 400),
    # integers the engine would put in a tensor, at 2**63 and beyond, and negative
    *[("completions", {"prompt": "hi", field: v}, 400)
      for field in ("top_k", "seed", "min_tokens", "max_tokens") for v in BIG],
    *[("completions", {"prompt": "hi", "stop_token_ids": [v]}, 400) for v in BIG],
    ("completions", {"prompt": "hi", "top_k": -2}, 400),
    ("completions", {"prompt": "hi", "max_tokens": -(2**63)}, 400),
    ("completions", {"prompt": [5, 2**63]}, 400),
    # floats where integers go
    ("completions", {"prompt": "hi", "max_tokens": 1.5}, 400),
    ("completions", {"prompt": "hi", "top_k": 2.5}, 400),
    ("completions", {"prompt": "hi", "n": 1.5}, 400),
    ("completions", {"prompt": "hi", "seed": 0.5}, 400),
    # huge counts
    ("chat/completions", {"messages": MSGS, "logprobs": True, "top_logprobs": 10**9}, 400),
    ("chat/completions", {"messages": MSGS, "n": 10**9}, 400),
    ("completions", {"prompt": "hi", "best_of": 10**9}, 400),
    ("completions", {"prompt": "hi", "stop": ["x"] * 10_000}, 400),
    ("completions", {"prompt": "hi", "temperature": 1e308}, 400),
    ("chat/completions", {"messages": MSGS, "model": "m" * 1_000_000}, 400),
    # malformed bodies
    ("chat/completions", b'{"messages": ' + DEEP + b"}", 400),
    ("chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "extra": ' + DEEP + b"}", 400),
    ("completions", b'{"prompt": ' + DEEP + b"}", 400),
    ("completions", b'{"prompt": "\xff\xfe"}', 400),
    ("completions", b'{"prompt": "hi \xff there"}', 400),
    ("completions", b'{"prompt": "\xed\xa0\x80"}', 400),
    # features this server does not implement
    ("chat/completions", {"messages": MSGS, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400),
    ("chat/completions", {"messages": MSGS, "tool_choice": "auto"}, 400),
    ("chat/completions", {"messages": MSGS, "functions": [{"name": "f"}]}, 400),
    # structured outputs of the wrong shape, or that do not compile (the worker's check)
    ("chat/completions", {"messages": MSGS, "response_format": {"type": "json_schema", "json_schema": {}}}, 400),
    ("chat/completions", {"messages": MSGS, "response_format": {"type": "xml"}}, 400),
    ("chat/completions", {"messages": MSGS, "response_format": "json"}, 400),
    ("chat/completions", {"messages": MSGS, "guided_json": [1, 2]}, 400),
    ("chat/completions", {"messages": MSGS, "guided_json": "{not json"}, 400),
    ("chat/completions", {"messages": MSGS, "guided_json": {"type": "nope"}}, 400),
    ("chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "guided_json": {"a": ' + DEEP + b"}}", 400),
    ("chat/completions", {"messages": MSGS, "guided_regex": "a(b"}, 400),
    ("chat/completions", {"messages": MSGS, "guided_regex": 5}, 400),
    ("chat/completions", {"messages": MSGS, "guided_regex": ""}, 400),
    ("chat/completions", {"messages": MSGS, "guided_choice": []}, 400),
    ("chat/completions", {"messages": MSGS, "guided_choice": ["a", 1]}, 400),
    ("chat/completions", {"messages": MSGS, "guided_grammar": 'root ::= "a" |'}, 400),
    ("chat/completions", {"messages": MSGS, "guided_regex": "a", "guided_choice": ["a"]}, 400),
    ("chat/completions", {"messages": MSGS, "structured_outputs": {"structural_tag": "{}"}}, 400),
    ("chat/completions", {"messages": MSGS, "structured_outputs": {"regex": "a", "choice": ["a"]}}, 400),
    ("chat/completions", {"messages": MSGS, "structured_outputs": {}}, 400),
    ("completions", {"prompt": "hi", "guided_choice": ["x" * 300_000]}, 400),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi", "tool_calls": [{"function": {}}]}]}, 400),
    ("chat/completions", {"messages": [{"role": "assistant", "tool_calls": "x"}]}, 400),
    ("chat/completions", {"messages": [{"role": "function", "content": "42"}]}, 400),
    ("chat/completions", {"messages": MSGS, "tools": {"type": "function"}, "tool_choice": "required"}, 400),
    ("chat/completions", {"messages": MSGS, "tools": [{"type": "function", "function": {"name": "a b"}}],
                          "tool_choice": "required"}, 400),
    ("chat/completions", {"messages": MSGS, "tools": [{"type": "function", "function": {"name": "f"}}],
                          "tool_choice": {"type": "function", "function": {"name": "g"}}}, 400),
    ("chat/completions", {"messages": MSGS, "tools": [{"type": "function", "function": {"name": "f"}}],
                          "tool_choice": "required", "guided_regex": "a"}, 400),
    ("chat/completions", {"messages": MSGS, "tools": [{"type": "function", "function": {"name": "f"}}],
                          "tool_choice": "required", "parallel_tool_calls": "no"}, 400),
    ("completions", {"prompt": "hi", "tools": [{"type": "function", "function": {"name": "f"}}]}, 400),
    ("chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400),
    ("chat/completions", {"messages": [{"role": "user"}]}, 400),
    ("chat/completions", {"messages": MSGS, "stream_options": {"include_usage": True}}, 400),
    ("completions", {"prompt": "hi", "response_format": {"type": "json_schema", "json_schema": {"schema": 1}}}, 400),
]


@pytest.mark.parametrize("route,body,status", CASES, ids=[f"{i}-{c[0]}" for i, c in enumerate(CASES)])
def test_bad_request(server, route, body, status):
    url = f"{server.base_url}/{route}"
    if isinstance(body, bytes):
        r = requests.post(url, data=body, headers={"Content-Type": "application/json"}, timeout=30)
    else:
        r = requests.post(url, json=body, timeout=30)
    assert r.status_code == status, r.text[:500]
    err = r.json()["error"]
    assert err["message"] and err["type"] and "code" in err
    assert len(r.content) < 10_000  # nothing of the request echoed back at length


def test_unsupported_features_are_named(server):
    r = requests.post(server.base_url + "/chat/completions", timeout=30,
                      json={"messages": MSGS, "tools": [{"type": "function", "function": {"name": "f"}}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice"  # "auto": no tool-call parser
    r = requests.post(server.base_url + "/completions", timeout=30, json={"prompt": "hi", "top_k": 2**63})
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_k"
    # what is harmless passes: a plain-text response format, tool_choice none
    r = requests.post(server.base_url + "/chat/completions", timeout=30, json={
        "messages": MSGS, "max_tokens": 2, "response_format": {"type": "text"}, "tool_choice": "none"})
    assert r.status_code == 200, r.text


def test_logit_bias_bans_and_forces_tokens(server):
    """OpenAI's logit_bias, as vLLM serves it: -100 keeps a token out, +100 all but forces it, values
    beyond are clamped; the logprobs reported stay the model's own (vLLM's default)."""
    body = {"prompt": "The quick brown", "max_tokens": 6, "temperature": 0, "ignore_eos": True, "logprobs": 1}
    plain = requests.post(server.base_url + "/completions", json=body, timeout=60).json()["choices"][0]
    first = plain["logprobs"]["tokens"][0]
    tid = requests.post(server.url + "/tokenize", json={"prompt": first, "add_special_tokens": False},
                        timeout=30).json()["tokens"]
    assert len(tid) == 1
    banned = requests.post(server.base_url + "/completions", json={**body, "logit_bias": {str(tid[0]): -100}},
                           timeout=60).json()["choices"][0]
    assert first not in banned["logprobs"]["tokens"]
    lp = banned["logprobs"]
    assert list(lp["top_logprobs"][0]) == [first]  # the raw distribution still ranks it first
    assert lp["token_logprobs"][0] < plain["logprobs"]["token_logprobs"][0]
    # "x" forced at every step, sampled, by a bias past the bound (clamped to 100)
    x = requests.post(server.url + "/tokenize", json={"prompt": "x", "add_special_tokens": False},
                      timeout=30).json()["tokens"][0]
    r = requests.post(server.base_url + "/chat/completions", timeout=60, json={
        "messages": MSGS, "max_tokens": 5, "temperature": 1.0, "ignore_eos": True, "logit_bias": {str(x): 500}})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == "xxxxx"


def test_allowed_token_ids_and_bad_words(server):
    """vLLM's allowed_token_ids and bad_words over HTTP, on both routes (in 1p1d the prompts are
    longer than --max-local-prefill-length: the prefill worker draws the first token under them)."""
    body = {"prompt": "The quick brown fox jumps", "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    plain = requests.post(server.base_url + "/completions", json=body, timeout=60).json()["choices"][0]["text"]
    word = plain[2:4]
    r = requests.post(server.base_url + "/completions", json={**body, "bad_words": [word]}, timeout=60)
    assert r.status_code == 200, r.text
    got = r.json()["choices"][0]["text"]
    assert word not in got and got[:3] == plain[:3], (plain, word, got)
    ids = requests.post(server.url + "/tokenize", json={"prompt": "xy", "add_special_tokens": False},
                        timeout=30).json()["tokens"]
    r = requests.post(server.base_url + "/chat/completions", timeout=60, json={
        "messages": [{"role": "user", "content": "say something long"}], "max_tokens": 8, "temperature": 1.0,
        "seed": 5, "ignore_eos": True, "allowed_token_ids": ids, "n": 2})
    assert r.status_code == 200, r.text
    for choice in r.json()["choices"]:
        text = choice["message"]["content"]
        assert len(text) == 8 and set(text) <= {"x", "y"}, text
    # constraints that leave no token: a 400 saying so, streamed or not (nothing was sent yet)
    for stream in (False, True):
        r = requests.post(server.base_url + "/completions", timeout=60, json={
            **body, "stream": stream, "allowed_token_ids": ids[:1], "bad_words": ["x"]})
        assert r.status_code == 400 and "no token is left" in r.json()["error"]["message"], r.text


def test_wrong_method_and_path(server):
    r = requests.get(server.base_url + "/chat/completions")
    assert r.status_code == 405 and "error" in r.json()
    r = requests.get(server.base_url + "/nope")
    assert r.status_code == 404 and "error" in r.json()


def test_still_serving_after_bad_input(server):
    before = server.pids()
    for route, body, _ in CASES:
        if isinstance(body, bytes):
            requests.post(f"{server.base_url}/{route}", data=body, headers={"Content-Type": "application/json"},
                          timeout=30)
        else:
            requests.post(f"{server.base_url}/{route}", json=body, timeout=30)
    r = requests.post(server.base_url + "/chat/completions", json={"messages": MSGS, "max_tokens": 5}, timeout=30)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] is not None
    assert server.pids() == before  # nothing crashed or restarted

    def blocks_used() -> list[float]:
        metrics = requests.get(server.url + "/metrics").text
        return [float(ln.rsplit(" ", 1)[1]) for ln in metrics.splitlines() if ln.startswith("dyn_worker_kv_blocks_used")]

    assert eventually(lambda: (u := blocks_used()) and all(x == 0 for x in u))  # no leaked blocks
