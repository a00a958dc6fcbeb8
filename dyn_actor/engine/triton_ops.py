"""Fused elementwise kernels of the GPU forward pass, in Triton.

A decode step of a small model on a GPU is a few large matrix products and many small
elementwise kernels (norms, RoPE, the KV write, the gated MLP's activation, residual adds), each
a few microseconds, so together a third of the step. Three kernels replace them:

- ``add_rms_norm``: the residual add and the next RMSNorm in one pass over the row;
- ``rope_and_store``: RoPE on the query and key heads of every token (after each head's RMSNorm
  where the model has one, as Qwen3), the query written back in place, the key and value written
  straight into their KV slots;
- ``silu_mul``: SiLU(gate) * up of the gated MLP.

Each rounds where PyTorch's sequence of ops rounds (to the activations' dtype after the add,
after the normalisation, after SiLU), so that bf16 results stay close to the unfused path and
float32 results equal it to within a few ulps. They run on the CPU under Triton's interpreter
for tests.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _add_rms_norm_kernel(X, DX, W, H, s_x, s_dx, s_h, N, eps, HAS_DX: tl.constexpr, BLOCK: tl.constexpr,
                         ROUND_FIRST: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    m = cols < N
    x = tl.load(X + row * s_x + cols, mask=m, other=0.0).to(tl.float32)
    if HAS_DX:
        y = (x + tl.load(DX + row * s_dx + cols, mask=m, other=0.0).to(tl.float32)).to(X.dtype.element_ty)
        tl.store(X + row * s_x + cols, y, mask=m)
        x = y.to(tl.float32)
    r = 1.0 / tl.sqrt(tl.sum(x * x, 0) / N + eps)
    h = x * r
    if ROUND_FIRST:  # a weight in the activations' dtype multiplies the rounded rows (Llama); float32 (Gemma) not
        h = h.to(H.dtype.element_ty).to(tl.float32)
    w = tl.load(W + cols, mask=m, other=0.0).to(tl.float32)
    tl.store(H + row * s_h + cols, (h * w).to(H.dtype.element_ty), mask=m)


def add_rms_norm(x: torch.Tensor, dx: torch.Tensor | None, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``x += dx`` in place (when ``dx`` is given), then return ``rms_norm(x) * weight``. ``x`` and
    ``dx`` are ``[T, N]`` with contiguous rows. A float32 ``weight`` (Gemma's ``1 + w``) multiplies
    before the result is rounded to ``x``'s dtype, one in that dtype after (as transformers does each)."""
    t, n = x.shape
    h = torch.empty_like(x)
    if t == 0:
        return h
    block = triton.next_power_of_2(n)
    _add_rms_norm_kernel[(t,)](x, x if dx is None else dx, weight, h, x.stride(0), 0 if dx is None else dx.stride(0),
                               h.stride(0), n, eps, HAS_DX=dx is not None, BLOCK=block,
                               ROUND_FIRST=weight.dtype != torch.float32,
                               num_warps=8 if block >= 2048 else 4)
    return h


@triton.jit
def _rope_store_kernel(QKV, COS, SIN, POS, SB, SO, KC, VC, QN, KN, eps,
                       s_t, s_cos, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh,
                       NH: tl.constexpr, NKV: tl.constexpr, D: tl.constexpr, HP: tl.constexpr, KP: tl.constexpr,
                       QK_NORM: tl.constexpr, ROUND_FIRST: tl.constexpr):
    t = tl.program_id(0)
    half: tl.constexpr = D // 2
    pos = tl.load(POS + t).to(tl.int64)
    j = tl.arange(0, half)
    c = tl.load(COS + pos * s_cos + j).to(tl.float32)
    s = tl.load(SIN + pos * s_cos + j).to(tl.float32)  # sin with rotate_half's sign: -sin in this half
    hd = tl.arange(0, HP)[:, None]
    hm = hd < NH + NKV
    base = QKV + t * s_t + hd * D + j[None, :]
    x1 = tl.load(base, mask=hm, other=0.0).to(tl.float32)
    x2 = tl.load(base + half, mask=hm, other=0.0).to(tl.float32)
    dt = QKV.dtype.element_ty
    if QK_NORM:
        # each head's RMSNorm, rounded as PyTorch's: normalised in float32, to the dtype, times the weight
        r = 1.0 / tl.sqrt((tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1)) / D + eps)
        isq = hd < NH
        w1 = tl.where(isq, tl.load(QN + j)[None, :].to(tl.float32), tl.load(KN + j)[None, :].to(tl.float32))
        w2 = tl.where(isq, tl.load(QN + half + j)[None, :].to(tl.float32),
                      tl.load(KN + half + j)[None, :].to(tl.float32))
        x1 = x1 * r[:, None]
        x2 = x2 * r[:, None]
        if ROUND_FIRST:  # as ``add_rms_norm``: Gemma's float32 weights multiply before rounding
            x1 = x1.to(dt).to(tl.float32)
            x2 = x2.to(dt).to(tl.float32)
        x1 = (x1 * w1).to(dt).to(tl.float32)
        x2 = (x2 * w2).to(dt).to(tl.float32)
    # as PyTorch's x*cos (rounded) + roll(x)*sin_signed (one rounding)
    o1 = ((x1 * c[None, :]).to(dt).to(tl.float32) + x2 * s[None, :]).to(dt)
    o2 = ((x2 * c[None, :]).to(dt).to(tl.float32) - x1 * s[None, :]).to(dt)
    qm = hd < NH
    tl.store(base, o1, mask=qm)
    tl.store(base + half, o2, mask=qm)
    blk = tl.load(SB + t).to(tl.int64)
    off = tl.load(SO + t).to(tl.int64)
    km = hm & (hd >= NH)
    kbase = KC + blk * s_kb + off * s_kt + (hd - NH) * s_kh + j[None, :]
    tl.store(kbase, o1.to(KC.dtype.element_ty), mask=km)
    tl.store(kbase + half, o2.to(KC.dtype.element_ty), mask=km)
    hv = tl.arange(0, KP)[:, None]
    vm = hv < NKV
    dd = tl.arange(0, D)[None, :]
    v = tl.load(QKV + t * s_t + (NH + NKV) * D + hv * D + dd, mask=vm, other=0.0)
    tl.store(VC + blk * s_vb + off * s_vt + hv * s_vh + dd, v.to(VC.dtype.element_ty), mask=vm)


def rope_and_store(qkv: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor, positions: torch.Tensor,
                   slot_blocks: torch.Tensor, slot_offsets: torch.Tensor, k_cache: torch.Tensor,
                   v_cache: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int,
                   q_norm: torch.Tensor | None = None, k_norm: torch.Tensor | None = None, eps: float = 1e-6) -> None:
    """``qkv`` ``[T, (NH + 2 NKV) * D]`` (rows contiguous): RoPE on the query heads in place, and the
    rotated keys and the values written to ``k_cache`` / ``v_cache`` ``[blocks, bs, NKV, D]`` at
    ``(slot_blocks[t], slot_offsets[t])``. ``cos`` / ``sin_signed`` ``[max_len, D]`` tables. With
    ``q_norm`` and ``k_norm`` (``[D]`` each), every query and key head is RMS-normalised with them
    first (Qwen3)."""
    t = qkv.shape[0]
    if t == 0:
        return
    if qkv.stride(1) != 1 or k_cache.stride(3) != 1 or v_cache.stride(3) != 1 or cos.stride(1) != 1:
        raise ValueError("rope_and_store needs contiguous rows and head dimensions")
    qk_norm = q_norm is not None
    if qk_norm != (k_norm is not None):
        raise ValueError("rope_and_store takes both q_norm and k_norm or neither")
    _rope_store_kernel[(t,)](
        qkv, cos, sin_signed, positions, slot_blocks, slot_offsets, k_cache, v_cache,
        q_norm if qk_norm else cos, k_norm if qk_norm else cos, float(eps),
        qkv.stride(0), cos.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        NH=num_heads, NKV=num_kv_heads, D=head_dim, HP=triton.next_power_of_2(num_heads + num_kv_heads),
        KP=triton.next_power_of_2(num_kv_heads), QK_NORM=qk_norm,
        ROUND_FIRST=not qk_norm or q_norm.dtype != torch.float32, num_warps=4)


@triton.jit
def _silu_mul_kernel(GU, OUT, inter, s_gu, s_o, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = cols < inter
    g = tl.load(GU + row * s_gu + cols, mask=m, other=0.0).to(tl.float32)
    u = tl.load(GU + row * s_gu + inter + cols, mask=m, other=0.0).to(tl.float32)
    dt = OUT.dtype.element_ty
    a = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32)
    tl.store(OUT + row * s_o + cols, (a * u).to(dt), mask=m)


def silu_mul(gu: torch.Tensor) -> torch.Tensor:
    """``silu(gu[:, :I]) * gu[:, I:]`` for ``gu`` ``[T, 2I]`` with contiguous rows."""
    t, two_i = gu.shape
    inter = two_i // 2
    out = torch.empty((t, inter), dtype=gu.dtype, device=gu.device)
    if t == 0:
        return out
    block = min(1024, triton.next_power_of_2(inter))
    _silu_mul_kernel[(t, triton.cdiv(inter, block))](gu, out, inter, gu.stride(0), out.stride(0), BLOCK=block,
                                                      num_warps=4)
    return out
