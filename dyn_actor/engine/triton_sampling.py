"""Top-p thresholds of whole rows found on the device, in Triton, without a host round trip.

``sampling.apply_top_k_top_p`` finds each row's nucleus among its 128 largest logits. A row whose
nucleus reaches past them (a flat distribution) needs the whole row, and learning which rows those
are means a device-to-host copy: on a GPU with overlapped steps, a wait for the step that should
have run ahead. This kernel takes the question off the host: one program a row, which returns at
once where the candidates sufficed, and otherwise finds the row's exact threshold by bisection.

The threshold ``t`` of a row is the smallest of its values whose likelier mass (the probability
of the tokens strictly above it) stays below ``p``: the nucleus is every token ``>= t``, ties with
the last one kept included, as on the candidates. That mass only changes at the row's own values.
The search runs over the float32 values' ordered bit patterns (a monotone map to integers, so the
answer is one of the row's values exactly, not a rounded float): each pass over the row sums the
mass above 16 evenly spaced points of the interval left, along with the nearest values on either
side of each point, and keeps the part between the last point whose mass reaches ``p`` and the
next; it stops when that part holds one distinct value of the row. Each pass cuts the interval
15-fold, so a pass or two narrows it to the values of the row, and at most 9 find the bit pattern
(32 bits). No sort, a grid of one program a row whatever the data, nothing copied back. Runs under
Triton's interpreter on the CPU for tests.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _ordered(x):
    """float32 -> int32 in the same order (negative floats' bits flipped but for the sign)."""
    bits = x.to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def _top_p_threshold_kernel(X, s_x, V, LSE, P, TOP, NEED, T, BLOCK: tl.constexpr, KP: tl.constexpr):
    row = tl.program_id(0)
    if tl.load(NEED + row) != 0:
        lse = tl.load(LSE + row)
        p = tl.load(P + row)
        offs = tl.arange(0, BLOCK)
        j = tl.arange(0, KP)
        big = tl.full([], 2147483647, tl.int32)
        # (lo, hi] holds the answer: the mass above hi (the row's largest value) is 0 < p, above lo
        # (just below -inf's key) all of it. (Starting from the row's smallest value instead would
        # cost a pass over every row, where the search runs only for the rare wide ones, and saves
        # at most a pass of those.)
        lo = _ordered(tl.full([], float("-inf"), tl.float32)).to(tl.int64) - 1
        hi = _ordered(tl.load(TOP + row)).to(tl.int64)
        ans = hi.to(tl.int32)
        done = lo >= hi
        passes = 0
        while (done == 0) & (passes < 12):
            pts = (lo + ((hi - lo) * j) // (KP - 1)).to(tl.int32)  # pts[0] = lo, pts[KP - 1] = hi
            # per point and lane, reduced across lanes once per pass: the mass of the tokens above the
            # point, the smallest key above it and the largest at or below it
            mass_l = tl.zeros([KP, BLOCK], dtype=tl.float32)
            above_l = tl.full([KP, BLOCK], 2147483647, tl.int32)
            below_l = -above_l
            for start in range(0, V, BLOCK):
                m = start + offs < V
                x = tl.load(X + row * s_x + start + offs, mask=m, other=float("-inf"))
                k = _ordered(x)
                e = tl.where(m, tl.exp(x - lse), 0.0)
                above = k[None, :] > pts[:, None]
                mass_l += tl.where(above, e[None, :], 0.0)
                above_l = tl.minimum(above_l, tl.where(above & m[None, :], k[None, :], big))
                below_l = tl.maximum(below_l, tl.where(above | ~m[None, :], -big, k[None, :]))
            mass = tl.sum(mass_l, 1)
            nearest_above = tl.min(above_l, 1)
            nearest_below = tl.max(below_l, 1)
            # the last point whose mass reaches p (none: the row's total fell short of p by rounding,
            # and every token stays); the answer lies past it, at or before the next point
            at = tl.minimum(tl.max(tl.where(mass >= p, j, -1), 0), KP - 2)
            first = tl.sum(tl.where(j == tl.maximum(at, 0), nearest_above, 0), 0)
            last = tl.sum(tl.where(j == at + 1, nearest_below, 0), 0)
            ans = first
            done = (at < 0) | (first >= last)
            lo_next = tl.sum(tl.where(j == at, pts, 0), 0).to(tl.int64)
            hi = tl.sum(tl.where(j == at + 1, pts, 0), 0).to(tl.int64)
            lo = lo_next
            passes += 1
        key = ans.to(tl.int32)
        tl.store(T + row, (key ^ ((key >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True))


def top_p_thresholds(x: torch.Tensor, lse: torch.Tensor, top_p: torch.Tensor, top: torch.Tensor,
                     need: torch.Tensor, thresh: torch.Tensor) -> None:
    """For the rows of float32 ``x`` (``[n, vocab]``) where ``need`` (``[n]`` bool) is set, write into
    ``thresh`` (``[n]`` float32, contiguous) the row's top-p threshold over the whole row: ``lse`` its
    logsumexp, ``top_p`` its p, ``top`` its largest value (all ``[n]``). Other rows keep theirs."""
    n, vocab = x.shape
    if n == 0:
        return
    if x.stride(1) != 1:
        x = x.contiguous()
    f32 = torch.float32
    _top_p_threshold_kernel[(n,)](x, x.stride(0), vocab, lse.to(f32).contiguous(), top_p.to(f32).contiguous(),
                                  top.to(f32).contiguous(), need.to(torch.int8).contiguous(), thresh,
                                  BLOCK=min(256, triton.next_power_of_2(vocab)), KP=16, num_warps=8)
