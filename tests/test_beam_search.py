"""Beam search (vLLM's ``use_beam_search``): the search against an exhaustive one on a small
made-up model, and served: one beam is greedy decoding, several come ranked by their score, and
what it does not do is a 400."""

from __future__ import annotations

import asyncio
import itertools
import math
import random

import pytest
import requests

from dyn_actor.components.beam_search import Beam, beam_search, score
from tests.helpers import eventually, metric
from tests.server import InprocServer

VOCAB, EOS = 4, 3


def _table(seed: int) -> dict[tuple[int, ...], list[float]]:
    """A made-up model: the log-probabilities of the next token after each sequence (up to 4 tokens)."""
    rng = random.Random(seed)
    out = {}
    for n in range(5):
        for seq in itertools.product(range(VOCAB), repeat=n):
            w = [rng.random() ** 3 + 1e-3 for _ in range(VOCAB)]
            out[seq] = [math.log(x / sum(w)) for x in w]
    return out


def _run(table, width: int, steps: int, length_penalty: float = 1.0, ignore_eos: bool = False) -> list[Beam]:
    async def expand(beams):
        return [sorted(enumerate(table[tuple(b)]), key=lambda a: -a[1])[:2 * width] for b in beams]

    return asyncio.run(beam_search(expand, 5, width, steps, {EOS}, ignore_eos, length_penalty))


def _every_sequence(table, steps: int, ignore_eos: bool) -> list[Beam]:
    """Every way to go on for ``steps`` tokens: sequences ended by EOS, and those of full length."""
    out = []
    for n in range(1, steps + 1):
        for seq in itertools.product(range(VOCAB), repeat=n):
            lp = sum(table[seq[:i]][t] for i, t in enumerate(seq))
            if not ignore_eos and EOS in seq[:-1]:
                continue
            if not ignore_eos and seq[-1] == EOS:
                out.append(Beam(list(seq[:-1]), lp, "stop", EOS))
            elif n == steps:
                out.append(Beam(list(seq), lp, "length"))
    return out


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("length_penalty", [1.0, 0.0, 2.0])
def test_wide_enough_beams_find_the_best_sequences(seed, length_penalty):
    """With more beams than sequences of a step, nothing is pruned: the answer is the best of every
    possible sequence by score, in order."""
    table = _table(seed)
    for ignore_eos in (False, True):
        got = _run(table, 64, 3, length_penalty, ignore_eos)
        want = sorted(_every_sequence(table, 3, ignore_eos), key=lambda b: score(b, 5, length_penalty), reverse=True)
        assert [(b.tokens, b.finish_reason) for b in got] == [(b.tokens, b.finish_reason) for b in want[:64]]
        assert all(math.isclose(g.logprob, w.logprob) for g, w in zip(got, want))


def test_one_beam_is_greedy_decoding():
    table = _table(7)
    seq: tuple[int, ...] = ()
    for _ in range(4):
        seq = (*seq, max(range(VOCAB), key=lambda i: table[seq][i]))
    (only,) = _run(table, 1, 4, ignore_eos=True)
    assert tuple(only.tokens) == seq and math.isclose(only.logprob, sum(table[seq[:i]][t] for i, t in enumerate(seq)))


@pytest.fixture(scope="module")
def server():
    s = InprocServer("--topology", "1p1d", "--max-model-len", "256", "--kv-cache-memory-gb", "0.1",
                     "--max-local-prefill-length", "4")
    yield s
    s.stop()


def _post(server, route, body):
    return requests.post(f"{server.base_url}/{route}", json=body, timeout=120)


def test_served_beams(server):
    """One beam is the greedy completion; three come back best first by their score (checked by
    scoring each beam's text with the server itself); the steps' requests left nothing behind."""
    prompt = "The quick brown fox"
    greedy = _post(server, "completions", {"prompt": prompt, "max_tokens": 8, "temperature": 0,
                                            "ignore_eos": True}).json()["choices"][0]["text"]
    one = _post(server, "completions", {"prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": True,
                                         "use_beam_search": True}).json()
    assert one["choices"][0]["text"] == greedy and one["usage"]["completion_tokens"] == 8
    r = _post(server, "completions", {"prompt": prompt, "max_tokens": 6, "n": 3, "temperature": 0,
                                       "ignore_eos": True, "use_beam_search": True, "length_penalty": 1.0,
                                       "skip_special_tokens": False})  # (every token's text: scored below)
    assert r.status_code == 200, r.text
    texts = [c["text"] for c in r.json()["choices"]]
    assert len(set(texts)) == 3 and [c["index"] for c in r.json()["choices"]] == [0, 1, 2]
    ids = requests.post(server.url + "/tokenize", json={"prompt": prompt}, timeout=30).json()["tokens"]
    scores = []
    for text in texts:
        tail = requests.post(server.url + "/tokenize", json={"prompt": text, "add_special_tokens": False},
                             timeout=30).json()["tokens"]
        assert len(tail) == 6
        scored = _post(server, "completions", {"prompt": ids + tail, "max_tokens": 0, "echo": True,
                                                "logprobs": 0}).json()["choices"][0]["logprobs"]["token_logprobs"]
        scores.append(sum(scored[len(ids):]) / (len(ids) + 6))
    assert scores == sorted(scores, reverse=True), scores
    # the best beam is at least as likely as the greedy completion of the same length
    g = requests.post(server.url + "/tokenize", json={"prompt": greedy[:6], "add_special_tokens": False},
                      timeout=30).json()["tokens"]
    scored = _post(server, "completions", {"prompt": ids + g, "max_tokens": 0, "echo": True,
                                            "logprobs": 0}).json()["choices"][0]["logprobs"]["token_logprobs"]
    assert scores[0] >= sum(scored[len(ids):]) / (len(ids) + 6) - 1e-6
    chat = _post(server, "chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5,
                                               "n": 2, "temperature": 0, "use_beam_search": True})
    assert chat.status_code == 200 and len(chat.json()["choices"]) == 2, chat.text
    assert eventually(lambda: metric(server, "dyn_worker_kv_blocks_used") == 0)


@pytest.mark.parametrize("extra, says", [
    ({"stream": True}, "stream"), ({"logprobs": 2}, "logprobs"), ({"logprobs": 0}, "logprobs"), ({"echo": True}, "echo"),
    ({"guided_choice": ["a", "b"]}, "structured"), ({"n": 11}, "up to 10"),
])
def test_what_beam_search_does_not_do_is_a_400(server, extra, says):
    r = _post(server, "completions", {"prompt": "hi", "max_tokens": 4, "use_beam_search": True, **extra})
    assert r.status_code == 400 and says in r.json()["error"]["message"], r.text
