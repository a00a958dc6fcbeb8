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


def _reference(q, pool: KvPool, layer: int, tables: list[list[int]], ctx: list[int], scale: float) -> torch.Tensor:
    nb, bs, nkv, d = pool.k[layer].shape
    out = []
    for i, (t, n) in enumerate(zip(tables, ctx)):
        k = pool.k[layer][t].reshape(-1, nkv, d)[:n].float()
        v = pool.v[layer][t].reshape(-1, nkv, d)[:n].float()
        g = q.shape[1] // nkv
        k = k.repeat_interleave(g, dim=1).transpose(0, 1)
        v = v.repeat_interleave(g, dim=1).transpose(0, 1)
        o = F.scaled_dot_product_attention(q[i].float().unsqueeze(1), k, v, scale=scale)
        out.append(o.squeeze(1))
    return torch.stack(out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("nh,nkv", [(4, 4), (4, 2), (12, 4), (8, 1)])
def test_kernel_matches_reference(dtype, nh, nkv):
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
    got = paged_decode_attention(lib, q, pool.k[1], pool.v[1], table, torch.tensor(ctx), d**-0.5)
    ref = _reference(q, pool, 1, tables, ctx, d**-0.5)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert (got.float() - ref).abs().max().item() < tol


def test_engine_tokens_same_with_and_without_kernel():
    rng = random.Random(5)
    reqs = {str(i): (random_prompt(rng, n), SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))
            for i, n in enumerate([3, 16, 40, 77])}
    with_kernel = run_all(LLMEngine(EngineConfig(num_kv_blocks=128)), dict(reqs))
    without = run_all(LLMEngine(EngineConfig(num_kv_blocks=128, native_ops=False)), dict(reqs))
    assert {k: v[0] for k, v in with_kernel.items()} == {k: v[0] for k, v in without.items()}
