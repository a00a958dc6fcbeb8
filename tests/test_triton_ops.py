"""The fused Triton elementwise kernels against the PyTorch ops they replace (under Triton's
interpreter without a GPU): float32 to within float rounding, bf16 to within a rounding step."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from dyn_actor.engine import triton_ops  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}
DTYPES = [torch.float32, torch.bfloat16]


def _rand(*shape, dtype, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype).to(DEVICE)


def _norm(x, w, eps):  # the unfused path (LlamaModel._rms_norm)
    if x.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), w, eps)
    return w * F.rms_norm(x.float(), (x.shape[-1],), None, eps).to(x.dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [64, 96, 2048])
def test_add_rms_norm(dtype, n):
    x, dx, w = _rand(7, n, dtype=dtype), _rand(7, n, dtype=dtype, seed=1), _rand(n, dtype=dtype, seed=2)
    want_x = x + dx
    want_h = _norm(want_x, w, 1e-5)
    got_x = x.clone()
    got_h = triton_ops.add_rms_norm(got_x, dx, w, 1e-5)
    # the add rounds once, to the dtype (the interpreter may truncate where the GPU rounds: one ulp)
    torch.testing.assert_close(got_x, want_x, **({"atol": 0, "rtol": 0} if dtype == torch.float32
                                                   else {"atol": 0, "rtol": 8e-3}))
    torch.testing.assert_close(got_h, want_h, **TOL[dtype])
    torch.testing.assert_close(triton_ops.add_rms_norm(x.clone(), None, w, 1e-5), _norm(x, w, 1e-5), **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nh,nkv,d", [(4, 2, 64), (8, 1, 128), (6, 6, 64)])
@pytest.mark.parametrize("qk_norm", [False, True], ids=["plain", "qk_norm"])
def test_rope_and_store(dtype, nh, nkv, d, qk_norm):
    """RoPE + the KV write; with ``qk_norm``, Qwen3's per-head RMSNorm of queries and keys first
    (different weights for the two, so a kernel that swaps them or skips one fails)."""
    from dyn_actor.engine.model import LlamaModel

    t, bs, blocks, max_len = 9, 16, 6, 128
    qkv = _rand(t, (nh + 2 * nkv) * d, dtype=dtype)
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    emb = torch.outer(torch.arange(max_len, dtype=torch.float32), inv)
    emb = torch.cat((emb, emb), -1)
    cos = emb.cos().to(dtype).to(DEVICE)
    sin = emb.sin()
    sin = torch.cat((-sin[:, : d // 2], sin[:, d // 2:]), -1).to(dtype).to(DEVICE)
    pos = torch.tensor([0, 1, 5, 17, 40, 41, 100, 3, 127], device=DEVICE)
    slot_b = torch.tensor([0, 0, 3, 3, 2, 5, 1, 4, 2], device=DEVICE)
    slot_o = torch.tensor([0, 1, 15, 2, 7, 8, 0, 9, 15], device=DEVICE)
    pool = torch.zeros((blocks, 2, 2, bs, nkv, d), dtype=dtype, device=DEVICE)  # [blocks, layers, k/v, ...]
    kc, vc = pool[:, 1, 0], pool[:, 1, 1]
    # the unfused path
    qn, kn = (_rand(d, dtype=dtype, seed=5) * 0.5 + 1, _rand(d, dtype=dtype, seed=6) * 0.5 + 1) if qk_norm else (None, None)
    heads = qkv[:, : (nh + nkv) * d].view(t, nh + nkv, d)
    if qk_norm:
        heads = torch.cat([_norm(heads[:, :nh], qn, 1e-6), _norm(heads[:, nh:], kn, 1e-6)], 1)
    qk = LlamaModel._rope(heads, cos[pos].unsqueeze(1), sin[pos].unsqueeze(1))
    want_k, want_v = kc.clone(), vc.clone()
    want_k[slot_b, slot_o] = qk[:, nh:]
    want_v[slot_b, slot_o] = qkv[:, (nh + nkv) * d:].view(t, nkv, d)
    got = qkv.clone()
    triton_ops.rope_and_store(got, cos, sin, pos, slot_b, slot_o, kc, vc, nh, nkv, d, qn, kn, 1e-6)
    tol = TOL[dtype]
    if qk_norm and dtype == torch.bfloat16 and DEVICE == "cpu":
        # the interpreter truncates float32 to bf16 where a GPU rounds; the norm adds two roundings
        # before RoPE's two, so a value may end up to four bf16 steps (2^-8 each) off
        tol = dict(atol=4e-2, rtol=4e-2)
    torch.testing.assert_close(got[:, : nh * d].view(t, nh, d), qk[:, :nh], **tol)
    torch.testing.assert_close(kc, want_k, **tol)
    torch.testing.assert_close(vc, want_v, atol=0, rtol=0)
    assert pool[:, 0].abs().sum() == 0  # the other layer is untouched


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inter", [64, 160, 2048])
def test_silu_mul(dtype, inter):
    gu = _rand(5, 2 * inter, dtype=dtype)
    want = F.silu(gu[:, :inter]) * gu[:, inter:]
    torch.testing.assert_close(triton_ops.silu_mul(gu), want, **TOL[dtype])
