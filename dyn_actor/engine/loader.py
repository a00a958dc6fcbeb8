"""Find, check and load what a model name points at: ``builtin:tiny`` or a local Hugging Face folder."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from dyn_actor.engine import builtin
from dyn_actor.engine.model_config import ModelConfig, ModelLoadError
from dyn_actor.engine.tokenizer import Tokenizer


@dataclass
class LoadedModel:
    name: str
    config: ModelConfig
    weights: dict[str, torch.Tensor]
    tokenizer: Tokenizer
    eos_token_ids: tuple[int, ...]


def load_model(source: str) -> LoadedModel:
    """Load a model by name; raise ``ModelLoadError`` with a one-line reason when it cannot be served."""
    if source.startswith(builtin.BUILTIN_PREFIX):
        try:
            cfg_dict = builtin.hf_config(source)
        except ValueError as e:
            raise ModelLoadError(str(e)) from None
        cfg = ModelConfig.from_hf_dict(cfg_dict)
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
        cfg = ModelConfig.from_hf_dict(json.loads(cfg_file.read_text()))
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{cfg_file} is not valid JSON: {e}") from None
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{path} has no *.safetensors weights (other formats are not loaded)")
    tok = Tokenizer.from_dir(path)
    weights = _load_safetensors(files)
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
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError("--device cuda: torch sees no GPU here (a CPU build of torch, or no visible device)")
    if torch.device(name).type not in ("cpu", "cuda"):
        raise ModelLoadError(f"unsupported device {name!r}: use auto, cpu or cuda")
    return name


def load_tokenizer(source: str) -> Tokenizer:
    """Only the tokenizer of a model (no weights): what the frontend needs."""
    if source.startswith(builtin.BUILTIN_PREFIX):
        builtin.hf_config(source)  # validates the name
        return Tokenizer(builtin.build_tokenizer(), builtin.CHAT_TEMPLATE, builtin.BOS, builtin.EOS, add_bos_token=True)
    path = Path(source).expanduser()
    if not path.is_dir():
        raise ModelLoadError(f"model folder {source!r} does not exist (use a local folder or builtin:tiny)")
    return Tokenizer.from_dir(path)
