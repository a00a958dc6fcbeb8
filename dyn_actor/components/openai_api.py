"""OpenAI request bodies as ``msgspec`` structs (validation happens in decoding) and their conversion
to engine ``SamplingParams``. Unknown fields are ignored, as OpenAI does, except those that would
change the result and are not implemented: those are refused with a 400."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Annotated, Any, Literal

import msgspec

from dyn_actor.protocol import MAX_BAD_WORDS, SamplingParams, StructuredOutput

MAX_N = 16
MAX_BEAM_WIDTH = 10  # 2 x width alternatives a step, within the 20 logprobs a request may ask


class RequestError(ValueError):
    """A 400 (or 404) for the client, with an OpenAI error type and code."""

    def __init__(self, message: str, status: int = 400, type: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.type, self.code, self.param = status, type, code, param


# Bounds of every field, checked while the body is decoded (a 400 naming the field). Integers that
# end up in a tensor or a generator fit 32 (token ids, counts) or 64 bits (seeds).
I32 = 2**31 - 1
Count = Annotated[int, msgspec.Meta(ge=0, le=I32)]
TokenId = Annotated[int, msgspec.Meta(ge=0, le=I32)]
Seed = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1 - MAX_N)]  # + the choice index stays in int64
Name = Annotated[str, msgspec.Meta(max_length=256)]
StopString = Annotated[str, msgspec.Meta(max_length=1024)]
MAX_STOP = 64
Side = Literal["left", "right"]
NULL = msgspec.Raw(b"null")  # a field given as null, or not given
MAX_STOP_TOKEN_IDS = 1024
MAX_ALLOWED_TOKEN_IDS = 1 << 20  # more than any vocabulary has
MAX_LOGPROBS = 20
ROLES = ("system", "developer", "user", "assistant", "tool")


class StreamOptions(msgspec.Struct):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class TextPart(msgspec.Struct):
    type: str
    text: str | None = None


class ChatMessage(msgspec.Struct):
    role: str
    content: str | list[TextPart] | None = None
    name: Name | None = None
    tool_calls: msgspec.Raw = NULL
    tool_call_id: str | None = None
    reasoning: str | None = None  # an earlier answer's reasoning (vLLM's field; reasoning_content its old name)
    reasoning_content: str | None = None


class _Common(msgspec.Struct, kw_only=True):
    model: Name | None = None
    max_tokens: Annotated[int, msgspec.Meta(ge=0, le=I32)] | None = None  # 0: completions with echo only
    temperature: Annotated[float, msgspec.Meta(ge=0.0, le=100.0)] | None = None
    top_p: Annotated[float, msgspec.Meta(gt=0.0, le=1.0)] | None = None
    n: Annotated[int, msgspec.Meta(ge=1, le=MAX_N)] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: StopString | Annotated[list[StopString], msgspec.Meta(max_length=MAX_STOP)] | None = None
    seed: Seed | None = None
    presence_penalty: Annotated[float, msgspec.Meta(ge=-2.0, le=2.0)] | None = None
    frequency_penalty: Annotated[float, msgspec.Meta(ge=-2.0, le=2.0)] | None = None
    repetition_penalty: Annotated[float, msgspec.Meta(gt=0.0, le=100.0)] | None = None
    logit_bias: msgspec.Raw = NULL
    user: Name | None = None
    # vLLM extras
    top_k: Annotated[int, msgspec.Meta(ge=-1, le=I32)] | None = None
    min_p: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] | None = None
    ignore_eos: bool = False
    min_tokens: Count = 0
    stop_token_ids: Annotated[list[TokenId], msgspec.Meta(max_length=MAX_STOP_TOKEN_IDS)] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    prompt_logprobs: Annotated[int, msgspec.Meta(ge=0, le=MAX_LOGPROBS)] | None = None
    allowed_token_ids: Annotated[list[TokenId], msgspec.Meta(max_length=MAX_ALLOWED_TOKEN_IDS)] | None = None
    # vLLM's: the prompt cut to this many tokens (-1: the context less one), its last ones unless
    # truncation_side is "right"
    truncate_prompt_tokens: Annotated[int, msgspec.Meta(ge=-1, le=I32)] | None = None
    truncation_side: Side | None = None
    return_tokens_as_token_ids: bool = False  # vLLM's: logprobs name tokens token_id:N
    # vLLM's beam search (components/beam_search.py): n beams; their rank divides a beam's
    # log-probability by its length to the power length_penalty
    use_beam_search: bool = False
    length_penalty: Annotated[float, msgspec.Meta(ge=-100.0, le=100.0)] = 1.0
    bad_words: Annotated[list[StopString], msgspec.Meta(max_length=MAX_BAD_WORDS)] = []
    # structured outputs (``parse_structured``): OpenAI's response_format, vLLM's guided_* and
    # structured_outputs; checked by hand for messages that name the field
    response_format: msgspec.Raw = NULL
    guided_json: msgspec.Raw = NULL
    guided_regex: msgspec.Raw = NULL
    guided_choice: msgspec.Raw = NULL
    guided_grammar: msgspec.Raw = NULL
    structured_outputs: msgspec.Raw = NULL
    # features this server does not implement: present (and not null) is a 400 naming them
    tools: msgspec.Raw = NULL
    tool_choice: msgspec.Raw = NULL
    functions: msgspec.Raw = NULL
    function_call: msgspec.Raw = NULL
    parallel_tool_calls: msgspec.Raw = NULL


class ChatCompletionRequest(_Common, kw_only=True):
    messages: Annotated[list[ChatMessage], msgspec.Meta(min_length=1)]
    max_completion_tokens: Annotated[int, msgspec.Meta(ge=1, le=I32)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, msgspec.Meta(ge=0, le=MAX_LOGPROBS)] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False  # vLLM's: the prompt ends inside the last message, which goes on
    chat_template_kwargs: dict[str, Any] | None = None  # more variables for the chat template (vLLM's field)
    include_reasoning: bool = True  # with --reasoning-parser: False leaves the reasoning out of the answer


class CompletionRequest(_Common, kw_only=True):
    # text, token ids, or a list of either (checked in prompt_list); no deeper nesting is decoded
    prompt: str | list[TokenId | str | list[TokenId]]
    logprobs: Annotated[int, msgspec.Meta(ge=0, le=MAX_LOGPROBS)] | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: Annotated[int, msgspec.Meta(ge=1, le=MAX_N)] | None = None


MAX_EMBEDDING_INPUTS = 2048  # OpenAI's limit on the inputs of one embeddings request


class EmbeddingRequest(msgspec.Struct, kw_only=True):
    """``/v1/embeddings``: OpenAI's fields, and vLLM's extras (a chat conversation as ``messages``,
    ``truncate_prompt_tokens``, ``add_special_tokens``, ``use_activation``/``normalize``)."""

    model: Name | None = None
    input: str | list[TokenId | str | list[TokenId]] | None = None
    messages: list[ChatMessage] | None = None  # vLLM: one conversation, rendered by the chat template
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, msgspec.Meta(ge=1, le=I32)] | None = None
    user: str | None = None
    truncate_prompt_tokens: Annotated[int, msgspec.Meta(ge=-1, le=I32)] | None = None
    truncation_side: Side | None = None  # which end truncate_prompt_tokens keeps: "right" (default) the start
    add_special_tokens: bool = True
    add_generation_prompt: bool = False
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    use_activation: bool | None = None  # vLLM's name for normalizing an embedding
    normalize: bool | None = None
    # vLLM's: the dtype and byte order of a base64 embedding (floats are floats either way)
    embed_dtype: str = "float32"
    endianness: Literal["native", "big", "little"] = "native"


ScoreText = Annotated[str, msgspec.Meta(max_length=1 << 20)]


class _ScoringRequest(msgspec.Struct, kw_only=True):
    """What vLLM's ``/score`` and ``/rerank`` share."""

    model: Name | None = None
    truncate_prompt_tokens: Annotated[int, msgspec.Meta(ge=-1, le=I32)] | None = None
    truncation_side: Side | None = None  # which end truncate_prompt_tokens keeps: "right" (default) the start
    # each query, each document cut to this many tokens first (0: not cut)
    max_tokens_per_query: Annotated[int, msgspec.Meta(ge=0, le=I32)] = 0
    max_tokens_per_doc: Annotated[int, msgspec.Meta(ge=0, le=I32)] = 0
    # a cross-encoder's: its score through the model's activation (false: the raw logit); with
    # --chat-template, the template's variables (``instruction`` is one of them)
    use_activation: bool | None = None
    instruction: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    user: str | None = None


class ScoreRequest(_ScoringRequest, kw_only=True):
    """vLLM's ``/score``: one pair of sides, under any of its names; each side a text or a list of texts."""

    text_1: ScoreText | list[ScoreText] | None = None
    text_2: ScoreText | list[ScoreText] | None = None
    queries: ScoreText | list[ScoreText] | None = None
    documents: ScoreText | list[ScoreText] | None = None
    items: ScoreText | list[ScoreText] | None = None
    data_1: ScoreText | list[ScoreText] | None = None
    data_2: ScoreText | list[ScoreText] | None = None


class ClassificationRequest(msgspec.Struct, kw_only=True):
    """vLLM's ``/classify``: each input's label probabilities from a sequence classifier."""

    input: str | list[TokenId | str | list[TokenId]]
    model: Name | None = None
    truncate_prompt_tokens: Annotated[int, msgspec.Meta(ge=-1, le=I32)] | None = None
    truncation_side: Side | None = None  # which end truncate_prompt_tokens keeps: "right" (default) the start
    add_special_tokens: bool = True
    use_activation: bool | None = None
    user: str | None = None


class RerankRequest(_ScoringRequest, kw_only=True):
    """vLLM's (Jina's, Cohere's) ``/rerank``."""

    query: ScoreText
    documents: ScoreText | list[ScoreText]
    top_n: Annotated[int, msgspec.Meta(ge=0, le=I32)] = 0


class TokenizeRequest(msgspec.Struct, kw_only=True):
    model: Name | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    tools: msgspec.Raw = NULL  # with messages: shown to the chat template, as on chat completions


class DetokenizeRequest(msgspec.Struct, kw_only=True):
    tokens: list[TokenId]
    model: Name | None = None


UNSUPPORTED = ("tools", "tool_choice", "functions", "function_call", "parallel_tool_calls")


CHAT_ONLY = ("tools", "tool_choice", "parallel_tool_calls")  # chat completions take these (components/tools.py)


def check_beam_search(req: ChatCompletionRequest | CompletionRequest, params: list[SamplingParams]) -> None:
    """A 400 for what beam search does not do here: stream, logprobs, echo, structured outputs or
    forced tool calls; and for more than ``MAX_BEAM_WIDTH`` beams (``n``)."""
    for given, name in ((req.stream, "stream"), (req.logprobs is not None and req.logprobs is not False, "logprobs"),
                        (req.prompt_logprobs is not None, "prompt_logprobs"), (getattr(req, "echo", False), "echo"),
                        (params[0].structured is not None, "structured outputs or forced tool calls")):
        if given:
            raise RequestError(f"use_beam_search does not go with {name}", param="use_beam_search")
    if req.n > MAX_BEAM_WIDTH:
        raise RequestError(f"use_beam_search takes n (the beam width) up to {MAX_BEAM_WIDTH}, got {req.n}", param="n")


def check_supported(req: _Common, chat: bool = False) -> None:
    """A 400 naming the first feature the request asks for that this server does not implement."""
    for name in UNSUPPORTED:
        if chat and name in CHAT_ONLY:
            continue
        raw = getattr(req, name)
        if bytes(raw) == b"null":
            continue
        if name == "tool_choice" and bytes(raw) == b'"none"':
            continue
        raise RequestError(f"{name} is not supported by this server", param=name, code="unsupported_parameter")
    if req.stream_options is not None and not req.stream:
        raise RequestError("stream_options is only allowed when stream is true", param="stream_options")


TEMPLATE_OWN = ("messages", "add_generation_prompt", "tools", "bos_token", "eos_token")


def template_kwargs(kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """``chat_template_kwargs`` checked: the names the server sets itself are refused."""
    if not kwargs:
        return {}
    taken = [k for k in kwargs if k in TEMPLATE_OWN]
    if taken:
        raise RequestError(f"chat_template_kwargs may not set {', '.join(taken)}: the server sets it (use the "
                           "request's own field)", param="chat_template_kwargs")
    return kwargs


def _json_field(raw: msgspec.Raw, name: str) -> Any:
    try:
        return msgspec.json.decode(raw)
    except RecursionError:
        raise RequestError(f"{name} is nested too deeply", param=name) from None


def _object(value: Any, name: str, what: str) -> dict:
    """An object given as such or as JSON text of one; a 400 naming ``what`` it must be otherwise."""
    if isinstance(value, str):
        try:
            value = msgspec.json.decode(value)
        except (msgspec.DecodeError, RecursionError):
            raise RequestError(f"{name} must be {what}: an object, or JSON text of one", param=name) from None
    if not isinstance(value, dict):
        raise RequestError(f"{name} must be {what} (an object), got {type(value).__name__}", param=name)
    return value


def _schema_text(schema: Any, name: str) -> str:
    """A JSON schema given as an object (or as JSON text of one), as JSON text."""
    return msgspec.json.encode(_object(schema, name, "a JSON schema")).decode()


def parse_structured(req: _Common) -> StructuredOutput | None:
    """The request's structured output, from whichever field asked for it: OpenAI's
    ``response_format`` (``text``, ``json_object``, ``json_schema``), vLLM's ``guided_json``,
    ``guided_regex``, ``guided_choice``, ``guided_grammar`` or ``structured_outputs``. More than
    one is a 400, as is a spec of the wrong shape; whether it compiles is the worker's check."""
    found: list[tuple[str, StructuredOutput]] = []
    if bytes(req.response_format) != b"null":
        rf = _json_field(req.response_format, "response_format")
        kind = rf.get("type") if isinstance(rf, dict) else None
        if kind == "json_object":
            found.append(("response_format", StructuredOutput(json_object=True)))
        elif kind == "json_schema":
            js = rf.get("json_schema")
            if not isinstance(js, dict) or "schema" not in js:
                raise RequestError("response_format json_schema needs json_schema.schema", param="response_format")
            found.append(("response_format", StructuredOutput(json=_schema_text(js["schema"], "response_format"))))
        elif kind == "structural_tag":
            found.append(("response_format", StructuredOutput(structural_tag=_structural_tag(rf, "response_format"))))
        elif kind != "text":
            raise RequestError("response_format.type must be text, json_object, json_schema or structural_tag",
                               param="response_format")
    if bytes(req.guided_json) != b"null":
        found.append(("guided_json", StructuredOutput(json=_schema_text(_json_field(req.guided_json, "guided_json"),
                                                                        "guided_json"))))
    for name, field in (("guided_regex", "regex"), ("guided_grammar", "grammar")):
        raw = getattr(req, name)
        if bytes(raw) != b"null":
            value = _json_field(raw, name)
            if not isinstance(value, str):
                raise RequestError(f"{name} must be a string", param=name)
            found.append((name, StructuredOutput(**{field: value})))
    if bytes(req.guided_choice) != b"null":
        found.append(("guided_choice", StructuredOutput(choice=_choices(_json_field(req.guided_choice, "guided_choice"),
                                                                        "guided_choice"))))
    if bytes(req.structured_outputs) != b"null":
        found.append(("structured_outputs", _structured_outputs(_json_field(req.structured_outputs,
                                                                            "structured_outputs"))))
    if not found:
        return None
    if len(found) > 1:
        raise RequestError(f"ask for one structured output at a time, got {', '.join(n for n, _ in found)}",
                           param=found[1][0])
    name, spec = found[0]
    try:
        return spec.validate()
    except ValueError as e:
        raise RequestError(str(e), param=name) from None


def _choices(value: Any, name: str) -> list[str]:
    if not isinstance(value, list) or not value or not all(isinstance(c, str) for c in value):
        raise RequestError(f"{name} must be a non-empty list of strings", param=name)
    return value


_STRUCTURED_KEYS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")


def _structural_tag(value: Any, name: str) -> str:
    """A structural tag (an object, or its JSON text, as vLLM's ``structured_outputs`` carries it)
    checked for its shape: ``structures`` (each a ``begin``, an object ``schema`` and an ``end``) with
    ``triggers``, or xgrammar's ``format`` object; whether it compiles is the worker's check."""
    value = _object(value, name, "a structural tag")
    if "structures" in value:
        st, trig = value.get("structures"), value.get("triggers")
        if not isinstance(st, list) or not st or not all(
                isinstance(s, dict) and isinstance(s.get("begin"), str) and isinstance(s.get("end"), str)
                and isinstance(s.get("schema"), dict) for s in st):
            raise RequestError(f"{name}: a structural tag's structures must be a non-empty list of {{begin, schema, "
                               "end}} (strings and a JSON schema object)", param=name)
        if not isinstance(trig, list) or not trig or not all(isinstance(t, str) and t for t in trig):
            raise RequestError(f"{name}: a structural tag's triggers must be a non-empty list of strings", param=name)
    elif not isinstance(value.get("format"), dict):
        raise RequestError(f"{name}: a structural tag has structures and triggers, or a format object", param=name)
    return msgspec.json.encode(value).decode()


def _structured_outputs(value: Any) -> StructuredOutput:
    """vLLM's ``structured_outputs`` object: one of json, regex, choice, grammar, json_object,
    structural_tag."""
    name = "structured_outputs"
    if not isinstance(value, dict):
        raise RequestError(f"{name} must be an object", param=name)
    given = {k: v for k, v in value.items() if v is not None and v is not False}
    # disable_fallback: there is one grammar backend here, nothing to fall back to
    unknown = sorted(set(given) - set(_STRUCTURED_KEYS) - {"disable_any_whitespace", "disable_fallback"})
    if unknown:
        raise RequestError(f"{name}: {', '.join(unknown)} is not supported by this server (only "
                           f"{', '.join(_STRUCTURED_KEYS)})", param=name, code="unsupported_parameter")
    spec = StructuredOutput(disable_any_whitespace=value.get("disable_any_whitespace") is True)
    if "json" in given:
        spec.json = _schema_text(given["json"], f"{name}.json")
    for key in ("regex", "grammar"):
        if key in given:
            if not isinstance(given[key], str):
                raise RequestError(f"{name}.{key} must be a string", param=name)
            setattr(spec, key, given[key])
    if "choice" in given:
        spec.choice = _choices(given["choice"], f"{name}.choice")
    if "structural_tag" in given:
        spec.structural_tag = _structural_tag(given["structural_tag"], f"{name}.structural_tag")
    if "json_object" in given:
        if given["json_object"] is not True:
            raise RequestError(f"{name}.json_object must be true or false", param=name)
        spec.json_object = True
    return spec


def check_messages(messages: list[ChatMessage]) -> None:
    """Roles this server can render, each message with text content (an assistant's tool calls may
    stand in for it)."""
    for i, m in enumerate(messages):
        if m.role not in ROLES:
            what = "function messages are" if m.role == "function" else f"the role {m.role[:32]!r} is"
            raise RequestError(f"messages[{i}]: {what} not supported by this server (roles: {', '.join(ROLES)})",
                               param="messages")
        calls = bytes(m.tool_calls) not in (b"null", b"[]")
        if calls and m.role != "assistant":
            raise RequestError(f"messages[{i}]: only assistant messages carry tool_calls", param="messages")
        if calls:
            try:
                value = msgspec.json.decode(m.tool_calls)
            except RecursionError:
                raise RequestError(f"messages[{i}].tool_calls is nested too deeply", param="messages") from None
            if not isinstance(value, list) or not all(
                    isinstance(c, dict) and isinstance(c.get("function"), dict) for c in value):
                raise RequestError(f"messages[{i}].tool_calls must be a list of {{\"function\": {{...}}}}",
                                   param="messages")
        if m.content is None and not calls:
            raise RequestError(f"messages[{i}] has no content", param="messages")


def decode_body(body: bytes, kind: type) -> Any:
    try:
        return msgspec.json.decode(body, type=kind)
    except msgspec.ValidationError as e:
        raise RequestError(f"invalid request: {e}", param=_field_of(e)) from None
    except msgspec.DecodeError as e:
        raise RequestError(f"the body is not valid JSON: {e}") from None
    except UnicodeDecodeError:
        raise RequestError("the body is not valid UTF-8") from None
    except RecursionError:
        raise RequestError("the body is nested too deeply") from None


def _field_of(e: msgspec.ValidationError) -> str | None:
    """The top-level field a validation error names (``... - at `$.top_k` ``), for ``param``."""
    text = str(e)
    at = text.rfind("`$.")
    if at < 0:
        return None
    name = text[at + 3 :].rstrip("`")
    for sep in ".[":
        name = name.split(sep, 1)[0]
    return name or None


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


_LOGIT_BIAS = msgspec.json.Decoder(dict[str, float] | None)


def parse_logit_bias(raw: msgspec.Raw) -> dict[int, float]:
    """OpenAI's ``logit_bias``: token ids (as JSON object keys) to a bias, clamped to [-100, 100] as
    vLLM does. A key that is not a token id, or a value that is not a finite number, is a 400."""
    try:
        given = _LOGIT_BIAS.decode(bytes(raw)) or {}
    except msgspec.ValidationError:
        raise RequestError("logit_bias must map token ids to numbers", param="logit_bias") from None
    out = {}
    for key, bias in given.items():
        k = key.strip()
        if not (k.isdigit() and k.isascii()) or len(k) > 10:
            raise RequestError(f"logit_bias keys must be token ids, got {key!r}", param="logit_bias")
        if not math.isfinite(bias):
            raise RequestError(f"logit_bias values must be finite numbers, got {bias} for {key!r}", param="logit_bias")
        out[int(k)] = min(100.0, max(-100.0, bias))
    return out


def sampling_params(req: _Common, max_tokens: int | None, logprobs: int | None, seed_offset: int = 0,
                    defaults: Mapping[str, Any] | None = None, prompt_logprobs: int | None = None) -> SamplingParams:
    """The engine's parameters for one choice of ``req``. What the request leaves unset (None) comes
    from ``defaults`` (the model's generation_config.json, ``loader.default_sampling``), then from
    the neutral values (temperature 1, top-p 1, no top-k, min-p or penalties)."""
    d = defaults or {}
    logit_bias = parse_logit_bias(req.logit_bias)
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    sp = SamplingParams(
        max_tokens=max_tokens,
        temperature=d.get("temperature", 1.0) if req.temperature is None else req.temperature,
        top_p=d.get("top_p", 1.0) if req.top_p is None else req.top_p,
        top_k=d.get("top_k", 0) if req.top_k is None else req.top_k,
        min_p=d.get("min_p", 0.0) if req.min_p is None else req.min_p,
        repetition_penalty=d.get("repetition_penalty", 1.0) if req.repetition_penalty is None else req.repetition_penalty,
        presence_penalty=d.get("presence_penalty", 0.0) if req.presence_penalty is None else req.presence_penalty,
        frequency_penalty=d.get("frequency_penalty", 0.0) if req.frequency_penalty is None else req.frequency_penalty,
        seed=None if req.seed is None else req.seed + seed_offset,
        stop=stop,
        stop_token_ids=list(req.stop_token_ids or []),
        include_stop_str_in_output=req.include_stop_str_in_output,
        ignore_eos=req.ignore_eos,
        min_tokens=req.min_tokens,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        skip_special_tokens=req.skip_special_tokens,
        logit_bias=logit_bias,
        allowed_token_ids=None if req.allowed_token_ids is None else list(dict.fromkeys(req.allowed_token_ids)),
        bad_words=list(dict.fromkeys(req.bad_words)),
        structured=parse_structured(req),
    )
    try:
        return sp.validate()
    except ValueError as e:
        raise RequestError(str(e)) from None


def truncated(ids: list[int], keep: int | None, side: str, limit: int, most: int) -> list[int]:
    """``ids`` cut to ``keep`` tokens (vLLM's ``truncate_prompt_tokens``: None keeps them all, -1
    means ``most``): the first ones (``side`` "right") or the last ("left"). A 400 where ``keep``
    is past the context length ``limit``."""
    if keep is None:
        return ids
    if keep > limit:
        raise RequestError(f"truncate_prompt_tokens ({keep}) exceeds the context length ({limit})",
                           param="truncate_prompt_tokens")
    keep = most if keep == -1 else keep
    if keep >= len(ids):
        return ids
    return ids[len(ids) - keep:] if side == "left" else ids[:keep]


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
