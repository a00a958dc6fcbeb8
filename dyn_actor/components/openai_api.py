"""OpenAI request bodies as ``msgspec`` structs (validation happens in decoding) and their conversion
to engine ``SamplingParams``. Unknown fields are ignored, as OpenAI does, except those that would
change the result and are not implemented: those are refused with a 400."""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from dyn_actor.engine.sampling import SamplingParams

MAX_N = 16


class RequestError(ValueError):
    """A 400 (or 404) for the client, with an OpenAI error type and code."""

    def __init__(self, message: str, status: int = 400, type: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.type, self.code, self.param = status, type, code, param


class StreamOptions(msgspec.Struct):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class TextPart(msgspec.Struct):
    type: str
    text: str | None = None


class ChatMessage(msgspec.Struct):
    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None


class _Common(msgspec.Struct, kw_only=True):
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # vLLM extras
    top_k: int | None = None
    min_p: float | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True


class ChatCompletionRequest(_Common, kw_only=True):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None


class CompletionRequest(_Common, kw_only=True):
    prompt: str | list[Any]  # text, token ids, or a list of either (checked in prompt_list)
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


class TokenizeRequest(msgspec.Struct, kw_only=True):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(msgspec.Struct, kw_only=True):
    tokens: list[int]
    model: str | None = None


def decode_body(body: bytes, kind: type) -> Any:
    try:
        return msgspec.json.decode(body, type=kind)
    except msgspec.ValidationError as e:
        raise RequestError(f"invalid request: {e}") from None
    except msgspec.DecodeError as e:
        raise RequestError(f"the body is not valid JSON: {e}") from None


def message_text(content: str | list[TextPart] | None) -> str | list[dict[str, str]]:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = []
    for p in content:
        if p.type != "text" or p.text is None:
            raise RequestError(f"content part of type {p.type!r} is not supported (only text)", param="messages")
        parts.append({"type": "text", "text": p.text})
    return parts


def sampling_params(req: _Common, max_tokens: int | None, logprobs: int | None, seed_offset: int = 0) -> SamplingParams:
    for name in ("presence_penalty", "frequency_penalty"):
        v = getattr(req, name)
        if v not in (None, 0, 0.0):
            raise RequestError(f"{name} is not supported by this server (only 0)", param=name)
    if req.repetition_penalty not in (None, 1, 1.0):
        raise RequestError("repetition_penalty is not supported by this server (only 1)", param="repetition_penalty")
    if req.logit_bias:
        raise RequestError("logit_bias is not supported by this server", param="logit_bias")
    if not 1 <= req.n <= MAX_N:
        raise RequestError(f"n must be between 1 and {MAX_N}, got {req.n}", param="n")
    if max_tokens is not None and max_tokens < 1:
        raise RequestError(f"max_tokens must be at least 1, got {max_tokens}", param="max_tokens")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    sp = SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=req.top_k or 0,
        min_p=req.min_p or 0.0,
        seed=None if req.seed is None else req.seed + seed_offset,
        stop=stop,
        stop_token_ids=list(req.stop_token_ids or []),
        include_stop_str_in_output=req.include_stop_str_in_output,
        ignore_eos=req.ignore_eos,
        min_tokens=req.min_tokens,
        logprobs=logprobs,
        skip_special_tokens=req.skip_special_tokens,
    )
    try:
        return sp.validate()
    except ValueError as e:
        raise RequestError(str(e)) from None


FinishReason = Literal["stop", "length", "abort"]


def prompt_list(prompt: str | list[Any]) -> list[str | list[int]]:
    """Normalise a completions ``prompt`` to a list of texts and token-id lists; 400 on anything else."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise RequestError("the prompt is empty", param="prompt")
    if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return [list(prompt)]
    out: list[str | list[int]] = []
    for p in prompt:
        if isinstance(p, str):
            out.append(p)
        elif isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            out.append(list(p))
        else:
            raise RequestError("prompt must be a string, a list of token ids, or a list of either", param="prompt")
    return out
