"""A chat model's own markup, read out of its output in the frontend: the reasoning a thinking
model writes between ``<think>`` and ``</think>`` (``--reasoning-parser``), and the tool calls a
model writes in its own format when ``tool_choice`` is ``"auto"`` (``--tool-call-parser``), as vLLM
serves them with the same flags.

Every reader takes the text as it streams (``feed``) and once more at the end (``finish``), so a
whole answer and a streamed one are read by the same code and come out the same. A tag may arrive
split over chunks (on a model whose tokenizer has no single token for it, one character at a time):
text that could be the start of a tag is held back until the next chunk tells.

Reasoning parsers:

- ``deepseek_r1``: the output opens with reasoning (the ``<think>`` is written by the model or by
  the chat template) up to ``</think>``; the rest is the answer. Without ``</think>`` (cut short), it
  is all reasoning.
- ``qwen3``: as ``deepseek_r1`` where the model thinks: its output opens with ``<think>``, or the
  prompt ends inside an open ``<think>`` (templates that start the thinking, or Qwen3's
  ``enable_thinking``). Otherwise the output is all answer.

Tool-call parsers:

- ``hermes`` (Hermes, Qwen 2.5/3): ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, as
  many as the model writes; the text around them is the content.
- ``llama3_json`` (Llama 3.1-3.3): an output that is a JSON object ``{"name": ..., "parameters":
  {...}}`` (optionally after ``<|python_tag|>``, several separated by ``;``) is tool calls; any other
  output is content.
- ``pythonic`` (Llama 3.2 and 4, and others prompted so): an output that is a Python list of calls,
  ``[get_weather(city="Paris"), get_time()]``, is tool calls; any other output is content.

A call that does not read as one (bad JSON, no name) stays in the content as the model wrote it.

torch-free: the frontend imports it.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

REASONING_PARSERS = ("deepseek_r1", "qwen3")
TOOL_PARSERS = ("hermes", "llama3_json", "pythonic")

THINK, END_THINK = "<think>", "</think>"


def new_call_id() -> str:
    return f"chatcmpl-tool-{uuid.uuid4().hex}"


def _tag_start(text: str, tag: str) -> int:
    """How many characters at the end of ``text`` could be the start of ``tag`` (held back)."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


@dataclass
class Piece:
    """What one chunk of output adds: reasoning, answer text, finished tool calls (each
    ``{"id", "type", "function": {"name", "arguments"}}``)."""

    reasoning: str = ""
    content: str = ""
    calls: list[dict[str, Any]] = field(default_factory=list)


def thinks_after(prompt_tail: str) -> bool:
    """Whether a prompt ending with this text leaves the model inside a ``<think>`` block."""
    return prompt_tail.rfind(THINK) > prompt_tail.rfind(END_THINK)


class ReasoningReader:
    """One choice's output, split into reasoning and answer as it streams. ``thinking``: whether the
    output starts inside the reasoning (before any ``<think>`` the model writes)."""

    def __init__(self, thinking: bool) -> None:
        self.thinking = thinking
        self.state = "lead"  # then "reasoning" or "content"
        self.pending = ""

    def feed(self, text: str) -> tuple[str, str]:
        """(reasoning, content) that this chunk adds."""
        self.pending += text
        if self.state == "lead":  # does the output open with <think>?
            head = self.pending.lstrip()
            if THINK.startswith(head):  # all of it could still be the tag: wait
                return "", ""
            if head.startswith(THINK):
                self.pending = head[len(THINK):]
                self.state = "reasoning"
            else:
                self.state = "reasoning" if self.thinking else "content"
        if self.state == "content":
            out, self.pending = self.pending, ""
            return "", out
        at = self.pending.find(END_THINK)
        if at != -1:
            reasoning, rest = self.pending[:at], self.pending[at + len(END_THINK):]
            self.pending, self.state = "", "content"
            return reasoning, rest
        keep = _tag_start(self.pending, END_THINK)
        out = self.pending[:len(self.pending) - keep]
        self.pending = self.pending[len(out):]
        return out, ""

    def finish(self) -> tuple[str, str]:
        rest, self.pending = self.pending, ""
        if self.state == "lead":  # the output was empty or a piece of "<think>"
            head = rest.lstrip()
            if head == THINK:
                return "", ""
            return (rest, "") if self.thinking else ("", rest)
        return (rest, "") if self.state == "reasoning" else ("", rest)


def _read_call(obj: Any, names: frozenset[str] | None) -> dict[str, Any] | None:
    """A tool call from the model's JSON object, or None where it is not one."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    if names is not None and obj["name"] not in names:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            json.loads(args)
        except ValueError:
            return None
    elif isinstance(args, dict):
        try:
            args = json.dumps(args, ensure_ascii=False)
        except (TypeError, ValueError):  # a value JSON has no form for (a Python set, bytes)
            return None
    else:
        return None
    return {"id": new_call_id(), "type": "function", "function": {"name": obj["name"], "arguments": args}}


class HermesReader:
    """``<tool_call>{json}</tool_call>`` blocks; the text around them is content. Whitespace
    before a call (or at the end, after one) is dropped: it is held back until text follows it."""

    START, END = "<tool_call>", "</tool_call>"

    def __init__(self, names: frozenset[str] | None = None) -> None:
        self.names = names
        self.in_call = False
        self.pending = ""
        self.called = False

    def feed(self, text: str) -> tuple[str, list[dict[str, Any]]]:
        # inside a call, its end tag can only be in (or reach into) the new text
        seen = max(0, len(self.pending) - len(self.END) + 1) if self.in_call else 0
        self.pending += text
        content, calls = "", []
        while True:
            if self.in_call:
                at = self.pending.find(self.END, seen)
                seen = 0
                if at == -1:
                    return content, calls
                body, self.pending = self.pending[:at], self.pending[at + len(self.END):]
                self.in_call = False
                call = self._call(body)
                if call is None:  # not a call: the model's text, as written
                    content += self.START + body + self.END
                else:
                    calls.append(call)
                continue
            at = self.pending.find(self.START)
            if at == -1:
                keep = _tag_start(self.pending, self.START)
                out = self.pending[:len(self.pending) - keep].rstrip()
                self.pending = self.pending[len(out):]
                return content + out, calls
            content += self.pending[:at].rstrip()
            self.pending = self.pending[at + len(self.START):]
            self.in_call = True

    def finish(self) -> tuple[str, list[dict[str, Any]]]:
        rest, self.pending = self.pending, ""
        if self.in_call:  # an unterminated last call: a call if its JSON is whole
            self.in_call = False
            call = self._call(rest)
            return ("", [call]) if call is not None else (self.START + rest, [])
        return ("" if self.called and not rest.strip() else rest), []

    def _call(self, body: str) -> dict[str, Any] | None:
        try:
            obj = json.loads(body)
        except ValueError:
            return None
        call = _read_call(obj, self.names)
        if call is not None:
            self.called = True
        return call


class Llama3JsonReader:
    """An output that opens with ``{`` (or ``<|python_tag|>``) is held to the end and read as JSON
    calls separated by ``;``; any other output streams as content."""

    TAG = "<|python_tag|>"
    OPEN: tuple[str, ...] = ("{", TAG)

    def __init__(self, names: frozenset[str] | None = None) -> None:
        self.names = names
        self.state = "lead"  # then "json" (held) or "content"
        self.pending = ""

    def feed(self, text: str) -> tuple[str, list[dict[str, Any]]]:
        self.pending += text
        if self.state == "lead":
            head = self.pending.lstrip()
            if not head or (self.TAG.startswith(head) and head != self.TAG):
                return "", []
            self.state = "json" if head.startswith(self.OPEN) else "content"
        if self.state == "json":
            return "", []
        out, self.pending = self.pending, ""
        return out, []

    def finish(self) -> tuple[str, list[dict[str, Any]]]:
        rest, self.pending = self.pending, ""
        if self.state != "json":
            return rest, []
        calls = self._calls(rest)
        return ("", calls) if calls else (rest, [])

    def _calls(self, text: str) -> list[dict[str, Any]] | None:
        text = text.strip()
        if text.startswith(self.TAG):
            text = text[len(self.TAG):].lstrip()
        decoder, calls, at = json.JSONDecoder(), [], 0
        while at < len(text):
            try:
                obj, end = decoder.raw_decode(text, at)
            except ValueError:
                return None
            call = _read_call(obj, self.names)
            if call is None:
                return None
            calls.append(call)
            at = end
            while at < len(text) and (text[at].isspace() or text[at] == ";"):
                at += 1
        return calls or None


class PythonicReader(Llama3JsonReader):
    """An output that opens with ``[`` (optionally inside Llama 4's ``<|python_start|>`` ...
    ``<|python_end|>``) is held to the end and read as a Python list of calls with keyword arguments
    of literal values, ``[get_weather(city="Paris", days=2), get_time()]``; any other output streams
    as content. Read with Python's own parser (``ast``), never evaluated."""

    TAG = "<|python_start|>"
    OPEN = ("[", TAG)

    def _calls(self, text: str) -> list[dict[str, Any]] | None:
        import ast

        text = text.strip()
        if text.startswith(self.TAG):
            text = text[len(self.TAG):].removesuffix("<|python_end|>").strip()
        try:
            tree = ast.parse(text, mode="eval").body
        except (SyntaxError, ValueError, RecursionError):
            return None
        if not isinstance(tree, ast.List) or not tree.elts:
            return None
        calls = []
        for node in tree.elts:
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name) or node.args:
                return None
            if any(k.arg is None for k in node.keywords):  # **kwargs
                return None
            try:
                args = {k.arg: ast.literal_eval(k.value) for k in node.keywords}
            except (ValueError, TypeError, SyntaxError, RecursionError):
                return None
            call = _read_call({"name": node.func.id, "arguments": args}, self.names)
            if call is None:
                return None
            calls.append(call)
        return calls


TOOL_READERS = {"hermes": HermesReader, "llama3_json": Llama3JsonReader, "pythonic": PythonicReader}


class OutputReader:
    """One chat choice's output through the server's parsers: the reasoning first, then the tool
    calls in what follows it. ``feed`` each streamed text, ``finish`` once."""

    def __init__(self, reasoning: ReasoningReader | None, tools: HermesReader | Llama3JsonReader | None) -> None:
        self.reasoning = reasoning
        self.tools = tools
        self.calls = 0  # tool calls read so far

    def feed(self, text: str) -> Piece:
        return self._read(text, False)

    def finish(self) -> Piece:
        return self._read("", True)

    def step(self, text: str, finished: bool) -> Piece:
        """A streamed chunk's text, and the end with it when it is the last."""
        piece = self.feed(text)
        if finished:
            end = self.finish()
            piece.reasoning += end.reasoning
            piece.content += end.content
            piece.calls += end.calls
        return piece

    def _read(self, text: str, end: bool) -> Piece:
        piece = Piece()
        content = text
        if self.reasoning is not None:
            piece.reasoning, content = self.reasoning.finish() if end else self.reasoning.feed(text)
        if self.tools is None:
            piece.content = content
            return piece
        if content:
            piece.content, piece.calls = self.tools.feed(content)
        if end:
            more, calls = self.tools.finish()
            piece.content += more
            piece.calls += calls
        self.calls += len(piece.calls)
        return piece


def read_all(reader: OutputReader, text: str) -> Piece:
    """A whole output through ``reader``."""
    a, b = reader.feed(text), reader.finish()
    return Piece(a.reasoning + b.reasoning, a.content + b.content, a.calls + b.calls)


@dataclass
class Reading:
    """How one request's chat choices are read: which parsers, and what goes in the answer."""

    reasoning: bool  # a reasoning parser reads the output
    thinking: bool  # the output starts inside the reasoning
    show_reasoning: bool  # the answer carries a "reasoning" field (include_reasoning)
    tools: str | None = None  # the tool-call parser ("auto" tool choice)
    names: frozenset[str] | None = None  # the tools a call may name
    parallel: bool = True  # False: the first call only

    def reader(self) -> OutputReader:
        return OutputReader(ReasoningReader(self.thinking) if self.reasoning else None,
                            TOOL_READERS[self.tools](self.names) if self.tools else None)

    def answered(self, piece: Piece, before: int) -> list[dict[str, Any]]:
        """The piece's calls that are answered (``before``: calls read before this piece): all, or
        with ``parallel_tool_calls: false`` the choice's first only."""
        return piece.calls if self.parallel else piece.calls[:max(0, 1 - before)]

    def calls(self, piece: Piece, before: int) -> list[dict[str, Any]]:
        """``answered``, each with its ``index`` in the choice, as a streamed delta carries them."""
        return [{"index": before + i, **c} for i, c in enumerate(self.answered(piece, before))]
