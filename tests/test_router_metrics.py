from __future__ import annotations

from collections import Counter as Tally

import pytest

from dyn_actor.components.openai_api import CompletionRequest, RequestError, decode_body, prompt_list, sampling_params
from dyn_actor.metrics import Registry
from dyn_actor.router import NoWorkerAvailable, Router


def test_round_robin_spreads_and_skips_dead_workers():
    r = Router("round-robin")
    for name in "abc":
        r.add_worker(name, None)
    assert [r.pick().entry.name for _ in range(6)] == list("abcabc")
    r.remove_worker("b")
    assert {r.pick().entry.name for _ in range(6)} == {"a", "c"}
    r.remove_worker("a")
    r.remove_worker("c")
    with pytest.raises(NoWorkerAvailable):
        r.pick()


def test_random_router_covers_workers_and_counts_load():
    r = Router("random", seed=1)
    for name in "ab":
        r.add_worker(name, None)
    picks = Tally(r.pick().entry.name for _ in range(200))
    assert set(picks) == {"a", "b"} and min(picks.values()) > 60
    r1, r2 = r.pick(list(range(40))), r.pick(list(range(40)))
    e = r1.entry
    r2.entry = e
    r.begin(r1)
    r.begin(r2)
    assert e.in_flight == 2 and e.routed_total == 2 and e.active_blocks == 6 and e.pending_prefill_blocks == 6
    r.first_token(r1)
    assert e.pending_prefill_blocks == 3
    r.end(r1)
    r.end(r2)
    r.end(r2)  # ending twice counts once
    assert e.in_flight == 0 and e.active_blocks == 0 and e.pending_prefill_blocks == 0
    with pytest.raises(ValueError):
        Router("nope")


def test_prometheus_rendering():
    from prometheus_client.parser import text_string_to_metric_families

    reg = Registry()
    c = reg.counter("dyn_x_total", "x", ("worker",))
    c.inc(2, "w0")
    c.inc(1, 'w"1')
    h = reg.histogram("dyn_lat_seconds", "lat", buckets=(0.1, 1.0))
    for v in (0.05, 0.5, 5):
        h.observe(v)
    g = reg.gauge("dyn_plain", "plain")

    def samples() -> dict:
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for fam in text_string_to_metric_families(reg.render()) for s in fam.samples}

    got = samples()
    assert got[("dyn_x_total", (("worker", "w0"),))] == 2 and got[("dyn_x_total", (("worker", 'w"1'),))] == 1
    assert got[("dyn_lat_seconds_bucket", (("le", "0.1"),))] == 1
    assert got[("dyn_lat_seconds_bucket", (("le", "1.0"),))] == 2
    assert got[("dyn_lat_seconds_bucket", (("le", "+Inf"),))] == 3 and got[("dyn_lat_seconds_count", ())] == 3
    assert got[("dyn_plain", ())] == 0 and "# TYPE dyn_lat_seconds histogram" in reg.render()
    assert not any(name.endswith("_created") for name, _ in got)
    g.set(4)
    assert samples()[("dyn_plain", ())] == 4


def test_openai_request_parsing():
    req = decode_body(b'{"prompt": [[1, 2], "hi"], "max_tokens": 3, "stop": "x", "seed": 5, "top_k": 4}',
                      CompletionRequest)
    assert prompt_list(req.prompt) == [[1, 2], "hi"]
    sp = sampling_params(req, 3, None, seed_offset=2)
    assert sp.stop == ["x"] and sp.seed == 7 and sp.top_k == 4 and sp.max_tokens == 3
    for bad in (b'{"prompt": 5}', b'{"prompt": "a", "n": "2"}', b"nope"):
        with pytest.raises(RequestError):
            decode_body(bad, CompletionRequest)
    with pytest.raises(RequestError):
        prompt_list([[1, 2], [True]])
    with pytest.raises(RequestError, match="presence_penalty"):
        sampling_params(decode_body(b'{"prompt": "a", "presence_penalty": 5}', CompletionRequest), 3, None)
