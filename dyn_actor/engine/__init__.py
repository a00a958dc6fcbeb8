"""The native paged-attention engine.

Layers, bottom up: ``model_config`` / ``loader`` / ``builtin`` (what to run),
``model`` (the Llama-family forward pass over a paged ``KvPool``),
``sampling`` (per-request sampling), ``scheduler`` (continuous batching with
chunked prefill and preemption) and ``engine`` (the step loop a worker drives).
``llm.LLM`` is the offline front door.
"""

from dyn_actor.engine.engine import EngineConfig, LLMEngine, RequestOutput
from dyn_actor.engine.sampling import SamplingParams

__all__ = ["EngineConfig", "LLMEngine", "RequestOutput", "SamplingParams"]
