"""The HTTP frontend: OpenAI routes, SSE streaming, the processor (chat template, tokenizer,
incremental detokenization, stop strings) and the router, in one process.

A request makes one hop: the frontend tokenizes, picks a worker, opens a token
stream to it, and turns token deltas into text. Leaving the stream early (a
stop string, a client that went away) cancels it, which aborts the request on
the worker and frees its KV blocks.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import msgspec
from aiohttp import web

from dyn_actor.actor import ActorDeadError, ActorError, ActorRef
from dyn_actor.components.disagg_messages import Depth, DisaggPolicyState, QueueDepth, SetDisaggPolicy
from dyn_actor.components.http_edge import EdgePolicy
from dyn_actor.components.kv_events import KvEventFeed
from dyn_actor.components.messages import (
    AbortRequest,
    GenerateRequest,
    InfoRequest,
    OutputBatch,
    StatsRequest,
    Subscribe,
    TokenDelta,
    WorkerInfo,
    WorkerStats,
)
from dyn_actor.components.openai_api import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    RequestError,
    TokenizeRequest,
    check_messages,
    check_supported,
    decode_body,
    message_text,
    prompt_list,
    sampling_params,
)
from dyn_actor.engine.detokenizer import TextStream
from dyn_actor.engine.sampling import Logprobs, SamplingParams
from dyn_actor.engine.tokenizer import ChatTemplateError, Tokenizer
from dyn_actor.metrics import Registry
from dyn_actor.router import NoWorkerAvailable, Route, Router, WorkerEntry

log = logging.getLogger(__name__)


_GENERATION_ROUTES = ("/v1/chat/completions", "/v1/completions")


class WorkerClient:
    """The frontend's side of one worker: one ``Subscribe`` stream of per-step ``OutputBatch``es,
    demultiplexed into a queue per request."""

    def __init__(self, name: str, ref: ActorRef) -> None:
        self.name = name
        self.ref = ref
        self._queues: dict[str, asyncio.Queue] = {}
        self._dead: ActorError | None = None
        self._task: asyncio.Task | None = None
        self.info: WorkerInfo | None = None  # what the worker said it is, at its last (re)join

    def start(self) -> None:
        """Open (or, after the worker came back, reopen) the output stream."""
        self._dead = None
        self._task = asyncio.ensure_future(self._pump())

    async def _pump(self) -> None:
        try:
            async for batch in self.ref.stream(Subscribe(), OutputBatch):
                for item in batch.items:
                    q = self._queues.get(item.request_id)
                    if q is not None:
                        q.put_nowait(item)
            err: ActorError = ActorDeadError(f"{self.name} closed its output stream")
        except ActorDeadError as e:
            err = e
        except ActorError as e:
            err = ActorDeadError(f"{self.name}: {e}")
        self._dead = err
        queues, self._queues = self._queues, {}
        for q in queues.values():  # those requests are lost with the stream: each ends with the error
            q.put_nowait(err)

    async def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[TokenDelta]:
        """The request's deltas; leaving early aborts it on the worker."""
        if self._dead is not None:
            raise self._dead
        q: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = q
        finished = False
        try:
            await self.ref.tell(GenerateRequest(request_id, prompt_ids, params))
            while True:
                item = await q.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                if item.error is not None:
                    finished = True
                    raise ActorError(item.error, item.error_type)
                yield item.delta
                if item.delta.finished:
                    finished = True
                    return
        finally:
            self._queues.pop(request_id, None)
            if not finished and self._dead is None and self.ref.alive:
                # fire and forget: this may run while the request's task is being cancelled
                asyncio.ensure_future(self.ref.tell(AbortRequest(request_id)))


@dataclass
class Chunk:
    text: str
    token_ids: list[int]
    finished: bool
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    logprobs: list[Logprobs] = field(default_factory=list)
    num_cached_tokens: int = 0


class FrontendMetrics:
    def __init__(self) -> None:
        r = self.registry = Registry()
        self.requests = r.counter("dyn_requests_total", "Requests by outcome", ("outcome",))
        self.ttft = r.histogram("dyn_time_to_first_token_seconds", "Time to first token")
        self.itl = r.histogram("dyn_inter_token_latency_seconds", "Time between streamed tokens")
        self.e2e = r.histogram("dyn_e2e_request_latency_seconds", "Request latency, end to end")
        self.prompt_tokens = r.counter("dyn_prompt_tokens_total", "Prompt tokens of admitted requests")
        self.generation_tokens = r.counter("dyn_generation_tokens_total", "Generated tokens")
        self.cache_hits = r.counter("dyn_prefix_cache_hit_tokens_total", "Prompt tokens served from the prefix cache")
        self.local_prefills = r.counter("dyn_local_prefills_total", "Prompts prefilled on their decode/aggregated worker")
        self.remote_prefills = r.counter("dyn_remote_prefills_total", "Prompts prefilled by a prefill worker")
        self.kv_bytes = r.counter("dyn_kv_transfer_bytes_total", "KV bytes moved between workers")
        self.remote_prefill_latency = r.histogram("dyn_remote_prefill_latency_seconds",
                                                  "From queueing a remote prefill to its KV being in the decode pool")
        self.queue_depth = r.gauge("dyn_prefill_queue_depth", "Remote prefills waiting in the prefill queue")
        self.decisions = r.counter("dyn_router_decisions_total", "Requests routed to each worker", ("worker",))
        self.predicted_overlap = r.counter("dyn_router_predicted_overlap_tokens_total",
                                           "Prompt tokens the router expected the chosen worker to have cached",
                                           ("worker",))
        self.worker_cache_hits = r.counter("dyn_worker_prefix_cache_hit_tokens_total",
                                           "Prompt tokens the worker served from its prefix cache", ("worker",))
        self.worker_prompt_tokens = r.counter("dyn_worker_prompt_tokens_total", "Prompt tokens routed to the worker",
                                              ("worker",))
        self.kv_index_blocks = r.gauge("dyn_router_kv_index_blocks", "Distinct cached blocks in the router's index")
        self.kv_worker_blocks = r.gauge("dyn_router_kv_indexed_blocks", "Cached blocks the index holds per worker",
                                        ("worker",))
        self.kv_event_batches = r.gauge("dyn_router_kv_event_batches_total", "KV event batches applied", ("worker",))
        self.kv_resyncs = r.gauge("dyn_router_kv_resyncs_total", "Event-stream gaps that forced a resync",
                                  ("worker",))
        self.kv_errors = r.gauge("dyn_router_kv_errors_total",
                                 "KV-event problems (block_size_mismatch, no_events) per worker", ("worker", "reason"))
        self.router_active_blocks = r.gauge("dyn_router_active_blocks", "Decode blocks the router counts per worker",
                                            ("worker",))
        self.in_flight = r.gauge("dyn_requests_in_flight", "Requests being served", ())
        self.worker_up = r.gauge("dyn_worker_up", "1 while the worker answers heartbeats", ("worker",))
        self.blocks_used = r.gauge("dyn_worker_kv_blocks_used", "KV blocks held by live requests", ("worker",))
        self.blocks_total = r.gauge("dyn_worker_kv_blocks_total", "KV blocks in the worker's pool", ("worker",))
        self.running = r.gauge("dyn_worker_requests_running", "Requests running on the worker", ("worker",))
        self.waiting = r.gauge("dyn_worker_requests_waiting", "Requests waiting on the worker", ("worker",))
        self.preemptions = r.gauge("dyn_worker_preemptions", "Preemptions so far", ("worker",))
        self.remote_timeouts = r.gauge("dyn_worker_remote_prefill_timeouts_total",
                                       "Remote prefills a decode worker gave up on at the deadline", ("worker",))
        self.fenced = r.gauge("dyn_worker_kv_blocks_fenced",
                              "KV blocks held back while a late remote-prefill write may still land", ("worker",))
        self.step_seconds = r.gauge("dyn_worker_engine_step_seconds_total", "Time in engine steps", ("worker",))
        self.steps = r.gauge("dyn_worker_engine_steps_total", "Engine steps run", ("worker",))


class Frontend:
    def __init__(self, model_name: str, tokenizer: Tokenizer, router: Router, info: WorkerInfo,
                 edge: EdgePolicy | None = None) -> None:
        self.model_name = model_name
        self.tokenizer = tokenizer
        self.edge = edge or EdgePolicy()
        # tokenizing and rendering templates take time in proportion to the body: off the event loop
        self._cpu = ThreadPoolExecutor(max_workers=2, thread_name_prefix="tokenize")
        self.router = router
        self.info = info
        self.metrics = FrontendMetrics()
        self.created = int(time.time())
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self.draining = False
        self.prefill_queue: ActorRef | None = None  # disaggregated topologies

    async def drain(self, timeout: float) -> bool:
        """Take no new requests (503) and wait up to ``timeout`` s for those in flight to finish.
        False if some were still running at the deadline."""
        self.draining = True
        log.info("draining: %d requests in flight", self._in_flight)
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except asyncio.TimeoutError:
            log.warning("drain timeout (%.0fs): %d requests still in flight are cut off", timeout, self._in_flight)
            return False
        return True

    # ------------------------------------------------------------------ app
    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._errors], client_max_size=self.edge.max_request_bytes)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        app.router.add_get("/version", self.version)
        app.router.add_get("/metrics", self.metrics_route)
        app.router.add_post("/tokenize", self.tokenize)
        app.router.add_post("/detokenize", self.detokenize)
        app.router.add_get("/v1/router/state", self.router_state)
        app.router.add_get("/v1/disagg/policy", self.disagg_policy)
        app.router.add_post("/v1/disagg/policy", self.disagg_policy)
        return app

    async def disagg_policy(self, request: web.Request) -> web.Response:
        """Read (GET) or change (POST) every decode worker's local/remote prefill thresholds, live."""
        body = SetDisaggPolicy()
        if request.method == "POST":
            body = decode_body(await request.read(), SetDisaggPolicy)
        states = {}
        for entry in self.router.live_workers():
            try:
                st = await entry.handle.ref.ask(body, DisaggPolicyState, timeout=5)
            except ActorError as e:
                if e.error_type == "BadMessage":
                    raise RequestError("this topology has no decode workers (it is not disaggregated)") from None
                raise RequestError(str(e)) from None
            states[entry.name] = {"max_local_prefill_length": st.max_local_prefill_length,
                                  "max_prefill_queue_size": st.max_prefill_queue_size}
        return web.json_response({"workers": states})

    @web.middleware
    async def _errors(self, request: web.Request, handler):
        refusal = self.edge.check(request)
        if refusal is not None:
            status, message, type_, code = refusal
            return error_response(message, status, type_, code)
        if self.draining and request.method == "POST" and request.path in _GENERATION_ROUTES:
            return error_response("the server is shutting down", 503, "service_unavailable", "shutting_down")
        try:
            return await handler(request)
        except RequestError as e:
            self.metrics.requests.inc(1, "rejected")
            return error_response(str(e), e.status, e.type, e.code, e.param)
        except web.HTTPRequestEntityTooLarge:
            return error_response(f"the body is larger than {self.edge.max_request_bytes} bytes (--max-request-bytes)",
                                  413, "invalid_request_error", "request_too_large")
        except NoWorkerAvailable as e:
            self.metrics.requests.inc(1, "rejected")
            return error_response(str(e), 503, "service_unavailable", "no_worker")
        except web.HTTPException as e:
            if e.status >= 400 and e.content_type != "application/json":
                return error_response(e.reason or "error", e.status, "invalid_request_error")
            raise
        except ActorDeadError as e:
            self.metrics.requests.inc(1, "error")
            return error_response(f"the worker serving this request died: {e}", 503, "service_unavailable")
        except ActorError as e:
            self.metrics.requests.inc(1, "error")
            return error_response(f"the worker failed: {e}", 500, "server_error")
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a bug: still an OpenAI-shaped answer, and the server keeps serving
            log.exception("unhandled error on %s", request.path)
            self.metrics.requests.inc(1, "error")
            return error_response(f"internal error: {type(e).__name__}: {e}", 500, "server_error")

    # ------------------------------------------------------------- processor
    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise RequestError(f"the model {model!r} does not exist; this server serves {self.model_name!r}", 404,
                               "invalid_request_error", "model_not_found", "model")

    def _check_length(self, prompt_ids: list[int], max_tokens: int | None) -> int:
        n, limit = len(prompt_ids), self.info.max_model_len
        if n == 0:
            raise RequestError("the prompt is empty", param="prompt")
        if n >= limit:
            raise RequestError(
                f"this model's maximum context length is {limit} tokens; the prompt has {n} tokens, which leaves "
                "no room for a completion", code="context_length_exceeded")
        if max_tokens is not None and n + max_tokens > limit:
            raise RequestError(
                f"this model's maximum context length is {limit} tokens; the prompt has {n} tokens and max_tokens "
                f"asks for {max_tokens}; lower max_tokens to at most {limit - n}", code="context_length_exceeded",
                param="max_tokens")
        vocab = self.info.vocab_size
        if any(not 0 <= t < vocab for t in prompt_ids):
            raise RequestError(f"prompt token ids must be in [0, {vocab})", param="prompt")
        return n

    async def _off_loop(self, fn, *args):
        """Run ``fn(*args)`` on the tokenizer threads: a long prompt never holds up other requests."""
        return await asyncio.get_running_loop().run_in_executor(self._cpu, fn, *args)

    async def _chat_prompt(self, messages, add_generation_prompt: bool) -> list[int]:
        msgs = [{"role": m.role, "content": message_text(m.content)} for m in messages]
        try:
            return await self._off_loop(self.tokenizer.encode_chat, msgs, add_generation_prompt)
        except ChatTemplateError as e:
            raise RequestError(str(e), param="messages") from None

    # ------------------------------------------------------------ generation
    async def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[Chunk]:
        """Route, stream from the worker, detokenize; yields text chunks until the request ends.

        A worker found dead before it produced anything is skipped and the request
        goes to another one; once tokens have flowed, its death ends the stream.
        """
        tried: set[str] = set()
        while True:
            route = self.router.pick(prompt_ids)
            entry = route.entry
            if entry.name in tried:
                raise NoWorkerAvailable("no live worker is available to take the request")
            tried.add(entry.name)
            produced = False
            try:
                async for chunk in self._generate_on(route, request_id, prompt_ids, params):
                    produced = True
                    yield chunk
                return
            except ActorDeadError:
                if produced:
                    raise
                self.router.remove_worker(entry.name)
                log.warning("worker %s is gone; retrying request %s elsewhere", entry.name, request_id)

    async def _generate_on(self, route: Route, request_id: str, prompt_ids: list[int],
                           params: SamplingParams) -> AsyncIterator[Chunk]:
        entry = route.entry
        self.router.begin(route)
        self.metrics.decisions.inc(1, entry.name)
        self.metrics.predicted_overlap.inc(route.overlap_blocks * self.router.block_size, entry.name)
        self._in_flight += 1
        self._idle.clear()
        self.metrics.in_flight.set(self._in_flight)
        stream = TextStream(self.tokenizer, prompt_ids, params.stop, params.include_stop_str_in_output,
                            params.skip_special_tokens)
        t0 = last = time.monotonic()
        first = True
        outcome = "abort"
        try:
            async for d in entry.handle.generate(request_id, prompt_ids, params):
                now = time.monotonic()
                if first:
                    self.router.first_token(route)
                    self.metrics.ttft.observe(now - t0)
                    self.metrics.prompt_tokens.inc(len(prompt_ids))
                    self.metrics.cache_hits.inc(d.num_cached_tokens)
                    self.metrics.worker_cache_hits.inc(d.num_cached_tokens, entry.name)
                    self.metrics.worker_prompt_tokens.inc(len(prompt_ids), entry.name)
                    if d.remote_prefill:
                        self.metrics.remote_prefills.inc()
                        self.metrics.kv_bytes.inc(d.kv_transfer_bytes)
                        self.metrics.remote_prefill_latency.observe(d.remote_prefill_seconds)
                    else:
                        self.metrics.local_prefills.inc()
                    first = False
                elif d.token_ids:
                    gap = (now - last) / len(d.token_ids)
                    for _ in d.token_ids:
                        self.metrics.itl.observe(gap)
                last = now
                self.metrics.generation_tokens.inc(len(d.token_ids))
                # one chunk per token, as vLLM streams (a token that completes no character yet
                # gets an empty text); a delta carries several when the frontend fell behind
                toks = d.token_ids or [None]
                lps = d.logprobs or []
                for i, tok in enumerate(toks):
                    last_tok = i == len(toks) - 1
                    fin = d.finished and last_tok
                    ids = [] if tok is None else [tok]
                    text, stopped = stream.update(ids, fin)
                    lp = lps[i:i + 1] if len(lps) == len(toks) else (lps if last_tok else [])
                    if stopped:
                        outcome = "success"
                        yield Chunk(text, ids, True, "stop", stream.stop_reason, lp, d.num_cached_tokens)
                        return  # leaving the stream aborts the request on the worker
                    if fin:
                        outcome = "success"
                    yield Chunk(text, ids, fin, d.finish_reason if fin else None, d.stop_reason if fin else None, lp,
                                d.num_cached_tokens)
                if d.finished:
                    return
        except ActorDeadError:
            outcome = "error"
            raise
        except ActorError as e:
            if e.error_type == "ValueError":  # the engine refused the input
                outcome = "rejected"
                raise RequestError(str(e)) from None
            outcome = "error"
            raise
        finally:
            self.router.end(route)
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()
            self.metrics.in_flight.set(self._in_flight)
            self.metrics.requests.inc(1, outcome)
            if outcome == "success":
                self.metrics.e2e.observe(time.monotonic() - t0)

    # ----------------------------------------------------------------- routes
    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        req: ChatCompletionRequest = decode_body(await request.read(), ChatCompletionRequest)
        self._check_model(req.model)
        check_supported(req)
        check_messages(req.messages)
        prompt_ids = await self._chat_prompt(req.messages, req.add_generation_prompt)
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        if req.top_logprobs is not None and not req.logprobs:
            raise RequestError("top_logprobs needs logprobs=true", param="top_logprobs")
        lp = (req.top_logprobs or 0) if req.logprobs else None
        self._check_length(prompt_ids, max_tokens)
        params = [sampling_params(req, max_tokens, lp, i) for i in range(req.n)]
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        return await self._respond(request, rid, "chat", prompt_ids, params, req.stream,
                                   bool(req.stream_options and req.stream_options.include_usage))

    async def completions(self, request: web.Request) -> web.StreamResponse:
        req: CompletionRequest = decode_body(await request.read(), CompletionRequest)
        self._check_model(req.model)
        check_supported(req)
        if req.echo:
            raise RequestError("echo is not supported", param="echo")
        if req.suffix:
            raise RequestError("suffix is not supported", param="suffix")
        if req.best_of not in (None, 1, req.n):
            raise RequestError("best_of is not supported", param="best_of")
        prompts = prompt_list(req.prompt)
        prompt_ids_list = [await self._off_loop(self.tokenizer.encode, p) if isinstance(p, str) else p for p in prompts]
        max_tokens = 16 if req.max_tokens is None else req.max_tokens
        for ids in prompt_ids_list:
            self._check_length(ids, max_tokens)
        if len(prompt_ids_list) * req.n > 64:
            raise RequestError("at most 64 completions (prompts x n) per request", param="n")
        rid = f"cmpl-{uuid.uuid4().hex}"
        params = [sampling_params(req, max_tokens, req.logprobs, i) for i in range(req.n)]
        return await self._respond(request, rid, "text", prompt_ids_list, params, req.stream,
                                   bool(req.stream_options and req.stream_options.include_usage))

    async def _respond(self, request, rid, kind, prompt_ids, params, stream, include_usage):
        batches = prompt_ids if kind == "text" else [prompt_ids]
        jobs = [(pi * len(params) + i, ids, p) for pi, ids in enumerate(batches) for i, p in enumerate(params)]
        if stream:
            return await self._stream_response(request, rid, kind, jobs, include_usage)
        return await self._full_response(rid, kind, jobs)

    async def _full_response(self, rid, kind, jobs) -> web.Response:
        async def collect(index, ids, p):
            text, toks, lps, reason, stop_reason, cached = "", [], [], None, None, 0
            async for c in self.generate(f"{rid}-{index}", ids, p):
                text += c.text
                toks.extend(c.token_ids)
                lps.extend(c.logprobs)
                cached = c.num_cached_tokens
                if c.finished:
                    reason, stop_reason = c.finish_reason, c.stop_reason
            return index, ids, text, toks, lps, reason, stop_reason, cached

        results = await asyncio.gather(*(collect(*j) for j in jobs))
        choices = []
        for index, _ids, text, _toks, lps, reason, stop_reason, _ in results:
            p = jobs[index][2]
            if kind == "chat":
                choices.append({"index": index, "message": {"role": "assistant", "content": text},
                                "logprobs": self._chat_logprobs(lps) if p.logprobs is not None else None,
                                "finish_reason": reason, "stop_reason": stop_reason})
            else:
                choices.append({"index": index, "text": text,
                                "logprobs": self._text_logprobs(lps) if p.logprobs is not None else None,
                                "finish_reason": reason, "stop_reason": stop_reason})
        prompt_tokens = sum(len(ids) for ids in {tuple(j[1]) for j in jobs}) if kind == "text" else len(jobs[0][1])
        usage = _usage(prompt_tokens, sum(len(r[3]) for r in results), results[0][7])
        obj = "chat.completion" if kind == "chat" else "text_completion"
        return web.json_response({"id": rid, "object": obj, "created": int(time.time()), "model": self.model_name,
                                  "choices": choices, "usage": usage})

    async def _stream_response(self, request, rid, kind, jobs, include_usage) -> web.StreamResponse:
        queue: asyncio.Queue = asyncio.Queue()
        stats = {"completion": 0, "cached": 0}

        async def pump(index, ids, p):
            try:
                async for c in self.generate(f"{rid}-{index}", ids, p):
                    await queue.put((index, p, c))
            except BaseException as e:  # delivered to the writer, which ends the stream with an error
                await queue.put((index, p, e))
            finally:
                await queue.put((index, p, None))

        tasks = [asyncio.ensure_future(pump(*j)) for j in jobs]
        try:  # however this ends (the client left before the first token, too), the requests end with it
            return await self._write_sse(request, rid, kind, jobs, include_usage, queue, stats)
        except ConnectionResetError:  # the client went away mid-write: nobody to answer
            return stats.get("resp") or web.Response(status=499)
        finally:
            for t in tasks:
                t.cancel()

    async def _write_sse(self, request, rid, kind, jobs, include_usage, queue: asyncio.Queue,
                         stats: dict) -> web.StreamResponse:
        # errors before the first byte (no worker, bad input caught by the engine) become normal responses
        first_item = await queue.get()
        if isinstance(first_item[2], BaseException):
            raise first_item[2]
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        stats["resp"] = resp
        created = int(time.time())
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
        base = {"id": rid, "object": obj, "created": created, "model": self.model_name}

        async def send(payload: dict) -> None:
            await resp.write(b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n")

        if kind == "chat":
            for index, _, _ in jobs:
                await send({**base, "choices": [{"index": index, "delta": {"role": "assistant", "content": ""},
                                                 "logprobs": None, "finish_reason": None}]})
        open_jobs = len(jobs)
        item = first_item
        while True:
            index, p, c = item
            if c is None:
                open_jobs -= 1
                if open_jobs == 0:
                    break
            elif isinstance(c, BaseException):
                msg = str(c) or type(c).__name__
                await send({"error": {"message": f"the request failed: {msg}", "type": "server_error",
                                      "code": 503 if isinstance(c, ActorDeadError) else 500}})
                await resp.write(b"data: [DONE]\n\n")
                return resp
            else:
                stats["completion"] += len(c.token_ids)
                stats["cached"] = max(stats["cached"], c.num_cached_tokens)
                if c.token_ids or c.text or c.finished:  # one chunk per token, with or without text
                    lp = None
                    if p.logprobs is not None and c.logprobs:
                        lp = self._chat_logprobs(c.logprobs) if kind == "chat" else self._text_logprobs(c.logprobs)
                    if kind == "chat":
                        delta = {"content": c.text} if c.text or c.token_ids else {}
                        choice = {"index": index, "delta": delta, "logprobs": lp,
                                  "finish_reason": c.finish_reason if c.finished else None}
                    else:
                        choice = {"index": index, "text": c.text, "logprobs": lp,
                                  "finish_reason": c.finish_reason if c.finished else None}
                    if c.finished:
                        choice["stop_reason"] = c.stop_reason
                    await send({**base, "choices": [choice]})
            item = await queue.get()
        if include_usage:
            prompt_tokens = sum(len(ids) for ids in {tuple(j[1]) for j in jobs}) if kind == "text" \
                else len(jobs[0][1])
            await send({**base, "choices": [], "usage": _usage(prompt_tokens, stats["completion"], stats["cached"])})
        await resp.write(b"data: [DONE]\n\n")
        return resp

    def _token_str(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def _chat_logprobs(self, lps: list[Logprobs]) -> dict:
        content = []
        for lp in lps:
            s = self._token_str(lp.token_id)
            content.append({"token": s, "logprob": lp.logprob, "bytes": list(s.encode()),
                            "top_logprobs": [{"token": (t := self._token_str(i)), "logprob": v,
                                              "bytes": list(t.encode())} for i, v in lp.top]})
        return {"content": content}

    def _text_logprobs(self, lps: list[Logprobs]) -> dict:
        tokens = [self._token_str(lp.token_id) for lp in lps]
        offsets, pos = [], 0
        for t in tokens:
            offsets.append(pos)
            pos += len(t)
        return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in lps],
                "top_logprobs": [{self._token_str(i): v for i, v in lp.top} for lp in lps], "text_offset": offsets}

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{
            "id": self.model_name, "object": "model", "created": self.created, "owned_by": "dyn-actor",
            "root": self.info.model, "parent": None, "max_model_len": self.info.max_model_len}]})

    async def version(self, request: web.Request) -> web.Response:
        from dyn_actor import __version__

        return web.json_response({"version": __version__})

    async def health(self, request: web.Request) -> web.Response:
        if self.draining:
            return web.json_response({"status": "draining"}, status=503)
        live = self.router.live_workers()
        if not live:
            return web.json_response({"status": "unavailable", "workers": 0}, status=503)
        devices = {e.name: e.handle.info.device for e in live if getattr(e.handle, "info", None) is not None}
        return web.json_response({"status": "ok", "workers": len(live), "devices": devices})

    async def refresh_worker_stats(self, timeout: float = 1.0) -> None:
        async def one(entry: WorkerEntry):
            try:
                s = await entry.handle.ref.ask(StatsRequest(), WorkerStats, timeout=timeout)
            except (ActorError, asyncio.TimeoutError):
                return
            m, w = self.metrics, entry.name
            m.blocks_used.set(s.kv_blocks_used, w)
            m.blocks_total.set(s.kv_blocks_total, w)
            m.running.set(s.requests_running, w)
            m.waiting.set(s.requests_waiting, w)
            m.preemptions.set(s.num_preemptions, w)
            m.remote_timeouts.set(s.remote_prefill_timeouts, w)
            m.fenced.set(s.kv_blocks_fenced, w)
            m.step_seconds.set(s.step_seconds_total, w)
            m.steps.set(s.steps_total, w)

        async def queue_depth():
            if self.prefill_queue is None or not self.prefill_queue.alive:
                return
            try:
                d = await self.prefill_queue.ask(Depth(), QueueDepth, timeout=timeout)
            except (ActorError, asyncio.TimeoutError):
                return
            self.metrics.queue_depth.set(d.depth)

        m, router = self.metrics, self.router
        m.kv_index_blocks.set(router.index.num_blocks)
        for entry in router.workers.values():
            m.worker_up.set(1 if entry.alive else 0, entry.name)
            m.kv_worker_blocks.set(router.index.num_blocks_of(entry.name), entry.name)
            m.kv_event_batches.set(entry.kv.batches, entry.name)
            m.kv_resyncs.set(entry.kv.resyncs, entry.name)
            m.router_active_blocks.set(entry.active_blocks, entry.name)
        for (worker, reason), n in router.kv_errors.items():
            m.kv_errors.set(n, worker, reason)
        await asyncio.gather(*(one(e) for e in self.router.live_workers()), queue_depth())

    async def router_state(self, request: web.Request) -> web.Response:
        """The router's view, for people debugging a deployment: index size, per-worker load and
        KV-event stream health."""
        return web.json_response(self.router.state())

    async def metrics_route(self, request: web.Request) -> web.Response:
        await self.refresh_worker_stats()
        return web.Response(text=self.metrics.registry.render(), content_type="text/plain", charset="utf-8",
                            headers={"X-Content-Type-Options": "nosniff"})

    async def tokenize(self, request: web.Request) -> web.Response:
        req: TokenizeRequest = decode_body(await request.read(), TokenizeRequest)
        self._check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise RequestError("give exactly one of prompt or messages")
        if req.messages is not None:
            check_messages(req.messages)
            ids = await self._chat_prompt(req.messages, req.add_generation_prompt)
        else:
            ids = await self._off_loop(self.tokenizer.encode, req.prompt or "", req.add_special_tokens)
        # a long prompt's ids: msgspec encodes them ~20x faster than json, on the event loop
        return web.Response(body=msgspec.json.encode({"tokens": ids, "count": len(ids),
                                                      "max_model_len": self.info.max_model_len}),
                            content_type="application/json")

    async def detokenize(self, request: web.Request) -> web.Response:
        req: DetokenizeRequest = decode_body(await request.read(), DetokenizeRequest)
        self._check_model(req.model)
        vocab = self.info.vocab_size
        if any(not 0 <= t < vocab for t in req.tokens):
            raise RequestError(f"token ids must be in [0, {vocab})")
        return web.json_response({"prompt": self.tokenizer.decode(req.tokens)})


def _usage(prompt: int, completion: int, cached: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def error_response(message: str, status: int, type: str, code: str | int | None = None,
                   param: str | None = None) -> web.Response:
    return web.json_response({"error": {"message": message, "type": type, "param": param,
                                        "code": code if code is not None else status}}, status=status)


async def connect_workers(endpoints: dict[str, str], router: Router, wait: float = 60.0,
                          feed: KvEventFeed | None = None, rejoin_interval: float = 1.0) -> WorkerInfo:
    """Open refs to every worker, register them with the router (and their KV-event streams with
    ``feed``), return the first worker's info.

    A worker whose heartbeat lapses is routed around at once. It may only have been stalled, or
    its supervisor restarts it at the same endpoint: its ref keeps knocking, and a worker that
    answers again is asked who it is, subscribed to afresh and routed to.
    """
    info = None
    for name, ep in endpoints.items():
        i = await _connect_worker(name, ep, router, feed, rejoin_interval, wait)
        info = info or i
    assert info is not None
    return info


async def _connect_worker(name: str, ep: str, router: Router, feed: KvEventFeed | None, rejoin_interval: float,
                          wait: float) -> WorkerInfo:
    ref = await ActorRef(ep, name).start(wait_ready=wait)
    try:
        i = await ref.ask(InfoRequest(), WorkerInfo, timeout=wait)
    except BaseException:
        await ref.close()
        raise
    client = WorkerClient(name, ref)

    def join(info: WorkerInfo) -> None:
        client.info = info
        client.start()
        router.add_worker(name, client)
        router.check_block_size(name, info.block_size)
        if feed is not None and info.kv_events_endpoint:
            feed.add(name, info.kv_events_endpoint, ref)

    def on_dead(_ref: ActorRef) -> None:
        router.remove_worker(name)
        if feed is not None:
            feed.remove(name)
        log.error("worker %s stopped answering; routing around it", name)

    async def rejoin() -> None:
        # the worker answers again (it was stalled, or restarted at the same endpoint): it may be a
        # new process, so ask who it is before routing to it
        try:
            info = await ref.ask(InfoRequest(), WorkerInfo, timeout=max(rejoin_interval, 5.0))
        except (ActorError, asyncio.TimeoutError):
            return  # dead again: the next revival tries again
        log.warning("worker %s answers again; routing to it", name)
        join(info)

    ref.on_dead(on_dead)
    ref.on_alive(lambda _ref: asyncio.ensure_future(rejoin()))
    join(i)
    return i
