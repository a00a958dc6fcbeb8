"""The experts of a sparse MoE layer on the Triton path: grouped matrix products, no host sync.

A step's (token, expert) assignments, ``T * top_k`` of them, are grouped by expert on the device:
the assignment ids sorted by expert, each expert's count and first position, and each expert's
rows padded to a whole number of ``BLOCK_M`` tiles. A tile belongs to one expert, so one program
multiplies up to ``BLOCK_M`` of that expert's rows by one ``BLOCK_N`` slice of its weights,
reading them once for all its rows. The grid is sized for the worst case
(``ceil(T * top_k / BLOCK_M) + E`` tiles: every expert may waste one partial tile), and tiles past
the last expert's return at once, so nothing depends on the data's shape on the host and a decode
step with experts is captured in a CUDA graph like any other.

Two launches a layer: the gate/up product (rows read from the token's hidden row), then, after
SiLU-mul, the down product (rows read from the assignment's activation, scaled by its routing
weight); the ``top_k`` weighted rows of each token are summed at the end. Float32 products use
IEEE precision, so float32 results match the loop of ``moe.experts_loop`` to rounding.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
import triton
import triton.language as tl


@triton.jit
def _grouped_gemm_kernel(X, W, OUT, SORTED, BLOCK_EXPERT, TILE_START, START, COUNT, SCALE,
                         N, K, E, s_x, s_we, s_wn, s_out,
                         ROW_DIV: tl.constexpr, HAS_SCALE: tl.constexpr, IEEE: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    tile = tl.program_id(0)
    e = tl.load(BLOCK_EXPERT + tile)
    if e >= E:  # a tile past the last expert's: nothing to do
        return
    i = (tile - tl.load(TILE_START + e)) * BLOCK_M + tl.arange(0, BLOCK_M)  # rows within the expert
    valid = i < tl.load(COUNT + e)
    a = tl.load(SORTED + tl.load(START + e) + i, mask=valid, other=0)  # assignment ids
    row = a // ROW_DIV  # the input row: the token (ROW_DIV = top_k) or the assignment itself (1)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    w_base = W + e.to(tl.int64) * s_we
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < K
        x = tl.load(X + row[:, None].to(tl.int64) * s_x + k[None, :], mask=valid[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_base + n[None, :] * s_wn + k[:, None], mask=n_ok[None, :] & k_ok[:, None], other=0.0)
        if IEEE:  # float32 (and anything under the interpreter, whose bf16 products are wrong)
            acc += tl.dot(x.to(tl.float32), w.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(x, w)
    if HAS_SCALE:
        acc = acc.to(OUT.dtype.element_ty).to(tl.float32)  # round as the loop's product does, then scale
        acc = acc * tl.load(SCALE + a, mask=valid, other=0.0).to(tl.float32)[:, None]
    tl.store(OUT + a[:, None].to(tl.int64) * s_out + n[None, :], acc.to(OUT.dtype.element_ty),
             mask=valid[:, None] & n_ok[None, :])


_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _block_m(assignments: int) -> int:
    return 16 if assignments <= 1024 else 64


def group_by_expert(experts: torch.Tensor, num_experts: int, block_m: int):
    """The device-side grouping (fixed sizes, no host sync): assignment ids sorted by expert, each
    expert's first position and count, its first tile, and each tile's expert (``num_experts`` past
    the end)."""
    flat = experts.reshape(-1)
    n = flat.shape[0]
    order = torch.argsort(flat, stable=True).to(torch.int32)
    counts = torch.zeros(num_experts, dtype=torch.int32, device=flat.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
    start = torch.cumsum(counts, 0, dtype=torch.int32) - counts
    tiles = (counts + block_m - 1) // block_m
    tiles_end = torch.cumsum(tiles, 0, dtype=torch.int32)
    max_tiles = triton.cdiv(n, block_m) + num_experts
    tile_ids = torch.arange(max_tiles, dtype=torch.int32, device=flat.device)
    block_expert = torch.searchsorted(tiles_end, tile_ids, right=True).to(torch.int32)
    return order, start, counts, tiles_end - tiles, block_expert


def grouped_gemm(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor, groups, row_div: int,
                 scale: torch.Tensor | None, block_m: int) -> torch.Tensor:
    """``out[a] = x[a // row_div] @ w[expert(a)].T`` (times ``scale[a]``) for every assignment ``a``."""
    order, start, counts, tile_start, block_expert = groups
    e, n, k = w.shape
    block_n = min(64, max(16, triton.next_power_of_2(n)))
    block_k = min(64, max(16, triton.next_power_of_2(k)))
    grid = (block_expert.shape[0], triton.cdiv(n, block_n))
    _grouped_gemm_kernel[grid](
        x, w, out, order, block_expert, tile_start, start, counts, scale if scale is not None else out,
        n, k, e, x.stride(0), w.stride(0), w.stride(1), out.stride(0),
        ROW_DIV=row_div, HAS_SCALE=scale is not None, IEEE=x.dtype == torch.float32 or _INTERPRET,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4,
    )
    return out


def fused_experts(h: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor,
                  experts: torch.Tensor, silu_mul: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``moe.experts_loop``'s result through two grouped products (see the module's docstring)."""
    t, top_k = experts.shape
    assignments = t * top_k
    if t == 0:
        return torch.zeros_like(h)
    block_m = _block_m(assignments)
    groups = group_by_expert(experts, w13.shape[0], block_m)
    gu = torch.empty((assignments, w13.shape[1]), dtype=h.dtype, device=h.device)
    grouped_gemm(h, w13, gu, groups, top_k, None, block_m)
    act = silu_mul(gu)
    y = torch.empty((assignments, w2.shape[1]), dtype=h.dtype, device=h.device)
    grouped_gemm(act, w2, y, groups, 1, weights.reshape(-1).contiguous(), block_m)
    return y.view(t, top_k, -1).sum(dim=1)
