"""Sparse mixture-of-experts checkpoints (Mixtral, Qwen2-MoE, Qwen3-MoE) in the native engine.

Logits and greedy tokens against transformers are in ``test_hf_parity.py``; here: the Triton
grouped-experts kernel against the expert loop (under Triton's interpreter off a GPU), the whole
engine on the Triton path eagerly and through the graph runners, greedy tokens that do not depend
on the batch, chunking, prefix hits or preemption, the disaggregation hooks, served 1p1d with every
prefill remote, and the load errors."""

from __future__ import annotations

import json
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported

from dyn_actor.engine import EngineConfig, LLMEngine, SamplingParams
from dyn_actor.engine.model_config import ModelLoadError
from tests.helpers import run_all

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
BASE = [0] + [(7 * k) % 90 + 3 for k in range(40)]  # 41 tokens: two full blocks and more
PROMPTS = {"a": BASE, "b": BASE + [7, 8, 9], "c": [0] + [(11 * k) % 93 + 2 for k in range(70)], "d": [0, 5, 6]}


def _engine(model, **kw) -> LLMEngine:
    kw.setdefault("num_kv_blocks", 128)
    return LLMEngine(EngineConfig(model=str(model), dtype="float32", **kw))


def _tokens(engine: LLMEngine, prompts: dict, params=GREEDY) -> dict[str, list[int]]:
    got = {k: v[0] for k, v in run_all(engine, {k: (p, params) for k, p in prompts.items()}).items()}
    assert engine.block_manager.num_used_blocks == 0
    return got


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t,top_k,skew", [(1, 2, False), (7, 3, False), (40, 2, False), (24, 2, True)])
def test_grouped_kernel_equals_the_expert_loop(dtype, t, top_k, skew):
    """``triton_moe.fused_experts`` against ``moe.experts_loop``: hidden and expert widths that are
    not powers of two, experts with no rows, and (skewed) one expert with more rows than a tile."""
    pytest.importorskip("triton")
    from dyn_actor.engine.moe import experts_loop, silu_mul_torch
    from dyn_actor.engine.triton_moe import fused_experts, group_by_expert

    g = torch.Generator().manual_seed(t * 10 + top_k)
    e, h, inter = 8, 48, 40
    x = torch.randn((t, h), generator=g).to(dtype).to(DEVICE)
    w13 = (torch.randn((e, 2 * inter, h), generator=g) / h ** 0.5).to(dtype).to(DEVICE)
    w2 = (torch.randn((e, h, inter), generator=g) / inter ** 0.5).to(dtype).to(DEVICE)
    if skew:  # every row picks expert 5 first: 24 rows, two tiles of 16
        experts = torch.stack([torch.full((t,), 5), torch.randint(0, 5, (t,), generator=g)], dim=1)
    else:
        experts = torch.stack([torch.randperm(e, generator=g)[:top_k] for _ in range(t)])
    experts = experts.to(DEVICE)
    weights = torch.softmax(torch.randn((t, top_k), generator=g), -1).to(dtype).to(DEVICE)
    got = fused_experts(x, w13, w2, weights, experts, silu_mul_torch)
    want = experts_loop(x, w13, w2, weights, experts, silu_mul_torch)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)
    # the grouping: every assignment in exactly one tile of its own expert; tiles past the end marked E
    order, start, counts, tile_start, block_expert = group_by_expert(experts, e, 16)
    flat = experts.reshape(-1).cpu()
    assert sorted(order.tolist()) == list(range(t * top_k))
    assert counts.tolist() == torch.bincount(flat, minlength=e).tolist()
    for ex in range(e):
        picked = order[start[ex]:start[ex] + counts[ex]].cpu()
        assert (flat[picked.long()] == ex).all()
        tiles = (block_expert.cpu() == ex).nonzero().flatten().tolist()
        assert len(tiles) == -(-int(counts[ex]) // 16) and (not tiles or tiles[0] == int(tile_start[ex]))
    assert (block_expert[int((counts + 15).div(16, rounding_mode="floor").sum()):] == e).all()


@pytest.mark.parametrize("t", [1, 6, 40, 200])
def test_both_cpu_forms_equal_a_row_by_row_reference(t, monkeypatch):
    """``moe.experts_loop``: the padded batched form (decode-sized steps using most experts) and the
    per-expert form both equal each row's experts summed one by one."""
    import torch.nn.functional as F

    from dyn_actor.engine import moe

    g = torch.Generator().manual_seed(t)
    e, h, inter, top_k = 8, 32, 24, 2
    x = torch.randn((t, h), generator=g)
    w13, w2 = torch.randn((e, 2 * inter, h), generator=g), torch.randn((e, h, inter), generator=g)
    experts = torch.stack([torch.randperm(e, generator=g)[:top_k] for _ in range(t)])
    weights = torch.softmax(torch.randn((t, top_k), generator=g), -1)
    want = torch.stack([sum(weights[r, j] * F.linear(moe.silu_mul_torch(F.linear(x[r:r + 1], w13[experts[r, j]])),
                                                     w2[experts[r, j]])[0] for j in range(top_k)) for r in range(t)])
    torch.testing.assert_close(moe.experts_loop(x, w13, w2, weights, experts, moe.silu_mul_torch), want,
                               atol=1e-4, rtol=1e-4)
    monkeypatch.setattr(moe, "PADDED", False)  # the per-expert form for every size
    torch.testing.assert_close(moe.experts_loop(x, w13, w2, weights, experts, moe.silu_mul_torch), want,
                               atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_greedy_tokens_do_not_depend_on_the_batch(kind, request):
    """Float32 greedy tokens of each prompt alone equal those in a batch, after a prefix hit, with
    chunked prefill, with preemption in a small pool, with overlapped steps and with n-gram drafts
    (the verifying step's rows routed like any others)."""
    model = request.getfixturevalue(f"{kind}_dir")
    alone = {k: _tokens(_engine(model), {k: p})[k] for k, p in PROMPTS.items()}
    assert len({tuple(v) for v in alone.values()}) == 4, alone
    eng = _engine(model)
    first = _tokens(eng, {"a": PROMPTS["a"]})
    rest = _tokens(eng, {k: p for k, p in PROMPTS.items() if k != "a"})
    assert {**first, **rest} == alone
    assert eng.stats().prefix_cache_hit_tokens >= 32  # b found a's blocks
    assert _tokens(_engine(model, max_num_batched_tokens=16), PROMPTS) == alone
    small = _engine(model, num_kv_blocks=7)
    assert _tokens(small, PROMPTS) == alone and small.stats().num_preemptions > 0
    assert _tokens(_engine(model, async_scheduling="on"), PROMPTS) == alone
    from dyn_actor.engine.spec_decode import SpeculativeConfig

    spec = SpeculativeConfig.parse({"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1,
                                    "prompt_lookup_max": 3})
    drafted = _engine(model, speculative=spec)
    assert _tokens(drafted, PROMPTS) == alone and drafted.stats().spec_drafts > 0


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_the_triton_path_runs_experts(kind, tmp_path):
    """The Triton path (grouped-experts kernel, fused norms/RoPE, paged attention) gives the default
    kernels' greedy tokens, eagerly, with chunks after a cached prefix, and through the graph
    runners (decode graphs and piecewise prefill, replayed eagerly off a GPU). Two layers: Qwen3-MoE's
    second keeps a dense MLP."""
    pytest.importorskip("triton")
    from tests.checkpoints import write_checkpoint

    model = write_checkpoint(tmp_path / kind, kind, num_hidden_layers=2)
    prompts = {k: PROMPTS[k] for k in ("a", "b", "d")}
    params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)

    def tokens(attention: str, **kw) -> dict:
        eng = _engine(model, attention=attention, device=DEVICE, max_model_len=64, num_kv_blocks=64, **kw)
        first = _tokens(eng, {"a": prompts["a"]}, params)
        return {**first, **_tokens(eng, {k: p for k, p in prompts.items() if k != "a"}, params)}

    want = tokens("native")
    assert len({t for v in want.values() for t in v}) >= 4, want  # not one token repeated
    assert tokens("triton") == want
    assert tokens("triton", cuda_graphs="on", piecewise_graphs="on", max_num_batched_tokens=16) == want


def test_remote_prefill_hooks(mixtral_dir):
    """Disaggregation on an MoE model: a decode engine allocates, a prefill engine computes the prompt
    and its KV is copied into the decode engine's blocks; decoding continues with the tokens of a
    local prefill."""
    from tests.helpers import remote_prefill_matches_local

    remote_prefill_matches_local(lambda: _engine(mixtral_dir), PROMPTS["c"], GREEDY)


def test_load_errors_are_one_line(qwen3_moe_dir, tmp_path):
    import shutil

    from tests.checkpoints import write_lora

    def broken(name, edit):
        d = tmp_path / name
        shutil.copytree(qwen3_moe_dir, d)
        cfg = json.loads((d / "config.json").read_text())
        edit(cfg)
        (d / "config.json").write_text(json.dumps(cfg))
        return d

    bad = broken("topk", lambda c: c.update(num_experts_per_tok=9))
    with pytest.raises(ModelLoadError, match="num_experts_per_tok"):
        _engine(bad)
    bad = broken("width", lambda c: c.update(moe_intermediate_size=32))
    with pytest.raises(ModelLoadError, match="experts have shapes"):
        _engine(bad)
    bad = broken("count", lambda c: c.update(num_experts=9, num_local_experts=9))
    with pytest.raises(ModelLoadError, match="gate.weight has shape"):
        _engine(bad)
    # adapters: attention projections are served; a sparse layer's MLP is refused by name
    pytest.importorskip("peft")
    ok = write_lora(qwen3_moe_dir, tmp_path / "attn", targets=["q_proj", "v_proj"])
    eng = _engine(qwen3_moe_dir, lora_modules={"attn": str(ok)})
    assert eng.loras == {"attn": 1}
    from safetensors.torch import load_file, save_file

    for name, key, shapes in (("mlp", "layers.0.mlp.gate_proj", ((8, 128), (64, 8))),
                              ("expert", "layers.0.mlp.experts.3.gate_proj", ((8, 128), (64, 8)))):
        d = tmp_path / name
        shutil.copytree(ok, d)
        tensors = load_file(str(d / "adapter_model.safetensors"))
        for ab, shape in zip("AB", shapes):
            tensors[f"base_model.model.model.{key}.lora_{ab}.weight"] = torch.zeros(shape)
        save_file(tensors, str(d / "adapter_model.safetensors"))
        with pytest.raises(ModelLoadError, match="mixture of experts"):
            _engine(qwen3_moe_dir, lora_modules={name: str(d)})


def test_served_1p1d_every_prefill_remote(mixtral_dir):
    """The launcher on a Mixtral checkpoint, 1p1d with every prefill remote: the texts of greedy
    completions are the engine's, and the stop is clean."""
    from tests.helpers import served_1p1d_remote_texts_match

    prompts = {k: PROMPTS[k] for k in ("a", "c")}
    served_1p1d_remote_texts_match(mixtral_dir, prompts, _tokens(_engine(mixtral_dir), prompts), GREEDY.max_tokens)
