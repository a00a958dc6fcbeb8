"""``--engine vllm`` disaggregated: this project's KV connector for vLLM (``KVConnectorBase_V1``).

vLLM loads it by ``kv_connector_module_path`` in its own processes and builds it twice: a
SCHEDULER instance in the engine-core process and a WORKER instance in the model-runner process
(on vLLM's CPU backend these are two processes). They talk only through vLLM's metadata
(scheduler -> worker, once per step) and the worker's ``KVConnectorOutput`` (worker ->
scheduler). The flow is this project's, not vLLM's proxy flow (see ``disagg.py``):

Decode worker (``kv_role="kv_consumer"``):

1. scheduler, ``get_num_new_matched_tokens``: the native engine's policy
   (``disagg.prefill_remotely`` on the uncached prompt and the queue depth that the prefill queue
   publishes), with the thresholds the decode worker sends along with each request (so a change
   made while serving, ``POST /v1/disagg/policy`` or the planner, holds from the next request);
   remote means "every uncached prompt token arrives asynchronously", so vLLM
   allocates the prompt's blocks and parks the request (``WAITING_FOR_REMOTE_KVS``);
2. scheduler, ``update_state_after_alloc``: the request's block ids go into the next step's
   metadata;
3. worker: the model-runner process holds the KV cache, allocated in a POSIX shared-memory
   segment of ours (``get_mem_pool_context``), and a ``DecodeAgent`` actor on a thread of its own:
   it pushes the ``RemotePrefillRequest`` to our prefill queue, grants ``BeginWrite`` to one writer
   while it still waits, and on ``RemotePrefillDone`` reports the request in ``finished_recving``;
   vLLM then caches the blocks and recomputes only the last prompt token to sample the first
   output token. A prefill that fails, is lost with its worker, or passes the deadline before any
   write was granted is reported in ``failed_recving`` too (``kv_load_failure_policy="recompute"``):
   vLLM frees the blocks and the scheduler instance prefills it locally. A granted write is waited
   for (its blocks are never handed back while a write may land) until the writer reports, says
   it is not writing, or its process is gone;
4. an aborted request that still waits keeps its blocks (``request_finished`` returns True) until
   the agent reports it, under the same rule.

Prefill worker (``kv_role="kv_producer"``): our ``VllmPrefillWorker`` pulls a request from the
queue and gives it to vLLM with ``max_tokens=1`` and ``kv_transfer_params`` naming the decode
worker's segment and block ids. The scheduler instance puts the request into the metadata of the
step whose forward completes its prompt; after that forward (``wait_for_save``) the worker instance
asks the decode worker for the write (``BeginWrite``), copies each layer's blocks from its own KV
cache straight into the decode worker's segment (``native_ops.move_blocks``: no staging copy), and
sends ``RemotePrefillDone``. Its ``WriterAgent`` answers the decode worker's ``WriteStatus``.

On a GPU the decode worker's KV cache stays where vLLM allocated it and is exported by CUDA IPC
handle (``kv/cuda_ipc.py``, as the native engine's pool); the prefill side opens it and moves the
blocks with the Triton block-move kernel, then synchronises before it notifies. That path is
written but has not run: the GPU machines lent for testing have no vLLM.
"""

from __future__ import annotations

import _posixshmem
import asyncio
import concurrent.futures
import logging
import math
import mmap
import os
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import msgspec
import torch
from torch.overrides import TorchFunctionMode
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorTransferResults,
    SupportsHMA,
)

from dyn_actor.actor import Actor, ActorDeadError, ActorError, ActorRef, ActorServer
from dyn_actor.components.disagg import DisaggPolicy, policy_of, prefill_remotely, process_alive, writer_idle
from dyn_actor.components.disagg_messages import (
    BeginWrite,
    Drop,
    PrefillLost,
    Push,
    QueueDepth,
    RemotePrefillDone,
    RemotePrefillFailed,
    RemotePrefillRequest,
    WriteGrant,
    WriteState,
    WriteStatus,
)
from dyn_actor.components.messages import Ack, RemoteReceived
from dyn_actor.components.prefill_queue import depth_endpoint
from dyn_actor.kv.descriptor import KvPoolDescriptor
from dyn_actor.kv.transfer import SHM_PREFIX, check_shm_room
from dyn_actor.native_ops import move_blocks
from dyn_actor.protocol import SamplingParams
from dyn_actor.transport import PollingSubSocket

log = logging.getLogger(__name__)

CONNECTOR_NAME = "DynActorConnector"
MODULE_PATH = "dyn_actor.components.vllm_connector"
# KvPoolDescriptor.kind of a vLLM KV cache: shape [layers, blocks, bytes per block and layer], uint8
POOL_KIND = "vllm_shm"  # a POSIX shared-memory segment (CPU)
CUDA_POOL_KIND = "vllm_cuda_ipc"  # device memory shared by CUDA IPC handle
DEPTH_STALE_AFTER = 3.0  # seconds without a depth publication before the queue counts as unavailable
WATCH_INTERVAL = 1.0
GRANT_TIMEOUT = 5.0


def kv_transfer_config(role: str, extra: dict[str, Any]):
    """vLLM's ``KVTransferConfig`` that loads this connector; ``role`` is "decode" or "prefill"."""
    from vllm.config import KVTransferConfig

    return KVTransferConfig(kv_connector=CONNECTOR_NAME, kv_connector_module_path=MODULE_PATH,
                            kv_role="kv_consumer" if role == "decode" else "kv_producer",
                            kv_load_failure_policy="recompute", kv_connector_extra_config=dict(extra, role=role))


# ------------------------------------------------------------------ plumbing


def external_id(rid: str) -> str:
    """The id our worker gave vLLM for a request: vLLM's engine appends ``-`` and 8 hex digits."""
    return re.sub(r"-[0-9a-f]{8}$", "", rid)


class _LoopThread:
    """An asyncio loop on a daemon thread: the connector's methods run on vLLM's threads and must
    not block on the network, so the actors live here and are reached by ``call``/``submit``."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def submit(self, coro) -> concurrent.futures.Future:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def call(self, fn, *args) -> None:
        self.loop.call_soon_threadsafe(fn, *args)

    def stop(self, coro=None, timeout: float = 5.0) -> None:
        if coro is not None:
            try:
                self.submit(coro).result(timeout)
            except Exception as e:  # noqa: BLE001 - stopping: log and go on
                log.warning("connector shutdown: %s: %s", type(e).__name__, e)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout)


class _ShmKvAllocation(TorchFunctionMode):
    """Inside vLLM's KV-cache allocation (``get_mem_pool_context``), its one ``torch.zeros`` of
    int8 bytes on the CPU comes from a shared-memory segment of ours instead: every layer's KV
    tensor is a view of it, so other processes can write blocks in place."""

    def __init__(self, connector: DynActorConnector) -> None:
        super().__init__()
        self._connector = connector

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if (func is torch.zeros and self._connector._segment is None and kwargs.get("dtype") is torch.int8
                and torch.device(kwargs.get("device") or "cpu").type == "cpu" and len(args) == 1
                and isinstance(args[0], int)):
            return self._connector._make_segment(args[0])
        return func(*args, **kwargs)


def _layer_views(kv_caches: dict[str, torch.Tensor], base: torch.Tensor, num_blocks: int,
                 page_bytes: int) -> list[torch.Tensor]:
    """Each distinct layer tensor as ``[num_blocks, page_bytes]`` bytes of ``base`` (the backing
    allocation), in the dict's order; the layers must lie one after another, block-major."""
    views, seen = [], set()
    base_ptr = base.data_ptr()
    for name, t in kv_caches.items():
        if t.data_ptr() in seen:
            continue  # a layer that shares another's cache
        seen.add(t.data_ptr())
        off = t.data_ptr() - base_ptr
        expected = len(views) * num_blocks * page_bytes
        if not t.is_contiguous() or t.numel() * t.element_size() != num_blocks * page_bytes or off != expected:
            raise RuntimeError(f"{CONNECTOR_NAME}: layer {name}'s KV cache is not laid out as blocks of one layer "
                               f"after another (offset {off}, expected {expected}): this KV layout is not supported")
        views.append(base[off:off + num_blocks * page_bytes].view(num_blocks, page_bytes))
    return views


# ------------------------------------------------------------------ metadata


@dataclass
class RemoteAsk:
    """Decode scheduler -> worker: a request parked for a remote prefill, with its blocks."""

    request_id: str
    prompt_token_ids: list[int]
    block_ids: list[int]  # the prompt's blocks (all of them, including the already-computed leading ones)
    num_computed_blocks: int
    lora_name: str | None = None  # the request's LoRA adapter: the prefill worker computes with it too


@dataclass
class WriteJob:
    """Prefill scheduler -> worker: this step's forward completes the prompt; copy it out after."""

    request_id: str  # the decode worker's id for the request
    src_block_ids: list[int]
    num_prompt_tokens: int
    params: dict  # kv_transfer_params["dyn_actor"]


@dataclass
class DynActorMetadata(KVConnectorMetadata):
    remote: list[RemoteAsk] = field(default_factory=list)
    writes: list[WriteJob] = field(default_factory=list)


# ------------------------------------------------------------------ the decode worker's agent


@dataclass
class _Waiting:
    started: float
    cached_tokens: int = 0
    timer: asyncio.TimerHandle | None = None
    writer: BeginWrite | None = None
    granted_at: float = 0.0
    aborted: bool = False  # vLLM finished the request (aborted) while it waited: report once safe
    given_up: bool = False  # no longer waited for: a writer asking now is refused


class DecodeAgent(Actor):
    """In the decode worker's model-runner process: pushes remote prefills to the queue, grants and
    fences the writes, and collects what ``get_finished`` reports to vLLM's scheduler."""

    Message = BeginWrite | RemotePrefillDone | RemotePrefillFailed | PrefillLost

    def __init__(self, cfg: dict, pool: KvPoolDescriptor, block_size: int) -> None:
        self.cfg = cfg
        self.pool = pool
        self.block_size = block_size
        self.name = cfg["worker_name"]
        self.endpoint = cfg["agent_endpoint"]
        self.timeout = float(cfg.get("remote_prefill_timeout", 30.0))
        self._queue: ActorRef | None = None
        self._owner: ActorRef | None = None  # our worker process (told what arrived, for its metrics)
        self._waiting: dict[str, _Waiting] = {}
        self._writers: dict[str, ActorRef] = {}
        self._lock = threading.Lock()
        self._received: set[str] = set()  # reported to vLLM at the next get_finished ...
        self._failed: set[str] = set()  # ... these as failed loads as well (vLLM recomputes them)
        self._watch: asyncio.Task | None = None

    def handlers(self):
        return {BeginWrite: self.begin_write, RemotePrefillDone: self.done, RemotePrefillFailed: self.failed,
                PrefillLost: self.lost}

    async def on_start(self) -> None:
        self._queue = ActorRef(self.cfg["queue_endpoint"], "prefill-queue")
        await self._queue.start()
        self._queue.on_dead(self._queue_lost)
        self._owner = ActorRef(self.cfg["owner_endpoint"], self.name)
        await self._owner.start()
        self._watch = asyncio.ensure_future(self._watch_writers())

    async def on_stop(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
        for w in self._waiting.values():
            if w.timer is not None:
                w.timer.cancel()
        for ref in [self._queue, self._owner, *self._writers.values()]:
            if ref is not None:
                await ref.close()

    # -------------------------------------------------- from vLLM (called on the loop)
    def ask_remote(self, a: RemoteAsk) -> None:
        loop = asyncio.get_running_loop()
        w = self._waiting[a.request_id] = _Waiting(loop.time(), a.num_computed_blocks * self.block_size)
        w.timer = loop.call_later(self.timeout, self._timed_out, a.request_id)
        req = RemotePrefillRequest(a.request_id, a.prompt_token_ids,
                                   SamplingParams(max_tokens=1, temperature=0.0, lora_name=a.lora_name),
                                   self.name, self.endpoint, self.pool, a.block_ids, a.num_computed_blocks,
                                   self.block_size)
        asyncio.ensure_future(self._push(req))

    def finished(self, rid: str) -> None:
        """vLLM finished ``rid`` (aborted) while it waited: report it when no write can land any more."""
        w = self._waiting.get(rid)
        if w is None:
            return
        w.aborted = True
        if w.writer is None:
            self._settle(rid, ok=False, why="aborted")

    def take_results(self) -> tuple[set[str], set[str]]:
        with self._lock:
            received, failed = self._received, self._failed
            self._received, self._failed = set(), set()
        return received, failed

    # -------------------------------------------------- bookkeeping
    async def _push(self, req: RemotePrefillRequest) -> None:
        assert self._queue is not None
        try:
            await self._queue.tell(Push(req))
        except ActorError:
            self._settle(req.request_id, ok=False, why="the prefill queue is gone")

    def _settle(self, rid: str, ok: bool, why: str = "", kv_bytes: int = 0) -> None:
        """Stop waiting for ``rid`` and report it to vLLM (``ok``: its KV is in place)."""
        w = self._waiting.pop(rid, None)
        if w is None:
            return
        if w.timer is not None:
            w.timer.cancel()
        if not ok and w.writer is None and self._queue is not None and self._queue.alive:
            asyncio.ensure_future(self._queue.try_tell(Drop(rid)))
        if ok and not w.aborted and self._owner is not None:
            # our worker hears of it before vLLM does: it marks the request's first delta as remote
            seconds = asyncio.get_running_loop().time() - w.started
            asyncio.ensure_future(self._report_after(rid, RemoteReceived(external_id(rid), kv_bytes, seconds,
                                                                         w.cached_tokens)))
            return
        if not ok and not w.aborted:
            log.info("remote prefill of %s %s: prefilling locally", rid, why)
        self._report(rid, failed=not ok and not w.aborted)

    def _report(self, rid: str, failed: bool) -> None:
        with self._lock:
            self._received.add(rid)
            if failed:
                self._failed.add(rid)

    async def _report_after(self, rid: str, m: RemoteReceived) -> None:
        assert self._owner is not None
        try:
            await self._owner.ask(m, Ack, timeout=2.0)
        except (ActorError, asyncio.TimeoutError) as e:
            log.warning("%s: the worker did not hear of %s's remote prefill: %s", self.name, rid, e)
        self._report(rid, failed=False)

    def _give_up(self, rid: str, why: str) -> None:
        """Stop waiting: at once when no write was granted, else once the writer is done or gone."""
        w = self._waiting.get(rid)
        if w is None:
            return
        w.given_up = True
        if w.writer is None:
            self._settle(rid, ok=False, why=why)
        else:
            log.warning("remote prefill of %s %s while %s may be writing its blocks: waiting for the writer", rid,
                        why, w.writer.writer)

    def _timed_out(self, rid: str) -> None:
        log.warning("remote prefill of %s timed out after %.1fs", rid, self.timeout)
        self._give_up(rid, "timed out")

    def _queue_lost(self, _ref: ActorRef) -> None:
        waiting = [rid for rid, w in self._waiting.items() if w.writer is None]
        if waiting:
            log.warning("the prefill queue stopped answering: %d waiting remote prefills taken back", len(waiting))
        for rid in waiting:
            self._give_up(rid, "lost with the prefill queue")

    # -------------------------------------------------- from prefill workers and the queue
    def begin_write(self, m: BeginWrite) -> WriteGrant:
        w = self._waiting.get(m.request_id)
        if w is None or w.aborted or w.given_up or w.writer is not None:
            return WriteGrant(False)
        w.writer = m
        w.granted_at = asyncio.get_running_loop().time()
        return WriteGrant(True)

    def done(self, m: RemotePrefillDone) -> None:
        self._settle(m.request_id, ok=True, kv_bytes=m.kv_bytes)

    def failed(self, m: RemotePrefillFailed) -> None:
        w = self._waiting.get(m.request_id)
        if w is not None:
            w.writer = None  # it says it will not write
            self._settle(m.request_id, ok=False, why=f"failed ({m.reason})")

    def lost(self, m: PrefillLost) -> None:
        w = self._waiting.get(m.request_id)
        if w is not None and w.writer is None:
            self._settle(m.request_id, ok=False, why="was lost with its prefill worker")

    async def _watch_writers(self) -> None:
        """Every second: a granted write whose writer is gone or says it is not writing is settled as
        failed (the blocks are recomputed here; nothing can land in them any more)."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(WATCH_INTERVAL)
            for rid, w in list(self._waiting.items()):
                m = w.writer
                if m is None or loop.time() - w.granted_at < WATCH_INTERVAL:
                    continue
                if not process_alive(m.writer_pid) or await writer_idle(self._writers, m, WATCH_INTERVAL) is True:
                    if self._waiting.get(rid) is w:
                        w.writer = None
                        self._settle(rid, ok=False, why=f"was granted to {m.writer}, which is not writing it")


# ------------------------------------------------------------------ the prefill worker's agent


class WriterAgent(Actor):
    """In the prefill worker's model-runner process: asks decode workers for their blocks and tells
    them when the KV is in place; answers whether a write is under way."""

    Message = WriteStatus

    def __init__(self, name: str, endpoint: str) -> None:
        self.name = name
        self.endpoint = endpoint
        self.writing: set[str] = set()
        self._decoders: dict[str, ActorRef] = {}

    def handlers(self):
        return {WriteStatus: self.write_status}

    def write_status(self, m: WriteStatus) -> WriteState:
        return WriteState(m.request_id in self.writing)

    async def on_stop(self) -> None:
        for ref in self._decoders.values():
            await ref.close()

    def _decoder(self, endpoint: str, name: str) -> ActorRef:
        ref = self._decoders.get(endpoint)
        if ref is None:
            ref = self._decoders[endpoint] = ActorRef(endpoint, name)
            asyncio.ensure_future(ref.start())
        return ref

    async def begin(self, rid: str, endpoint: str, name: str) -> bool:
        self.writing.add(rid)
        try:
            grant = await self._decoder(endpoint, name).ask(BeginWrite(rid, self.name, self.endpoint, os.getpid()),
                                                            WriteGrant, timeout=GRANT_TIMEOUT)
        except (ActorError, ActorDeadError, asyncio.TimeoutError) as e:
            log.warning("no write grant for %s from %s: %s", rid, name, e)
            self.writing.discard(rid)
            return False
        if not grant.ok:
            self.writing.discard(rid)
        return grant.ok

    async def end(self, rid: str, endpoint: str, name: str, msg) -> None:
        self.writing.discard(rid)
        await self._decoder(endpoint, name).try_tell(msg)


class _RemoteCudaCache:
    """A decode worker's KV cache in device memory, opened by IPC handle (never by its exporter)."""

    def __init__(self, desc: KvPoolDescriptor) -> None:
        from dyn_actor.kv.cuda_ipc import open_storage

        assert desc.cuda is not None
        layers, blocks, page = desc.shape
        self.device = torch.device("cuda", desc.cuda.device)
        data = torch.empty(0, dtype=torch.uint8, device=self.device).set_(open_storage(desc.cuda))
        self.layers = list(data[:layers * blocks * page].view(layers, blocks, page).unbind(0))

    def move(self, dst: list[int], src: list[int], sources: list[torch.Tensor]) -> None:
        """Every layer's blocks in one kernel launch each, then the stream synchronised: nothing is
        reported before the writes are done."""
        from dyn_actor.kv.cuda_ipc import move_blocks as cuda_move_blocks

        ids = torch.tensor([dst, src], dtype=torch.int64).to(self.device)
        with torch.cuda.device(self.device):
            for d, s in zip(self.layers, sources):
                cuda_move_blocks(d, s, ids[0], ids[1])
            torch.cuda.current_stream(self.device).synchronize()

    def close(self) -> None:
        self.layers = []


class _RemoteSegment:
    """A decode worker's KV segment, attached for writing (without a resource tracker: the owner
    removes it)."""

    def __init__(self, desc: KvPoolDescriptor) -> None:
        fd = _posixshmem.shm_open("/" + desc.name, os.O_RDWR, mode=0o600)
        try:
            self._mmap = mmap.mmap(fd, os.fstat(fd).st_size)
        finally:
            os.close(fd)
        layers, blocks, page = desc.shape
        data = torch.frombuffer(self._mmap, dtype=torch.uint8, count=layers * blocks * page)
        self.layers = list(data.view(layers, blocks, page).unbind(0))

    def move(self, dst: list[int], src: list[int], sources: list[torch.Tensor]) -> None:
        for d, s in zip(self.layers, sources):
            move_blocks(d, s, dst, src)  # one parallel memcpy per block, no staging copy

    def close(self) -> None:
        self.layers = []
        try:
            self._mmap.close()
        except BufferError:
            pass


# ------------------------------------------------------------------ the connector


class DynActorConnector(KVConnectorBase_V1, SupportsHMA):
    def __init__(self, vllm_config, role: KVConnectorRole, kv_cache_config=None) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        self.cfg: dict = dict(self._kv_transfer_config.kv_connector_extra_config or {})
        ours = logging.getLogger("dyn_actor")
        if not ours.handlers and not logging.getLogger().handlers:  # vLLM's processes log vLLM's logger only
            h = logging.StreamHandler()
            h.setFormatter(logging.Formatter(f"%(asctime)s {self.cfg.get('worker_name', '')} connector "
                                             "%(levelname)s %(name)s: %(message)s"))
            ours.addHandler(h)
            ours.setLevel(self.cfg.get("log_level", "INFO").upper())
        self.kind: str = self.cfg.get("role", "decode")
        self.block_size = vllm_config.cache_config.block_size
        self.device_type = vllm_config.device_config.device_type
        if self.device_type not in ("cpu", "cuda"):
            raise RuntimeError(f"{CONNECTOR_NAME}: vLLM's {self.device_type} backend is not supported (cpu, cuda)")
        # scheduler side
        self.policy = DisaggPolicy(int(self.cfg.get("max_local_prefill_length", 512)),
                                   int(self.cfg.get("max_prefill_queue_size", 8)))
        self._sub: PollingSubSocket | None = None
        self._depth = 0
        self._depth_at = float("-inf")
        self._pushed_since_depth = 0
        self._asks: list[RemoteAsk] = []
        self._waiting: set[str] = set()  # remote and not yet reported received
        self._local: set[str] = set()  # a remote prefill failed: computed here
        self._producing: dict[str, Any] = {}  # prefill side: request id -> vLLM Request
        # worker side
        self._segment: mmap.mmap | None = None
        self._segment_name = ""
        self._base: torch.Tensor | None = None
        self._layers: list[torch.Tensor] = []
        self._page_bytes = 0
        self._num_blocks = 0
        self._thread: _LoopThread | None = None
        self._server: ActorServer | None = None
        self._agent: DecodeAgent | WriterAgent | None = None
        self._remotes: dict[str, _RemoteSegment | _RemoteCudaCache] = {}
        self.bytes_written = 0
        if role == KVConnectorRole.SCHEDULER and self.kind == "decode":
            self._queue_depth()  # subscribe now: the queue publishes twice a second

    # ============================================================== worker side
    def get_mem_pool_context(self):
        if self.kind != "decode" or self.device_type != "cpu":
            return None  # on a GPU vLLM's own allocation is exported by IPC handle
        return _ShmKvAllocation(self)

    def _make_segment(self, nbytes: int) -> torch.Tensor:
        check_shm_room(nbytes)
        owner = int(self.cfg.get("owner_pid", os.getpid()))  # the launcher removes a dead worker's segments by pid
        name = f"{SHM_PREFIX}{owner}-vllm-{uuid.uuid4().hex[:8]}"
        # by hand, not with SharedMemory: its resource tracker would report the segment as leaked
        # (vLLM's views of it outlive shutdown()); this process or the launcher removes it
        fd = _posixshmem.shm_open("/" + name, os.O_CREAT | os.O_EXCL | os.O_RDWR, mode=0o600)
        try:
            os.ftruncate(fd, max(nbytes, 1))
            self._segment = mmap.mmap(fd, max(nbytes, 1))
        finally:
            os.close(fd)
        self._segment_name = name
        self._base = torch.frombuffer(self._segment, dtype=torch.int8, count=nbytes)
        return self._base

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        cfg = self._kv_cache_config
        self._num_blocks = cfg.num_blocks
        self._page_bytes = cfg.kv_cache_groups[0].kv_cache_spec.page_size_bytes
        first = next(iter(kv_caches.values()))
        on_gpu = first.device.type == "cuda"
        if self.kind == "decode" and not on_gpu:
            if self._base is None or first.untyped_storage().data_ptr() != self._base.data_ptr():
                raise RuntimeError(f"{CONNECTOR_NAME}: vLLM did not allocate its KV cache in the shared segment")
            base = self._base
        else:
            base = torch.empty(0, dtype=torch.int8, device=first.device).set_(first.untyped_storage())
        self._layers = [v.view(torch.uint8) for v in _layer_views(kv_caches, base, self._num_blocks, self._page_bytes)]
        name = self.cfg["worker_name"]
        self._thread = _LoopThread(f"dyn-actor-{name}-connector")
        if self.kind == "decode":
            shape = [len(self._layers), self._num_blocks, self._page_bytes]
            if on_gpu:
                from dyn_actor.kv.cuda_ipc import export_storage

                ipc = export_storage(first.untyped_storage())
                desc = KvPoolDescriptor(CUDA_POOL_KIND, f"cuda-{ipc.device}-{ipc.offset_bytes}", shape, "uint8",
                                        device=ipc.device, cuda=ipc)
            else:
                desc = KvPoolDescriptor(POOL_KIND, self._segment_name, shape, "uint8")
            self._agent = DecodeAgent(self.cfg, desc, self.block_size)
        else:
            self._agent = WriterAgent(name, self.cfg["agent_endpoint"])
        self._server = ActorServer(self._agent, self.cfg["agent_endpoint"])
        started = concurrent.futures.Future()
        self._thread.submit(self._server.serve(ready=lambda: started.set_result(True)))
        started.result(30)
        log.info("%s: KV connector (%s) on %s, %d layers x %d blocks x %d bytes", name, self.kind,
                 self.cfg["agent_endpoint"], len(self._layers), self._num_blocks, self._page_bytes)

    def start_load_kv(self, forward_context, **kwargs) -> None:
        if self.kind != "decode" or not self.has_connector_metadata():
            return
        meta = self._get_connector_metadata()
        assert isinstance(meta, DynActorMetadata) and self._thread is not None
        agent = self._agent
        assert isinstance(agent, DecodeAgent)
        for a in meta.remote:
            self._thread.call(agent.ask_remote, a)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata, **kwargs) -> None:
        return

    def wait_for_save(self) -> None:
        """Prefill side: the forward that completes these prompts is done; move their KV out now."""
        if self.kind != "prefill" or not self.has_connector_metadata():
            return
        meta = self._get_connector_metadata()
        assert isinstance(meta, DynActorMetadata)
        for job in meta.writes:
            self._write(job)

    def _write(self, job: WriteJob) -> None:
        p = job.params
        agent, thread = self._agent, self._thread
        assert isinstance(agent, WriterAgent) and thread is not None
        rid, endpoint, decoder = job.request_id, p["decode_endpoint"], p["decode_worker"]
        try:
            if not thread.submit(agent.begin(rid, endpoint, decoder)).result(GRANT_TIMEOUT + 1):
                log.info("decode worker %s no longer waits for %s: nothing written", decoder, rid)
                return
        except concurrent.futures.TimeoutError:
            return
        try:
            desc = msgspec.convert(p["pool"], KvPoolDescriptor)
            seg = self._remotes.get(desc.name)
            if seg is None:
                seg = self._remotes[desc.name] = (_RemoteCudaCache(desc) if desc.kind == CUDA_POOL_KIND
                                                  else _RemoteSegment(desc))
            if len(seg.layers) != len(self._layers) or desc.shape[2] != self._page_bytes:
                raise RuntimeError(f"KV layout mismatch: {desc.shape} there, {len(self._layers)} layers x "
                                   f"{self._page_bytes} bytes here")
            n = math.ceil(job.num_prompt_tokens / self.block_size)
            k = int(p["num_computed_blocks"])
            dst, src = list(p["block_ids"][k:n]), list(job.src_block_ids[k:n])
            seg.move(dst, src, self._layers)  # straight from this cache into the decode worker's
            nbytes = len(dst) * self._page_bytes * len(self._layers)
            self.bytes_written += nbytes
            msg: Any = RemotePrefillDone(rid, -1, None, nbytes)
        except Exception as e:  # noqa: BLE001 - reported, so the decode worker falls back at once
            log.exception("remote prefill write of %s failed", rid)
            msg = RemotePrefillFailed(rid, f"{type(e).__name__}: {e}")
        thread.submit(agent.end(rid, endpoint, decoder, msg)).result(GRANT_TIMEOUT)

    def get_transfer_results(self, finished_req_ids: set[str]) -> KVConnectorTransferResults:
        agent = self._agent
        if self.kind != "decode" or not isinstance(agent, DecodeAgent) or self._thread is None:
            return KVConnectorTransferResults()
        for rid in finished_req_ids:
            self._thread.call(agent.finished, rid)
        received, failed = agent.take_results()
        return KVConnectorTransferResults(finished_recving=received, failed_recving=failed)

    def get_finished(self, finished_req_ids: set[str]):
        r = self.get_transfer_results(finished_req_ids)
        return r.finished_sending or None, r.finished_recving or None

    def shutdown(self) -> None:
        if self._sub is not None:
            self._sub.close()
            self._sub = None
        if self._thread is not None and self._server is not None:
            server = self._server

            async def stop() -> None:
                server.stop()
                await asyncio.sleep(0.05)

            self._thread.stop(stop())
            self._thread = None
        for seg in self._remotes.values():
            seg.close()
        self._remotes.clear()
        self._layers = []
        self._base = None
        if self._segment is not None:
            seg, self._segment = self._segment, None
            try:
                seg.close()
            except BufferError:  # vLLM's views of it are still alive: the name goes all the same
                pass
            try:
                _posixshmem.shm_unlink("/" + self._segment_name)
            except FileNotFoundError:
                pass

    # ============================================================== scheduler side
    def _queue_depth(self) -> int | None:
        """The prefill queue's last published depth (None when it has not published lately)."""
        if self._sub is None:
            self._sub = PollingSubSocket(depth_endpoint(self.cfg["queue_endpoint"]))
        decoder = msgspec.msgpack.Decoder(QueueDepth)
        for data in self._sub.drain():
            try:
                self._depth = decoder.decode(data).depth
            except msgspec.DecodeError:
                continue
            self._depth_at = time.monotonic()
            self._pushed_since_depth = 0
        if time.monotonic() - self._depth_at > DEPTH_STALE_AFTER:
            return None
        return self._depth + self._pushed_since_depth

    def get_num_new_matched_tokens(self, request, num_computed_tokens: int) -> tuple[int | None, bool]:
        if self.kind != "decode" or request.request_id in self._local:
            return 0, False
        sp = getattr(request, "sampling_params", None)
        if sp is not None and getattr(sp, "prompt_logprobs", None) is not None:
            return 0, False  # prompt logprobs come from the forward that computes the prompt: here
        n = request.num_prompt_tokens - num_computed_tokens
        depth = self._queue_depth()
        # the decode worker's policy as it was when the request came (it moves while serving), else ours
        policy = policy_of(request.kv_transfer_params, self.policy)
        if n <= 1 or depth is None or not prefill_remotely(n, depth, policy):
            # one token left: vLLM computes the last prompt token itself, there is nothing to move
            log.debug("%s: local prefill of %d tokens (queue depth %s)", request.request_id, n, depth)
            return 0, False
        return n, True

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int) -> None:
        if self.kind != "decode" or num_external_tokens <= 0:
            return
        block_ids = list(blocks.get_block_ids()[0])
        computed = request.num_prompt_tokens - num_external_tokens
        lora = getattr(request, "lora_request", None)
        self._asks.append(RemoteAsk(request.request_id, list(request.prompt_token_ids), block_ids,
                                    computed // self.block_size, lora.lora_name if lora is not None else None))
        self._waiting.add(request.request_id)
        self._pushed_since_depth += 1

    def on_new_request(self, request) -> None:
        if self.kind == "prefill" and request.kv_transfer_params and "dyn_actor" in request.kv_transfer_params:
            self._producing[request.request_id] = request

    def build_connector_meta(self, scheduler_output) -> KVConnectorMetadata:
        meta = DynActorMetadata(remote=self._asks)
        self._asks = []
        if self._producing:
            for rid, scheduled in scheduler_output.num_scheduled_tokens.items():
                req = self._producing.get(rid)
                if req is None:
                    continue
                # num_computed_tokens is advanced after this call: it is the count before this step
                if req.num_computed_tokens + scheduled >= req.num_prompt_tokens:
                    assert self._kv_cache_manager is not None
                    src = list(self._kv_cache_manager.get_block_ids(rid)[0])
                    p = req.kv_transfer_params["dyn_actor"]
                    meta.writes.append(WriteJob(p["request_id"], src, req.num_prompt_tokens, p))
                    del self._producing[rid]
        return meta

    def update_connector_output(self, connector_output) -> None:
        for rid in connector_output.finished_recving or ():
            self._waiting.discard(rid)
        for rid in connector_output.failed_recving or ():
            self._local.add(rid)  # asked again by vLLM: prefilled here this time

    def request_finished(self, request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        rid = request.request_id
        self._local.discard(rid)
        self._producing.pop(rid, None)
        # still waiting for a remote prefill: its blocks stay until the agent reports them
        return rid in self._waiting, None

    def request_finished_all_groups(self, request, block_ids: tuple[list[int], ...]):
        return self.request_finished(request, block_ids[0] if block_ids else [])
