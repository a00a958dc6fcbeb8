"""Messages of the serving components, grouped by destination. All ``msgspec`` structs."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import msgspec

from dyn_actor.protocol import Logprobs, SamplingParams

# ----------------------------------------------------------------- to a worker


class GenerateRequest(msgspec.Struct, tag="generate"):
    """A tell: start a request; its output comes in the ``OutputBatch`` stream of the subscriber
    named ``owner`` (every subscriber's, when it names none)."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    owner: str = ""


class Subscribe(msgspec.Struct, tag="subscribe"):
    """A stream of ``OutputBatch``: one per engine step, the new tokens of every request that
    ``owner`` started (of every request, for the subscriber that names no owner) together. With
    several frontends, each gets only its own requests' outputs; when its stream ends (the
    frontend went away), the worker aborts its requests."""

    owner: str = ""


class AbortRequest(msgspec.Struct, tag="abort"):
    request_id: str


class StatsRequest(msgspec.Struct, tag="stats"):
    pass


class InfoRequest(msgspec.Struct, tag="info"):
    pass


class KvSnapshotRequest(msgspec.Struct, tag="kv_snapshot"):
    """Ask for every cached block hash (answered with ``dyn_actor.kv.events.KvSnapshot``)."""


class RemoteReceived(msgspec.Struct, tag="remote_received"):
    """``--engine vllm`` decode workers: the connector inside vLLM tells the worker that a prefill
    worker's KV for this request is in place (for the request's first delta and the metrics), and
    only then tells vLLM: an ask, answered with ``Ack``, so the worker knows before the first token."""

    request_id: str
    kv_bytes: int
    seconds: float
    cached_tokens: int  # prompt tokens the decode worker had cached itself (vLLM counts the received ones too)


class Ack(msgspec.Struct):
    pass


WorkerMessage = GenerateRequest | AbortRequest | StatsRequest | InfoRequest | Subscribe | KvSnapshotRequest

# --------------------------------------------------------------- from a worker


class TokenDelta(msgspec.Struct, omit_defaults=True):
    token_ids: list[int]
    finished: bool = False
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    logprobs: list[Logprobs] | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    remote_prefill: bool = False  # set on a request's first delta when a prefill worker computed its prompt
    kv_transfer_bytes: int = 0
    remote_prefill_seconds: float = 0.0  # from queueing the prefill to its KV being in place
    prompt_logprobs: list[Logprobs | None] | None = None  # on the first delta, when asked (the first is None)
    embedding: bytes | None = None  # an embedding request's vector (little-endian float32), on its one delta


class RequestDelta(msgspec.Struct, omit_defaults=True, array_like=True):
    request_id: str
    delta: TokenDelta | None = None
    error: str | None = None  # the request ended with this error (refused as bad input, or its step failed)
    error_type: str = "ValueError"  # ValueError: the client's input; anything else: the server's fault


class OutputBatch(msgspec.Struct, array_like=True):
    items: list[RequestDelta]


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
    remote_prefill_timeouts: int = 0  # decode workers: remote prefills given up at the deadline
    kv_blocks_fenced: int = 0  # decode workers: blocks held back while a late write may still land
    max_local_prefill_length: int = -1  # decode workers: the local/remote prefill threshold (-1: none)
    spec_drafts: int = 0  # speculative decoding: drafts checked, their tokens, the tokens kept
    spec_draft_tokens: int = 0
    spec_accepted_tokens: int = 0


class WorkerInfo(msgspec.Struct):
    worker: str
    model: str
    max_model_len: int
    vocab_size: int
    block_size: int
    eos_token_ids: list[int]
    kv_events_endpoint: str = ""  # where the worker publishes its KV events ("" if it does not)
    device: str = "cpu"  # where its engine runs: cpu, or cuda (card name)
    lora_modules: dict[str, str] = {}  # the LoRA adapters it serves, name -> folder
    runner: str = "generate"  # or pooling: it serves embeddings (engine/pooling.py)
    labels: list[str] = []  # a pooling runner's sequence classifier: its labels (it serves /classify)
    # a one-label classifier (a cross-encoder, at /score and /rerank): a query and a document as a
    # tokenizer's text pair (False: their texts concatenated, an LLM reranker's way)
    use_sep_token: bool = True


class Subscribers:
    """A worker's output streams, one per subscriber (a frontend), each named by its owner.
    ``own`` records which owner started a request, and ``forget`` drops that once the request has
    ended (the worker calls it after its last delta is published, or at an abort); ``publish``
    hands one step's deltas to their owners' streams (a request without an owner, to every
    stream; with one stream, everything to it). ``stream`` is the body
    of a ``Subscribe`` handler: an empty batch first (the subscriber knows it is registered), then
    a batch per step (a subscriber that fell behind gets what piled up as one). When a stream ends,
    ``on_gone(owner)`` runs: the requests of ``owner`` (``owned_by``) have no reader any more; when
    the last stream ends, ``on_gone(None)``: no request has one."""

    def __init__(self, on_gone: Callable[[str | None], None]) -> None:
        # owner -> its stream's queue (the latest, if it subscribed twice); unnamed ones by a key of their own
        self._queues: dict[str, asyncio.Queue] = {}
        self._owner: dict[str, str] = {}  # request id -> owner (requests that name one)
        self._on_gone = on_gone

    def __bool__(self) -> bool:
        return bool(self._queues)

    def own(self, request_id: str, owner: str) -> None:
        if owner:
            self._owner[request_id] = owner

    def forget(self, request_id: str) -> None:
        self._owner.pop(request_id, None)

    def owned_by(self, owner: str) -> list[str]:
        return [rid for rid, o in self._owner.items() if o == owner]

    def publish(self, items: list[RequestDelta]) -> None:
        queues, owner_of = self._queues, self._owner
        if len(queues) == 1:  # one frontend: all of it (nothing per item on the worker's step)
            next(iter(queues.values())).put_nowait(items)
            return
        by_owner: dict[str, list[RequestDelta]] = {}
        for it in items:
            by_owner.setdefault(owner_of.get(it.request_id, ""), []).append(it)
        for owner, its in by_owner.items():
            if not owner:
                for q in queues.values():
                    q.put_nowait(its)
            elif (q := queues.get(owner)) is not None:  # else its owner is gone (its requests are aborted)
                q.put_nowait(its)

    async def stream(self, owner: str = ""):
        q: asyncio.Queue = asyncio.Queue()
        key = owner or f"unnamed-{id(q)}"  # subscribers that name no owner each get every output
        self._queues[key] = q
        try:
            yield OutputBatch([])  # registered: from here on, the subscriber sees its outputs
            while True:
                items = await q.get()
                while not q.empty():
                    items = items + q.get_nowait()
                yield OutputBatch(items)
        finally:
            if self._queues.get(key) is q:
                del self._queues[key]
                self._on_gone(owner if self._queues else None)


def worker_handlers(w) -> dict:
    """The handlers every worker actor (native or vLLM) has, by message type."""
    return {GenerateRequest: w.generate, AbortRequest: w.abort, StatsRequest: w.stats, InfoRequest: w.info,
            Subscribe: w.subscribe, KvSnapshotRequest: w.kv_snapshot}
