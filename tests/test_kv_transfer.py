"""Shared-memory KV pools: a peer process writes blocks in place; segments never outlive their owner."""

from __future__ import annotations

import multiprocessing as mp
import os

import torch

from dyn_actor.kv.pool import KvLayout, KvPool
from dyn_actor.kv.transfer import KvPoolDescriptor, RemoteKvPool, SharedKvPool, leftover_segments
from tests.server import own_segments

LAYOUT = KvLayout(num_blocks=32, num_layers=3, block_size=16, num_kv_heads=2, head_dim=8, dtype=torch.float32)


def _peer_writes(desc: KvPoolDescriptor, ids: list[int], seed: int, conn) -> None:
    remote = RemoteKvPool(desc)
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randn((len(ids), *desc.shape[1:]), generator=g)
    n = remote.write_blocks(ids, blocks)
    remote.close()
    conn.send(n)


def test_peer_process_writes_blocks_in_place():
    pool = SharedKvPool(LAYOUT)
    try:
        assert pool.name in leftover_segments()
        ids = [7, 2, 30, 11]
        parent, child = mp.get_context("spawn").Pipe()
        p = mp.get_context("spawn").Process(target=_peer_writes, args=(pool.descriptor(), ids, 5, child))
        p.start()
        written = parent.recv()
        p.join(30)
        assert written == 4 * LAYOUT.block_nbytes
        expected = torch.randn((4, *LAYOUT.shape[1:]), generator=torch.Generator().manual_seed(5))
        assert torch.equal(pool.read_blocks(ids), expected)
        assert pool.read_blocks([0]).abs().sum() == 0  # untouched blocks stay as they were
        assert pool.name in leftover_segments()  # the peer's exit did not remove the owner's segment
    finally:
        pool.close()
    assert pool.name not in leftover_segments()
    pool.close()  # idempotent


def test_engine_pool_views_work_over_shared_memory():
    pool = SharedKvPool(LAYOUT)
    try:
        pool.k[1][3, 4] = torch.ones(2, 8)
        assert pool.k_rows[1][3].view(16, 2, 8)[4].sum() == 16
        raw = pool.block_bytes([3])
        assert len(raw) == LAYOUT.block_nbytes
    finally:
        pool.close()


def test_engine_with_shared_pool_generates_the_same_and_cleans_up():
    from dyn_actor.engine import EngineConfig, LLMEngine, SamplingParams
    from tests.helpers import run_all

    sp = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    prompt = [0, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21]
    plain = run_all(LLMEngine(EngineConfig(num_kv_blocks=32)), {"a": (prompt, sp)})["a"][0]
    engine = LLMEngine(EngineConfig(num_kv_blocks=32, shared_kv=True))
    name = engine.pool.name
    assert name in leftover_segments()
    assert run_all(engine, {"a": (prompt, sp)})["a"][0] == plain
    engine.close()
    assert name not in leftover_segments()


def test_a_pool_that_shm_cannot_hold_is_refused_with_the_sizes_and_the_flag():
    import pytest

    from dyn_actor.kv.transfer import check_shm_room

    with pytest.raises(MemoryError, match=r"MiB free: lower --kv-cache-memory-gb"):
        check_shm_room(1 << 60)
    check_shm_room(1 << 20)  # a small one fits


def test_a_segment_that_shm_cannot_give_pages_is_refused_and_removed(monkeypatch):
    """Two pools can both pass the free-space check and then not both fit: the one whose pages cannot
    be reserved fails at creation with a clear error (not with SIGBUS later), leaving no segment."""
    import errno

    import pytest

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full)
    before = set(own_segments())
    with pytest.raises(MemoryError, match=r"could not give it \(No space left on device\): lower --kv-cache-memory-gb"):
        SharedKvPool(LAYOUT)
    assert set(own_segments()) == before


def test_a_writer_picks_its_route_to_a_pool_on_another_card():
    """``choose_route``: where a prefill worker opens a decode pool's IPC handle and how it writes, by
    the cards it sees (its own is device 0) and which pairs have peer access (the CUDA path itself
    runs in tests/test_kv_transfer_gpu.py on a GPU)."""
    import pytest

    from dyn_actor.kv.cuda_ipc import choose_route

    cards = ["GPU-a", "GPU-b", "GPU-c"]
    nvlink = lambda a, b: True  # noqa: E731
    pcie_split = lambda a, b: {a, b} != {0, 2}  # noqa: E731 - cards 0 and 2 on different sockets
    assert choose_route(0, "GPU-a", cards, nvlink) == (0, "same")
    assert choose_route(0, "GPU-b", cards, nvlink) == (0, "peer")  # opened on the writer's card, mapped across
    assert choose_route(0, "GPU-c", cards, pcie_split) == (2, "host")  # opened on the owner's card
    assert choose_route(0, "GPU-b", cards, pcie_split) == (0, "peer")
    assert choose_route(0, "GPU-a", cards, nvlink, forced="host") == (0, "host")
    assert choose_route(0, "", cards, nvlink) == (0, "same")  # a descriptor naming no card: one-card box
    with pytest.raises(RuntimeError, match="GPU-z is not visible"):
        choose_route(0, "GPU-z", cards, nvlink)
    with pytest.raises(ValueError, match="only 'host'"):
        choose_route(0, "GPU-b", cards, nvlink, forced="peer")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_a_private_cpu_pool_is_zero_and_takes_memory_only_where_written():
    layout = KvLayout(num_blocks=2048, num_layers=8, block_size=16, num_kv_heads=4, head_dim=64, dtype=torch.bfloat16)
    assert layout.nbytes == 256 << 20
    before = _rss_bytes()
    pool = KvPool(layout)
    assert _rss_bytes() - before < 16 << 20  # not written at start: a 256 MiB pool, not 256 MiB of memory
    assert tuple(pool.data.shape) == layout.shape and pool.data.is_contiguous()
    assert not pool.k[3][100:110].any() and not pool.v[0][2047].any()  # reads as zeros
    blocks = torch.randn((2, *layout.shape[1:])).to(torch.bfloat16)
    pool.write_blocks([5, 2047], blocks)
    assert torch.equal(pool.read_blocks([5, 2047]), blocks)
    assert not pool.data[6].any()
    assert _rss_bytes() - before < 32 << 20
    view = pool.k[1]
    del pool
    view[0] += 1  # a view keeps the mapping alive
    assert view[0].eq(1).all()
