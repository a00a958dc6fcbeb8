"""Find, check and load what a model name points at: ``builtin:tiny`` or a local Hugging Face folder."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec

from dyn_actor.engine import builtin
from dyn_actor.engine.model_config import TEXT_WEIGHT_PREFIXES, ModelConfig, ModelLoadError
from dyn_actor.engine.tokenizer import Tokenizer

if TYPE_CHECKING:
    import torch


@dataclass
class LoadedModel:
    name: str
    config: ModelConfig
    weights: dict[str, torch.Tensor]
    tokenizer: Tokenizer
    eos_token_ids: tuple[int, ...]


def load_model(source: str, hf_overrides: dict | None = None) -> LoadedModel:
    """Load a model by name; raise ``ModelLoadError`` with a one-line reason when it cannot be served.
    ``hf_overrides``: keys set over its config.json (vLLM's ``--hf-overrides``)."""
    if source.startswith(builtin.BUILTIN_PREFIX):
        try:
            cfg_dict = builtin.hf_config(source)
        except ValueError as e:
            raise ModelLoadError(str(e)) from None
        cfg = ModelConfig.from_hf_dict(override(cfg_dict, hf_overrides))
        tok = Tokenizer(
            builtin.build_tokenizer(), builtin.CHAT_TEMPLATE, builtin.BOS, builtin.EOS, add_bos_token=True
        )
        return LoadedModel(source, cfg, builtin.build_weights(source), tok, _eos_ids(cfg, tok, None))
    path = Path(source).expanduser()
    if not path.is_dir():
        raise ModelLoadError(f"model folder {source!r} does not exist (use a local folder or builtin:tiny)")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ModelLoadError(f"{path} has no config.json")
    try:
        hf = override(json.loads(cfg_file.read_text()), hf_overrides)
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{cfg_file} is not valid JSON: {e}") from None
    cfg = ModelConfig.from_hf_dict(hf)
    from dyn_actor.engine.quant import convert_weights, quant_config  # torch: not for the frontend's imports

    qc = quant_config(path, hf)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{path} has no *.safetensors weights (other formats are not loaded)")
    tok = Tokenizer.from_dir(path)
    weights = _load_safetensors(files)
    if qc is not None:  # GPTQ / AWQ: each projection's packed tensors become one QuantWeight
        weights = convert_weights(qc, weights)
    if cfg.text_of is not None:
        weights = _language_model_weights(weights)
    if cfg.classifier_from_token:
        weights = _head_from_tokens(cfg, weights, tok)
    gen_cfg = None
    if (path / "generation_config.json").is_file():
        gen_cfg = json.loads((path / "generation_config.json").read_text())
    return LoadedModel(str(path), cfg, weights, tok, _eos_ids(cfg, tok, gen_cfg))


def _load_safetensors(files: list[Path]) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    weights: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            weights.update(load_file(str(f)))
        except Exception as e:  # corrupt or truncated file
            raise ModelLoadError(f"cannot read {f}: {e}") from None
    return weights


def _language_model_weights(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A multimodal checkpoint's language-model tensors under a causal LM's names; the vision tower and
    projector are dropped."""
    out = {}
    for name, t in weights.items():
        for old, new in TEXT_WEIGHT_PREFIXES:
            if name.startswith(old):
                out[new + name[len(old):]] = t
                break
    if not out:
        raise ModelLoadError("the checkpoint holds no language-model tensors (language_model.model.*)")
    return out


def override(cfg: dict, overrides: dict | None) -> dict:
    """``cfg`` with ``overrides`` set over it (nested objects merged key by key, as vLLM merges its
    ``--hf-overrides`` into a config)."""
    if not overrides:
        return cfg
    out = dict(cfg)
    for k, v in overrides.items():
        out[k] = override(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _head_from_tokens(cfg: ModelConfig, weights: dict[str, torch.Tensor], tok: Tokenizer) -> dict[str, torch.Tensor]:
    """A causal LM's checkpoint made a classifier's (``classifier_from_token``): ``score.weight`` from
    the LM head's rows of those tokens, in float32 (``from_2_way_softmax``: true minus false, the one
    logit whose sigmoid is the 2-way softmax's true probability); the LM head itself dropped."""
    import torch

    head = None if cfg.tie_word_embeddings else weights.get("lm_head.weight")
    if head is None:
        head = weights.get("model.embed_tokens.weight", weights.get("embed_tokens.weight"))
    if head is None:
        raise ModelLoadError("classifier_from_token: the checkpoint has no LM head or embeddings to take rows from")
    ids = []
    for t in cfg.classifier_from_token:
        i = tok.backend.token_to_id(t)
        if i is None or not 0 <= i < head.shape[0]:
            raise ModelLoadError(f"classifier_from_token: {t!r} is not a token of this tokenizer")
        ids.append(i)
    rows = head[ids].to(torch.float32)
    score = rows[1:2] - rows[0:1] if cfg.classifier_method == "from_2_way_softmax" else rows
    out = {k: v for k, v in weights.items() if not k.endswith("lm_head.weight")}
    out["score.weight"] = score.contiguous()
    return out


def _eos_ids(cfg: ModelConfig, tok: Tokenizer, gen_cfg: dict | None) -> tuple[int, ...]:
    ids = list(cfg.eos_token_ids)
    if gen_cfg is not None:
        e = gen_cfg.get("eos_token_id")
        ids.extend(e if isinstance(e, list) else ([] if e is None else [e]))
    if tok.eos_token_id is not None:
        ids.append(tok.eos_token_id)
    return tuple(dict.fromkeys(int(i) for i in ids))


def resolve_dtype(name: str, cfg: ModelConfig, device: str = "cpu") -> torch.dtype:
    """``auto``: bfloat16 on a GPU; on the CPU, float32 checkpoints in float32 and everything else in
    bfloat16 (fast on CPUs with AMX)."""
    import torch

    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if name == "auto":
        if torch.device(device).type == "cuda":
            return torch.bfloat16
        return torch.float32 if cfg.torch_dtype in ("float32", "torch.float32") else torch.bfloat16
    if name not in table:
        raise ModelLoadError(f"unsupported dtype {name!r}: use auto, float32, bfloat16 or float16")
    return table[name]


def resolve_device(name: str) -> str:
    """``auto``: the GPU when torch sees one, else the CPU. Refuses ``cuda`` without one."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError("--device cuda: torch sees no GPU here (a CPU build of torch, or no visible device)")
    if torch.device(name).type not in ("cpu", "cuda"):
        raise ModelLoadError(f"unsupported device {name!r}: use auto, cpu or cuda")
    return name


#: what a model's generation_config.json may set as the default of a request's sampling (as vLLM
#: reads it), and how its names map to the request's
_GENERATION_DEFAULTS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                        "repetition_penalty": "repetition_penalty", "presence_penalty": "presence_penalty",
                        "frequency_penalty": "frequency_penalty", "max_new_tokens": "max_tokens"}


def default_sampling(source: str, setting: str = "auto") -> dict:
    """The sampling defaults a request gets for what it leaves unset, from a generation_config.json:
    the model folder's (``auto``, what vLLM does by default), another folder's (a path), or none
    (``vllm``: the server's own neutral defaults), as ``SamplingParams`` fields (temperature, top_p,
    top_k, min_p, the three penalties, and max_tokens from max_new_tokens).
    ``ModelLoadError`` for a file that cannot be read or holds values no request could have."""
    if setting == "vllm":
        return {}
    if setting == "auto":
        if source.startswith(builtin.BUILTIN_PREFIX):
            return {}
        folder = Path(source).expanduser()
    else:
        folder = Path(setting).expanduser()
        if not folder.is_dir():
            raise ModelLoadError(f"--generation-config {setting!r}: no such folder (use auto, vllm or a folder)")
    path = folder / "generation_config.json"
    if not path.is_file():
        return {}
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{path}: {e}".splitlines()[0]) from None
    if not isinstance(cfg, dict):
        raise ModelLoadError(f"{path} must hold a JSON object")
    defaults = {ours: cfg[theirs] for theirs, ours in _GENERATION_DEFAULTS.items() if cfg.get(theirs) is not None}
    from dyn_actor.protocol import SamplingParams

    try:
        msgspec.convert(defaults, SamplingParams).validate()
    except (TypeError, ValueError, msgspec.ValidationError) as e:
        raise ModelLoadError(f"{path}: {e}") from None
    return defaults


def load_tokenizer(source: str) -> Tokenizer:
    """Only the tokenizer of a model (no weights): what the frontend needs."""
    if source.startswith(builtin.BUILTIN_PREFIX):
        builtin.hf_config(source)  # validates the name
        return Tokenizer(builtin.build_tokenizer(), builtin.CHAT_TEMPLATE, builtin.BOS, builtin.EOS, add_bos_token=True)
    path = Path(source).expanduser()
    if not path.is_dir():
        raise ModelLoadError(f"model folder {source!r} does not exist (use a local folder or builtin:tiny)")
    return Tokenizer.from_dir(path)
