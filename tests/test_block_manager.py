from __future__ import annotations

import pytest

from dyn_actor.kv.block_hash import hash_block, hash_blocks
from dyn_actor.kv.block_manager import BlockManager
from dyn_actor.kv.events import AllBlocksCleared, BlockRemoved, BlockStored

BS = 4


def test_hash_chaining_covers_parent_and_tokens():
    toks = list(range(12))
    hs = hash_blocks(toks, BS)
    assert len(hs) == 3
    assert hs[0] == hash_block(None, toks[0:4])
    assert hs[1] == hash_block(hs[0], toks[4:8])
    assert hs[2] == hash_block(hs[1], toks[8:12])
    # same tokens under a different parent hash differently
    assert hash_block(None, toks[4:8]) != hs[1]
    # a partial trailing block is not hashed
    assert hash_blocks(toks + [99], BS) == hs
    # stable values (shared by processes and the router): no per-process seed
    assert hash_block(None, [1, 2, 3, 4]) == hash_block(0, (1, 2, 3, 4))
    assert 0 <= hs[0] < 2**64


def _fill(bm: BlockManager, rid: str, toks: list[int]) -> list[int]:
    hits = bm.find_cached_prefix(toks, max_tokens=len(toks) - 1)
    ids = bm.allocate(rid, len(toks), hits)
    assert ids is not None
    bm.cache_full_blocks(rid, toks, len(toks))
    return ids


def test_prefix_hit_shares_blocks_and_counts_refs():
    bm = BlockManager(16, BS)
    a = list(range(10))  # 2 full blocks + 2 tokens
    ids_a = _fill(bm, "a", a)
    assert len(ids_a) == 3
    b = a[:8] + [50, 51, 52]
    hits = bm.find_cached_prefix(b, max_tokens=len(b) - 1)
    assert [h.block_id for h in hits] == ids_a[:2]
    ids_b = bm.allocate("b", len(b), hits)
    assert ids_b[:2] == ids_a[:2] and ids_b[2] != ids_a[2]
    assert [bm.blocks[i].ref_cnt for i in ids_a[:2]] == [2, 2]
    assert bm.num_used_blocks == 4
    bm.free("a")
    assert [bm.blocks[i].ref_cnt for i in ids_a[:2]] == [1, 1]
    assert bm.num_used_blocks == 3
    bm.free("b")
    assert bm.num_used_blocks == 0 and bm.num_free_blocks == 16
    # still cached after free
    assert len(bm.find_cached_prefix(a)) == 2


def test_last_token_never_comes_from_cache():
    bm = BlockManager(16, BS)
    toks = list(range(8))
    _fill(bm, "a", toks)
    bm.free("a")
    # exact repeat of 2 full blocks: only the first may hit, the last token must be computed
    assert len(bm.find_cached_prefix(toks, max_tokens=len(toks) - 1)) == 1


def test_hash_collision_is_not_a_hit():
    bm = BlockManager(16, BS, hash_fn=lambda parent, toks: 42)  # every block collides
    _fill(bm, "a", [1, 2, 3, 4, 5])
    assert bm.find_cached_prefix([9, 9, 9, 9, 5]) == []
    assert len(bm.find_cached_prefix([1, 2, 3, 4, 5])) == 1
    # a colliding block is not registered over the existing one
    _fill(bm, "b", [9, 9, 9, 9, 5])
    assert len(bm.find_cached_prefix([1, 2, 3, 4, 5])) == 1


def test_lru_eviction_order_and_events():
    bm = BlockManager(4, BS)
    _fill(bm, "a", list(range(8)))  # 2 blocks
    _fill(bm, "b", list(range(100, 108)))  # 2 blocks
    stored = bm.drain_events()
    assert [type(e) for e in stored] == [BlockStored, BlockStored]
    first: BlockStored = stored[0]  # type: ignore[assignment]
    assert first.parent_hash is None and first.token_ids == list(range(8)) and len(first.block_hashes) == 2
    assert first.block_hashes == hash_blocks(list(range(8)), BS)
    bm.free("a")  # a's blocks freed first: evicted first, tail block before head block
    bm.free("b")
    a_hashes = hash_blocks(list(range(8)), BS)
    ids = bm.allocate("c", 4)  # takes one block: a's tail
    assert ids is not None
    ev = bm.drain_events()
    assert ev == [BlockRemoved([a_hashes[1]])]
    assert len(bm.find_cached_prefix(list(range(8)) + [0])) == 1  # a's head still cached
    assert len(bm.find_cached_prefix(list(range(100, 108)) + [0])) == 2
    bm.free("c")
    assert bm.allocate("d", 20) is None  # 5 blocks > 4: refused, nothing changed
    assert bm.num_free_blocks == 4 and bm.drain_events() == []


def test_stored_event_parent_continues_chain():
    bm = BlockManager(8, BS)
    toks = list(range(6))
    bm.allocate("a", 12)
    bm.cache_full_blocks("a", toks, 6)  # first block full
    toks += [6, 7, 8, 9]
    bm.cache_full_blocks("a", toks, 10)  # second block full
    e1, e2 = bm.drain_events()
    assert e2.parent_hash == e1.block_hashes[-1]
    assert e2.token_ids == [4, 5, 6, 7]


def test_reset_prefix_cache():
    bm = BlockManager(8, BS)
    _fill(bm, "a", list(range(9)))
    assert not bm.reset_prefix_cache()  # blocks in use
    bm.free("a")
    bm.drain_events()
    assert bm.reset_prefix_cache()
    assert bm.drain_events() == [AllBlocksCleared()]
    assert bm.find_cached_prefix(list(range(9))) == []


def test_prefix_caching_off():
    bm = BlockManager(8, BS, enable_prefix_caching=False)
    _fill(bm, "a", list(range(9)))
    bm.free("a")
    assert bm.find_cached_prefix(list(range(9))) == [] and bm.drain_events() == []


def test_bad_sizes():
    with pytest.raises(ValueError):
        BlockManager(0, 16)
    with pytest.raises(ValueError):
        hash_blocks([1, 2], 0)


def test_import_cached_blocks_registers_missing_blocks_only():
    bm = BlockManager(num_blocks=8, block_size=4)
    toks = list(range(1, 14))  # 3 full blocks + 1 token
    _fill(bm, "a", toks[:8])  # blocks 0-1 cached here already
    bm.free("a")
    bm.drain_events()
    todo = bm.import_cached_blocks(toks, 3)
    assert [i for i, _ in todo] == [2]  # only the third block has to be copied in
    (ev,) = bm.drain_events()
    assert isinstance(ev, BlockStored) and ev.block_hashes == hash_blocks(toks, 4)[2:3]
    assert ev.parent_hash == hash_blocks(toks, 4)[1]
    assert len(bm.find_cached_prefix(toks)) == 3
    assert bm.num_used_blocks == 0  # cached, held by nobody
    assert bm.import_cached_blocks(toks, 3) == []  # all there now


def test_import_never_evicts_its_own_prefix():
    bm = BlockManager(num_blocks=3, block_size=2)
    toks = [1, 2, 3, 4, 5, 6, 7]
    _fill(bm, "a", toks[:2])  # block 0 cached, at the LRU head once freed
    bm.free("a")
    todo = bm.import_cached_blocks(toks, 3)
    # block 0 was kept (moved to the tail), blocks 1 and 2 took the two other free blocks
    assert [i for i, _ in todo] == [1, 2]
    assert len(bm.find_cached_prefix(toks)) == 3
    bm2 = BlockManager(num_blocks=2, block_size=2)
    assert [i for i, _ in bm2.import_cached_blocks(toks, 3)] == [0, 1]  # stops when the pool is full


def test_discard_cached_forgets_blocks():
    bm = BlockManager(num_blocks=4, block_size=2)
    todo = bm.import_cached_blocks([1, 2, 3, 4, 5], 2)
    bm.drain_events()
    bm.discard_cached([b for _, b in todo])
    assert bm.find_cached_prefix([1, 2, 3, 4, 5]) == []
    assert [type(e) for e in bm.drain_events()] == [BlockRemoved, BlockRemoved]


def test_a_prompt_looked_up_twice_is_hashed_once():
    """A decode worker looks a prompt up, then allocates it (the scheduler looks again, on its
    own copy of the token list): each block is hashed once, plus the first block's probe."""
    calls = []

    def counting(parent, tokens):
        calls.append(1)
        return hash_block(parent, tokens)

    bm = BlockManager(64, 4, hash_fn=counting)
    prompt = list(range(1, 42))  # 10 full blocks
    bm.allocate("a", len(prompt))
    bm.cache_full_blocks("a", prompt, len(prompt))
    calls.clear()
    first = bm.find_cached_prefix(list(prompt))
    second = bm.find_cached_prefix(list(prompt), max_tokens=len(prompt) - 1)
    assert len(first) == len(second) == 10
    assert len(calls) == 10 + 2  # the chain once, and each lookup's first-block probe
    assert bm.find_cached_prefix([99] + prompt[1:]) == []  # another prompt: its own hashes, no hit


def test_extend_and_the_block_table():
    bm = BlockManager(num_blocks=3, block_size=BS)
    ids = bm.allocate("a", 3)
    table = bm.block_table("a")
    assert table == ids and len(ids) == 1
    assert bm.extend("a", 4) and bm.block_table("a") == ids  # still inside its block: nothing taken
    assert bm.extend("a", 5) and len(table) == 2 and bm.num_free_blocks == 1  # the same list, grown
    copy = bm.block_ids("a")
    copy.append(99)  # a caller's copy: the manager's list is not touched
    assert bm.block_table("a") == table and len(table) == 2
    assert bm.allocate("b", 4) is not None
    assert not bm.extend("a", 9) and len(table) == 2 and bm.num_free_blocks == 0  # no room: unchanged
    assert bm.transfer("a", "fence") == 2 and bm.block_table("fence") is table
    assert bm.block_ids("a") == []
    bm.free("fence")
    bm.free("b")
    assert bm.num_free_blocks == 3 and bm.extend("c", 8) and len(bm.block_table("c")) == 2
