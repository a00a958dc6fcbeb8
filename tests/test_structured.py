"""Structured outputs on the native engine: every kind of spec holds the text to it, whatever the
sampler draws; a spec that does not compile ends only its own request; the grammar survives
preemption, overlapped steps and a prefill done by another engine."""

from __future__ import annotations

import json
import random
import re

import pytest
import torch

pytest.importorskip("xgrammar")

from dyn_actor.engine import EngineConfig, LLMEngine, SamplingParams  # noqa: E402
from dyn_actor.engine import structured as st  # noqa: E402
from dyn_actor.protocol import StructuredOutput  # noqa: E402
from tests.helpers import random_prompt, run_all  # noqa: E402

COLORS = ["red", "green", "blue"]
SCHEMA = {
    "type": "object",
    "properties": {
        "ok": {"type": "boolean"},
        "color": {"enum": COLORS},
        "n": {"type": "integer", "minimum": 0, "maximum": 99},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2},
    },
    "required": ["ok", "color", "n", "tags"],
    "additionalProperties": False,
}


def _valid_doc(text: str) -> bool:
    doc = json.loads(text)
    return (set(doc) == {"ok", "color", "n", "tags"} and isinstance(doc["ok"], bool) and doc["color"] in COLORS
            and isinstance(doc["n"], int) and 0 <= doc["n"] <= 99 and len(doc["tags"]) <= 2
            and all(t in ("a", "b") for t in doc["tags"]))


# (spec, check of the whole text): each terminates on any model, so every request must end with "stop"
SPECS = {
    "json": (StructuredOutput(json=json.dumps(SCHEMA)), _valid_doc),
    "json-compact": (StructuredOutput(json=json.dumps(SCHEMA), disable_any_whitespace=True),
                     lambda t: _valid_doc(t) and not re.search(r"\s", t)),
    "regex": (StructuredOutput(regex=r"[a-z]{2,5}-\d{3}"), lambda t: re.fullmatch(r"[a-z]{2,5}-\d{3}", t)),
    "choice": (StructuredOutput(choice=["yes", "no", "it \"depends\""]), lambda t: t in ("yes", "no", 'it "depends"')),
    "ebnf": (StructuredOutput(grammar='root ::= "(" num ("," num)? ")"\nnum ::= [0-9] | [1-9] [0-9]'),
             lambda t: re.fullmatch(r"\((\d|[1-9]\d)(,(\d|[1-9]\d))?\)", t)),
    "lark": (StructuredOutput(grammar='start: "<" WORD ">"\nWORD: /[a-z]{1,6}/'),
             lambda t: re.fullmatch(r"<[a-z]{1,6}>", t)),
    # vLLM's structural tag in xgrammar's format: one tagged part, its content held to the schema
    # (JSON inside a structural tag takes any run of whitespace, as in vLLM: a random model may not end it)
    "structural-tag": (StructuredOutput(structural_tag=json.dumps({"type": "structural_tag", "format": {
        "type": "tag", "begin": "<r>", "content": {"type": "regex", "pattern": r"[a-z]{2,5}-\d{3}"}, "end": "</r>"}})),
        lambda t: re.fullmatch(r"<r>[a-z]{2,5}-\d{3}</r>", t)),
}


@pytest.fixture(scope="module")
def engine() -> LLMEngine:
    e = LLMEngine(EngineConfig(num_kv_blocks=256, max_model_len=512))
    yield e
    e.close()


def _text(engine: LLMEngine, tokens: list[int]) -> str:
    return engine.tokenizer.decode(tokens)


@pytest.mark.parametrize("kind", list(SPECS))
def test_every_draw_keeps_to_the_spec(engine, kind):
    spec, check = SPECS[kind]
    prompt = engine.tokenizer.encode("Answer: ")
    reqs = {f"s{seed}": (prompt, SamplingParams(max_tokens=400, temperature=2.0, seed=seed, structured=spec))
            for seed in range(8)}
    reqs["greedy"] = (prompt, SamplingParams(max_tokens=400, temperature=0.0, structured=spec))
    out = run_all(engine, reqs)
    texts = {rid: _text(engine, toks) for rid, (toks, _, _) in out.items()}
    for rid, (toks, reason, _) in out.items():
        assert reason == "stop" and check(texts[rid]), (rid, texts[rid], reason)
        assert toks[-1] in engine.eos_token_ids  # the grammar ended on end-of-sequence, as it must
    assert len(set(texts.values())) > 1  # the draws differ: the spec, not one fixed answer, made them pass
    assert engine.block_manager.num_used_blocks == 0


def test_unconstrained_draws_would_not_pass(engine):
    """The same seeds without the spec break it: the mask is what the test above sees."""
    prompt = engine.tokenizer.encode("Answer: ")
    reqs = {f"s{seed}": (prompt, SamplingParams(max_tokens=12, temperature=1.0, seed=seed)) for seed in range(8)}
    texts = [_text(engine, toks) for toks, _, _ in run_all(engine, reqs).values()]
    assert not any(re.fullmatch(r"[a-z]{2,5}-\d{3}", t) or t in ("yes", "no") for t in texts)


def test_a_spec_that_does_not_compile_ends_only_its_request(engine):
    prompt = engine.tokenizer.encode("x")
    good = StructuredOutput(choice=["ok"])
    out = run_all(engine, {
        "bad-schema": (prompt, SamplingParams(max_tokens=8, structured=StructuredOutput(json='{"type": "nope"}'))),
        "bad-regex": (prompt, SamplingParams(max_tokens=8, structured=StructuredOutput(regex="a(b"))),
        "good": (prompt, SamplingParams(max_tokens=8, structured=good)),
        "free": (prompt, SamplingParams(max_tokens=8, ignore_eos=True)),
    })
    for rid, needle in (("bad-schema", 'Unsupported type "nope"'), ("bad-regex", "parenthesis")):
        toks, reason, outs = out[rid]
        assert toks == [] and reason == "error" and needle in outs[-1].error
        assert outs[-1].error_type == "ValueError"  # the client's input: a 400 over HTTP
    assert _text(engine, out["good"][0]) == "ok" and out["good"][1] == "stop"
    assert len(out["free"][0]) == 8
    assert engine.block_manager.num_used_blocks == 0 and not engine.has_unfinished_requests()


def test_aborted_while_compiling(engine):
    spec = StructuredOutput(json=json.dumps({**SCHEMA, "title": "fresh"}))  # not in the compiler's cache
    engine.add_request("gone", engine.tokenizer.encode("x"), SamplingParams(structured=spec))
    assert engine.abort_request("gone")
    assert not engine.has_unfinished_requests() and "gone" not in engine.requests
    assert engine.step() == [] and engine.block_manager.num_used_blocks == 0


def test_the_gpu_mask_path_masks_as_xgrammar_does(engine):
    """The device path (bitmask unpacked with torch) against xgrammar's CPU kernel, on CPU tensors."""
    g = engine.grammars
    choice = st.GrammarState(g.compile(StructuredOutput(choice=["abc", "abd"])))
    choice.sync(engine.tokenizer.encode("ab", add_special_tokens=False))
    fresh = st.GrammarState(g.compile(SPECS["json"][0]))
    fresh.sync([])
    states = [choice, fresh]
    logits = torch.randn(5, engine.model_config.vocab_size, generator=torch.Generator().manual_seed(0))
    a, b = logits.clone(), logits.clone()
    g.apply(a, [1, 3], states)
    g.torch_masks = True
    try:
        g.apply(b, [1, 3], states)
    finally:
        g.torch_masks = False
    assert torch.equal(a, b)
    assert torch.equal(a[[0, 2, 4]], logits[[0, 2, 4]])  # other rows untouched
    allowed = {engine.tokenizer.decode([i]) for i in torch.nonzero(a[1] > -1e30).flatten().tolist()}
    assert allowed == {"c", "d"}
    assert {engine.tokenizer.decode([i]) for i in torch.nonzero(a[3] > -1e30).flatten().tolist()} == {"{"}


def test_grammar_survives_preemption():
    e = LLMEngine(EngineConfig(num_kv_blocks=14, max_model_len=128, max_num_seqs=8))
    try:
        spec = StructuredOutput(regex=r"[a-z]{60}")
        rng = random.Random(3)
        reqs = {f"r{i}": (random_prompt(rng, 20), SamplingParams(max_tokens=100, temperature=1.0, seed=i,
                                                                 structured=spec)) for i in range(6)}
        out = run_all(e, reqs)
        assert e.stats().num_preemptions > 0
        for toks, reason, _ in out.values():
            assert reason == "stop" and re.fullmatch(r"[a-z]{60}", _text(e, toks))
        assert e.block_manager.num_used_blocks == 0
    finally:
        e.close()


def test_min_tokens_and_ignore_eos_leave_the_end_to_the_grammar(engine):
    prompt = engine.tokenizer.encode("x")
    out = run_all(engine, {
        "min": (prompt, SamplingParams(max_tokens=50, min_tokens=20, structured=StructuredOutput(choice=["ab", "cd"]))),
        "ign": (prompt, SamplingParams(max_tokens=50, ignore_eos=True, structured=StructuredOutput(regex=r"\d{4}"))),
    })
    assert _text(engine, out["min"][0]) in ("ab", "cd") and out["min"][1] == "stop"
    assert re.fullmatch(r"\d{4}", _text(engine, out["ign"][0])) and out["ign"][1] == "stop"


def test_logprobs_of_masked_tokens_are_finite(engine):
    out = run_all(engine, {"r": (engine.tokenizer.encode("x"), SamplingParams(
        max_tokens=10, temperature=0, logprobs=5, structured=StructuredOutput(choice=["yes", "no"])))})
    toks, _, outs = out["r"]
    lps = [lp for o in outs for lp in (o.logprobs or [])]
    assert len(lps) == len(toks)
    for lp in lps:
        assert lp.logprob > -9999.0  # the drawn token was allowed
        assert all(v >= -9999.0 for _, v in lp.top)  # the masked ones among the top five: -9999, as vLLM
    assert any(v == -9999.0 for lp in lps for _, v in lp.top)


def test_overlapped_steps_with_grammar_rows_beside_free_ones():
    """A step with a grammar row is not queued ahead of its token; the free rows' tokens are those
    of the stepwise engine."""
    rng = random.Random(5)
    prompts = [random_prompt(rng, n) for n in (9, 30, 17)]
    spec = StructuredOutput(regex=r"[0-9]{3}(-[0-9]{3}){2}")

    def run(mode):
        e = LLMEngine(EngineConfig(num_kv_blocks=128, max_model_len=256, async_scheduling=mode))
        try:
            reqs = {f"free{i}": (p, SamplingParams(max_tokens=24, temperature=1.0, seed=i, ignore_eos=True))
                    for i, p in enumerate(prompts)}
            reqs.update({f"g{i}": (p, SamplingParams(max_tokens=40, temperature=1.0, seed=i, structured=spec))
                         for i, p in enumerate(prompts)})
            out = run_all(e, reqs)
            return {rid: _text(e, toks) for rid, (toks, _, _) in out.items()}, e.overlapped_steps
        finally:
            e.close()

    stepwise, _ = run("off")
    overlapped, n = run("on")
    assert overlapped == stepwise
    assert all(re.fullmatch(r"[0-9]{3}(-[0-9]{3}){2}", overlapped[f"g{i}"]) for i in range(3))
    assert n > 0  # steps without grammar rows (after those ended) still overlapped


def test_prefilled_elsewhere_the_grammar_carries_on():
    """A decode engine whose prompt KV and first token come from a prefill engine (disaggregation's
    hooks): the prefill side draws the first token under the grammar, the decode side's grammar
    takes it and goes on; greedy, the text is the local one."""
    spec = StructuredOutput(regex=r"[a-z]{3}-[0-9]{4}")
    params = SamplingParams(max_tokens=30, temperature=0, structured=spec)
    prompt = random_prompt(random.Random(8), 37)
    local = LLMEngine(EngineConfig(num_kv_blocks=64, max_model_len=512))
    want = run_all(local, {"r": (prompt, params)})["r"][0]
    local.close()
    decode = LLMEngine(EngineConfig(num_kv_blocks=64, max_model_len=512))
    prefill = LLMEngine(EngineConfig(num_kv_blocks=64, max_model_len=512))
    try:
        alloc = decode.allocate_remote_prefill("r", prompt, params)
        prefill.add_request("p", prompt, SamplingParams(max_tokens=1, temperature=0, structured=spec), hold_blocks=True)
        firsts = []
        while prefill.has_unfinished_requests():
            firsts += [t for o in prefill.step() for t in o.new_token_ids]
        decode.pool.write_blocks(alloc.block_ids, prefill.pool.read_blocks(prefill.block_ids("p")))
        assert prefill.release_blocks("p")
        tok, = firsts
        assert re.fullmatch("[a-z]", _text(decode, [tok]))  # the prefill side's draw kept to the grammar
        out = decode.finish_remote_prefill("r", tok)
        tokens = list(out.new_token_ids)
        while decode.has_unfinished_requests():
            for o in decode.step():
                tokens.extend(o.new_token_ids)
        assert tokens == want and re.fullmatch(r"[a-z]{3}-[0-9]{4}", _text(decode, tokens))
        assert decode.block_manager.num_used_blocks == 0
    finally:
        decode.close()
        prefill.close()


def test_a_grammar_that_starts_after_the_reasoning(engine):
    """``start_after`` (a reasoning model's "</think>"): the output is drawn free until it holds those
    ids (the same tokens as without the spec, seed for seed), then held to the spec; ids that never
    come leave the whole output free."""
    prompt = engine.tokenizer.encode("Think: ")
    regex = r"[0-9]{2}-[a-z]{2}"
    for seed in range(4):
        common = dict(max_tokens=60, temperature=1.5, seed=seed, ignore_eos=True)
        free = run_all(engine, {"f": (prompt, SamplingParams(**common))})["f"][0]
        after = free[5:7]
        end = next(e for e in range(2, len(free) + 1) if free[e - 2:e] == after)
        spec = StructuredOutput(regex=regex, start_after=after)
        got, reason, _ = run_all(engine, {"c": (prompt, SamplingParams(**common, structured=spec))})["c"]
        assert got[:end] == free[:end], seed
        assert reason == "stop" and got[-1] in engine.eos_token_ids, (seed, reason)
        assert re.fullmatch(regex, _text(engine, got[end:-1])), (seed, _text(engine, got[end:]))
        assert not re.fullmatch(regex, _text(engine, free[end:end + 5]))  # the spec made that part
    never = [t for t in range(2, 12) if t not in free][:3]
    spec = StructuredOutput(regex=regex, start_after=never)
    got, reason, _ = run_all(engine, {"n": (prompt, SamplingParams(**common, structured=spec))})["n"]
    assert got == free and reason == "length"
    assert engine.block_manager.num_used_blocks == 0


def test_without_xgrammar_a_structured_request_is_refused(engine, monkeypatch):
    monkeypatch.setattr(st, "available", lambda: False)
    with pytest.raises(ValueError, match="xgrammar"):
        engine.add_request("nx", engine.tokenizer.encode("x"), SamplingParams(structured=StructuredOutput(regex="a")))
    assert not engine.has_unfinished_requests()


def test_the_engine_thread_wakes_when_a_grammar_is_compiled(monkeypatch):
    """An idle engine thread sleeps until woken: a grammar compiled on its own thread must wake it
    (the idle wait made long here, so only the wake-up can finish the request in time)."""
    import asyncio
    import time

    from dyn_actor.components.engine_thread import EngineThread

    monkeypatch.setattr(EngineThread, "IDLE_WAIT", 60.0)
    compile_ = st.Grammars._compile

    def slow(self, spec):  # a compile that is surely still running when the thread goes idle
        time.sleep(0.3)
        return compile_(self, spec)

    monkeypatch.setattr(st.Grammars, "_compile", slow)
    e = LLMEngine(EngineConfig(num_kv_blocks=64, max_model_len=256))
    spec = StructuredOutput(choice=["woken"])

    async def main():
        done = asyncio.get_running_loop().create_future()

        def on_outputs(outs):
            if any(o.finished for o in outs) and not done.done():
                done.set_result(outs[-1])

        thread = EngineThread(e, asyncio.get_running_loop(), on_outputs)
        thread.start()
        try:
            await thread.submit(lambda eng: eng.add_request("w", eng.tokenizer.encode("x"), SamplingParams(
                max_tokens=200, temperature=1.0, seed=1, structured=spec)))
            return await asyncio.wait_for(done, timeout=30)
        finally:
            thread.stop()

    try:
        out = asyncio.run(main())
        assert out.finish_reason == "stop"
    finally:
        e.close()


def test_structural_tag_with_triggers_holds_each_tagged_part(engine):
    """vLLM's older structural tag: free text, in which each trigger ("<") opens a part that must be
    begin + a document of the schema + end. The free text is drawn with "<" made likely, so parts
    open; every "<" of the output opens a whole part (the last may be cut by max_tokens)."""
    tag = {"type": "structural_tag", "triggers": ["<"],
           "structures": [{"begin": "<f>", "schema": {"enum": COLORS}, "end": "</f>"}]}
    spec = StructuredOutput(structural_tag=json.dumps(tag))
    lt = engine.tokenizer.encode("<", add_special_tokens=False)[0]
    prompt = engine.tokenizer.encode("Answer: ")
    reqs = {f"s{seed}": (prompt, SamplingParams(max_tokens=300, temperature=1.0, seed=seed, structured=spec,
                                                logit_bias={lt: 3.0}, ignore_eos=True)) for seed in range(4)}
    whole = re.compile(r'<f>"(?:red|green|blue)"</f>')
    parts = 0
    for rid, (toks, _, _) in run_all(engine, reqs).items():
        text = _text(engine, toks)
        parts += len(whole.findall(text))
        rest = whole.sub("", text)
        if "<" in rest:  # only a part that max_tokens cut, at the very end
            tail = rest[rest.index("<"):]
            assert text.endswith(tail) and any(f'<f>"{c}"</f>'.startswith(tail) for c in COLORS), (rid, text)
    assert parts >= 2
