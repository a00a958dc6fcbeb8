"""Moving KV blocks between processes: the decode worker's pool is shared, a prefill worker
writes blocks straight into it.

One interface, chosen by device:

- CPU: the pool lives in a POSIX shared-memory segment (``/dev/shm``). The
  owner exports a ``KvPoolDescriptor`` (segment name, shape, dtype); a peer
  attaches once and writes blocks in place with one ``index_copy_`` per
  transfer (a scatter of whole blocks, each one contiguous run).
- GPU (``dyn_actor.kv.cuda_ipc``): the pool is device memory exported by CUDA
  IPC handle (torch's storage sharing); the peer opens it once, scatters with
  one fused kernel, and synchronises its stream before it reports completion.

``make_shared_pool`` and ``open_remote_pool`` choose the implementation.

Only descriptors travel through sockets, never tensors.
"""

from __future__ import annotations

import _posixshmem
import mmap
import os
import uuid
from collections.abc import Sequence
from multiprocessing import shared_memory

import torch

from dyn_actor.kv.descriptor import KvPoolDescriptor
from dyn_actor.kv.pool import DTYPES, KvLayout, KvPool, RemotePool, check_block_ids
from dyn_actor.kv.segments import SHM_PREFIX, check_shm_room, leftover_segments, remove_segments_of
from dyn_actor.native_ops import copy_blocks, move_blocks

__all__ = ["SHM_PREFIX", "RemoteKvPool", "SharedKvPool", "check_shm_room", "leftover_segments", "make_shared_pool",
           "open_remote_pool", "remove_segments_of"]



def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class SharedKvPool(KvPool):
    """A ``KvPool`` whose memory is a shared-memory segment this process owns (and removes)."""

    def __init__(self, layout: KvLayout) -> None:
        check_shm_room(layout.nbytes)
        name = f"{SHM_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._shm = shared_memory.SharedMemory(name=name, create=True, size=max(layout.nbytes, 1))
        reserve_segment(self._shm, layout.nbytes)
        # a new segment reads as zeros: nothing to clear
        data = torch.frombuffer(self._shm.buf, dtype=torch.uint8, count=layout.nbytes).view(layout.dtype)
        data = data.view(layout.shape)
        super().__init__(layout, data=data)
        self.name = name

    def descriptor(self) -> KvPoolDescriptor:
        return KvPoolDescriptor("shm", self.name, list(self.layout.shape), _dtype_name(self.layout.dtype))

    def close(self) -> None:
        """Drop the tensor views and remove the segment (idempotent)."""
        if self._shm is None:
            return
        self.data = self.k = self.v = self.k_rows = self.v_rows = None  # type: ignore[assignment]
        shm, self._shm = self._shm, None
        try:
            shm.close()
        except BufferError:  # a view is still alive somewhere; the unlink below still frees the name
            pass
        try:
            shm.unlink()
        except FileNotFoundError:
            pass


class RemoteKvPool(RemotePool):
    """Another process's pool, attached once; blocks are written in place."""

    def __init__(self, desc: KvPoolDescriptor) -> None:
        if desc.kind != "shm":
            raise ValueError(f"unsupported KV pool kind {desc.kind!r} on this device")
        self.descriptor = desc
        # Mapped by hand rather than with SharedMemory(create=False), which would register the
        # segment with a resource tracker (possibly the owner's) and unlink it behind its back.
        fd = _posixshmem.shm_open("/" + desc.name, os.O_RDWR, mode=0o600)
        try:
            size = os.fstat(fd).st_size
            self._mmap: mmap.mmap | None = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        dtype = DTYPES[desc.dtype]
        numel = 1
        for s in desc.shape:
            numel *= s
        self.data = torch.frombuffer(self._mmap, dtype=dtype, count=numel).view(desc.shape)

    def _scatter(self, block_ids: list[int], blocks: torch.Tensor) -> None:
        copy_blocks(self.data, blocks.to(self.data.dtype).contiguous(), block_ids, scatter=True)

    def _move(self, block_ids: list[int], src: torch.Tensor, src_ids: list[int]) -> None:
        move_blocks(self.data, src, block_ids, src_ids)

    def read_blocks(self, block_ids: Sequence[int]) -> torch.Tensor:
        """A copy of the given blocks (``[len(block_ids), *block_shape]``), gathered in one call."""
        ids = list(block_ids)
        check_block_ids(ids, self.data.shape[0])
        out = torch.empty((len(ids), *self.data.shape[1:]), dtype=self.data.dtype)
        copy_blocks(out, self.data, ids, scatter=False)
        return out

    def close(self) -> None:
        if self._mmap is None:
            return
        self.data = None  # type: ignore[assignment]
        mm, self._mmap = self._mmap, None
        try:
            mm.close()
        except BufferError:  # a view is still alive; the mapping goes when it does
            pass


def reserve_segment(shm: shared_memory.SharedMemory, nbytes: int) -> None:
    """Give a new segment its pages now (``posix_fallocate``), so that a ``/dev/shm`` too small for it
    fails here, with a clear error, rather than with SIGBUS when serving first touches a page that
    does not fit (two workers starting at once can both pass ``check_shm_room``). The segment is
    removed on failure."""
    try:
        if hasattr(os, "posix_fallocate"):
            os.posix_fallocate(shm._fd, 0, max(nbytes, 1))
        else:  # no fallocate: touch every page instead
            torch.frombuffer(shm.buf, dtype=torch.uint8, count=nbytes).zero_()
    except OSError as e:
        shm.close()
        shm.unlink()
        mib = 1 << 20
        raise MemoryError(f"the KV pool needs {nbytes / mib:,.0f} MiB of shared memory and /dev/shm could not "
                          f"give it ({e.strerror}): lower --kv-cache-memory-gb or give /dev/shm more room "
                          "(in Docker: --shm-size)") from None


def make_shared_pool(layout: KvLayout, device: str | torch.device = "cpu") -> KvPool:
    """A pool other processes can write into: shared memory on CPU, CUDA IPC on a GPU."""
    if torch.device(device).type == "cuda":
        from dyn_actor.kv.cuda_ipc import CudaKvPool

        return CudaKvPool(layout, device)
    return SharedKvPool(layout)


def open_remote_pool(desc: KvPoolDescriptor):
    """Attach to another process's pool from its descriptor (``RemoteKvPool`` or ``RemoteCudaKvPool``)."""
    if desc.kind == "cuda_ipc":
        from dyn_actor.kv.cuda_ipc import RemoteCudaKvPool

        return RemoteCudaKvPool(desc)
    return RemoteKvPool(desc)
