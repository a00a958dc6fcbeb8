"""A step that raises ends only the requests of its batch; the engine and the other requests go on."""

from __future__ import annotations

from dyn_actor.engine import EngineConfig, LLMEngine, SamplingParams
from tests.helpers import fail_forward_once

GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)


def test_a_failing_step_ends_only_its_batch():
    engine = LLMEngine(EngineConfig(num_kv_blocks=64, max_model_len=512, max_num_seqs=2))
    for rid in ("a", "b", "c"):  # two fit in a batch: c waits
        engine.add_request(rid, [0, 5, 6, 7], GREEDY)
    first = engine.step()
    assert sorted(o.request_id for o in first) == ["a", "b"]
    fail_forward_once(engine)
    failed = engine.step()
    assert sorted(o.request_id for o in failed) == ["a", "b"]
    assert all(o.finished and o.finish_reason == "error" and "illegal memory access" in o.error for o in failed)
    tokens = []
    while engine.has_unfinished_requests():
        for o in engine.step():
            assert o.request_id == "c" and o.error is None
            tokens.extend(o.new_token_ids)
    assert len(tokens) == 6
    assert engine.block_manager.num_used_blocks == 0
