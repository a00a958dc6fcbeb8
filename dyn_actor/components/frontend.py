"""The HTTP frontend: OpenAI routes, SSE streaming, the processor (chat template, tokenizer,
incremental detokenization, stop strings) and the router, in one process.

A request makes one hop: the frontend tokenizes, picks a worker, opens a token
stream to it, and turns token deltas into text. Leaving the stream early (a
stop string, a client that went away) cancels it, which aborts the request on
the worker and frees its KV blocks.
"""

from __future__ import annotations

import array
import asyncio
import base64
import logging
import sys
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import msgspec
from aiohttp import web

from dyn_actor.actor import ActorDeadError, ActorError, ActorRef
from dyn_actor.aio import wait_for
from dyn_actor.components import responses as R
from dyn_actor.components.beam_search import Beam, beam_search
from dyn_actor.components.disagg_messages import Depth, DisaggPolicyState, QueueDepth, SetDisaggPolicy
from dyn_actor.components.http_edge import EdgePolicy
from dyn_actor.components.messages import (
    WorkerInfo,
)
from dyn_actor.components.openai_api import (
    MAX_EMBEDDING_INPUTS,
    ChatCompletionRequest,
    ClassificationRequest,
    CompletionRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    RequestError,
    RerankRequest,
    ScoreRequest,
    TokenizeRequest,
    check_beam_search,
    check_messages,
    check_supported,
    decode_body,
    prompt_list,
    sampling_params,
    template_kwargs,
    truncated,
)
from dyn_actor.components.parsers import END_THINK, Reading, read_all, thinks_after
from dyn_actor.components.processor import Processor
from dyn_actor.components.responses_api import ResponseBuilder, ResponsesRequest, chat_request
from dyn_actor.components.tools import ToolPlan, ToolStream, plan_tools, stream_delta, tool_calls, tool_dicts
from dyn_actor.engine.pooling import pair_ids
from dyn_actor.engine.tokenizer import ChatTemplateError, Tokenizer
from dyn_actor.metrics import FrontendMetrics
from dyn_actor.protocol import Logprobs, PoolingParams, SamplingParams
from dyn_actor.router import NoWorkerAvailable, Route, Router, WorkerEntry

log = logging.getLogger(__name__)


_GENERATION_ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/embeddings", "/score",
                      "/v1/score", "/classify", "/rerank", "/v1/rerank", "/v2/rerank")


@dataclass
class Echo:
    """Completions' ``echo``: each job's prompt text goes before its completion; with max_tokens 0
    (``prompt_only``) nothing generated is returned (the engine computes one token, dropped)."""

    texts: list[str]
    prompt_only: bool = False


@dataclass
class ChatJob:
    """A chat request made ready (``Frontend._prepare_chat``)."""

    prompt_ids: list[int]
    params: list[SamplingParams]
    plan: ToolPlan | None  # a named function or "required": the output is their JSON
    reading: Reading | None  # the server's parsers, where they apply


@dataclass
class Chunk:
    text: str
    token_ids: list[int]
    finished: bool
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    logprobs: list[Logprobs] = field(default_factory=list)
    num_cached_tokens: int = 0
    prompt_logprobs: list[Logprobs | None] | None = None  # on a request's first chunk, when asked
    embedding: bytes | None = None  # an embedding request's vector (little-endian float32), on its last chunk


class Frontend:
    def __init__(self, model_name: str, tokenizer: Tokenizer, router: Router, info: WorkerInfo,
                 edge: EdgePolicy | None = None, sampling_defaults: dict | None = None,
                 reasoning_parser: str | None = None, tool_call_parser: str | None = None,
                 score_template: str | None = None) -> None:
        self.model_name = model_name
        # --chat-template, which a cross-encoder's /score and /rerank render their pairs with (vLLM uses
        # a template there only when one is given: many rerankers inherit an unrelated chat template)
        self.score_template = score_template
        # how chat answers are read (components/parsers.py): --reasoning-parser, --tool-call-parser
        self.reasoning_parser = reasoning_parser
        self.tool_call_parser = tool_call_parser
        self._end_think_ids: list[int] | None = None  # "</think>" as token ids (structured outputs start after)
        # what a request leaves unset: the model's generation_config.json (loader.default_sampling)
        self.sampling_defaults = sampling_defaults or {}
        self.tokenizer = tokenizer
        self.processor = Processor(model_name, tokenizer, info.max_model_len, info.vocab_size, list(info.lora_modules))
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
        self.queue_depth = 0  # the prefill queue's depth at the last refresh
        self.planner = None  # a components.planner_process.PlannerView (unless --planner off)
        self.index = 0  # which frontend process this is (--frontends)
        # told each policy change made here (the fields given), so a decode worker that starts later keeps it
        self.on_policy = lambda fields: None

    def _default_max_tokens(self, prompt_lens: list[int], neutral: int | None) -> int | None:
        """max_tokens for a request that gives none: the generation config's, cut to what the longest
        prompt's context leaves (as vLLM does), else ``neutral`` (None: all the context leaves)."""
        default = self.sampling_defaults.get("max_tokens")
        if default is None:
            return neutral
        room = self.processor.max_model_len - max(prompt_lens, default=0)
        return max(1, min(default, room))

    async def drain(self, timeout: float) -> bool:
        """Take no new requests (503) and wait up to ``timeout`` s for those in flight to finish.
        False if some were still running at the deadline."""
        self.draining = True
        log.info("draining: %d requests in flight", self._in_flight)
        try:
            await wait_for(self._idle.wait(), timeout)
        except asyncio.TimeoutError:
            log.warning("drain timeout (%.0fs): %d requests still in flight are cut off", timeout, self._in_flight)
            return False
        return True

    # ------------------------------------------------------------------ app
    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._errors], client_max_size=self.edge.max_request_bytes)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/responses", self.responses)
        app.router.add_post("/v1/embeddings", self.embeddings)
        app.router.add_post("/classify", self.classify)
        for path in ("/score", "/v1/score"):
            app.router.add_post(path, self.score)
        for path in ("/rerank", "/v1/rerank", "/v2/rerank"):
            app.router.add_post(path, self.rerank)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/v1/models/{model:.+}", self.model)
        app.router.add_get("/load", self.load)
        app.router.add_get("/health", self.health)
        app.router.add_get("/ping", self.ping)
        app.router.add_post("/ping", self.ping)
        app.router.add_get("/version", self.version)
        app.router.add_get("/metrics", self.metrics_route)
        app.router.add_post("/tokenize", self.tokenize)
        app.router.add_post("/detokenize", self.detokenize)
        app.router.add_get("/v1/router/state", self.router_state)
        app.router.add_get("/v1/planner/state", self.planner_state)
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
        changed = {k: v for k, v in msgspec.structs.asdict(body).items() if v is not None}
        if changed:
            self.on_policy(changed)
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
    async def _off_loop(self, fn, *args):
        """Run ``fn(*args)`` on the tokenizer threads: a long prompt never holds up other requests."""
        return await asyncio.get_running_loop().run_in_executor(self._cpu, fn, *args)

    # ------------------------------------------------------------ generation
    async def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[Chunk]:
        """Route, stream from the worker, detokenize; yields text chunks until the request ends.

        A worker found dead before it produced anything is skipped and the request
        goes to another one; once tokens have flowed, its death ends the stream.
        """
        tried: set[str] = set()
        while True:
            route = self.router.pick(prompt_ids, params.lora_name)
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
        if params.lora_name:
            self.metrics.lora_requests.inc(1, params.lora_name)
        self.metrics.predicted_overlap.inc(route.overlap_blocks * self.router.block_size, entry.name)
        self._in_flight += 1
        self._idle.clear()
        self.metrics.in_flight.set(self._in_flight)
        stream = self.processor.text_stream(prompt_ids, params)
        t0 = last = time.monotonic()
        first = True
        outcome = "abort"
        plp = None
        try:
            async for d in entry.handle.generate(request_id, prompt_ids, params):
                now = time.monotonic()
                if first:
                    plp = d.prompt_logprobs
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
                    text, stopped = stream.update(ids, fin, fin and d.finish_reason == "stop")
                    lp = lps[i:i + 1] if len(lps) == len(toks) else (lps if last_tok else [])
                    if stopped:
                        outcome = "success"
                        yield Chunk(text, ids, True, "stop", stream.stop_reason, lp, d.num_cached_tokens, plp)
                        return  # leaving the stream aborts the request on the worker
                    if fin:
                        outcome = "success"
                    yield Chunk(text, ids, fin, d.finish_reason if fin else None, d.stop_reason if fin else None, lp,
                                d.num_cached_tokens, plp, d.embedding if fin else None)
                    plp = None
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
        job = await self._prepare_chat(req)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        if req.use_beam_search:
            check_beam_search(req, job.params)
            return await self._beam_response(rid, "chat", [job.prompt_ids], job.params, req.length_penalty,
                                             job.reading)
        return await self._respond(request, rid, "chat", job.prompt_ids, job.params, req.stream,
                                   bool(req.stream_options and req.stream_options.include_usage),
                                   show_prompt_logprobs=req.prompt_logprobs is not None,
                                   tools=job.plan, reading=job.reading, token_ids_as_text=req.return_tokens_as_token_ids)

    def _check_generates(self) -> None:
        if self.info.runner == "pooling":
            routes = ("/classify" + (", /score or /rerank" if len(self.info.labels) == 1 else "") if self.info.labels
                      else "/v1/embeddings, /score or /rerank")
            what = "a classifier" if self.info.labels else "embeddings"
            raise RequestError(f"this model is served for {what} (--runner pooling): it generates no text; "
                               f"use {routes}", code="model_not_supported")

    async def _prepare_chat(self, req: ChatCompletionRequest) -> ChatJob:
        """A chat request checked and made ready to run: its prompt, each choice's parameters, the
        tool calls it forces (a named function or "required") and how its answers are read."""
        lora = self.processor.check_model(req.model)
        self._check_generates()
        check_supported(req, chat=True)
        check_messages(req.messages)
        tools = tool_dicts(req.tools)
        plan = plan_tools(tools, req.tool_choice, _optional_bool(req.parallel_tool_calls, "parallel_tool_calls"),
                          self.tool_call_parser)
        prompt_ids = await self._off_loop(self.processor.chat_prompt, req.messages, req.add_generation_prompt,
                                          tools, template_kwargs(req.chat_template_kwargs), req.continue_final_message)
        prompt_ids = self._truncated_prompt(prompt_ids, req)
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        if req.top_logprobs is not None and not req.logprobs:
            raise RequestError("top_logprobs needs logprobs=true", param="top_logprobs")
        lp = (req.top_logprobs or 0) if req.logprobs else None
        if req.prompt_logprobs is not None and req.stream:
            raise RequestError("prompt_logprobs are not available when stream is true", param="prompt_logprobs")
        if max_tokens is None:
            max_tokens = self._default_max_tokens([len(prompt_ids)], None)
        params = [sampling_params(req, max_tokens, lp, i, self.sampling_defaults, req.prompt_logprobs)
                  for i in range(req.n)]
        for p in params:
            p.lora_name = lora
        if plan is not None and plan.spec is not None:  # the output is the tool calls' JSON
            if params[0].structured is not None:
                raise RequestError("tool_choice and a structured output (response_format, guided_*) cannot be "
                                   "asked for together", param="tool_choice")
            for p in params:
                p.structured = plan.spec
        auto = plan if plan is not None and plan.mode == "auto" else None
        if auto is not None and self.tool_call_parser == "hermes":
            for p in params:  # its tags are special tokens in some models (vLLM does the same)
                p.skip_special_tokens = False
        reading = self._reading(prompt_ids, params, auto, req.include_reasoning)
        self.processor.bad_words_ids(params)
        self.processor.check_prompt(prompt_ids, max_tokens, params[0])
        return ChatJob(prompt_ids, params, plan if auto is None else None, reading)

    async def responses(self, request: web.Request) -> web.StreamResponse:
        """OpenAI's Responses API, run as one chat choice (``components/responses_api.py``)."""
        req: ResponsesRequest = decode_body(await request.read(), ResponsesRequest)
        job = await self._prepare_chat(chat_request(req))
        builder = ResponseBuilder(req, job.params[0].lora_name or self.model_name, req.stream)
        reader = job.reading.reader() if job.reading is not None else None
        state = {"held": "", "tokens": 0, "cached": 0, "reason": None}
        gen = self.generate(builder.id, job.prompt_ids, job.params[0])
        try:
            if not req.stream:
                async for c in gen:
                    self._response_chunk(builder, job, reader, state, c)
                return _json(builder.finish(state["reason"], len(job.prompt_ids), state["tokens"], state["cached"]))
            first = await gen.__anext__()  # errors before the first byte are plain error responses
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
            await resp.prepare(request)
            builder.start()
            c = first
            try:
                while True:
                    self._response_chunk(builder, job, reader, state, c)
                    if c.finished:
                        builder.finish(state["reason"], len(job.prompt_ids), state["tokens"], state["cached"])
                    if builder.events:
                        await resp.write(b"".join(builder.events))
                        builder.events.clear()
                    if c.finished:
                        break
                    c = await gen.__anext__()
            except StopAsyncIteration:
                pass
            except ConnectionResetError:  # the client went away: nobody to answer
                return resp
            except Exception as e:  # noqa: BLE001 - after the first byte, an error event ends the stream
                builder.error(f"the request failed: {str(e) or type(e).__name__}")
                await resp.write(b"".join(builder.events))
            return resp
        finally:
            await gen.aclose()  # however it ends, the request ends with it

    @staticmethod
    def _response_chunk(builder: ResponseBuilder, job: ChatJob, reader, state: dict, c: Chunk) -> None:
        """One generated token's chunk into the response's items: the reasoning, then the answer's
        text, the calls the parser read, or a forced call's arguments."""
        state["tokens"] += len(c.token_ids)
        state["cached"] = c.num_cached_tokens
        text, reasoning, calls = c.text, "", []
        if reader is not None:
            before = reader.calls
            piece = reader.step(c.text, c.finished)
            text, reasoning, calls = piece.content, piece.reasoning, job.reading.answered(piece, before)
            rr = reader.reasoning
            if rr is not None and (rr.state == "reasoning" or (rr.state == "lead" and rr.thinking)):
                builder.reasoning_tokens += len(c.token_ids)
        if reasoning and job.reading.show_reasoning:
            builder.reasoning(reasoning)
        plan = job.plan
        if plan is None:
            builder.text(text)
            for call in calls:
                builder.call(call)
        elif plan.mode == "named":
            builder.arguments(plan.name, text)
        else:  # "required": the calls once their array is complete
            state["held"] += text
            if c.finished:
                made = tool_calls(plan, state["held"])
                if made is None:
                    builder.text(state["held"])
                for call in made or []:
                    builder.call(call)
        if c.finished:
            state["reason"] = c.finish_reason

    def _reading(self, prompt_ids: list[int], params: list[SamplingParams], auto: ToolPlan | None,
                 include_reasoning: bool) -> Reading | None:
        """How this request's answers are read (None: as they are). Where the model starts out
        thinking, a structured output (tool calls named or "required" too) holds only the text after
        its reasoning, as vLLM's does with a reasoning parser: the grammar starts after "</think>"."""
        reasoning = self.reasoning_parser is not None
        if not reasoning and auto is None:
            return None
        thinking = reasoning and (self.reasoning_parser == "deepseek_r1"
                                  or thinks_after(self.processor.decode(prompt_ids[-32:])))
        if thinking and params[0].structured is not None:
            if self._end_think_ids is None:
                self._end_think_ids = self.tokenizer.encode(END_THINK, add_special_tokens=False)
            spec = msgspec.structs.replace(params[0].structured, start_after=self._end_think_ids)
            for p in params:
                p.structured = spec
        return Reading(reasoning, thinking, include_reasoning and reasoning,
                       self.tool_call_parser if auto is not None else None,
                       auto.names if auto is not None else None, auto.parallel if auto is not None else True)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        req: CompletionRequest = decode_body(await request.read(), CompletionRequest)
        lora = self.processor.check_model(req.model)
        self._check_generates()
        check_supported(req)
        if req.suffix:
            raise RequestError("suffix is not supported", param="suffix")
        if req.best_of not in (None, 1, req.n):
            raise RequestError("best_of is not supported", param="best_of")
        prompts = prompt_list(req.prompt)
        prompt_ids_list = [await self._off_loop(self.processor.encode, p) if isinstance(p, str) else p
                           for p in prompts]
        if req.truncate_prompt_tokens is not None:
            cut = [self._truncated_prompt(ids, req) for ids in prompt_ids_list]
            # an echo gives the prompt that was read: a cut one's tokens, decoded
            prompts = [p if len(c) == len(ids) else c for p, ids, c in zip(prompts, prompt_ids_list, cut)]
            prompt_ids_list = cut
        max_tokens = req.max_tokens
        if max_tokens is None:
            max_tokens = self._default_max_tokens([len(ids) for ids in prompt_ids_list], 16)
        if req.prompt_logprobs is not None and req.stream:
            raise RequestError("prompt_logprobs are not available when stream is true", param="prompt_logprobs")
        echo = None
        if req.echo:  # the prompt comes back before the completion (with its logprobs, when asked)
            echo = Echo([p if isinstance(p, str) else await self._off_loop(self.processor.decode, p) for p in prompts],
                        prompt_only=max_tokens == 0)
        elif max_tokens == 0:
            raise RequestError("max_tokens must be at least 1 (0 only with echo)", param="max_tokens")
        plp = req.prompt_logprobs
        if req.echo and req.logprobs is not None:
            plp = max(plp or 0, req.logprobs)
        params = [sampling_params(req, max_tokens or 1, req.logprobs, i, self.sampling_defaults, plp)
                  for i in range(req.n)]
        for p in params:
            p.lora_name = lora
        self.processor.bad_words_ids(params)
        for ids in prompt_ids_list:
            self.processor.check_prompt(ids, max_tokens or 1, params[0])
        if len(prompt_ids_list) * req.n > 64:
            raise RequestError("at most 64 completions (prompts x n) per request", param="n")
        rid = f"cmpl-{uuid.uuid4().hex}"
        if req.use_beam_search:
            check_beam_search(req, params)
            return await self._beam_response(rid, "text", prompt_ids_list, params, req.length_penalty)
        return await self._respond(request, rid, "text", prompt_ids_list, params, req.stream,
                                   bool(req.stream_options and req.stream_options.include_usage), echo,
                                   req.prompt_logprobs is not None, token_ids_as_text=req.return_tokens_as_token_ids)

    async def embeddings(self, request: web.Request) -> web.Response:
        """``/v1/embeddings``: each input pooled into one vector by a worker of a ``--runner pooling``
        model (``engine/pooling.py``), every input a request of its own, routed as any other (the kv
        router sends a repeated prefix where it is cached); answered together, in input order."""
        req: EmbeddingRequest = decode_body(await request.read(), EmbeddingRequest)
        lora = self.processor.check_model(req.model)
        self._check_pools()
        if req.embed_dtype not in EMBED_DTYPES:
            raise RequestError(f"embed_dtype must be one of {', '.join(EMBED_DTYPES)} (the fp8 ones are not sent "
                               f"by this server), got {req.embed_dtype!r}", param="embed_dtype")
        if (req.input is None) == (req.messages is None):
            raise RequestError("give exactly one of input or messages", param="input")
        if req.messages is not None:
            check_messages(req.messages)
            ids = await self._off_loop(self.processor.chat_prompt, req.messages, req.add_generation_prompt, None,
                                       template_kwargs(req.chat_template_kwargs), req.continue_final_message)
            inputs = self._pooling_inputs([ids], req.truncate_prompt_tokens, "messages", req.truncation_side)
        else:
            inputs = await self._tokenized(prompt_list(req.input), req.add_special_tokens, req.truncate_prompt_tokens,
                                           "input", req.truncation_side)
        normalize = req.normalize if req.normalize is not None else req.use_activation
        params = SamplingParams(max_tokens=1, temperature=0.0, lora_name=lora,
                                pooling=PoolingParams(dimensions=req.dimensions, normalize=normalize))
        rid = f"embd-{uuid.uuid4().hex}"
        vectors = await self._embed_all(rid, inputs, params)
        data = []
        for i, blob in enumerate(vectors):
            if req.encoding_format == "base64":
                blob = _as_dtype(blob, req.embed_dtype, req.endianness)
                data.append(R.EmbeddingData(i, "embedding", base64.b64encode(blob).decode("ascii")))
            else:
                data.append(R.EmbeddingData(i, "embedding", _floats(blob).tolist()))
        n = sum(len(ids) for ids in inputs)
        return _json(R.EmbeddingResponse(rid, "list", int(time.time()), lora or self.model_name, data,
                                         R.EmbeddingUsage(n, n)))

    async def classify(self, request: web.Request) -> web.Response:
        """vLLM's ``/classify``: a sequence classifier's label probabilities for each input (its scores
        through softmax or sigmoid, as vLLM applies them; ``use_activation: false``: the raw scores),
        and the most likely label."""
        req: ClassificationRequest = decode_body(await request.read(), ClassificationRequest)
        lora = self.processor.check_model(req.model)
        self._check_pools("classify")
        inputs = await self._tokenized(prompt_list(req.input), req.add_special_tokens, req.truncate_prompt_tokens,
                                       "input", req.truncation_side)
        params = SamplingParams(max_tokens=1, temperature=0.0, lora_name=lora,
                                pooling=PoolingParams(task="classify", normalize=req.use_activation))
        rid = f"classify-{uuid.uuid4().hex}"
        labels = self.info.labels
        data = []
        for i, blob in enumerate(await self._embed_all(rid, inputs, params)):
            probs = _floats(blob).tolist()
            best = max(range(len(probs)), key=probs.__getitem__)
            data.append(R.ClassificationData(i, labels[best] if best < len(labels) else None, probs, len(probs)))
        n = sum(len(ids) for ids in inputs)
        return _json(R.ClassificationResponse(rid, "list", int(time.time()), lora or self.model_name, data,
                                              R.ScoreUsage(n, n, 0)))

    async def score(self, request: web.Request) -> web.Response:
        """vLLM's ``/score``: for an embedding model (a bi-encoder), the cosine similarity of each
        pair's embeddings (every distinct text embedded once); for a one-label classifier (a
        cross-encoder, a reranker), the model's score of each pair read as one input. One text
        against many, or as many on each side, paired in order."""
        req: ScoreRequest = decode_body(await request.read(), ScoreRequest)
        lora = self.processor.check_model(req.model)
        cross = self._check_pools("score")
        given = [(a, b) for a, b in (("text_1", "text_2"), ("queries", "documents"), ("queries", "items"),
                                     ("data_1", "data_2")) if getattr(req, a) is not None and getattr(req, b) is not None]
        if len(given) != 1 or any(getattr(req, f) is not None for f in {"text_1", "text_2", "queries", "documents",
                                                                          "items", "data_1", "data_2"} - set(given[0])):
            raise RequestError("give one pair of text_1 and text_2 (or queries and documents, or data_1 and data_2)",
                               param="text_1")
        first, second = (_score_texts(getattr(req, f), f) for f in given[0])
        if len(first) != 1 and len(first) != len(second):
            raise RequestError(f"{given[0][0]} must hold one text or as many as {given[0][1]} "
                               f"({len(first)} and {len(second)})", param=given[0][0])
        pairs = [(first[0] if len(first) == 1 else first[i], second[i]) for i in range(len(second))]
        scores, tokens = await self._pair_scores(pairs, req, lora, cross)
        rid = f"score-{uuid.uuid4().hex}"
        data = [R.ScoreData(i, "score", v) for i, v in enumerate(scores)]
        return _json(R.ScoreResponse(rid, "list", int(time.time()), lora or self.model_name, data,
                                     R.ScoreUsage(tokens, tokens, 0)))

    async def rerank(self, request: web.Request) -> web.Response:
        """vLLM's (and Jina's, Cohere's) ``/rerank``: the documents by their score against the query
        (as ``/score`` gives it: cosine similarity or a cross-encoder's), best first; ``top_n`` of them
        (0: all)."""
        req: RerankRequest = decode_body(await request.read(), RerankRequest)
        lora = self.processor.check_model(req.model)
        cross = self._check_pools("score")
        docs = _score_texts(req.documents, "documents")
        query = _score_texts(req.query, "query")
        if len(query) != 1:
            raise RequestError("query must be one text", param="query")
        scores, tokens = await self._pair_scores([(query[0], d) for d in docs], req, lora, cross)
        order = sorted(range(len(docs)), key=lambda i: -scores[i])[: req.top_n or None]
        results = [R.RerankResult(i, R.RerankDocument(docs[i]), scores[i]) for i in order]
        return _json(R.RerankResponse(f"rerank-{uuid.uuid4().hex}", lora or self.model_name,
                                      R.EmbeddingUsage(tokens, tokens), results))

    async def _pair_scores(self, pairs: list[tuple[str, str]], req: ScoreRequest | RerankRequest, lora: str | None,
                           cross: bool) -> tuple[list[float], int]:
        """Each (query, document) pair's score, and the tokens read for them (a bi-encoder's text counted
        in each of its pairs, as vLLM counts them). Queries and documents are first cut to
        ``max_tokens_per_query`` and ``max_tokens_per_doc`` tokens."""
        if len(pairs) > MAX_EMBEDDING_INPUTS:
            raise RequestError(f"at most {MAX_EMBEDDING_INPUTS} pairs per request, got {len(pairs)}", param="documents")
        limits = (req.max_tokens_per_query, req.max_tokens_per_doc)
        for name, v in zip(("max_tokens_per_query", "max_tokens_per_doc"), limits):
            if v >= self.processor.max_model_len:
                raise RequestError(f"{name} ({v}) must be less than the context length "
                                   f"({self.processor.max_model_len})", param=name)
        if any(limits):
            cut = self.tokenizer.truncate_text
            pairs = await self._off_loop(lambda: [(cut(q, limits[0]) if limits[0] else q,
                                                   cut(d, limits[1]) if limits[1] else d) for q, d in pairs])
        if cross:
            return await self._cross_scores(pairs, req, lora)
        return await self._similarities(pairs, req.truncate_prompt_tokens, lora, req.truncation_side)

    async def _cross_scores(self, pairs: list[tuple[str, str]], req: ScoreRequest | RerankRequest,
                            lora: str | None) -> tuple[list[float], int]:
        """A cross-encoder's score of each pair read as one input (``pooling.pair_ids``: rendered by
        ``--chat-template`` where one was given, else the tokenizer's text pair): the one-label
        classifier's logit through its activation."""
        tok = self.tokenizer
        kwargs = template_kwargs(req.chat_template_kwargs) or {}
        if req.instruction is not None:
            kwargs = {**kwargs, "instruction": req.instruction}
        template, sep = self.score_template, self.info.use_sep_token
        try:
            ids = await self._off_loop(lambda: [pair_ids(tok, q, d, sep, template, **kwargs) for q, d in pairs])
        except ChatTemplateError as e:
            raise RequestError(str(e)) from None
        inputs = self._pooling_inputs(ids, req.truncate_prompt_tokens, "documents", req.truncation_side)
        params = SamplingParams(max_tokens=1, temperature=0.0, lora_name=lora,
                                pooling=PoolingParams(task="classify", normalize=req.use_activation))
        blobs = await self._embed_all(f"score-{uuid.uuid4().hex}", inputs, params)
        return [float(_floats(b)[0]) for b in blobs], sum(map(len, inputs))

    async def _similarities(self, pairs: list[tuple[str, str]], truncate: int | None,
                            lora: str | None, side: str | None) -> tuple[list[float], int]:
        """Each pair's cosine similarity, and the tokens of the pairs (a text counted in each of its
        pairs, as vLLM counts them)."""
        texts = list(dict.fromkeys(t for pair in pairs for t in pair))
        inputs = await self._tokenized(texts, True, truncate, "documents", side)
        params = SamplingParams(max_tokens=1, temperature=0.0, lora_name=lora, pooling=PoolingParams(normalize=True))
        vectors = dict(zip(texts, (_floats(b) for b in await self._embed_all(f"score-{uuid.uuid4().hex}", inputs,
                                                                             params))))
        lengths = dict(zip(texts, map(len, inputs)))
        # unit vectors: the dot product is the cosine (off the loop: thousands of pairs take a while)
        scores = await self._off_loop(lambda: [sum(x * y for x, y in zip(vectors[a], vectors[b])) for a, b in pairs])
        return scores, sum(lengths[a] + lengths[b] for a, b in pairs)

    def _check_pools(self, task: str = "embed") -> bool:
        """A 400 unless this server's model does ``task``: embed (an embedding model), classify (a
        sequence classifier) or score (either an embedding model or a one-label classifier, a
        cross-encoder), all served with ``--runner pooling``. For score: whether it is a cross-encoder."""
        if self.info.runner != "pooling":
            raise RequestError("this model is served for generation; embeddings, scores and classification need a "
                               "model served with --runner pooling", code="model_not_supported")
        if task == "classify" and not self.info.labels:
            raise RequestError("this model is not a sequence classifier: /classify needs one (a "
                               "*ForSequenceClassification folder)", code="model_not_supported")
        if task == "embed" and self.info.labels:
            raise RequestError("this model is a sequence classifier: use /classify (or /score and /rerank, for a "
                               "one-label classifier); embeddings need an embedding model", code="model_not_supported")
        if task == "score" and len(self.info.labels) > 1:
            raise RequestError(f"this classifier has {len(self.info.labels)} labels: /score and /rerank need an "
                               "embedding model or a one-label classifier (a cross-encoder); use /classify",
                               code="model_not_supported")
        return bool(self.info.labels)

    def _truncated_prompt(self, ids: list[int], req: ChatCompletionRequest | CompletionRequest) -> list[int]:
        """A generation's prompt cut as its ``truncate_prompt_tokens`` asks (its last tokens unless
        ``truncation_side`` is "right"; -1: the context less the one token a completion needs)."""
        limit = self.processor.max_model_len
        return truncated(ids, req.truncate_prompt_tokens, req.truncation_side or "left", limit, limit - 1)

    async def _tokenized(self, texts: list[str | list[int]], special: bool, truncate: int | None,
                         param: str, side: str | None = None) -> list[list[int]]:
        """An embeddings or scoring request's inputs as checked token ids (texts tokenized off the loop)."""
        if len(texts) > MAX_EMBEDDING_INPUTS:
            raise RequestError(f"at most {MAX_EMBEDDING_INPUTS} inputs per request, got {len(texts)}", param=param)
        encode = self.tokenizer.encode
        ids = await self._off_loop(lambda: [encode(t, special) if isinstance(t, str) else t for t in texts])
        return self._pooling_inputs(ids, truncate, param, side)

    def _pooling_inputs(self, inputs: list[list[int]], keep: int | None, param: str,
                        side: str | None = None) -> list[list[int]]:
        """Inputs cut to ``keep`` tokens (vLLM's ``truncate_prompt_tokens``; -1: the context's worth):
        their first ones, or their last with ``side`` "left" (vLLM's ``truncation_side``; a pooling
        model's default is "right"), then checked: not empty, within the context and the vocabulary
        (a 400 naming ``param``)."""
        limit = self.processor.max_model_len
        inputs = [truncated(ids, keep, side or "right", limit, limit) for ids in inputs]
        vocab = self.info.vocab_size
        for ids in inputs:
            if not ids:
                raise RequestError("an input is empty", param=param)
            if len(ids) > limit:
                raise RequestError(f"this model's maximum context length is {limit} tokens; an input has {len(ids)} "
                                   "tokens (truncate_prompt_tokens cuts it)", code="context_length_exceeded",
                                   param=param)
            if any(not 0 <= t < vocab for t in ids):
                raise RequestError(f"token ids must be in [0, {vocab})", param=param)
        return inputs

    async def _embed_all(self, rid: str, inputs: list[list[int]], params: SamplingParams) -> list[bytes]:
        """Every input's vector (little-endian float32 bytes), each a request of its own, in input order."""
        async def one(i: int, ids: list[int]) -> bytes:
            vec = None
            async for c in self.generate(f"{rid}-{i}", ids, params):
                if c.embedding is not None:
                    vec = c.embedding
            if vec is None:
                raise RuntimeError(f"the worker ended embedding request {rid}-{i} without a vector")
            return vec

        return list(await asyncio.gather(*(one(i, ids) for i, ids in enumerate(inputs))))

    async def _respond(self, request, rid, kind, prompt_ids, params, stream, include_usage, echo=None,
                       show_prompt_logprobs=False, tools: ToolPlan | None = None, reading: Reading | None = None,
                       token_ids_as_text: bool = False):
        """``token_ids_as_text``: logprobs name tokens ``token_id:N`` (vLLM's return_tokens_as_token_ids)."""
        proc = self.processor.naming_token_ids() if token_ids_as_text else self.processor
        batches = prompt_ids if kind == "text" else [prompt_ids]
        jobs = [(pi * len(params) + i, ids, p) for pi, ids in enumerate(batches) for i, p in enumerate(params)]
        if echo is not None:  # the prompt's text of each job
            echo.texts = [echo.texts[pi] for pi in range(len(batches)) for _ in params]
        if stream:
            return await self._stream_response(request, rid, kind, jobs, include_usage, echo, tools, reading, proc=proc)
        return await self._full_response(rid, kind, jobs, echo, show_prompt_logprobs, tools, reading, proc=proc)

    async def _beam_response(self, rid: str, kind: str, prompts: list[list[int]], params: list[SamplingParams],
                             length_penalty: float, reading: Reading | None = None) -> web.Response:
        """``use_beam_search``: each prompt's ``n`` best beams (``components/beam_search.py``), each
        step's one-token requests routed and run like any other; answered whole, not streamed."""
        p0 = params[0]
        width = len(params)
        step_params = SamplingParams(max_tokens=1, temperature=p0.temperature, logprobs=2 * width, ignore_eos=True,
                                     lora_name=p0.lora_name)
        eos = frozenset(self.info.eos_token_ids)

        async def search(pi: int, prompt: list[int]) -> list[Beam]:
            step = 0

            async def expand(beams: list[list[int]]) -> list[list[tuple[int, float]]]:
                nonlocal step
                step += 1

                async def one(bi: int, tokens: list[int]) -> list[tuple[int, float]]:
                    lps = []
                    async for c in self.generate(f"{rid}-{pi}-{step}-{bi}", prompt + tokens, step_params):
                        lps.extend(c.logprobs)
                    alternatives = dict(lps[0].top)
                    alternatives.setdefault(lps[0].token_id, lps[0].logprob)  # a sampled one beyond the top
                    return list(alternatives.items())

                return list(await asyncio.gather(*(one(bi, t) for bi, t in enumerate(beams))))

            room = self.processor.max_model_len - len(prompt)  # (max_tokens None: all the context leaves)
            steps = room if p0.max_tokens is None else min(p0.max_tokens, room)
            return await beam_search(expand, len(prompt), width, steps, eos, p0.ignore_eos, length_penalty)

        results = await asyncio.gather(*(search(pi, prompt) for pi, prompt in enumerate(prompts)))
        choices: list = []
        completion = 0
        for pi, beams in enumerate(results):
            for bi, beam in enumerate(beams):
                tokens = beam.tokens + ([beam.stop_token] if beam.finish_reason == "stop" and
                                        p0.include_stop_str_in_output else [])
                completion += len(tokens)
                text = self.tokenizer.decode(tokens, skip_special_tokens=p0.skip_special_tokens)
                if kind == "chat":
                    message, reason = self._chat_message(text, beam.finish_reason, None, reading)
                    choices.append(R.ChatChoice(bi, message, None, reason))
                else:
                    choices.append(R.CompletionChoice(pi * width + bi, text, None, beam.finish_reason))
        prompt_tokens = sum(len(p) for p in {tuple(p) for p in prompts})
        obj = "chat.completion" if kind == "chat" else "text_completion"
        return _json(R.CompletionResponse(rid, obj, int(time.time()), p0.lora_name or self.model_name, choices,
                                          R.usage(prompt_tokens, completion, 0)))

    async def _full_response(self, rid, kind, jobs, echo: Echo | None = None, show_prompt_logprobs: bool = False,
                             tools: ToolPlan | None = None, reading: Reading | None = None,
                             *, proc: Processor) -> web.Response:
        """``proc``: the processor that formats the logprobs (``_respond`` picks it)."""
        async def collect(index, ids, p):
            text, toks, lps, reason, stop_reason, cached, plps = "", [], [], None, None, 0, None
            async for c in self.generate(f"{rid}-{index}", ids, p):
                text += c.text
                toks.extend(c.token_ids)
                lps.extend(c.logprobs)
                cached = c.num_cached_tokens
                if c.prompt_logprobs is not None:
                    plps = c.prompt_logprobs
                if c.finished:
                    reason, stop_reason = c.finish_reason, c.stop_reason
            if echo is not None and echo.prompt_only:  # max_tokens 0: the one token computed is not returned
                text, toks, lps, reason, stop_reason = "", [], [], "length", None
            return index, ids, text, toks, lps, reason, stop_reason, cached, plps

        results = await asyncio.gather(*(collect(*j) for j in jobs))
        choices: list = []
        for index, ids, text, _toks, lps, reason, stop_reason, _, plps in results:
            p = jobs[index][2]
            if kind == "chat":
                message, reason = self._chat_message(text, reason, tools, reading)
                choices.append(R.ChatChoice(index, message,
                                            proc.chat_logprobs(lps) if p.logprobs is not None else None,
                                            reason, stop_reason))
                continue
            lp = None
            if p.logprobs is not None:
                lp = proc.text_logprobs(lps) if echo is None else \
                    proc.echo_logprobs(ids, plps or [None] * len(ids), lps)
            choice = R.CompletionChoice(index, text if echo is None else echo.texts[index] + text, lp, reason,
                                        stop_reason)
            if show_prompt_logprobs:
                choice.prompt_logprobs = proc.prompt_logprobs(ids, plps or [None] * len(ids))
            choices.append(choice)
        prompt_tokens = sum(len(ids) for ids in {tuple(j[1]) for j in jobs}) if kind == "text" else len(jobs[0][1])
        usage = R.usage(prompt_tokens, sum(len(r[3]) for r in results), results[0][7])
        obj = "chat.completion" if kind == "chat" else "text_completion"
        body = R.CompletionResponse(rid, obj, int(time.time()), jobs[0][2].lora_name or self.model_name, choices,
                                    usage)
        if kind == "chat" and show_prompt_logprobs:
            body.prompt_logprobs = proc.prompt_logprobs(jobs[0][1], results[0][8] or [None] * len(jobs[0][1]))
        return _json(body)

    @staticmethod
    def _chat_message(text: str, reason: str | None, tools: ToolPlan | None,
                      reading: Reading | None) -> tuple[R.ChatMessage, str | None]:
        """A whole chat choice's message (and its finish reason): read by the server's parsers, where
        it has any, then as the tool calls that ``tools`` asked for."""
        reasoning: str | None | R.UnsetType = R.UNSET
        calls = None
        if reading is not None:
            piece = read_all(reading.reader(), text)
            text = piece.content
            if reading.show_reasoning:
                reasoning = piece.reasoning or None
            calls = reading.answered(piece, 0) or None
            if calls and reason == "stop":
                reason = "tool_calls"
        if tools is not None:
            calls = tool_calls(tools, text)
            if calls is not None and tools.mode == "required" and reason == "stop":
                reason = "tool_calls"
            if calls is not None:
                return R.ChatMessage("assistant", None, calls, reasoning), reason
        if calls:
            return R.ChatMessage("assistant", text or None, calls, reasoning), reason
        return R.ChatMessage("assistant", (text or None) if reading is not None else text, R.UNSET, reasoning), reason

    async def _stream_response(self, request, rid, kind, jobs, include_usage, echo: Echo | None = None,
                               tools: ToolPlan | None = None, reading: Reading | None = None,
                               *, proc: Processor) -> web.StreamResponse:
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
            return await self._write_sse(request, rid, kind, jobs, include_usage, queue, stats, echo, tools, reading,
                                         proc=proc)
        except ConnectionResetError:  # the client went away mid-write: nobody to answer
            return stats.get("resp") or web.Response(status=499)
        finally:
            for t in tasks:
                t.cancel()

    async def _write_sse(self, request, rid, kind, jobs, include_usage, queue: asyncio.Queue,
                         stats: dict, echo: Echo | None = None, tools: ToolPlan | None = None,
                         reading: Reading | None = None, *, proc: Processor) -> web.StreamResponse:
        # errors before the first byte (no worker, bad input caught by the engine) become normal responses
        first_item = await queue.get()
        if isinstance(first_item[2], BaseException):
            raise first_item[2]
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        stats["resp"] = resp
        created = int(time.time())
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
        model = jobs[0][2].lora_name or self.model_name  # the adapter's name for its requests, as vLLM answers

        # events are written when nothing more is waiting: one write a token while the frontend keeps
        # up, and the tokens that queued meanwhile in one write when it falls behind (a write is a
        # syscall: the largest cost of a streamed token here)
        out: list[bytes] = []

        def send(payload) -> None:
            out.append(b"data: " + _encode(payload) + b"\n\n")

        async def flush() -> None:
            if out:
                data = b"".join(out)
                out.clear()
                await resp.write(data)

        async def next_item():
            if queue.empty():
                await flush()
            return await queue.get()

        if kind == "chat":
            for index, _, _ in jobs:
                send(R.Chunk(rid, obj, created, model,
                             [R.ChatChunkChoice(index, R.ChatDelta("assistant", ""), None, None)]))
        open_jobs = len(jobs)
        echoed: set[int] = set()
        calls_text: dict[int, ToolStream] = {}  # tool calls: each choice's text so far, and its call id
        readers: dict = {}  # with parsers: each choice's reader
        item = first_item
        while True:
            index, p, c = item
            if c is None:
                open_jobs -= 1
                if open_jobs == 0:
                    break
            elif isinstance(c, BaseException):
                msg = str(c) or type(c).__name__
                send(R.ErrorBody(R.ErrorDetail(f"the request failed: {msg}", "server_error", None,
                                               503 if isinstance(c, ActorDeadError) else 500)))
                out.append(b"data: [DONE]\n\n")
                await flush()
                return resp
            else:
                if echo is not None and index not in echoed:  # the prompt first, as its own chunk
                    echoed.add(index)
                    ids = jobs[index][1]
                    lp = None
                    if p.logprobs is not None:
                        lp = proc.echo_logprobs(ids, c.prompt_logprobs or [None] * len(ids), [])
                    send(R.Chunk(rid, obj, created, model, [R.CompletionChunkChoice(
                        index, echo.texts[index], lp, "length" if echo.prompt_only else None)]))
                if echo is not None and echo.prompt_only:
                    item = await next_item()  # max_tokens 0: the one token computed is not returned
                    continue
                stats["completion"] += len(c.token_ids)
                stats["cached"] = max(stats["cached"], c.num_cached_tokens)
                if c.token_ids or c.text or c.finished:  # one chunk per token, with or without text
                    lp = None
                    if p.logprobs is not None and c.logprobs:
                        lp = proc.chat_logprobs(c.logprobs) if kind == "chat" else proc.text_logprobs(c.logprobs)
                    reason = c.finish_reason if c.finished else None
                    stop_reason = c.stop_reason if c.finished else R.UNSET
                    if kind == "chat" and (reading is not None or tools is not None):
                        text, reasoning, calls = c.text, "", []
                        if reading is not None:  # the reasoning first; tool calls in what follows
                            rd = readers.get(index) or readers.setdefault(index, reading.reader())
                            before = rd.calls
                            piece = rd.step(c.text, c.finished)
                            text, reasoning, calls = piece.content, piece.reasoning, reading.calls(piece, before)
                            if c.finished and rd.calls and reason == "stop":
                                reason = "tool_calls"
                        if tools is not None:  # a named function or "required": the text is their JSON
                            delta, reason = stream_delta(tools, calls_text.setdefault(index, ToolStream()), text,
                                                         c.finished, reason)
                        else:
                            delta = R.ChatDelta(content=text or R.UNSET, tool_calls=calls or R.UNSET)
                        if reasoning and reading is not None and reading.show_reasoning:
                            delta = delta or R.ChatDelta()
                            delta.reasoning = reasoning
                        if delta is None:  # "required": the calls go out once the array is complete
                            item = await next_item()
                            continue
                        choice = R.ChatChunkChoice(index, delta, lp, reason, stop_reason)
                    elif kind == "chat":
                        delta = R.ChatDelta(content=c.text) if c.text or c.token_ids else R.ChatDelta()
                        choice = R.ChatChunkChoice(index, delta, lp, reason, stop_reason)
                    else:
                        choice = R.CompletionChunkChoice(index, c.text, lp, reason, stop_reason)
                    send(R.Chunk(rid, obj, created, model, [choice]))
            item = await next_item()
        if include_usage:
            prompt_tokens = sum(len(ids) for ids in {tuple(j[1]) for j in jobs}) if kind == "text" \
                else len(jobs[0][1])
            send(R.Chunk(rid, obj, created, model, [], R.usage(prompt_tokens, stats["completion"],
                                                               stats["cached"])))
        out.append(b"data: [DONE]\n\n")
        await flush()
        return resp

    def _model_cards(self) -> list[dict]:
        """The base model, then each LoRA adapter (its folder as root, the base model as parent), as
        vLLM lists them."""
        return [{"id": self.model_name, "object": "model", "created": self.created, "owned_by": "dyn-actor",
                 "root": self.info.model, "parent": None, "max_model_len": self.info.max_model_len}, *({
                     "id": name, "object": "model", "created": self.created, "owned_by": "dyn-actor", "root": path,
                     "parent": self.model_name, "max_model_len": self.info.max_model_len}
                     for name, path in self.info.lora_modules.items())]

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": self._model_cards()})

    async def model(self, request: web.Request) -> web.Response:
        """``GET /v1/models/{model}`` (OpenAI's retrieve): one model's card; a 404 for another name."""
        name = request.match_info["model"]
        self.processor.check_model(name)
        return web.json_response(next(c for c in self._model_cards() if c["id"] == name))

    async def load(self, request: web.Request) -> web.Response:
        """vLLM's ``GET /load``: the requests this frontend has in flight."""
        return web.json_response({"server_load": self._in_flight})

    async def version(self, request: web.Request) -> web.Response:
        from dyn_actor import __version__

        return web.json_response({"version": __version__})

    async def ping(self, request: web.Request) -> web.Response:
        """vLLM's ``/ping`` (GET or POST; SageMaker's health check): /health's answer."""
        return await self.health(request)

    async def health(self, request: web.Request) -> web.Response:
        if self.draining:
            return web.json_response({"status": "draining"}, status=503)
        live = self.router.live_workers()
        if not live:
            return web.json_response({"status": "unavailable", "workers": 0}, status=503)
        devices = {e.name: e.handle.info.device for e in live if getattr(e.handle, "info", None) is not None}
        return web.json_response({"status": "ok", "workers": len(live), "devices": devices})

    async def refresh_worker_stats(self, timeout: float = 1.0) -> None:
        """The gauges from each worker's last load report (published with its KV events, a few times
        a second: no ask per refresh) and the prefill queue's depth."""
        def one(entry: WorkerEntry) -> None:
            s = entry.load
            if s is None:
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
            if s.spec_drafts:
                m.spec_drafts.set(s.spec_drafts, w)
                m.spec_draft_tokens.set(s.spec_draft_tokens, w)
                m.spec_accepted_tokens.set(s.spec_accepted_tokens, w)

        async def queue_depth():
            if self.prefill_queue is None or not self.prefill_queue.alive:
                return
            try:
                d = await self.prefill_queue.ask(Depth(), QueueDepth, timeout=timeout)
            except (ActorError, asyncio.TimeoutError):
                return
            self.queue_depth = d.depth
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
        for e in self.router.live_workers():
            one(e)
        await queue_depth()

    async def planner_state(self, request: web.Request) -> web.Response:
        if self.planner is None:
            return _json({"mode": "off", "recent": []})
        return _json(self.planner.state())

    async def router_state(self, request: web.Request) -> web.Response:
        """The router's view, for people debugging a deployment: index size, per-worker load and
        KV-event stream health. With several frontends, each has a router of its own: ``frontend``
        says whose this is (the one this connection reached)."""
        return web.json_response({"frontend": self.index, **self.router.state()})

    async def metrics_route(self, request: web.Request) -> web.Response:
        await self.refresh_worker_stats()
        return web.Response(text=self.metrics.registry.render(), content_type="text/plain", charset="utf-8",
                            headers={"X-Content-Type-Options": "nosniff"})

    async def tokenize(self, request: web.Request) -> web.Response:
        req: TokenizeRequest = decode_body(await request.read(), TokenizeRequest)
        self.processor.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise RequestError("give exactly one of prompt or messages")
        if req.messages is not None:
            check_messages(req.messages)
            ids = await self._off_loop(self.processor.chat_prompt, req.messages, req.add_generation_prompt,
                                       tool_dicts(req.tools) or None, template_kwargs(req.chat_template_kwargs),
                                       req.continue_final_message)
        else:
            ids = await self._off_loop(self.tokenizer.encode, req.prompt or "", req.add_special_tokens)
        # a long prompt's ids: msgspec encodes them ~20x faster than json, on the event loop
        return web.Response(body=msgspec.json.encode({"tokens": ids, "count": len(ids),
                                                      "max_model_len": self.info.max_model_len}),
                            content_type="application/json")

    async def detokenize(self, request: web.Request) -> web.Response:
        req: DetokenizeRequest = decode_body(await request.read(), DetokenizeRequest)
        self.processor.check_model(req.model)
        vocab = self.info.vocab_size
        if any(not 0 <= t < vocab for t in req.tokens):
            raise RequestError(f"token ids must be in [0, {vocab})")
        return web.json_response({"prompt": self.tokenizer.decode(req.tokens)})


_encode = R.encode  # response bodies: typed structs (components/responses.py) encoded once, by msgspec


def _floats(blob: bytes) -> array.array:
    """An embedding's little-endian float32 bytes as floats."""
    floats = array.array("f", blob)
    if sys.byteorder == "big":
        floats.byteswap()
    return floats


#: what a base64 embedding may be sent as (vLLM's ``embed_dtype``, but for its fp8 ones)
EMBED_DTYPES = ("float32", "float16", "bfloat16")


def _as_dtype(blob: bytes, dtype: str, endianness: str) -> bytes:
    """An embedding's little-endian float32 bytes as ``dtype`` (float16 and bfloat16 rounded to
    nearest, ties to even, as torch rounds them) in the byte order asked (native: this host's)."""
    import numpy as np

    if dtype == "float32" and endianness in ("little", "native") and sys.byteorder == "little":
        return blob
    x = np.frombuffer(blob, dtype="<f4")
    if dtype == "float16":
        out = x.astype("<f2")
    elif dtype == "bfloat16":
        bits = x.view("<u4").astype(np.uint64)
        out = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype("<u2")
    else:
        out = x
    big = endianness == "big" or (endianness == "native" and sys.byteorder == "big")
    return out.astype(out.dtype.newbyteorder(">" if big else "<")).tobytes()


def _score_texts(value, name: str) -> list[str]:
    """One side of a score or rerank request: a text or a list of texts (not empty)."""
    texts = [value] if isinstance(value, str) else value
    if not texts:
        raise RequestError(f"{name} is empty", param=name)
    return texts


def _json(obj, status: int = 200) -> web.Response:
    return web.Response(body=_encode(obj), status=status, content_type="application/json")


def _optional_bool(raw: msgspec.Raw, name: str) -> bool | None:
    value = msgspec.json.decode(raw)
    if value is not None and not isinstance(value, bool):
        raise RequestError(f"{name} must be true or false", param=name)
    return value


def error_response(message: str, status: int, type: str, code: str | int | None = None,
                   param: str | None = None) -> web.Response:
    return _json(R.ErrorBody(R.ErrorDetail(message, type, param, code if code is not None else status)), status)
