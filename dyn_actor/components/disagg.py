"""Disaggregated serving: the decode worker (decides local vs remote prefill) and the prefill worker.

Flow of a remote prefill: the decode worker allocates the prompt's blocks in its
shared KV pool and pushes a ``RemotePrefillRequest`` to the prefill queue; a
prefill worker pulls it, computes the prompt, writes the KV straight into the
decode worker's blocks, and only then tells it ``RemotePrefillDone`` with the
first token. If nothing comes back in time, the decode worker computes the
prompt itself in the same blocks: a request is never left hanging.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from dyn_actor.actor import ActorDeadError, ActorError, ActorRef
from dyn_actor.components.disagg_messages import (
    Depth,
    DisaggPolicyState,
    Drop,
    Pull,
    Pulled,
    Push,
    QueueDepth,
    RemotePrefillDone,
    RemotePrefillFailed,
    RemotePrefillRequest,
    SetDisaggPolicy,
)
from dyn_actor.components.messages import AbortRequest, GenerateRequest, RequestDelta, WorkerMessage
from dyn_actor.components.worker import Worker
from dyn_actor.engine.engine import LLMEngine, RequestOutput
from dyn_actor.engine.sampling import SamplingParams
from dyn_actor.kv.transfer import open_remote_pool

log = logging.getLogger(__name__)


@dataclass
class DisaggPolicy:
    max_local_prefill_length: int = 512
    max_prefill_queue_size: int = 8
    remote_prefill_timeout: float = 30.0


def prefill_remotely(uncached_prompt_tokens: int, queue_depth: int, policy: DisaggPolicy) -> bool:
    """The conditional-disaggregation decision: remote when the uncached part of the prompt is
    longer than ``max_local_prefill_length`` and the queue has room."""
    return uncached_prompt_tokens > policy.max_local_prefill_length and queue_depth < policy.max_prefill_queue_size


class DecodeWorker(Worker):
    Message = WorkerMessage | RemotePrefillDone | RemotePrefillFailed | SetDisaggPolicy

    def __init__(self, name: str, engine: LLMEngine, endpoint: str, queue_endpoint: str, policy: DisaggPolicy,
                 events_endpoint: str | None = None) -> None:
        super().__init__(name, engine, events_endpoint)
        self.endpoint = endpoint
        self.policy = policy
        self._queue_endpoint = queue_endpoint
        self._queue: ActorRef | None = None
        # in flight on a prefill worker: the deadline timer and when it was queued
        self._remote: dict[str, tuple[asyncio.TimerHandle, float]] = {}
        self._abort_after_remote: set[str] = set()

    def handlers(self):
        h = super().handlers()
        h[RemotePrefillDone] = self.remote_done
        h[RemotePrefillFailed] = self.remote_failed
        h[SetDisaggPolicy] = self.set_policy
        return h

    def set_policy(self, m: SetDisaggPolicy) -> DisaggPolicyState:
        if m.max_local_prefill_length is not None:
            if m.max_local_prefill_length < 0:
                raise ValueError("max_local_prefill_length must be >= 0")
            self.policy.max_local_prefill_length = m.max_local_prefill_length
        if m.max_prefill_queue_size is not None:
            if m.max_prefill_queue_size < 0:
                raise ValueError("max_prefill_queue_size must be >= 0")
            self.policy.max_prefill_queue_size = m.max_prefill_queue_size
        return DisaggPolicyState(self.policy.max_local_prefill_length, self.policy.max_prefill_queue_size)

    async def on_start(self) -> None:
        await super().on_start()
        self._queue = await ActorRef(self._queue_endpoint, "prefill-queue").start(wait_ready=60)

    async def on_stop(self) -> None:
        for timer, _ in self._remote.values():
            timer.cancel()
        if self._queue is not None:
            await self._queue.close()
        await super().on_stop()
        self.engine.close()  # removes the shared-memory KV pool

    async def generate(self, m: GenerateRequest) -> None:
        assert self._thread is not None and self._queue is not None
        rid, prompt = m.request_id, m.prompt_token_ids
        if m.cached_tokens is not None:
            # the router's match: no wait for the engine thread's next step boundary. If the
            # blocks went meanwhile, the decision is off, never the result: the allocation
            # below and local prefill both use what is really cached.
            cached = min(m.cached_tokens, len(prompt) - 1)
        else:
            _, cached = await self._thread.submit(lambda e: e.cached_prefix(prompt))
        try:
            depth = (await self._queue.ask(Depth(), QueueDepth, timeout=2.0)).depth
        except (ActorError, asyncio.TimeoutError):
            depth = None  # no queue: prefill here
        if depth is None or not prefill_remotely(len(prompt) - cached, depth, self.policy):
            await super().generate(m)
            return
        self._live.add(rid)
        try:
            alloc = await self._thread.submit(lambda e: e.allocate_remote_prefill(rid, prompt, m.params))
        except ValueError as e:
            self._live.discard(rid)
            self._publish([RequestDelta(rid, error=str(e))])
            return
        if alloc is None:  # no room for the whole prompt now: let the scheduler queue it locally
            self._live.discard(rid)
            await super().generate(m)
            return
        bs = self.engine.layout.block_size
        req = RemotePrefillRequest(rid, prompt, m.params, self.name, self.endpoint, self.engine.pool.descriptor(),
                                   alloc.block_ids, alloc.num_cached_tokens // bs)
        loop = asyncio.get_running_loop()
        self._remote[rid] = (loop.call_later(self.policy.remote_prefill_timeout, self._fallback, rid, "timed out"),
                             loop.time())
        try:
            await self._queue.tell(Push(req))
        except ActorError:
            self._fallback(rid, "the prefill queue is gone")

    def _settle(self, rid: str) -> float | None:
        """The remote prefill of ``rid`` is over (done, failed or timed out). Returns the seconds since
        it was queued, or None when there is nothing more to do (unknown, or aborted meanwhile: its
        blocks are freed now that no prefill worker can still be writing them)."""
        entry = self._remote.pop(rid, None)
        if entry is None:
            return None
        timer, started = entry
        timer.cancel()
        if rid in self._abort_after_remote:
            self._abort_after_remote.discard(rid)
            assert self._thread is not None
            self._thread.submit(lambda e: e.abort_request(rid))
            return None
        return asyncio.get_running_loop().time() - started

    def _fallback(self, rid: str, why: str) -> None:
        """Compute the prompt here, in the blocks already allocated."""
        if self._queue is not None and self._queue.alive and rid in self._remote:
            asyncio.ensure_future(self._queue.tell(Drop(rid)))
        if self._settle(rid) is None:
            return
        log.warning("remote prefill of %s %s: prefilling locally", rid, why)
        assert self._thread is not None
        self._thread.submit(lambda e: e.fail_remote_prefill(rid))

    async def remote_done(self, m: RemotePrefillDone) -> None:
        rid = m.request_id
        seconds = self._settle(rid)
        if seconds is None:
            return  # fell back to local already, aborted, or unknown
        assert self._thread is not None
        out: RequestOutput | None = await self._thread.submit(
            lambda e: e.finish_remote_prefill(rid, m.first_token, m.logprobs))
        if out is None:
            return
        self._dispatch([out], remote={rid: (m.kv_bytes, seconds)})

    async def remote_failed(self, m: RemotePrefillFailed) -> None:
        self._fallback(m.request_id, f"failed ({m.reason})")

    async def abort(self, m: AbortRequest) -> None:
        if m.request_id in self._remote:
            # a prefill worker may be writing into the request's blocks right now: free them only
            # once it reports (or the deadline passes), so no other request can get them meanwhile
            self._abort_after_remote.add(m.request_id)
            self._live.discard(m.request_id)
            return
        await super().abort(m)


class PrefillWorker(Worker):
    """Pulls remote prefills when it has room, computes them, writes the KV into the decode worker's pool."""

    def __init__(self, name: str, engine: LLMEngine, queue_endpoint: str, concurrency: int = 4) -> None:
        super().__init__(name, engine)
        self._queue_endpoint = queue_endpoint
        self._queue: ActorRef | None = None
        self._pools: dict = {}  # pool name -> RemoteKvPool | RemoteCudaKvPool
        self._decoders: dict[str, ActorRef] = {}
        self._waiting: dict[str, asyncio.Future] = {}
        self._pool_names: dict[str, str] = {}  # decode endpoint -> its pool's name
        self._running: dict[str, set[str]] = {}  # decode endpoint -> engine request ids computing for it
        self._concurrency = concurrency
        self._loops: list[asyncio.Task] = []
        self.prefills_done = 0

    async def on_start(self) -> None:
        await super().on_start()
        self._queue = await ActorRef(self._queue_endpoint, "prefill-queue").start(wait_ready=60)
        self._loops = [asyncio.ensure_future(self._pull_loop()) for _ in range(self._concurrency)]

    async def on_stop(self) -> None:
        for t in self._loops:
            t.cancel()
        for ref in self._decoders.values():
            await ref.close()
        if self._queue is not None:
            await self._queue.close()
        for pool in self._pools.values():
            pool.close()
        await super().on_stop()

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            fut = self._waiting.pop(out.request_id, None)
            if fut is not None and not fut.done():
                fut.set_result(out)

    async def _decoder(self, r: RemotePrefillRequest) -> ActorRef:
        ref = self._decoders.get(r.decode_endpoint)
        if ref is None or not ref.alive:
            ref = await ActorRef(r.decode_endpoint, r.decode_worker).start()
            ref.on_dead(lambda _ref, ep=r.decode_endpoint: self._decoder_died(ep))
            self._decoders[r.decode_endpoint] = ref
        return ref

    def _decoder_died(self, endpoint: str) -> None:
        """Cancel the prefills computing for a decode worker that is gone, and forget its pool."""
        ref = self._decoders.get(endpoint)
        if ref is not None and ref.alive:
            return  # an older ref; a new one is in use
        for rid in list(self._running.get(endpoint, ())):
            fut = self._waiting.pop(rid, None)
            if fut is not None and not fut.done():
                fut.set_exception(ActorDeadError(f"the decode worker of {rid} is gone"))
            assert self._thread is not None
            self._thread.submit(lambda e, rid=rid: e.abort_request(rid))
            log.warning("decode worker at %s is gone; cancelled %s", endpoint, rid)
        pool = self._pools.pop(self._pool_names.pop(endpoint, ""), None)
        if pool is not None and self._thread is not None:
            self._thread.submit(lambda e: pool.close())  # after any copy the engine thread is doing

    async def _pull_loop(self) -> None:
        assert self._queue is not None
        while True:
            try:
                pulled = await self._queue.ask(Pull(wait=1.0), Pulled, timeout=5.0)
            except asyncio.TimeoutError:
                continue
            except ActorDeadError:
                log.error("the prefill queue is gone")
                return
            r = pulled.request
            if r is None:
                continue
            decoder = await self._decoder(r)
            if not decoder.alive:  # its decode worker died while the request waited: skip the work
                log.warning("decode worker %s is gone; dropping %s", r.decode_worker, r.request_id)
                continue
            try:
                done = await self._prefill(r)
                await decoder.tell(done)
            except ActorDeadError:
                log.warning("decode worker %s is gone; dropping %s", r.decode_worker, r.request_id)
            except Exception as e:  # report, so the decode worker falls back at once
                log.exception("prefill of %s failed", r.request_id)
                if decoder.alive:
                    await decoder.tell(RemotePrefillFailed(r.request_id, f"{type(e).__name__}: {e}"))

    async def _prefill(self, r: RemotePrefillRequest) -> RemotePrefillDone:
        assert self._thread is not None
        pool = self._pools.get(r.pool.name)
        if pool is None:  # attach first: a pool that is gone means there is nothing to compute for
            pool = self._pools[r.pool.name] = open_remote_pool(r.pool)
            self._pool_names[r.decode_endpoint] = r.pool.name
        rid = f"prefill-{r.request_id}"
        k = r.num_computed_blocks
        p = r.params
        params = SamplingParams(max_tokens=1, temperature=p.temperature, top_p=p.top_p, top_k=p.top_k,
                                min_p=p.min_p, seed=p.seed, stop_token_ids=p.stop_token_ids, ignore_eos=p.ignore_eos,
                                min_tokens=min(1, p.min_tokens), logprobs=p.logprobs)
        fut = asyncio.get_running_loop().create_future()
        self._waiting[rid] = fut

        def start(e: LLMEngine) -> None:
            # the decode worker's already computed blocks are read, not recomputed: copied into this
            # engine's prefix cache (those it lacks), so the request below computes only the rest
            e.import_prefix(r.prompt_token_ids, k, lambda idx: pool.read_blocks([r.block_ids[i] for i in idx]))
            e.add_request(rid, r.prompt_token_ids, params, hold_blocks=True)

        self._running.setdefault(r.decode_endpoint, set()).add(rid)
        try:
            await self._thread.submit(start)
            out: RequestOutput = await fut
        finally:
            self._waiting.pop(rid, None)
            self._running[r.decode_endpoint].discard(rid)

        def transfer(e: LLMEngine) -> int:
            try:
                mine = e.block_ids(rid)
                if len(mine) != len(r.block_ids):
                    raise RuntimeError(f"block count mismatch: {len(mine)} here, {len(r.block_ids)} there")
                return pool.write_blocks(r.block_ids[k:], e.pool.read_blocks(mine[k:]))
            finally:
                e.release_blocks(rid)

        nbytes = await self._thread.submit(transfer)  # the writes are done when this returns
        self.prefills_done += 1
        lp = out.logprobs[0] if out.logprobs else None
        return RemotePrefillDone(r.request_id, out.new_token_ids[0], lp, nbytes)

    async def generate(self, m: GenerateRequest) -> None:  # prefill workers take work from the queue only
        self._publish([RequestDelta(m.request_id, error="this is a prefill worker")])


__all__ = ["DecodeWorker", "DisaggPolicy", "PrefillWorker", "prefill_remotely"]
