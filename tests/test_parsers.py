"""The reasoning and tool-call parsers (``components/parsers.py``) on texts: what each reads out of
a whole output, and that any split of the same output into streamed chunks (one character at a
time, at every point, at random) reads out the same."""

from __future__ import annotations

import json
import random

import pytest

from dyn_actor.components.parsers import (
    HermesReader,
    Llama3JsonReader,
    OutputReader,
    Piece,
    ReasoningReader,
    read_all,
    thinks_after,
)


def _reader(reasoning=None, tools=None, names=None) -> OutputReader:
    r = None if reasoning is None else ReasoningReader(reasoning)
    t = None if tools is None else {"hermes": HermesReader, "llama3_json": Llama3JsonReader}[tools](names)
    return OutputReader(r, t)


def _streamed(make, chunks: list[str]) -> Piece:
    """As the frontend reads a stream: each chunk with ``step``, the last one finishing."""
    reader = make()
    out = Piece()
    for i, c in enumerate(chunks or [""]):
        p = reader.step(c, i == max(len(chunks), 1) - 1)
        out.reasoning += p.reasoning
        out.content += p.content
        out.calls += p.calls
    return out


def _splits(text: str, seed: int = 0):
    yield list(text)  # a character a chunk
    for i in range(len(text) + 1):  # every cut in two
        yield [text[:i], text[i:]]
    rng = random.Random(seed)
    for _ in range(20):
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(1, 6))))
        yield [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]


def _plain(p: Piece):
    return p.reasoning, p.content, [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in p.calls]


REASONING = [
    # (thinking at the start, output, reasoning, content)
    (True, "<think>\nStep one.\n</think>\n\nThe answer.", "\nStep one.\n", "\n\nThe answer."),
    (True, "Step one.</think>The answer.", "Step one.", "The answer."),  # the template wrote <think>
    (True, "Still thinking, cut short", "Still thinking, cut short", ""),
    (True, "<think>", "", ""),
    (True, "", "", ""),
    (True, "<thin", "<thin", ""),
    (True, "a < b </think> so <think> is text", "a < b ", " so <think> is text"),
    (False, "The answer, no thinking.", "", "The answer, no thinking."),
    (False, "<think>why</think>because", "why", "because"),
    (False, "  <think>why</think>", "why", ""),
    (False, "<thing>", "", "<thing>"),
    (False, "not a tag: </think> here", "", "not a tag: </think> here"),
]


@pytest.mark.parametrize("thinking,text,reasoning,content", REASONING)
def test_reasoning_whole_and_streamed(thinking, text, reasoning, content):
    assert _plain(read_all(_reader(thinking), text)) == (reasoning, content, [])
    for chunks in _splits(text):
        assert _plain(_streamed(lambda: _reader(thinking), chunks)) == (reasoning, content, []), chunks


def test_thinks_after_the_prompt():
    assert thinks_after("assistant:<think>\n")
    assert not thinks_after("assistant:<think>\n\n</think>\n\n")  # Qwen3 with enable_thinking=False
    assert not thinks_after("assistant:")
    assert thinks_after("<think>a</think> user: b assistant: <think>")


CALL = '{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}'
HERMES = [
    # (output, content, calls)
    ("The weather is fine.", "The weather is fine.", []),
    (f"<tool_call>\n{CALL}\n</tool_call>", "", [("get_weather", {"city": "Paris", "days": 2})]),
    (f"Let me look.\n<tool_call>{CALL}</tool_call>\n<tool_call>"
     '{"name": "get_time", "arguments": {"tz": "UTC"}}</tool_call>\n',
     "Let me look.", [("get_weather", {"city": "Paris", "days": 2}), ("get_time", {"tz": "UTC"})]),
    (f"<tool_call>{CALL}", "", [("get_weather", {"city": "Paris", "days": 2})]),  # the end tag cut off
    ('<tool_call>{"name": "get_weather", "arguments": {"ci', '<tool_call>{"name": "get_weather", "arguments": {"ci',
     []),  # cut short: the text as written
    ("<tool_call>not json</tool_call> then text", "<tool_call>not json</tool_call> then text", []),
    ('<tool_call>{"arguments": {}}</tool_call>', '<tool_call>{"arguments": {}}</tool_call>', []),  # no name
    ('<tool_call>{"name": "get_time", "arguments": "{\\"tz\\": \\"CET\\"}"}</tool_call>', "",
     [("get_time", {"tz": "CET"})]),  # arguments as JSON text
    (f"<tool_call>{CALL}</tool_call>\nDone.", "\nDone.", [("get_weather", {"city": "Paris", "days": 2})]),
    ("a <tool_ca", "a <tool_ca", []),
    ("ends with space \n", "ends with space \n", []),
]


@pytest.mark.parametrize("text,content,calls", HERMES)
def test_hermes_whole_and_streamed(text, content, calls):
    assert _plain(read_all(_reader(tools="hermes"), text)) == ("", content, calls)
    for chunks in _splits(text):
        assert _plain(_streamed(lambda: _reader(tools="hermes"), chunks)) == ("", content, calls), chunks


def test_hermes_only_reads_calls_to_the_tools_given():
    text = f"<tool_call>{CALL}</tool_call>"
    assert _plain(read_all(_reader(tools="hermes", names=frozenset({"get_time"})), text)) == ("", text, [])
    assert _plain(read_all(_reader(tools="hermes", names=frozenset({"get_weather"})), text))[2]


LLAMA = [
    ('{"name": "get_weather", "parameters": {"city": "Oslo", "days": 1}}', "",
     [("get_weather", {"city": "Oslo", "days": 1})]),
    ('<|python_tag|>{"name": "get_time", "parameters": {"tz": "UTC"}}; {"name": "get_time", "parameters": {}}',
     "", [("get_time", {"tz": "UTC"}), ("get_time", {})]),
    ("The weather is fine.", "The weather is fine.", []),
    ('{"answer": 42}', '{"answer": 42}', []),  # JSON, not a call
    ('{"name": "get_time", "parameters": {"tz": ', '{"name": "get_time", "parameters": {"tz": ', []),  # cut short
    ("<|python", "<|python", []),
    ("  <b>", "  <b>", []),
]


@pytest.mark.parametrize("text,content,calls", LLAMA)
def test_llama3_json_whole_and_streamed(text, content, calls):
    assert _plain(read_all(_reader(tools="llama3_json"), text)) == ("", content, calls)
    for chunks in _splits(text):
        assert _plain(_streamed(lambda: _reader(tools="llama3_json"), chunks)) == ("", content, calls), chunks


BOTH = [
    (f"<think>I should call it.</think>\n\n<tool_call>\n{CALL}\n</tool_call>", "I should call it.", "",
     [("get_weather", {"city": "Paris", "days": 2})]),
    ("Hmm.</think>It is sunny.", "Hmm.", "It is sunny.", []),
    (f"Thinking <tool_call>{CALL}</tool_call> still", f"Thinking <tool_call>{CALL}</tool_call> still", "", []),
]


@pytest.mark.parametrize("text,reasoning,content,calls", BOTH)
def test_reasoning_then_tool_calls(text, reasoning, content, calls):
    assert _plain(read_all(_reader(True, "hermes"), text)) == (reasoning, content, calls)
    for chunks in _splits(text):
        assert _plain(_streamed(lambda: _reader(True, "hermes"), chunks)) == (reasoning, content, calls), chunks


def test_each_call_has_its_own_id():
    p = read_all(_reader(tools="hermes"), f"<tool_call>{CALL}</tool_call><tool_call>{CALL}</tool_call>")
    assert len({c["id"] for c in p.calls}) == 2 and all(c["type"] == "function" for c in p.calls)


PYTHONIC = [
    ('[get_weather(city="Paris", days=2)]', "", [("get_weather", {"city": "Paris", "days": 2})]),
    ("[get_time(tz='UTC'), get_time()]", "", [("get_time", {"tz": "UTC"}), ("get_time", {})]),
    ('<|python_start|>[get_time(tz="CET")]<|python_end|>', "", [("get_time", {"tz": "CET"})]),  # Llama 4's tags
    ('[get_weather(city="Oslo", days=[1, 2], opts={"a": None, "b": True})]', "",
     [("get_weather", {"city": "Oslo", "days": [1, 2], "opts": {"a": None, "b": True}})]),
    ("The weather is fine.", "The weather is fine.", []),
    ("[1, 2, 3]", "[1, 2, 3]", []),  # a list, not calls
    ('[get_time("UTC")]', '[get_time("UTC")]', []),  # a positional argument
    ("[get_time(tz=os.system('x'))]", "[get_time(tz=os.system('x'))]", []),  # not a literal: never run
    ("[get_time(tz={1, 2})]", "[get_time(tz={1, 2})]", []),  # no JSON for a set
    ('[get_weather(city="Pa', '[get_weather(city="Pa', []),  # cut short
]


@pytest.mark.parametrize("text,content,calls", PYTHONIC)
def test_pythonic_whole_and_streamed(text, content, calls):
    from dyn_actor.components.parsers import PythonicReader

    def make():
        return OutputReader(None, PythonicReader(None))

    assert _plain(read_all(make(), text)) == ("", content, calls)
    for chunks in _splits(text):
        assert _plain(_streamed(make, chunks)) == ("", content, calls), chunks
