"""What describes a shared KV pool to another process: plain data (names, shapes, a CUDA IPC
handle as bytes), torch-free, so that messages can carry it without loading the engine."""

from __future__ import annotations

import msgspec


class CudaIpcHandle(msgspec.Struct, frozen=True):
    """What ``UntypedStorage._share_cuda_()`` returns, as bytes and ints."""

    device: int
    handle: bytes
    size_bytes: int
    offset_bytes: int
    ref_counter_handle: bytes
    ref_counter_offset: int
    event_handle: bytes | None
    event_sync_required: bool


class KvPoolDescriptor(msgspec.Struct, frozen=True):
    kind: str  # "shm" | "cuda_ipc"
    name: str  # shared-memory segment name (shm)
    shape: list[int]
    dtype: str
    device: int = -1
    cuda: CudaIpcHandle | None = None  # kind "cuda_ipc" only
    card: str = ""  # kind "cuda_ipc": the owner's card (its UUID), which a writer finds among the cards it sees
