"""Which chat template renders a conversation: ``--chat-template`` (a file or the template itself)
over the model's own, and a tokenizer_config's named templates ("tool_use" where the request gives
tools, "default" otherwise, as transformers picks them). Bad flags are one-line errors."""

from __future__ import annotations

import pytest
import requests

from launcher.config import ConfigError, parse_args
from tests.server import InprocServer

MSGS = [{"role": "user", "content": "hi"}]
TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]


def _prompt_tokens(server, **body) -> int:
    r = requests.post(server.url + "/v1/chat/completions", timeout=60,
                      json={"messages": MSGS, "max_tokens": 1, **body})
    assert r.status_code == 200, r.text
    return r.json()["usage"]["prompt_tokens"]


def test_bad_chat_template_flags_are_one_line_errors(tmp_path):
    for value, says in (("/no/such/template.jinja", "No such file"), ("{{ unclosed", "does not compile")):
        with pytest.raises(ConfigError, match=says) as e:
            parse_args(["--chat-template", value])
        assert "\n" not in str(e.value)
    (tmp_path / "t.jinja").write_text("{% for m in messages %}[{{ m.content }}]{% endfor %}")
    assert parse_args(["--chat-template", str(tmp_path / "t.jinja")]).chat_template.startswith("{% for")


def test_the_flag_replaces_the_models_template(tmp_path):
    (tmp_path / "t.jinja").write_text("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}")
    for value in (str(tmp_path / "t.jinja"), "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"):
        s = InprocServer("--chat-template", value, "--kv-cache-memory-gb", "0.05")
        try:
            r = requests.post(s.url + "/tokenize", json={"messages": MSGS, "add_special_tokens": False}, timeout=30)
            assert r.json()["count"] == len("<user>hi"), r.text  # the built-in tokenizer: a token a character
            assert _prompt_tokens(s) == len("<user>hi")
        finally:
            s.stop()


def test_named_templates_tool_use_with_tools(tmp_path):
    from tests.checkpoints import builtin_with_template

    builtin_with_template(tmp_path, [
        {"name": "default", "template": "{% for m in messages %}{{ m.content }}{% endfor %}"},
        {"name": "tool_use", "template": "TOOLS{{ tools | length }}:{% for m in messages %}{{ m.content }}{% endfor %}"}])
    s = InprocServer("--model", str(tmp_path), "--kv-cache-memory-gb", "0.05")
    try:
        assert _prompt_tokens(s) == len("hi")
        assert _prompt_tokens(s, tools=TOOLS, tool_choice="none") == len("TOOLS1:hi")
        r = requests.post(s.url + "/tokenize", json={"messages": MSGS, "tools": TOOLS}, timeout=30)
        assert r.json()["count"] == len("TOOLS1:hi"), r.text  # /tokenize renders as the chat route does
    finally:
        s.stop()
    s = InprocServer("--model", str(tmp_path), "--kv-cache-memory-gb", "0.05", "--chat-template", "<{{ messages | length }}>")
    try:  # the flag replaces every named one
        assert _prompt_tokens(s) == _prompt_tokens(s, tools=TOOLS, tool_choice="none") == len("<1>")
    finally:
        s.stop()
