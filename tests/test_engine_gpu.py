"""The native engine on a GPU (skipped without one; run by ``scripts/gpu_check.sh``): parity with
transformers, and the same greedy tokens whatever the batch, cache or schedule."""

from __future__ import annotations

import random

import pytest
import torch

from dyn_actor.engine import EngineConfig, LLMEngine, SamplingParams
from tests.helpers import run_all

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
transformers = pytest.importorskip("transformers")

PROMPT_LENS = [3, 16, 37, 70, 97]


def _prompts(vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[0] + [rng.randrange(2, vocab) for _ in range(n - 1)] for n in PROMPT_LENS]


def _engine(model_dir, dtype="float32", **kw) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(model_dir), device="cuda", dtype=dtype,
                                  **{"num_kv_blocks": 256, "max_model_len": 512, **kw}))


def test_float32_greedy_matches_generate_and_bf16_logits_are_close(llama_dir):
    from transformers import AutoModelForCausalLM

    engine = _engine(llama_dir)
    hf = AutoModelForCausalLM.from_pretrained(str(llama_dir), dtype=torch.float32).cuda().eval()
    prompts = _prompts(engine.model_config.vocab_size, seed=1)
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    got = run_all(engine, {str(i): (p, params) for i, p in enumerate(prompts)})
    for i, p in enumerate(prompts):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([p], device="cuda"), max_new_tokens=24, do_sample=False, min_new_tokens=24,
                              pad_token_id=1)[0, len(p):].tolist()
        assert got[str(i)][0] == ref, f"prompt {i} ({len(p)} tokens)"
    bf16 = _engine(llama_dir, dtype="bfloat16")
    for ours, ref in zip(bf16.score(prompts), engine.score(prompts)):
        assert (ours.float() - ref).abs().max().item() < 0.1 * ref.abs().max().item()


def test_float32_tokens_do_not_depend_on_batch_cache_or_schedule(llama_dir):
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    vocab = _engine(llama_dir).model_config.vocab_size
    rng = random.Random(4)
    prompts = {f"r{i}": [0] + [rng.randrange(2, vocab) for _ in range(rng.randint(5, 90))] for i in range(64)}
    alone = {k: run_all(_engine(llama_dir), {k: (p, params)})[k][0] for k, p in list(prompts.items())[:6]}
    batch = run_all(_engine(llama_dir), {k: (p, params) for k, p in prompts.items()})
    assert {k: batch[k][0] for k in alone} == alone
    warm = _engine(llama_dir)  # a prefix-cache hit: the same prompts again
    run_all(warm, {k: (p, params) for k, p in list(prompts.items())[:6]})
    again = run_all(warm, {k: (p, params) for k, p in list(prompts.items())[:6]})
    assert {k: v[0] for k, v in again.items()} == alone
    chunked = run_all(_engine(llama_dir, max_num_batched_tokens=32), {k: (p, params) for k, p in prompts.items()})
    assert {k: chunked[k][0] for k in alone} == alone
    small = _engine(llama_dir, num_kv_blocks=24, max_model_len=128)  # preemption
    tight = run_all(small, {k: (p, params) for k, p in prompts.items()})
    assert {k: tight[k][0] for k in alone} == alone and small.stats().num_preemptions > 0
