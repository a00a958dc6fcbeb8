"""The OpenAI response bodies as typed structs, encoded once by ``msgspec.json`` (``encode``).

Field order and presence are those of the OpenAI API (and of vLLM's server): ``logprobs`` and
``finish_reason`` are always there (``null`` when absent); a field declared ``UNSET`` by
default is left out unless set (``stop_reason`` on a stream's last chunk of a choice, a chat
delta's ``role`` / ``content``). Logprobs stay plain dicts (their shapes differ between the two
APIs and are built by the processor).
"""

from __future__ import annotations

from typing import Any

import msgspec
from msgspec import UNSET, UnsetType

encode = msgspec.json.Encoder().encode


class PromptTokensDetails(msgspec.Struct):
    cached_tokens: int


class Usage(msgspec.Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


def usage(prompt: int, completion: int, cached: int) -> Usage:
    return Usage(prompt, completion, prompt + completion, PromptTokensDetails(cached))


# ----------------------------------------------------------------- complete bodies
class CompletionChoice(msgspec.Struct):
    index: int
    text: str
    logprobs: dict[str, Any] | None
    finish_reason: str | None
    stop_reason: int | str | None = None
    prompt_logprobs: list[dict[str, Any] | None] | UnsetType = UNSET  # vLLM's, when asked


class ChatMessage(msgspec.Struct):
    role: str
    content: str | None  # None where the message is tool calls
    tool_calls: list[dict[str, Any]] | UnsetType = UNSET
    reasoning: str | None | UnsetType = UNSET  # with --reasoning-parser (vLLM's field)


class ChatChoice(msgspec.Struct):
    index: int
    message: ChatMessage
    logprobs: dict[str, Any] | None
    finish_reason: str | None
    stop_reason: int | str | None = None


class CompletionResponse(msgspec.Struct):
    id: str
    object: str
    created: int
    model: str
    choices: list[CompletionChoice] | list[ChatChoice]
    usage: Usage
    prompt_logprobs: list[dict[str, Any] | None] | UnsetType = UNSET  # chat: vLLM's, when asked


class EmbeddingData(msgspec.Struct):
    index: int
    object: str
    embedding: list[float] | str  # floats, or with encoding_format base64 their float32 bytes


class EmbeddingUsage(msgspec.Struct):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(msgspec.Struct):
    id: str
    object: str
    created: int
    model: str
    data: list[EmbeddingData]
    usage: EmbeddingUsage


class ScoreData(msgspec.Struct):
    index: int
    object: str
    score: float


class ScoreUsage(msgspec.Struct):
    prompt_tokens: int
    total_tokens: int
    completion_tokens: int


class ScoreResponse(msgspec.Struct):
    id: str
    object: str
    created: int
    model: str
    data: list[ScoreData]
    usage: ScoreUsage


class ClassificationData(msgspec.Struct):
    index: int
    label: str | None
    probs: list[float]
    num_classes: int


class ClassificationResponse(msgspec.Struct):
    id: str
    object: str
    created: int
    model: str
    data: list[ClassificationData]
    usage: ScoreUsage


class RerankDocument(msgspec.Struct):
    text: str


class RerankResult(msgspec.Struct):
    index: int
    document: RerankDocument
    relevance_score: float


class RerankResponse(msgspec.Struct):
    id: str
    model: str
    usage: EmbeddingUsage
    results: list[RerankResult]


# ------------------------------------------------------------------ stream chunks
class CompletionChunkChoice(msgspec.Struct):
    index: int
    text: str
    logprobs: dict[str, Any] | None
    finish_reason: str | None
    stop_reason: int | str | None | UnsetType = UNSET


class ChatDelta(msgspec.Struct):
    role: str | UnsetType = UNSET
    content: str | UnsetType = UNSET
    tool_calls: list[dict[str, Any]] | UnsetType = UNSET  # each with its "index"; id/type/name in the first
    reasoning: str | UnsetType = UNSET


class ChatChunkChoice(msgspec.Struct):
    index: int
    delta: ChatDelta
    logprobs: dict[str, Any] | None
    finish_reason: str | None
    stop_reason: int | str | None | UnsetType = UNSET


class Chunk(msgspec.Struct):
    """One SSE event's body; ``usage`` only on the last one (``stream_options.include_usage``)."""

    id: str
    object: str
    created: int
    model: str
    choices: list[CompletionChunkChoice] | list[ChatChunkChoice]
    usage: Usage | UnsetType = UNSET


# ------------------------------------------------------------------------ errors
class ErrorDetail(msgspec.Struct):
    message: str
    type: str
    param: str | None
    code: str | int | None


class ErrorBody(msgspec.Struct):
    error: ErrorDetail
