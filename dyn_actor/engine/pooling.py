"""Embeddings: a model served with ``--runner pooling`` turns each prompt into one vector, pooled
from the final hidden states (after the last norm, before the LM head), instead of generating.

How a checkpoint is pooled comes, as vLLM reads it, from its sentence-transformers files where it
has them (``modules.json``: a ``Pooling`` module whose ``config.json`` names the mode, and a
``Normalize`` module or not), else from the defaults of a decoder model: the last token's state,
scaled to unit length. ``--pooler-config`` overrides either. Pooling types:

- ``LAST``: the last prompt token's state (what decoder embedding models such as Qwen3-Embedding
  and e5-mistral are trained for). Only that one position must be computed, so a prompt's cached
  prefix is reused and long prompts are prefilled in chunks, as for generation.
- ``MEAN``: the mean over every prompt position. Summed chunk by chunk (each chunk's rows, added on
  the device), so long prompts still go in chunks; no prefix-cache hit (every position is computed).
- ``CLS``: the first position's state; no prefix-cache hit either.

A sequence classifier's pooled state goes through its ``score`` head (``classify``); one with a
single label is a cross-encoder, which ``/score`` and ``/rerank`` give each (query, document) pair
to as one input (``pair_ids``).

This module is torch-free but for ``finish``: the launcher reads the configuration with it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from dyn_actor.engine.model_config import BASE_MODEL_OF, CLASSIFIER_OF, ModelLoadError

if TYPE_CHECKING:
    import torch

    from dyn_actor.engine.tokenizer import Tokenizer

POOLING_TYPES = ("LAST", "MEAN", "CLS")
RUNNERS = ("auto", "generate", "pooling")
CONVERTS = ("auto", "none", "embed", "classify")
_ST_POOLING = "sentence_transformers.models.Pooling"
_ST_NORMALIZE = "sentence_transformers.models.Normalize"


@dataclass(frozen=True)
class PoolerConfig:
    pooling_type: str = "LAST"
    normalize: bool = True
    source: str = "default"  # where it came from, for the start-up log: default, sentence-transformers, flag


def sentence_transformers_pooler(folder: str | Path) -> PoolerConfig | None:
    """The pooling a sentence-transformers folder declares (``modules.json``), or None without one."""
    path = Path(folder)
    modules_file = path / "modules.json"
    if not modules_file.is_file():
        return None
    try:
        modules = json.loads(modules_file.read_text())
        if not isinstance(modules, list):
            raise ValueError("it must hold a list of modules")
        pooling = next((m for m in modules if isinstance(m, dict) and m.get("type") == _ST_POOLING), None)
        normalize = any(isinstance(m, dict) and m.get("type") == _ST_NORMALIZE for m in modules)
        kind = None
        if pooling is not None:
            cfg_file = path / str(pooling.get("path", "")) / "config.json"
            cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
            kind = _st_pooling_type(cfg)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{modules_file}: {e}".splitlines()[0]) from None
    return PoolerConfig(kind or "LAST", normalize, "sentence-transformers")


def _st_pooling_type(cfg: dict) -> str | None:
    """A sentence-transformers Pooling config's mode as one of ``POOLING_TYPES``; ModelLoadError for
    one this server does not compute (weighted means, max pooling, ...)."""
    names = [cfg["pooling_mode"]] if isinstance(cfg.get("pooling_mode"), str) else \
        [k for k, v in cfg.items() if k.startswith("pooling_mode_") and v is True]
    kinds = {"lasttoken": "LAST", "last": "LAST", "mean": "MEAN", "mean_tokens": "MEAN", "cls": "CLS",
             "cls_token": "CLS"}
    found = []
    for name in names:
        kind = kinds.get(name.removeprefix("pooling_mode_").lower())
        if kind is None:
            raise ModelLoadError(f"the sentence-transformers pooling mode {name!r} is not supported "
                                 f"(supported: last token, mean, CLS)")
        found.append(kind)
    if len(set(found)) > 1:
        raise ModelLoadError(f"several sentence-transformers pooling modes at once ({', '.join(names)}) "
                             "are not supported")
    return found[0] if found else None


def parse_pooler_config(text: str | dict | None, base: PoolerConfig) -> PoolerConfig:
    """``--pooler-config`` (vLLM's flag, JSON): ``pooling_type`` (or ``seq_pooling_type``) LAST, MEAN
    or CLS, and ``normalize`` (or vLLM's ``use_activation``), over ``base``. ModelLoadError for
    anything else."""
    if text is None or text == "":
        return base
    try:
        d = json.loads(text) if isinstance(text, str) else dict(text)
    except ValueError as e:
        raise ModelLoadError(f"--pooler-config is not valid JSON: {e}") from None
    if not isinstance(d, dict):
        raise ModelLoadError("--pooler-config must be a JSON object")
    known = {"pooling_type", "seq_pooling_type", "normalize", "use_activation"}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ModelLoadError(f"--pooler-config: unsupported keys {unknown} (supported: {sorted(known)})")
    kind = d.get("pooling_type", d.get("seq_pooling_type")) or base.pooling_type
    if not isinstance(kind, str) or kind.upper() not in POOLING_TYPES:
        raise ModelLoadError(f"--pooler-config: pooling_type must be one of {', '.join(POOLING_TYPES)}, got {kind!r}")
    normalize = d.get("normalize", d.get("use_activation"))
    if normalize is None:
        normalize = base.normalize
    if not isinstance(normalize, bool):
        raise ModelLoadError(f"--pooler-config: normalize must be true or false, got {normalize!r}")
    return PoolerConfig(kind.upper(), normalize, "flag")


def resolve_runner(runner: str, source: str, base_model_only: bool, convert: str = "auto") -> str:
    """``auto``: ``pooling`` for a sentence-transformers folder, a bare ``*Model`` architecture (no
    LM head), a classifier or a ``--convert`` to one of those, ``generate`` otherwise, as vLLM decides."""
    if runner not in RUNNERS:
        raise ModelLoadError(f"unknown runner {runner!r}: use auto, generate or pooling")
    if convert in ("embed", "classify"):
        if runner == "generate":
            raise ModelLoadError(f"--convert {convert} makes a pooling model: it does not go with --runner generate")
        return "pooling"
    if runner != "auto":
        return runner
    if base_model_only or (not source.startswith("builtin:") and (Path(source).expanduser() / "modules.json").is_file()):
        return "pooling"
    return "generate"


def _architecture(source: str, overrides: dict | None = None) -> str | None:
    """The first architecture a model folder's config.json names, ``overrides`` (``--hf-overrides``)
    set over it (None: builtin, unreadable, none)."""
    cfg_file = Path(source).expanduser() / "config.json"
    archs = (overrides or {}).get("architectures")
    if not archs and not source.startswith("builtin:") and cfg_file.is_file():
        try:
            archs = json.loads(cfg_file.read_text()).get("architectures")
        except (OSError, ValueError, AttributeError):
            return None  # the engine reports it
    return archs[0] if isinstance(archs, list) and archs else None


def converted(source: str, convert: str, overrides: dict | None) -> dict | None:
    """vLLM's ``--convert``: ``classify`` reads a causal LM's folder as its ``*ForSequenceClassification``
    (the head from the checkpoint's ``score.weight``, or from ``classifier_from_token``), by setting
    ``architectures`` in ``overrides``; ``embed`` (a pooling runner over a causal LM) and ``none``
    change nothing here. ``overrides`` as they are, or with that key set."""
    if convert not in CONVERTS:
        raise ModelLoadError(f"unknown convert {convert!r}: use {', '.join(CONVERTS)}")
    if convert != "classify":
        return overrides
    arch = "LlamaForCausalLM" if source.startswith("builtin:") else _architecture(source, overrides)
    if arch in CLASSIFIER_OF:
        return overrides
    cls = next((c for c, causal in CLASSIFIER_OF.items() if causal == arch), None)
    if cls is None:
        raise ModelLoadError(f"--convert classify: {arch or 'this model'} has no classifier form here (causal LMs of "
                             f"{', '.join(CLASSIFIER_OF.values())})")
    return {**(overrides or {}), "architectures": [cls]}


def classifier(source: str, overrides: dict | None = None) -> bool:
    """Whether model ``source`` is a sequence classifier (from its config.json alone)."""
    return _architecture(source, overrides) in CLASSIFIER_OF


def runner_of(source: str, runner: str, overrides: dict | None = None, convert: str = "auto") -> str:
    """``resolve_runner`` from the model's config.json alone (the launcher's check; no weights read)."""
    arch = _architecture(source, overrides)
    return resolve_runner(runner, source, arch in BASE_MODEL_OF or arch in CLASSIFIER_OF, convert)


def pooler_for(source: str, flag: str | dict | None) -> PoolerConfig:
    """The pooling of model ``source``: its sentence-transformers files, else the decoder default
    (LAST, normalized), then ``--pooler-config`` over that."""
    base = None if source.startswith("builtin:") else sentence_transformers_pooler(Path(source).expanduser())
    return parse_pooler_config(flag, base or PoolerConfig())


def finish(vectors: torch.Tensor, dims: list[int | None], normalize: list[bool]) -> list[bytes]:
    """Each pooled row (float32, on the host) cut to its ``dims`` and, where asked, scaled to unit
    length (after the cut, as a Matryoshka model's shorter embeddings are); little-endian float32
    bytes, which the frontend sends as JSON floats or, for ``encoding_format: base64``, as they are."""
    import torch

    out = []
    for row, d, norm in zip(vectors, dims, normalize):
        v = row[:d] if d is not None else row
        if norm:
            v = torch.nn.functional.normalize(v, dim=0)
        out.append(v.contiguous().numpy().astype("<f4", copy=False).tobytes())
    return out


def pair_ids(tok: Tokenizer, query: str, document: str, use_sep_token: bool, template: str | None = None,
             **template_kwargs) -> list[int]:
    """A cross-encoder's input for one (query, document) pair, as vLLM builds it: rendered by
    ``template`` where one is given (``--chat-template``: the two as messages of roles ``query`` and
    ``document``), else the tokenizer's text pair (its separator between them), or for an LLM
    reranker (``use_sep_token`` false) the two texts concatenated. ``ChatTemplateError`` where the
    template fails."""
    if template is not None:
        return tok.encode(tok.render_template(template, [{"role": "query", "content": query},
                                                         {"role": "document", "content": document}],
                                              **template_kwargs))
    return tok.encode_pair(query, document) if use_sep_token else tok.encode(query + document)


def classify(scores: torch.Tensor, activate: list[bool], problem_type: str | None,
             activation: str | None = None) -> list[bytes]:
    """A sequence classifier's rows of label scores (float32, on the host) through the activation vLLM
    gives them (where ``activate``; vLLM's ``use_activation``): as transformers' loss for
    ``problem_type`` reads them (none for regression, a sigmoid per label for multi-label
    classification, a softmax over the labels for single-label), else the ``activation`` its
    sentence-transformers config names (a cross-encoder's), else a sigmoid for a single label and a
    softmax over several. Little-endian float32 bytes, one row each."""
    import torch

    if problem_type not in ("regression", "single_label_classification", "multi_label_classification"):
        problem_type = None
    out = []
    for row, act in zip(scores, activate):
        if act and problem_type != "regression":
            if problem_type is None and activation is not None:
                row = {"Sigmoid": torch.sigmoid, "Tanh": torch.tanh, "Identity": lambda r: r}[activation](row)
            elif problem_type == "multi_label_classification" or row.numel() < 2:
                row = torch.sigmoid(row)
            else:
                row = torch.softmax(row, dim=0)
        out.append(row.contiguous().numpy().astype("<f4", copy=False).tobytes())
    return out
