"""Sliding-window attention (Gemma 3's local layers, Mistral's window) in the native engine.

Logits and greedy tokens against transformers are in ``test_hf_parity.py`` (``mistral``,
``gemma3``, Qwen2's ``use_sliding_window``); the kernels against references in
``test_native_ops.py`` and ``test_triton_attention.py``. Here, on prompts several windows long:
greedy tokens that do not depend on the batch, chunking, prefix hits, preemption, overlapped steps,
drafts or the attention path (C kernel, PyTorch, Triton eagerly and through the graph runners);
the disaggregation hooks; served 1p1d with every prefill remote; the load errors."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported

from dyn_actor.engine import EngineConfig, LLMEngine, SamplingParams
from dyn_actor.engine.model_config import ModelLoadError
from tests.helpers import run_all

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
BASE = [0] + [(7 * k) % 90 + 3 for k in range(40)]  # 41 tokens: five windows of 8
PROMPTS = {"a": BASE, "b": BASE + [7, 8, 9], "c": [0] + [(11 * k) % 93 + 2 for k in range(70)], "d": [0, 5, 6]}


def _engine(model, **kw) -> LLMEngine:
    kw.setdefault("num_kv_blocks", 128)
    return LLMEngine(EngineConfig(model=str(model), dtype="float32", **kw))


def _tokens(engine: LLMEngine, prompts: dict, params=GREEDY) -> dict[str, list[int]]:
    got = {k: v[0] for k, v in run_all(engine, {k: (p, params) for k, p in prompts.items()}).items()}
    assert engine.block_manager.num_used_blocks == 0
    return got


@pytest.mark.parametrize("kind", ["gemma3", "mistral", "gemma2"])
def test_greedy_tokens_do_not_depend_on_the_batch(kind, request):
    """Float32 greedy tokens of each prompt alone equal those in a batch, after a prefix hit, with
    chunked prefill (chunks of 16 over windows of 8), with preemption, overlapped steps, n-gram drafts,
    and on the PyTorch attention path (masks in place of the C kernel's window)."""
    model = request.getfixturevalue(f"{kind}_dir")
    alone = {k: _tokens(_engine(model), {k: p})[k] for k, p in PROMPTS.items()}
    assert len({tuple(v) for v in alone.values()}) == 4, alone
    eng = _engine(model)
    assert eng.max_model_len > 8  # the window no longer caps the context
    first = _tokens(eng, {"a": PROMPTS["a"]})
    rest = _tokens(eng, {k: p for k, p in PROMPTS.items() if k != "a"})
    assert {**first, **rest} == alone
    assert eng.stats().prefix_cache_hit_tokens >= 32  # b found a's blocks
    assert _tokens(_engine(model, max_num_batched_tokens=16), PROMPTS) == alone
    small = _engine(model, num_kv_blocks=7)
    assert _tokens(small, PROMPTS) == alone and small.stats().num_preemptions > 0
    assert _tokens(_engine(model, async_scheduling="on"), PROMPTS) == alone
    assert _tokens(_engine(model, native_ops=False), PROMPTS) == alone
    assert _tokens(_engine(model, native_ops=False, max_num_batched_tokens=16), PROMPTS) == alone
    from dyn_actor.engine.spec_decode import SpeculativeConfig

    spec = SpeculativeConfig.parse({"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1,
                                    "prompt_lookup_max": 3})
    drafted = _engine(model, speculative=spec)
    assert _tokens(drafted, PROMPTS) == alone and drafted.stats().spec_drafts > 0


@pytest.mark.parametrize("kind", ["gemma3", "gemma2"])
def test_the_triton_path_runs_gemma(kind, tmp_path):
    """Gemma 3 and 2 on the Triton path (windowed decode and prefill kernels, float32 ``1 + w`` norms in
    the fused norm and RoPE kernels, Gemma 3's local and global RoPE tables, Gemma 2's capped scores)
    give the default kernels' greedy tokens, eagerly, with chunks after a cached prefix, and through
    the graph runners (replayed eagerly off a GPU). Two layers: a sliding-window one and a global one."""
    pytest.importorskip("triton")
    from tests.checkpoints import write_checkpoint

    model = write_checkpoint(tmp_path / kind, kind, num_hidden_layers=2)
    assert _engine(model).model_config.layer_windows == (8, 0)
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


def test_remote_prefill_hooks(gemma3_dir):
    """Disaggregation on Gemma 3: a decode engine allocates, a prefill engine computes the prompt and
    its KV (every position, the window's too) is copied into the decode engine's blocks; decoding
    continues with the tokens of a local prefill."""
    from tests.helpers import remote_prefill_matches_local

    remote_prefill_matches_local(lambda: _engine(gemma3_dir), PROMPTS["c"], GREEDY)


def test_load_errors_are_one_line(gemma3_dir, tmp_path):
    def broken(name, edit):
        d = tmp_path / name
        shutil.copytree(gemma3_dir, d)
        cfg = json.loads((d / "config.json").read_text())
        edit(cfg)
        (d / "config.json").write_text(json.dumps(cfg))
        return d

    with pytest.raises(ModelLoadError, match="unsupported hidden_act 'gelu'"):
        _engine(broken("act", lambda c: c.update(hidden_activation="gelu")))
    with pytest.raises(ModelLoadError, match="chunked_attention"):
        _engine(broken("types", lambda c: c.update(layer_types=["chunked_attention"] * 3)))
    with pytest.raises(ModelLoadError, match="layer_types lists 2 layers"):
        _engine(broken("count", lambda c: c.update(layer_types=["full_attention"] * 2)))
    # older Gemma 3 configs: no layer_types, every sliding_window_pattern-th layer global
    old = broken("old", lambda c: (c.pop("layer_types"), c.pop("rope_parameters"),
                                   c.update(sliding_window_pattern=2, rope_theta=1e6, rope_local_base_freq=1e4,
                                            rope_scaling={"rope_type": "linear", "factor": 2.0})))
    cfg = _engine(old).model_config
    assert cfg.layer_windows == (8, 0, 8) and cfg.local_rope == (1e4, None)
    assert cfg.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    # and it gives the tokens of the config that lists the same layers
    assert _tokens(_engine(old), {"c": PROMPTS["c"]}) == _tokens(_engine(gemma3_dir), {"c": PROMPTS["c"]})


def test_served_1p1d_every_prefill_remote(gemma3_dir):
    """The launcher on a Gemma 3 checkpoint, 1p1d with every prefill remote: the texts of greedy
    completions are the engine's, and the stop is clean."""
    from tests.helpers import served_1p1d_remote_texts_match

    prompts = {k: PROMPTS[k] for k in ("a", "c")}
    served_1p1d_remote_texts_match(gemma3_dir, prompts, _tokens(_engine(gemma3_dir), prompts), GREEDY.max_tokens)
