"""KV transfer on a GPU: the decode worker's pool is device memory shared by CUDA IPC handle.

- ``CudaKvPool`` (owner): the pool tensor on its device; ``descriptor()`` exports the
  storage's IPC handle (torch's storage sharing, the same mechanism as
  ``torch.multiprocessing``), which travels as plain bytes in a ``KvPoolDescriptor``.
- ``RemoteCudaKvPool`` (a prefill worker): opens the handle once and scatters
  blocks into it with one fused kernel per transfer (``scatter_blocks``: one Triton
  program per block row and chunk; ``index_copy_`` where Triton is missing), then
  synchronises the stream, so a caller that reports completion after
  ``write_blocks`` returns never reports KV that is still in flight.

Where the writer computes on another card than the owner's (a box with several GPUs), the
descriptor names the owner's card by UUID and the writer picks a route (``choose_route``):
``same`` (one card), ``peer`` (the handle is opened on the writer's own device, which maps the
owner's memory through peer access, NVLink or PCIe, so the same one kernel writes across), or
``host`` where the two cards have no peer access: blocks go through a pinned host buffer of the
writer's (device-to-host on its card, host-to-device on the owner's card, then the scatter
kernel there), logged once. ``DYN_ACTOR_KV_ROUTE=host`` forces the host route (to test and
measure it on one card).

An IPC handle cannot be opened by the process that exported it: owner and writer are
always two processes. Run on an H100 (``scripts/gpu_check.sh``, logs in docs/gpu-runs):
the tests pass; the move kernel reaches 0.80-0.82x of a device copy at 512 MiB with the ids on
the device (docs/benchmarks.md).
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Callable, Sequence

import torch

from dyn_actor.kv.descriptor import CudaIpcHandle, KvPoolDescriptor
from dyn_actor.kv.pool import DTYPES, KvLayout, KvPool, RemotePool

# --------------------------------------------------------------------------- scatter kernel
_kernel = None


def _triton_kernel():
    global _kernel
    if _kernel is None:
        try:
            import triton
            import triton.language as tl
        except ImportError:
            _kernel = False
            return _kernel

        @triton.jit
        def scatter_rows(dst, src, ids, row_words, BLOCK: tl.constexpr):
            row = tl.program_id(0)
            chunk = tl.program_id(1)
            dst_row = tl.load(ids + row).to(tl.int64)
            offs = chunk * BLOCK + tl.arange(0, BLOCK)
            mask = offs < row_words
            vals = tl.load(src + row.to(tl.int64) * row_words + offs, mask=mask)
            tl.store(dst + dst_row * row_words + offs, vals, mask=mask)

        @triton.jit
        def move_rows(dst, src, dst_ids, src_ids, row_words, BLOCK: tl.constexpr):
            row = tl.program_id(0)
            chunk = tl.program_id(1)
            d = tl.load(dst_ids + row).to(tl.int64)
            s = tl.load(src_ids + row).to(tl.int64)
            offs = chunk * BLOCK + tl.arange(0, BLOCK)
            mask = offs < row_words
            tl.store(dst + d * row_words + offs, tl.load(src + s * row_words + offs, mask=mask), mask=mask)

        _kernel = (triton, scatter_rows, move_rows)
    return _kernel


def _words(t: torch.Tensor, rows: int) -> torch.Tensor:
    """``t`` as ``[rows, words]`` of the widest integer type that divides a row."""
    flat = t.view(torch.uint8).view(rows, -1)
    for dtype, size in ((torch.int64, 8), (torch.int32, 4), (torch.int16, 2)):
        if flat.shape[1] % size == 0:
            return flat.view(dtype)
    return flat


def scatter_blocks(dst: torch.Tensor, src: torch.Tensor, ids: torch.Tensor, use_triton: bool = True) -> None:
    """``dst[ids[i]] = src[i]`` for whole blocks (dim 0), both contiguous on one CUDA device: one launch."""
    n = src.shape[0]
    if n == 0:
        return
    kernel = _triton_kernel() if use_triton else False
    if not kernel:
        dst.index_copy_(0, ids, src)
        return
    triton, scatter_rows, _ = kernel
    d, s = _words(dst, dst.shape[0]), _words(src, n)
    row_words = s.shape[1]
    block = 4096 if row_words >= 4096 else triton.next_power_of_2(row_words)
    grid = (n, triton.cdiv(row_words, block))
    scatter_rows[grid](d, s, ids, row_words, BLOCK=block, num_warps=8 if block >= 2048 else 4)


# (block words, warps) of the move kernel, by row size in bytes; see benchmarks/kv_transfer.py --sweep
MOVE_CONFIG = {"small": (1024, 4), "large": (4096, 8)}


def move_blocks(dst: torch.Tensor, src: torch.Tensor, dst_ids: torch.Tensor, src_ids: torch.Tensor,
                use_triton: bool = True, config: tuple[int, int] | None = None) -> None:
    """``dst[dst_ids[i]] = src[src_ids[i]]`` for whole blocks of two pools of one dtype and block shape:
    one kernel reading source rows and writing destination rows, no staging tensor. Without Triton,
    ``index_copy_`` of an ``index_select`` (one staging copy)."""
    n = dst_ids.shape[0]
    if n == 0:
        return
    kernel = _triton_kernel() if use_triton else False
    if not kernel:
        dst.index_copy_(0, dst_ids, src.index_select(0, src_ids))
        return
    triton, _, move_rows = kernel
    d, s = _words(dst, dst.shape[0]), _words(src, src.shape[0])
    row_words = d.shape[1]
    if config is None:
        config = MOVE_CONFIG["small" if d.shape[1] * d.element_size() <= 65536 else "large"]
    block = min(config[0], triton.next_power_of_2(row_words))
    grid = (n, triton.cdiv(row_words, block))
    move_rows[grid](d, s, dst_ids, src_ids, row_words, BLOCK=block, num_warps=config[1])


# ---------------------------------------------------------------------------- cards and routes
log = logging.getLogger(__name__)
ROUTE_ENV = "DYN_ACTOR_KV_ROUTE"
# the host route's pinned buffer holds at most this much at a time (the environment sets it for tests)
HOST_CHUNK_BYTES = int(os.environ.get("DYN_ACTOR_KV_HOST_CHUNK_BYTES", 64 << 20))
_logged_routes: set[tuple[str, str]] = set()


def card_id(index: int) -> str:
    """A CUDA device's identity that does not depend on ``CUDA_VISIBLE_DEVICES`` (its UUID)."""
    props = torch.cuda.get_device_properties(index)
    ident = getattr(props, "uuid", None)
    if ident is not None:
        return str(ident)
    return f"pci-{props.pci_domain_id}:{props.pci_bus_id}:{props.pci_device_id}"


def near_cards(own: int) -> list[str]:
    """The cards a writer computing on device ``own`` reaches without host staging: its own, then
    those it has peer access to (what its pulls name, so the queue prefers their requests)."""
    n = torch.cuda.device_count()
    return [card_id(own)] + [card_id(i) for i in range(n) if i != own and torch.cuda.can_device_access_peer(own, i)]


def choose_route(own: int, owner_card: str, cards: Sequence[str], can_peer: Callable[[int, int], bool],
                 forced: str | None = None) -> tuple[int, str]:
    """How a writer computing on its device ``own`` reaches a pool on ``owner_card``, given the
    cards it sees (``cards[i]`` is device i's id): (the device to open the handle on, the route).
    ``same``: one card; ``peer``: opened on ``own`` (the driver maps the owner's memory through
    peer access), one kernel writes across; ``host``: opened on the owner's card, blocks staged
    through pinned host memory. ``forced="host"`` takes the host route on any card pair."""
    if forced not in (None, "", "host"):
        raise ValueError(f"{ROUTE_ENV}={forced!r}: only 'host' can be forced")
    if not owner_card:  # a descriptor that does not name its card: the writer's own card (one-card boxes)
        owner = own
    elif owner_card in cards:
        owner = list(cards).index(owner_card)
    else:
        raise RuntimeError(f"the KV pool's card {owner_card} is not visible to this process (it sees "
                           f"{len(cards)}: {', '.join(cards) or 'none'}; CUDA_VISIBLE_DEVICES="
                           f"{os.environ.get('CUDA_VISIBLE_DEVICES', '')!r})")
    if forced == "host":
        return owner, "host"
    if owner == own:
        return own, "same"
    if can_peer(own, owner):
        return own, "peer"
    return owner, "host"


def _log_route_once(src_card: str, owner_card: str, route: str, why: str) -> None:
    if (src_card, owner_card) in _logged_routes:
        return
    _logged_routes.add((src_card, owner_card))
    log.warning("KV from card %s into card %s goes through pinned host memory (%s)", src_card, owner_card, why)


# ---------------------------------------------------------------------------- the pools
def export_storage(storage: torch.UntypedStorage) -> CudaIpcHandle:
    """A CUDA storage's IPC handle as plain data (torch's storage sharing)."""
    dev, handle, size, offset, rc_handle, rc_offset, ev_handle, ev_sync = storage._share_cuda_()
    return CudaIpcHandle(int(dev), bytes(handle), int(size), int(offset), bytes(rc_handle), int(rc_offset),
                         None if ev_handle is None else bytes(ev_handle), bool(ev_sync))


def msgspec_replace_device(h: CudaIpcHandle, device: int) -> CudaIpcHandle:
    """``h`` to be opened on this process's device ``device`` (the owner's index means nothing here)."""
    import msgspec

    return msgspec.structs.replace(h, device=device)


def open_storage(h: CudaIpcHandle) -> torch.UntypedStorage:
    """Another process's CUDA storage, from its ``export_storage`` handle (not in the exporting process)."""
    torch.cuda._lazy_init()
    return torch.UntypedStorage._new_shared_cuda(
        h.device, h.handle, h.size_bytes, h.offset_bytes, h.ref_counter_handle, h.ref_counter_offset,
        h.event_handle, h.event_sync_required)


class CudaKvPool(KvPool):
    """A ``KvPool`` in device memory that other processes can open by IPC handle."""

    def __init__(self, layout: KvLayout, device: str | torch.device = "cuda") -> None:
        super().__init__(layout, device=device)
        if self.data.device.type != "cuda":
            raise ValueError(f"CudaKvPool needs a CUDA device, got {self.data.device}")
        self._name = f"cuda-{os.getpid()}-{uuid.uuid4().hex[:8]}"

    def descriptor(self):
        ipc = export_storage(self.data.untyped_storage())
        # the name tells pools apart in a writer that maps several: two decode workers' pools can have
        # the same device index (each sees only its card) and offset
        return KvPoolDescriptor("cuda_ipc", self._name, list(self.layout.shape),
                                str(self.layout.dtype).removeprefix("torch."), device=ipc.device, cuda=ipc,
                                card=card_id(ipc.device))

    def close(self) -> None:
        self.data = self.k = self.v = self.k_rows = self.v_rows = None  # type: ignore[assignment]


class RemoteCudaKvPool(RemotePool):
    """Another process's device pool, opened once by IPC handle; blocks are written in place, on
    the route ``choose_route`` picks (``route``: same, peer or host)."""

    def __init__(self, desc, own_device: int | None = None) -> None:
        if desc.kind != "cuda_ipc" or desc.cuda is None:
            raise ValueError(f"not a CUDA IPC descriptor: {desc.kind!r}")
        torch.cuda._lazy_init()
        own = torch.cuda.current_device() if own_device is None else own_device
        cards = [card_id(i) for i in range(torch.cuda.device_count())]
        at, self.route = choose_route(own, desc.card, cards, torch.cuda.can_device_access_peer,
                                      os.environ.get(ROUTE_ENV) or None)
        try:
            storage = open_storage(msgspec_replace_device(desc.cuda, at))
        except RuntimeError as e:
            if self.route != "peer":
                raise
            # the driver would not map it across (peer access refused): through host memory instead
            at, self.route = cards.index(desc.card), "host"
            _log_route_once(cards[own], desc.card, self.route, f"opening it on cuda:{own} failed: {e}")
            storage = open_storage(msgspec_replace_device(desc.cuda, at))
        if self.route == "host":
            _log_route_once(cards[own], desc.card or cards[own], self.route,
                            "forced by " + ROUTE_ENV if os.environ.get(ROUTE_ENV) else "no peer access between them")
        dtype = DTYPES[desc.dtype]
        typed = torch.storage.TypedStorage(wrap_storage=storage, dtype=dtype, _internal=True)
        shape = tuple(desc.shape)
        stride, acc = [], 1
        for s in reversed(shape):
            stride.append(acc)
            acc *= s
        self.data: torch.Tensor = torch._utils._rebuild_tensor(typed, 0, shape, tuple(reversed(stride)))
        self.descriptor = desc
        self.device = self.data.device
        self.own_device = torch.device("cuda", own)
        self._pinned: torch.Tensor | None = None  # block ids on their way to the device
        self._staging: torch.Tensor | None = None  # the host route's pinned buffer (bytes)

    def _scatter(self, block_ids: list[int], blocks: torch.Tensor) -> None:
        """One kernel, and the stream synchronised: nothing is reported before the writes are done."""
        src = blocks.to(device=self.device, dtype=self.data.dtype).contiguous()
        ids = torch.as_tensor(block_ids, dtype=torch.int64).to(self.device, non_blocking=True)
        with torch.cuda.device(self.device):
            scatter_blocks(self.data, src, ids)
            torch.cuda.current_stream(self.device).synchronize()

    def _accepts(self, src: torch.Tensor) -> bool:
        """A source pool that ``_move`` reads as it is: on the device the handle was opened on, or on
        any card for the host route (which stages it)."""
        return src.device == self.device or (self.route == "host" and src.device.type == "cuda")

    def _move(self, block_ids: list[int], src: torch.Tensor, src_ids: list[int]) -> None:
        """Straight from the writer's own pool into this one: the two id lists in one host-to-device
        copy (through a pinned buffer), one kernel, then the stream is synchronised. On the host
        route, through pinned host memory instead (``_move_through_host``)."""
        if self.route == "host":
            self._move_through_host(block_ids, src, src_ids)
            return
        ids = self._device_ids(block_ids, src_ids)
        with torch.cuda.device(self.device):
            move_blocks(self.data, src, ids[0], ids[1])
            torch.cuda.current_stream(self.device).synchronize()

    def _move_through_host(self, block_ids: list[int], src: torch.Tensor, src_ids: list[int]) -> None:
        """For two cards without peer access: in chunks of at most ``HOST_CHUNK_BYTES``, the source
        blocks gathered on the writer's card, copied into a pinned host buffer, copied from it onto
        the owner's card and scattered there; both streams synchronised before the next chunk, so
        the buffer is free again and nothing is in flight on return."""
        block = self.block_nbytes
        per = max(1, HOST_CHUNK_BYTES // block)
        if self._staging is None or self._staging.numel() < min(per, len(block_ids)) * block:
            self._staging = torch.empty(min(per, len(block_ids)) * block, dtype=torch.uint8).pin_memory()
        for lo in range(0, len(block_ids), per):
            dst_ids, s_ids = block_ids[lo:lo + per], src_ids[lo:lo + per]
            n = len(dst_ids)
            host = self._staging[:n * block].view(self.data.dtype).view(n, *self.data.shape[1:])
            with torch.cuda.device(src.device):
                gathered = src.index_select(0, torch.as_tensor(s_ids, dtype=torch.int64).to(src.device))
                host.copy_(gathered, non_blocking=True)
                torch.cuda.current_stream(src.device).synchronize()
            with torch.cuda.device(self.device):
                ids = torch.as_tensor(dst_ids, dtype=torch.int64).to(self.device, non_blocking=True)
                scatter_blocks(self.data, host.to(self.device, non_blocking=True), ids)
                torch.cuda.current_stream(self.device).synchronize()

    def _device_ids(self, *lists: Sequence[int]) -> torch.Tensor:
        n = len(lists[0])
        need = len(lists) * n
        if self._pinned is None or self._pinned.numel() < need:
            self._pinned = torch.empty(max(need, 4096), dtype=torch.int64).pin_memory()
        host = self._pinned[:need].numpy().reshape(len(lists), n)
        for row, ids in zip(host, lists):
            row[:] = ids
        return self._pinned[:need].view(len(lists), n).to(self.device, non_blocking=True)

    def read_blocks(self, block_ids: Sequence[int]) -> torch.Tensor:
        ids = torch.as_tensor(list(block_ids), dtype=torch.int64, device=self.device)
        return self.data.index_select(0, ids)

    def close(self) -> None:
        self.data = None  # type: ignore[assignment]
