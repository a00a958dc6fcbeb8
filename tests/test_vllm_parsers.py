"""Our readers (``components/parsers.py``) against vLLM's own parsers of the same names, on the same
texts (skipped unless vLLM is installed; ``.ci/run``'s second pass runs it): the same reasoning,
content and tool calls, but for three differences (written down in docs/engine.md, asserted here)."""

from __future__ import annotations

import json
import os

import pytest

from dyn_actor.components.vllm_worker import patch_vllm_version

pytestmark = pytest.mark.vllm
patch_vllm_version()
if os.environ.get("DYN_REQUIRE_VLLM") == "1":
    import vllm  # noqa: F401
else:
    vllm = pytest.importorskip("vllm", reason="vLLM is not installed (pip install -e '.[vllm]')")

from dyn_actor.components.parsers import (  # noqa: E402
    HermesReader,
    Llama3JsonReader,
    OutputReader,
    PythonicReader,
    ReasoningReader,
    read_all,
)
from tests.test_parsers import CALL  # noqa: E402

NAMES = frozenset({"get_weather", "get_time"})
TOOLS = [{"type": "function", "function": {"name": n, "parameters": {"type": "object"}}} for n in sorted(NAMES)]


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    """The built-in ASCII tokenizer with the tags as tokens of their own, as transformers loads it
    (vLLM's parsers look the tags up in it)."""
    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    from dyn_actor.engine import builtin
    from tests.checkpoints import MARKUP_TOKENS

    d = tmp_path_factory.mktemp("markup-tokenizer")
    tk = builtin.build_tokenizer()
    tk.add_tokens([AddedToken(t, special=False, normalized=False) for t in MARKUP_TOKENS])
    tk.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps(builtin.tokenizer_config()))
    return AutoTokenizer.from_pretrained(str(d))


@pytest.fixture(scope="module")
def request_():
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

    return ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], tools=TOOLS)


def _ours(tools: str | None, text: str, reasoning: bool = False):
    reader = {"hermes": HermesReader, "llama3_json": Llama3JsonReader, "pythonic": PythonicReader, None: None}[tools]
    p = read_all(OutputReader(ReasoningReader(True) if reasoning else None, reader and reader(NAMES)), text)
    calls = [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in p.calls]
    return p.reasoning, p.content or None, calls


def _theirs(parser, text: str, request_):
    r = parser.extract_tool_calls(text, request_)
    return r.content or None, [(c.function.name, json.loads(c.function.arguments)) for c in r.tool_calls]


HERMES_SAME = [
    "The weather is fine.",
    f"<tool_call>\n{CALL}\n</tool_call>",
    f"<tool_call>{CALL}</tool_call>\n<tool_call>" + '{"name": "get_time", "arguments": {"tz": "UTC"}}</tool_call>',
    f"Let me look.<tool_call>{CALL}</tool_call>",
    f"<tool_call>{CALL}",
    "<tool_call>not json</tool_call> then text",
]


def test_hermes_reads_as_vllms(hf_tokenizer, request_):
    from vllm.tool_parsers.hermes_tool_parser import Hermes2ProToolParser

    theirs = Hermes2ProToolParser(hf_tokenizer)
    for text in HERMES_SAME:
        assert _ours("hermes", text)[1:] == _theirs(theirs, text, request_), text
    # the differences: whitespace before a call is content in vLLM's, dropped in ours; text after
    # the calls is dropped by vLLM's, content in ours
    text = f"Let me look.\n<tool_call>{CALL}</tool_call>\nDone."
    assert _theirs(theirs, text, request_)[0] == "Let me look.\n" and _ours("hermes", text)[1] == "Let me look.\nDone."


LLAMA_SAME = [
    '{"name": "get_weather", "parameters": {"city": "Oslo", "days": 1}}',
    '<|python_tag|>{"name": "get_time", "parameters": {"tz": "UTC"}}; {"name": "get_time", "parameters": {}}',
    "The weather is fine.",
    '{"answer": 42}',
    '{"name": "get_time", "parameters": {"tz": ',
]


PYTHONIC_SAME = [
    '[get_weather(city="Paris", days=2)]',
    "[get_time(tz='UTC'), get_time()]",
    '[get_weather(city="Oslo", days=[1, 2], opts={"a": None, "b": True})]',
    "The weather is fine.",
    "[1, 2, 3]",
    '[get_weather(city="Pa',
]


@pytest.mark.parametrize("name,theirs_at,texts", [
    ("llama3_json", "llama_tool_parser.Llama3JsonToolParser", LLAMA_SAME),
    ("pythonic", "pythonic_tool_parser.PythonicToolParser", PYTHONIC_SAME),
])
def test_json_and_pythonic_read_as_vllms(hf_tokenizer, request_, name, theirs_at, texts):
    import importlib

    module, cls = theirs_at.rsplit(".", 1)
    theirs = getattr(importlib.import_module(f"vllm.tool_parsers.{module}"), cls)(hf_tokenizer)
    for text in texts:
        assert _ours(name, text)[1:] == _theirs(theirs, text, request_), text


def test_deepseek_r1_reads_as_vllms(hf_tokenizer, request_):
    from vllm.reasoning.deepseek_r1_reasoning_parser import DeepSeekR1ReasoningParser

    theirs = DeepSeekR1ReasoningParser(hf_tokenizer)
    for text in ["<think>\nStep one.\n</think>\n\nThe answer.", "Step one.</think>The answer.", "cut short",
                 "<think>a</think>", "a < b </think> so it is"]:
        reasoning, content = theirs.extract_reasoning(text, request_)
        assert _ours(None, text, reasoning=True)[:2] == (reasoning or "", content), text
    # the difference: a "<think>" later in the output starts the reasoning over in vLLM's (what came
    # before it is lost); ours takes a "<think>" only at the start
    text = "a</think> so <think> is text"
    assert theirs.extract_reasoning(text, request_) == (" is text", None)
    assert _ours(None, text, reasoning=True)[:2] == ("a", " so <think> is text")
