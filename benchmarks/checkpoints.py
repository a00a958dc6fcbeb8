"""Random Llama checkpoints for benchmarks, written with safetensors alone (no transformers, no download)."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models

from dyn_actor.engine import builtin

# ~125M parameters: 12 layers of 768, grouped-query attention (12 heads, 4 KV heads), 32k vocabulary
LLAMA_125M = dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                  num_key_value_heads=4, head_dim=64, vocab_size=32000)

# the shape of Llama-3.2-1B (random weights): 16 layers of 2048, 32 heads over 8 KV heads, 128k vocabulary
LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True)


def _wide_tokenizer(vocab_size: int) -> Tokenizer:
    """The built-in ASCII tokenizer padded with synthetic multi-character tokens to ``vocab_size``."""
    base = builtin.build_tokenizer()
    vocab = dict(sorted(base.get_vocab().items(), key=lambda kv: kv[1]))
    letters = "abcdefghijklmnopqrstuvwxyz"
    i = 0
    while len(vocab) < vocab_size:
        word = " " + letters[i % 26] + letters[(i // 26) % 26] + letters[(i // 676) % 26] + str(i // 17576)
        vocab.setdefault(word, len(vocab))
        i += 1
    tk = Tokenizer(models.WordLevel(vocab, unk_token="?"))
    tk.normalizer = base.normalizer
    tk.pre_tokenizer = base.pre_tokenizer
    tk.decoder = decoders.Fuse()
    tk.add_special_tokens([builtin.BOS, builtin.EOS])
    tk.post_processor = base.post_processor
    return tk


def _finish_folder(d: Path, cfg: dict) -> Path:
    """Beside the weights: config.json, the padded ASCII tokenizer, generation_config.json."""
    (d / "config.json").write_text(json.dumps(cfg, indent=2))
    _wide_tokenizer(cfg["vocab_size"]).save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps(builtin.tokenizer_config()))
    (d / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": 1}))
    return d


def write_random_llama(directory: str | Path, spec: dict | None = None, seed: int = 0) -> Path:
    spec = dict(spec or LLAMA_125M)
    d = Path(directory)
    if (d / "config.json").is_file():
        return d
    d.mkdir(parents=True, exist_ok=True)
    cfg = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 4096,
        "tie_word_embeddings": False, "bos_token_id": 0, "eos_token_id": 1, "torch_dtype": "float32", **spec,
    }
    w = builtin.random_llama_weights(cfg, seed)
    from safetensors.torch import save_file

    save_file(w, str(d / "model.safetensors"))
    return _finish_folder(d, cfg)


# a small Qwen3-MoE (random weights): 8 layers of 512, 32 experts of width 256, 4 a token; ~140M
# parameters of which ~55M are used a token (the embeddings and LM head included)
QWEN3_MOE_SMALL = dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
                       head_dim=64, vocab_size=32000, num_experts=32, num_experts_per_tok=4,
                       moe_intermediate_size=256, norm_topk_prob=True)


def write_random_qwen3_moe(directory: str | Path, spec: dict | None = None, seed: int = 0) -> Path:
    """A random Qwen3-MoE checkpoint in transformers' per-expert names (``mlp.experts.J.gate_proj``...), in
    bfloat16 as MoE checkpoints are published (so every server's ``--dtype auto`` serves it in bfloat16)."""
    import torch
    from safetensors.torch import save_file

    spec = dict(spec or QWEN3_MOE_SMALL)
    d = Path(directory)
    if (d / "config.json").is_file():
        return d
    d.mkdir(parents=True, exist_ok=True)
    cfg = {
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_act": "silu",
        "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "max_position_embeddings": 4096, "decoder_sparse_step": 1,
        "mlp_only_layers": [], "tie_word_embeddings": False, "bos_token_id": 0, "eos_token_id": 1,
        "torch_dtype": "bfloat16", "intermediate_size": 4 * spec["hidden_size"], **spec,
    }
    w = builtin.random_llama_weights({**cfg, "intermediate_size": 1}, seed)
    g = torch.Generator().manual_seed(seed + 1)
    h, e, inter, hd = cfg["hidden_size"], cfg["num_experts"], cfg["moe_intermediate_size"], cfg["head_dim"]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        for m in ("gate_proj", "up_proj", "down_proj"):
            del w[p + f"mlp.{m}.weight"]
        w[p + "self_attn.q_norm.weight"] = torch.ones(hd)
        w[p + "self_attn.k_norm.weight"] = torch.ones(hd)
        w[p + "mlp.gate.weight"] = torch.randn(e, h, generator=g) / h ** 0.5
        for j in range(e):
            x = p + f"mlp.experts.{j}."
            w[x + "gate_proj.weight"] = torch.randn(inter, h, generator=g) / h ** 0.5
            w[x + "up_proj.weight"] = torch.randn(inter, h, generator=g) / h ** 0.5
            w[x + "down_proj.weight"] = torch.randn(h, inter, generator=g) / inter ** 0.5
    save_file({k: v.to(torch.bfloat16) for k, v in w.items()}, str(d / "model.safetensors"))
    return _finish_folder(d, cfg)


# a small Gemma 3 text model (random weights): 8 layers of 512, 8 heads of 64 over 4 KV heads, every
# fourth layer global and the others over a sliding window of 64 tokens; ~60M parameters, bfloat16
GEMMA3_SMALL = dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=8,
                    num_key_value_heads=4, head_dim=64, vocab_size=32000, sliding_window=64, sliding_window_pattern=4)


def write_random_gemma3(directory: str | Path, spec: dict | None = None, seed: int = 0) -> Path:
    """A random ``Gemma3ForCausalLM`` checkpoint in transformers' names, in bfloat16 as Gemma 3 is
    published: four norms a layer (weights stored as ``w`` of ``1 + w``), head norms, tied embeddings."""
    import torch
    from safetensors.torch import save_file

    spec = dict(spec or GEMMA3_SMALL)
    d = Path(directory)
    if (d / "config.json").is_file():
        return d
    d.mkdir(parents=True, exist_ok=True)
    layers, pattern = spec["num_hidden_layers"], spec.pop("sliding_window_pattern", 6)
    cfg = {
        "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "hidden_activation": "gelu_pytorch_tanh",
        "rms_norm_eps": 1e-6, "max_position_embeddings": 8192, "query_pre_attn_scalar": spec["head_dim"],
        "layer_types": ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(layers)],
        "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}},
        "final_logit_softcapping": None, "attn_logit_softcapping": None,
        "tie_word_embeddings": True, "bos_token_id": 0, "eos_token_id": 1, "torch_dtype": "bfloat16", **spec,
    }
    w = builtin.random_llama_weights({**cfg, "tie_word_embeddings": True}, seed)
    w.pop("lm_head.weight", None)
    g = torch.Generator().manual_seed(seed + 1)
    w["model.embed_tokens.weight"] /= cfg["hidden_size"] ** 0.5  # Gemma scales embeddings up by sqrt(hidden)
    w["model.norm.weight"] = 0.1 * torch.randn(cfg["hidden_size"], generator=g)
    for i in range(layers):
        p = f"model.layers.{i}."
        for n in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                  "post_feedforward_layernorm"):
            w[p + n + ".weight"] = 0.1 * torch.randn(cfg["hidden_size"], generator=g)
        for n in ("q_norm", "k_norm"):
            w[p + f"self_attn.{n}.weight"] = 0.1 * torch.randn(cfg["head_dim"], generator=g)
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in w.items()}, str(d / "model.safetensors"))
    return _finish_folder(d, cfg)


# a small Qwen3-Embedding-shaped model (random weights): the bare transformer (no LM head), 8 layers of
# 512, 8 heads of 64 over 4 KV heads, head norms, 32k vocabulary; last-token pooling, normalized
QWEN3_EMBED_SMALL = dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                         num_key_value_heads=4, head_dim=64, vocab_size=32000)


def write_random_embedding_model(directory: str | Path, spec: dict | None = None, seed: int = 0) -> Path:
    """A random ``Qwen3Model`` folder as embedding models are published: tensors without the ``model.``
    prefix and no LM head, sentence-transformers ``modules.json`` with last-token pooling and a
    Normalize module; bfloat16."""
    import torch
    from safetensors.torch import save_file

    spec = dict(spec or QWEN3_EMBED_SMALL)
    d = Path(directory)
    if (d / "config.json").is_file():
        return d
    d.mkdir(parents=True, exist_ok=True)
    cfg = {
        "architectures": ["Qwen3Model"], "model_type": "qwen3", "hidden_act": "silu", "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0, "max_position_embeddings": 8192, "tie_word_embeddings": True, "bos_token_id": 0,
        "eos_token_id": 1, "torch_dtype": "bfloat16", **spec,
    }
    w = builtin.random_llama_weights(cfg, seed)
    w.pop("lm_head.weight", None)
    for i in range(cfg["num_hidden_layers"]):
        for n in ("q_norm", "k_norm"):
            w[f"model.layers.{i}.self_attn.{n}.weight"] = torch.ones(cfg["head_dim"])
    save_file({k.removeprefix("model."): v.to(torch.bfloat16).contiguous() for k, v in w.items()},
              str(d / "model.safetensors"))
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
               {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]
    (d / "modules.json").write_text(json.dumps(modules, indent=2))
    (d / "1_Pooling").mkdir(exist_ok=True)
    (d / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": cfg["hidden_size"], "pooling_mode_lasttoken": True}, indent=2))
    return _finish_folder(d, cfg)


def write_random_reranker_model(directory: str | Path, spec: dict | None = None, seed: int = 0) -> Path:
    """A random one-label ``Qwen3ForSequenceClassification`` (a cross-encoder reranker: a ``score`` head
    of one row over the last token), the shape of ``QWEN3_EMBED_SMALL`` unless ``spec``; bfloat16."""
    import torch
    from safetensors.torch import save_file

    spec = dict(spec or QWEN3_EMBED_SMALL)
    d = Path(directory)
    if (d / "config.json").is_file():
        return d
    d.mkdir(parents=True, exist_ok=True)
    cfg = {
        "architectures": ["Qwen3ForSequenceClassification"], "model_type": "qwen3", "hidden_act": "silu",
        "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "max_position_embeddings": 8192, "tie_word_embeddings": True,
        "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1, "torch_dtype": "bfloat16", "num_labels": 1,
        "id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}, **spec,
    }
    w = builtin.random_llama_weights(cfg, seed)
    w.pop("lm_head.weight", None)
    for i in range(cfg["num_hidden_layers"]):
        for n in ("q_norm", "k_norm"):
            w[f"model.layers.{i}.self_attn.{n}.weight"] = torch.ones(cfg["head_dim"])
    g = torch.Generator().manual_seed(seed + 1)
    w["score.weight"] = torch.randn(1, cfg["hidden_size"], generator=g) / cfg["hidden_size"] ** 0.5
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in w.items()}, str(d / "model.safetensors"))
    return _finish_folder(d, cfg)


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def write_random_lora(base: str | Path, directory: str | Path, rank: int = 16, seed: int = 0,
                      targets: tuple[str, ...] = LORA_TARGETS) -> Path:
    """A random LoRA adapter for the checkpoint in ``base``, in PEFT's file format (what PEFT's
    ``save_pretrained`` writes: ``adapter_config.json`` and ``adapter_model.safetensors``)."""
    import torch
    from safetensors.torch import save_file

    d = Path(directory)
    if (d / "adapter_config.json").is_file():
        return d
    cfg = json.loads((Path(base) / "config.json").read_text())
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    hd = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    shapes = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h), "gate_proj": (h, inter),
              "up_proj": (h, inter), "down_proj": (inter, h)}
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(cfg["num_hidden_layers"]):
        for m in targets:
            part = "self_attn" if m in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            fan_in, fan_out = shapes[m]
            key = f"base_model.model.model.layers.{layer}.{part}.{m}"
            tensors[key + ".lora_A.weight"] = torch.randn((rank, fan_in), generator=g) / fan_in ** 0.5
            tensors[key + ".lora_B.weight"] = torch.randn((fan_out, rank), generator=g) / rank ** 0.5 * 0.1
    d.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(d / "adapter_model.safetensors"))
    (d / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank, "lora_dropout": 0.0,
        "target_modules": list(targets), "bias": "none", "base_model_name_or_path": str(base)}, indent=2))
    return d
