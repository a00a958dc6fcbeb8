"""Small random Hugging Face checkpoints that tests write for themselves (no downloads)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dyn_actor.engine import builtin


def write_tokenizer(directory: Path) -> None:
    """The built-in ASCII tokenizer, as tokenizer.json + tokenizer_config.json."""
    builtin.build_tokenizer().save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(builtin.tokenizer_config()))


def builtin_with_template(directory: Path, chat_template) -> Path:
    """The built-in model saved as a folder, with this chat template (a string, or named templates
    as a list) in its tokenizer_config.json."""
    builtin.save_builtin(directory)
    cfg = json.loads((directory / "tokenizer_config.json").read_text())
    cfg["chat_template"] = chat_template
    (directory / "tokenizer_config.json").write_text(json.dumps(cfg))
    return directory


def write_checkpoint(directory: Path, kind: str = "llama", seed: int = 0, **overrides) -> Path:
    """Write a random ``kind`` ("llama", "mistral", "phi3", "qwen2", "qwen3", "gemma2", "gemma3", or the mixtures of experts
    "mixtral", "qwen2_moe", "qwen3_moe") model with ``save_pretrained``; return the folder. "qwen3" has
    head_dim 64, so its query heads are wider than the hidden size, as in Qwen3's small models."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    vocab = len(builtin.build_tokenizer().get_vocab())
    common = dict(
        vocab_size=vocab,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=0,
        eos_token_id=1,
        rms_norm_eps=1e-6,
    )
    common.update(overrides)
    torch.manual_seed(seed)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif kind == "mistral":  # a sliding window of 8 tokens on every layer
        from transformers import MistralConfig, MistralForCausalLM

        model = MistralForCausalLM(MistralConfig(**{"sliding_window": 8, **common}))
    elif kind == "phi3":  # fused qkv / gate_up tensors; RoPE on half of each head (Phi-4-mini turns 3/4)
        from transformers import Phi3Config, Phi3ForCausalLM

        model = Phi3ForCausalLM(Phi3Config(**{"partial_rotary_factor": 0.5, "pad_token_id": 1, **common}))
    elif kind == "qwen2":
        common.setdefault("tie_word_embeddings", True)
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    elif kind == "qwen3":
        common.setdefault("tie_word_embeddings", True)
        common.setdefault("head_dim", 64)
        model = Qwen3ForCausalLM(Qwen3Config(**common))
    elif kind == "mixtral":  # every layer sparse: 8 experts, 2 a token
        from transformers import MixtralConfig, MixtralForCausalLM

        common = {"num_local_experts": 8, "num_experts_per_tok": 2, "intermediate_size": 128, **common}
        model = MixtralForCausalLM(MixtralConfig(**common))
    elif kind == "qwen2_moe":  # a shared expert beside the routed ones; q/k/v biases
        from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

        common = {"num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 64,
                  "shared_expert_intermediate_size": 96, **common}
        model = Qwen2MoeForCausalLM(Qwen2MoeConfig(**common))
    elif kind == "qwen3_moe":  # head norms; layer 1 keeps a dense MLP; weights renormalised
        from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

        common = {"num_experts": 8, "num_experts_per_tok": 3, "moe_intermediate_size": 64, "head_dim": 64,
                  "mlp_only_layers": [1], "norm_topk_prob": True, **common}
        model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**common))
    elif kind == "gemma2":  # scores and logits capped low enough to matter; every other layer over 8 tokens
        from transformers import Gemma2Config, Gemma2ForCausalLM

        common = {"head_dim": 64, "sliding_window": 8, "query_pre_attn_scalar": 48, "tie_word_embeddings": False,
                  "attn_logit_softcapping": 1.5, "final_logit_softcapping": 4.0, **common}
        model = Gemma2ForCausalLM(Gemma2Config(**common))
    elif kind == "gemma3":  # sliding-window layers (8 tokens) around a global one with linear RoPE scaling
        from transformers import Gemma3ForCausalLM, Gemma3TextConfig

        # untied: a random tied head mostly echoes the input token back (the scaled embedding dominates)
        common = {"head_dim": 64, "sliding_window": 8, "query_pre_attn_scalar": 48, "tie_word_embeddings": False,
                  "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
                  "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
                                      "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}},
                  **common}
        if common["num_hidden_layers"] != len(common["layer_types"]):
            common["layer_types"] = ["full_attention" if i % 2 else "sliding_attention"
                                     for i in range(common["num_hidden_layers"])]
        model = Gemma3ForCausalLM(Gemma3TextConfig(**common))
    else:
        raise ValueError(kind)
    # random init from transformers is small and flat; widen it so greedy tokens are well separated
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # Gemma's norms scale by 1 + w
                p.copy_((0 if kind.startswith("gemma") else 1) + 0.1 * torch.randn_like(p))
            elif "bias" in name:
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / max(p.shape[-1], 1) ** 0.5)
    model = model.to(torch.float32)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(directory), safe_serialization=True)
    write_tokenizer(directory)
    return directory


MARKUP_TOKENS = ["<think>", "</think>", "<tool_call>", "</tool_call>", "<|python_tag|>"]


def write_markup_checkpoint(directory: Path, chat_template: str, seed: int = 0) -> dict[str, int]:
    """A random Llama (head_dim 64, which vLLM's CPU attention takes) on the built-in ASCII
    tokenizer plus ``MARKUP_TOKENS`` as tokens of their own, as Qwen3's tokenizer has them; return
    those tokens' ids."""
    from tokenizers import AddedToken

    tk = builtin.build_tokenizer()
    tk.add_tokens([AddedToken(t, special=False, normalized=False) for t in MARKUP_TOKENS])
    write_checkpoint(directory, seed=seed, vocab_size=tk.get_vocab_size(), hidden_size=256, intermediate_size=512,
                     num_attention_heads=4, num_key_value_heads=2)
    tk.save(str(directory / "tokenizer.json"))
    cfg = builtin.tokenizer_config()
    cfg["chat_template"] = chat_template
    (directory / "tokenizer_config.json").write_text(json.dumps(cfg))
    return {t: tk.token_to_id(t) for t in MARKUP_TOKENS}


LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def write_lora(base_dir: Path, directory: Path, seed: int = 0, r: int = 8, alpha: float = 16.0,
               targets: list[str] | None = None, **config) -> Path:
    """A LoRA adapter for the checkpoint in ``base_dir``, written by PEFT itself (``save_pretrained``),
    with random A and B large enough to change greedy tokens; return the folder."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    lcfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets or LORA_TARGETS, lora_dropout=0.0,
                      bias="none", task_type="CAUSAL_LM", **config)
    model = get_peft_model(base, lcfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:  # PEFT starts B at zero (no change); make both random
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(directory))
    return directory


def merge_lora(base_dir: Path, lora_dir: Path, directory: Path) -> Path:
    """The base checkpoint with the adapter merged into its weights (PEFT's ``merge_and_unload``), saved
    with the base's tokenizer: what serving the adapter must equal."""
    import shutil

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, str(lora_dir)).merge_and_unload()
    directory.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(str(directory), safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(base_dir / f, directory / f)
    return directory


def write_embedding_checkpoint(directory: Path, kind: str = "qwen3", pooling: str | None = "lasttoken",
                               normalize: bool = True, bare: bool = True, seed: int = 0, config: dict | None = None,
                               **overrides) -> Path:
    """A random decoder embedding model, as such models are published: with ``bare``, the transformer
    alone (``Qwen3Model``, ``LlamaModel``, ...: no LM head, tensors without the ``model.`` prefix), else
    the causal LM; with ``pooling`` (a sentence-transformers mode: lasttoken, mean, cls), a
    ``modules.json`` naming a Pooling module (and a Normalize one with ``normalize``). ``config``: more
    keys for config.json (``is_matryoshka``, ``matryoshka_dimensions``); ``overrides``: the model's
    shape, as ``write_checkpoint`` takes them."""
    from transformers import AutoModelForCausalLM

    write_checkpoint(directory, kind, seed, **overrides)
    if bare:
        full = AutoModelForCausalLM.from_pretrained(str(directory), torch_dtype=torch.float32)
        for f in directory.glob("*.safetensors"):
            f.unlink()
        full.model.save_pretrained(str(directory), safe_serialization=True)
    if config:
        cfg = json.loads((directory / "config.json").read_text())
        cfg.update(config)
        (directory / "config.json").write_text(json.dumps(cfg))
    if pooling is not None:
        modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                   {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
        if normalize:
            modules.append({"idx": 2, "name": "2", "path": "2_Normalize",
                            "type": "sentence_transformers.models.Normalize"})
        (directory / "modules.json").write_text(json.dumps(modules))
        (directory / "1_Pooling").mkdir(exist_ok=True)
        modes = {f"pooling_mode_{m}": m == pooling for m in ("cls_token", "mean_tokens", "max_tokens", "lasttoken")}
        modes = {k: (v or k == f"pooling_mode_{pooling}_token" or k == f"pooling_mode_{pooling}_tokens")
                 for k, v in modes.items()}
        (directory / "1_Pooling" / "config.json").write_text(json.dumps(
            {"word_embedding_dimension": json.loads((directory / "config.json").read_text())["hidden_size"], **modes}))
    return directory


def write_classifier_checkpoint(directory: Path, kind: str = "llama", labels: list[str] | None = None,
                                problem_type: str | None = None, seed: int = 0, **overrides) -> Path:
    """A random ``*ForSequenceClassification`` (a causal LM's transformer under a ``score`` head over
    the last token; ``labels``: its ``id2label``, one label for a reward model or a reranker's score),
    with the built-in tokenizer; weights widened as ``write_checkpoint`` does."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    base = write_checkpoint(directory / "base", kind, seed, **overrides)
    cfg = AutoConfig.from_pretrained(str(base))
    labels = labels or ["LABEL_0", "LABEL_1"]
    cfg.num_labels = len(labels)
    cfg.id2label = dict(enumerate(labels))
    cfg.label2id = {v: k for k, v in cfg.id2label.items()}
    cfg.pad_token_id = 1
    if problem_type is not None:
        cfg.problem_type = problem_type
    torch.manual_seed(seed + 1)
    model = AutoModelForSequenceClassification.from_config(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else torch.randn_like(p) / p.shape[-1] ** 0.5)
    model.save_pretrained(str(directory), safe_serialization=True)
    write_tokenizer(directory)
    return directory


_QUANTIZED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "qkv_proj", "gate_up_proj")
_AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def _pack_nibbles(v: torch.Tensor) -> torch.Tensor:
    """int ``[..., 8]`` of 0..15 -> int32 ``[...]``, the first in the low bits (as the formats store them)."""
    word = (v.to(torch.int64) << torch.arange(0, 32, 4)).sum(-1)
    return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)


def _rtn(w: torch.Tensor, gs: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest 4-bit quantization of ``w`` ``[out, in]`` by groups of ``gs`` consecutive inputs:
    (q ``[out, in]`` 0..15, zeros ``[out, groups]``, float16 scales ``[out, groups]``)."""
    out, n = w.shape
    g = w.float().view(out, n // gs, gs)
    if sym:
        scale = (g.abs().amax(-1) * 2 / 15).clamp_min(1e-6).half()
        zero = torch.full_like(scale, 8, dtype=torch.int64)
    else:
        lo, hi = g.amin(-1).clamp_max(0), g.amax(-1).clamp_min(0)
        scale = ((hi - lo) / 15).clamp_min(1e-6).half()
        zero = (-lo / scale.float()).round().clamp(0, 15).to(torch.int64)
    q = (g / scale.float()[..., None]).round().to(torch.int64) + zero[..., None]
    return q.clamp(0, 15).view(out, n), zero, scale


def quantize_projection(w: torch.Tensor, method: str, gs: int, perm: torch.Tensor | None = None,
                        v1: bool = True) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One projection's weight as a GPTQ (symmetric; ``perm``: activation order, the inputs taken into
    groups in that order) or AWQ (asymmetric) export stores it, and the float32 weight those tensors
    stand for."""
    out, n = w.shape
    if method == "gptq":
        perm = torch.arange(n) if perm is None else perm
        q_p, zero, scale = _rtn(w[:, perm], gs, sym=True)  # groups over the permuted inputs
        q = torch.empty_like(q_p).index_copy_(1, perm, q_p)  # back in input order
        g_idx = torch.empty(n, dtype=torch.int32).index_copy_(0, perm, (torch.arange(n) // gs).to(torch.int32))
        deq = (q - zero[:, g_idx.long()]).float() * scale.float()[:, g_idx.long()]
        tensors = {
            "qweight": _pack_nibbles(q.t().reshape(n // 8, 8, out).permute(0, 2, 1)),
            "qzeros": _pack_nibbles((zero.t() - (1 if v1 else 0)).reshape(n // gs, out // 8, 8)),
            "scales": scale.t().contiguous(),
            "g_idx": g_idx,
        }
        return tensors, deq
    q, zero, scale = _rtn(w, gs, sym=False)
    groups = torch.arange(n) // gs
    deq = (q - zero[:, groups]).float() * scale.float()[:, groups]
    order = torch.tensor(_AWQ_ORDER)
    tensors = {
        "qweight": _pack_nibbles(q.t().reshape(n, out // 8, 8)[:, :, order]),
        "qzeros": _pack_nibbles(zero.t().reshape(n // gs, out // 8, 8)[:, :, order]),
        "scales": scale.t().contiguous(),
    }
    return tensors, deq


def write_quantized_checkpoint(src: Path, directory: Path, method: str = "gptq", group_size: int = 32,
                               desc_act: bool = False, seed: int = 0) -> tuple[Path, Path]:
    """The checkpoint in ``src`` with its projections quantized to 4 bits as a GPTQ or AWQ export
    (``directory / "quant"``), and the same model with those weights dequantized to float32
    (``directory / "dense"``), the reference it must equal. With ``desc_act``, each input of a layer
    gets its own random activation order (q/k/v share one, gate/up another, as GPTQ's would)."""
    import re
    import shutil

    from safetensors.torch import load_file, save_file

    weights = load_file(str(src / "model.safetensors"))
    gen = torch.Generator().manual_seed(seed)
    perms: dict[tuple[str, int], torch.Tensor] = {}
    quant: dict[str, torch.Tensor] = {}
    dense: dict[str, torch.Tensor] = {}
    for name, w in weights.items():
        m = re.search(r"layers\.(\d+)\.\w+\.(\w+)\.weight$", name)
        if m is None or m.group(2) not in _QUANTIZED:
            quant[name] = dense[name] = w
            continue
        perm = None
        if desc_act:
            shared = {"q_proj": "attn", "k_proj": "attn", "v_proj": "attn", "gate_proj": "mlp", "up_proj": "mlp"}
            key = (shared.get(m.group(2), m.group(2)), int(m.group(1)))
            if key not in perms:
                perms[key] = torch.randperm(w.shape[1], generator=gen)
            perm = perms[key]
        tensors, deq = quantize_projection(w, method, group_size, perm)
        base = name.removesuffix(".weight")
        quant.update({f"{base}.{k}": v for k, v in tensors.items()})
        dense[name] = deq.to(w.dtype)
    cfg = json.loads((src / "config.json").read_text())
    qc = ({"quant_method": "gptq", "bits": 4, "group_size": group_size, "desc_act": desc_act, "sym": True,
           "checkpoint_format": "gptq"} if method == "gptq" else
          {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True, "version": "gemm"})
    out = {}
    for sub, tensors, config in (("quant", quant, {**cfg, "quantization_config": qc}), ("dense", dense, cfg)):
        d = directory / sub
        d.mkdir(parents=True, exist_ok=True)
        for f in src.iterdir():
            if f.name not in ("model.safetensors", "config.json") and f.is_file():
                shutil.copy(f, d / f.name)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(d / "model.safetensors"))
        (d / "config.json").write_text(json.dumps(config))
        out[sub] = d
    return out["quant"], out["dense"]
