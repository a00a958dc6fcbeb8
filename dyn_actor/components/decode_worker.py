"""The decode worker: decides per request whether to prefill locally or remotely, allocates the
blocks, puts remote prefills on the queue, and grants and fences the writes of prefill workers
(see ``disagg.py`` for the flow)."""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import Future
from dataclasses import dataclass

import msgspec

from dyn_actor.actor import ActorError, ActorRef
from dyn_actor.components.disagg import DisaggPolicy, prefill_remotely, process_alive, set_policy, writer_idle
from dyn_actor.components.disagg_messages import (
    BeginWrite,
    DisaggPolicyState,
    Drop,
    PrefillLost,
    Push,
    QueueDepth,
    RemotePrefillDone,
    RemotePrefillFailed,
    RemotePrefillRequest,
    SetDisaggPolicy,
    WriteGrant,
)
from dyn_actor.components.messages import AbortRequest, GenerateRequest, RequestDelta, WorkerMessage, WorkerStats
from dyn_actor.components.prefill_queue import PUBLISH_INTERVAL, depth_endpoint
from dyn_actor.components.worker import Worker
from dyn_actor.engine.engine import LLMEngine, RemoteAllocation, RequestOutput
from dyn_actor.transport import SubSocket

log = logging.getLogger(__name__)

DEPTH_STALE_AFTER = 3.0  # seconds without a depth publication before the queue counts as unavailable
FENCE_CHECK_INTERVAL = 1.0


@dataclass
class RemotePrefill:
    """A remote prefill the decode worker waits for."""

    timer: asyncio.TimerHandle
    started: float
    writer: BeginWrite | None = None  # the prefill worker granted the blocks, once one asked
    granted_at: float = 0.0
    aborted: bool = False  # the client went away after the grant: free the blocks once the writer is done


class DecodeWorker(Worker):
    Message = WorkerMessage | RemotePrefillDone | RemotePrefillFailed | SetDisaggPolicy | BeginWrite | PrefillLost

    def __init__(self, name: str, engine: LLMEngine, endpoint: str, queue_endpoint: str, policy: DisaggPolicy,
                 events_endpoint: str | None = None) -> None:
        super().__init__(name, engine, events_endpoint)
        self.endpoint = endpoint
        self.policy = policy
        self._queue_endpoint = queue_endpoint
        self._queue: ActorRef | None = None
        self._depth_sub: SubSocket | None = None
        self._depth = 0  # the queue's last published depth ...
        self._depth_at = float("-inf")  # ... received at this loop time
        self._pushed_since_depth = 0  # remote prefills decided since that publication (engine thread)
        self._remote: dict[str, RemotePrefill] = {}
        self._fenced: dict[str, BeginWrite] = {}  # request id -> the writer its blocks were granted to
        self._writers: dict[str, ActorRef] = {}  # prefill worker endpoint -> ref (asked about fences)
        self._tasks: list[asyncio.Task] = []
        self.remote_timeouts = 0

    def handlers(self):
        h = super().handlers()
        h[RemotePrefillDone] = self.remote_done
        h[RemotePrefillFailed] = self.remote_failed
        h[SetDisaggPolicy] = self.set_policy
        h[BeginWrite] = self.begin_write
        h[PrefillLost] = self.prefill_lost
        return h

    def set_policy(self, m: SetDisaggPolicy) -> DisaggPolicyState:
        return set_policy(self.policy, m)

    async def on_start(self) -> None:
        await super().on_start()
        self._queue = await ActorRef(self._queue_endpoint, "prefill-queue").start(wait_ready=60)
        self._queue.on_dead(self._queue_lost)
        self._queue.on_alive(lambda _ref: log.info("the prefill queue answers again; remote prefill resumes"))
        self._depth_sub = SubSocket(depth_endpoint(self._queue_endpoint))
        self._tasks = [asyncio.ensure_future(self._read_depth()), asyncio.ensure_future(self._watch_writers())]
        # ready means ready to prefill remotely: until the queue's first depth arrives (it publishes
        # twice a second) every prompt would be prefilled here
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 4 * PUBLISH_INTERVAL
        while self._depth_at == float("-inf") and loop.time() < deadline:
            await asyncio.sleep(0.01)

    async def on_stop(self) -> None:
        for entry in self._remote.values():
            entry.timer.cancel()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._depth_sub is not None:
            self._depth_sub.close()
        for ref in [self._queue, *self._writers.values()]:
            if ref is not None:
                await ref.close()
        await super().on_stop()
        self.engine.close()  # removes the shared-memory KV pool

    def stats(self, m) -> WorkerStats:
        s = super().stats(m)
        s.remote_prefill_timeouts = self.remote_timeouts
        s.kv_blocks_fenced = self.engine.num_fenced_blocks
        s.max_local_prefill_length = self.policy.max_local_prefill_length
        return s

    # ------------------------------------------------------------ the queue
    async def _read_depth(self) -> None:
        """The queue publishes its depth on every change (and twice a second): no ask per request."""
        assert self._depth_sub is not None
        decoder = msgspec.msgpack.Decoder(QueueDepth)
        loop = asyncio.get_running_loop()
        while True:
            data = await self._depth_sub.recv()
            try:
                self._depth = decoder.decode(data).depth
            except msgspec.DecodeError:
                continue
            self._depth_at = loop.time()
            self._pushed_since_depth = 0

    def _queue_usable(self) -> bool:
        return (self._queue is not None and self._queue.alive
                and asyncio.get_running_loop().time() - self._depth_at < DEPTH_STALE_AFTER)

    def _queue_lost(self, _ref: ActorRef) -> None:
        """The queue stopped answering: whatever it held may never be pulled. Every remote prefill no
        writer took yet is computed here now (a writer asking later is refused)."""
        waiting = [rid for rid, e in self._remote.items() if e.writer is None]
        log.warning("the prefill queue stopped answering: prefilling locally (%d waiting remote prefills taken back)",
                    len(waiting))
        for rid in waiting:
            self._give_up(rid, "the prefill queue stopped answering")

    def _drop_from_queue(self, rid: str) -> None:
        if self._queue is not None and self._queue.alive:
            asyncio.ensure_future(self._queue.try_tell(Drop(rid)))

    # ------------------------------------------------------------- requests
    def generate(self, m: GenerateRequest) -> None:
        """Decide local vs remote on the engine thread, next to the prefix cache it reads: the mailbox
        does not wait, and the decision and the allocation see the same cache."""
        assert self._thread is not None
        rid, prompt, params = m.request_id, m.prompt_token_ids, m.params
        self._live.add(rid)
        self._subscribers.own(rid, m.owner)
        remote_ok = self._queue_usable()
        policy = self.policy

        def admit(e: LLMEngine) -> tuple[RemoteAllocation, Future | None] | None:
            # prompt logprobs come from a local prefill; so does an embedding (the prompt's hidden states)
            if remote_ok and params.prompt_logprobs is None and params.pooling is None:
                _, cached = e.cached_prefix(prompt, params.lora_name)
                depth = self._depth + self._pushed_since_depth
                if prefill_remotely(len(prompt) - cached, depth, policy):
                    alloc = e.allocate_remote_prefill(rid, prompt, params, validated=True)
                    if alloc is not None:
                        self._pushed_since_depth += 1
                        grammar = e.requests[rid].grammar
                        return alloc, None if grammar is None else grammar.future
                    # no room for the whole prompt now: the scheduler queues it locally
            e.add_request(rid, prompt, params, validated=True)
            return None

        self._admit(rid, self._thread.submit(admit), lambda got: got and self._push_when_compiled(m, *got))

    def _push_when_compiled(self, m: GenerateRequest, alloc: RemoteAllocation, grammar: Future | None) -> None:
        """Push a remote prefill once its structured output's grammar has compiled here: one that
        does not compile ends the request now, as the client's error (a 400), and no prefill worker
        is handed a request that can only fail."""
        if grammar is None or (grammar.done() and grammar.exception() is None):
            self._push_remote(m, alloc)
            return
        rid = m.request_id

        def compiled(f: asyncio.Future) -> None:
            exc = f.exception()
            if exc is None:
                self._push_remote(m, alloc)
            elif rid in self._live:  # nothing was pushed: the blocks are only ours, freed by the abort
                self._live.discard(rid)
                self._thread.submit(lambda e: e.abort_request(rid))
                self._publish([RequestDelta(rid, error=str(exc), error_type="ValueError" if isinstance(
                    exc, ValueError) else "EngineError")])
                self._subscribers.forget(rid)

        asyncio.wrap_future(grammar).add_done_callback(compiled)

    def _push_remote(self, m: GenerateRequest, alloc: RemoteAllocation) -> None:
        rid = m.request_id
        if rid not in self._live:
            return  # aborted meanwhile: the abort, queued after the allocation, frees the blocks
        bs = self.engine.layout.block_size
        req = RemotePrefillRequest(rid, m.prompt_token_ids, m.params, self.name, self.endpoint,
                                   self.engine.pool.descriptor(), alloc.block_ids, alloc.num_cached_tokens // bs, bs)
        loop = asyncio.get_running_loop()
        self._remote[rid] = RemotePrefill(loop.call_later(self.policy.remote_prefill_timeout, self._timed_out, rid),
                                          loop.time())
        asyncio.ensure_future(self._send_push(req))

    async def _send_push(self, req: RemotePrefillRequest) -> None:
        assert self._queue is not None
        try:
            await self._queue.tell(Push(req))
        except ActorError:
            self._give_up(req.request_id, "the prefill queue is gone")

    def _timed_out(self, rid: str) -> None:
        if rid not in self._remote:
            return
        self.remote_timeouts += 1
        log.warning("remote prefill of %s timed out after %.1fs: prefilling locally", rid,
                    self.policy.remote_prefill_timeout)
        self._give_up(rid, "timed out")

    def _give_up(self, rid: str, why: str) -> None:
        """Stop waiting for the remote prefill of ``rid``: compute it here (or free it, if aborted)."""
        entry = self._remote.pop(rid, None)
        if entry is None:
            return
        entry.timer.cancel()
        assert self._thread is not None
        if entry.writer is None:
            # no prefill worker may write these blocks now (a later BeginWrite is refused): reuse them
            self._drop_from_queue(rid)
            if entry.aborted or rid not in self._live:
                self._thread.submit(lambda e: e.abort_request(rid))
            else:
                log.info("remote prefill of %s %s: prefilling locally", rid, why)
                self._thread.submit(lambda e: e.fail_remote_prefill(rid))
            return
        # a write may be landing right now: these blocks stay out of circulation until it cannot
        self._fenced[rid] = entry.writer
        restart = not entry.aborted and rid in self._live
        log.warning("remote prefill of %s %s while %s may be writing its blocks: they are fenced off%s", rid, why,
                    entry.writer.writer, "; prefilling locally in fresh blocks" if restart else "")
        self._thread.submit(lambda e: e.fence_remote_blocks(rid, restart))

    def begin_write(self, m: BeginWrite) -> WriteGrant:
        entry = self._remote.get(m.request_id)
        if entry is None or entry.aborted or entry.writer is not None:
            return WriteGrant(False)
        entry.writer = m
        entry.granted_at = asyncio.get_running_loop().time()
        return WriteGrant(True)

    def remote_done(self, m: RemotePrefillDone) -> None:
        rid = m.request_id
        entry = self._remote.pop(rid, None)
        if entry is None:
            self._release_fence(rid, "its writer finished")
            return
        entry.timer.cancel()
        assert self._thread is not None
        if entry.aborted or rid not in self._live:
            self._thread.submit(lambda e: e.abort_request(rid))  # the writes are done: the blocks can go
            return
        seconds = asyncio.get_running_loop().time() - entry.started

        def resume(e: LLMEngine) -> list[RequestOutput]:
            out = e.finish_remote_prefill(rid, m.first_token, m.logprobs)
            return [out] if out is not None else []

        # the first token goes out in order with the tokens of the steps after it (a done callback
        # of the command's future would run after the next step's outputs were published)
        self._thread.submit_publishing(resume, lambda outs: self._dispatch(outs, remote={rid: (m.kv_bytes, seconds)}))

    def prefill_lost(self, m: PrefillLost) -> None:
        entry = self._remote.get(m.request_id)
        if entry is not None and entry.writer is None:  # granted: the fence decides, not the queue
            self._give_up(m.request_id, "was lost with its prefill worker")

    def remote_failed(self, m: RemotePrefillFailed) -> None:
        entry = self._remote.get(m.request_id)
        if entry is None:
            self._release_fence(m.request_id, "its writer gave up")
            return
        entry.writer = None  # the prefill worker says it will not write: the blocks are free to reuse
        log.warning("remote prefill of %s failed (%s)", m.request_id, m.reason)
        self._give_up(m.request_id, f"failed ({m.reason})")

    def abort(self, m: AbortRequest) -> None:
        rid = m.request_id
        entry = self._remote.get(rid)
        if entry is None:
            super().abort(m)
            return
        self._live.discard(rid)
        self._subscribers.forget(rid)
        if entry.writer is None:
            self._give_up(rid, "aborted")  # frees the blocks: nobody may write them any more
        else:
            entry.aborted = True  # freed once the writer is done (or fenced at the deadline)

    # --------------------------------------------------------------- fences
    def _release_fence(self, rid: str, why: str) -> None:
        if self._fenced.pop(rid, None) is None:
            return
        log.info("fenced blocks of %s released: %s", rid, why)
        assert self._thread is not None
        self._thread.submit(lambda e: e.release_fence(rid))

    async def _watch_writers(self) -> None:
        """Every second: lift a fence once its writer's process is gone or the writer says it is not
        writing; and take back a granted remote prefill whose writer says so (its report was lost,
        say to a stall: without this the request would wait for its deadline)."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(FENCE_CHECK_INTERVAL)
            for rid, w in list(self._fenced.items()):
                if not process_alive(w.writer_pid):
                    self._release_fence(rid, f"{w.writer} (pid {w.writer_pid}) is gone")
                elif await writer_idle(self._writers, w, FENCE_CHECK_INTERVAL) is True:
                    self._release_fence(rid, f"{w.writer} is not writing it")
            for rid, entry in list(self._remote.items()):
                w = entry.writer
                if w is None or loop.time() - entry.granted_at < FENCE_CHECK_INTERVAL:
                    continue
                if not process_alive(w.writer_pid) or await writer_idle(self._writers, w, FENCE_CHECK_INTERVAL) is True:
                    if self._remote.get(rid) is entry:
                        entry.writer = None  # it will not write: the blocks are the decode worker's again
                        self._give_up(rid, f"was granted to {w.writer}, which is not writing it")
