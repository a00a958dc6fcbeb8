"""Special tokens come only from the chat template: a user who types one gets it as text."""

from __future__ import annotations

from dyn_actor.engine.loader import load_tokenizer


def test_special_token_text_in_a_message_is_tokenized_as_text():
    t = load_tokenizer("builtin:tiny")
    eos = t.eos_token_id
    typed = t.encode_chat([{"role": "user", "content": f"stop {t.eos_token} here"}])
    plain = t.encode_chat([{"role": "user", "content": "stop here"}])
    assert eos not in typed and typed[0] == t.bos_token_id  # the template's own BOS stays special
    assert t.decode(typed, skip_special_tokens=False) == t.decode(plain, skip_special_tokens=False).replace(
        "stop here", f"stop {t.eos_token} here")
    # list-of-parts content too, and a message without special text is tokenized as before
    parts = t.encode_chat([{"role": "user", "content": [{"type": "text", "text": t.bos_token}]}])
    assert parts.count(t.bos_token_id) == 1
    text = t.apply_chat_template([{"role": "user", "content": "stop here"}])
    assert plain == t.encode(text, add_special_tokens=False)
