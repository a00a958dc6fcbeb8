"""LoRA adapters served beside the base model (vLLM's ``--enable-lora --lora-modules name=path``).

An adapter is a PEFT folder (``adapter_config.json`` + ``adapter_model.safetensors``) of low-rank
updates ``W + s * B @ A`` to the attention and MLP projections, ``s = lora_alpha / r`` (or
``/ sqrt(r)`` with rsLoRA). The base weights are never changed: every adapter stays loaded, each
row of a step applies its request's adapter (``x @ A.T @ B.T`` added to the projection's output),
and requests of different adapters, and of none, share a step.

The engine fuses the query/key/value projections into one product and the gate/up projections
into another; an adapter's updates are fused the same way: the ``A`` matrices of the fused
projections stacked (one product for all of them), their ``B`` matrices placed block-diagonally
(each writes only its own projection's columns), the scale folded into ``B``. A fused projection
an adapter leaves alone costs nothing for its rows.

Prefix caching and KV-aware routing key blocks by adapter: a request's first block hashes on top
of ``lora_root(name)`` (``hash_block``'s parent) instead of the empty root, so KV computed with one
adapter is never taken for another's, or the base model's (``dyn_actor.kv.block_hash``).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from dyn_actor.engine.model_config import ModelConfig, ModelLoadError
from dyn_actor.kv.block_hash import lora_root  # noqa: F401 - part of this module's interface

if TYPE_CHECKING:  # torch is imported where adapters are loaded: the launcher checks flags without it
    import torch

#: the projections an adapter may target, grouped as the engine fuses them
FUSED = {"qkv": ("q_proj", "k_proj", "v_proj"), "o": ("o_proj",), "gu": ("gate_proj", "up_proj"),
         "down": ("down_proj",)}
#: projections that checkpoints store already fused (Phi-3), one adapter module each
STORED_FUSED = {"qkv_proj": "qkv", "gate_up_proj": "gu"}
MODULES = tuple(m for ms in FUSED.values() for m in ms) + tuple(STORED_FUSED)
_KEY = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+_proj)\.lora_([AB])(?:\.[\w-]+)?\.weight$")


def parse_lora_modules(specs: list[str] | None) -> dict[str, str]:
    """``name=path`` items (or vLLM's JSON form ``{"name": ..., "path": ...}``) into {name: path}; a
    ``ValueError`` with a one-line message for a malformed or repeated one."""
    out: dict[str, str] = {}
    for spec in specs or []:
        spec = spec.strip()
        if spec.startswith("{"):
            try:
                obj = json.loads(spec)
                name, path = str(obj["name"]), str(obj["path"])
            except (ValueError, KeyError, TypeError):
                raise ValueError(f"--lora-modules: {spec!r} is not a JSON object with 'name' and 'path'") from None
        else:
            name, sep, path = spec.partition("=")
            if not sep:
                raise ValueError(f"--lora-modules: {spec!r} is not NAME=PATH")
        name, path = name.strip(), path.strip()
        if not name or not path:
            raise ValueError(f"--lora-modules: {spec!r} needs both a name and a path")
        if name in out:
            raise ValueError(f"--lora-modules: the name {name!r} is given twice")
        out[name] = path
    return out


@dataclass
class LoraAdapter:
    name: str
    path: str
    rank: int
    scale: float
    #: per layer: fused projection ("qkv", "o", "gu", "down") -> (A [r_total, in], B [out, r_total]), scale in B
    layers: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=list)
    targets: tuple[str, ...] = ()


def _out_sizes(cfg: ModelConfig) -> dict[str, int]:
    return {"q_proj": cfg.q_size, "k_proj": cfg.kv_size, "v_proj": cfg.kv_size, "o_proj": cfg.hidden_size,
            "gate_proj": cfg.intermediate_size, "up_proj": cfg.intermediate_size, "down_proj": cfg.hidden_size,
            "qkv_proj": cfg.q_size + 2 * cfg.kv_size, "gate_up_proj": 2 * cfg.intermediate_size}


def _in_sizes(cfg: ModelConfig) -> dict[str, int]:
    h = cfg.hidden_size
    return {"q_proj": h, "k_proj": h, "v_proj": h, "o_proj": cfg.q_size, "gate_proj": h, "up_proj": h,
            "down_proj": cfg.intermediate_size, "qkv_proj": h, "gate_up_proj": h}


def read_adapter_config(path: str | Path) -> dict:
    d = Path(path)
    if not d.is_dir():
        raise ModelLoadError(f"LoRA adapter folder {str(d)!r} does not exist")
    f = d / "adapter_config.json"
    if not f.is_file():
        raise ModelLoadError(f"LoRA adapter {str(d)!r} has no adapter_config.json")
    try:
        cfg = json.loads(f.read_text())
    except ValueError as e:
        raise ModelLoadError(f"LoRA adapter {str(d)!r}: adapter_config.json is not JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ModelLoadError(f"LoRA adapter {str(d)!r}: adapter_config.json is not an object")
    return cfg


def load_adapter(name: str, path: str, cfg: ModelConfig, dtype: torch.dtype, device: torch.device | str,
                 max_rank: int) -> LoraAdapter:
    """Read a PEFT LoRA folder for a model of ``cfg``; a ``ModelLoadError`` (one line) for anything this
    engine would not apply exactly as PEFT does."""
    import torch
    from safetensors.torch import load_file

    where = f"LoRA adapter {name!r} ({path})"
    acfg = read_adapter_config(path)
    peft_type = str(acfg.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise ModelLoadError(f"{where}: peft_type {peft_type!r} is not LORA")
    for key, why in (("use_dora", "DoRA"), ("modules_to_save", "modules_to_save (whole trained modules)"),
                     ("rank_pattern", "per-module ranks (rank_pattern)"),
                     ("alpha_pattern", "per-module alphas (alpha_pattern)"), ("fan_in_fan_out", "fan_in_fan_out"),
                     ("use_qalora", "QA-LoRA"), ("lora_bias", "lora_bias"),
                     ("alora_invocation_tokens", "activated LoRA (alora_invocation_tokens)"),
                     ("layer_replication", "layer_replication"), ("target_parameters", "target_parameters")):
        if acfg.get(key):
            raise ModelLoadError(f"{where}: {why} is not supported")
    if acfg.get("bias", "none") != "none":
        raise ModelLoadError(f"{where}: bias {acfg['bias']!r} is not supported (only 'none')")
    try:
        r = int(acfg["r"])
        alpha = float(acfg.get("lora_alpha", r))
    except (KeyError, TypeError, ValueError):
        raise ModelLoadError(f"{where}: adapter_config.json needs an integer 'r'") from None
    if not 0 < r <= max_rank:
        raise ModelLoadError(f"{where}: rank {r} is above --max-lora-rank {max_rank}" if r > 0
                             else f"{where}: rank {r}")
    scale = alpha / math.sqrt(r) if acfg.get("use_rslora") else alpha / r
    files = sorted(Path(path).glob("adapter_model*.safetensors"))
    if not files:
        if (Path(path) / "adapter_model.bin").exists():
            raise ModelLoadError(f"{where}: only adapter_model.safetensors is read (found adapter_model.bin)")
        raise ModelLoadError(f"{where}: no adapter_model.safetensors")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            tensors.update(load_file(str(f)))
        except Exception as e:  # noqa: BLE001 - a broken file: say which
            raise ModelLoadError(f"{where}: cannot read {f.name} ({type(e).__name__})") from None
    # (layer, module) -> {"A": ..., "B": ...}
    found: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _KEY.search(key)
        if m is None:
            if any(part in key for part in (".experts.", ".shared_expert", ".block_sparse_moe.")):
                raise ModelLoadError(f"{where}: adapters of a mixture of experts' MLPs are not supported ({key})")
            if "lora_embedding" in key or "embed_tokens" in key or "lm_head" in key:
                raise ModelLoadError(f"{where}: adapters of the embeddings or the LM head are not supported ({key})")
            if key.endswith(".bias") or "magnitude" in key:
                raise ModelLoadError(f"{where}: tensor {key!r} is not supported")
            raise ModelLoadError(f"{where}: unexpected tensor {key!r}")
        layer, module, ab = int(m.group(1)), m.group(2), m.group(3)
        if module not in MODULES:
            raise ModelLoadError(f"{where}: module {module!r} is not one of {', '.join(MODULES)}")
        if not 0 <= layer < cfg.num_layers:
            raise ModelLoadError(f"{where}: layer {layer} is outside the model's {cfg.num_layers}")
        if layer in cfg.moe_layers and module in ("gate_proj", "up_proj", "down_proj", "gate_up_proj"):
            raise ModelLoadError(f"{where}: layer {layer} is a mixture of experts; adapters of its MLP are not "
                                 "supported")
        found.setdefault((layer, module), {})[ab] = t
    if not found:
        raise ModelLoadError(f"{where}: no LoRA weights found")
    outs, ins = _out_sizes(cfg), _in_sizes(cfg)
    for (layer, module), ab in found.items():
        if set(ab) != {"A", "B"}:
            raise ModelLoadError(f"{where}: layer {layer} {module} lacks lora_{'B' if 'A' in ab else 'A'}")
        a, b = ab["A"], ab["B"]
        if tuple(a.shape) != (r, ins[module]) or tuple(b.shape) != (outs[module], r):
            raise ModelLoadError(
                f"{where}: layer {layer} {module} has A {tuple(a.shape)} and B {tuple(b.shape)}; a rank-{r} "
                f"adapter of this model has A {(r, ins[module])} and B {(outs[module], r)} (another base model?)")
    for (layer, module) in found:
        if module in STORED_FUSED and any((layer, m) in found for m in FUSED[STORED_FUSED[module]]):
            raise ModelLoadError(f"{where}: layer {layer} has {module} and its parts' adapters both")
    adapter = LoraAdapter(name, str(path), r, scale, targets=tuple(sorted({m for _, m in found})))
    for layer in range(cfg.num_layers):
        fused: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for module, key in STORED_FUSED.items():
            if (layer, module) in found:
                b = found[(layer, module)]["B"].float() * scale
                if key == "qkv" and cfg.rotary_dim:
                    b = torch.cat([_rotary_rows(cfg, part) for part in
                                   b.split([cfg.q_size, cfg.kv_size, cfg.kv_size])[:2]] + [b[cfg.q_size + cfg.kv_size:]])
                fused[key] = (found[(layer, module)]["A"].to(device=device, dtype=dtype).contiguous(),
                              b.to(device=device, dtype=dtype).contiguous())
        for key, modules in FUSED.items():
            present = [m for m in modules if (layer, m) in found]
            if not present:
                continue
            a = torch.cat([found[(layer, m)]["A"].float() for m in present])
            b = torch.zeros((sum(outs[m] for m in modules), r * len(present)), dtype=torch.float32)
            row = col = 0
            for m in modules:
                if m in present:
                    bm = found[(layer, m)]["B"].float() * scale
                    b[row:row + outs[m], col:col + r] = _rotary_rows(cfg, bm) if m in ("q_proj", "k_proj") else bm
                    col += r
                row += outs[m]
            fused[key] = (a.to(device=device, dtype=dtype).contiguous(), b.to(device=device, dtype=dtype).contiguous())
        adapter.layers.append(fused)
    return adapter


def _rotary_rows(cfg: ModelConfig, b: torch.Tensor) -> torch.Tensor:
    """A query or key projection's ``B`` rows with each head's dimensions in the order the model keeps
    them under a partial rotary factor (``model.rotary_order``); as is otherwise."""
    if not cfg.rotary_dim:
        return b
    from dyn_actor.engine.model import rotary_order

    return b.view(-1, cfg.head_dim, b.shape[1])[:, rotary_order(cfg)].reshape(b.shape)


class LoraRows:
    """Which rows of the step's batch use which adapter: set by the engine before a forward pass that
    has rows with an adapter, read by every projection (``Linear``) of that pass, cleared after.

    Two forms. ``groups``: (slot, rows) per adapter of the step, rows a slice where they are
    consecutive: each projection runs each adapter's two small products on its rows (best when one
    adapter serves a run of rows). ``row_slot``: every row's slot (0: none): each projection runs
    one product against every adapter's stacked ``A`` at once, zeroes the columns of the adapters a
    row does not use, and one product against the stacked ``B`` (``Linear``'s dense form; a few
    products whatever the mix, with no gather or scatter)."""

    __slots__ = ("groups", "row_slot", "_masks")

    def __init__(self) -> None:
        #: (adapter slot, rows: a slice of consecutive rows or an index tensor)
        self.groups: list[tuple[int, slice | torch.Tensor]] = []
        self.row_slot: torch.Tensor | None = None  # [T] long
        self._masks: dict[tuple[int, int], torch.Tensor] = {}

    @property
    def active(self) -> bool:
        return bool(self.groups) or self.row_slot is not None

    def clear(self) -> None:
        self.groups = []
        self.row_slot = None
        self._masks.clear()

    def mask(self, width: int, slots: int, dtype) -> torch.Tensor:
        """``[T, slots * width]``: 1 where a row's adapter owns the column (adapter ``s`` owns columns
        ``[(s - 1) * width, s * width)``), else 0; made once a step for each layout."""
        key = (width, slots)
        m = self._masks.get(key)
        if m is None:
            import torch

            rs = self.row_slot
            col_slot = torch.arange(slots * width, device=rs.device) // width + 1
            m = self._masks[key] = (rs.unsqueeze(1) == col_slot.unsqueeze(0)).to(dtype)
        return m
