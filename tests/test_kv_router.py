"""The KV-aware router's pure parts: the index, the cost function and choice, event streams."""

from __future__ import annotations

import random
from collections import Counter as Tally

from dyn_actor.kv.block_hash import hash_blocks
from dyn_actor.kv.block_manager import BlockManager
from dyn_actor.kv.events import AllBlocksCleared, BlockRemoved, BlockStored, KvEventBatch, KvSnapshot, WorkerLoad
from dyn_actor.kv.index import KvIndex
from dyn_actor.router import Router, choose, kv_cost

BS = 4


def _prompt(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1, 1000) for _ in range(n)]


# ------------------------------------------------------------------------------ index
def test_index_matching_counts_leading_blocks_per_worker():
    idx = KvIndex()
    p = hash_blocks(_prompt(1, 40), BS)  # 10 blocks
    idx.store("a", p[:6])
    idx.store("b", p[:2])
    idx.store("c", p[3:8])  # not a prefix: holds nothing that leads
    idx.store("d", p)
    assert idx.overlaps(p) == {"a": 6, "b": 2, "d": 10}
    assert idx.overlaps(p[:1]) == {"a": 1, "b": 1, "d": 1}
    assert idx.overlaps(hash_blocks(_prompt(2, 40), BS)) == {}
    assert idx.overlaps([]) == {}
    assert idx.num_blocks == 10


def test_index_remove_and_worker_removal():
    idx = KvIndex()
    p = hash_blocks(_prompt(3, 32), BS)
    idx.store("a", p)
    idx.store("b", p[:4])
    idx.remove("a", [p[2]])  # a hole: a's match stops before it
    assert idx.overlaps(p) == {"a": 2, "b": 4}
    idx.remove("b", [p[0]] + [12345])  # unknown hashes are ignored
    assert idx.overlaps(p) == {"a": 2}
    assert idx.remove_worker("a") == 7
    assert idx.overlaps(p) == {} and idx.num_blocks == 3  # b still holds blocks 1..3
    idx.remove_worker("b")
    assert idx.num_blocks == 0 and idx.workers() == []


def test_index_agrees_with_a_real_block_manager():
    """The router hashes prompts with the engine's function: a block manager's events, applied to
    the index, give the same match as the block manager's own prefix lookup."""
    bm = BlockManager(num_blocks=64, block_size=BS)
    idx = KvIndex()
    rng = random.Random(4)
    prompts = [_prompt(i, rng.randrange(5, 60)) for i in range(30)]
    for i, p in enumerate(prompts):
        hits = bm.find_cached_prefix(p)
        assert bm.allocate(f"r{i}", len(p), hits) is not None
        bm.cache_full_blocks(f"r{i}", p, len(p))
        bm.free(f"r{i}")
        for ev in bm.drain_events():
            if isinstance(ev, BlockStored):
                idx.store("w", ev.block_hashes)
            elif isinstance(ev, BlockRemoved):
                idx.remove("w", ev.block_hashes)
    for p in prompts:
        assert idx.overlaps(hash_blocks(p, BS)).get("w", 0) == len(bm.find_cached_prefix(p))
    assert sorted(idx._by_worker["w"]) == sorted(bm.cached_hashes())


# ---------------------------------------------------------------------- cost / choice
def test_overlap_beats_load_until_the_load_gap_is_large():
    prompt_blocks = 20
    cached = kv_cost(18, prompt_blocks, 0, active_blocks=10)  # holds 18 of 20 blocks, a little busier
    cold = kv_cost(0, prompt_blocks, 0, active_blocks=0)
    assert cached < cold
    busy_cached = kv_cost(18, prompt_blocks, 0, active_blocks=40)  # load gap larger than the saving
    assert busy_cached > cold
    # pending prefill work counts like the request's own prefill
    assert kv_cost(0, 4, pending_prefill_blocks=30, active_blocks=0) > kv_cost(0, 4, 0, active_blocks=30) - 1
    # the weight trades prefill against decode load
    assert kv_cost(18, 20, 0, 10, overlap_weight=0.1) > kv_cost(0, 20, 0, 0, overlap_weight=0.1)


def test_ties_spread_and_temperature_samples():
    rng = random.Random(0)
    picks = Tally(choose({"a": 5.0, "b": 5.0, "c": 5.0}, 0.0, rng) for _ in range(300))
    assert set(picks) == {"a", "b", "c"} and min(picks.values()) > 60
    assert {choose({"a": 1.0, "b": 2.0}, 0.0, rng) for _ in range(50)} == {"a"}
    warm = Tally(choose({"a": 1.0, "b": 2.0}, 1.0, rng) for _ in range(1000))
    assert warm["a"] > warm["b"] > 100  # softmax: mostly the cheaper one, sometimes the other


def _kv_router(*names: str) -> Router:
    r = Router("kv", block_size=BS, seed=0)
    for n in names:
        r.add_worker(n, None)
        r.apply(WorkerLoad(n, 0, BS, 0, 100, 0, 0), now=0.0)
        r.apply_snapshot(KvSnapshot(n, 0, BS, []))
    return r


def test_kv_router_prefers_the_cached_worker_and_counts_its_own_load():
    r = _kv_router("a", "b", "c")
    conv = _prompt(5, 64)  # 16 blocks
    r.apply(KvEventBatch("b", 1, BS, [BlockStored(hash_blocks(conv, BS), None, conv, BS)]))
    route = r.pick(conv + [7, 7, 7])
    assert route.entry.name == "b" and route.overlap_blocks == 16
    # unique prompts spread: the router's own in-flight load breaks the ties
    counts = Tally()
    routes = []
    for i in range(30):
        rt = r.pick(_prompt(200 + i, 40))
        r.begin(rt)
        routes.append(rt)
        counts[rt.entry.name] += 1
    assert counts == {"a": 10, "b": 10, "c": 10}
    for rt in routes:
        r.end(rt)
    assert all(e.active_blocks == 0 and e.pending_prefill_blocks == 0 for e in r.workers.values())


def test_busy_workers_are_skipped_while_others_have_room():
    r = _kv_router("a", "b")
    conv = _prompt(6, 32)
    r.apply(KvEventBatch("a", 1, BS, [BlockStored(hash_blocks(conv, BS), None, conv, BS)]))
    assert r.pick(conv).entry.name == "a"
    r.apply(WorkerLoad("a", 1, BS, 99, 100, 3, 10))  # 99% of its KV in use
    assert r.pick(conv).entry.name == "b"
    r.apply(WorkerLoad("b", 0, BS, 98, 100, 3, 10))  # both busy: cost decides again
    assert r.pick(conv).entry.name == "a"


def test_event_gap_triggers_resync_and_held_events_replay():
    r = _kv_router("a")
    p = hash_blocks(_prompt(7, 40), BS)
    assert not r.apply(KvEventBatch("a", 1, BS, [BlockStored(p[:2], None, [], BS)]))
    assert r.apply(KvEventBatch("a", 3, BS, [BlockStored(p[4:6], p[3], [], BS)]))  # batch 2 lost
    assert r.workers["a"].kv.state == "resync" and r.workers["a"].kv.resyncs == 1
    assert not r.apply(KvEventBatch("a", 4, BS, [BlockRemoved([p[0]])]))  # held meanwhile
    # the snapshot reflects batches up to 3
    r.apply_snapshot(KvSnapshot("a", 3, BS, p[:6]))
    assert r.workers["a"].kv.state == "live" and r.workers["a"].kv.seq == 4
    assert r.index.overlaps(p) == {}  # batch 4 (held) removed block 0 after the snapshot
    assert r.index.num_blocks_of("a") == 5
    # a load report naming a batch we never got is a gap too
    assert r.apply(WorkerLoad("a", 6, BS, 0, 100, 0, 0))
    r.apply_snapshot(KvSnapshot("a", 6, BS, []))
    assert not r.apply(KvEventBatch("a", 7, BS, [AllBlocksCleared()]))
    assert r.workers["a"].kv.seq == 7


def test_first_contact_asks_for_a_snapshot_and_dead_workers_leave_the_index():
    r = Router("kv", block_size=BS)
    r.add_worker("a", None)
    assert r.apply(WorkerLoad("a", 5, BS, 0, 100, 0, 0))  # joined late: resync before trusting events
    p = hash_blocks(_prompt(8, 16), BS)
    r.apply_snapshot(KvSnapshot("a", 5, BS, p))
    assert r.index.overlaps(p) == {"a": 4}
    r.remove_worker("a")
    assert r.index.num_blocks == 0
    assert not r.apply(KvEventBatch("a", 6, BS, [BlockStored(p, None, [], BS)]))  # ignored: it is gone
    assert r.index.num_blocks == 0


def test_block_size_mismatch_and_silence_are_loud(caplog):
    r = _kv_router("a", "b")
    p = hash_blocks(_prompt(9, 32), 8)
    r.apply(KvEventBatch("a", 1, 8, [BlockStored(p, None, [], 8)]))
    assert r.workers["a"].kv.state == "block_size_mismatch"
    assert r.kv_errors[("a", "block_size_mismatch")] == 1
    assert r.index.num_blocks_of("a") == 0
    assert "block" in caplog.text and "a" in caplog.text
    r.apply(WorkerLoad("b", 0, BS, 0, 100, 0, 0), now=100.0)
    assert r.check_silent(now=103.0) == []
    assert r.check_silent(now=106.0) == ["b"]
    assert r.kv_errors[("b", "no_events")] == 1 and r.workers["b"].kv.state == "silent"
    assert r.apply(WorkerLoad("b", 0, BS, 0, 100, 0, 0), now=107.0)  # back: resync from a snapshot
    state = r.state()
    assert state["workers"][0]["errors"] == {"block_size_mismatch": 1}
    assert state["workers"][1]["errors"] == {"no_events": 1}
