"""The native engine against transformers on small random checkpoints it writes itself."""

from __future__ import annotations

import random

import pytest
import torch

from dyn_actor.engine import EngineConfig, LLMEngine, SamplingParams

transformers = pytest.importorskip("transformers")

PROMPT_LENS = [3, 16, 37, 70, 97]  # shorter than a block, exact block, several blocks


def _prompts(vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[0] + [rng.randrange(2, vocab) for _ in range(n - 1)] for n in PROMPT_LENS]


def _hf(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()


# mistral and gemma3 attend over sliding windows of 8 tokens (gemma3: its middle layer over everything)
# phi3 turns half of each head's dimensions (partial_rotary_factor 0.5)
# gemma2 caps attention scores at 1.5 and logits at 4 (tanh), every other layer windowed
KINDS = ["llama", "mistral", "phi3", "qwen2", "qwen3", "mixtral", "qwen2_moe", "qwen3_moe", "gemma2", "gemma3"]


@pytest.mark.parametrize("kind", KINDS)
def test_logits_match_transformers(kind, request):
    model_dir = request.getfixturevalue(f"{kind}_dir")
    engine = LLMEngine(EngineConfig(model=str(model_dir), num_kv_blocks=256))
    hf = _hf(model_dir)
    prompts = _prompts(engine.model_config.vocab_size)
    ours = engine.score(prompts)
    for p, logits in zip(prompts, ours):
        with torch.no_grad():
            ref = hf(torch.tensor([p])).logits[0].float()
        diff = (logits - ref).abs().max().item()
        assert diff < 1e-4, f"{kind}: prompt of {len(p)} tokens differs by {diff}"
    assert engine.block_manager.num_used_blocks == 0


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_matches_generate(kind, request):
    model_dir = request.getfixturevalue(f"{kind}_dir")
    engine = LLMEngine(EngineConfig(model=str(model_dir), num_kv_blocks=256))
    hf = _hf(model_dir)
    prompts = _prompts(engine.model_config.vocab_size, seed=1)
    new = 24
    for i, p in enumerate(prompts):
        # min_tokens as generate()'s min_new_tokens: end-of-sequence is masked, not just ignored
        engine.add_request(str(i), p, SamplingParams(max_tokens=new, min_tokens=new, temperature=0))
    got: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    while engine.has_unfinished_requests():
        for out in engine.step():
            got[out.request_id].extend(out.new_token_ids)
    for i, p in enumerate(prompts):
        with torch.no_grad():
            ref = hf.generate(
                torch.tensor([p]), max_new_tokens=new, do_sample=False, min_new_tokens=new, pad_token_id=1
            )[0, len(p) :].tolist()
        assert got[str(i)] == ref, f"{kind}: prompt {i} ({len(p)} tokens)"


def test_llama3_rope_scaling_matches(tmp_path):
    from tests.checkpoints import write_checkpoint

    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    d = write_checkpoint(tmp_path / "l3", "llama", rope_scaling=scaling, rope_theta=500000.0, max_position_embeddings=1024)
    engine = LLMEngine(EngineConfig(model=str(d), num_kv_blocks=128))
    assert engine.model_config.rope_scaling["rope_type"] == "llama3"
    hf = _hf(d)
    p = _prompts(engine.model_config.vocab_size, seed=3)[-1] * 2
    (ours,) = engine.score([p])
    with torch.no_grad():
        ref = hf(torch.tensor([p])).logits[0]
    assert (ours - ref).abs().max().item() < 1e-4


@pytest.mark.parametrize("kind,extra", [
    ("qwen3", {}),  # Qwen3's documented long-context setting, scaled down
    ("llama", {"beta_fast": 16, "beta_slow": 2, "truncate": False}),
    ("llama", {"mscale": 0.8, "mscale_all_dim": 0.5}),  # DeepSeek-style attention factor
])
def test_yarn_rope_scaling_matches(tmp_path, kind, extra):
    """YaRN: the frequencies and the cos/sin factor as transformers computes them, on prompts past
    the original context (where the interpolated frequencies matter)."""
    from tests.checkpoints import write_checkpoint

    scaling = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, **extra}
    d = write_checkpoint(tmp_path / "yarn", kind, rope_scaling=scaling, rope_theta=10000.0, max_position_embeddings=256)
    engine = LLMEngine(EngineConfig(model=str(d), num_kv_blocks=128))
    assert engine.model_config.rope_scaling["rope_type"] == "yarn"
    assert engine.model_config.rope_attention_factor() != 1.0
    hf = _hf(d)
    p = _prompts(engine.model_config.vocab_size, seed=4)[-1] * 2  # 194 tokens, 3x the original context
    (ours,) = engine.score([p])
    with torch.no_grad():
        ref = hf(torch.tensor([p])).logits[0]
    assert (ours - ref).abs().max().item() < 1e-4


def test_qwen2_sliding_window_layers_match(tmp_path):
    """Qwen2 with ``use_sliding_window``: layers from ``max_window_layers`` on attend over a window,
    the ones before over everything (read from ``layer_types``, and from the older keys without it)."""
    import json

    from tests.checkpoints import write_checkpoint

    d = write_checkpoint(tmp_path / "q2", "qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=1)
    cfg = json.loads((d / "config.json").read_text())
    engines = [LLMEngine(EngineConfig(model=str(d), num_kv_blocks=128))]
    cfg.pop("layer_types", None)
    (d / "config.json").write_text(json.dumps(cfg))
    engines.append(LLMEngine(EngineConfig(model=str(d), num_kv_blocks=128)))
    hf = _hf(d)
    p = _prompts(engines[0].model_config.vocab_size, seed=5)[-1]
    with torch.no_grad():
        ref = hf(torch.tensor([p])).logits[0]
    for engine in engines:
        assert engine.model_config.layer_windows == (0, 8, 8)
        (ours,) = engine.score([p])
        assert (ours - ref).abs().max().item() < 1e-4


def test_gemma3_bfloat16_logits_are_close(gemma3_dir):
    """Gemma 3 in bfloat16 (its norms multiply by ``1 + w`` in float32 before rounding) against
    transformers in bfloat16: logits within bf16 noise of each other."""
    from transformers import AutoModelForCausalLM

    engine = LLMEngine(EngineConfig(model=str(gemma3_dir), dtype="bfloat16", num_kv_blocks=128))
    hf = AutoModelForCausalLM.from_pretrained(str(gemma3_dir), dtype=torch.bfloat16).eval()
    hf32 = _hf(gemma3_dir)
    for p in _prompts(engine.model_config.vocab_size, seed=6)[2:]:
        (ours,) = engine.score([p])
        with torch.no_grad():
            ref = hf(torch.tensor([p])).logits[0].float()
            exact = hf32(torch.tensor([p])).logits[0]
        # as close to transformers' bf16 as transformers' bf16 is to float32
        assert (ours - ref).abs().max().item() <= max(0.1, 1.5 * (ref - exact).abs().max().item())


def test_gemma3_multimodal_checkpoint_serves_its_language_model(tmp_path):
    """A Gemma3ForConditionalGeneration folder (Gemma 3 4B-27B's form: the text model's config nested
    in ``text_config``, its tensors under ``language_model.``, a vision tower beside): the language
    model alone is loaded, and its logits on text equal transformers' multimodal model given the
    same token ids. A ``text_config`` that lists only what differs from Gemma 3's defaults (as the
    published ones do) reads the same."""
    import json

    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    from dyn_actor.engine import builtin
    from tests.checkpoints import write_tokenizer

    vocab = len(builtin.build_tokenizer().get_vocab())
    text = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, head_dim=64, vocab_size=vocab, sliding_window=8, sliding_window_pattern=3,
                bos_token_id=0, eos_token_id=1, max_position_embeddings=1024)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    torch.manual_seed(0)
    hf = Gemma3ForConditionalGeneration(Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4))
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_(0.1 * torch.randn_like(p) if "norm" in name else torch.randn_like(p) / max(p.shape[-1], 1) ** 0.5)
    d = tmp_path / "gemma3-mm"
    hf.save_pretrained(str(d), safe_serialization=True)
    write_tokenizer(d)
    engine = LLMEngine(EngineConfig(model=str(d), num_kv_blocks=128))
    cfg = engine.model_config
    assert cfg.text_of == "Gemma3ForConditionalGeneration" and cfg.layer_windows == (8, 8, 0)
    hf.eval()
    for p in _prompts(vocab, seed=7)[1:]:
        (ours,) = engine.score([p])
        with torch.no_grad():
            ref = hf(input_ids=torch.tensor([p])).logits[0]
        assert (ours - ref).abs().max().item() < 1e-4, len(p)
    # the published form: only the keys that differ from Gemma 3's defaults
    full = json.loads((d / "config.json").read_text())
    defaults = {"rms_norm_eps": 1e-6, "hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": 256}
    tc = full["text_config"]
    assert all(tc[k] == v for k, v in defaults.items())
    for k in (*defaults, "layer_types", "rope_parameters"):
        tc.pop(k)
    tc.update(rope_theta=1e6, rope_local_base_freq=1e4)
    (d / "config.json").write_text(json.dumps(full))
    short = LLMEngine(EngineConfig(model=str(d), num_kv_blocks=128))
    assert short.model_config.layer_windows == (8, 8, 0)
    p = _prompts(vocab, seed=7)[-1]
    assert torch.equal(short.score([p])[0], engine.score([p])[0])


def test_phi3_longrope_matches(tmp_path):
    """Phi-3's LongRoPE (``rope_scaling`` type ``longrope``, or ``su`` as the first Phi-3 configs call it):
    per-frequency short and long factors and the ``sqrt(1 + ln(factor) / ln(original))`` table factor.
    An engine whose context stays within ``original_max_position_embeddings`` uses the short factors
    (transformers' choice for such sequences); one that may go past it, the long ones for every
    position (vLLM's choice; transformers switches on a sequence's length, so they agree on
    prompts past the original context)."""
    import json

    from tests.checkpoints import write_checkpoint

    g = torch.Generator().manual_seed(3)
    rotated = 16  # head_dim 32, partial_rotary_factor 0.5
    scaling = {"type": "longrope", "short_factor": (1 + torch.rand(rotated // 2, generator=g)).tolist(),
               "long_factor": (2 + 4 * torch.rand(rotated // 2, generator=g)).tolist()}
    d = write_checkpoint(tmp_path / "phi3", "phi3", rope_scaling=scaling, original_max_position_embeddings=64,
                         max_position_embeddings=512)
    hf = _hf(d)
    short = LLMEngine(EngineConfig(model=str(d), num_kv_blocks=128, max_model_len=64))
    long = LLMEngine(EngineConfig(model=str(d), num_kv_blocks=128))
    assert long.model_config.rope_scaling["rope_type"] == "longrope"
    assert not short.model_config.uses_long_rope(64) and long.model_config.uses_long_rope(512)
    assert long.model_config.rope_attention_factor() > 1
    prompts = _prompts(long.model_config.vocab_size, seed=8)
    for engine, p in ((short, prompts[2]), (short, prompts[1]), (long, prompts[-1] * 2), (long, prompts[-2])):
        (ours,) = engine.score([p])
        with torch.no_grad():
            ref = hf(torch.tensor([p])).logits[0]
        assert (ours - ref).abs().max().item() < 1e-4, len(p)
    # the first configs' name for it, read the same
    cfg = json.loads((d / "config.json").read_text())
    cfg.pop("rope_parameters", None)
    cfg["rope_scaling"] = {**scaling, "type": "su"}
    cfg["partial_rotary_factor"] = 0.5
    (d / "config.json").write_text(json.dumps(cfg))
    su = LLMEngine(EngineConfig(model=str(d), num_kv_blocks=128))
    p = prompts[-1] * 2
    assert torch.equal(su.score([p])[0], long.score([p])[0])
