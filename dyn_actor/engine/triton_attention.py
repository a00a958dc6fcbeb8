"""Paged attention kernels of our own, in Triton, over the pool's layout (``dyn_actor.kv.pool``).

The KV of one layer is a strided view ``[num_blocks, block_size, num_kv_heads, head_dim]`` of the
pool (one block of all layers is one contiguous run); a sequence's tokens live in the blocks its
block table lists, in order.

- ``paged_decode_attention``: one query token per sequence. A program takes one sequence, one KV
  head and one slice of the context: the query heads that share the KV head (GQA) are processed
  together, so each KV block is read once for all of them. The context is split into a fixed
  number of slices (``num_splits``), each reduced with an online softmax to a partial output and
  its log-sum-exp, and a small second kernel combines the slices. The grid depends only on the
  batch size and ``num_splits``, never on the context lengths, so a decode step can be captured
  in a CUDA graph.
- ``paged_prefill_attention``: many query tokens per sequence (a prompt, or a chunk of one after
  a cached prefix), causal within the chunk, reading every key and value from the pool (the
  chunk's own KV is written there first).

Both accumulate in float32 and take float32, float16 or bfloat16 inputs. They run on CUDA, and
on the CPU under Triton's interpreter (``TRITON_INTERPRET=1``), which is how CI checks them
against a PyTorch reference.
"""

from __future__ import annotations

import json
import os

import torch
import triton
import triton.language as tl


@triton.jit
def _attend_block(q, k, v, visible, m_i, l_i, acc, scale, softcap, IEEE: tl.constexpr, SOFTCAP: tl.constexpr):
    """One block of keys in an online softmax: fold ``k``/``v`` (``[BS, D]``) into the running max
    ``m_i``, sum ``l_i`` and output ``acc`` of the query rows ``q``, where ``visible`` allows. With
    ``SOFTCAP``, scores are squashed to ``softcap * tanh(score / softcap)`` first (Gemma 2)."""
    if IEEE:
        s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    s = s * scale
    if SOFTCAP:  # tanh(x) = 1 - 2 / (exp(2x) + 1), which saturates cleanly at both ends
        s = softcap * (1.0 - 2.0 / (tl.exp(2.0 * s / softcap) + 1.0))
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp(m_i - m_new)
    p = tl.exp(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if IEEE:
        acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc


@triton.jit
def _decode_split_kernel(
    Q, K, V, BT, CL, OP, LP,
    s_qb, s_qh,
    s_kb, s_kt, s_kh,
    s_vb, s_vt, s_vh,
    s_btb,
    s_ob, s_oh, s_os,
    s_lb, s_lh,
    scale, num_splits, window, softcap,
    G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, BS: tl.constexpr, KB: tl.constexpr,
    IEEE: tl.constexpr, SLIDING: tl.constexpr, SOFTCAP: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)  # KV head
    split = tl.program_id(2)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, D)
    heads = h * G + g
    gmask = g < G
    q = tl.load(Q + b * s_qb + heads[:, None] * s_qh + d[None, :], mask=gmask[:, None], other=0.0)
    ctx = tl.load(CL + b)
    n_blocks = tl.cdiv(ctx, BS)
    first = 0  # the first visible position: with a sliding window, only the last ``window`` ones
    if SLIDING:
        first = tl.maximum(ctx - window, 0)
    b0 = first // BS
    # this sequence's own (visible) blocks split evenly over the slices (the grid stays fixed; the
    # loop bounds follow the data), KB blocks per iteration
    per = tl.cdiv(n_blocks - b0, num_splits)
    start = b0 + split * per
    end = tl.minimum(start + per, n_blocks)
    m_i = tl.full([BLOCK_G], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, D], dtype=tl.float32)
    tok = tl.arange(0, KB * BS)
    for j0 in range(start, end, KB):
        jt = j0 + tok // BS  # the block of each token of the tile
        valid = jt < end
        blk = tl.load(BT + b * s_btb + jt, mask=valid, other=0).to(tl.int64)
        off = tok % BS
        k = tl.load(K + blk[:, None] * s_kb + off[:, None] * s_kt + h * s_kh + d[None, :], mask=valid[:, None],
                    other=0.0)
        v = tl.load(V + blk[:, None] * s_vb + off[:, None] * s_vt + h * s_vh + d[None, :], mask=valid[:, None],
                    other=0.0)
        kpos = jt * BS + off
        m_i, l_i, acc = _attend_block(q, k, v, (valid & (kpos < ctx) & (kpos >= first))[None, :], m_i, l_i, acc,
                                      scale, softcap, IEEE, SOFTCAP)
    has = l_i > 0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, m_i + tl.log(tl.where(has, l_i, 1.0)), float("-inf"))
    tl.store(OP + b * s_ob + heads[:, None] * s_oh + split * s_os + d[None, :], out, mask=gmask[:, None])
    tl.store(LP + b * s_lb + heads * s_lh + split, lse, mask=gmask)


@triton.jit
def _decode_reduce_kernel(
    OP, LP, O,  # noqa: E741
    s_ob, s_oh, s_os,
    s_lb, s_lh,
    s_fb, s_fh,
    S: tl.constexpr, BLOCK_S: tl.constexpr, D: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    sp = tl.arange(0, BLOCK_S)
    d = tl.arange(0, D)
    smask = sp < S
    lse = tl.load(LP + b * s_lb + h * s_lh + sp, mask=smask, other=float("-inf"))
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp(lse - m)
    parts = tl.load(OP + b * s_ob + h * s_oh + sp[:, None] * s_os + d[None, :], mask=smask[:, None], other=0.0)
    total = tl.sum(w, 0)
    out = tl.sum(parts * w[:, None], 0) / tl.where(total > 0, total, 1.0)
    tl.store(O + b * s_fb + h * s_fh + d, out.to(O.dtype.element_ty))


def _ieee(dtype: torch.dtype) -> bool:
    """Dot products in full float32: for float32 inputs (no TF32 rounding), and always under the
    interpreter, whose half-precision dot is not usable (there, bf16 inputs are widened first)."""
    return dtype == torch.float32 or os.environ.get("TRITON_INTERPRET") == "1"


# The decode kernel's shape: programs aimed at over the batch, KV heads and context slices; key
# blocks per loop iteration (as tokens at head_dim 64 in 16 bits; other shapes keep the tile's bytes);
# warps and pipeline stages.
# Measured on an H100 by ``benchmarks/attention_sweep.py``; DYN_ACTOR_DECODE_TUNING (JSON of these
# keys) overrides, for sweeps.
DECODE_TUNING = {"programs": 4096, "tile_tokens": 128, "num_warps": 4, "num_stages": 3}
if os.environ.get("DYN_ACTOR_DECODE_TUNING"):
    DECODE_TUNING = {**DECODE_TUNING, **json.loads(os.environ["DYN_ACTOR_DECODE_TUNING"])}


def default_num_splits(max_blocks: int, batch: int, num_kv_heads: int = 8, programs: int | None = None) -> int:
    """Slices of each sequence's context: about ``programs`` programs over the batch and KV heads
    (enough to fill a large GPU), at most one slice per 4 blocks the table can hold, never more
    than 64. The count depends on the batch and the table's width only, never on the contexts."""
    want = max(1, (programs or DECODE_TUNING["programs"]) // max(batch * num_kv_heads, 1))
    return max(1, min(64, want, triton.cdiv(max_blocks, 4)))


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    ctx_lens: torch.Tensor,
    scale: float,
    num_splits: int | None = None,
    out: torch.Tensor | None = None,
    tuning: dict | None = None,
    window: int = 0,
    softcap: float = 0.0,
) -> torch.Tensor:
    """Attention of one query token per sequence over its paged context (with ``window`` > 0: over
    its last ``window`` tokens only, a sliding window; with ``softcap`` > 0, scores capped as Gemma 2's).

    ``q`` ``[B, num_heads, D]``; ``k_cache`` / ``v_cache`` ``[num_blocks, block_size, num_kv_heads, D]``
    (any block stride, the rest contiguous); ``block_table`` ``[B, max_blocks]`` (entries past a
    sequence's blocks are ignored); ``ctx_lens`` ``[B]`` tokens of context including the new one.
    Returns ``[B, num_heads, D]`` in ``q``'s dtype (into ``out`` when given).
    """
    bsz, nh, d = q.shape
    _, bs, nkv, _ = k_cache.shape
    if nh % nkv:
        raise ValueError(f"{nh} query heads do not group over {nkv} KV heads")
    if k_cache.stride(3) != 1 or k_cache.stride(2) != d or v_cache.stride(3) != 1 or q.stride(2) != 1:
        raise ValueError("the head dimension must be contiguous")
    g = nh // nkv
    max_blocks = block_table.shape[1]
    tune = tuning or DECODE_TUNING
    splits = num_splits or default_num_splits(max_blocks, bsz, nkv, tune["programs"])
    # the tile holds as many bytes of keys as ``tile_tokens`` rows of 128 bytes (head_dim 64 in 16 bits,
    # the shape it was measured at): fewer tokens for wider rows, or the kernel spills registers
    # (``scripts/triton_compile.py --ptxas-info``: float32 at head_dim 128 spilled ~20 KB a thread)
    row_bytes = d * (4 if q.dtype == torch.float32 else q.element_size())
    kb = max(1, tune["tile_tokens"] * 128 // row_bytes // bs)
    extra = {} if os.environ.get("TRITON_INTERPRET") == "1" else {"num_warps": tune["num_warps"],
                                                                   "num_stages": tune["num_stages"]}
    if extra and tuning is None and q.dtype == torch.float32 and d >= 128 and bs >= 32:
        extra["num_warps"] = max(extra["num_warps"], 8)  # one 32-token block of wide float32 rows spilled at 4
    part = torch.empty((bsz, nh, splits, d), dtype=torch.float32, device=q.device)
    lse = torch.empty((bsz, nh, splits), dtype=torch.float32, device=q.device)
    if out is None:
        out = torch.empty((bsz, nh, d), dtype=q.dtype, device=q.device)
    if bsz == 0:
        return out
    _decode_split_kernel[(bsz, nkv, splits)](
        q, k_cache, v_cache, block_table, ctx_lens, part, lse,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_table.stride(0),
        part.stride(0), part.stride(1), part.stride(2),
        lse.stride(0), lse.stride(1),
        scale, splits, window, float(softcap or 1.0),
        G=g, BLOCK_G=max(16, triton.next_power_of_2(g)), D=d, BS=bs, KB=kb, IEEE=_ieee(q.dtype), SLIDING=window > 0,
        SOFTCAP=softcap > 0, **extra,
    )
    _decode_reduce_kernel[(bsz, nh)](
        part, lse, out,
        part.stride(0), part.stride(1), part.stride(2),
        lse.stride(0), lse.stride(1),
        out.stride(0), out.stride(1),
        S=splits, BLOCK_S=max(2, triton.next_power_of_2(splits)), D=d,
    )
    return out


@triton.jit
def _prefill_kernel(
    Q, K, V, BT, QS, QL, CL, O,  # noqa: E741
    s_qt, s_qh,
    s_kb, s_kt, s_kh,
    s_vb, s_vt, s_vh,
    s_btb,
    s_ot, s_oh,
    scale, window, softcap,
    G: tl.constexpr, D: tl.constexpr, BS: tl.constexpr, BLOCK_M: tl.constexpr, IEEE: tl.constexpr,
    SLIDING: tl.constexpr, SOFTCAP: tl.constexpr,
):
    seq = tl.program_id(0)
    hq = tl.program_id(1)
    mb = tl.program_id(2)
    q_len = tl.load(QL + seq)
    if mb * BLOCK_M >= q_len:
        return
    q_start = tl.load(QS + seq)
    ctx = tl.load(CL + seq)  # tokens before this chunk
    h = hq // G
    i = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, D)
    t = tl.arange(0, BS)
    imask = i < q_len
    q = tl.load(Q + (q_start + i)[:, None] * s_qt + hq * s_qh + d[None, :], mask=imask[:, None], other=0.0)
    qpos = ctx + i
    last = tl.minimum(ctx + (mb + 1) * BLOCK_M, ctx + q_len)  # keys this tile of queries can see
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    j0 = 0
    if SLIDING:  # a sliding window: the tile's first query sees back to ``window - 1`` keys before it
        j0 = tl.maximum(ctx + mb * BLOCK_M - window + 1, 0) // BS
    for j in range(j0, tl.cdiv(last, BS)):
        blk = tl.load(BT + seq * s_btb + j).to(tl.int64)
        k = tl.load(K + blk * s_kb + t[:, None] * s_kt + h * s_kh + d[None, :])
        v = tl.load(V + blk * s_vb + t[:, None] * s_vt + h * s_vh + d[None, :])
        kpos = (j * BS + t)[None, :]
        visible = kpos <= qpos[:, None]
        if SLIDING:
            visible = visible & (kpos > qpos[:, None] - window)
        m_i, l_i, acc = _attend_block(q, k, v, visible, m_i, l_i, acc, scale, softcap, IEEE, SOFTCAP)
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(O + (q_start + i)[:, None] * s_ot + hq * s_oh + d[None, :], out.to(O.dtype.element_ty),
             mask=imask[:, None])


def _prefill_options(q: torch.Tensor, d: int, bs: int, block_m: int) -> dict:
    """Warps of the prefill kernel: 8 for the shapes whose program spills registers at Triton's
    default of 4 (compiled for sm_90 by ``scripts/triton_compile.py --ptxas-info``: head_dim 128 with
    32-token blocks, float32 with head_dim 128 or 32-token blocks; 0.2-1.8 KB a thread), else 4 (the
    shape measured on the H100 runs: head_dim 64, 16-bit)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return {}
    if os.environ.get("DYN_ACTOR_PREFILL_WARPS"):
        return {"num_warps": int(os.environ["DYN_ACTOR_PREFILL_WARPS"])}
    fp32 = q.dtype == torch.float32
    wide = block_m >= 32 and ((d >= 128 and (bs >= 32 or fp32)) or (fp32 and bs >= 32))
    return {"num_warps": 8 if wide else 4}


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    q_starts: torch.Tensor,
    q_lens: torch.Tensor,
    ctx_lens: torch.Tensor,
    scale: float,
    max_q_len: int,
    out: torch.Tensor | None = None,
    block_m: int = 32,
    window: int = 0,
    softcap: float = 0.0,
) -> torch.Tensor:
    """Causal attention of chunks of new tokens over their sequences' paged KV (with ``window`` > 0, a
    sliding window: each token sees itself and the ``window - 1`` tokens before it).

    ``q`` ``[T, num_heads, D]``: the chunks of all sequences, one after another (sequence ``s``
    at rows ``q_starts[s]`` to ``q_starts[s] + q_lens[s]``); its tokens follow ``ctx_lens[s]``
    tokens already in its blocks (a cached prefix, or earlier chunks), and their own K and V have
    been written to the pool already. ``block_tables`` ``[S, max_blocks]``. Returns ``[T, num_heads, D]``.
    """
    t_total, nh, d = q.shape
    _, bs, nkv, _ = k_cache.shape
    if nh % nkv:
        raise ValueError(f"{nh} query heads do not group over {nkv} KV heads")
    if out is None:
        out = torch.empty((t_total, nh, d), dtype=q.dtype, device=q.device)
    nseq = q_lens.shape[0]
    if nseq == 0 or max_q_len == 0:
        return out
    _prefill_kernel[(nseq, nh, triton.cdiv(max_q_len, block_m))](
        q, k_cache, v_cache, block_tables, q_starts, q_lens, ctx_lens, out,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        scale, window, float(softcap or 1.0),
        G=nh // nkv, D=d, BS=bs, BLOCK_M=block_m, IEEE=_ieee(q.dtype), SLIDING=window > 0, SOFTCAP=softcap > 0,
        **_prefill_options(q, d, bs, block_m),
    )
    return out
