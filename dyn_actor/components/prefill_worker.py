"""The prefill worker: pulls remote prefills when it has room, computes them, and writes the KV
into the decode worker's pool once the decode worker grants it (see ``disagg.py``)."""

from __future__ import annotations

import asyncio
import logging
import os

import msgspec

from dyn_actor.actor import ActorDeadError, ActorRef
from dyn_actor.aio import wait_for
from dyn_actor.components.disagg import leave_queue, pull_loop
from dyn_actor.components.disagg_messages import (
    BeginWrite,
    CancelPrefill,
    RemotePrefillDone,
    RemotePrefillFailed,
    RemotePrefillRequest,
    WriteGrant,
    WriteState,
    WriteStatus,
)
from dyn_actor.components.messages import GenerateRequest, RequestDelta, WorkerMessage
from dyn_actor.components.worker import Worker
from dyn_actor.engine.engine import LLMEngine, RequestOutput
from dyn_actor.kv.transfer import open_remote_pool

log = logging.getLogger(__name__)


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
        self._finished: list[str] = []  # request ids served since the last pull (the queue forgets them)
        self._concurrency = concurrency
        self._near: list[str] = []  # the GPUs this worker writes into directly (its pulls name them)
        self._loops: list[asyncio.Task] = []
        self._draining = False
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
        device = getattr(self.engine, "device", None)
        if device is not None and device.type == "cuda":  # the queue prefers requests for these cards
            from dyn_actor.kv.cuda_ipc import near_cards

            self._near = near_cards(device.index or 0)
        self._loops = [asyncio.ensure_future(self._pull_loop()) for _ in range(self._concurrency)]

    async def on_stop(self) -> None:
        self._draining = True  # a loop that somehow outlives its cancel ends at its next pull
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
            if fut is None or fut.done():
                continue
            if out.error is None:
                fut.set_result(out)
            else:
                fut.set_exception(RuntimeError(out.error))

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

    async def drain(self, timeout: float) -> None:
        """Take no more work from the queue, let what was pulled finish (up to ``timeout`` s), then
        stop: how a prefill worker leaves on SIGTERM (the planner removing it, or the launcher
        stopping)."""
        self._draining = True
        await leave_queue(self._queue, self.endpoint)
        try:
            await wait_for(asyncio.gather(*self._loops, return_exceptions=True), timeout)
        except asyncio.TimeoutError:
            log.warning("%s: prefills still running after %.0f s of drain; stopping anyway", self.name, timeout)
        self.stop()

    async def _pull_loop(self) -> None:
        assert self._queue is not None
        await pull_loop(self._queue, self.name, self.endpoint, self._finished, lambda: self._draining, self._serve,
                        self._near)

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
            log.info("mapped %s's KV pool %s (%s)", r.decode_worker, r.pool.name,
                     f"route {pool.route}" if hasattr(pool, "route") else r.pool.kind)
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
                                            lambda idx: pool.read_blocks([r.block_ids[i] for i in idx]),
                                            params.lora_name))
            e.add_request(rid, r.prompt_token_ids, params, hold_blocks=True, validated=True)

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
                    # straight from this engine's pool into the decode worker's: one kernel, no staging copy
                    return pool.write_blocks_from(r.block_ids[k:], e.pool.data, mine[k:])

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
