"""Tool calls on /v1/chat/completions, as vLLM serves them without a tool-call parser: the output is
held to a JSON schema made from the tools (a structured output), and read back as tool calls.

- ``tool_choice`` naming a function: the output is that function's arguments (its ``parameters``
  schema); the message carries one tool call, finish reason ``stop`` (as OpenAI answers a forced call).
- ``tool_choice: "required"``: the output is a JSON array of ``{"name", "parameters"}`` objects, one
  of the tools each (at most one with ``parallel_tool_calls: false``); the message carries them as
  tool calls, finish reason ``tool_calls``.
- ``"none"``: the tools are shown to the chat template only.
- ``"auto"`` (the default when tools are given): the model writes calls or not, in its own format,
  which the server's ``--tool-call-parser`` reads (``components/parsers.py``); without one, a 400
  that says so.

torch-free: the frontend imports it.
"""

from __future__ import annotations

import json
import re
from typing import Any

import msgspec

from dyn_actor.components import responses as R
from dyn_actor.components.openai_api import RequestError
from dyn_actor.components.parsers import new_call_id
from dyn_actor.protocol import StructuredOutput

_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")


class ToolPlan(msgspec.Struct):
    mode: str  # "named", "required" or "auto"
    spec: StructuredOutput | None  # what the output is held to (None for "auto")
    name: str | None = None  # the named function
    names: frozenset[str] = frozenset()  # "auto": the tools' names (a call to another is text)
    parallel: bool = True  # "auto": False keeps the first call only


def tool_dicts(raw: msgspec.Raw) -> list[dict[str, Any]]:
    """The request's ``tools`` (checked), as the chat template takes them; [] when none."""
    if bytes(raw) == b"null":
        return []
    try:
        tools = msgspec.json.decode(raw)
    except RecursionError:
        raise RequestError("tools is nested too deeply", param="tools") from None
    if not isinstance(tools, list):
        raise RequestError("tools must be a list", param="tools")
    names = set()
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(fn, dict):
            raise RequestError(f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{...}}}}", param="tools")
        name = fn.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise RequestError(f"tools[{i}].function.name must be 1-64 letters, digits, _, . or -", param="tools")
        if name in names:
            raise RequestError(f"tools[{i}]: the function {name!r} is given twice", param="tools")
        names.add(name)
        params = fn.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise RequestError(f"tools[{i}].function.parameters must be a JSON schema (an object)", param="tools")
    return tools


def plan_tools(tools: list[dict[str, Any]], tool_choice: msgspec.Raw, parallel: bool | None,
               parser: str | None = None) -> ToolPlan | None:
    """What ``tool_choice`` asks of the output (None: nothing, the text is free). ``parser``: the
    server's ``--tool-call-parser`` (None: "auto" is refused)."""
    choice: Any = None
    if bytes(tool_choice) != b"null":
        try:
            choice = msgspec.json.decode(tool_choice)
        except RecursionError:
            raise RequestError("tool_choice is nested too deeply", param="tool_choice") from None
    if not tools:
        if choice not in (None, "none"):
            raise RequestError("tool_choice needs tools", param="tool_choice")
        return None
    if choice is None:
        choice = "auto"
    if choice == "none":
        return None
    if choice == "auto":
        if parser is not None:
            return ToolPlan("auto", None, names=frozenset(t["function"]["name"] for t in tools),
                            parallel=parallel is not False)
        raise RequestError(
            'tool_choice "auto" (the default when tools are given) needs a parser for the model\'s own tool-call '
            'format: start the server with --tool-call-parser (hermes, llama3_json or pythonic), or ask for "required", '
            'name a function, or "none"', param="tool_choice", code="unsupported_parameter")
    functions = {t["function"]["name"]: t["function"] for t in tools}
    if choice == "required":
        items = [{"type": "object", "properties": {"name": {"enum": [name]}, "parameters": _params(fn)},
                  "required": ["name", "parameters"], "additionalProperties": False}
                 for name, fn in functions.items()]
        schema: dict[str, Any] = {"type": "array", "minItems": 1,
                                  "items": items[0] if len(items) == 1 else {"anyOf": items}}
        if parallel is False:
            schema["maxItems"] = 1
        return ToolPlan("required", _checked(StructuredOutput(json=json.dumps(schema))))
    name = choice.get("function", {}).get("name") if isinstance(choice, dict) and choice.get("type") == "function" \
        and isinstance(choice.get("function"), dict) else None
    if not isinstance(name, str):
        raise RequestError('tool_choice must be "none", "auto", "required" or {"type": "function", "function": '
                           '{"name": ...}}', param="tool_choice")
    if name not in functions:
        raise RequestError(f"tool_choice names {name[:64]!r}, which is not among the tools", param="tool_choice")
    return ToolPlan("named", _checked(StructuredOutput(json=json.dumps(_params(functions[name])))), name)


def _checked(spec: StructuredOutput) -> StructuredOutput:
    try:
        return spec.validate()
    except ValueError as e:  # the tools' schemas too long, say
        raise RequestError(f"tools: {e}", param="tools") from None


def _params(fn: dict[str, Any]) -> dict[str, Any]:
    return fn.get("parameters") or {"type": "object", "properties": {}}


def tool_calls(plan: ToolPlan, text: str) -> list[dict[str, Any]] | None:
    """The tool calls in a finished output (``{"id", "type", "function": {"name", "arguments"}}``),
    or None where the text is not a complete call (cut short by max_tokens or a stop string)."""
    if plan.mode == "named":
        return [_call(plan.name, text)]
    try:
        calls = json.loads(text)
    except ValueError:
        return None
    if not isinstance(calls, list) or not all(isinstance(c, dict) and "name" in c for c in calls):
        return None
    return [_call(c["name"], json.dumps(c.get("parameters", {}), ensure_ascii=False)) for c in calls]


class ToolStream:
    """One streamed choice's text so far, and its named call's id once sent."""

    __slots__ = ("text", "call_id")

    def __init__(self) -> None:
        self.text = ""
        self.call_id: str | None = None


def stream_delta(plan: ToolPlan, st: ToolStream, text: str, finished: bool,
                 reason: str | None) -> tuple[R.ChatDelta | None, str | None]:
    """A streamed chunk of a tool-call choice: a named call's arguments as they come (its id, type
    and name in the first); for "required", nothing (None) until the end, then every call at once (or
    the text, where it is not a complete array). Returns (delta, finish reason)."""
    st.text += text
    if plan.mode == "named":
        if not text:
            return R.ChatDelta(), reason
        if st.call_id is None:
            st.call_id = new_call_id()
            call = {"index": 0, "id": st.call_id, "type": "function", "function": {"name": plan.name, "arguments": text}}
        else:
            call = {"index": 0, "function": {"arguments": text}}
        return R.ChatDelta(tool_calls=[call]), reason
    if not finished:
        return None, reason
    calls = tool_calls(plan, st.text)
    if calls is None:
        return R.ChatDelta(content=st.text), reason
    return (R.ChatDelta(tool_calls=[{"index": i, **call} for i, call in enumerate(calls)]),
            "tool_calls" if reason == "stop" else reason)


def _call(name: str | None, arguments: str) -> dict[str, Any]:
    return {"id": new_call_id(), "type": "function", "function": {"name": name, "arguments": arguments}}


def template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Assistant tool calls as chat templates expect them: ``arguments`` as an object where it is
    JSON text of one (templates write ``arguments | tojson``), as vLLM hands them over."""
    out = []
    for m in messages:
        calls = m.get("tool_calls")
        if calls:
            fixed = []
            for c in calls:
                fn = dict(c.get("function") or {})
                if isinstance(fn.get("arguments"), str):
                    try:
                        fn["arguments"] = json.loads(fn["arguments"])
                    except ValueError:
                        pass
                fixed.append({**c, "function": fn})
            m = {**m, "tool_calls": fixed}
        out.append(m)
    return out
