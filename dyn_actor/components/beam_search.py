"""Beam search for the OpenAI routes (vLLM's ``use_beam_search``), run by the frontend over ordinary
one-token requests, as vLLM's server runs it.

Each step asks one token of every live beam (its prompt: the request's prompt and the beam's
tokens so far) with the top ``2 * width`` log-probabilities; every alternative extends its beam by
that token, adding its log-probability to the beam's sum. An end-of-sequence alternative finishes
its beam (unless ``ignore_eos``); of the others, the ``width`` with the highest sums live on. After
``max_tokens`` steps the finished and the live beams are ranked by their sum over their length to
the power ``length_penalty`` (prompt included, end-of-sequence not, as vLLM and transformers score
them) and the best ``width`` are the answer.

The steps' requests go through the router like any other: a beam's prompt repeats the one before
with one more token, so the prefix cache (and the KV-aware router) makes each step a one-block
prefill. The engine needs nothing of its own for it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass


@dataclass
class Beam:
    tokens: list[int]  # generated so far (an end-of-sequence token that finished it is not among them)
    logprob: float = 0.0  # the sum of its tokens' log-probabilities (the end-of-sequence one's too)
    finish_reason: str | None = None  # "stop": it drew an end-of-sequence token; else it ran to the end
    stop_token: int | None = None  # that token


def score(beam: Beam, prompt_len: int, length_penalty: float) -> float:
    """A beam's rank: its log-probability over its length (prompt and tokens) to ``length_penalty``."""
    return beam.logprob / (max(prompt_len + len(beam.tokens), 1) ** length_penalty)


#: the alternatives for the next token of each beam given (its tokens): (token id, log-probability) pairs
Expand = Callable[[list[list[int]]], Awaitable[list[Sequence[tuple[int, float]]]]]


async def beam_search(expand: Expand, prompt_len: int, width: int, max_tokens: int, eos_ids: Collection[int],
                      ignore_eos: bool = False, length_penalty: float = 1.0) -> list[Beam]:
    """The best ``width`` beams, best first (module docstring). ``expand`` gives each live beam's
    alternatives for its next token (the caller asks for ``2 * width`` of them)."""
    live = [Beam([])]
    done: list[Beam] = []
    for _ in range(max_tokens):
        grown: list[tuple[float, int, Beam]] = []
        for beam, alternatives in zip(live, await expand([b.tokens for b in live])):
            for token, lp in alternatives:
                total = beam.logprob + lp
                if token in eos_ids and not ignore_eos:
                    done.append(Beam(beam.tokens, total, "stop", token))
                else:
                    grown.append((total, token, beam))
        grown.sort(key=lambda g: -g[0])  # (stable: ties keep the beams' order, then the alternatives')
        live = [Beam([*beam.tokens, token], total) for total, token, beam in grown[:width]]
        if not live:
            break
    for beam in live:
        beam.finish_reason = "length"
    return sorted(done + live, key=lambda b: score(b, prompt_len, length_penalty), reverse=True)[:width]
