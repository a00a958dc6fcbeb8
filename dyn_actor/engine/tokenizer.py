"""Tokenizer and chat template of a model folder (or of the built-in model).

Wraps a ``tokenizers.Tokenizer`` (from ``tokenizer.json``) and renders the
Jinja chat template from ``chat_template.jinja`` or ``tokenizer_config.json``,
the two places current ``transformers`` writes it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import tokenizers

from dyn_actor.engine.model_config import ModelLoadError
from dyn_actor.protocol import MAX_BAD_WORDS


class ChatTemplateError(ValueError):
    """The request's messages cannot be rendered with the model's chat template."""


def _token_content(tok: Any) -> str | None:
    if tok is None:
        return None
    if isinstance(tok, dict):
        return tok.get("content")
    return str(tok)


class Tokenizer:
    def __init__(
        self,
        tokenizer: tokenizers.Tokenizer,
        chat_template: str | None = None,
        bos_token: str | None = None,
        eos_token: str | None = None,
        add_bos_token: bool | None = None,
        named_templates: dict[str, str] | None = None,
    ) -> None:
        self._tk = tokenizer
        self.chat_template = chat_template
        # a tokenizer_config's named templates ([{"name", "template"}]): "tool_use" is the one for a
        # conversation with tools, as transformers picks it
        self.named_templates = {k: v for k, v in (named_templates or {}).items() if k and v}
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.bos_token_id = tokenizer.token_to_id(bos_token) if bos_token else None
        self.eos_token_id = tokenizer.token_to_id(eos_token) if eos_token else None
        # Some conversions rely on the config's add_bos_token rather than the
        # post-processor; add the BOS ourselves only when the post-processor does not.
        self._manual_bos = False
        if add_bos_token and self.bos_token_id is not None:
            probe = tokenizer.encode("a", add_special_tokens=True).ids
            self._manual_bos = not probe or probe[0] != self.bos_token_id
        self.special_ids = frozenset(k for k, t in tokenizer.get_added_tokens_decoder().items() if t.special)
        self._templates: dict[str, Any] = {}  # compiled, by source
        self.byte_fallback_ids = _byte_fallback_ids(tokenizer)
        self._special_texts: tuple[str, ...] | None = None
        self._plain: tokenizers.Tokenizer | None = None

    # ---------------------------------------------------------------- loading
    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        tk_file = path / "tokenizer.json"
        if not tk_file.is_file():
            raise ModelLoadError(f"{path} has no tokenizer.json (a fast tokenizer file is required)")
        tk = tokenizers.Tokenizer.from_file(str(tk_file))
        cfg: dict[str, Any] = {}
        if (path / "tokenizer_config.json").is_file():
            cfg = json.loads((path / "tokenizer_config.json").read_text())
        template = None
        if (path / "chat_template.jinja").is_file():
            template = (path / "chat_template.jinja").read_text()
        elif (path / "chat_template.json").is_file():
            template = json.loads((path / "chat_template.json").read_text()).get("chat_template")
        else:
            template = cfg.get("chat_template")
        named = None
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default") or next(iter(named.values()), None)
        return cls(
            tk,
            chat_template=template,
            bos_token=_token_content(cfg.get("bos_token")),
            eos_token=_token_content(cfg.get("eos_token")),
            add_bos_token=cfg.get("add_bos_token"),
            named_templates=named,
        )

    def set_chat_template(self, source: str) -> None:
        """Serve with this chat template instead of the model's (``--chat-template``); compiled now,
        so a template that does not compile fails at start (``ModelLoadError``)."""
        compiled = compile_chat_template(source)
        self.chat_template, self.named_templates, self._templates = source, {}, {source: compiled}

    # ------------------------------------------------------------- properties
    @property
    def vocab_size(self) -> int:
        return self._tk.get_vocab_size(with_added_tokens=True)

    @property
    def backend(self) -> tokenizers.Tokenizer:
        return self._tk

    # ----------------------------------------------------------- (de)tokenize
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # encode_batch lets go of the GIL while it works (encode does not): a long text tokenized on
        # another thread does not stop this process's event loop
        ids = self._tk.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        if add_special_tokens and self._manual_bos and (not ids or ids[0] != self.bos_token_id):
            ids = [self.bos_token_id, *ids]  # type: ignore[list-item]
        return ids

    def encode_pair(self, first: str, second: str) -> list[int]:
        """Two texts as one input, with the special tokens the tokenizer puts around and between a
        pair (a cross-encoder's query and document; transformers' ``text_pair``)."""
        if self._manual_bos:  # no BOS in the post-processor: one before each text, as transformers' Llama does
            return self.encode(first) + self.encode(second)
        return self._tk.encode_batch([(first, second)], add_special_tokens=True)[0].ids

    def bad_words_ids(self, words: Sequence[str]) -> list[list[int]]:
        """vLLM's ``bad_words`` as token sequences: each word as written (leading spaces dropped) and,
        where that spells it differently in as many tokens, after a space (a word inside a text).
        ``ValueError`` for a word that is no token at all, or past ``MAX_BAD_WORDS`` sequences."""
        out: list[list[int]] = []
        for word in words:
            bare = self.encode(word.lstrip(), add_special_tokens=False)
            if not bare:
                raise ValueError(f"bad_words entry {word!r} is no token at all")
            out.append(bare)
            spaced = self.encode(" " + word.lstrip(), add_special_tokens=False)
            if spaced and spaced[0] != bare[0] and len(spaced) == len(bare):
                out.append(spaced)
            if len(out) > MAX_BAD_WORDS:
                raise ValueError(f"bad_words come to more than {MAX_BAD_WORDS} token sequences")
        return out

    def truncate_text(self, text: str, max_tokens: int) -> str:
        """``text`` cut, at a token's first character, to at most ``max_tokens`` tokens (0: empty)."""
        while text:
            enc = self._tk.encode_batch([text], add_special_tokens=False)[0]
            if len(enc.ids) <= max_tokens:
                break
            cut = enc.offsets[max_tokens][0] if max_tokens else 0
            text = text[:min(cut, len(text) - 1)]
        return text

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tk.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tk.id_to_token(token_id)

    # ---------------------------------------------------------- chat template
    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        **extra: Any,
    ) -> str:
        source = self.named_templates.get("tool_use") if extra.get("tools") else None
        source = source or self.chat_template
        if not source:
            raise ChatTemplateError("this model has no chat template: use /v1/completions with a plain prompt, "
                                    "or start the server with --chat-template")
        template = self._templates.get(source)
        if template is None:
            template = self._templates[source] = compile_chat_template(source)
        try:
            return template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
                **extra,
            )
        except ChatTemplateError:
            raise
        except Exception as e:  # jinja errors, template-raised errors
            raise ChatTemplateError(f"chat template failed: {e}") from None

    def render_template(self, source: str, messages: list[dict[str, Any]], **extra: Any) -> str:
        """Messages rendered by the template ``source`` (not the model's), without a generation prompt
        (a cross-encoder's query and document pair, ``--chat-template``)."""
        template = self._templates.get(source)
        if template is None:
            template = self._templates[source] = compile_chat_template(source)
        try:
            return template.render(messages=messages, add_generation_prompt=False, bos_token=self.bos_token or "",
                                   eos_token=self.eos_token or "", **extra)
        except Exception as e:  # jinja errors, template-raised errors
            raise ChatTemplateError(f"chat template failed: {e}") from None

    def encode_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                    continue_final_message: bool = False, **extra: Any) -> list[int]:
        """The rendered conversation's token ids. Special tokens come only from the template: text
        in a message that spells one (a user typing ``</s>``) is tokenized as the text it is.

        ``continue_final_message``: the conversation ends inside its last message, whose text the
        model goes on with (an answer begun for it): the render, without a generation prompt, cut
        right after that text (what transformers' ``apply_chat_template`` of that name does)."""
        if continue_final_message:
            if add_generation_prompt:
                raise ChatTemplateError("continue_final_message and add_generation_prompt cannot both be true")
            if not messages or not any(t.strip() for t in _texts(messages[-1].get("content"))):
                raise ChatTemplateError("continue_final_message needs a last message with text to continue")
        if not any(self._spells_special(t) for m in messages for t in _texts(m.get("content"))):
            text = self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, **extra)
            if continue_final_message:
                text = _cut_after_final(text, _texts(messages[-1].get("content"))[-1])
            # the template writes the BOS itself when the model wants one
            return self.encode(text, add_special_tokens=False)
        # render with every message text replaced by a placeholder; then the template's own text is
        # tokenized with its special tokens, and the messages' text as plain text
        originals: list[str] = []

        def mark(text: str) -> str:
            originals.append(text)
            return f"\ue000{len(originals) - 1}\ue001"

        marked = [{**m, "content": _map_texts(m.get("content"), mark)} for m in messages]
        rendered = self.apply_chat_template(marked, add_generation_prompt=add_generation_prompt, **extra)
        if continue_final_message:  # the last placeholder is the last message's last text
            last = f"\ue000{len(originals) - 1}\ue001"
            if last not in rendered:
                raise ChatTemplateError("continue_final_message: the chat template does not write the last "
                                        "message's text")
            rendered = rendered[:rendered.rindex(last) + len(last)]
        ids: list[int] = []
        for i, piece in enumerate(_PLACEHOLDER.split(rendered)):
            if i % 2:  # a placeholder's index
                ids.extend(self._plain_tokenizer().encode_batch([originals[int(piece)]], add_special_tokens=False)[0].ids)
            elif piece:
                ids.extend(self._tk.encode_batch([piece], add_special_tokens=False)[0].ids)
        return ids

    def _spells_special(self, text: str) -> bool:
        if self._special_texts is None:
            decoder = self._tk.get_added_tokens_decoder()
            self._special_texts = tuple(t.content for t in decoder.values() if t.special and t.content)
        return any(s in text for s in self._special_texts)

    def _plain_tokenizer(self) -> tokenizers.Tokenizer:
        """A copy of the tokenizer that reads special-token text as plain text."""
        if self._plain is None:
            plain = tokenizers.Tokenizer.from_str(self._tk.to_str())
            plain.encode_special_tokens = True
            self._plain = plain
        return self._plain


def _cut_after_final(rendered: str, final: str) -> str:
    """``rendered`` up to the end of its last occurrence of the text ``final``, as the template
    wrote it: with its trailing spaces where it kept them (a template may strip a message)."""
    core = final.strip()
    at = rendered.rfind(core)
    if at < 0:
        raise ChatTemplateError("continue_final_message: the chat template does not write the last message's text")
    keep = final.lstrip()
    end = at + len(keep) if rendered[at:at + len(keep)] == keep else at + len(core)
    return rendered[:end]


_PLACEHOLDER = re.compile("\ue000([0-9]+)\ue001")


def _texts(content: Any) -> list[str]:
    if isinstance(content, str):
        return [content]
    if isinstance(content, list):
        return [p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)]
    return []


def _map_texts(content: Any, fn) -> Any:
    if isinstance(content, str):
        return fn(content)
    if isinstance(content, list):
        return [{**p, "text": fn(p["text"])} if isinstance(p, dict) and isinstance(p.get("text"), str) else p
                for p in content]
    return content


def _byte_fallback_ids(tk: tokenizers.Tokenizer) -> frozenset[int]:
    """Ids of ``<0xXX>`` byte tokens when the decoder merges runs of them (SentencePiece byte fallback).

    Such a run decodes as a unit: one invalid byte turns the whole run into
    replacement characters, so text is final only once the run has ended.
    """
    try:
        decoder = json.dumps(json.loads(tk.to_str()).get("decoder"))
    except Exception:
        return frozenset()
    if "ByteFallback" not in decoder:
        return frozenset()
    ids = (tk.token_to_id(f"<0x{i:02X}>") for i in range(256))
    return frozenset(i for i in ids if i is not None)


def compile_chat_template(source: str):  # -> jinja2.Template
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise ChatTemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys=False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateError as e:
        raise ModelLoadError(f"the chat template does not compile: {e}") from None
