"""OpenAI's Responses API (``POST /v1/responses``) on the chat machinery: a request becomes a chat
request (its input items the conversation, ``instructions`` a system message first, function tools
and ``text.format`` as the chat fields), runs as one, and its answer is written as Responses output
items: a ``reasoning`` item (with ``--reasoning-parser``), a ``message`` with ``output_text``, and
``function_call`` items, streamed as the API's typed events or whole.

Stateless, as the server is: ``previous_response_id``, ``conversation``, ``background`` and stored
prompts are refused with a 400, and responses are not stored (``store`` answers false). Only
function tools are served (no hosted tools). torch-free: the frontend imports it.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any

import msgspec

from dyn_actor.components.openai_api import (
    I32,
    NULL,
    ChatCompletionRequest,
    ChatMessage,
    Count,
    Name,
    RequestError,
    Seed,
)

TEXT_PARTS = ("input_text", "output_text", "text")


class ResponsesRequest(msgspec.Struct, kw_only=True):
    input: str | list[dict[str, Any]]
    model: Name | None = None
    instructions: str | None = None
    max_output_tokens: Annotated[int, msgspec.Meta(ge=1, le=I32)] | None = None
    temperature: Annotated[float, msgspec.Meta(ge=0.0, le=100.0)] | None = None
    top_p: Annotated[float, msgspec.Meta(gt=0.0, le=1.0)] | None = None
    stream: bool = False
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    text: dict[str, Any] | None = None
    reasoning: dict[str, Any] | None = None  # echoed; the effort is not a knob here
    include: list[str] | None = None  # extra data asked for where available (none is produced)
    metadata: dict[str, str] | None = None
    store: bool | None = None
    truncation: str | None = None
    user: Name | None = None
    presence_penalty: Annotated[float, msgspec.Meta(ge=-2.0, le=2.0)] | None = None
    frequency_penalty: Annotated[float, msgspec.Meta(ge=-2.0, le=2.0)] | None = None
    top_logprobs: Annotated[int, msgspec.Meta(ge=0, le=20)] | None = None
    service_tier: str | None = None
    # stateful or hosted features this server does not have: a 400 when given
    previous_response_id: str | None = None
    conversation: msgspec.Raw = NULL
    background: bool | None = None
    prompt: msgspec.Raw = NULL
    # vLLM's extras, as on chat completions
    top_k: Annotated[int, msgspec.Meta(ge=-1, le=I32)] | None = None
    min_p: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] | None = None
    repetition_penalty: Annotated[float, msgspec.Meta(gt=0.0, le=100.0)] | None = None
    seed: Seed | None = None
    ignore_eos: bool = False
    min_tokens: Count = 0
    logit_bias: msgspec.Raw = NULL
    skip_special_tokens: bool = True
    include_reasoning: bool = True
    chat_template_kwargs: dict[str, Any] | None = None
    structured_outputs: msgspec.Raw = NULL  # vLLM's: regex, choice, grammar, json (not with text.format)


def _refuse(req: ResponsesRequest) -> None:
    if req.previous_response_id is not None or bytes(req.conversation) != b"null":
        name = "previous_response_id" if req.previous_response_id is not None else "conversation"
        raise RequestError(f"{name} is not supported: this server keeps no responses (send the whole input)",
                           param=name, code="unsupported_parameter")
    if req.background:
        raise RequestError("background responses are not supported", param="background", code="unsupported_parameter")
    if bytes(req.prompt) != b"null":
        raise RequestError("stored prompts are not supported", param="prompt", code="unsupported_parameter")
    if req.top_logprobs:
        raise RequestError("top_logprobs is not supported on /v1/responses (use /v1/chat/completions)",
                           param="top_logprobs", code="unsupported_parameter")
    if req.truncation not in (None, "disabled"):
        raise RequestError('truncation "auto" is not supported: a prompt longer than the context is a 400',
                           param="truncation", code="unsupported_parameter")


def _text(content: Any, where: str) -> str:
    """A message's or an output's content as text: a string, or text parts."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise RequestError(f"{where}.content must be a string or a list of text parts", param="input")
    out = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") not in TEXT_PARTS or not isinstance(part.get("text"), str):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise RequestError(f"{where}.content[{j}]: parts of type {kind!r} are not supported (only text)",
                               param="input")
        out.append(part["text"])
    return "".join(out)


def _messages(req: ResponsesRequest) -> list[ChatMessage]:
    """The conversation: ``instructions`` as a system message, then each input item."""
    items = [{"role": "user", "content": req.input}] if isinstance(req.input, str) else req.input
    if not items:
        raise RequestError("input is empty", param="input")
    msgs: list[dict[str, Any]] = []
    if req.instructions:
        msgs.append({"role": "system", "content": req.instructions})
    reasoning = None  # a reasoning item's text, for the assistant turn that follows it
    for i, it in enumerate(items):
        where = f"input[{i}]"
        if not isinstance(it, dict):
            raise RequestError(f"{where} must be an object", param="input")
        kind = it.get("type", "message")
        if kind == "message":
            role = it.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise RequestError(f"{where}.role must be user, system, developer or assistant", param="input")
            msg = {"role": role, "content": _text(it.get("content"), where)}
            if role == "assistant" and reasoning is not None:
                msg["reasoning"], reasoning = reasoning, None
            msgs.append(msg)
        elif kind == "function_call":
            call_id, name, args = it.get("call_id"), it.get("name"), it.get("arguments")
            if not all(isinstance(x, str) for x in (call_id, name, args)):
                raise RequestError(f"{where}: a function_call item needs call_id, name and arguments (strings)",
                                   param="input")
            call = {"id": call_id, "type": "function", "function": {"name": name, "arguments": args}}
            last = msgs[-1] if msgs else None
            if last is not None and last["role"] == "assistant" and "tool_calls" in last:
                last["tool_calls"].append(call)
            else:
                msgs.append({"role": "assistant", "content": None, "tool_calls": [call]})
                if reasoning is not None:
                    msgs[-1]["reasoning"], reasoning = reasoning, None
        elif kind == "function_call_output":
            call_id = it.get("call_id")
            if not isinstance(call_id, str):
                raise RequestError(f"{where}: a function_call_output item needs its call_id", param="input")
            msgs.append({"role": "tool", "tool_call_id": call_id, "content": _text(it.get("output"), where)})
        elif kind == "reasoning":
            parts = (it.get("content") or []) + (it.get("summary") or [])
            reasoning = "".join(p.get("text", "") for p in parts if isinstance(p, dict))
        else:
            raise RequestError(f"{where}: items of type {str(kind)[:32]!r} are not supported (message, "
                               "function_call, function_call_output, reasoning)", param="input")
    out = []
    for m in msgs:
        calls = m.pop("tool_calls", None)
        raw = msgspec.Raw(msgspec.json.encode(calls)) if calls else NULL
        out.append(ChatMessage(m["role"], m["content"], tool_calls=raw, tool_call_id=m.get("tool_call_id"),
                               reasoning=m.get("reasoning")))
    return out


def _tools(req: ResponsesRequest) -> tuple[msgspec.Raw, msgspec.Raw]:
    """``tools`` and ``tool_choice`` in the chat shape."""
    tools = NULL
    if req.tools:
        chat = []
        for i, t in enumerate(req.tools):
            if not isinstance(t, dict) or t.get("type") != "function":
                kind = t.get("type") if isinstance(t, dict) else None
                raise RequestError(f"tools[{i}]: only function tools are served (got {str(kind)[:32]!r})",
                                   param="tools", code="unsupported_parameter")
            chat.append({"type": "function", "function": {k: t[k] for k in ("name", "description", "parameters")
                                                          if k in t}})
        tools = msgspec.Raw(msgspec.json.encode(chat))
    choice = req.tool_choice
    if isinstance(choice, dict):
        if choice.get("type") != "function" or not isinstance(choice.get("name"), str):
            raise RequestError('tool_choice must be "none", "auto", "required" or {"type": "function", "name": ...}',
                               param="tool_choice")
        choice = {"type": "function", "function": {"name": choice["name"]}}
    return tools, NULL if choice is None else msgspec.Raw(msgspec.json.encode(choice))


def _format(req: ResponsesRequest) -> msgspec.Raw:
    """``text.format`` as chat's ``response_format``."""
    fmt = (req.text or {}).get("format")
    if fmt is None or (isinstance(fmt, dict) and fmt.get("type") == "text"):
        return NULL
    if not isinstance(fmt, dict):
        raise RequestError("text.format must be an object", param="text")
    if fmt.get("type") == "json_schema":
        if not isinstance(fmt.get("schema"), dict):
            raise RequestError("text.format json_schema needs its schema (an object)", param="text")
        schema = {"name": fmt.get("name", "output"), "schema": fmt.get("schema"), "strict": fmt.get("strict")}
        return msgspec.Raw(msgspec.json.encode({"type": "json_schema", "json_schema": schema}))
    if fmt.get("type") == "json_object":
        return msgspec.Raw(b'{"type": "json_object"}')
    raise RequestError(f"text.format of type {str(fmt.get('type'))[:32]!r} is not supported (text, json_schema, "
                       "json_object)", param="text")


def chat_request(req: ResponsesRequest) -> ChatCompletionRequest:
    """The chat request that runs a Responses request."""
    _refuse(req)
    tools, choice = _tools(req)
    return ChatCompletionRequest(
        messages=_messages(req), model=req.model, max_tokens=req.max_output_tokens, temperature=req.temperature,
        top_p=req.top_p, stream=req.stream, seed=req.seed, presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty, repetition_penalty=req.repetition_penalty, logit_bias=req.logit_bias,
        top_k=req.top_k, min_p=req.min_p, ignore_eos=req.ignore_eos, min_tokens=req.min_tokens,
        skip_special_tokens=req.skip_special_tokens, response_format=_format(req),
        structured_outputs=req.structured_outputs, tools=tools, tool_choice=choice,
        parallel_tool_calls=msgspec.Raw(b"true" if req.parallel_tool_calls else b"false"),
        include_reasoning=req.include_reasoning, chat_template_kwargs=req.chat_template_kwargs)


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class ResponseBuilder:
    """One response's output items as the text arrives: reasoning, answer text, function calls (each
    item closed when another kind begins), and the stream events that tell it, in order. A whole
    answer goes through the same calls; its events are dropped."""

    def __init__(self, req: ResponsesRequest, model: str, stream: bool) -> None:
        self.req, self.model, self.stream = req, model, stream
        self.id = _id("resp")
        self.created = int(time.time())
        self.output: list[dict[str, Any]] = []
        self.events: list[bytes] = []  # encoded SSE events not yet sent
        self._seq = 0
        self._open: dict[str, Any] | None = None  # the item being written
        self.reasoning_tokens = 0

    # ------------------------------------------------------------- events
    def _event(self, type_: str, **fields: Any) -> None:
        if self.stream:
            body = msgspec.json.encode({"type": type_, "sequence_number": self._seq, **fields})
            self.events.append(b"event: " + type_.encode() + b"\ndata: " + body + b"\n\n")
        self._seq += 1

    def start(self) -> None:
        snapshot = self.response("in_progress")
        self._event("response.created", response=snapshot)
        self._event("response.in_progress", response=snapshot)

    # -------------------------------------------------------------- items
    def _begin(self, kind: str, **fields: Any) -> dict[str, Any]:
        if self._open is not None and self._open["type"] == kind and kind != "function_call":
            return self._open
        self._close()
        if kind == "message":
            item = {"type": "message", "id": _id("msg"), "status": "in_progress", "role": "assistant", "content": []}
        elif kind == "reasoning":
            item = {"type": "reasoning", "id": _id("rs"), "summary": [], "content": [], "status": "in_progress"}
        else:
            item = {"type": "function_call", "id": _id("fc"), "status": "in_progress", "arguments": "", **fields}
        index = len(self.output)
        self.output.append(item)
        self._open = item
        self._event("response.output_item.added", output_index=index, item=dict(item, content=[]) if
                    "content" in item else dict(item))
        if kind in ("message", "reasoning"):
            part = {"type": "output_text", "text": "", "annotations": []} if kind == "message" else \
                {"type": "reasoning_text", "text": ""}
            item["content"].append(part)
            self._event("response.content_part.added", item_id=item["id"], output_index=index, content_index=0,
                        part=dict(part))
        return item

    def _close(self, status: str = "completed") -> None:
        item, self._open = self._open, None
        if item is None:
            return
        index = len(self.output) - 1  # the open item is always the last
        item["status"] = status
        if item["type"] in ("message", "reasoning"):
            part = item["content"][0]
            done = "response.output_text.done" if item["type"] == "message" else "response.reasoning_text.done"
            extra = {"logprobs": []} if item["type"] == "message" else {}
            self._event(done, item_id=item["id"], output_index=index, content_index=0, text=part["text"], **extra)
            self._event("response.content_part.done", item_id=item["id"], output_index=index, content_index=0,
                        part=part)
        else:
            self._event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                        arguments=item["arguments"])
        self._event("response.output_item.done", output_index=index, item=item)

    def reasoning(self, text: str) -> None:
        if not text:
            return
        item = self._begin("reasoning")
        item["content"][0]["text"] += text
        self._event("response.reasoning_text.delta", item_id=item["id"], output_index=len(self.output) - 1,
                    content_index=0, delta=text)

    def text(self, text: str) -> None:
        if not text:
            return
        item = self._begin("message")
        item["content"][0]["text"] += text
        self._event("response.output_text.delta", item_id=item["id"], output_index=len(self.output) - 1,
                    content_index=0, delta=text, logprobs=[])

    def arguments(self, name: str, text: str) -> None:
        """A forced call's arguments as they come (one call: the item stays open)."""
        item = self._open if self._open is not None and self._open["type"] == "function_call" else \
            self._begin("function_call", call_id=_id("call"), name=name)
        if text:
            item["arguments"] += text
            self._event("response.function_call_arguments.delta", item_id=item["id"],
                        output_index=len(self.output) - 1, delta=text)

    def call(self, call: dict[str, Any]) -> None:
        """A whole call (chat's ``{"id", "function": {"name", "arguments"}}``) as one item."""
        fn = call["function"]
        self._begin("function_call", call_id=call.get("id") or _id("call"), name=fn["name"])
        self.arguments(fn["name"], fn["arguments"])
        self._close()

    # ------------------------------------------------------------- the end
    def finish(self, finish_reason: str | None, prompt_tokens: int, output_tokens: int, cached: int) -> dict:
        """Close the last item; the final response (and its event)."""
        incomplete = finish_reason == "length"
        self._close("incomplete" if incomplete else "completed")
        usage = {"input_tokens": prompt_tokens, "input_tokens_details": {"cached_tokens": cached},
                 "output_tokens": output_tokens, "output_tokens_details": {"reasoning_tokens": self.reasoning_tokens},
                 "total_tokens": prompt_tokens + output_tokens}
        body = self.response("incomplete" if incomplete else "completed", usage)
        self._event("response.incomplete" if incomplete else "response.completed", response=body)
        return body

    def error(self, message: str) -> None:
        self._event("error", code="server_error", message=message, param=None)

    def response(self, status: str, usage: dict | None = None) -> dict[str, Any]:
        req = self.req
        return {
            "id": self.id, "object": "response", "created_at": self.created, "status": status,
            "completed_at": int(time.time()) if status == "completed" else None,
            "background": False, "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": req.instructions, "max_output_tokens": req.max_output_tokens, "model": self.model,
            "output": self.output if status != "in_progress" else [], "parallel_tool_calls": req.parallel_tool_calls,
            "previous_response_id": None, "reasoning": req.reasoning, "store": False,
            "temperature": req.temperature, "top_p": req.top_p,
            "text": req.text or {"format": {"type": "text"}},
            "tool_choice": req.tool_choice if req.tool_choice is not None else ("auto" if req.tools else "none"),
            "tools": req.tools or [], "truncation": "disabled", "usage": usage, "user": req.user,
            "metadata": req.metadata or {},
        }
