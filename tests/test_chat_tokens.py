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


def test_continue_final_message_equals_transformers(tmp_path):
    """``continue_final_message``: the prompt ends inside the last message, as transformers' chat
    template does it: with the message's trailing space where the template keeps it, without where
    the template trims the message; special-token text in that message is still plain text."""
    import pytest
    from transformers import AutoTokenizer

    from dyn_actor.engine import builtin
    from dyn_actor.engine.tokenizer import ChatTemplateError

    builtin.save_builtin(tmp_path)
    ours, hf = load_tokenizer(str(tmp_path)), AutoTokenizer.from_pretrained(str(tmp_path))
    trimming = ("{{ bos_token }}{% for m in messages %}<{{ m.role }}>{{ m.content | trim }}</{{ m.role }}>"
                "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
    for template in (ours.chat_template, trimming):
        ours.chat_template = hf.chat_template = template
        for answer in ("Sure, here", "Sure, here ", "  the list:\n1."):
            msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": answer}]
            want = hf.apply_chat_template(msgs, add_generation_prompt=False, continue_final_message=True,
                                          tokenize=True, return_dict=False)
            assert ours.encode_chat(msgs, False, True) == want, (template, answer)
        msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": [{"type": "text", "text": "Ok"}]}]
        assert ours.encode_chat(msgs, False, True) == hf.apply_chat_template(
            msgs, add_generation_prompt=False, continue_final_message=True, tokenize=True, return_dict=False)
    ours.chat_template = builtin.tokenizer_config()["chat_template"]
    typed = ours.encode_chat([{"role": "user", "content": "hi"}, {"role": "assistant", "content": f"a {ours.eos_token}"}],
                             False, True)
    assert ours.eos_token_id not in typed and ours.decode(typed, skip_special_tokens=False).endswith(f"a {ours.eos_token}")
    for msgs, gen in (([{"role": "user", "content": "hi"}], True), ([{"role": "assistant", "content": " "}], False)):
        with pytest.raises(ChatTemplateError):
            ours.encode_chat(msgs, gen, True)
