"""Moving KV blocks straight from one pool into another (no staging copy): the C path into a
shared-memory pool, and the Triton kernel of the CUDA IPC path (under the interpreter on the CPU)."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported

from dyn_actor.kv.pool import KvLayout, KvPool  # noqa: E402
from dyn_actor.kv.transfer import SharedKvPool, open_remote_pool  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _filled(layout: KvLayout, seed: int) -> KvPool:
    pool = KvPool(layout)
    pool.data.copy_(torch.randn(layout.shape, generator=torch.Generator().manual_seed(seed)).to(layout.dtype))
    return pool


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pool_to_shared_pool_without_staging(dtype):
    layout = KvLayout(num_blocks=40, num_layers=3, block_size=16, num_kv_heads=2, head_dim=64, dtype=dtype)
    owner = SharedKvPool(layout)
    remote = open_remote_pool(owner.descriptor())
    try:
        src = _filled(layout, 1)
        dst_ids, src_ids = [7, 3, 30, 11], [0, 39, 5, 6]
        nbytes = remote.write_blocks_from(dst_ids, src.data, src_ids)
        assert nbytes == 4 * layout.block_nbytes
        for d, s in zip(dst_ids, src_ids):
            assert torch.equal(owner.data[d], src.data[s])
        assert not owner.data[0].any()  # nothing else touched
        with pytest.raises(ValueError):
            remote.write_blocks_from([40], src.data, [0])  # out of range
        # another dtype goes through a converting copy, and still lands
        other = _filled(KvLayout(40, 3, 16, 2, 64, torch.float16), 2)
        remote.write_blocks_from([1], other.data, [2])
        assert torch.allclose(owner.data[1].float(), other.data[2].float().to(dtype).float())
    finally:
        remote.close()
        owner.close()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("block_size", [16, 32])
def test_triton_move_kernel_equals_index_copy(dtype, block_size):
    pytest.importorskip("triton")
    from dyn_actor.kv.cuda_ipc import move_blocks

    shape = (24, 2, 2, block_size, 2, 64)
    g = torch.Generator().manual_seed(block_size)
    src = torch.randn(shape, generator=g).to(dtype).to(DEVICE)
    dst = torch.zeros(shape, dtype=dtype, device=DEVICE)
    want = dst.clone()
    dst_ids = torch.tensor([5, 0, 23, 9, 17], device=DEVICE)
    src_ids = torch.tensor([1, 2, 3, 20, 0], device=DEVICE)
    move_blocks(dst, src, dst_ids, src_ids)
    want.index_copy_(0, dst_ids, src.index_select(0, src_ids))
    assert torch.equal(dst, want)
