"""The CUDA IPC KV transfer (GPU only; skipped without one): export/import across two processes,
the fused scatter, and the completion signal. Run on a GPU with ``bash scripts/gpu_check.sh``."""

from __future__ import annotations

import multiprocessing as mp

import pytest
import torch

from dyn_actor.kv.pool import KvLayout

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

LAYOUT = KvLayout(num_blocks=256, num_layers=4, block_size=16, num_kv_heads=2, head_dim=64, dtype=torch.float16)


def _block(i: int) -> torch.Tensor:
    """Block content that identifies ``i`` (the same in both processes)."""
    g = torch.Generator().manual_seed(i)
    return torch.randn(LAYOUT.shape[1:], generator=g).to(LAYOUT.dtype)


def _writer(desc, ids: list[int], conn) -> None:
    from dyn_actor.kv.transfer import open_remote_pool

    remote = open_remote_pool(desc)
    src = torch.stack([_block(i) for i in ids]).cuda()
    nbytes = remote.write_blocks(ids, src)  # returns only once the writes are done
    conn.send(nbytes)  # the completion signal
    again = conn.recv()  # a second, large transfer into the same mapping
    big = torch.full((len(again), *LAYOUT.shape[1:]), 7.0, dtype=LAYOUT.dtype, device="cuda")
    remote.write_blocks(again, big)
    conn.send("done")
    conn.recv()
    remote.close()


def test_ipc_export_import_scatter_and_completion():
    from dyn_actor.kv.transfer import make_shared_pool

    pool = make_shared_pool(LAYOUT, "cuda")
    desc = pool.descriptor()
    assert desc.kind == "cuda_ipc" and desc.cuda is not None
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    p = ctx.Process(target=_writer, args=(desc, [200, 3, 77, 150, 4], child))
    p.start()
    try:
        assert parent.poll(120), "writer did not report"
        assert parent.recv() == 5 * LAYOUT.block_nbytes
        # read right after the signal, with no synchronisation of our own
        for i in [200, 3, 77, 150, 4]:
            assert torch.equal(pool.data[i].cpu(), _block(i))
        assert pool.data[0].abs().sum().item() == 0  # nothing else touched
        big = list(range(5, 5 + 190))
        parent.send(big)
        assert parent.recv() == "done"
        assert bool((pool.data[big[-1]] == 7).all()) and bool((pool.data[big[0]] == 7).all())
        assert torch.equal(pool.data[200].cpu(), _block(200))
        parent.send("bye")
    finally:
        p.join(60)
        pool.close()
    assert p.exitcode == 0


@pytest.mark.parametrize("dtype,block_elems", [(torch.float16, 16 * 2 * 64 * 2 * 4), (torch.float32, 1000),
                                               (torch.bfloat16, 3), (torch.float16, 1 << 20)])
def test_fused_scatter_equals_index_copy(dtype, block_elems):
    from dyn_actor.kv.cuda_ipc import scatter_blocks

    n_pool, n = 64, 24
    dst = torch.zeros((n_pool, block_elems), dtype=dtype, device="cuda")
    ref = dst.clone()
    src = torch.randn((n, block_elems), device="cuda").to(dtype)
    ids = torch.randperm(n_pool, device="cuda")[:n]
    scatter_blocks(dst, src, ids)
    ref.index_copy_(0, ids, src)
    torch.cuda.synchronize()
    assert torch.equal(dst, ref)


@pytest.mark.parametrize("dtype,block_elems", [(torch.float16, 16 * 2 * 64 * 2 * 4), (torch.float32, 1000),
                                               (torch.bfloat16, 3), (torch.float16, 1 << 20), (torch.int8, 777)])
def test_pool_to_pool_move_equals_index_copy(dtype, block_elems):
    from dyn_actor.kv.cuda_ipc import move_blocks

    n_pool, n = 64, 24
    dst = torch.zeros((n_pool, block_elems), dtype=dtype, device="cuda")
    ref = dst.clone()
    src = (torch.randn((n_pool, block_elems), device="cuda") * 20).to(dtype)
    dst_ids, src_ids = torch.randperm(n_pool, device="cuda")[:n], torch.randperm(n_pool, device="cuda")[:n]
    move_blocks(dst, src, dst_ids, src_ids)
    ref.index_copy_(0, dst_ids, src.index_select(0, src_ids))
    torch.cuda.synchronize()
    assert torch.equal(dst, ref)


def _route_writer(desc, conn) -> None:
    """Writes pool-to-pool and from a tensor, on the route the environment forces."""
    from dyn_actor.kv.cuda_ipc import HOST_CHUNK_BYTES, card_id
    from dyn_actor.kv.transfer import open_remote_pool

    remote = open_remote_pool(desc)
    own = torch.stack([_block(i) for i in range(LAYOUT.num_blocks)]).cuda()  # this writer's "pool"
    src_ids = [9, 250, 31, 0, 128]
    remote.write_blocks_from([200, 3, 250, 220, 4], own, src_ids)
    many = list(range(10, 10 + 180))  # several chunks of the host route's buffer (64 blocks, set below)
    remote.write_blocks_from(many, own, [(i + 40) % LAYOUT.num_blocks for i in many])
    remote.write_blocks([5], torch.full((1, *LAYOUT.shape[1:]), 5.0, dtype=LAYOUT.dtype, device="cuda"))
    conn.send((remote.route, desc.card == card_id(0), HOST_CHUNK_BYTES))
    conn.recv()
    remote.close()


@pytest.mark.parametrize("route", ["same", "host"])
def test_a_route_writes_the_same_blocks(route, monkeypatch):
    """The host route (for two cards without peer access; forced here, on one card) writes what the
    direct kernel writes; the route is taken from the descriptor's card id."""
    import dyn_actor.kv.cuda_ipc as cuda_ipc
    from dyn_actor.kv.transfer import make_shared_pool

    pool = make_shared_pool(LAYOUT, "cuda")
    other = make_shared_pool(LAYOUT, "cuda")
    desc = pool.descriptor()
    assert desc.name != other.descriptor().name  # a writer maps pools by name
    if route == "host":
        monkeypatch.setenv(cuda_ipc.ROUTE_ENV, "host")
        monkeypatch.setenv("DYN_ACTOR_KV_HOST_CHUNK_BYTES", str(64 * LAYOUT.block_nbytes))
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    p = ctx.Process(target=_route_writer, args=(desc, child))
    p.start()
    try:
        assert parent.poll(120), "writer did not report"
        got, same_card, chunk = parent.recv()
        assert (got, same_card) == (route, True)
        if route == "host":
            assert chunk == 64 * LAYOUT.block_nbytes
        for dst, s in zip([200, 3, 250, 220, 4], [9, 250, 31, 0, 128]):
            assert torch.equal(pool.data[dst].cpu(), _block(s)), (dst, s)
        for i in (10, 11, 73, 74, 75, 137, 138, 189):  # each chunk's ends
            assert torch.equal(pool.data[i].cpu(), _block((i + 40) % LAYOUT.num_blocks)), i
        assert bool((pool.data[5] == 5).all())
        assert pool.data[190].abs().sum().item() == 0 and pool.data[6].abs().sum().item() == 0
        parent.send("bye")
    finally:
        p.join(60)
        pool.close()
        other.close()
    assert p.exitcode == 0
