"""Speculative decoding with n-gram drafts: the lookup, the verification (greedy exact, sampled
with the target distribution) and the engine (the same greedy tokens as without drafts, whatever
the batch, the cache, preemption or the graph runner)."""

from __future__ import annotations

import random

import pytest
import torch

from dyn_actor.engine import EngineConfig, LLMEngine, SamplingParams
from dyn_actor.engine.spec_decode import NgramProposer, SpeculativeConfig, verify
from tests.helpers import random_prompt, run_all

SPEC = SpeculativeConfig.parse({"num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 2})


# ---------------------------------------------------------------------------- the config
def test_config_defaults_and_checks():
    assert SpeculativeConfig.parse(None) is None and SpeculativeConfig.parse("") is None
    c = SpeculativeConfig.parse('{"method": "ngram", "num_speculative_tokens": 3}')
    assert (c.num_speculative_tokens, c.prompt_lookup_min, c.prompt_lookup_max) == (3, 5, 5)  # vLLM's defaults
    c = SpeculativeConfig.parse({"num_speculative_tokens": 2, "prompt_lookup_max": 4})
    assert (c.prompt_lookup_min, c.prompt_lookup_max) == (4, 4)
    assert SpeculativeConfig.parse({"method": "[ngram]", "num_speculative_tokens": 1, "prompt_lookup_min": 2}
                                   ).prompt_lookup_max == 2
    assert SpeculativeConfig.parse(c.to_dict()) == c
    for bad, words in [
        ("{", "JSON object"),
        ("[1]", "JSON object"),
        ({"prompt_lookup_max": 3}, "num_speculative_tokens is required"),
        ({"num_speculative_tokens": 0}, "from 1 to 16"),
        ({"num_speculative_tokens": "4"}, "from 1 to 16"),
        ({"num_speculative_tokens": True}, "from 1 to 16"),
        ({"num_speculative_tokens": 2, "prompt_lookup_min": 4, "prompt_lookup_max": 2}, "must not exceed"),
        ({"num_speculative_tokens": 2, "method": "eagle"}, "ngram only"),
        ({"num_speculative_tokens": 2, "model": "x"}, "draft model"),
        ({"num_speculative_tokens": 2, "lookahead": 1}, "unknown key(s) lookahead"),
    ]:
        with pytest.raises(ValueError, match=None) as e:
            SpeculativeConfig.parse(bad)
        assert words in str(e.value), (bad, str(e.value))


def test_launcher_flag_is_checked_at_start():
    from launcher.config import ConfigError, parse_args

    cfg = parse_args(["--speculative-config", '{"num_speculative_tokens": 3, "prompt_lookup_max": 4}'])
    assert SpeculativeConfig.parse(cfg.speculative_config) == SpeculativeConfig(3, 4, 4)
    for argv, says in ((["--speculative-config", '{"num_speculative_tokens": 99}'], "from 1 to 16"),
                       (["--speculative-config", "ngram"], "JSON object"),
                       (["--speculative-config", '{"num_speculative_tokens": 2}', "--async-scheduling", "on"],
                        "do not go together")):
        with pytest.raises(ConfigError, match=says) as e:
            parse_args(argv)
        assert "\n" not in str(e.value)
    assert parse_args(["--speculative-config", "{}"]).speculative_config is None  # an empty object: off


# ---------------------------------------------------------------------------- the lookup
def _reference(tokens: list[int], k: int, lo: int, hi: int) -> list[int]:
    """The longest n-gram (lo..hi) that ends ``tokens`` at its earliest earlier occurrence, by brute force."""
    n_tok = len(tokens)
    for n in range(min(hi, n_tok - 1), lo - 1, -1):
        tail = tokens[n_tok - n:]
        for j in range(0, n_tok - n):  # an occurrence that ends before the last token
            if tokens[j:j + n] == tail:
                return tokens[j + n:j + n + k]
    return []


def test_lookup_equals_brute_force():
    rng = random.Random(0)
    # ids whose bytes repeat inside other ids (0, 1, 256, 65536, 16777216 ...), so that byte matches
    # across token boundaries happen and must be skipped
    alphabet = [0, 1, 2, 256, 257, 65536, 65537, 16777216, 16843009, 131072]
    for trial in range(600):
        lo = rng.randint(1, 3)
        hi = rng.randint(lo, 5)
        k = rng.randint(1, 6)
        proposer = NgramProposer(SpeculativeConfig(k, hi, lo))
        tokens = [rng.choice(alphabet[:rng.randint(2, len(alphabet))]) for _ in range(rng.randint(1, 40))]
        buf = None
        for cut in (len(tokens) // 2, len(tokens)):  # grown in two steps, as a request grows
            if cut == 0:
                continue
            buf = NgramProposer.packed(tokens[:cut], buf)
            assert proposer.propose(tokens[:cut], k, buf) == _reference(tokens[:cut], k, lo, hi), (trial, cut)


def test_lookup_examples():
    p = NgramProposer(SpeculativeConfig(3, 3, 2))
    t = [5, 6, 7, 8, 9, 5, 6, 7]
    assert p.propose(t, 3, NgramProposer.packed(t, None)) == [8, 9, 5]  # the 3-gram 5 6 7
    t = [1, 2, 9, 4, 2, 9, 7, 2, 9]  # 2-gram "2 9" first at 1: what followed it there
    assert p.propose(t, 2, NgramProposer.packed(t, None)) == [4, 2]
    t = [1, 2, 3, 4]
    assert p.propose(t, 3, NgramProposer.packed(t, None)) == []


# ---------------------------------------------------------------------------- verification
def test_greedy_verification_keeps_the_argmax_prefix():
    vocab = 11
    logits = torch.full((7, vocab), -5.0)
    best = [3, 4, 9, 1, 6, 2, 8]  # the argmax of each row
    logits[torch.arange(7), torch.tensor(best)] = 5.0
    greedy = SamplingParams(temperature=0)
    # A (rows 0-3): draft 3 4 0, two kept, then row 2's 9; B (rows 4-6): draft 6 5, one kept, then row 5's 2
    got = verify(logits, [greedy, greedy], [None, None], [[3, 4, 0], [6, 5]])
    assert got[0].tokens == [3, 4, 9] and got[0].accepted == 2
    assert got[1].tokens == [6, 2] and got[1].accepted == 1
    got = verify(logits[1:4], [greedy], [None], [[0, 0]])  # rows 1-3: the first draft token refused
    assert got[0].tokens == [4] and got[0].accepted == 0
    got = verify(logits[:4], [greedy], [None], [[3, 4, 9]])
    assert got[0].tokens == [3, 4, 9, 1] and got[0].accepted == 3  # the whole draft, then one more


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.7, top_k=4),
    SamplingParams(temperature=1.3, top_p=0.8),
    SamplingParams(temperature=1.0, min_p=0.1),
])
def test_sampled_verification_has_the_target_distribution(params):
    """Each emitted token is distributed as plain sampling would draw it: the first as row 0's
    distribution, the second (after the first draft token was kept) as row 1's. Many requests
    with the same rows and draft in one call; the empirical frequencies within 0.012 of the
    target (about 5 standard deviations at these counts)."""
    torch.manual_seed(0)
    vocab, reqs = 6, 30_000
    rows = torch.tensor([[2.0, 1.5, 0.3, -1.0, 0.8, 1.9], [0.1, 2.2, -0.5, 1.0, 1.7, 0.0], [1.0] * 6])
    draft = [0, 4]  # likely, then middling
    logits = rows.repeat(reqs, 1)
    got = verify(logits, [params] * reqs, [None] * reqs, [draft] * reqs)

    def target(row: torch.Tensor) -> torch.Tensor:
        from dyn_actor.engine.sampling import apply_min_p, apply_top_k_top_p

        x = row.unsqueeze(0) / params.temperature
        x = apply_top_k_top_p(x, torch.tensor([params.top_k]) if params.top_k else None,
                              torch.tensor([params.top_p]) if params.top_p < 1 else None)
        if params.min_p:
            x = apply_min_p(x, torch.tensor([params.min_p]))
        return x.softmax(-1)[0]

    first = torch.bincount(torch.tensor([v.tokens[0] for v in got]), minlength=vocab).double() / reqs
    assert (first - target(rows[0])).abs().max() < 0.012, (first, target(rows[0]))
    kept = [v for v in got if v.accepted >= 1]
    second = torch.bincount(torch.tensor([v.tokens[1] for v in kept]), minlength=vocab).double() / len(kept)
    assert (second - target(rows[1])).abs().max() < 0.012 * (reqs / len(kept)) ** 0.5, (second, target(rows[1]))
    # where the first draft token is refused, it is never the token drawn instead
    assert all(v.tokens[0] != draft[0] for v in got if v.accepted == 0)


def test_seeded_verification_does_not_depend_on_the_batch():
    torch.manual_seed(1)
    logits = torch.randn(10, 50)
    params = [SamplingParams(temperature=1.0, seed=5), SamplingParams(temperature=0.8), SamplingParams(temperature=1.0, seed=5)]
    drafts = [[3, 7], [1, 1, 1], [3, 7]]
    gens = [torch.Generator().manual_seed(5), None, torch.Generator().manual_seed(5)]
    logits[7:10] = logits[0:3]  # the third request has the first's rows
    got = verify(logits, params, gens, drafts)
    alone = verify(logits[:3], params[:1], [torch.Generator().manual_seed(5)], drafts[:1])
    assert got[0] == got[2] == alone[0]


# ---------------------------------------------------------------------------- the engine
GREEDY = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
LENGTHS = [3, 9, 16, 17, 31, 40, 55, 70]


@pytest.fixture(scope="module")
def prompts():
    rng = random.Random(11)
    return [random_prompt(rng, n) for n in LENGTHS]


def _engine(spec: SpeculativeConfig | None, **kw) -> LLMEngine:
    return LLMEngine(EngineConfig(dtype="float32", speculative=spec, **{"num_kv_blocks": 128, "max_model_len": 256, **kw}))


@pytest.fixture(scope="module")
def plain(prompts):
    engine = _engine(None)
    return {k: v[0] for k, v in run_all(engine, {str(i): (p, GREEDY) for i, p in enumerate(prompts)}).items()}


@pytest.mark.parametrize("kw", [
    {},
    {"cuda_graphs": "on"},  # the graph runner (replayed eagerly on the CPU) takes the drafted rows
    {"attention": "torch"},  # the PyTorch attention path with its padded mask
    {"num_kv_blocks": 20},  # preemption, and drafts refused for want of blocks
    {"max_num_batched_tokens": 24},  # chunked prefill beside drafted rows; drafts cut to the budget
], ids=["native", "graphs", "torch", "preempt", "chunked"])
def test_greedy_tokens_equal_those_without_drafts(prompts, plain, kw):
    engine = _engine(SPEC, **kw)
    got = run_all(engine, {str(i): (p, GREEDY) for i, p in enumerate(prompts)})
    assert {k: v[0] for k, v in got.items()} == plain
    s = engine.stats()
    assert s.spec_accepted_tokens > 50 and s.spec_draft_tokens >= s.spec_accepted_tokens  # drafts really ran
    assert engine.block_manager.num_used_blocks == 0
    if kw.get("num_kv_blocks") == 20:
        assert s.num_preemptions > 0
    # several tokens came in one output where drafts were kept
    assert any(len(o.new_token_ids) > 1 for _, _, outs in got.values() for o in outs)


def test_prefix_cache_after_drafted_steps(prompts, plain):
    """The blocks a drafted request filled enter the prefix cache with the tokens kept: a prompt
    that continues one (prompt + its output) hits them and gets the tokens a fresh engine gives."""
    engine = _engine(SPEC)
    run_all(engine, {"a": (prompts[6], GREEDY)})
    follow = prompts[6] + plain["6"] + [7, 8, 9]
    got = run_all(engine, {"b": (follow, GREEDY)})["b"]
    assert got[2][-1].num_cached_tokens >= (len(prompts[6]) + 32) // 16 * 16
    assert got[0] == run_all(_engine(None), {"b": (follow, GREEDY)})["b"][0]


def test_limits_and_stops_hold_mid_draft(prompts, plain):
    engine = _engine(SPEC)
    jobs = {}
    for i, p in enumerate(prompts):
        out = plain[str(i)]
        jobs[f"len{i}"] = (p, SamplingParams(max_tokens=7 + i, temperature=0, ignore_eos=True))
        jobs[f"stop{i}"] = (p, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True,
                                              stop_token_ids=[out[20 + i % 5]]))
    got = run_all(engine, jobs)
    assert engine.stats().spec_accepted_tokens > 0
    for i in range(len(prompts)):
        out = plain[str(i)]
        assert got[f"len{i}"][0] == out[:7 + i] and got[f"len{i}"][1] == "length"
        stop = out[20 + i % 5]
        assert got[f"stop{i}"][0] == out[:out.index(stop) + 1] and got[f"stop{i}"][1] == "stop"
    # the context length too
    engine = _engine(SPEC, max_model_len=96)
    long = run_all(engine, {"x": (prompts[7], SamplingParams(max_tokens=100, temperature=0, ignore_eos=True))})["x"]
    assert len(prompts[7]) + len(long[0]) == 96 and long[1] == "length"


def test_requests_that_cannot_draft_run_beside_those_that_do(prompts, plain):
    """Logprobs, penalties, logit bias, min_tokens: no draft for those, in the same steps as drafted rows."""
    engine = _engine(SPEC)
    jobs = {str(i): (p, GREEDY) for i, p in enumerate(prompts)}
    jobs["lp"] = (prompts[0], SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, logprobs=2))
    jobs["pen"] = (prompts[1], SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, repetition_penalty=1.3))
    jobs["min"] = (prompts[2], SamplingParams(max_tokens=40, temperature=0, min_tokens=40))
    got = run_all(engine, jobs)
    assert {k: got[k][0] for k in plain} == plain
    assert got["lp"][0] == plain["0"] and all(len(o.new_token_ids) == 1 and o.logprobs for o in got["lp"][2])
    assert all(len(o.new_token_ids) == 1 for o in got["pen"][2])
    ref = run_all(_engine(None), {"pen": jobs["pen"], "min": jobs["min"]})
    assert got["pen"][0] == ref["pen"][0] and got["min"][0] == ref["min"][0]
    assert engine.stats().spec_accepted_tokens > 0


def test_seeded_sampling_with_drafts_is_reproducible(prompts):
    """A seeded request gives the same tokens alone and in a batch, with drafts on (not the tokens
    it gives without drafts: it draws its numbers differently)."""
    params = SamplingParams(max_tokens=40, temperature=0.8, top_k=20, seed=3, ignore_eos=True)
    alone = run_all(_engine(SPEC), {"s": (prompts[4], params)})["s"][0]
    jobs = {str(i): (p, SamplingParams(max_tokens=30, temperature=1.0, ignore_eos=True)) for i, p in enumerate(prompts)}
    jobs["s"] = (prompts[4], params)
    engine = _engine(SPEC)
    assert run_all(engine, jobs)["s"][0] == alone and len(alone) == 40
    assert engine.stats().spec_drafts > 0


# ---------------------------------------------------------------------------- served
def _completion(s, prompt: list[int], stream: bool = False) -> list[int] | str:
    import json

    import requests

    body = {"model": "builtin:tiny", "prompt": prompt, "max_tokens": 48, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True}
    if not stream:
        r = requests.post(s.url + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]
    text = ""
    with requests.post(s.url + "/v1/completions", json={**body, "stream": True}, stream=True, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith(b"data: ") and line != b"data: [DONE]":
                text += json.loads(line[6:])["choices"][0]["text"]
    return text


def test_served_1p1d_with_drafts_answers_as_agg_without(prompts, tmp_path):
    """The launcher's flag (from a YAML config too), 1p1d with every prefill remote: the same greedy
    text as agg without drafts, whole and streamed; /metrics counts the drafts."""
    from tests.helpers import metric
    from tests.server import InprocServer, Server

    ref = InprocServer("--topology", "agg", "--dtype", "float32", "--kv-cache-memory-gb", "0.1")
    try:
        want = [_completion(ref, p) for p in prompts]
    finally:
        ref.stop()
    config = tmp_path / "spec.yaml"
    config.write_text("speculative-config:\n  method: ngram\n  num_speculative_tokens: 4\n  prompt_lookup_max: 3\n"
                      "  prompt_lookup_min: 2\n")
    s = Server("--config", str(config), "--topology", "1p1d", "--max-local-prefill-length", "0", "--dtype", "float32",
               "--kv-cache-memory-gb", "0.1")
    try:
        assert [_completion(s, p) for p in prompts] == want
        assert [_completion(s, p, stream=True) for p in prompts[:3]] == want[:3]
        from tests.helpers import eventually

        assert eventually(lambda: metric(s, "dyn_worker_spec_decode_accepted_tokens_total") > 0, timeout=5)
        assert metric(s, "dyn_worker_spec_decode_draft_tokens_total") >= metric(
            s, "dyn_worker_spec_decode_accepted_tokens_total")
        assert metric(s, "dyn_remote_prefills_total") >= len(prompts)
    finally:
        code, err = s.stop()
    assert code == 0, err[-2000:]


def test_allowed_tokens_and_bad_words_are_not_drafted_for(prompts, plain):
    """A request with allowed_token_ids or bad_words gets no draft (a draft's rows skip those masks):
    its tokens are those of an engine without drafts, while the plain requests beside it draft."""
    jobs = {}
    for i, p in enumerate(prompts[:4]):
        out = plain[str(i)]
        jobs[f"bad{i}"] = (p, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True,
                                             bad_words_ids=[out[10:12], [out[20]]]))
        jobs[f"allowed{i}"] = (p, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True,
                                                 allowed_token_ids=sorted(set(out[:8]))))
        jobs[f"plain{i}"] = (p, GREEDY)
    got = run_all(_engine(SPEC), jobs)
    want = run_all(_engine(None), jobs)
    assert {k: v[0] for k, v in got.items()} == {k: v[0] for k, v in want.items()}
    for k, (_, _, outs) in got.items():
        if not k.startswith("plain"):
            assert all(len(o.new_token_ids) == 1 for o in outs), k
    assert any(len(o.new_token_ids) > 1 for k, (_, _, outs) in got.items() if k.startswith("plain") for o in outs)
