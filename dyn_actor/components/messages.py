"""Messages of the serving components, grouped by destination. All ``msgspec`` structs."""

from __future__ import annotations

import msgspec

from dyn_actor.engine.sampling import Logprobs, SamplingParams

# ----------------------------------------------------------------- to a worker


class GenerateRequest(msgspec.Struct, tag="generate"):
    """Stream of ``TokenDelta`` until the request finishes; cancelling the stream aborts it."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams


class AbortRequest(msgspec.Struct, tag="abort"):
    request_id: str


class StatsRequest(msgspec.Struct, tag="stats"):
    pass


class InfoRequest(msgspec.Struct, tag="info"):
    pass


WorkerMessage = GenerateRequest | AbortRequest | StatsRequest | InfoRequest

# --------------------------------------------------------------- from a worker


class TokenDelta(msgspec.Struct, omit_defaults=True):
    token_ids: list[int]
    finished: bool = False
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    logprobs: list[Logprobs] | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0


class WorkerStats(msgspec.Struct):
    worker: str
    kv_blocks_used: int
    kv_blocks_total: int
    kv_blocks_cached: int
    requests_running: int
    requests_waiting: int
    prompt_tokens: int
    prefix_cache_hit_tokens: int
    generated_tokens: int
    num_preemptions: int
    step_seconds_total: float
    steps_total: int


class WorkerInfo(msgspec.Struct):
    worker: str
    model: str
    max_model_len: int
    vocab_size: int
    block_size: int
    eos_token_ids: list[int]
