"""The C decode-attention kernel agrees with the PyTorch path it replaces."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from dyn_actor.engine import EngineConfig, LLMEngine, SamplingParams
from dyn_actor.kv.pool import KvLayout, KvPool
from dyn_actor.native_ops import native_lib, paged_decode_attention
from tests.helpers import random_prompt, run_all

lib = native_lib()
pytestmark = pytest.mark.skipif(lib is None, reason="no C compiler: the PyTorch path is used")


def _reference(q, pool: KvPool, layer: int, tables: list[list[int]], ctx: list[int], scale: float,
               window: int = 0, softcap: float = 0.0) -> torch.Tensor:
    nb, bs, nkv, d = pool.k[layer].shape
    out = []
    for i, (t, n) in enumerate(zip(tables, ctx)):
        first = max(n - window, 0) if window else 0
        k = pool.k[layer][t].reshape(-1, nkv, d)[first:n].float()
        v = pool.v[layer][t].reshape(-1, nkv, d)[first:n].float()
        g = q.shape[1] // nkv
        k = k.repeat_interleave(g, dim=1).transpose(0, 1)
        v = v.repeat_interleave(g, dim=1).transpose(0, 1)
        s = (q[i].float().unsqueeze(1) @ k.transpose(1, 2)) * scale  # [heads, 1, n]
        if softcap:
            s = softcap * torch.tanh(s / softcap)
        out.append((s.softmax(-1) @ v).squeeze(1))
    return torch.stack(out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("nh,nkv", [(4, 4), (4, 2), (12, 4), (8, 1)])
@pytest.mark.parametrize("window,softcap", [(0, 0.0), (7, 0.0), (16, 0.0), (40, 0.0), (0, 0.5), (7, 2.0)])
def test_kernel_matches_reference(dtype, nh, nkv, window, softcap):
    """With ``window`` > 0, a sliding window: only the last ``window`` positions (starting inside a
    block, on a block boundary, or before the context begins)."""
    torch.manual_seed(0)
    d, bs = 64, 16
    pool = KvPool(KvLayout(40, 3, bs, nkv, d, dtype))
    pool.data.copy_(torch.randn(pool.data.shape))
    rng = random.Random(0)
    ctx = [1, 5, 16, 17, 100, 33]
    tables = [rng.sample(range(40), -(-n // bs)) for n in ctx]
    width = max(len(t) for t in tables)
    table = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    qkv = torch.randn(len(ctx), (nh + 2 * nkv) * d).to(dtype)  # q as a strided slice, as in the model
    q = qkv[:, : nh * d].view(len(ctx), nh, d)
    got = paged_decode_attention(lib, q, pool.k[1], pool.v[1], table, torch.tensor(ctx), d**-0.5, window, softcap)
    ref = _reference(q, pool, 1, tables, ctx, d**-0.5, window, softcap)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert (got.float() - ref).abs().max().item() < tol


def test_engine_tokens_same_with_and_without_kernel():
    rng = random.Random(5)
    reqs = {str(i): (random_prompt(rng, n), SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))
            for i, n in enumerate([3, 16, 40, 77])}
    with_kernel = run_all(LLMEngine(EngineConfig(num_kv_blocks=128)), dict(reqs))
    without = run_all(LLMEngine(EngineConfig(num_kv_blocks=128, native_ops=False)), dict(reqs))
    assert {k: v[0] for k, v in with_kernel.items()} == {k: v[0] for k, v in without.items()}


def test_fused_cpu_ops_match_pytorch():
    """The C norm, RoPE and SiLU-mul of the float32 CPU forward equal the PyTorch expressions they
    replace, on strided rows as the model passes them."""
    from dyn_actor.engine.model import LlamaModel
    from dyn_actor.native_ops import CpuFusedOps

    ops = CpuFusedOps(lib)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(9, 96, generator=g)
    dx = torch.randn(9, 200, generator=g)[:, :96]  # strided rows
    w = torch.randn(96, generator=g)
    x2 = x.clone()
    h = ops.add_rms_norm(x2, dx, w, 1e-5)
    torch.testing.assert_close(x2, x + dx)
    torch.testing.assert_close(h, F.rms_norm(x + dx, (96,), w, 1e-5))
    torch.testing.assert_close(ops.add_rms_norm(x.clone(), None, w, 1e-6), F.rms_norm(x, (96,), w, 1e-6))

    nh, nkv, d, t = 4, 2, 16, 7
    qkv = torch.randn(t, (nh + 2 * nkv) * d, generator=g)
    ang = torch.randn(50, d // 2, generator=g)
    emb = torch.cat((ang, ang), dim=-1)
    cos, sin = emb.cos(), emb.sin()
    sin_signed = torch.cat((-sin[:, : d // 2], sin[:, d // 2 :]), dim=-1)
    pos = torch.tensor([0, 3, 49, 7, 7, 1, 20])
    want = qkv.clone()
    heads = want[:, : (nh + nkv) * d].view(t, nh + nkv, d)
    heads.copy_(LlamaModel._rope(heads.clone(), cos[pos].unsqueeze(1), sin_signed[pos].unsqueeze(1)))
    ops.rope_(qkv, cos, sin_signed, pos, nh + nkv, d)
    torch.testing.assert_close(qkv, want)  # the values' heads untouched as well

    gu = torch.randn(5, 300, generator=g)[:, :64]
    torch.testing.assert_close(ops.silu_mul(gu), F.silu(gu[:, :32]) * gu[:, 32:])


def test_engine_tokens_same_with_and_without_fused_ops(monkeypatch):
    rng = random.Random(6)
    reqs = {str(i): (random_prompt(rng, n), SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))
            for i, n in enumerate([3, 16, 40, 130])}
    fused = run_all(LLMEngine(EngineConfig(num_kv_blocks=128)), dict(reqs))
    monkeypatch.setenv("DYN_ACTOR_FUSED_OPS", "0")
    plain = LLMEngine(EngineConfig(num_kv_blocks=128))
    assert plain.model.cpu_ops is None
    assert {k: v[0] for k, v in fused.items()} == {k: v[0] for k, v in run_all(plain, dict(reqs)).items()}



_WAVES = """
import random, resource
from dyn_actor.engine import EngineConfig, LLMEngine, SamplingParams
from dyn_actor.native_ops import keep_freed_heap
engine = LLMEngine(EngineConfig(num_threads=1))
engine.pool.data.fill_(0)  # the CPU pool's pages come at first touch: all now, not in the waves measured
rng = random.Random(0)
def wave(w):
    for i in range(8):
        engine.add_request(f"{w}-{i}", [0] + [rng.randrange(2, 99) for _ in range(127)], SamplingParams(max_tokens=2))
    while engine.has_unfinished_requests():
        engine.step()
for w in range(3):
    wave(w)
counts = []
for w in range(3, 10):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    wave(w)
    counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(keep_freed_heap(), *counts)
"""


def test_kept_heap_reuses_a_steps_memory():
    """With ``keep_freed_heap`` (the CPU engine's default) waves of 8 x 128-token prompts reuse the
    memory of the waves before (a few page faults in the median wave); without it
    (``DYN_ACTOR_KEEP_HEAP=0``, glibc's mmap threshold held at its start value) their activations
    are mapped and faulted in afresh."""
    import os
    import subprocess
    import sys

    def faults(keep: str, **extra: str) -> tuple[bool, list[int]]:
        env = {**os.environ, "DYN_ACTOR_KEEP_HEAP": keep, **extra}
        out = subprocess.run([sys.executable, "-c", _WAVES], env=env, capture_output=True, text=True,
                             check=True).stdout.split()
        return out[0] == "True", sorted(int(x) for x in out[1:])

    kept, with_keep = faults("1")
    if not kept:
        pytest.skip("not glibc: mallopt is not there")
    # the control: glibc with its mmap threshold fixed at its initial 128 KiB (set from the
    # environment, which turns its adaptive raise off: left on, it sometimes let every measured wave
    # of a CI run reuse memory, and the control then proved nothing)
    not_kept, without = faults("0", MALLOC_MMAP_THRESHOLD_="131072")
    assert not not_kept
    # the median wave: a one-off (a thread's first stack, say) lands in one wave, not in every one
    assert with_keep[len(with_keep) // 2] < 200, with_keep
    # without the kept heap, waves of this size do fault thousands of pages in
    assert without[-1] > 1000, without


def _bf16_lib():
    from dyn_actor.native_ops import linear_bf16_lib

    lib = linear_bf16_lib()
    if lib is None:
        pytest.skip("the C library has no bfloat16 linear kernel here (a CPU without AVX-512 BF16)")
    return lib


@pytest.mark.parametrize("m,o,i", [(1, 512, 512), (2, 37, 100), (3, 8, 31), (4, 1000, 96), (1, 5, 1)])
@pytest.mark.parametrize("threads", [1, 2])
def test_linear_bf16_matches_reference(m, o, i, threads):
    """The bfloat16 linear kernel: the float32 sum of bfloat16 products rounded once, as torch's is,
    for rows of x with a stride of their own, widths and heights off the kernel's multiples (masked
    tails, a last block of fewer rows), with and without a bias, on one and two threads."""
    from dyn_actor.native_ops import linear_bf16

    lib = _bf16_lib()
    g = torch.Generator().manual_seed(m * 1000 + o + i)
    w = torch.randn(o, i, generator=g).bfloat16()
    x = torch.randn(m, i + 7, generator=g).bfloat16()[:, 3:3 + i]  # a stride of its own, not contiguous
    b = torch.randn(o, generator=g).bfloat16()
    for bias in (None, b):
        got = linear_bf16(lib, x, w, bias, threads)
        exact = F.linear(x.double(), w.double(), None if bias is None else bias.double())
        assert got.dtype == torch.bfloat16 and got.shape == (m, o)
        # within half a bfloat16 step of the exact sum, as a single rounding of a float32 sum is
        torch.testing.assert_close(got.double(), exact, rtol=2 ** -8, atol=1e-5 * i)
        torch.testing.assert_close(got.float(), F.linear(x, w, bias).float(), rtol=2 ** -7, atol=1e-5 * i)


def test_linear_bf16_in_the_model_and_experts():
    """``Linear`` sends a bfloat16 decode step's rows (at most four) to the kernel and more to torch, and
    the experts of one sequence go through it too: both within a rounding of torch's."""
    from dyn_actor.engine.model import Linear
    from dyn_actor.engine.moe import experts_loop, silu_mul_torch

    lib = _bf16_lib()
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 96, generator=g).bfloat16()
    lin = Linear(w, None, pack=True)
    assert lin.bf16 is not None and Linear(w.float(), None, pack=True).bf16 is None
    for rows in (1, 4, 9):
        x = torch.randn(rows, 96, generator=g).bfloat16()
        torch.testing.assert_close(lin(x).float(), F.linear(x, w).float(), rtol=2 ** -7, atol=1e-3)
    w13 = torch.randn(8, 2 * 32, 96, generator=g).bfloat16() / 10
    w2 = torch.randn(8, 96, 32, generator=g).bfloat16() / 6
    h = torch.randn(1, 96, generator=g).bfloat16()
    weights, experts = torch.tensor([[0.7, 0.3]]).bfloat16(), torch.tensor([[5, 2]])
    ours = experts_loop(h, w13, w2, weights, experts, silu_mul_torch, lib)
    torch.testing.assert_close(ours.float(), experts_loop(h, w13, w2, weights, experts, silu_mul_torch).float(),
                               rtol=2 ** -6, atol=1e-2)
