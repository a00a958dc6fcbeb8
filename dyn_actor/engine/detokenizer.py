"""Incremental detokenization and stop strings: where the text is.

``IncrementalDetokenizer`` turns a growing list of token ids into text deltas
that never end in a broken UTF-8 sequence, and whose concatenation, once
``finish()`` is called, equals a full decode of the same tokens.
``TextStream`` adds stop strings on top, holding back just enough text that a
stop string split across tokens is never streamed to the client.
"""

from __future__ import annotations

from collections.abc import Sequence

from dyn_actor.engine.tokenizer import Tokenizer

REPLACEMENT_CHAR = "\ufffd"
# tokens decoded before the new ones, so word-boundary spaces come out right
_CONTEXT_TOKENS = 6


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = (), skip_special_tokens: bool = True):
        self._tok = tokenizer
        self._skip = skip_special_tokens
        ctx = list(prompt_ids[-_CONTEXT_TOKENS:])
        self._ids: list[int] = ctx
        self._num_context = len(ctx)
        self._prefix_offset = 0
        self._read_offset = len(ctx)
        self.text = ""

    @property
    def token_ids(self) -> list[int]:
        return self._ids[self._num_context :]

    def add(self, token_ids: Sequence[int]) -> str:
        """Append tokens; return the new text that is safe to show (possibly empty)."""
        if not token_ids:
            return ""
        self._ids.extend(token_ids)
        last = self._ids[-1]
        if self._tok.byte_fallback_ids and (
            last in self._tok.byte_fallback_ids or (self._skip and last in self._tok.special_ids)
        ):
            # a run of byte tokens decodes as a unit (skipped special tokens do not
            # break it): wait until a normal token ends the run
            return ""
        decode = self._tok.decode
        prefix = decode(self._ids[self._prefix_offset : self._read_offset], self._skip)
        full = decode(self._ids[self._prefix_offset :], self._skip)
        if len(full) <= len(prefix) or full.endswith(REPLACEMENT_CHAR) or not full.startswith(prefix):
            return ""  # an incomplete character (or nothing yet): wait for more tokens
        delta = full[len(prefix) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        self.text += delta
        return delta

    def finish(self) -> str:
        """Flush whatever is held back so that ``text`` equals a full decode; return that delta."""
        target = self.full_text()
        if target.startswith(self.text):
            delta = target[len(self.text) :]
            self.text = target
            return delta
        # Cannot un-send text; this only happens with decoders whose output
        # depends on far-away tokens. Keep what was streamed.
        return ""

    def full_text(self) -> str:
        if self._num_context:
            ctx = self._ids[: self._num_context]
            both = self._tok.decode(self._ids, self._skip)
            head = self._tok.decode(ctx, self._skip)
            if both.startswith(head):
                return both[len(head) :]
        return self._tok.decode(self.token_ids, self._skip)


class TextStream:
    """Per-request text output: detokenization, stop strings and stream hold-back."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_ids: Sequence[int] = (),
        stop: Sequence[str] = (),
        include_stop_str_in_output: bool = False,
        skip_special_tokens: bool = True,
    ) -> None:
        self.detok = IncrementalDetokenizer(tokenizer, prompt_ids, skip_special_tokens)
        self.stop = [s for s in stop if s]
        self.include_stop = include_stop_str_in_output
        self._hold = max((len(s) for s in self.stop), default=1) - 1
        self.sent = 0  # characters of detok.text already returned
        self.final_text: str | None = None
        self.stop_reason: str | None = None

    def update(self, token_ids: Sequence[int], finished: bool, stop_token: bool = False) -> tuple[str, bool]:
        """Feed new tokens; return (text to send now, whether a stop string ended the request).
        ``stop_token``: the last token ended the request (an end-of-sequence or a ``stop_token_ids``
        token): its text is left out unless ``include_stop_str_in_output``, as vLLM does."""
        if self.final_text is not None:
            return "", True
        before = len(self.detok.text)
        if stop_token and finished and not self.include_stop:
            token_ids = token_ids[:-1]
        self.detok.add(token_ids)
        if finished:
            self.detok.finish()
        text = self.detok.text
        if self.stop:
            start = max(0, before - self._hold - 1)
            hit_at, hit = -1, None
            for s in self.stop:
                i = text.find(s, start)
                if i != -1 and (hit_at == -1 or i < hit_at):
                    hit_at, hit = i, s
            if hit is not None:
                end = hit_at + (len(hit) if self.include_stop else 0)
                self.final_text = text[:end]
                self.stop_reason = hit
                out = self.final_text[self.sent :]
                self.sent = len(self.final_text)
                return out, True
        limit = len(text) if finished else max(self.sent, len(text) - self._hold)
        out = text[self.sent : limit]
        self.sent = limit
        if finished:
            self.final_text = text
        return out, False

    @property
    def text(self) -> str:
        return self.final_text if self.final_text is not None else self.detok.text[: self.sent]
