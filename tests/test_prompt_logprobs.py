"""Prompt logprobs (vLLM's ``prompt_logprobs``; completions' ``echo`` with ``logprobs``): every prompt
token after the first is scored by the model's raw log-probabilities, whatever the step layout
(batched with decodes, chunked, after another request cached the prefix, through CUDA-graph steps)."""

from __future__ import annotations

import math
import random

import pytest
import torch

from dyn_actor.engine import EngineConfig, LLMEngine, SamplingParams
from tests.helpers import random_prompt, run_all


def _reference(engine: LLMEngine, prompt: list[int], k: int) -> list[tuple[int, float, int, list[int]]]:
    """(token, logprob, rank, top-k ids) of prompt tokens 1.. from one pass over the whole prompt."""
    lsm = torch.log_softmax(engine.score([prompt])[0].float(), dim=-1)
    out = []
    for j in range(len(prompt) - 1):
        row, t = lsm[j], prompt[j + 1]
        out.append((t, row[t].item(), int((row > row[t]).sum()) + 1, row.topk(k).indices.tolist() if k else []))
    return out


def _check(got, want, k: int) -> None:
    assert got[0] is None and len(got) == len(want) + 1
    for lp, (t, v, rank, top) in zip(got[1:], want):
        assert lp.token_id == t and math.isclose(lp.logprob, v, abs_tol=2e-4), (lp, t, v)
        assert abs(lp.rank - rank) <= 1  # ties within float noise may swap neighbours
        assert len(lp.top) == k and [i for i, _ in lp.top][:1] == top[:1]
        assert all(a[1] >= b[1] for a, b in zip(lp.top, lp.top[1:]))


@pytest.mark.parametrize("config", [
    dict(),  # fresh prompts batched with others
    dict(max_num_batched_tokens=24),  # chunked: a prompt's scores come over several steps
    dict(cuda_graphs="on"),  # decode steps through the graph runner's host path
], ids=["batched", "chunked", "graphs"])
def test_prompt_logprobs_equal_a_full_pass(config):
    rng = random.Random(3)
    prompts = [random_prompt(rng, n) for n in (2, 17, 40, 70)]
    engine = LLMEngine(EngineConfig(num_kv_blocks=128, max_model_len=256, **config))
    want = {f"p{i}": _reference(engine, p, 3) for i, p in enumerate(prompts)}
    # a plain request that caches the longest prompt's prefix first: the scored one must not use the hit
    run_all(engine, {"warm": (prompts[-1], SamplingParams(max_tokens=2, temperature=0))})
    reqs = {f"p{i}": (p, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, prompt_logprobs=3))
            for i, p in enumerate(prompts)}
    reqs["plain"] = (random_prompt(rng, 30), SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    done = run_all(engine, reqs)
    for rid, w in want.items():
        outs = done[rid][2]
        firsts = [o.prompt_logprobs for o in outs if o.prompt_logprobs is not None]
        assert len(firsts) == 1 and outs[0].prompt_logprobs is not None  # once, on the first output
        _check(firsts[0], w, 3)
        assert outs[0].num_cached_tokens == 0
    assert all(o.prompt_logprobs is None for o in done["plain"][2])
    # the sampled tokens are those of a request without prompt logprobs
    again = run_all(engine, {rid: (p, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
                             for rid, (p, _) in reqs.items() if rid != "plain"})
    assert {rid: v[0] for rid, v in again.items()} == {rid: done[rid][0] for rid in again}
    assert engine.stats().kv_blocks_used == 0


def test_a_long_scored_prompt_is_computed_in_bounded_chunks(monkeypatch):
    """Each scored position has a vocabulary-wide logits row: a scored prompt is computed at most
    ``SCORED_CHUNK`` tokens a step (16 here), and the scores still equal one full pass."""
    import dyn_actor.engine.scheduler as scheduler

    monkeypatch.setattr(scheduler, "SCORED_CHUNK", 16)
    prompt = random_prompt(random.Random(8), 70)
    engine = LLMEngine(EngineConfig(num_kv_blocks=64, max_model_len=256))
    want = _reference(engine, prompt, 2)
    engine.add_request("x", prompt, SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=2))
    engine.add_request("y", random_prompt(random.Random(2), 50), SamplingParams(max_tokens=2, temperature=0))
    steps, outs = 0, []
    while engine.has_unfinished_requests():
        sched_before = engine.requests["x"].num_computed_tokens if "x" in engine.requests else None
        outs += [o for o in engine.step() if o.request_id == "x"]
        if sched_before is not None and "x" in engine.requests:
            assert engine.requests["x"].num_computed_tokens - sched_before <= 16
        steps += 1
    assert steps >= 5
    _check(outs[0].prompt_logprobs, want, 2)


def test_prompt_logprobs_survive_preemption_once():
    """A request preempted after its prompt was scored is recomputed without scoring it twice."""
    rng = random.Random(5)
    prompts = [random_prompt(rng, 60) for _ in range(4)]
    engine = LLMEngine(EngineConfig(num_kv_blocks=20, max_model_len=300, enable_prefix_caching=False))
    reqs = {f"r{i}": (p, SamplingParams(max_tokens=60, temperature=0, ignore_eos=True, prompt_logprobs=0))
            for i, p in enumerate(prompts)}
    done = run_all(engine, reqs)
    assert engine.stats().num_preemptions > 0
    for rid, (p, _) in reqs.items():
        firsts = [o.prompt_logprobs for o in done[rid][2] if o.prompt_logprobs is not None]
        assert len(firsts) == 1
        _check(firsts[0], _reference(engine, p, 0), 0)


def test_prompt_logprobs_are_validated():
    engine = LLMEngine(EngineConfig(num_kv_blocks=16, max_model_len=64))
    with pytest.raises(ValueError, match="prompt_logprobs must be between 0 and 20"):
        engine.add_request("x", [0, 5, 6], SamplingParams(prompt_logprobs=21))


# ------------------------------------------------------------------------- over HTTP
@pytest.fixture(scope="module")
def server():
    from tests.server import InprocServer

    # 1p1d with every prefill remote but those that need prompt logprobs (computed where they are scored)
    s = InprocServer("--topology", "1p1d", "--kv-cache-memory-gb", "0.1", "--max-local-prefill-length", "0")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def ref_engine():
    return LLMEngine(EngineConfig(num_kv_blocks=64, max_model_len=512))


def _post(s, route: str, body: dict, status: int = 200) -> dict:
    import requests

    r = requests.post(f"{s.base_url}/{route}", json=body, timeout=60)
    assert r.status_code == status, r.text
    return r.json()


def _remote_prefills(s) -> float:
    import requests

    text = requests.get(s.url + "/metrics", timeout=10).text
    return sum(float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines() if ln.startswith("dyn_remote_prefills_total"))


PROMPT = [0] + [random.Random(9).randrange(2, 99) for _ in range(40)]


def test_echo_with_logprobs_and_no_new_tokens_scores_the_prompt(server, ref_engine):
    want = _reference(ref_engine, PROMPT, 2)
    remote = _remote_prefills(server)
    body = _post(server, "completions", {"prompt": PROMPT, "echo": True, "logprobs": 2, "max_tokens": 0})
    c = body["choices"][0]
    assert c["finish_reason"] == "length" and body["usage"]["completion_tokens"] == 0
    lp = c["logprobs"]
    assert len(lp["tokens"]) == len(PROMPT) and "".join(lp["tokens"]) == c["text"]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    for v, (_, w, _, _top) in zip(lp["token_logprobs"][1:], want):
        assert math.isclose(v, w, abs_tol=1e-3)
    assert all(len(t) == 2 for t in lp["top_logprobs"][1:])
    assert lp["text_offset"][0] == 0 and lp["text_offset"][1] == len(lp["tokens"][0])
    assert _remote_prefills(server) == remote  # scored where it was computed: locally
    _post(server, "completions", {"prompt": PROMPT, "max_tokens": 1})
    assert _remote_prefills(server) == remote + 1  # while the same prompt without scores goes remote


def test_echo_then_the_completion(server):
    plain = _post(server, "completions", {"prompt": PROMPT, "max_tokens": 5, "temperature": 0, "logprobs": 0})
    echo = _post(server, "completions", {"prompt": PROMPT, "max_tokens": 5, "temperature": 0, "logprobs": 0,
                                         "echo": True})
    p, e = plain["choices"][0], echo["choices"][0]
    assert e["text"].endswith(p["text"]) and len(e["text"]) > len(p["text"])
    assert e["logprobs"]["tokens"][len(PROMPT):] == p["logprobs"]["tokens"]
    assert e["logprobs"]["token_logprobs"][len(PROMPT):] == pytest.approx(p["logprobs"]["token_logprobs"], abs=1e-4)
    assert echo["usage"]["completion_tokens"] == 5
    # a text prompt comes back as it was sent
    text = _post(server, "completions", {"prompt": "hello there", "max_tokens": 2, "echo": True})
    assert text["choices"][0]["text"].startswith("hello there")


def test_prompt_logprobs_as_vllm_returns_them(server, ref_engine):
    want = _reference(ref_engine, PROMPT, 1)
    c = _post(server, "completions", {"prompt": PROMPT, "max_tokens": 1, "prompt_logprobs": 1})["choices"][0]
    plp = c["prompt_logprobs"]
    assert len(plp) == len(PROMPT) and plp[0] is None
    for entry, tok, (_, w, rank, top) in zip(plp[1:], PROMPT[1:], want):
        assert math.isclose(entry[str(tok)]["logprob"], w, abs_tol=1e-3) and abs(entry[str(tok)]["rank"] - rank) <= 1
        assert str(top[0]) in entry and entry[str(top[0])]["rank"] == 1 and 1 <= len(entry) <= 2
    chat = _post(server, "chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                                              "prompt_logprobs": 0})
    assert len(chat["prompt_logprobs"]) == chat["usage"]["prompt_tokens"] and chat["prompt_logprobs"][0] is None
    assert "prompt_logprobs" not in _post(server, "completions", {"prompt": PROMPT, "max_tokens": 1})["choices"][0]


def test_echo_streams_the_prompt_first(server):
    import json

    import requests

    r = requests.post(f"{server.base_url}/completions", stream=True, timeout=60, json={
        "prompt": "hello there", "max_tokens": 3, "echo": True, "stream": True, "logprobs": 1,
        "ignore_eos": True})  # sampled from random weights: EOS may come within 3 tokens
    assert r.status_code == 200
    chunks = [json.loads(ln[6:]) for ln in r.iter_lines(decode_unicode=True) if ln.startswith("data: {")]
    first = chunks[0]["choices"][0]
    assert first["text"] == "hello there" and first["logprobs"]["token_logprobs"][0] is None
    assert len(chunks) == 4 and chunks[-1]["choices"][0]["finish_reason"] == "length"
    r = requests.post(f"{server.base_url}/completions", stream=True, timeout=60, json={
        "prompt": "hello there", "max_tokens": 0, "echo": True, "stream": True})
    chunks = [json.loads(ln[6:]) for ln in r.iter_lines(decode_unicode=True) if ln.startswith("data: {")]
    assert [c["choices"][0]["text"] for c in chunks] == ["hello there"]
    assert chunks[0]["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize("route,body,message", [
    ("completions", {"prompt": "hi", "max_tokens": 0}, "0 only with echo"),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "max_tokens"),
    ("completions", {"prompt": "hi", "prompt_logprobs": 1, "stream": True}, "not available when stream"),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "prompt_logprobs": 1, "stream": True},
     "not available when stream"),
    ("completions", {"prompt": "hi", "prompt_logprobs": 21}, "prompt_logprobs"),
])
def test_bad_prompt_logprob_requests_get_a_400(server, route, body, message):
    err = _post(server, route, body, status=400)["error"]
    assert message in err["message"]
