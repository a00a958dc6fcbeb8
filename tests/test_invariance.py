"""Greedy tokens do not depend on batching, caching, preemption or chunking."""

from __future__ import annotations

import random

import pytest

from dyn_actor.engine import EngineConfig, LLMEngine, SamplingParams
from tests.helpers import random_prompt, run_all

GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
LENGTHS = [1, 5, 15, 16, 17, 31, 32, 40, 47, 64, 70, 3, 9, 26, 50, 80]  # 16 mixed lengths


@pytest.fixture(scope="module")
def prompts():
    rng = random.Random(7)
    return [random_prompt(rng, n) for n in LENGTHS]


@pytest.fixture(scope="module")
def alone(prompts):
    out = []
    for p in prompts:
        engine = LLMEngine(EngineConfig(num_kv_blocks=64, max_model_len=512))
        out.append(run_all(engine, {"x": (p, GREEDY)})["x"][0])
    return out


def test_batch_of_16_matches_alone(prompts, alone):
    engine = LLMEngine(EngineConfig(num_kv_blocks=256, max_model_len=512))
    got = run_all(engine, {str(i): (p, GREEDY) for i, p in enumerate(prompts)})
    for i in range(len(prompts)):
        assert got[str(i)][0] == alone[i], f"prompt {i} ({len(prompts[i])} tokens)"
    assert engine.block_manager.num_used_blocks == 0


def test_prefix_cache_hit_matches(prompts, alone):
    engine = LLMEngine(EngineConfig(num_kv_blocks=256, max_model_len=512))
    for i, p in enumerate(prompts):
        run_all(engine, {f"warm{i}": (p, GREEDY)})
    before = engine.stats().prefix_cache_hit_tokens
    got = run_all(engine, {str(i): (p, GREEDY) for i, p in enumerate(prompts)})
    assert engine.stats().prefix_cache_hit_tokens > before  # the second pass really hit the cache
    hits = {rid: outs[-1].num_cached_tokens for rid, (_, _, outs) in got.items()}
    assert hits["9"] == 48  # 64-token prompt: 3 full blocks reused, the 4th holds the last token
    for i in range(len(prompts)):
        assert got[str(i)][0] == alone[i]
    # a prompt that extends a cached one (a multi-turn conversation) also matches
    p = prompts[9] + alone[9] + [5, 6, 7]
    fresh = run_all(LLMEngine(EngineConfig(num_kv_blocks=64, max_model_len=512)), {"x": (p, GREEDY)})["x"][0]
    assert run_all(engine, {"y": (p, GREEDY)})["y"][0] == fresh


def test_chunked_prefill_matches(prompts, alone):
    engine = LLMEngine(EngineConfig(num_kv_blocks=256, max_model_len=512, max_num_batched_tokens=24))
    got = run_all(engine, {str(i): (p, GREEDY) for i, p in enumerate(prompts)})
    for i in range(len(prompts)):
        assert got[str(i)][0] == alone[i]


def test_preemption_and_recompute_matches(prompts, alone):
    # 16 requests of up to 104 tokens need far more than 20 blocks at once
    engine = LLMEngine(EngineConfig(num_kv_blocks=20, max_model_len=300, enable_prefix_caching=False))
    got = run_all(engine, {str(i): (p, GREEDY) for i, p in enumerate(prompts)})
    assert engine.stats().num_preemptions > 0
    for i in range(len(prompts)):
        assert got[str(i)][0] == alone[i]
    assert engine.block_manager.num_used_blocks == 0


def test_fresh_prompt_groups():
    from dyn_actor.engine.model import PrefillSeq, fresh_prompt_groups

    def seq(start, length, ctx=0):
        return PrefillSeq(start, length, ctx, None, None)  # type: ignore[arg-type]

    seqs = [seq(0, 64), seq(64, 30), seq(94, 32), seq(126, 5, ctx=16), seq(131, 32), seq(163, 64), seq(227, 1)]
    groups = [[p.length for p in g] for g in fresh_prompt_groups(seqs)]
    # sorted by length; the 5-token chunk after a cached prefix is not fresh; 1 would pad 30x; 64 alone
    # next to three 30-32s would pad too much; the two 64s share a call
    assert groups == [[1], [30, 32, 32], [64, 64]]


def test_batched_fresh_prompts_match_alone():
    """Prompts prefilled together (equal lengths viewed in place, near-equal ones padded) give the
    logits they give alone, at every position."""
    rng = random.Random(3)
    prompts = [random_prompt(rng, n) for n in (30, 32, 32, 31, 64, 64, 7)]
    engine = LLMEngine(EngineConfig(num_kv_blocks=128, max_model_len=256))
    together = engine.score(prompts)
    for p, got in zip(prompts, together):
        alone_logits = engine.score([p])[0]
        assert got.shape == alone_logits.shape
        assert (got - alone_logits).abs().max().item() < 1e-5
    assert engine.block_manager.num_used_blocks == 0
