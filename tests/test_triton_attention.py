"""The Triton paged-attention kernels against a PyTorch reference. Without a GPU they run under
Triton's interpreter on CPU tensors (small shapes); with one, on the GPU."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported
triton = pytest.importorskip("triton")

from dyn_actor.engine.triton_attention import paged_decode_attention, paged_prefill_attention  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}


def _pool(num_blocks: int, bs: int, nkv: int, d: int, dtype: torch.dtype, layers: int = 2):
    """K and V of layer 1 of a pool laid out as the engine's: strided [blocks, bs, nkv, d] views."""
    g = torch.Generator().manual_seed(num_blocks * 131 + bs + nkv * 7 + d)
    data = torch.randn((num_blocks, layers, 2, bs, nkv, d), generator=g).to(dtype).to(DEVICE)
    return data[:, 1, 0], data[:, 1, 1]


def _tables(lens: list[int], bs: int, num_blocks: int, seed: int) -> torch.Tensor:
    """Block tables in random order (each sequence's blocks scattered over the pool)."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(num_blocks, generator=g).tolist()
    width = max(-(-n // bs) for n in lens)
    rows, k = [], 0
    for n in lens:
        need = -(-n // bs)
        rows.append(order[k:k + need] + [0] * (width - need))
        k += need
    return torch.tensor(rows, dtype=torch.int32, device=DEVICE)


def _gather(cache: torch.Tensor, table_row: torch.Tensor, n: int) -> torch.Tensor:
    bs = cache.shape[1]
    blocks = table_row[: -(-n // bs)].long()
    return cache[blocks].reshape(-1, *cache.shape[2:])[:n]


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, mask: torch.Tensor | None,
            softcap: float = 0.0):
    """q [m, nh, d], k/v [n, nkv, d] -> [m, nh, d], in float64."""
    g = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(g, dim=1)
    v = v.double().repeat_interleave(g, dim=1)
    s = torch.einsum("mhd,nhd->hmn", q.double(), k) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return torch.einsum("hmn,nhd->mhd", s.softmax(-1), v)


DECODE = [  # (context lengths, G, num_kv_heads, head_dim, block size, dtype)
    ([1, 15, 16, 17], 1, 2, 64, 16, torch.float32),
    ([100, 300, 33], 2, 2, 64, 16, torch.float32),
    ([300, 7], 4, 2, 128, 16, torch.float32),
    ([64, 129, 250], 8, 1, 64, 16, torch.float32),
    ([200, 31], 4, 2, 64, 32, torch.float32),
    ([1, 77, 300], 2, 2, 64, 16, torch.bfloat16),
    ([150], 8, 2, 128, 16, torch.bfloat16),
]


@pytest.mark.parametrize("lens,g,nkv,d,bs,dtype", DECODE)
@pytest.mark.parametrize("splits", [1, 3])
def test_decode_matches_reference(lens, g, nkv, d, bs, dtype, splits):
    nh = g * nkv
    num_blocks = sum(-(-n // bs) for n in lens) + 5
    kc, vc = _pool(num_blocks, bs, nkv, d, dtype)
    table = _tables(lens, bs, num_blocks, seed=len(lens) * 10 + g)
    ctx = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    q = torch.randn((len(lens), nh, d), generator=torch.Generator().manual_seed(5)).to(dtype).to(DEVICE)
    scale = d ** -0.5
    got = paged_decode_attention(q, kc, vc, table, ctx, scale, num_splits=splits)
    for b, n in enumerate(lens):
        want = _attend(q[b:b + 1], _gather(kc, table[b], n), _gather(vc, table[b], n), scale, None)[0]
        torch.testing.assert_close(got[b].double(), want, atol=TOL[dtype], rtol=TOL[dtype])


PREFILL = [  # (per sequence (cached prefix, new tokens), G, num_kv_heads, head_dim, block size, dtype)
    ([(0, 5), (0, 40)], 1, 2, 64, 16, torch.float32),
    ([(32, 17), (16, 1), (0, 70)], 2, 2, 64, 16, torch.float32),
    ([(100, 50)], 4, 2, 128, 16, torch.float32),
    ([(48, 33), (5, 12)], 8, 1, 64, 16, torch.float32),
    ([(64, 40)], 2, 2, 64, 32, torch.float32),
    ([(30, 45), (0, 20)], 4, 2, 64, 16, torch.bfloat16),
]


@pytest.mark.parametrize("seqs,g,nkv,d,bs,dtype", PREFILL)
def test_prefill_after_a_cached_prefix_matches_reference(seqs, g, nkv, d, bs, dtype):
    nh = g * nkv
    totals = [c + n for c, n in seqs]
    num_blocks = sum(-(-t // bs) for t in totals) + 3
    kc, vc = _pool(num_blocks, bs, nkv, d, dtype)
    table = _tables(totals, bs, num_blocks, seed=7 * g + bs)
    q_lens = [n for _, n in seqs]
    starts = [sum(q_lens[:i]) for i in range(len(seqs))]
    q = torch.randn((sum(q_lens), nh, d), generator=torch.Generator().manual_seed(9)).to(dtype).to(DEVICE)
    as_t = lambda xs: torch.tensor(xs, dtype=torch.int32, device=DEVICE)  # noqa: E731
    scale = d ** -0.5
    got = paged_prefill_attention(q, kc, vc, table, as_t(starts), as_t(q_lens), as_t([c for c, _ in seqs]), scale,
                                  max(q_lens), block_m=16)
    for s, (c, n) in enumerate(seqs):
        k, v = _gather(kc, table[s], c + n), _gather(vc, table[s], c + n)
        mask = torch.arange(c + n, device=DEVICE)[None, :] <= (c + torch.arange(n, device=DEVICE))[:, None]
        want = _attend(q[starts[s]:starts[s] + n], k, v, scale, mask)
        torch.testing.assert_close(got[starts[s]:starts[s] + n].double(), want, atol=TOL[dtype], rtol=TOL[dtype])


SLIDING = [  # (window, context lengths / (cached prefix, new tokens), G, num_kv_heads, head_dim, block size, dtype)
    (16, [1, 15, 16, 17, 40], [(0, 40), (20, 9)], 2, 2, 64, 16, torch.float32),
    (7, [3, 7, 8, 100], [(0, 33), (50, 20)], 1, 2, 64, 16, torch.float32),
    (40, [39, 40, 41, 300], [(0, 70), (100, 50), (5, 1)], 4, 2, 128, 16, torch.float32),
    (33, [32, 33, 34, 200], [(0, 65), (64, 40)], 8, 1, 64, 32, torch.float32),
    (20, [5, 77, 300], [(30, 45), (0, 20)], 2, 2, 64, 16, torch.bfloat16),
]


def _window_mask(n_keys: int, qpos: torch.Tensor, window: int) -> torch.Tensor:
    kpos = torch.arange(n_keys, device=qpos.device)[None, :]
    return (kpos <= qpos[:, None]) & (kpos > qpos[:, None] - window)


@pytest.mark.parametrize("window,lens,seqs,g,nkv,d,bs,dtype", SLIDING)
@pytest.mark.parametrize("softcap", [0.0, 1.5])
def test_sliding_window_kernels_match_reference(window, lens, seqs, g, nkv, d, bs, dtype, softcap):
    """A sliding window (Gemma 3's local layers, Mistral's): a query at position p sees keys
    p - window + 1 .. p, in decode (windows inside one block, across blocks, a context shorter than
    the window; one and three slices) and in prefill chunks after a cached prefix. With ``softcap``,
    Gemma 2's scores: ``softcap * tanh(score / softcap)``."""
    nh = g * nkv
    totals = [c + n for c, n in seqs]
    num_blocks = sum(-(-n // bs) for n in lens + totals) + 5
    kc, vc = _pool(num_blocks, bs, nkv, d, dtype)
    scale = d ** -0.5
    table = _tables(lens, bs, num_blocks, seed=window)
    ctx = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    q = torch.randn((len(lens), nh, d), generator=torch.Generator().manual_seed(5)).to(dtype).to(DEVICE)
    for splits in (1, 3):
        got = paged_decode_attention(q, kc, vc, table, ctx, scale, num_splits=splits, window=window, softcap=softcap)
        for b, n in enumerate(lens):
            mask = _window_mask(n, torch.tensor([n - 1], device=DEVICE), window)
            want = _attend(q[b:b + 1], _gather(kc, table[b], n), _gather(vc, table[b], n), scale, mask, softcap)[0]
            torch.testing.assert_close(got[b].double(), want, atol=TOL[dtype], rtol=TOL[dtype])
    table = _tables(totals, bs, num_blocks, seed=window + 1)
    q_lens = [n for _, n in seqs]
    starts = [sum(q_lens[:i]) for i in range(len(seqs))]
    q = torch.randn((sum(q_lens), nh, d), generator=torch.Generator().manual_seed(9)).to(dtype).to(DEVICE)
    as_t = lambda xs: torch.tensor(xs, dtype=torch.int32, device=DEVICE)  # noqa: E731
    got = paged_prefill_attention(q, kc, vc, table, as_t(starts), as_t(q_lens), as_t([c for c, _ in seqs]), scale,
                                  max(q_lens), block_m=16, window=window, softcap=softcap)
    for s, (c, n) in enumerate(seqs):
        k, v = _gather(kc, table[s], c + n), _gather(vc, table[s], c + n)
        mask = _window_mask(c + n, c + torch.arange(n, device=DEVICE), window)
        want = _attend(q[starts[s]:starts[s] + n], k, v, scale, mask, softcap)
        torch.testing.assert_close(got[starts[s]:starts[s] + n].double(), want, atol=TOL[dtype], rtol=TOL[dtype])


def test_the_engine_on_the_triton_kernels_gives_the_same_tokens(tmp_path):
    """The whole engine with ``attention="triton"`` (on the CPU: under the interpreter) against the
    default kernels, float32 greedy: a batch of prompts of several blocks, a prefix-cache hit,
    chunked prefill, preemption in a small pool, and decode steps through the graphs' runner. On a
    one-layer checkpoint (head_dim 64, two query heads a KV head): under the interpreter each
    layer's kernels take about 3 s of a run, and one layer exercises the same paths as four."""
    from dyn_actor.engine import EngineConfig, LLMEngine, SamplingParams
    from tests.checkpoints import write_checkpoint
    from tests.helpers import run_all

    model = str(write_checkpoint(tmp_path / "one-layer", num_hidden_layers=1, hidden_size=256,
                                 num_attention_heads=4, num_key_value_heads=2))

    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    base = [0] + list(range(5, 45))  # 41 tokens: a shared prefix of two full blocks and more
    prompts = {"a": base, "b": base + [7, 8, 9], "c": [0] + [11] * 20, "d": [0, 5, 6]}

    def tokens(attention: str, **kw) -> tuple[dict, int]:
        cfg = EngineConfig(model=model, dtype="float32", max_model_len=64, attention=attention, device=DEVICE, **kw)
        engine = LLMEngine(cfg)
        first = run_all(engine, {"a": (prompts["a"], params)})  # then b hits a's cached prefix
        rest = run_all(engine, {k: (p, params) for k, p in prompts.items() if k != "a"})
        return {k: v[0] for k, v in {**first, **rest}.items()}, engine.stats().num_preemptions

    want, _ = tokens("native", num_kv_blocks=64)
    assert len({t for ts in want.values() for t in ts}) > 4 and len({tuple(ts) for ts in want.values()}) == 4, want
    assert tokens("triton", num_kv_blocks=64)[0] == want
    assert tokens("triton", num_kv_blocks=64, max_num_batched_tokens=16)[0] == want  # chunked prefill
    got, preempted = tokens("triton", num_kv_blocks=6)  # the pool holds too few blocks for all at once
    assert got == want and preempted > 0
    # decode steps through the CUDA-graph runner's host side (bucket padding rows on the scratch
    # block, the host table written only where a row lacks entries), replayed eagerly off a GPU
    assert tokens("triton", num_kv_blocks=64, cuda_graphs="on")[0] == want
    # prefill and mixed steps through the piecewise runner (padding rows, static buffers, attention
    # between the pieces), with chunks after a cached prefix, then with preemption, and with
    # overlapped decode steps beside them
    assert tokens("triton", num_kv_blocks=64, piecewise_graphs="on", max_num_batched_tokens=16)[0] == want
    got, preempted = tokens("triton", num_kv_blocks=6, piecewise_graphs="on", cuda_graphs="on", async_scheduling="on")
    assert got == want and preempted > 0


def test_the_triton_path_runs_qwen3(tmp_path):
    """Qwen3's per-head query/key norms on the Triton path (fused into the RoPE kernel) give the
    default kernels' greedy tokens, eagerly and through the graphs' runners; one layer, head_dim 64
    over a hidden size of 128 (query heads wider than the hidden size, as Qwen3's)."""
    from dyn_actor.engine import EngineConfig, LLMEngine, SamplingParams
    from tests.checkpoints import write_checkpoint
    from tests.helpers import run_all

    model = str(write_checkpoint(tmp_path / "qwen3", "qwen3", num_hidden_layers=1))
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    prompts = {"a": [0] + list(range(5, 40)), "b": [0] + [11] * 20, "c": [0, 5, 6]}

    def tokens(attention: str, **kw) -> dict:
        engine = LLMEngine(EngineConfig(model=model, dtype="float32", max_model_len=64, attention=attention,
                                        device=DEVICE, num_kv_blocks=64, **kw))
        return {k: v[0] for k, v in run_all(engine, {k: (p, params) for k, p in prompts.items()}).items()}

    want = tokens("native")
    assert len({tuple(ts) for ts in want.values()}) == 3, want
    assert tokens("triton") == want
    assert tokens("triton", cuda_graphs="on", piecewise_graphs="on", max_num_batched_tokens=16) == want


@pytest.mark.skipif(DEVICE != "cuda", reason="serving sizes: on a GPU only (the interpreter is too slow)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_serving_sizes_match_reference_on_the_gpu(dtype):
    """A Llama-3-8B-like layer (32 query heads over 8 KV heads, head_dim 128), 64 sequences of up to
    4,096 tokens with the default split choice, and a 512-token chunk after a 1,500-token prefix."""
    rng = torch.Generator().manual_seed(3)
    lens = torch.randint(1, 4097, (64,), generator=rng).tolist()
    g, nkv, d, bs = 4, 8, 128, 16
    num_blocks = sum(-(-n // bs) for n in lens) + 8
    kc, vc = _pool(num_blocks, bs, nkv, d, dtype)
    table = _tables(lens, bs, num_blocks, seed=11)
    q = torch.randn((64, g * nkv, d), generator=rng).to(dtype).to(DEVICE)
    scale = d ** -0.5
    got = paged_decode_attention(q, kc, vc, table, torch.tensor(lens, dtype=torch.int32, device=DEVICE), scale)
    for b, n in enumerate(lens):
        want = _attend(q[b:b + 1], _gather(kc, table[b], n), _gather(vc, table[b], n), scale, None)[0]
        torch.testing.assert_close(got[b].double(), want, atol=TOL[dtype], rtol=TOL[dtype])
    c, n = 1500, 512
    table = _tables([c + n], bs, num_blocks, seed=12)
    q = torch.randn((n, g * nkv, d), generator=rng).to(dtype).to(DEVICE)
    as_t = lambda xs: torch.tensor(xs, dtype=torch.int32, device=DEVICE)  # noqa: E731
    got = paged_prefill_attention(q, kc, vc, table, as_t([0]), as_t([n]), as_t([c]), scale, n)
    k, v = _gather(kc, table[0], c + n), _gather(vc, table[0], c + n)
    mask = torch.arange(c + n, device=DEVICE)[None, :] <= (c + torch.arange(n, device=DEVICE))[:, None]
    torch.testing.assert_close(got.double(), _attend(q, k, v, scale, mask), atol=TOL[dtype], rtol=TOL[dtype])
