"""Structured outputs over HTTP, as clients ask for them: OpenAI's response_format through the
openai client, vLLM's guided_* and structured_outputs fields, streamed and not; aggregated, and
disaggregated with every prompt prefilled remotely (the prefill worker draws the first token under
the grammar, the decode worker goes on from it)."""

from __future__ import annotations

import json
import re

import pytest
import requests

pytest.importorskip("xgrammar")

from tests.helpers import eventually, metric  # noqa: E402
from tests.server import InprocServer  # noqa: E402

COLORS = ["red", "green", "blue"]
SCHEMA = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}, "color": {"enum": COLORS},
                   "size": {"type": "integer", "minimum": 1, "maximum": 9}},
    "required": ["ok", "color", "size"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module", params=["agg", "1p1d"])
def server(request):
    s = InprocServer("--topology", request.param, "--max-model-len", "512", "--kv-cache-memory-gb", "0.1",
                     "--max-local-prefill-length", "0")
    s.kind = request.param
    yield s
    s.stop()


def _valid(doc: dict) -> bool:
    return (set(doc) == {"ok", "color", "size"} and isinstance(doc["ok"], bool) and doc["color"] in COLORS
            and isinstance(doc["size"], int) and 1 <= doc["size"] <= 9)


def test_response_format_json_schema_with_the_openai_client(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.base_url, api_key="x")
    remote = metric(server, "dyn_remote_prefills_total")
    docs = []
    for seed in range(4):
        r = client.chat.completions.create(
            model=client.models.list().data[0].id, messages=[{"role": "user", "content": f"Describe item {seed} as JSON."}],
            max_tokens=300, temperature=1.0, seed=seed,
            response_format={"type": "json_schema", "json_schema": {"name": "item", "schema": SCHEMA}})
        assert r.choices[0].finish_reason == "stop", r.choices[0].message.content
        docs.append(json.loads(r.choices[0].message.content))
    assert all(_valid(d) for d in docs), docs
    if server.kind != "agg":  # every prompt was prefilled by the prefill worker
        assert metric(server, "dyn_remote_prefills_total") >= remote + 4


def test_json_object_and_vllm_fields(server):
    url = server.base_url + "/chat/completions"
    msgs = [{"role": "user", "content": "Go."}]

    def content(**kw):
        r = requests.post(url, timeout=120, json={"messages": msgs, "max_tokens": 300, "seed": 1, **kw})
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        return choice["message"]["content"], choice["finish_reason"]

    text, reason = content(response_format={"type": "json_object"}, temperature=0)
    if reason == "stop":
        assert isinstance(json.loads(text), dict)
    assert text.startswith("{")
    text, reason = content(guided_json=SCHEMA)
    assert reason == "stop" and _valid(json.loads(text))
    text, reason = content(guided_json=json.dumps(SCHEMA), temperature=0)  # the schema as JSON text, greedy
    assert reason == "stop" and _valid(json.loads(text))
    text, reason = content(guided_regex=r"[A-Z]{2}\d{2}")
    assert reason == "stop" and re.fullmatch(r"[A-Z]{2}\d{2}", text)
    text, reason = content(guided_choice=["left", "right"], temperature=0)
    assert reason == "stop" and text in ("left", "right")
    text, reason = content(guided_grammar='root ::= "v" [0-9] "." [0-9]')
    assert reason == "stop" and re.fullmatch(r"v\d\.\d", text)
    text, reason = content(structured_outputs={"json": SCHEMA, "disable_any_whitespace": True})
    assert reason == "stop" and _valid(json.loads(text)) and not re.search(r"\s", text)


def test_completions_streamed_with_several_choices(server):
    r = requests.post(server.base_url + "/completions", timeout=120, stream=True, json={
        "prompt": "Pick:", "max_tokens": 20, "n": 3, "stream": True, "temperature": 1.0, "seed": 4,
        "guided_choice": ["alpha", "beta", "gamma"]})
    assert r.status_code == 200
    texts, reasons = ["", "", ""], [None, None, None]
    for line in r.iter_lines():
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        for c in json.loads(line[6:])["choices"]:
            texts[c["index"]] += c["text"]
            reasons[c["index"]] = c["finish_reason"] or reasons[c["index"]]
    assert all(t in ("alpha", "beta", "gamma") for t in texts), texts
    assert reasons == ["stop"] * 3


def test_structural_tags(server):
    """vLLM's structural tag, as response_format (xgrammar's format) and as structured_outputs'
    JSON text (the older structures and triggers); in 1p1d the prefill worker draws the first token
    under it. A tag of the wrong shape, or one that does not compile, is a 400."""
    tag = {"type": "structural_tag", "format": {"type": "tag", "begin": "<r>",
                                                "content": {"type": "regex", "pattern": "[a-z]{2,5}-[0-9]{3}"},
                                                "end": "</r>"}}
    for seed in range(3):
        r = requests.post(server.base_url + "/chat/completions", timeout=60, json={
            "messages": [{"role": "user", "content": f"code {seed}"}], "max_tokens": 40, "temperature": 1.0,
            "seed": seed, "response_format": tag})
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert re.fullmatch(r"<r>[a-z]{2,5}-[0-9]{3}</r>", choice["message"]["content"]), choice
        assert choice["finish_reason"] == "stop"
    older = {"structures": [{"begin": "<c>", "schema": {"enum": COLORS}, "end": "</c>"}], "triggers": ["<c"]}
    r = requests.post(server.base_url + "/completions", timeout=60, json={
        "prompt": "Pick:", "max_tokens": 30, "temperature": 0, "structured_outputs": {"structural_tag": json.dumps(older)}})
    assert r.status_code == 200, r.text
    for bad in ({"type": "structural_tag"}, {"type": "structural_tag", "structures": [{"begin": "<a>"}], "triggers": ["<"]},
                {"type": "structural_tag", "structures": [{"begin": "<a>", "schema": {}, "end": "</a>"}], "triggers": []},
                {"type": "structural_tag", "format": {"type": "no-such-format"}}):
        r = requests.post(server.base_url + "/chat/completions", timeout=60, json={
            "messages": [{"role": "user", "content": "x"}], "max_tokens": 4, "response_format": bad})
        assert r.status_code == 400 and "structural" in r.json()["error"]["message"], (bad, r.text)


def test_a_spec_that_does_not_compile_is_a_400_and_serving_goes_on(server):
    url = server.base_url + "/chat/completions"
    msgs = [{"role": "user", "content": "x"}]
    remote = metric(server, "dyn_remote_prefills_total")
    for stream in (False, True):
        r = requests.post(url, timeout=60, json={"messages": msgs, "stream": stream,
                                                 "guided_json": {"type": "object", "properties": {"a": {"type": "nope"}}}})
        assert r.status_code == 400 and "nope" in r.json()["error"]["message"], r.text
        r = requests.post(url, timeout=60, json={"messages": msgs, "stream": stream, "guided_regex": "[a-"})
        assert r.status_code == 400 and "regex" in r.json()["error"]["message"], r.text
    # 1p1d: the decode worker's own compile refused them before any push (no prefill worker saw them)
    assert metric(server, "dyn_remote_prefills_total") == remote
    assert "prefill of" not in server.log() and "remote prefill of" not in server.log()
    r = requests.post(url, timeout=60, json={"messages": msgs, "max_tokens": 4, "guided_choice": ["fine"]})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "fine"
    if server.kind != "agg":
        assert metric(server, "dyn_remote_prefills_total") == remote + 1
    assert eventually(lambda: metric(server, "dyn_worker_kv_blocks_used") == 0)
