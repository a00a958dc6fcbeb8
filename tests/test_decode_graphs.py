"""Decode steps from bucketed graphs: on the CPU the runner replays eagerly, so its bucketing,
padding (rows in a scratch block) and static buffers are checked here; the capture itself runs
on a GPU (``tests/test_engine_gpu.py``)."""

from __future__ import annotations

import random

from dyn_actor.engine import EngineConfig, LLMEngine, SamplingParams
from dyn_actor.engine.cuda_graphs import graph_buckets
from tests.helpers import run_all


def test_buckets():
    assert graph_buckets(1) == [1]
    assert graph_buckets(6) == [1, 2, 4, 6]
    assert graph_buckets(128)[:6] == [1, 2, 4, 8, 16, 24] and graph_buckets(128)[-1] == 128
    assert graph_buckets(10_000)[-1] == 512


def _tokens(jobs: dict, graphs: str, blocks: int, max_model_len: int, max_num_seqs: int):
    """Each job's greedy tokens from a fresh engine (graphs ``on``: the runner, eager off a GPU), and the engine."""
    engine = LLMEngine(EngineConfig(dtype="float32", max_model_len=max_model_len, num_kv_blocks=blocks,
                                    cuda_graphs=graphs, max_num_seqs=max_num_seqs))
    return {k: v[0] for k, v in run_all(engine, jobs).items()}, engine


def test_graph_replay_gives_the_eager_tokens():
    rng = random.Random(2)
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    jobs = {f"r{i}": ([0] + [rng.randrange(2, 99) for _ in range(rng.randint(3, 60))], params) for i in range(7)}
    want, _ = _tokens(jobs, "off", 64, 96, 8)
    got, engine = _tokens(jobs, "on", 64, 96, 8)
    assert got == want
    assert engine.pool.layout.num_blocks == 65 and engine.block_manager.num_blocks == 64  # + the scratch block
    tight, engine = _tokens(jobs, "on", 14, 96, 8)  # preemption on the way
    assert tight == want and engine.stats().num_preemptions > 0


def test_graph_rows_follow_requests_that_come_and_go():
    """Requests finish at different steps and new ones take their rows, sequences cross block
    boundaries and get preempted: the host table, written only where a row lacks entries, must
    always hold each row's own blocks (a stale entry would read another request's KV)."""
    rng = random.Random(5)
    jobs = {f"r{i}": ([0] + [rng.randrange(2, 99) for _ in range(rng.randint(2, 50))],
                      SamplingParams(max_tokens=rng.randint(3, 45), temperature=0, ignore_eos=True))
            for i in range(20)}
    want, _ = _tokens(jobs, "off", 128, 128, 6)
    got, _ = _tokens(jobs, "on", 128, 128, 6)
    assert got == want
    tight, engine = _tokens(jobs, "on", 16, 128, 6)
    assert tight == want and engine.stats().num_preemptions > 0
    assert engine.block_manager.num_used_blocks == 0


def test_token_buckets_for_prompt_steps():
    from dyn_actor.engine.piecewise import token_buckets

    assert token_buckets(1024) == [8, 16, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024]
    assert token_buckets(8192)[-1] == 1024 and token_buckets(100)[-1] == 100 and token_buckets(5) == [5]
    b = token_buckets(1024)
    assert all(hi <= 2 * lo for lo, hi in zip(b, b[1:]))  # a step is padded by less than its own size
