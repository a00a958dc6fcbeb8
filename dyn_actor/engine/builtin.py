"""The built-in model, ``builtin:tiny``: seeded weights, an ASCII tokenizer, no download.

Every process that builds it gets bit-identical weights (a fixed seed on a
private generator), so a prefill worker and a decode worker agree without
sharing files. Its vocabulary is printable ASCII plus tab, newline, BOS and
EOS, so whatever it generates is readable text. ``save_builtin(dir)`` writes
it as an ordinary Hugging Face folder, which other engines (transformers,
vLLM) can load for side-by-side comparisons.
"""

from __future__ import annotations

import json
import string
from pathlib import Path
from typing import Any

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

BUILTIN_PREFIX = "builtin:"
BUILTIN_TINY = "builtin:tiny"

BOS, EOS = "<s>", "</s>"
_CHARS = "\t\n" + "".join(c for c in string.printable if c.isprintable())  # 95 printable + tab + newline

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['content'] is string %}{% set text = message['content'] %}"
    "{% else %}{% set text = message['content'] | map(attribute='text') | join('') %}{% endif %}"
    "{{ message['role'] }}: {{ text }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)

_SEED = 1234
_TINY = {
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
}


def builtin_names() -> list[str]:
    return [BUILTIN_TINY]


def build_tokenizer() -> Tokenizer:
    vocab = {BOS: 0, EOS: 1}
    for c in _CHARS:
        vocab[c] = len(vocab)
    tk = Tokenizer(models.WordLevel(vocab, unk_token="?"))
    tk.normalizer = normalizers.Replace(Regex(r"[^\t\n\x20-\x7e]"), "?")
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tk.decoder = decoders.Fuse()
    tk.add_special_tokens([BOS, EOS])
    tk.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, 0)])
    return tk


def hf_config(name: str = BUILTIN_TINY) -> dict[str, Any]:
    if name != BUILTIN_TINY:
        raise ValueError(f"unknown built-in model {name!r}; available: {', '.join(builtin_names())}")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": 2 + len(_CHARS),
        **_TINY,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "torch_dtype": "float32",
    }


def build_weights(name: str = BUILTIN_TINY) -> dict[str, torch.Tensor]:
    cfg = hf_config(name)
    g = torch.Generator().manual_seed(_SEED)
    h, inter, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    q = cfg["num_attention_heads"] * cfg["head_dim"]
    kv = cfg["num_key_value_heads"] * cfg["head_dim"]

    def lin(out: int, inp: int) -> torch.Tensor:
        return torch.randn(out, inp, generator=g) / inp**0.5

    w: dict[str, torch.Tensor] = {"model.embed_tokens.weight": torch.randn(v, h, generator=g)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = 1 + 0.1 * torch.randn(h, generator=g)
        w[p + "post_attention_layernorm.weight"] = 1 + 0.1 * torch.randn(h, generator=g)
        w[p + "self_attn.q_proj.weight"] = lin(q, h)
        w[p + "self_attn.k_proj.weight"] = lin(kv, h)
        w[p + "self_attn.v_proj.weight"] = lin(kv, h)
        w[p + "self_attn.o_proj.weight"] = lin(h, q) * 0.5
        w[p + "mlp.gate_proj.weight"] = lin(inter, h)
        w[p + "mlp.up_proj.weight"] = lin(inter, h)
        w[p + "mlp.down_proj.weight"] = lin(h, inter) * 0.5
    w["model.norm.weight"] = torch.ones(h)
    w["lm_head.weight"] = lin(v, h) * 4.0  # peaked logits: readable, varied greedy text
    return w


def tokenizer_config() -> dict[str, Any]:
    return {
        "bos_token": BOS,
        "eos_token": EOS,
        "add_bos_token": True,
        "model_max_length": 4096,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": CHAT_TEMPLATE,
    }


def save_builtin(directory: str | Path, name: str = BUILTIN_TINY) -> Path:
    """Write the built-in model as a Hugging Face folder (config, safetensors, tokenizer)."""
    from safetensors.torch import save_file

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(hf_config(name), indent=2))
    save_file({k: t.contiguous() for k, t in build_weights(name).items()}, str(d / "model.safetensors"))
    build_tokenizer().save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(), indent=2))
    (d / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": 1}))
    return d
