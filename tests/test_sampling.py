from __future__ import annotations

import math
import random

import msgspec
import pytest
import torch

from dyn_actor.engine import EngineConfig, LLMEngine, SamplingParams, sampling
from dyn_actor.engine.llm import LLM
from dyn_actor.engine.sampling import (
    apply_min_p,
    apply_top_k_top_p,
    draw_from,
    make_generator,
    sample,
    sort_top_k_top_p,
)
from tests.helpers import random_prompt, run_all


def test_top_k_mask():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0], [1.0, 2.0, 3.0, 4.0, 5.0]])
    out = apply_top_k_top_p(logits, torch.tensor([2, 0]), None)
    assert torch.isinf(out[0]).tolist() == [True, False, True, False, True]
    assert not torch.isinf(out[1]).any()  # 0: off


def test_top_p_mask_keeps_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    out = apply_top_k_top_p(probs.log(), None, torch.tensor([0.75]))
    assert torch.isinf(out[0]).tolist() == [False, False, True, True]
    out = apply_top_k_top_p(probs.log(), None, torch.tensor([0.1]))
    assert torch.isinf(out[0]).tolist() == [False, True, True, True]  # the top token always stays


@pytest.mark.parametrize("vocab", [50, 1000])
def test_top_k_top_p_among_candidates_equal_sorting_whole_rows(vocab, monkeypatch):
    """Rows with top-k, top-p, both or neither; narrow nuclei (found among the candidates) and wide ones
    (sorted whole): the same masks as sorting every row."""
    monkeypatch.setattr(sampling, "TOP_CANDIDATES", 16)
    g = torch.Generator().manual_seed(3)
    n = 48
    scale = torch.tensor([0.3, 1.0, 4.0, 12.0]).repeat(n // 4).unsqueeze(1)  # flat to peaked rows
    logits = torch.randn(n, vocab, generator=g) * scale
    top_k = torch.tensor([0, 1, 5, 16, 40, 0, 3, 0] * (n // 8))
    top_p = torch.tensor([1.0, 0.9, 0.5, 1.0, 0.99, 0.3, 1.0, 0.95] * (n // 8))
    for k, p in ((top_k, None), (None, top_p), (top_k, top_p)):
        got = apply_top_k_top_p(logits.clone(), k, p)
        want = sort_top_k_top_p(logits.clone(), k, p)
        assert torch.equal(torch.isinf(got), torch.isinf(want))
        assert torch.equal(got[~torch.isinf(got)], logits[~torch.isinf(got)])  # what is kept is untouched
    # every top-p row with top-k on too: no nucleus can pass the candidates, and the caller says so
    # (no wait for the device to find out), still the masks of sorting
    both = torch.where(top_k > 0, top_k, torch.full_like(top_k, 7))
    got = apply_top_k_top_p(logits.clone(), both, top_p, int(both.max()), unbounded_top_p=False)
    assert torch.equal(torch.isinf(got), torch.isinf(sort_top_k_top_p(logits.clone(), both, top_p)))
    wide = (sort_top_k_top_p(logits, None, top_p) > float("-inf")).sum(dim=1)
    assert (wide > 16).any() and (wide[top_p < 1] < 16).any()  # both kinds of row were there
    # a top-k wider than the candidates widens them
    k = torch.full((n,), 30)
    assert torch.equal(torch.isinf(apply_top_k_top_p(logits, k, top_p, 30)), torch.isinf(sort_top_k_top_p(logits, k, top_p)))


def test_min_p_mask():
    probs = torch.tensor([[0.6, 0.25, 0.1, 0.05]])
    out = apply_min_p(probs.log(), torch.tensor([0.2]))  # threshold 0.12
    assert torch.isinf(out[0]).tolist() == [False, False, True, True]


def test_sampling_respects_masks_over_many_draws():
    logits = torch.randn(1, 50, generator=torch.Generator().manual_seed(0)).repeat(400, 1)
    top5 = set(logits[0].topk(5).indices.tolist())
    params = [SamplingParams(temperature=1.5, top_k=5)] * 400
    res = sample(logits.clone(), params, [None] * 400)
    assert set(res.token_ids) <= top5 and len(set(res.token_ids)) > 1


def test_draw_follows_the_distribution():
    probs = torch.tensor([0.5, 0.0, 0.3, 0.15, 0.05, 0.0])
    n = 40_000
    tokens = draw_from(probs.repeat(n, 1), torch.rand(n, generator=torch.Generator().manual_seed(7)))
    counts = torch.bincount(tokens, minlength=6).double() / n
    assert counts[1] == 0 and counts[5] == 0  # probability 0: never
    # within 5 standard deviations of each expected frequency
    assert torch.all((counts - probs.double()).abs() <= 5 * (probs.double() * (1 - probs.double()) / n).sqrt())


def test_draw_at_the_ends_of_the_unit_interval():
    probs = torch.tensor([[0.0, 0.2, 0.8, 0.0, 0.0]] * 3)
    top = 1.0 - 2.0**-24  # the largest float32 below 1
    u = torch.tensor([0.0, top, 0.2 / 1.0 - 1e-6])
    assert draw_from(probs, u).tolist() == [1, 2, 1]
    # rows that do not sum to one are drawn from as if normalized
    assert draw_from(torch.tensor([[2.0, 0.0, 6.0]] * 2), torch.tensor([0.2, 0.3])).tolist() == [0, 2]


def test_seeded_rows_reproducible_whatever_the_batch():
    logits = torch.randn(3, 99, generator=torch.Generator().manual_seed(1))
    sp = SamplingParams(temperature=1.0, seed=123)
    draws_alone = [sample(logits[1:2].clone(), [sp], [g]).token_ids[0] for g in [make_generator(123)] for _ in range(1)]
    g = make_generator(123)
    mixed = sample(logits.clone(), [SamplingParams(temperature=1.0), sp, SamplingParams(temperature=0)], [None, g, None])
    assert mixed.token_ids[1] == draws_alone[0]
    assert mixed.token_ids[2] == logits[2].argmax().item()


def test_seeded_request_same_tokens_alone_and_batched():
    rng = random.Random(3)
    p = random_prompt(rng, 20)
    sp = SamplingParams(max_tokens=30, temperature=1.0, top_p=0.9, seed=42, ignore_eos=True)
    e1 = LLMEngine(EngineConfig(num_kv_blocks=64))
    alone = run_all(e1, {"a": (p, sp)})["a"][0]
    e2 = LLMEngine(EngineConfig(num_kv_blocks=256))
    others = {f"o{i}": (random_prompt(rng, 10 + i), SamplingParams(max_tokens=25, temperature=1.0)) for i in range(6)}
    batched = run_all(e2, {**others, "a": (p, sp)})["a"][0]
    assert alone == batched
    unseeded = run_all(e2, {"u": (p, SamplingParams(max_tokens=30, temperature=1.0, ignore_eos=True, seed=43))})["u"][0]
    assert unseeded != alone


def test_max_tokens_min_tokens_eos_and_stop_token_ids():
    engine = LLMEngine(EngineConfig(num_kv_blocks=64))
    p = [0, 40, 41, 42]
    (toks, reason, _), = run_all(engine, {"a": (p, SamplingParams(max_tokens=7, temperature=0, ignore_eos=True))}).values()
    assert len(toks) == 7 and reason == "length"
    stop_tok = toks[3]
    res = run_all(engine, {"b": (p, SamplingParams(max_tokens=7, temperature=0, stop_token_ids=[stop_tok]))})["b"]
    assert res[0] == toks[: toks.index(stop_tok) + 1] and res[1] == "stop"
    assert res[2][-1].stop_reason == stop_tok
    # min_tokens forbids the stop token before that many tokens
    res = run_all(engine, {"c": (p, SamplingParams(max_tokens=20, temperature=0, stop_token_ids=[stop_tok], min_tokens=6))})["c"]
    assert stop_tok not in res[0][:5] and len(res[0]) >= 6
    # EOS ends a request (stop_reason None) unless ignore_eos; pretend the model's EOS is that token
    engine.eos_token_ids = (stop_tok,)
    res = run_all(engine, {"d": (p, SamplingParams(max_tokens=7, temperature=0))})["d"]
    assert res[0] == toks[: toks.index(stop_tok) + 1] and res[1] == "stop" and res[2][-1].stop_reason is None
    res = run_all(engine, {"e": (p, SamplingParams(max_tokens=7, temperature=0, ignore_eos=True))})["e"]
    assert res[0] == toks and res[1] == "length"
    assert engine.block_manager.num_used_blocks == 0


def test_stop_strings_and_text():
    llm = LLM("builtin:tiny", num_kv_blocks=64)
    base = llm.generate(["Hello there"], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))[0].output
    assert len(base.text) > 10
    stop = base.text[5:8]
    first = base.text.find(stop)
    out = llm.generate(["Hello there"], SamplingParams(max_tokens=30, temperature=0, stop=[stop], ignore_eos=True))[0].output
    assert out.text == base.text[:first] and out.finish_reason == "stop" and out.stop_reason == stop
    out = llm.generate(
        ["Hello there"], SamplingParams(max_tokens=30, temperature=0, stop=[stop], include_stop_str_in_output=True, ignore_eos=True)
    )[0].output
    assert out.text == base.text[: first + len(stop)]
    assert llm.engine.block_manager.num_used_blocks == 0  # stopped request was aborted, blocks back


def test_logprobs():
    engine = LLMEngine(EngineConfig(num_kv_blocks=64))
    p = [0, 50, 51, 52, 53]
    res = run_all(engine, {"a": (p, SamplingParams(max_tokens=5, temperature=0, logprobs=3, ignore_eos=True))})["a"]
    lps = [lp for o in res[2] for lp in (o.logprobs or [])]
    assert len(lps) == 5
    for tok, lp in zip(res[0], lps):
        assert lp.token_id == tok and lp.rank == 1  # greedy: the sampled token is the top one
        assert len(lp.top) == 3 and lp.top[0][0] == tok
        assert math.isclose(lp.top[0][1], lp.logprob, rel_tol=1e-6)
        assert lp.top[0][1] >= lp.top[1][1] >= lp.top[2][1]
        assert lp.logprob <= 0
    (logits,) = engine.score([p])
    ref = logits[-1].log_softmax(-1)
    assert math.isclose(lps[0].logprob, ref[res[0][0]].item(), abs_tol=1e-5)


@pytest.mark.parametrize(
    "bad",
    [
        dict(max_tokens=0),
        dict(temperature=-1),
        dict(top_p=0),
        dict(top_p=1.5),
        dict(top_k=-2),
        dict(min_p=2),
        dict(min_tokens=5, max_tokens=2),
        dict(logprobs=50),
        dict(stop_token_ids=[100000]),
        dict(logit_bias={100000: 1.0}),
        dict(logit_bias={5: 101.0}),
        dict(logit_bias={5: float("nan")}),
    ],
)
def test_invalid_params_are_rejected(bad):
    engine = LLMEngine(EngineConfig(num_kv_blocks=64))
    with pytest.raises(ValueError):
        engine.add_request("x", [0, 5, 6], SamplingParams(**bad))
    assert not engine.has_unfinished_requests()


def test_invalid_prompts_are_rejected():
    engine = LLMEngine(EngineConfig(num_kv_blocks=64, max_model_len=64))
    with pytest.raises(ValueError, match="empty"):
        engine.add_request("x", [], SamplingParams())
    with pytest.raises(ValueError, match="context"):
        engine.add_request("x", [5] * 64, SamplingParams())
    with pytest.raises(ValueError, match="token ids"):
        engine.add_request("x", [5, 100000], SamplingParams())
    # a request that would run past the context ends there with "length"
    res = run_all(engine, {"ok": ([5] * 60, SamplingParams(max_tokens=100, ignore_eos=True))})["ok"]
    assert len(res[0]) == 4 and res[1] == "length" and engine.block_manager.num_used_blocks == 0


def test_penalties_on_one_row():
    st = sampling.PenaltyState([0, 1], 5, torch.device("cpu"))
    st.catch_up([2, 2])
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5, 0.0], [2.0, -2.0, 1.0, 0.5, 0.0]])
    sp = SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25)
    sampling.apply_penalties(logits, [1], [st], [sp])
    assert logits[0].tolist() == [2.0, -2.0, 1.0, 0.5, 0.0]  # the row without penalties is untouched
    # seen (prompt: 0, 1; output: 2 twice): divided if positive, multiplied if negative; then the output's
    assert logits[1].tolist() == [1.0, -4.0, 0.5 - 2 * 0.5 - 0.25, 0.5, 0.0]
    st.catch_up([2, 2, 4])  # only the new token is counted
    assert st.counts.tolist() == [0, 0, 2, 0, 1] and st.seen.tolist() == [True, True, True, False, True]


def _penalized_reference(logits: torch.Tensor, prompt: list[int], out: list[int], sp: SamplingParams) -> torch.Tensor:
    x = logits.clone()
    for t in set(prompt) | set(out):
        x[t] = x[t] / sp.repetition_penalty if x[t] > 0 else x[t] * sp.repetition_penalty
    for t in set(out):
        x[t] -= sp.frequency_penalty * out.count(t) + sp.presence_penalty
    return x


def test_greedy_with_penalties_follows_the_reference_and_ignores_the_batch():
    """Each greedy token with penalties is the argmax of the model's logits (scored afresh) penalized
    by a plain reference; a penalized request gives the same tokens alone and among others, and the
    others are untouched by it."""
    rng = random.Random(11)
    prompt = random_prompt(rng, 12)
    sp = SamplingParams(max_tokens=14, temperature=0, ignore_eos=True, repetition_penalty=1.8,
                        frequency_penalty=0.7, presence_penalty=0.4)
    engine = LLMEngine(EngineConfig(num_kv_blocks=128, dtype="float32"))
    alone = run_all(engine, {"p": (prompt, sp)})["p"][0]
    plain = run_all(engine, {"q": (prompt, SamplingParams(max_tokens=14, temperature=0, ignore_eos=True))})["q"][0]
    assert alone != plain  # the penalties changed something
    for t in range(len(alone)):
        (logits,) = engine.score([prompt + alone[:t]])
        assert _penalized_reference(logits[-1], prompt, alone[:t], sp).argmax().item() == alone[t]
    others = {f"o{i}": (random_prompt(rng, 5 + 3 * i), SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))
              for i in range(5)}
    want = {k: v[0] for k, v in run_all(engine, others).items()}
    mixed = run_all(engine, {**others, "p": (prompt, sp)})
    assert mixed["p"][0] == alone and {k: mixed[k][0] for k in others} == want


def test_logit_bias_on_its_rows_only_with_raw_logprobs():
    """``logit_bias`` adds to its row's logits (with penalties, after them) and to no other row; the
    logprobs reported are the raw logits' (vLLM's default)."""
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [2.0, 1.0, 0.0, -1.0], [0.0, 0.0, 3.0, 0.0]])
    params = [SamplingParams(temperature=0, logit_bias={0: -100.0, 3: 2.5}, logprobs=1),
              SamplingParams(temperature=0, logprobs=0),
              SamplingParams(temperature=0, logit_bias={1: 100.0})]
    out = sample(logits.clone(), params, [None] * 3)
    assert out.token_ids == [3, 0, 1]  # row 0: -1 + 2.5 = 1.5 beats 1.0 once 0 is banned
    raw = logits[0].log_softmax(-1)
    assert math.isclose(out.logprobs[0].logprob, raw[3].item(), rel_tol=1e-6) and out.logprobs[0].rank == 4
    assert out.logprobs[0].top == [(0, pytest.approx(raw[0].item(), rel=1e-6))]
    st = sampling.PenaltyState([0], 4, torch.device("cpu"))
    x = torch.tensor([[2.0, 1.9, 0.0, -1.0]])
    sp = SamplingParams(temperature=0, repetition_penalty=2.0, logit_bias={0: 0.5})
    assert sample(x, [sp], [None], ([0], [st])).token_ids == [1]  # 2 / 2 + 0.5 = 1.5 < 1.9


def test_logit_bias_request_same_tokens_alone_and_batched():
    rng = random.Random(5)
    p = random_prompt(rng, 20)
    sp = SamplingParams(max_tokens=20, temperature=1.0, seed=7, ignore_eos=True,
                        logit_bias={t: -100.0 for t in range(40, 90)})
    e1 = LLMEngine(EngineConfig(num_kv_blocks=64))
    alone = run_all(e1, {"a": (p, sp)})["a"][0]
    assert not any(40 <= t < 90 for t in alone)
    e2 = LLMEngine(EngineConfig(num_kv_blocks=256))
    others = {f"o{i}": (random_prompt(rng, 10 + i), SamplingParams(max_tokens=15, temperature=0, ignore_eos=True))
              for i in range(5)}
    want = {k: v[0] for k, v in run_all(e2, others).items()}
    mixed = run_all(e2, {**others, "a": (p, sp)})
    assert mixed["a"][0] == alone and {k: mixed[k][0] for k in others} == want


def _banned_pairs_absent(tokens: list[int], word: list[int]) -> bool:
    return all(tokens[j:j + len(word)] != word for j in range(len(tokens)))


@pytest.mark.parametrize("overlap", ["off", "on"])
def test_allowed_token_ids_and_bad_words_alone_and_batched(overlap):
    """vLLM's allowed_token_ids (only those tokens drawn) and bad_words (a word's last token banned
    where the output ends with the rest of it; one-token words always): greedy and seeded, the same
    tokens alone and in a batch beside requests without them, which keep their own tokens."""
    rng = random.Random(11)
    prompt = random_prompt(rng, 24)
    greedy = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    engine = LLMEngine(EngineConfig(num_kv_blocks=256, async_scheduling=overlap))
    base = run_all(engine, {"b": (prompt, greedy)})["b"][0]
    allowed = sorted({base[3], 7, 40, 77})
    pair = base[4:6]  # a two-token word the plain output writes at 4
    cases = {
        "allowed": SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, allowed_token_ids=allowed),
        "allowed-sampled": SamplingParams(max_tokens=24, temperature=1.0, seed=4, ignore_eos=True,
                                          allowed_token_ids=allowed),
        "one": SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, bad_words_ids=[[base[2]], [base[7]]]),
        "pair": SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, bad_words_ids=[pair]),
        "pair-sampled": SamplingParams(max_tokens=24, temperature=1.0, seed=9, ignore_eos=True,
                                       bad_words_ids=[pair, [base[0]]]),
    }
    alone = {k: run_all(engine, {k: (prompt, sp)})[k][0] for k, sp in cases.items()}
    assert set(alone["allowed"]) <= set(allowed) and set(alone["allowed-sampled"]) <= set(allowed)
    # the same draws as a logit_bias of -100 on every other token (which leaves them a chance of e^-100)
    others_out = {t: -100.0 for t in range(engine.model_config.vocab_size) if t not in allowed}
    for k in ("allowed", "allowed-sampled"):
        biased = msgspec.structs.replace(cases[k], allowed_token_ids=None, logit_bias=others_out)
        assert run_all(engine, {k: (prompt, biased)})[k][0] == alone[k]
    assert base[2] not in alone["one"] and base[7] not in alone["one"] and alone["one"][:2] == base[:2]
    # the pair's first token is still written; the second never follows it
    assert alone["pair"][:5] == base[:5] and alone["pair"][5] != base[5] and _banned_pairs_absent(alone["pair"], pair)
    assert _banned_pairs_absent(alone["pair-sampled"], pair) and base[0] not in alone["pair-sampled"]
    others = {f"o{i}": (random_prompt(rng, 8 + 3 * i), SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
              for i in range(4)}
    want = {k: v[0] for k, v in run_all(engine, others).items()}
    mixed = run_all(engine, {**others, **{k: (prompt, sp) for k, sp in cases.items()}})
    assert {k: mixed[k][0] for k in cases} == alone
    assert {k: mixed[k][0] for k in others} == want
    assert engine.block_manager.num_used_blocks == 0


def test_bad_words_as_text_and_spaced_spellings():
    """Texts alone (the offline API) are tokenized by the engine as vLLM does: the word as written
    and, where a leading space spells it otherwise in as many tokens, that spelling too."""
    engine = LLMEngine(EngineConfig(num_kv_blocks=64))
    tok = engine.tokenizer
    assert tok.bad_words_ids(["ab", "  cd"]) == [tok.encode("ab", add_special_tokens=False),
                                                   tok.encode("cd", add_special_tokens=False)]
    prompt = tok.encode("the cat sat on")
    greedy = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    base = run_all(engine, {"b": (prompt, greedy)})["b"][0]
    word = tok.decode(base[1:3])
    sp = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, bad_words=[word])
    got = run_all(engine, {"w": (prompt, sp)})["w"][0]
    assert sp.bad_words_ids == [tok.encode(word, add_special_tokens=False)]
    assert got[:2] == base[:2] and word not in tok.decode(got)


@pytest.mark.parametrize("bad", [
    dict(allowed_token_ids=[]),
    dict(allowed_token_ids=[5, 100000]),
    dict(bad_words=[""]),
    dict(bad_words_ids=[[]]),
    dict(bad_words_ids=[[5, 100000]]),
    dict(bad_words_ids=[[5]] * 129),
])
def test_bad_allowed_and_bad_words_are_rejected(bad):
    engine = LLMEngine(EngineConfig(num_kv_blocks=64))
    with pytest.raises(ValueError):
        engine.add_request("x", [0, 5, 6], SamplingParams(**bad))
    assert not engine.has_unfinished_requests()


def test_constraints_that_leave_no_token_end_the_request_with_a_clear_error():
    """allowed_token_ids that min_tokens, bad_words or a grammar empty: every logit is -inf, the draw
    lands on a token the request may not have; the request ends there with an error of the client's
    input (a 400 over HTTP), its blocks freed, the batch beside it unharmed."""
    pytest.importorskip("xgrammar")
    from dyn_actor.protocol import StructuredOutput

    engine = LLMEngine(EngineConfig(num_kv_blocks=128))
    eos = engine.eos_token_ids[0]
    x = engine.tokenizer.encode("x", add_special_tokens=False)[0]
    prompt = [0, 5, 6, 7]
    cases = {
        "min-tokens": SamplingParams(max_tokens=8, allowed_token_ids=[eos], min_tokens=3),
        "bad-words": SamplingParams(max_tokens=8, temperature=0, allowed_token_ids=[x], bad_words_ids=[[x]]),
        "grammar": SamplingParams(max_tokens=8, allowed_token_ids=[x, 0], structured=StructuredOutput(choice=["yes"])),
    }
    plain = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    want = run_all(engine, {"p": (prompt, plain)})["p"][0]
    got = run_all(engine, {**{k: (prompt, sp) for k, sp in cases.items()}, "p": (prompt, plain)})
    for k in cases:
        toks, reason, outs = got[k]
        assert reason == "error" and outs[-1].error_type == "ValueError" and "no token is left" in outs[-1].error, k
    assert got["p"][0] == want
    assert engine.block_manager.num_used_blocks == 0 and not engine.has_unfinished_requests()
