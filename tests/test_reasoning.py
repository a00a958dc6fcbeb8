"""The server's parsers over HTTP (``--reasoning-parser``, ``--tool-call-parser``): a thinking
model's reasoning in the answer's ``reasoning`` field, and tool calls that the model writes in its
own format under tool_choice "auto", streamed and not, the same either way.

The built-in model writes random text; where a test needs the model to write a tag or a call, a
``guided_regex`` makes it (the server reads the answer as it would any model's)."""

from __future__ import annotations

import json
import re

import pytest
import requests

pytest.importorskip("xgrammar")

from tests.server import InprocServer  # noqa: E402

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                       "required": ["city", "days"]}}},
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}},
]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
# a Qwen3-like template: the tools' count, earlier reasoning, and an open <think> unless
# chat_template_kwargs turn the thinking off
TEMPLATE = ("{% if tools %}[{{ tools | length }} tools]{% endif %}{% for m in messages %}{{ m.role }}: "
            "{% if m.reasoning_content %}<think>{{ m.reasoning_content }}</think>{% endif %}{{ m.content or '' }}\n"
            "{% endfor %}{% if add_generation_prompt %}assistant:{% if enable_thinking is defined and not "
            "enable_thinking %}<think>\n\n</think>\n\n{% else %}<think>\n{% endif %}{% endif %}")
NO_THINKING = {"enable_thinking": False}
# what the model is made to write: reasoning, a word, then a call in the hermes format
HERMES_OUT = (r'<think>[a-z]{3,12}</think>[A-Z][a-z]{2,8}\.<tool_call>\{"name": "get_weather", '
              r'"arguments": \{"city": "(Paris|Oslo|Lima)", "days": [1-7]\}\}</tool_call>')


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tests.checkpoints import builtin_with_template

    return builtin_with_template(tmp_path_factory.mktemp("thinking-model"), TEMPLATE)


def _start(model_dir, *flags):
    return InprocServer("--model", str(model_dir), "--max-model-len", "512", "--kv-cache-memory-gb", "0.1", *flags)


@pytest.fixture(scope="module")
def qwen(model_dir):
    s = _start(model_dir, "--reasoning-parser", "qwen3", "--enable-auto-tool-choice", "--tool-call-parser", "hermes")
    yield s
    s.stop()


def _chat(server, **body) -> dict:
    r = requests.post(server.url + "/v1/chat/completions", json={"messages": ASK, "max_tokens": 250, **body},
                      timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def _stream(server, **body) -> tuple[dict, str | None, list[dict]]:
    """A streamed answer put together: {"reasoning", "content", "tool_calls"} (each call's deltas
    joined), the finish reason, and the tool-call deltas as they came."""
    r = requests.post(server.url + "/v1/chat/completions", timeout=120, stream=True,
                      json={"messages": ASK, "max_tokens": 250, "stream": True, **body})
    assert r.status_code == 200, r.text
    got = {"reasoning": "", "content": "", "tool_calls": {}}
    reason, deltas = None, []
    for line in r.iter_lines():
        if not line or line == b"data: [DONE]":
            continue
        chunk = json.loads(line[len(b"data: "):])
        (choice,) = chunk["choices"]
        delta = choice["delta"]
        got["reasoning"] += delta.get("reasoning") or ""
        got["content"] += delta.get("content") or ""
        for call in delta.get("tool_calls") or []:
            deltas.append(call)
            entry = got["tool_calls"].setdefault(call["index"], {"id": None, "name": None, "arguments": ""})
            entry["id"] = entry["id"] or call.get("id")
            entry["name"] = entry["name"] or call.get("function", {}).get("name")
            entry["arguments"] += call.get("function", {}).get("arguments") or ""
        reason = choice["finish_reason"] or reason
    return got, reason, deltas


def test_reasoning_text_and_a_call_read_apart(qwen):
    for seed in range(3):
        body = dict(tools=TOOLS, seed=seed, temperature=1.0, guided_regex=HERMES_OUT,
                    chat_template_kwargs=NO_THINKING)
        choice = _chat(qwen, **body)["choices"][0]
        msg = choice["message"]
        assert choice["finish_reason"] == "tool_calls", choice
        assert re.fullmatch("[a-z]{3,12}", msg["reasoning"]) and re.fullmatch(r"[A-Z][a-z]{2,8}\.", msg["content"])
        (call,) = msg["tool_calls"]
        args = json.loads(call["function"]["arguments"])
        assert call["type"] == "function" and call["id"] and call["function"]["name"] == "get_weather"
        assert args["city"] in ("Paris", "Oslo", "Lima") and 1 <= args["days"] <= 7
        # streamed with the same seed: the same answer, the call in one delta
        got, reason, deltas = _stream(qwen, **body)
        assert reason == "tool_calls" and got["reasoning"] == msg["reasoning"] and got["content"] == msg["content"]
        assert len(deltas) == 1 and deltas[0]["id"] and deltas[0]["type"] == "function"
        assert got["tool_calls"] == {0: {"id": deltas[0]["id"], "name": "get_weather",
                                         "arguments": call["function"]["arguments"]}}


def test_text_without_a_call_is_content(qwen):
    body = dict(tools=TOOLS, seed=1, guided_regex=r"[A-Z][a-z ]{5,30}\.", chat_template_kwargs=NO_THINKING)
    choice = _chat(qwen, **body)["choices"][0]
    assert choice["finish_reason"] == "stop" and "tool_calls" not in choice["message"]
    assert re.fullmatch(r"[A-Z][a-z ]{5,30}\.", choice["message"]["content"]) and choice["message"]["reasoning"] is None
    got, reason, deltas = _stream(qwen, **body)
    assert reason == "stop" and not deltas and got["content"] == choice["message"]["content"]


def test_while_thinking_the_output_is_free_and_all_reasoning(qwen):
    """The template leaves the model in an open <think>: the answer is reasoning until "</think>"
    (never written here), and a structured output waits for it: a guided_choice does not hold the
    reasoning."""
    for seed in range(3):
        msg = _chat(qwen, seed=seed, max_tokens=40, guided_choice=["yes", "no"], ignore_eos=True)["choices"][0][
            "message"]
        assert msg["content"] is None and len(msg["reasoning"]) > 3, msg
        got, _, _ = _stream(qwen, seed=seed, max_tokens=40, guided_choice=["yes", "no"], ignore_eos=True)
        assert got["reasoning"] == msg["reasoning"] and got["content"] == ""
    hidden = _chat(qwen, seed=0, max_tokens=20, include_reasoning=False)["choices"][0]["message"]
    assert "reasoning" not in hidden and hidden["content"] is None


def test_chat_template_kwargs_and_earlier_reasoning_reach_the_template(qwen):
    def tokens(messages, **kw):
        r = requests.post(qwen.url + "/tokenize", json={"messages": messages, **kw}, timeout=30)
        assert r.status_code == 200, r.text
        return r.json()["count"]

    base = tokens(ASK)
    assert tokens(ASK, chat_template_kwargs=NO_THINKING) - base == len("<think>\n\n</think>\n\n") - len("<think>\n")
    turn = [*ASK, {"role": "assistant", "content": "Sunny.", "reasoning": "look it up"}, ASK[0]]
    old_name = [*ASK, {"role": "assistant", "content": "Sunny.", "reasoning_content": "look it up"}, ASK[0]]
    bare = [*ASK, {"role": "assistant", "content": "Sunny."}, ASK[0]]
    assert tokens(turn) - tokens(bare) == tokens(old_name) - tokens(bare) == len("<think>look it up</think>")
    r = requests.post(qwen.url + "/v1/chat/completions", timeout=30,
                      json={"messages": ASK, "chat_template_kwargs": {"messages": []}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "chat_template_kwargs"


def test_without_a_tool_call_parser_auto_is_refused(model_dir):
    s = _start(model_dir)
    try:
        r = requests.post(s.url + "/v1/chat/completions", json={"messages": ASK, "tools": TOOLS}, timeout=30)
        assert r.status_code == 400 and "--tool-call-parser" in r.json()["error"]["message"]
        r = requests.post(s.url + "/v1/chat/completions", json={"messages": ASK, "max_tokens": 5}, timeout=30)
        assert r.status_code == 200 and "reasoning" not in r.json()["choices"][0]["message"]
    finally:
        s.stop()


def test_llama3_json_and_pythonic_calls_and_deepseek_r1_reasoning(model_dir):
    s = _start(model_dir, "--tool-call-parser", "llama3_json")
    try:
        call = r'\{"name": "get_time", "parameters": \{\}\}; \{"name": "get_weather", "parameters": \{"city": "Oslo", "days": [1-7]\}\}'
        body = dict(tools=TOOLS, seed=2, guided_regex=call, chat_template_kwargs=NO_THINKING)
        choice = _chat(s, **body)["choices"][0]
        assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
        assert [c["function"]["name"] for c in choice["message"]["tool_calls"]] == ["get_time", "get_weather"]
        got, reason, _ = _stream(s, **body)
        assert reason == "tool_calls" and [c["name"] for c in got["tool_calls"].values()] == ["get_time", "get_weather"]
        one = _chat(s, **body, parallel_tool_calls=False)["choices"][0]["message"]["tool_calls"]
        assert [c["function"]["name"] for c in one] == ["get_time"]
        choice = _chat(s, tools=TOOLS, seed=2, guided_regex="[a-z ]{4,20}")["choices"][0]
        assert choice["finish_reason"] == "stop" and choice["message"]["content"] and "tool_calls" not in choice["message"]
    finally:
        s.stop()
    s = _start(model_dir, "--tool-call-parser", "pythonic")
    try:
        body = dict(tools=TOOLS, seed=1, chat_template_kwargs=NO_THINKING,
                    guided_regex=r'\[get_time\(\), get_weather\(city="(Oslo|Lima)", days=[1-7]\)\]')
        choice = _chat(s, **body)["choices"][0]
        assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None, choice
        calls = [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in choice["message"]["tool_calls"]]
        assert calls[0] == ("get_time", {}) and calls[1][0] == "get_weather" and calls[1][1]["city"] in ("Oslo", "Lima")
        got, reason, _ = _stream(s, **body)
        assert reason == "tool_calls" and [c["name"] for c in got["tool_calls"].values()] == ["get_time", "get_weather"]
    finally:
        s.stop()
    s = _start(model_dir, "--reasoning-parser", "deepseek_r1")
    try:
        msg = _chat(s, seed=5, max_tokens=30)["choices"][0]["message"]
        ids = requests.post(s.url + "/tokenize", json={"messages": ASK}, timeout=30).json()["tokens"]
        text = requests.post(s.url + "/v1/completions", json={"prompt": ids, "seed": 5, "max_tokens": 30},
                             timeout=30).json()["choices"][0]["text"]
        assert msg["content"] is None and msg["reasoning"] == text  # no "</think>": all of it is reasoning
    finally:
        s.stop()


def test_the_grammar_waits_for_the_end_of_the_reasoning(tmp_path):
    """A tokenizer with "</think>" as one token (as Qwen3's): while the model thinks, a structured
    output does not hold it; once it writes "</think>" (made its first token here by a logit bias),
    the answer after it keeps to the spec and the reasoning parser reads it apart."""
    from tests.checkpoints import write_markup_checkpoint

    ids = write_markup_checkpoint(tmp_path / "model", TEMPLATE)
    s = _start(tmp_path / "model", "--reasoning-parser", "deepseek_r1", "--tool-call-parser", "hermes")
    try:
        for seed in range(3):
            choice = _chat(s, seed=seed, guided_choice=["yes", "no"], logit_bias={str(ids["</think>"]): 100},
                           max_tokens=20)["choices"][0]
            assert choice["finish_reason"] == "stop" and choice["message"]["content"] in ("yes", "no"), choice
            assert choice["message"]["reasoning"] is None
            free = _chat(s, seed=seed, guided_choice=["yes", "no"], max_tokens=20, ignore_eos=True)["choices"][0]
            assert free["message"]["content"] is None and free["finish_reason"] == "length"  # never left thinking
        call = r'<tool_call>\{"name": "get_time", "arguments": \{\}\}</tool_call>'
        choice = _chat(s, seed=0, guided_regex=call, tools=TOOLS, logit_bias={str(ids["</think>"]): 100})["choices"][0]
        assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None, choice
        assert [c["function"]["name"] for c in choice["message"]["tool_calls"]] == ["get_time"]
    finally:
        s.stop()
