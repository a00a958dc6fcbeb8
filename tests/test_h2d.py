"""The step's host-to-device packing (``h2d.to_device_many``): each tensor comes back equal, in its
shape, with one buffer (so one copy) per dtype. Run on the CPU with pinning off; on a GPU the same
packing feeds one pinned, non-blocking copy per dtype."""

from __future__ import annotations

import torch

from dyn_actor.engine.h2d import to_device, to_device_many


def test_packing_keeps_values_and_shapes_one_buffer_per_dtype():
    ts = [torch.arange(5), None, torch.tensor([[1, 2, 3], [4, 5, 6]]), torch.ones(2, 1, 1, 4),
          torch.tensor([True, False]), torch.arange(0), torch.tensor([7], dtype=torch.long)]
    out = to_device_many(ts, torch.device("cpu"), pin=False)
    assert out[1] is None
    for t, o in zip(ts, out):
        if t is not None:
            assert o.shape == t.shape and o.dtype == t.dtype and torch.equal(o, t)
    longs = [o for o, t in zip(out, ts) if t is not None and t.dtype == torch.long]
    assert len({o.untyped_storage().data_ptr() for o in longs}) == 1  # one buffer, one copy
    assert all(o is not t for o, t in zip(out, ts) if t is not None)


def test_cpu_is_left_alone():
    t = torch.arange(3)
    assert to_device(t, torch.device("cpu")) is t
    assert to_device_many([t, None], torch.device("cpu"))[0] is t
