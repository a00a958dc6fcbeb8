"""The native paged-attention engine.

Layers, bottom up: ``model_config`` / ``loader`` / ``builtin`` (what to run),
``model`` (the Llama-family forward pass over a paged ``KvPool``),
``sampling`` (per-request sampling), ``scheduler`` (continuous batching with
chunked prefill and preemption) and ``engine`` (the step loop a worker drives).
``llm.LLM`` is the offline front door.

The names below load on first use: the frontend imports ``tokenizer`` and ``detokenizer`` from this
package and has no use for torch, whose import would add seconds to its start.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__all__ = ["EngineConfig", "LLMEngine", "RequestOutput", "SamplingParams"]

_WHERE = {"EngineConfig": "engine", "LLMEngine": "engine", "RequestOutput": "engine", "SamplingParams": "sampling"}

if TYPE_CHECKING:
    from dyn_actor.engine.engine import EngineConfig, LLMEngine, RequestOutput
    from dyn_actor.engine.sampling import SamplingParams


def __getattr__(name: str):
    if name in _WHERE:
        value = getattr(importlib.import_module(f"dyn_actor.engine.{_WHERE[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
