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
