"""The worker actor: owns an engine, runs its step loop on a thread of its own, streams tokens.

The mailbox (asyncio) never waits on the engine: requests and aborts are
queued to the engine thread and applied between steps, and each step's
outputs are handed back to the loop, which feeds the per-request streams.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgspec

from dyn_actor.actor import Actor
from dyn_actor.components.engine_thread import EngineThread
from dyn_actor.components.messages import (
    AbortRequest,
    GenerateRequest,
    InfoRequest,
    KvSnapshotRequest,
    OutputBatch,
    RequestDelta,
    StatsRequest,
    Subscribe,
    Subscribers,
    TokenDelta,
    WorkerInfo,
    WorkerMessage,
    WorkerStats,
    worker_handlers,
)
from dyn_actor.engine.engine import LLMEngine, RequestOutput
from dyn_actor.kv.events import KvEvent, KvEventBatch, KvSnapshot, WorkerLoad
from dyn_actor.transport import PubSocket

log = logging.getLogger(__name__)


class Worker(Actor):
    """Requests come in as tells; every step's outputs go out as one ``OutputBatch`` to the
    subscribers (the frontend), which demultiplex them per request. One message per step
    instead of one per request and token keeps both processes' Python work small."""

    Message = WorkerMessage

    LOAD_INTERVAL = 0.2  # seconds between WorkerLoad publications

    def __init__(self, name: str, engine: LLMEngine, events_endpoint: str | None = None) -> None:
        self.name = name
        self.engine = engine
        self._subscribers = Subscribers(self._readers_gone)
        self._thread: EngineThread | None = None
        self._live: set[str] = set()  # requests started and not finished
        # KV events and load, published on a PUB socket for the KV-aware router
        self.events_endpoint = events_endpoint
        self._pub: PubSocket | None = None
        self._pub_queue: asyncio.Queue = asyncio.Queue()
        self._pub_seq = 0  # the last event batch queued for sending
        self._pub_tasks: list[asyncio.Task] = []

    def handlers(self):
        return worker_handlers(self)

    async def on_start(self) -> None:
        on_kv = None
        if self.events_endpoint:
            self._pub = PubSocket(self.events_endpoint)
            on_kv = self._queue_kv_events
            self._pub_tasks = [asyncio.ensure_future(self._send_publications()),
                               asyncio.ensure_future(self._publish_load())]
        self._thread = EngineThread(self.engine, asyncio.get_running_loop(), self._dispatch, on_kv, self._engine_died)
        self._thread.start()

    def _engine_died(self, exc: BaseException) -> None:
        """Nothing can be served without the engine: stop, so the process exits and is restarted."""
        self.stop(RuntimeError(f"{self.name}: the engine thread died ({type(exc).__name__}: {exc})"))

    async def on_stop(self) -> None:
        if self._thread is not None:
            self._thread.stop()
        for t in self._pub_tasks:
            t.cancel()
        if self._pub is not None:
            self._pub.close()

    # ------------------------------------------------------------- KV events
    def _queue_kv_events(self, seq: int, events: list[KvEvent]) -> None:
        self._pub_seq = seq
        self._pub_queue.put_nowait(KvEventBatch(self.name, seq, self.engine.layout.block_size, events))

    async def _send_publications(self) -> None:
        """One sender, so batches and loads go out in the order they were queued."""
        assert self._pub is not None
        while True:
            msg = await self._pub_queue.get()
            await self._pub.send(msgspec.msgpack.encode(msg))

    async def _publish_load(self) -> None:
        while True:
            s = self.stats(None)
            self._pub_queue.put_nowait(WorkerLoad(
                worker=self.name, seq=self._pub_seq, block_size=self.engine.layout.block_size,
                kv_blocks_used=s.kv_blocks_used, kv_blocks_total=s.kv_blocks_total,
                requests_waiting=s.requests_waiting, requests_running=s.requests_running,
                kv_blocks_cached=s.kv_blocks_cached, prompt_tokens=s.prompt_tokens,
                prefix_cache_hit_tokens=s.prefix_cache_hit_tokens, generated_tokens=s.generated_tokens,
                num_preemptions=s.num_preemptions, step_seconds_total=s.step_seconds_total, steps_total=s.steps_total,
                remote_prefill_timeouts=s.remote_prefill_timeouts, kv_blocks_fenced=s.kv_blocks_fenced,
                max_local_prefill_length=s.max_local_prefill_length, spec_drafts=s.spec_drafts,
                spec_draft_tokens=s.spec_draft_tokens, spec_accepted_tokens=s.spec_accepted_tokens))
            await asyncio.sleep(self.LOAD_INTERVAL)

    async def kv_snapshot(self, m: KvSnapshotRequest) -> KvSnapshot:
        assert self._thread is not None
        thread = self._thread
        seq, hashes = await thread.submit(thread.kv_snapshot)
        return KvSnapshot(self.name, seq, self.engine.layout.block_size, hashes)

    def _publish(self, items: list[RequestDelta]) -> None:
        self._subscribers.publish(items)

    def _dispatch(self, outputs: list[RequestOutput], remote: dict[str, tuple[int, float]] | None = None) -> None:
        """Publish one step's outputs as one batch. ``remote``: request id -> (KV bytes, seconds) of
        requests whose prompt a prefill worker computed (their first delta carries it)."""
        items = []
        ended = []
        for out in outputs:
            if out.finished or out.error is not None:
                self._live.discard(out.request_id)
                ended.append(out.request_id)
            if out.error is not None:  # its step failed: the request ended with the error
                items.append(RequestDelta(out.request_id, error=out.error, error_type=out.error_type))
                continue
            kv_bytes, seconds = remote.get(out.request_id, (0, 0.0)) if remote else (0, 0.0)
            items.append(RequestDelta(out.request_id, TokenDelta(
                list(out.new_token_ids), out.finished, out.finish_reason, out.stop_reason,
                list(out.logprobs) if out.logprobs else None, out.num_prompt_tokens, out.num_cached_tokens,
                remote_prefill=bool(remote) and out.request_id in remote, kv_transfer_bytes=kv_bytes,
                remote_prefill_seconds=seconds, prompt_logprobs=out.prompt_logprobs, embedding=out.embedding)))
        self._publish(items)
        for rid in ended:  # after their last deltas went to their owners
            self._subscribers.forget(rid)

    def subscribe(self, m: Subscribe) -> AsyncIterator[OutputBatch]:
        return self._subscribers.stream(m.owner)

    def _readers_gone(self, owner: str | None) -> None:
        """A frontend went away (``owner``; None: the last one): nobody will read its requests."""
        rids = list(self._live) if owner is None else self._subscribers.owned_by(owner)
        if rids:
            log.warning("%s: aborting %d requests whose frontend went away", self.name, len(rids))
        for rid in rids:
            self.abort(AbortRequest(rid))  # the actor's own abort: a decode worker fences, too

    def generate(self, m: GenerateRequest) -> None:
        assert self._thread is not None
        rid = m.request_id
        self._live.add(rid)
        self._subscribers.own(rid, m.owner)
        self._admit(rid, self._thread.submit(lambda e: e.add_request(rid, m.prompt_token_ids, m.params, validated=True)))

    def _admit(self, rid: str, fut: asyncio.Future, then: Callable[[Any], None] | None = None) -> None:
        """When the engine thread has taken request ``rid`` (``fut``): report a refusal to the
        subscribers as the request's error, or hand the result to ``then``. Never waits."""

        def done(f: asyncio.Future) -> None:
            exc = f.exception()
            if exc is not None:
                self._live.discard(rid)
                if not isinstance(exc, ValueError):
                    log.error("admitting %s failed: %s: %s", rid, type(exc).__name__, exc)
                self._publish([RequestDelta(rid, error=str(exc), error_type=type(exc).__name__)])
                self._subscribers.forget(rid)
            elif then is not None:
                then(f.result())

        fut.add_done_callback(done)

    def _abort(self, rid: str) -> None:
        assert self._thread is not None
        self._live.discard(rid)
        self._subscribers.forget(rid)
        self._thread.submit(lambda e: e.abort_request(rid))

    def abort(self, m: AbortRequest) -> None:
        self._abort(m.request_id)

    def stats(self, m: StatsRequest) -> WorkerStats:
        s = self.engine.stats()  # plain ints read across threads: a consistent-enough snapshot
        t = self._thread
        return WorkerStats(
            self.name, s.kv_blocks_used, s.kv_blocks_total, s.kv_blocks_cached, s.num_running,
            s.num_waiting + s.num_waiting_remote, s.prompt_tokens, s.prefix_cache_hit_tokens,
            s.generated_tokens, s.num_preemptions, t.step_seconds if t else 0.0, t.steps if t else 0,
            spec_drafts=s.spec_drafts, spec_draft_tokens=s.spec_draft_tokens, spec_accepted_tokens=s.spec_accepted_tokens,
        )

    def info(self, m: InfoRequest) -> WorkerInfo:
        e = self.engine
        return WorkerInfo(
            self.name, e.model_name, e.max_model_len, e.model_config.vocab_size, e.layout.block_size,
            list(e.eos_token_ids), self.events_endpoint or "", e.device_name, dict(e.lora_modules), e.runner,
            list(e.model_config.labels), e.model_config.use_sep_token,
        )
