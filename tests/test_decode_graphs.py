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


def test_graph_replay_gives_the_eager_tokens():
    rng = random.Random(2)
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    jobs = {f"r{i}": ([0] + [rng.randrange(2, 99) for _ in range(rng.randint(3, 60))], params) for i in range(7)}

    def run(graphs: str, blocks: int):
        engine = LLMEngine(EngineConfig(dtype="float32", max_model_len=96, num_kv_blocks=blocks, cuda_graphs=graphs,
                                        max_num_seqs=8))
        return {k: v[0] for k, v in run_all(engine, jobs).items()}, engine

    want, _ = run("off", 64)
    got, engine = run("on", 64)
    assert got == want
    assert engine.pool.layout.num_blocks == 65 and engine.block_manager.num_blocks == 64  # + the scratch block
    tight, engine = run("on", 14)  # preemption on the way
    assert tight == want and engine.stats().num_preemptions > 0


def test_graph_rows_follow_requests_that_come_and_go():
    """Requests finish at different steps and new ones take their rows, sequences cross block
    boundaries and get preempted: the host table, written only where a row lacks entries, must
    always hold each row's own blocks (a stale entry would read another request's KV)."""
    rng = random.Random(5)
    jobs = {f"r{i}": ([0] + [rng.randrange(2, 99) for _ in range(rng.randint(2, 50))],
                      SamplingParams(max_tokens=rng.randint(3, 45), temperature=0, ignore_eos=True))
            for i in range(20)}

    def run(graphs: str, blocks: int):
        engine = LLMEngine(EngineConfig(dtype="float32", max_model_len=128, num_kv_blocks=blocks, cuda_graphs=graphs,
                                        max_num_seqs=6))
        return {k: v[0] for k, v in run_all(engine, jobs).items()}, engine

    want, _ = run("off", 128)
    got, _ = run("on", 128)
    assert got == want
    tight, engine = run("on", 16)
    assert tight == want and engine.stats().num_preemptions > 0
    assert engine.block_manager.num_used_blocks == 0
