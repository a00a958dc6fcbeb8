"""KV events a block manager emits and the KV-aware router consumes.

Events are emitted for *full* blocks only. They are ``msgspec`` structs so a
worker can publish them as msgpack without any conversion.
"""

from __future__ import annotations

import msgspec


class BlockStored(msgspec.Struct, tag="stored", frozen=True):
    """Consecutive full blocks became cached; ``block_hashes[0]`` follows ``parent_hash``."""

    block_hashes: list[int]
    parent_hash: int | None
    token_ids: list[int]
    block_size: int


class BlockRemoved(msgspec.Struct, tag="removed", frozen=True):
    """Cached blocks were evicted and no longer hold their content."""

    block_hashes: list[int]


class AllBlocksCleared(msgspec.Struct, tag="cleared", frozen=True):
    """Every cached block was dropped (e.g. a prefix-cache reset)."""


KvEvent = BlockStored | BlockRemoved | AllBlocksCleared


# ------------------------------------------------------------------ on the wire
# What a worker publishes on its KV-event PUB socket (msgpack), one stream per worker.


class KvEventBatch(msgspec.Struct, tag="kv_events", frozen=True):
    """The KV events of one engine step. ``seq`` counts batches from 1 without gaps, so a
    subscriber that sees ``seq`` jump knows it missed some and must resynchronise."""

    worker: str
    seq: int
    block_size: int
    events: list[KvEvent]


class WorkerLoad(msgspec.Struct, tag="load", frozen=True):
    """The worker's load and counters, a few times a second: the one channel by which the frontend
    learns them (the router's load, the /metrics gauges, the planner). ``seq`` is the last event
    batch sent before it (so a lost trailing batch is noticed too)."""

    worker: str
    seq: int
    block_size: int
    kv_blocks_used: int
    kv_blocks_total: int
    requests_waiting: int
    requests_running: int
    kv_blocks_cached: int = 0
    prompt_tokens: int = 0
    prefix_cache_hit_tokens: int = 0
    generated_tokens: int = 0
    num_preemptions: int = 0
    step_seconds_total: float = 0.0
    steps_total: int = 0
    remote_prefill_timeouts: int = 0  # decode workers: remote prefills given up at the deadline
    kv_blocks_fenced: int = 0  # decode workers: blocks held back while a late write may still land
    max_local_prefill_length: int = -1  # decode workers: the local/remote prefill threshold (-1: none)
    spec_drafts: int = 0  # speculative decoding: drafts checked, their tokens, the tokens kept
    spec_draft_tokens: int = 0
    spec_accepted_tokens: int = 0


KvPublication = KvEventBatch | WorkerLoad


class KvSnapshot(msgspec.Struct, frozen=True):
    """Every block a worker has cached, as of event batch ``seq`` (the answer to a resync)."""

    worker: str
    seq: int
    block_size: int
    block_hashes: list[int]
