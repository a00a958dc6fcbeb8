"""OpenAI's Responses API (``POST /v1/responses``) through the openai client: the same answer as the
chat completion it runs as, streamed as typed events in order; reasoning, text and function calls
as output items (parsed by the server's parsers, or forced by tool_choice); input items with
earlier calls and their outputs; a JSON schema in ``text.format``; what it does not serve is a 400."""

from __future__ import annotations

import json
import re

import pytest
import requests

pytest.importorskip("xgrammar")
openai = pytest.importorskip("openai")

from tests.server import InprocServer  # noqa: E402
from tests.test_reasoning import HERMES_OUT, NO_THINKING, TEMPLATE  # noqa: E402

TOOLS = [{"type": "function", "name": "get_weather", "description": "The weather in a city",
          "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]},
                                                          "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                         "required": ["city", "days"], "additionalProperties": False}}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from tests.checkpoints import builtin_with_template

    d = builtin_with_template(tmp_path_factory.mktemp("responses-model"), TEMPLATE)
    s = InprocServer("--model", str(d), "--served-model-name", "m", "--max-model-len", "512",
                     "--kv-cache-memory-gb", "0.1", "--reasoning-parser", "qwen3", "--tool-call-parser", "hermes")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0, timeout=120)


def _events(client, **kw):
    events = list(client.responses.create(model="m", stream=True, **kw))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert [e.type for e in events[:2]] == ["response.created", "response.in_progress"]
    assert events[-1].type in ("response.completed", "response.incomplete")
    added = [e.item.id for e in events if e.type == "response.output_item.added"]
    done = [e.item.id for e in events if e.type == "response.output_item.done"]
    assert added == done == [item.id for item in events[-1].response.output]  # each item opened, then closed
    return events


def test_a_text_answer_is_the_chat_answer(client):
    extra = {"seed": 3, "chat_template_kwargs": NO_THINKING}
    r = client.responses.create(model="m", instructions="Be brief.", input="Hello there", max_output_tokens=24,
                                temperature=1.0, extra_body=extra)
    chat = client.chat.completions.create(model="m", messages=[{"role": "system", "content": "Be brief."},
                                                               {"role": "user", "content": "Hello there"}],
                                          max_tokens=24, temperature=1.0, extra_body=extra)
    assert r.object == "response" and r.id.startswith("resp_") and r.model == "m"
    assert r.output_text == chat.choices[0].message.content
    assert (r.status == "incomplete") == (chat.choices[0].finish_reason == "length")
    if r.status == "incomplete":
        assert r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.input_tokens == chat.usage.prompt_tokens and r.usage.output_tokens == chat.usage.completion_tokens
    events = _events(client, instructions="Be brief.", input="Hello there", max_output_tokens=24, temperature=1.0,
                     extra_body=extra)
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == r.output_text == events[-1].response.output_text
    done = [e for e in events if e.type == "response.output_text.done"]
    assert len(done) == 1 and done[0].text == r.output_text


def test_reasoning_text_and_a_call_as_output_items(client):
    for seed in range(2):
        kw = dict(input="What is the weather in Paris?", tools=TOOLS, max_output_tokens=250,
                  extra_body={"seed": seed, "chat_template_kwargs": NO_THINKING,
                              "structured_outputs": {"regex": HERMES_OUT}})
        r = client.responses.create(model="m", **kw)
        assert r.status == "completed" and [i.type for i in r.output] == ["reasoning", "message", "function_call"]
        assert 0 < r.usage.output_tokens_details.reasoning_tokens < r.usage.output_tokens
        reasoning, message, call = r.output
        assert re.fullmatch("[a-z]{3,12}", reasoning.content[0].text)
        assert re.fullmatch(r"[A-Z][a-z]{2,8}\.", message.content[0].text) and r.output_text == message.content[0].text
        args = json.loads(call.arguments)
        assert call.name == "get_weather" and call.call_id and args["city"] in ("Paris", "Oslo", "Lima")
        events = _events(client, **kw)
        final = events[-1].response
        assert [(i.type, getattr(i, "arguments", None)) for i in final.output] == \
               [(i.type, getattr(i, "arguments", None)) for i in r.output]
        assert "".join(e.delta for e in events if e.type == "response.reasoning_text.delta") == \
               reasoning.content[0].text
        (args_done,) = [e for e in events if e.type == "response.function_call_arguments.done"]
        assert args_done.arguments == call.arguments


def test_forced_calls_named_and_required(client):
    extra = {"chat_template_kwargs": NO_THINKING}
    for seed in range(2):
        r = client.responses.create(model="m", input="Weather?", tools=TOOLS, max_output_tokens=200,
                                    tool_choice={"type": "function", "name": "get_weather"},
                                    extra_body={**extra, "seed": seed})
        (call,) = r.output
        args = json.loads(call.arguments)
        assert call.type == "function_call" and call.name == "get_weather" and args["city"] in ("Paris", "Oslo")
        assert 1 <= args["days"] <= 7
        events = _events(client, input="Weather?", tools=TOOLS, max_output_tokens=200,
                         tool_choice={"type": "function", "name": "get_weather"}, extra_body={**extra, "seed": seed})
        streamed = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
        assert streamed == call.arguments
    r = client.responses.create(model="m", input="Weather?", tools=TOOLS, tool_choice="required",
                                parallel_tool_calls=False, max_output_tokens=400, extra_body={**extra, "seed": 1})
    assert r.output and all(i.type == "function_call" and i.name == "get_weather" for i in r.output)


def test_earlier_calls_and_their_outputs_are_the_conversation(client, server):
    """Input items with a call and its output render as the chat messages with the call and the
    tool's answer (the same prompt tokens), and reasoning items go back to the template."""
    items = [{"role": "user", "content": [{"type": "input_text", "text": "Weather in Oslo?"}]},
             {"type": "reasoning", "id": "rs_1", "summary": [], "content": [{"type": "reasoning_text", "text": "hm"}]},
             {"type": "function_call", "call_id": "call_1", "name": "get_weather",
              "arguments": '{"city": "Oslo", "days": 1}'},
             {"type": "function_call_output", "call_id": "call_1", "output": "sunny"}]
    r = client.responses.create(model="m", input=items, tools=TOOLS, max_output_tokens=2,
                                extra_body={"chat_template_kwargs": NO_THINKING})
    chat = requests.post(server.url + "/v1/chat/completions", timeout=60, json={
        "messages": [{"role": "user", "content": "Weather in Oslo?"},
                     {"role": "assistant", "content": None, "reasoning": "hm", "tool_calls": [
                         {"id": "call_1", "type": "function",
                          "function": {"name": "get_weather", "arguments": '{"city": "Oslo", "days": 1}'}}]},
                     {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}],
        "tools": [{"type": "function", "function": {k: v for k, v in TOOLS[0].items() if k != "type"}}],
        "max_tokens": 2, "chat_template_kwargs": NO_THINKING}).json()
    assert r.usage.input_tokens == chat["usage"]["prompt_tokens"]
    without = client.responses.create(model="m", input=items[:1] + items[2:], tools=TOOLS, max_output_tokens=2,
                                      extra_body={"chat_template_kwargs": NO_THINKING})
    assert r.usage.input_tokens - without.usage.input_tokens == len("<think>hm</think>")


def test_a_json_schema_in_text_format(client):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    for seed in range(3):
        r = client.responses.create(model="m", input="Answer in JSON", max_output_tokens=100,
                                    text={"format": {"type": "json_schema", "name": "answer", "schema": schema}},
                                    extra_body={"seed": seed, "chat_template_kwargs": NO_THINKING})
        assert r.status == "completed" and isinstance(json.loads(r.output_text)["ok"], bool)


@pytest.mark.parametrize("body,param", [
    ({"previous_response_id": "resp_1"}, "previous_response_id"),
    ({"conversation": "conv_1"}, "conversation"),
    ({"background": True}, "background"),
    ({"tools": [{"type": "web_search"}]}, "tools"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input"),
    ({"input": [{"type": "computer_call_output"}]}, "input"),
    ({"input": []}, "input"),
    ({"input": [{"role": "tool", "content": "x"}]}, "input"),
    ({"truncation": "auto"}, "truncation"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text"),
    ({"tool_choice": {"type": "file_search"}, "tools": TOOLS}, "tool_choice"),
    ({"max_output_tokens": 0}, "max_output_tokens"),
])
def test_what_is_not_served_is_a_400(server, body, param):
    r = requests.post(server.url + "/v1/responses", json={"input": "hi", **body}, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.text
    ok = requests.post(server.url + "/v1/responses", timeout=30,
                       json={"input": "hi", "max_output_tokens": 2, "store": True, "include": ["x"]})
    assert ok.status_code == 200 and ok.json()["store"] is False


def test_a_client_that_leaves_mid_stream_frees_its_request(server):
    from tests.helpers import eventually, metric

    r = requests.post(server.url + "/v1/responses", stream=True, timeout=60,
                      json={"input": "hi", "stream": True, "max_output_tokens": 400, "ignore_eos": True,
                            "chat_template_kwargs": NO_THINKING})
    lines = r.iter_lines()
    got = [next(lines) for _ in range(24)]
    assert any(b"response.output_text.delta" in line for line in got)
    assert eventually(lambda: metric(server, "dyn_worker_kv_blocks_used") > 0, timeout=5)  # (a load report)
    r.close()
    assert eventually(lambda: metric(server, "dyn_worker_kv_blocks_used") == 0, timeout=10)
    assert eventually(lambda: metric(server, "dyn_requests_in_flight") == 0, timeout=10)


def test_a_spec_that_does_not_compile_is_a_400_streamed_or_not(server):
    for stream in (False, True):
        r = requests.post(server.url + "/v1/responses", timeout=60,
                          json={"input": "hi", "stream": stream, "structured_outputs": {"regex": "[a-"}})
        assert r.status_code == 400 and "regex" in r.json()["error"]["message"], r.text
