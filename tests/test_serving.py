"""Aggregated serving end to end: two workers behind the frontend (in one process), the openai client
and raw HTTP."""

from __future__ import annotations

import json

import pytest
import requests

from tests.server import InprocServer

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def server():
    s = InprocServer("--topology", "agg", "--workers", "2", "--max-model-len", "512", "--kv-cache-memory-gb", "0.25")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=60)


def test_models_and_health(server, client):
    models = client.models.list().data
    assert [m.id for m in models] == ["builtin:tiny"]
    raw = requests.get(server.base_url + "/models").json()["data"][0]
    assert raw["root"] == "builtin:tiny" and raw["max_model_len"] == 512
    assert requests.get(server.url + "/health").status_code == 200


def test_chat_completion_and_usage(server, client):
    msgs = [{"role": "user", "content": "Hello there"}]
    r = client.chat.completions.create(model="builtin:tiny", messages=msgs, max_tokens=12, temperature=0)
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("length", "stop")
    n_prompt = requests.post(server.url + "/tokenize", json={"messages": msgs}).json()["count"]
    assert r.usage.prompt_tokens == n_prompt
    if choice.finish_reason == "length":
        assert r.usage.completion_tokens == 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    # content given as a list of text parts renders the same prompt
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}]}]
    r2 = client.chat.completions.create(model="builtin:tiny", messages=parts, max_tokens=12, temperature=0)
    assert r2.choices[0].message.content == choice.message.content
    # max_completion_tokens is honoured like max_tokens
    r3 = client.chat.completions.create(model="builtin:tiny", messages=msgs, max_completion_tokens=3,
                                        temperature=0, extra_body={"ignore_eos": True})
    assert r3.usage.completion_tokens == 3


def test_streaming_matches_non_streaming_and_counts_tokens(server, client):
    msgs = [{"role": "user", "content": "Tell me"}]
    full = client.chat.completions.create(model="builtin:tiny", messages=msgs, max_tokens=30, temperature=0,
                                          extra_body={"ignore_eos": True})
    chunks = list(client.chat.completions.create(model="builtin:tiny", messages=msgs, max_tokens=30, temperature=0,
                                                 stream=True, stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage.completion_tokens == 30
    assert usage.prompt_tokens == full.usage.prompt_tokens


def test_completions_text_token_ids_and_lists(server, client):
    r = client.completions.create(model="builtin:tiny", prompt="The quick brown", max_tokens=8, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 8 and r.object == "text_completion"
    ids = requests.post(server.url + "/tokenize", json={"prompt": "The quick brown"}).json()["tokens"]
    r_ids = client.completions.create(model="builtin:tiny", prompt=ids, max_tokens=8, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert r_ids.choices[0].text == r.choices[0].text and r_ids.usage.prompt_tokens == len(ids)
    many = client.completions.create(model="builtin:tiny", prompt=["The quick brown", "Hello"], max_tokens=4,
                                     temperature=0, extra_body={"ignore_eos": True})
    assert sorted(c.index for c in many.choices) == [0, 1]
    assert next(c for c in many.choices if c.index == 0).text == r.choices[0].text[: len(many.choices[0].text)]
    stream = list(client.completions.create(model="builtin:tiny", prompt="The quick brown", max_tokens=8,
                                            temperature=0, stream=True, extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in stream if c.choices) == r.choices[0].text


def test_stop_strings(server, client):
    base = client.completions.create(model="builtin:tiny", prompt="abc", max_tokens=40, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = base[10:12]
    r = client.completions.create(model="builtin:tiny", prompt="abc", max_tokens=40, temperature=0, stop=[stop],
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].text == base[: base.find(stop)] and r.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(model="builtin:tiny", prompt="abc", max_tokens=40, temperature=0,
                                            stop=stop, stream=True, extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == base[: base.find(stop)]


def test_a_stop_token_leaves_its_text_out(server, client):
    """As vLLM: the token that ended the request (one of stop_token_ids, the end of sequence) is not in
    the text unless include_stop_str_in_output, with special tokens skipped or not."""
    kw = dict(model="builtin:tiny", prompt="abc", max_tokens=40, temperature=0)
    base = client.completions.create(**kw, extra_body={"ignore_eos": True}).choices[0].text
    ch = base[10]
    (tok,) = requests.post(server.url + "/tokenize", json={"prompt": ch, "add_special_tokens": False}).json()["tokens"]
    for extra, want in (({}, base[:base.find(ch)]), ({"include_stop_str_in_output": True}, base[:base.find(ch) + 1])):
        r = client.completions.create(**kw, extra_body={"ignore_eos": True, "stop_token_ids": [tok], **extra})
        assert (r.choices[0].text, r.choices[0].finish_reason, r.choices[0].stop_reason) == (want, "stop", tok)
    eos = {"logit_bias": {"1": 100}, "skip_special_tokens": False}  # the first token is "</s>"
    r = client.completions.create(**kw, extra_body=eos)
    assert (r.choices[0].text, r.choices[0].finish_reason, r.usage.completion_tokens) == ("", "stop", 1)
    r = client.completions.create(**kw, extra_body={**eos, "include_stop_str_in_output": True})
    assert r.choices[0].text == "</s>"


def test_seeded_sampling_is_reproducible_and_n(server, client):
    kw = dict(model="builtin:tiny", prompt="Once", max_tokens=16, temperature=1.0, top_p=0.95,
              extra_body={"ignore_eos": True})
    a = client.completions.create(seed=7, **kw).choices[0].text
    b = client.completions.create(seed=7, **kw).choices[0].text
    c = client.completions.create(seed=8, **kw).choices[0].text
    assert a == b and a != c
    r = client.completions.create(n=3, seed=7, **kw)
    assert sorted(ch.index for ch in r.choices) == [0, 1, 2]
    assert len({ch.text for ch in r.choices}) > 1  # different samples
    assert r.usage.completion_tokens == 48
    chat = client.chat.completions.create(model="builtin:tiny", messages=[{"role": "user", "content": "x"}], n=2,
                                          max_tokens=5, temperature=1.0, seed=3, extra_body={"ignore_eos": True})
    assert len(chat.choices) == 2 and chat.usage.completion_tokens == 10


def test_logprobs(server, client):
    r = client.chat.completions.create(model="builtin:tiny", messages=[{"role": "user", "content": "x"}],
                                       max_tokens=4, temperature=0, logprobs=True, top_logprobs=3,
                                       extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert len(content) == 4
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].token == entry.token  # greedy
    assert "".join(e.token for e in content) == r.choices[0].message.content
    c = client.completions.create(model="builtin:tiny", prompt="x", max_tokens=3, temperature=0, logprobs=2,
                                  extra_body={"ignore_eos": True})
    assert len(c.choices[0].logprobs.token_logprobs) == 3 and len(c.choices[0].logprobs.top_logprobs[0]) == 2


def test_vllm_extras_and_detokenize(server, client):
    r = client.completions.create(model="builtin:tiny", prompt="Hi", max_tokens=10, temperature=0.8, seed=1,
                                  extra_body={"top_k": 3, "min_p": 0.05, "min_tokens": 10, "ignore_eos": False})
    assert r.usage.completion_tokens == 10
    ids = requests.post(server.url + "/tokenize", json={"prompt": "Hello"}).json()["tokens"]
    assert requests.post(server.url + "/detokenize", json={"tokens": ids}).json()["prompt"] == "Hello"


def test_metrics_names(server, client):
    client.completions.create(model="builtin:tiny", prompt="m", max_tokens=2)
    text = requests.get(server.url + "/metrics").text
    for name in ["dyn_requests_total", "dyn_time_to_first_token_seconds_bucket", "dyn_inter_token_latency_seconds",
                 "dyn_prompt_tokens_total", "dyn_prefix_cache_hit_tokens_total", "dyn_local_prefills_total",
                 "dyn_remote_prefills_total", "dyn_kv_transfer_bytes_total", 'dyn_router_decisions_total{worker="worker-0"}',
                 'dyn_router_decisions_total{worker="worker-1"}', 'dyn_worker_kv_blocks_used{worker="worker-0"}',
                 'dyn_worker_kv_blocks_total{worker="worker-1"}', "dyn_worker_requests_running",
                 "dyn_worker_requests_waiting"]:
        assert name in text, name


def test_raw_sse_format(server):
    with requests.post(server.base_url + "/chat/completions", stream=True, json={
        "messages": [{"role": "user", "content": "a"}], "max_tokens": 3, "stream": True,
        "stream_options": {"include_usage": True}, "ignore_eos": True}) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = [line for line in resp.iter_lines(decode_unicode=True) if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    last = json.loads(events[-2][6:])
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 3


def test_disagg_policy_route_refuses_on_agg(server):
    r = requests.post(server.base_url + "/disagg/policy", json={"max_local_prefill_length": 5})
    assert r.status_code == 400 and "not disaggregated" in r.json()["error"]["message"]


def _sse(server, path: str, body: dict) -> list[dict]:
    with requests.post(server.base_url + path, stream=True, json={**body, "stream": True}) as resp:
        return [json.loads(line[6:]) for line in resp.iter_lines(decode_unicode=True)
                if line and line != "data: [DONE]"]


def test_one_chunk_per_token_as_vllm_streams(server):
    """Every generated token is its own chunk (with its text, possibly empty), and the chunks' text
    is the non-streamed text."""
    body = {"max_tokens": 17, "ignore_eos": True, "temperature": 0}
    events = _sse(server, "/completions", {**body, "prompt": "hello"})
    assert len(events) == 17
    whole = requests.post(server.base_url + "/completions", json={**body, "prompt": "hello"}).json()
    assert "".join(e["choices"][0]["text"] for e in events) == whole["choices"][0]["text"]
    assert [e["choices"][0]["finish_reason"] for e in events] == [None] * 16 + ["length"]
    chat = _sse(server, "/chat/completions", {**body, "messages": [{"role": "user", "content": "hi"}]})
    assert len(chat) == 1 + 17  # the role chunk, then one per token
    assert all("content" in e["choices"][0]["delta"] for e in chat)


def test_version(server):
    r = requests.get(server.url + "/version")
    assert r.status_code == 200 and r.json()["version"]


def test_continue_final_message(server, client):
    """vLLM's continue_final_message: the answer goes on from the last message's text (the prompt that
    /tokenize gives for the same messages), and asking for a generation prompt with it is a 400."""
    msgs = [{"role": "user", "content": "list three colours"}, {"role": "assistant", "content": "Sure: red,"}]
    flags = {"add_generation_prompt": False, "continue_final_message": True}
    ids = requests.post(server.url + "/tokenize", json={"messages": msgs, **flags}, timeout=30).json()["tokens"]
    text = requests.post(server.url + "/detokenize", json={"tokens": ids}, timeout=30).json()["prompt"]
    assert text.endswith("assistant: Sure: red,"), text
    r = client.chat.completions.create(model="builtin:tiny", messages=msgs, max_tokens=10, temperature=0,
                                       extra_body={**flags, "ignore_eos": True})
    assert r.usage.prompt_tokens == len(ids)
    want = client.completions.create(model="builtin:tiny", prompt=ids, max_tokens=10, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    assert r.choices[0].message.content == want
    bad = requests.post(server.base_url + "/chat/completions", timeout=30,
                        json={"messages": msgs, "continue_final_message": True})
    assert bad.status_code == 400 and "add_generation_prompt" in bad.json()["error"]["message"]


def test_truncate_prompt_tokens(server, client):
    """vLLM's truncate_prompt_tokens on generation: the prompt's last tokens (its first with
    truncation_side "right"), -1 the context less one; an echo gives the prompt that was read."""
    ids = requests.post(server.url + "/tokenize", json={"prompt": "the quick brown fox jumps"},
                        timeout=30).json()["tokens"]
    kw = dict(model="builtin:tiny", max_tokens=6, temperature=0, extra_body={"ignore_eos": True})

    def completion(prompt, **extra):
        return client.completions.create(prompt=prompt, **{**kw, "extra_body": {**kw["extra_body"], **extra}})

    for side, want in ((None, ids[-5:]), ("left", ids[-5:]), ("right", ids[:5])):
        extra = {"truncate_prompt_tokens": 5, **({"truncation_side": side} if side else {})}
        r = completion("the quick brown fox jumps", **extra)
        assert r.usage.prompt_tokens == 5 and r.choices[0].text == completion(want).choices[0].text, side
    echo = client.completions.create(prompt="the quick brown fox jumps", echo=True, **{
        **kw, "extra_body": {"ignore_eos": True, "truncate_prompt_tokens": 5}}).choices[0].text
    tail = requests.post(server.url + "/detokenize", json={"tokens": ids[-5:]}, timeout=30).json()["prompt"]
    assert echo.startswith(tail) and not echo.startswith("the quick")
    long = "z" * 600  # past the 512-token context: -1 keeps 511 tokens
    r = completion(long, truncate_prompt_tokens=-1, max_tokens=1)
    assert r.usage.prompt_tokens == 511
    chat = client.chat.completions.create(messages=[{"role": "user", "content": long}], **{
        **kw, "max_tokens": 1, "extra_body": {"truncate_prompt_tokens": 40}})
    assert chat.usage.prompt_tokens == 40
    bad = requests.post(server.base_url + "/completions", json={"prompt": "a", "truncate_prompt_tokens": 513},
                        timeout=30)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "truncate_prompt_tokens"
    bad = requests.post(server.base_url + "/completions", json={"prompt": "a", "truncation_side": "middle"},
                        timeout=30)
    assert bad.status_code == 400


def test_return_tokens_as_token_ids(server, client):
    """vLLM's return_tokens_as_token_ids: logprobs name each token ``token_id:N`` (the sampled ones and
    the alternatives; chat and completions, whole and streamed, and the echoed prompt)."""
    kw = dict(model="builtin:tiny", prompt="Once upon", max_tokens=5, temperature=0, logprobs=2)
    plain = client.completions.create(**kw).choices[0]
    r = client.completions.create(**kw, extra_body={"return_tokens_as_token_ids": True}).choices[0]
    ids = [int(t.removeprefix("token_id:")) for t in r.logprobs.tokens]
    assert r.text == plain.text and all(t.startswith("token_id:") for t in r.logprobs.tokens)
    assert requests.post(server.url + "/detokenize", json={"tokens": ids}, timeout=30).json()["prompt"] == plain.text
    assert all(k.startswith("token_id:") for top in r.logprobs.top_logprobs for k in top)
    assert r.logprobs.token_logprobs == plain.logprobs.token_logprobs
    echo = client.completions.create(**kw, echo=True, extra_body={"return_tokens_as_token_ids": True}).choices[0]
    prompt_ids = requests.post(server.url + "/tokenize", json={"prompt": "Once upon"}, timeout=30).json()["tokens"]
    assert echo.logprobs.tokens == [f"token_id:{t}" for t in prompt_ids + ids]
    chat = dict(model="builtin:tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=0,
                logprobs=True, top_logprobs=1, extra_body={"return_tokens_as_token_ids": True})
    whole = client.chat.completions.create(**chat).choices[0].logprobs.content
    streamed = [e for ch in client.chat.completions.create(**chat, stream=True) if ch.choices and ch.choices[0].logprobs
                for e in ch.choices[0].logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in whole] and len(whole) == 4
    assert all(e.token.startswith("token_id:") and e.top_logprobs[0].token.startswith("token_id:") for e in whole)


def test_ping_load_and_one_model(server, client):
    """vLLM's /ping (GET and POST, /health's answer) and /load (requests in flight), and OpenAI's
    GET /v1/models/{model} (the openai client's models.retrieve; a 404 for a name not served)."""
    for method in ("get", "post"):
        r = getattr(requests, method)(server.url + "/ping", timeout=10)
        assert r.status_code == 200 and r.json()["status"] == "ok"
    assert requests.get(server.url + "/load", timeout=10).json() == {"server_load": 0}
    card = client.models.retrieve("builtin:tiny")
    assert card.id == "builtin:tiny" and card.object == "model"
    r = requests.get(server.base_url + "/models/gpt-4", timeout=10)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
