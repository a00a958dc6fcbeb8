"""Sampling defaults from a model's generation_config.json (``--generation-config``), as vLLM applies them."""

from __future__ import annotations

import json

import msgspec
import pytest
from openai import OpenAI

from dyn_actor.components.openai_api import CompletionRequest, sampling_params
from dyn_actor.engine.loader import default_sampling
from dyn_actor.engine.model_config import ModelLoadError
from tests.server import Server


def _folder(tmp_path, cfg) -> str:
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "generation_config.json").write_text(json.dumps(cfg))
    return str(tmp_path)


def test_defaults_read_from_the_model_folder_or_another(tmp_path):
    d = _folder(tmp_path / "m", {"bos_token_id": 0, "do_sample": True, "temperature": 0.6, "top_p": 0.9, "top_k": 20,
                                 "min_p": 0.05, "max_new_tokens": 256, "repetition_penalty": 1.1})
    assert default_sampling(d) == {"temperature": 0.6, "top_p": 0.9, "top_k": 20, "min_p": 0.05, "max_tokens": 256,
                                   "repetition_penalty": 1.1}
    assert default_sampling(d, "vllm") == {}  # the server's own
    assert default_sampling("builtin:tiny") == {}
    other = _folder(tmp_path / "o", {"temperature": 0})
    assert default_sampling(d, other) == {"temperature": 0}
    assert default_sampling(str(tmp_path / "none"), "auto") == {}  # no file: no defaults


@pytest.mark.parametrize("content, says", [
    ('{"top_p": 3}', "top_p must be in (0, 1]"),
    ('{"repetition_penalty": 0}', "repetition_penalty must be in (0, 100]"),
    ('{"top_k": 2.5}', "Expected `int`"),
    ('{"temperature": 0.7', "generation_config.json"),
    ('[1, 2]', "must hold a JSON object"),
])
def test_a_bad_generation_config_is_a_one_line_error(tmp_path, content, says):
    (tmp_path / "generation_config.json").write_text(content)
    with pytest.raises(ModelLoadError, match=None) as e:
        default_sampling(str(tmp_path))
    assert says in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ModelLoadError, match="no such folder"):
        default_sampling(str(tmp_path), str(tmp_path / "missing"))


def test_a_request_overrides_each_default():
    defaults = {"temperature": 0.6, "top_p": 0.9, "top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1,
                "presence_penalty": 0.5, "frequency_penalty": 0.25}

    def fields(sp):
        return (sp.temperature, sp.top_p, sp.top_k, sp.min_p, sp.repetition_penalty, sp.presence_penalty,
                sp.frequency_penalty)

    req = msgspec.json.decode(b'{"prompt": "hi"}', type=CompletionRequest)
    assert fields(sampling_params(req, 16, None, 0, defaults)) == (0.6, 0.9, 20, 0.05, 1.1, 0.5, 0.25)
    req = msgspec.json.decode(b'{"prompt": "hi", "temperature": 0, "top_p": 1, "top_k": 0, "min_p": 0, '
                              b'"repetition_penalty": 1, "presence_penalty": 0, "frequency_penalty": 0}',
                              type=CompletionRequest)
    neutral = (0.0, 1.0, 0, 0.0, 1.0, 0.0, 0.0)
    assert fields(sampling_params(req, 16, None, 0, defaults)) == neutral  # explicit neutral values win
    req = msgspec.json.decode(b'{"prompt": "hi"}', type=CompletionRequest)
    assert fields(sampling_params(req, 16, None)) == (1.0, *neutral[1:])  # no defaults: neutral


def test_served_requests_get_the_generation_configs_defaults(tmp_path):
    folder = _folder(tmp_path, {"temperature": 0.0, "max_new_tokens": 5, "repetition_penalty": 1.3})
    server = Server("--model", "builtin:tiny", "--generation-config", folder)
    try:
        client = OpenAI(base_url=server.base_url, api_key="none")
        no_eos = {"ignore_eos": True}
        a = client.completions.create(model="builtin:tiny", prompt="Once upon a time", extra_body=no_eos)
        b = client.completions.create(model="builtin:tiny", prompt="Once upon a time", extra_body=no_eos)
        greedy = client.completions.create(model="builtin:tiny", prompt="Once upon a time", temperature=0,
                                           max_tokens=5, extra_body=no_eos)
        assert a.usage.completion_tokens == 5 and a.choices[0].text == b.choices[0].text == greedy.choices[0].text
        short = client.completions.create(model="builtin:tiny", prompt="Once upon a time", max_tokens=2)
        assert short.usage.completion_tokens == 2
        chat = client.chat.completions.create(model="builtin:tiny", messages=[{"role": "user", "content": "hi"}])
        assert chat.usage.completion_tokens <= 5
        pen = client.completions.create(model="builtin:tiny", prompt="Once upon a time", presence_penalty=0.5,
                                        frequency_penalty=0.5, extra_body=no_eos)
        assert pen.usage.completion_tokens == 5
        plain = client.completions.create(model="builtin:tiny", prompt="Once upon a time", extra_body={
            **no_eos, "repetition_penalty": 1.0, "max_tokens": 5})
        assert plain.usage.completion_tokens == 5
        assert "default sampling from the generation config: temperature=0.0, repetition_penalty=1.3, max_tokens=5" \
            in server.log()
    finally:
        server.stop()
