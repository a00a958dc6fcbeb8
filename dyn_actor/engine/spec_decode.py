"""Speculative decoding with n-gram drafts (prompt lookup), as vLLM's
``--speculative-config '{"method": "ngram", ...}'``.

A decode step normally computes one token per request. When the last few tokens of a request
(an n-gram of ``prompt_lookup_min`` to ``prompt_lookup_max`` tokens) occurred earlier in its
prompt or output, the tokens that followed that occurrence are a cheap guess of what comes
next: the *draft*. The step then computes the request's input token and its ``k`` draft tokens
together (a short chunk over the cached KV, causal within it, as chunked prefill does) and gets
``k + 1`` logits rows from one pass. The rows check the draft left to right:

- a greedy request keeps draft tokens while each equals the argmax of the row before it, then
  takes that row's argmax: exactly the tokens that ``k + 1`` plain greedy steps would give;
- a random request keeps draft token ``d`` with probability ``p(d)`` (``p``: the row's
  distribution after temperature, top-k, top-p and min-p); at the first draft token refused it
  draws from ``p`` with ``d`` taken out, and after a draft kept whole it draws one more token from
  the last row. A draft is one token with certainty (q = 1 at ``d``), so this is the rejection
  sampling of Leviathan et al. and Chen et al. (2023): each emitted token has the distribution
  plain sampling gives it.

So a step emits between 1 and ``k + 1`` tokens per request, at the cost of one pass over
``k + 1`` query tokens. Where outputs repeat their input (editing, extraction, code, a model in a
loop) most drafts are kept and a request's tokens come several a pass; where they do not, a
drafted row costs the extra positions' compute for nothing. It pays where a step is bound by
reading the weights (small batches on a GPU) and loses where compute is the bound (large
batches); it is off unless asked for, as in vLLM.

The KV of refused draft tokens is written into the request's blocks and simply overwritten
later: a request's computed length moves only over the tokens kept, and its blocks are entered
in the prefix cache (and reported to the router) only up to there.
"""

from __future__ import annotations

import json
from array import array
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dyn_actor.engine.h2d import to_device
from dyn_actor.engine.sampling import draw_from, processed
from dyn_actor.protocol import SamplingParams

#: the most draft tokens a step may check per request
MAX_SPECULATIVE_TOKENS = 16
#: the longest n-gram looked up
MAX_LOOKUP = 64


@dataclass(frozen=True)
class SpeculativeConfig:
    """vLLM's ``speculative_config`` for its ``ngram`` method: ``num_speculative_tokens`` draft
    tokens at most per step, from the longest n-gram of ``prompt_lookup_min`` to
    ``prompt_lookup_max`` tokens that ends the request's tokens and occurred before."""

    num_speculative_tokens: int
    prompt_lookup_max: int = 5
    prompt_lookup_min: int = 5
    method: str = "ngram"

    @classmethod
    def parse(cls, value: str | dict | None) -> SpeculativeConfig | None:
        """From a JSON object (text, or a dict from a YAML config), checked as vLLM checks it; a
        ``ValueError`` with a one-line message for anything else. None or "" for none."""
        if value is None or value == "" or value == {}:
            return None
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ValueError(f"--speculative-config must be a JSON object: {e}") from None
        if value == {}:
            return None
        if not isinstance(value, dict):
            raise ValueError("--speculative-config must be a JSON object, e.g. "
                             '\'{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4}\'')
        known = {"method", "num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min"}
        unknown = sorted(set(value) - known)
        if "model" in unknown:
            raise ValueError("--speculative-config: the native engine drafts by n-gram lookup only "
                             '("method": "ngram"), not with a draft model')
        if unknown:
            raise ValueError(f"--speculative-config: unknown key(s) {', '.join(unknown)} "
                             f"(known: {', '.join(sorted(known))})")
        method = value.get("method", "ngram")
        if method not in ("ngram", "[ngram]"):
            raise ValueError(f"--speculative-config: method {method!r} is not supported by the native engine "
                             "(ngram only)")

        def integer(key: str, lo: int, hi: int) -> int | None:
            v = value.get(key)
            if v is None:
                return None
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise ValueError(f"--speculative-config: {key} must be an integer from {lo} to {hi}, got {v!r}")
            return v

        k = integer("num_speculative_tokens", 1, MAX_SPECULATIVE_TOKENS)
        if k is None:
            raise ValueError("--speculative-config: num_speculative_tokens is required")
        hi = integer("prompt_lookup_max", 1, MAX_LOOKUP)
        lo = integer("prompt_lookup_min", 1, MAX_LOOKUP)
        if hi is None and lo is None:
            hi = lo = 5  # vLLM's default
        hi = lo if hi is None else hi
        lo = hi if lo is None else lo
        if lo > hi:
            raise ValueError(f"--speculative-config: prompt_lookup_min ({lo}) must not exceed "
                             f"prompt_lookup_max ({hi})")
        return cls(k, hi, lo)

    def to_dict(self) -> dict:
        return {"method": self.method, "num_speculative_tokens": self.num_speculative_tokens,
                "prompt_lookup_max": self.prompt_lookup_max, "prompt_lookup_min": self.prompt_lookup_min}


class NgramProposer:
    """Drafts by prompt lookup. A request's tokens are kept packed (4 bytes each) in a ``bytearray``
    that grows with them, so a lookup is ``bytearray.find``, a C-speed scan: a few microseconds for
    thousands of tokens, where a Python loop over the tokens would cost a step's worth."""

    def __init__(self, config: SpeculativeConfig) -> None:
        self.k = config.num_speculative_tokens
        self.lo = config.prompt_lookup_min
        self.hi = config.prompt_lookup_max

    @staticmethod
    def packed(tokens: Sequence[int], buf: bytearray | None) -> bytearray:
        """``buf`` (the packing of a prefix of ``tokens``, or None) brought up to date."""
        if buf is None:
            buf = bytearray()
        have = len(buf) >> 2
        if have > len(tokens):  # not a prefix any more (never, as requests only grow): start again
            buf = bytearray()
            have = 0
        if have < len(tokens):
            buf += array("i", tokens[have:]).tobytes()
        return buf

    def propose(self, tokens: Sequence[int], k: int, buf: bytearray) -> list[int]:
        """Up to ``k`` tokens that followed the earliest earlier occurrence of the longest n-gram
        (``lo`` to ``hi`` tokens) that ends ``tokens`` (packed in ``buf``); [] where none occurred.
        An occurrence ends before the last token, so at least one token follows it."""
        n_tok = len(tokens)
        end = (n_tok - 1) * 4
        for n in range(min(self.hi, n_tok - 1), self.lo - 1, -1):
            pattern = bytes(buf[(n_tok - n) * 4:])
            i = buf.find(pattern, 0, end)
            while i != -1 and i & 3:  # a match across token boundaries: look further
                i = buf.find(pattern, i + 1, end)
            if i != -1:
                start = (i >> 2) + n
                return list(tokens[start:start + k])
        return []


@dataclass
class Verified:
    """What checking one request's draft gave: the tokens to emit (the draft tokens kept, then one
    from the model) and how many draft tokens were kept."""

    tokens: list[int]
    accepted: int


def verify(logits: torch.Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator | None],
           drafts: Sequence[Sequence[int]]) -> list[Verified]:
    """Check each request's draft against its ``len(draft) + 1`` rows of ``logits`` (float32, the
    requests' rows one after another), with one device-to-host copy for the whole batch.

    The requests here ask for no penalties, logit bias, logprobs or grammar (the engine drafts
    for no such request). A seeded request takes two uniform numbers per row from its own
    generator, whatever else is in the batch."""
    counts = [len(d) + 1 for d in drafts]
    n = sum(counts)
    if logits.shape[0] != n:
        raise ValueError(f"{logits.shape[0]} logits rows for drafts that check {n}")
    greedy = [p.greedy for p in params]
    cols = [t for d in drafts for t in (*d, 0)]
    if all(greedy):
        out = logits.argmax(dim=-1).tolist()
        acc = [o == c for o, c in zip(out, cols)]
    else:
        dev = logits.device
        # each row's parameters (its request's), its draft token and whether it has one
        per_request = [(1.0 if g else p.temperature, float(p.top_k if p.top_k > 0 and not g else 0),
                        1.0 if g else p.top_p, p.min_p, 1.0 if g else 0.0) for p, g in zip(params, greedy)]
        per_row = [v for v, c in zip(per_request, counts) for _ in range(c)]
        has_draft = [1.0 if j < c - 1 else 0.0 for c in counts for j in range(c)]
        rows = torch.cat([torch.tensor(per_row, dtype=torch.float32).t(),
                          torch.tensor([cols, has_draft], dtype=torch.float32)])
        u = torch.rand(2, n)  # per row: whether to keep its draft token, and the draw after a refusal
        row = 0
        for gen, g, c in zip(generators, greedy, counts):
            if gen is not None and not g:
                u[:, row:row + c] = torch.rand((c, 2), generator=gen).t()
            row += c
        table = to_device(torch.cat([rows, u]), dev)
        temps, top_k_f, top_p_t, min_p_t, greedy_t, col_t, drafted, u_keep, u_draw = table.unbind(0)
        # each row's distribution as plain sampling makes it (per-row parameters: row-wise repeated)
        row_params = [p for p, c in zip(params, counts) for _ in range(c)]
        row_greedy = [g for g, c in zip(greedy, counts) for _ in range(c)]
        probs = processed(logits, row_params, row_greedy, temps, top_k_f, top_p_t, min_p_t).softmax(dim=-1)
        col = col_t.long().unsqueeze(1)
        keep = u_keep < probs.gather(1, col).squeeze(1)
        # a refused draft token's row draws from the rest (its own probability taken out); the
        # last row of each request (no draft token) draws from the whole row
        rest = probs.scatter(1, col, torch.where(drafted.bool(), 0.0, probs.gather(1, col).squeeze(1)).unsqueeze(1))
        drawn = draw_from(rest, u_draw)
        top = logits.argmax(dim=-1)
        g = greedy_t.bool()
        drawn = torch.where(g, top, drawn)
        keep = torch.where(g, top == col.squeeze(1), keep)
        host = torch.cat([drawn, keep.long()]).tolist()
        out, acc = host[:n], [bool(v) for v in host[n:]]
    result = []
    row = 0
    for d, c in zip(drafts, counts):
        a = 0
        while a < c - 1 and acc[row + a]:
            a += 1
        result.append(Verified([*d[:a], out[row + a]], a))
        row += c
    return result
