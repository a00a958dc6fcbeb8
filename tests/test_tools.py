"""Tool calls on /v1/chat/completions through the openai client: a named function and "required"
(the output held to the tools' schemas, read back as tool calls), streamed and not; a conversation
with the calls and their results goes back through the chat template, tools included; "auto" and
malformed tools are 400s."""

from __future__ import annotations

import json

import pytest
import requests

pytest.importorskip("xgrammar")
openai = pytest.importorskip("openai")

from tests.server import InprocServer  # noqa: E402

CITIES = ["Paris", "Oslo", "Lima"]
TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"enum": CITIES},
                                                        "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                       "required": ["city", "days"], "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "get_time",
        "parameters": {"type": "object", "properties": {"tz": {"enum": ["UTC", "CET"]}}, "required": ["tz"],
                       "additionalProperties": False}}},
]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def _args_ok(name: str, arguments: str) -> bool:
    args = json.loads(arguments)
    if name == "get_weather":
        return set(args) == {"city", "days"} and args["city"] in CITIES and 1 <= args["days"] <= 7
    return name == "get_time" and args == {"tz": args.get("tz")} and args["tz"] in ("UTC", "CET")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The built-in model, with a chat template that shows how many tools it was given."""
    from dyn_actor.engine.builtin import save_builtin

    d = tmp_path_factory.mktemp("tools-model")
    save_builtin(d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["chat_template"] = ("{% if tools %}[{{ tools | length }} tools]{% endif %}{% for m in messages %}"
                            "{{ m.role }}: {{ m.content or '' }}{% for c in m.tool_calls or [] %}"
                            "<call {{ c.function.name }} {{ c.function.arguments.city }}>{% endfor %}\n"
                            "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    return d


@pytest.fixture(scope="module")
def server(model_dir):
    s = InprocServer("--model", str(model_dir), "--max-model-len", "512", "--kv-cache-memory-gb", "0.1")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0, timeout=120)


def _model(client) -> str:
    return client.models.list().data[0].id


def test_a_named_function(client):
    for seed in range(3):
        r = client.chat.completions.create(
            model=_model(client), messages=ASK, tools=TOOLS, seed=seed, max_tokens=200,
            tool_choice={"type": "function", "function": {"name": "get_weather"}})
        choice = r.choices[0]
        assert choice.finish_reason == "stop" and choice.message.content is None
        (call,) = choice.message.tool_calls
        assert call.type == "function" and call.function.name == "get_weather" and call.id
        assert _args_ok("get_weather", call.function.arguments), call.function.arguments


def test_required_calls_one_of_the_tools(client):
    seen = set()
    for seed in range(4):
        r = client.chat.completions.create(model=_model(client), messages=ASK, tools=TOOLS, tool_choice="required",
                                           seed=seed, max_tokens=300)
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.tool_calls, choice
        for call in choice.message.tool_calls:
            assert _args_ok(call.function.name, call.function.arguments), call
            seen.add(call.function.name)
    r = client.chat.completions.create(model=_model(client), messages=ASK, tools=TOOLS, tool_choice="required",
                                       parallel_tool_calls=False, seed=1, max_tokens=300, n=3)
    assert all(len(c.message.tool_calls) == 1 for c in r.choices)


def test_streamed_calls(client):
    stream = client.chat.completions.create(
        model=_model(client), messages=ASK, tools=TOOLS, seed=5, max_tokens=200, stream=True,
        tool_choice={"type": "function", "function": {"name": "get_time"}})
    args, ids, names, reasons = "", [], [], []
    for chunk in stream:
        for c in chunk.choices:
            for tc in c.delta.tool_calls or []:
                assert tc.index == 0
                if tc.id:
                    ids.append(tc.id)
                    names.append(tc.function.name)
                args += tc.function.arguments or ""
            if c.finish_reason:
                reasons.append(c.finish_reason)
    assert len(ids) == 1 and names == ["get_time"] and reasons == ["stop"]  # id and name once, then the arguments
    assert _args_ok("get_time", args), args
    stream = client.chat.completions.create(model=_model(client), messages=ASK, tools=TOOLS, tool_choice="required",
                                            seed=6, max_tokens=300, stream=True, n=2)
    calls: dict[int, list] = {0: [], 1: []}
    finish = {}
    for chunk in stream:
        for c in chunk.choices:
            calls[c.index] += c.delta.tool_calls or []
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    assert finish == {0: "tool_calls", 1: "tool_calls"}
    for got in calls.values():
        assert got and all(tc.id and _args_ok(tc.function.name, tc.function.arguments) for tc in got)


def test_a_conversation_with_calls_and_results_reaches_the_template(server, client):
    r = client.chat.completions.create(model=_model(client), messages=ASK, tools=TOOLS, seed=2, max_tokens=200,
                                       tool_choice={"type": "function", "function": {"name": "get_weather"}})
    call = r.choices[0].message.tool_calls[0]
    city = json.loads(call.function.arguments)["city"]
    turn = ASK + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                  {"role": "tool", "tool_call_id": call.id, "content": "18 degrees"}]
    plain = client.chat.completions.create(model=_model(client), messages=turn, max_tokens=4, temperature=0)
    shown = client.chat.completions.create(model=_model(client), messages=turn, tools=TOOLS, tool_choice="none",
                                           max_tokens=4, temperature=0)
    assert shown.choices[0].message.content is not None and not shown.choices[0].message.tool_calls
    # the template wrote "[2 tools]", and the call's city: its arguments were handed over as an object
    # (arguments that are not JSON stay text, and the template finds no city in them)
    raw = [dict(m) for m in turn]
    raw[1] = {**raw[1], "tool_calls": [{**call.model_dump(), "function": {"name": "get_weather",
                                                                         "arguments": "not json"}}]}
    opaque = client.chat.completions.create(model=_model(client), messages=raw, max_tokens=4, temperature=0)
    assert shown.usage.prompt_tokens - plain.usage.prompt_tokens == len("[2 tools]")
    assert plain.usage.prompt_tokens - opaque.usage.prompt_tokens == len(city)


def test_auto_and_bad_tools_are_400s(server):
    url = server.base_url + "/chat/completions"
    r = requests.post(url, json={"messages": ASK, "tools": TOOLS}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice" and "auto" in r.text
    r = requests.post(url, json={"messages": ASK, "tools": TOOLS, "tool_choice": {"type": "function",
                                                                                 "function": {"name": "nope"}}},
                      timeout=30)
    assert r.status_code == 400 and "nope" in r.json()["error"]["message"]
    bad = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties":
                                                                          {"x": {"type": "nope"}}}}}]
    r = requests.post(url, json={"messages": ASK, "tools": bad, "tool_choice": "required"}, timeout=30)
    assert r.status_code == 400 and "nope" in r.json()["error"]["message"]  # the worker's compile refused it
    r = requests.post(url, json={"messages": ASK, "max_tokens": 2}, timeout=30)
    assert r.status_code == 200
