"""The paged KV memory: one tensor, laid out for transfer.

Layout ``[num_blocks, num_layers, 2 (k, v), block_size, num_kv_heads, head_dim]``:
one block of all layers is one contiguous run of ``block_nbytes`` bytes, so
moving N blocks between processes is N large copies (or one gather/scatter),
never N x layers small ones. Each layer sees strided views
``[num_blocks, block_size, num_kv_heads, head_dim]`` of its keys and values.
"""

from __future__ import annotations

import mmap
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class KvLayout:
    num_blocks: int
    num_layers: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.num_blocks, self.num_layers, 2, self.block_size, self.num_kv_heads, self.head_dim)

    @property
    def block_numel(self) -> int:
        return self.num_layers * 2 * self.block_size * self.num_kv_heads * self.head_dim

    @property
    def block_nbytes(self) -> int:
        return self.block_numel * torch.empty((), dtype=self.dtype).element_size()

    @property
    def nbytes(self) -> int:
        return self.num_blocks * self.block_nbytes


def zeroed(shape: tuple[int, ...], dtype: torch.dtype, device: str | torch.device) -> torch.Tensor:
    """A zero tensor. On the CPU a private anonymous mapping, whose pages the kernel gives (zeroed)
    when they are first touched: a pool of several GB costs nothing at start, where ``torch.zeros``
    writes every page (about a second a GB here), and blocks never used never take memory."""
    if torch.device(device).type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    numel = int(np.prod(shape))
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    if nbytes == 0:
        return torch.zeros(shape, dtype=dtype)
    mm = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE)
    return torch.frombuffer(mm, dtype=dtype, count=numel).view(shape)  # the tensor keeps ``mm`` alive


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class KvPool:
    """KV memory for ``layout.num_blocks`` blocks; optionally over caller-provided storage."""

    def __init__(self, layout: KvLayout, device: str | torch.device = "cpu", data: torch.Tensor | None = None):
        self.layout = layout
        if data is None:
            data = zeroed(layout.shape, layout.dtype, device)
        elif tuple(data.shape) != layout.shape or data.dtype != layout.dtype or not data.is_contiguous():
            raise ValueError(f"KV storage must be a contiguous {layout.dtype} tensor of shape {layout.shape}")
        self.data = data
        self.k = [data[:, layer, 0] for layer in range(layout.num_layers)]
        self.v = [data[:, layer, 1] for layer in range(layout.num_layers)]
        # the same memory as [num_blocks, block_size * num_kv_heads * head_dim] rows:
        # gathering whole rows with index_select is a memcpy per block
        self.k_rows = [k.flatten(1) for k in self.k]
        self.v_rows = [v.flatten(1) for v in self.v]

    @property
    def device(self) -> torch.device:
        return self.data.device

    def read_blocks(self, block_ids: Sequence[int]) -> torch.Tensor:
        """A copy of the given blocks, shape ``[len(block_ids), *block_shape]``."""
        ids = list(block_ids)
        if self.data.device.type == "cpu":
            from dyn_actor.native_ops import copy_blocks

            check_block_ids(ids, self.layout.num_blocks)
            out = torch.empty((len(ids), *self.layout.shape[1:]), dtype=self.data.dtype)
            copy_blocks(out, self.data, ids, scatter=False)
            return out
        idx = torch.as_tensor(ids, dtype=torch.long, device=self.data.device)
        return self.data.index_select(0, idx)

    def write_blocks(self, block_ids: Sequence[int], blocks: torch.Tensor) -> None:
        """Overwrite the given blocks in place with ``blocks`` (as returned by ``read_blocks``)."""
        check_block_write(self.layout.shape, block_ids, blocks)
        ids = list(block_ids)
        if self.data.device.type == "cpu":
            from dyn_actor.native_ops import copy_blocks

            copy_blocks(self.data, blocks.to(dtype=self.data.dtype).contiguous(), ids, scatter=True)
            return
        idx = torch.as_tensor(ids, dtype=torch.long, device=self.data.device)
        self.data.index_copy_(0, idx, blocks.to(device=self.data.device, dtype=self.data.dtype))

    def block_bytes(self, block_ids: Sequence[int]) -> bytes:
        """The raw bytes of the given blocks, in order."""
        return self.read_blocks(block_ids).cpu().contiguous().view(torch.uint8).numpy().tobytes()

    def write_block_bytes(self, block_ids: Sequence[int], raw: bytes | memoryview) -> None:
        expected = len(block_ids) * self.layout.block_nbytes
        if len(raw) != expected:
            raise ValueError(f"expected {expected} bytes for {len(block_ids)} blocks, got {len(raw)}")
        flat = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(self.layout.dtype)
        self.write_blocks(block_ids, flat.view(len(block_ids), *self.layout.shape[1:]))


def check_block_ids(ids: Sequence[int], num_blocks: int) -> None:
    if len(ids) > 64:  # long lists: numpy's min and max are ~10x faster than Python's
        arr = np.fromiter(ids, dtype=np.int64, count=len(ids))
        lo, hi = int(arr.min()), int(arr.max())
    elif ids:
        lo, hi = min(ids), max(ids)
    else:
        return
    if lo < 0 or hi >= num_blocks:
        raise ValueError(f"block ids must be in [0, {num_blocks})")


def check_block_write(pool_shape: Sequence[int], block_ids: Sequence[int], blocks: torch.Tensor) -> None:
    """Raise ``ValueError`` unless ``blocks`` is one block of the pool's shape per id, every id in range."""
    if blocks.shape[0] != len(block_ids) or tuple(blocks.shape[1:]) != tuple(pool_shape[1:]):
        raise ValueError(f"expected {len(block_ids)} blocks of shape {tuple(pool_shape[1:])}, got {tuple(blocks.shape)}")
    check_block_ids(block_ids, pool_shape[0])


class RemotePool:
    """Another process's pool, attached in this one (shared memory or CUDA IPC): blocks are written in
    place. Subclasses set ``data`` and implement ``_scatter`` (one fused copy, finished on return)."""

    data: torch.Tensor

    @property
    def block_nbytes(self) -> int:
        return self.data[0].numel() * self.data.element_size()

    def write_blocks(self, block_ids: Sequence[int], blocks: torch.Tensor) -> int:
        """Scatter ``blocks`` (``[len(block_ids), *block_shape]``) into the given block ids; return the
        bytes written. The writes are complete when this returns."""
        check_block_write(self.data.shape, block_ids, blocks)
        if not block_ids:
            return 0
        self._scatter(list(block_ids), blocks)
        return len(block_ids) * self.block_nbytes

    def _scatter(self, block_ids: list[int], blocks: torch.Tensor) -> None:
        raise NotImplementedError

    def write_blocks_from(self, block_ids: Sequence[int], src: torch.Tensor, src_ids: Sequence[int]) -> int:
        """Copy blocks ``src_ids`` of the pool tensor ``src`` (this process's own) into blocks
        ``block_ids`` here, in one kernel and without a staging copy; return the bytes written. The
        writes are complete when this returns."""
        if len(block_ids) != len(src_ids):
            raise ValueError(f"{len(block_ids)} destination blocks for {len(src_ids)} source blocks")
        if tuple(src.shape[1:]) != tuple(self.data.shape[1:]):
            raise ValueError(f"source blocks of shape {tuple(src.shape[1:])}, expected {tuple(self.data.shape[1:])}")
        check_block_ids(block_ids, self.data.shape[0])
        check_block_ids(src_ids, src.shape[0])
        if not block_ids:
            return 0
        if src.dtype != self.data.dtype or not self._accepts(src):  # a conversion: through a copy
            self._scatter(list(block_ids), src[torch.as_tensor(list(src_ids), device=src.device)])
        else:
            self._move(list(block_ids), src, list(src_ids))
        return len(block_ids) * self.block_nbytes

    def _accepts(self, src: torch.Tensor) -> bool:
        """Whether ``_move`` reads ``src`` where it is (else the blocks are gathered, then scattered)."""
        return src.device == self.data.device

    def _move(self, block_ids: list[int], src: torch.Tensor, src_ids: list[int]) -> None:
        raise NotImplementedError
