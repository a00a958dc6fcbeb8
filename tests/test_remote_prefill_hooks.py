"""The engine hooks that disaggregated serving is built on, driven by hand between two engines."""

from __future__ import annotations

import random

import pytest
import torch

from dyn_actor.engine import EngineConfig, LLMEngine, SamplingParams
from tests.helpers import random_prompt, run_all

PARAMS = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


def _engine(**kw) -> LLMEngine:
    return LLMEngine(EngineConfig(num_kv_blocks=64, max_model_len=512, **kw))


def _prefill_elsewhere(prefill: LLMEngine, rid: str, prompt: list[int]) -> tuple[int, torch.Tensor]:
    prefill.add_request(rid, prompt, SamplingParams(max_tokens=1, temperature=0), hold_blocks=True)
    first = None
    while prefill.has_unfinished_requests():
        for out in prefill.step():
            first = out.new_token_ids[0]
    kv = prefill.pool.read_blocks(prefill.block_ids(rid))
    assert prefill.release_blocks(rid)
    assert prefill.block_manager.num_used_blocks == 0
    return first, kv


def _decode_after_remote(decode: LLMEngine, rid: str, prompt: list[int], prefill: LLMEngine) -> list[int]:
    alloc = decode.allocate_remote_prefill(rid, prompt, PARAMS)
    assert alloc is not None and len(alloc.block_ids) == -(-len(prompt) // 16)
    first, kv = _prefill_elsewhere(prefill, rid, prompt)
    skip = alloc.num_cached_tokens // 16  # blocks the decode side already has
    decode.pool.write_blocks(alloc.block_ids[skip:], kv[skip:])
    out = decode.finish_remote_prefill(rid, first)
    tokens = list(out.new_token_ids)
    while decode.has_unfinished_requests():
        for o in decode.step():
            tokens.extend(o.new_token_ids)
    return tokens


@pytest.mark.parametrize("n", [5, 16, 37, 64])
def test_externally_filled_blocks_continue_like_local(n):
    prompt = random_prompt(random.Random(n), n)
    local = run_all(_engine(), {"r": (prompt, PARAMS)})["r"][0]
    decode, prefill = _engine(), _engine()
    assert _decode_after_remote(decode, "r", prompt, prefill) == local
    assert decode.block_manager.num_used_blocks == 0


def test_remote_prefill_reuses_decode_side_prefix_cache():
    rng = random.Random(1)
    shared = random_prompt(rng, 40)
    prompt = shared + [rng.randrange(2, 99) for _ in range(20)]
    local = run_all(_engine(), {"r": (prompt, PARAMS)})["r"][0]
    decode, prefill = _engine(), _engine()
    run_all(decode, {"warm": (shared, SamplingParams(max_tokens=1))})
    assert decode.cached_prefix(prompt)[1] == 32  # two full blocks of the shared part
    alloc = decode.allocate_remote_prefill("probe", prompt, PARAMS)
    assert alloc.num_cached_tokens == 32
    decode.abort_request("probe")
    assert _decode_after_remote(decode, "r", prompt, prefill) == local


def test_failed_remote_prefill_falls_back_to_local():
    prompt = random_prompt(random.Random(2), 50)
    local = run_all(_engine(), {"r": (prompt, PARAMS)})["r"][0]
    decode = _engine()
    assert decode.allocate_remote_prefill("r", prompt, PARAMS) is not None
    assert not decode.has_work()  # waiting for the KV, nothing to compute
    assert decode.fail_remote_prefill("r")
    tokens = []
    while decode.has_unfinished_requests():
        for o in decode.step():
            tokens.extend(o.new_token_ids)
    assert tokens == local and decode.block_manager.num_used_blocks == 0


def test_abort_while_waiting_for_remote_kv_frees_blocks():
    decode = _engine()
    assert decode.allocate_remote_prefill("r", list(range(2, 60)), PARAMS) is not None
    assert decode.block_manager.num_used_blocks == 4
    assert decode.abort_request("r")
    assert decode.block_manager.num_used_blocks == 0 and not decode.has_unfinished_requests()
    assert decode.finish_remote_prefill("r", 5) is None  # a late notification is ignored


def test_allocation_refused_when_pool_is_full():
    decode = LLMEngine(EngineConfig(num_kv_blocks=8, max_model_len=128))
    assert decode.allocate_remote_prefill("a", [5] * 98, PARAMS) is not None  # 7 blocks
    assert decode.allocate_remote_prefill("b", [6] * 38, PARAMS) is None
    assert "b" not in decode.requests


def test_raw_block_bytes_round_trip():
    a, b = _engine(), _engine()
    prompt = random_prompt(random.Random(3), 33)
    _, kv = _prefill_elsewhere(a, "x", prompt)
    raw = a.pool.block_bytes([0, 1, 2])
    assert len(raw) == 3 * a.layout.block_nbytes
    b.pool.write_block_bytes([5, 6, 7], raw)
    assert torch.equal(b.pool.read_blocks([5, 6, 7]), a.pool.read_blocks([0, 1, 2]))
    with pytest.raises(ValueError):
        b.pool.write_block_bytes([1], raw)


def test_prefill_side_reads_the_decode_sides_prefix_instead_of_recomputing_it():
    rng = random.Random(3)
    shared = random_prompt(rng, 40)
    prompt = shared + [rng.randrange(2, 99) for _ in range(20)]
    local = run_all(_engine(), {"r": (prompt, PARAMS)})["r"][0]

    def run(read) -> tuple[list[int], int]:
        decode, prefill = _engine(), _engine()
        run_all(decode, {"warm": (shared, SamplingParams(max_tokens=1))})
        alloc = decode.allocate_remote_prefill("r", prompt, PARAMS)
        k = alloc.num_cached_tokens // 16
        assert k == 2
        assert prefill.import_prefix(prompt, k, lambda idx: read(decode, [alloc.block_ids[i] for i in idx])).__len__() == 2
        assert prefill.import_prefix(prompt, k, lambda idx: pytest.fail("read again")) == []
        first, kv = _prefill_elsewhere(prefill, "r", prompt)
        decode.pool.write_blocks(alloc.block_ids[k:], kv[k:])
        tokens = list(decode.finish_remote_prefill("r", first).new_token_ids)
        while decode.has_unfinished_requests():
            for o in decode.step():
                tokens.extend(o.new_token_ids)
        return tokens, prefill.stats().prefix_cache_hit_tokens

    tokens, hit = run(lambda d, ids: d.pool.read_blocks(ids))
    assert hit == 32 and tokens == local  # 32 tokens read, not computed, and the same answer
    # the imported KV really is what the prefill used: garbage in gives another answer
    tokens, hit = run(lambda d, ids: torch.randn_like(d.pool.read_blocks(ids)) * 10)
    assert hit == 32 and tokens != local
