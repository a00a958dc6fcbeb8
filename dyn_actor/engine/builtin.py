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
from typing import TYPE_CHECKING, Any

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

if TYPE_CHECKING:
    import torch

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


def random_llama_weights(
    cfg: dict[str, Any], seed: int, norm_jitter: float = 0.0, residual_scale: float = 1.0, head_scale: float = 1.0
) -> dict[str, torch.Tensor]:
    """Seeded random weights for a Llama ``config.json`` dict, named as in a Hugging Face checkpoint.

    Projections are N(0, 1/fan_in); ``residual_scale`` scales the o/down projections,
    ``head_scale`` the LM head, ``norm_jitter`` the RMSNorm weights around 1.
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    h, inter, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    q = cfg["num_attention_heads"] * cfg["head_dim"]
    kv = cfg["num_key_value_heads"] * cfg["head_dim"]

    def lin(out: int, inp: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(out, inp, generator=g) * (scale / inp**0.5)

    def norm() -> torch.Tensor:
        return 1 + norm_jitter * torch.randn(h, generator=g) if norm_jitter else torch.ones(h)

    w: dict[str, torch.Tensor] = {"model.embed_tokens.weight": torch.randn(v, h, generator=g)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = norm()
        w[p + "post_attention_layernorm.weight"] = norm()
        w[p + "self_attn.q_proj.weight"] = lin(q, h)
        w[p + "self_attn.k_proj.weight"] = lin(kv, h)
        w[p + "self_attn.v_proj.weight"] = lin(kv, h)
        w[p + "self_attn.o_proj.weight"] = lin(h, q, residual_scale)
        w[p + "mlp.gate_proj.weight"] = lin(inter, h)
        w[p + "mlp.up_proj.weight"] = lin(inter, h)
        w[p + "mlp.down_proj.weight"] = lin(h, inter, residual_scale)
    w["model.norm.weight"] = torch.ones(h)
    w["lm_head.weight"] = lin(v, h, head_scale)
    return w


def build_weights(name: str = BUILTIN_TINY) -> dict[str, torch.Tensor]:
    # peaked logits (head_scale 4): readable, varied greedy text
    return random_llama_weights(hf_config(name), _SEED, norm_jitter=0.1, residual_scale=0.5, head_scale=4.0)


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
