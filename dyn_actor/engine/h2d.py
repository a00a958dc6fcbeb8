"""Host-to-device copies that never make the host wait for the device.

A copy from pageable host memory may make the CUDA driver wait for the stream's queued work before
it stages the data ("If pageable memory must first be staged to pinned memory, the driver may
synchronize with the stream", CUDA's API synchronization behavior). With overlapped steps the
stream holds the step in flight, so such a copy would wait for that step: the overlap lost without
a sign. What the engine sends each step goes through pinned memory instead (PyTorch's caching host
allocator, whose blocks are reused only once the copy that read them has run), in as few copies as
it can: tensors of one dtype are packed into one pinned buffer, copied over at once and viewed
apart on the device. On the CPU both functions return their input.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def to_device(t: torch.Tensor, dev: torch.device) -> torch.Tensor:
    """``t`` (a CPU tensor) on ``dev``, through pinned memory, not waited for."""
    if dev.type == "cpu":
        return t
    return t.pin_memory().to(dev, non_blocking=True)


def to_device_many(tensors: Sequence[torch.Tensor | None], dev: torch.device,
                   pin: bool = True) -> list[torch.Tensor | None]:
    """Each of ``tensors`` (CPU tensors, or None) on ``dev``: one pinned buffer and one copy per dtype.
    ``pin=False`` packs without pinning (tests run the packing on the CPU with it)."""
    if dev.type == "cpu" and pin:
        return list(tensors)
    groups: dict[torch.dtype, list[int]] = {}
    for i, t in enumerate(tensors):
        if t is not None:
            groups.setdefault(t.dtype, []).append(i)
    out: list[torch.Tensor | None] = [None] * len(tensors)
    for dtype, idx in groups.items():
        total = sum(tensors[i].numel() for i in idx)
        host = torch.empty(total, dtype=dtype, pin_memory=pin)
        torch.cat([tensors[i].reshape(-1) for i in idx], out=host)
        flat = host.to(dev, non_blocking=True)
        at = 0
        for i in idx:
            n = tensors[i].numel()
            out[i] = flat[at:at + n].view(tensors[i].shape)
            at += n
    return out
