"""Disaggregated serving: the decode worker (decides local vs remote prefill) and the prefill worker.

Flow of a remote prefill: the decode worker allocates the prompt's blocks in its
shared KV pool and pushes a ``RemotePrefillRequest`` to the prefill queue; a
prefill worker pulls it, computes the prompt, asks the decode worker for the
right to write (``BeginWrite``), writes the KV straight into the decode
worker's blocks, and only then tells it ``RemotePrefillDone`` with the first
token. If nothing comes back in time, the decode worker computes the prompt
itself: a request is never left hanging.

Fencing (no write ever lands in a block that was reused): the decode worker
grants a request's blocks to one writer, and only while it still waits for
them. A remote prefill given up before the grant is refused one later, so the
decode worker computes the prompt in the same blocks at once; one given up
after the grant has its blocks held back (fenced) and is computed in fresh
ones, and the fence is lifted only when the writer reports, says it is not
writing, or its process is gone.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass

import msgspec

from dyn_actor.actor import ActorDeadError, ActorError, ActorRef
from dyn_actor.components.disagg_messages import (
    BeginWrite,
    CancelPrefill,
    DisaggPolicyState,
    Drop,
    PrefillLost,
    Pull,
    Pulled,
    Push,
    QueueDepth,
    RemotePrefillDone,
    RemotePrefillFailed,
    RemotePrefillRequest,
    SetDisaggPolicy,
    WriteGrant,
    WriteState,
    WriteStatus,
)
from dyn_actor.components.messages import AbortRequest, GenerateRequest, RequestDelta, WorkerMessage, WorkerStats
from dyn_actor.components.prefill_queue import depth_endpoint
from dyn_actor.components.worker import Worker
from dyn_actor.engine.engine import LLMEngine, RemoteAllocation, RequestOutput
from dyn_actor.kv.transfer import open_remote_pool
from dyn_actor.transport import SubSocket

log = logging.getLogger(__name__)

DEPTH_STALE_AFTER = 3.0  # seconds without a depth publication before the queue counts as unavailable
FENCE_CHECK_INTERVAL = 1.0


@dataclass
class DisaggPolicy:
    max_local_prefill_length: int = 512
    max_prefill_queue_size: int = 8
    remote_prefill_timeout: float = 30.0


def prefill_remotely(uncached_prompt_tokens: int, queue_depth: int, policy: DisaggPolicy) -> bool:
    """The conditional-disaggregation decision: remote when the uncached part of the prompt is
    longer than ``max_local_prefill_length`` and the queue has room."""
    return uncached_prompt_tokens > policy.max_local_prefill_length and queue_depth < policy.max_prefill_queue_size


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` still exists on this machine (a zombie counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


@dataclass
class RemotePrefill:
    """A remote prefill the decode worker waits for."""

    timer: asyncio.TimerHandle
    started: float
    writer: BeginWrite | None = None  # the prefill worker granted the blocks, once one asked
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
        self._queue.on_dead(self._queue_lost)
        self._queue.on_alive(lambda _ref: log.info("the prefill queue answers again; remote prefill resumes"))
        self._depth_sub = SubSocket(depth_endpoint(self._queue_endpoint))
        self._tasks = [asyncio.ensure_future(self._read_depth()), asyncio.ensure_future(self._watch_fences())]

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
        remote_ok = self._queue_usable()
        policy = self.policy

        def admit(e: LLMEngine) -> RemoteAllocation | None:
            if remote_ok:
                _, cached = e.cached_prefix(prompt)
                depth = self._depth + self._pushed_since_depth
                if prefill_remotely(len(prompt) - cached, depth, policy):
                    alloc = e.allocate_remote_prefill(rid, prompt, params)
                    if alloc is not None:
                        self._pushed_since_depth += 1
                        return alloc
                    # no room for the whole prompt now: the scheduler queues it locally
            e.add_request(rid, prompt, params)
            return None

        self._admit(rid, self._thread.submit(admit), lambda alloc: alloc and self._push_remote(m, alloc))

    def _push_remote(self, m: GenerateRequest, alloc: RemoteAllocation) -> None:
        rid = m.request_id
        if rid not in self._live:
            return  # aborted meanwhile: the abort, queued after the allocation, frees the blocks
        bs = self.engine.layout.block_size
        req = RemotePrefillRequest(rid, m.prompt_token_ids, m.params, self.name, self.endpoint,
                                   self.engine.pool.descriptor(), alloc.block_ids, alloc.num_cached_tokens // bs)
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
        fut = self._thread.submit(lambda e: e.finish_remote_prefill(rid, m.first_token, m.logprobs))

        def resumed(f: asyncio.Future) -> None:
            out: RequestOutput | None = None if f.exception() else f.result()
            if out is not None:
                self._dispatch([out], remote={rid: (m.kv_bytes, seconds)})

        fut.add_done_callback(resumed)

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

    async def _watch_fences(self) -> None:
        """Lift a fence once its writer's process is gone or the writer says it is not writing (its
        report may have been lost to a stall)."""
        while True:
            await asyncio.sleep(FENCE_CHECK_INTERVAL)
            for rid, w in list(self._fenced.items()):
                if not process_alive(w.writer_pid):
                    self._release_fence(rid, f"{w.writer} (pid {w.writer_pid}) is gone")
                    continue
                ref = self._writers.get(w.writer_endpoint)
                if ref is None:
                    ref = self._writers[w.writer_endpoint] = await ActorRef(w.writer_endpoint, w.writer).start()
                try:
                    state = await ref.ask(WriteStatus(rid), WriteState, timeout=FENCE_CHECK_INTERVAL)
                except (ActorError, asyncio.TimeoutError):
                    continue
                if not state.active:
                    self._release_fence(rid, f"{w.writer} is not writing it")


class PrefillCancelled(Exception):
    pass


class PrefillWorker(Worker):
    """Pulls remote prefills when it has room, computes them, writes the KV into the decode worker's pool."""

    Message = WorkerMessage | CancelPrefill | WriteStatus

    def __init__(self, name: str, engine: LLMEngine, queue_endpoint: str, endpoint: str = "",
                 concurrency: int = 4) -> None:
        super().__init__(name, engine)
        self.endpoint = endpoint
        self._queue_endpoint = queue_endpoint
        self._queue: ActorRef | None = None
        self._pools: dict = {}  # pool name -> RemoteKvPool | RemoteCudaKvPool
        self._decoders: dict[str, ActorRef] = {}
        self._waiting: dict[str, asyncio.Future] = {}  # engine request id -> its output
        self._pool_names: dict[str, str] = {}  # decode endpoint -> its pool's name
        self._running: dict[str, set[str]] = {}  # decode endpoint -> request ids computing for it
        self._writing: set[str] = set()  # request ids asking for or holding a write grant
        self._concurrency = concurrency
        self._loops: list[asyncio.Task] = []
        self.prefills_done = 0

    def handlers(self):
        h = super().handlers()
        h[CancelPrefill] = self.cancel
        h[WriteStatus] = self.write_status
        return h

    async def on_start(self) -> None:
        await super().on_start()
        self._queue = await ActorRef(self._queue_endpoint, "prefill-queue").start(wait_ready=60)
        self._queue.on_dead(lambda _r: log.warning("the prefill queue stopped answering; pulling again when it does"))
        self._queue.on_alive(lambda _r: log.info("the prefill queue answers again"))
        self._loops = [asyncio.ensure_future(self._pull_loop()) for _ in range(self._concurrency)]

    async def on_stop(self) -> None:
        for t in self._loops:
            t.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
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

    def _decoder(self, r: RemotePrefillRequest) -> ActorRef | None:
        """The ref to the decode worker of ``r`` (one per endpoint, kept: it reconnects by itself)."""
        ref = self._decoders.get(r.decode_endpoint)
        if ref is None:
            ref = ActorRef(r.decode_endpoint, r.decode_worker)
            self._decoders[r.decode_endpoint] = ref
            ref.on_dead(lambda _ref, ep=r.decode_endpoint: self._decoder_died(ep))
            asyncio.ensure_future(ref.start())
        return ref

    def _decoder_died(self, endpoint: str) -> None:
        """Cancel the prefills computing for a decode worker that stopped answering, and unmap its
        pool (a restarted one has a new pool; one that was only stalled is mapped again on demand)."""
        for rid in list(self._running.get(endpoint, ())):
            self._cancel(rid, f"the decode worker at {endpoint} stopped answering")
        pool = self._pools.pop(self._pool_names.pop(endpoint, ""), None)
        if pool is not None and self._thread is not None:
            self._thread.submit(lambda e: pool.close())  # after any copy the engine thread is doing

    def cancel(self, m: CancelPrefill) -> None:
        self._cancel(m.request_id, "cancelled by its decode worker")

    def _cancel(self, rid: str, why: str) -> None:
        """Stop computing ``rid`` unless its write has begun (a granted write always completes)."""
        if rid in self._writing:
            return
        fut = self._waiting.pop(f"prefill-{rid}", None)
        if fut is None:
            return
        if not fut.done():
            fut.set_exception(PrefillCancelled(why))
        assert self._thread is not None
        self._thread.submit(lambda e: e.abort_request(f"prefill-{rid}"))
        log.info("prefill of %s cancelled: %s", rid, why)

    def write_status(self, m: WriteStatus) -> WriteState:
        return WriteState(m.request_id in self._writing)

    async def _pull_loop(self) -> None:
        assert self._queue is not None
        while True:
            try:
                pulled = await self._queue.ask(Pull(1.0, self.name, self.endpoint), Pulled, timeout=60.0)
            except asyncio.TimeoutError:
                continue
            except ActorDeadError:  # stalled or restarting: the ref knocks until it answers again
                await asyncio.sleep(0.5)
                continue
            if pulled.request is not None:
                await self._serve(pulled.request)

    async def _serve(self, r: RemotePrefillRequest) -> None:
        decoder = self._decoder(r)
        if decoder is None or (decoder.deaths and not decoder.alive):
            log.warning("decode worker %s is not answering; dropping %s", r.decode_worker, r.request_id)
            return
        try:
            done = await self._prefill(r, decoder)
        except (PrefillCancelled, ActorDeadError) as e:
            log.info("prefill of %s dropped: %s", r.request_id, e)
            return
        except Exception as e:  # report, so the decode worker falls back at once
            log.exception("prefill of %s failed", r.request_id)
            await decoder.try_tell(RemotePrefillFailed(r.request_id, f"{type(e).__name__}: {e}"))
            return
        if done is not None:
            await decoder.try_tell(done)

    async def _prefill(self, r: RemotePrefillRequest, decoder: ActorRef) -> RemotePrefillDone | None:
        """Compute ``r``, then write its KV into the decode worker's blocks if it still grants them.
        None when it does not (it gave up on us: nothing was written)."""
        assert self._thread is not None
        pool = self._pools.get(r.pool.name)
        if pool is None:  # attach first: a pool that is gone means there is nothing to compute for
            pool = self._pools[r.pool.name] = open_remote_pool(r.pool)
            self._pool_names[r.decode_endpoint] = r.pool.name
        rid = f"prefill-{r.request_id}"
        k = r.num_computed_blocks
        # the same params, one token: every field travels (a field added later is not lost here)
        params = msgspec.structs.replace(r.params, max_tokens=1, min_tokens=min(1, r.params.min_tokens))
        fut = asyncio.get_running_loop().create_future()
        self._waiting[rid] = fut

        imported: list[int] = []

        def start(e: LLMEngine) -> None:
            # the decode worker's already computed blocks are read, not recomputed: copied into this
            # engine's prefix cache (those it lacks), so the request below computes only the rest
            imported.extend(e.import_prefix(r.prompt_token_ids, k,
                                            lambda idx: pool.read_blocks([r.block_ids[i] for i in idx])))
            e.add_request(rid, r.prompt_token_ids, params, hold_blocks=True)

        running = self._running.setdefault(r.decode_endpoint, set())
        running.add(r.request_id)
        granted = False
        try:
            await self._thread.submit(start)
            out: RequestOutput = await fut
            self._writing.add(r.request_id)  # from here until the write is over, a fence may wait on us
            try:
                grant = await decoder.ask(BeginWrite(r.request_id, self.name, self.endpoint, os.getpid()), WriteGrant,
                                          timeout=5.0)
                granted = grant.ok
                if not granted:
                    log.info("decode worker %s no longer waits for %s: nothing written", r.decode_worker,
                             r.request_id)
                    return None

                def transfer(e: LLMEngine) -> int:
                    mine = e.block_ids(rid)
                    if len(mine) != len(r.block_ids):
                        raise RuntimeError(f"block count mismatch: {len(mine)} here, {len(r.block_ids)} there")
                    return pool.write_blocks(r.block_ids[k:], e.pool.read_blocks(mine[k:]))

                nbytes = await self._thread.submit(transfer)  # the writes are done when this returns
            finally:
                self._writing.discard(r.request_id)
        finally:
            self._waiting.pop(rid, None)
            running.discard(r.request_id)

            def end(e: LLMEngine) -> None:
                e.abort_request(rid)  # frees the blocks, whichever state they are in
                if imported and not granted:
                    # the decode worker did not vouch that it held those blocks all along: what was
                    # read from them may belong to another request by now, so it is not kept
                    e.discard_prefix(imported)

            self._thread.submit(end)
        self.prefills_done += 1
        lp = out.logprobs[0] if out.logprobs else None
        return RemotePrefillDone(r.request_id, out.new_token_ids[0], lp, nbytes)

    def generate(self, m: GenerateRequest) -> None:  # prefill workers take work from the queue only
        self._publish([RequestDelta(m.request_id, error="this is a prefill worker")])


__all__ = ["DecodeWorker", "DisaggPolicy", "PrefillWorker", "prefill_remotely"]
