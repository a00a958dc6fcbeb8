"""Sampling parameters and the batched sampler.

Each row of a batch has its own parameters. Repetition, frequency and
presence penalties come first where a request asks for them (``PenaltyState``
keeps its token counts on the device), then the request's ``logit_bias``.
Greedy rows take the argmax of the logits; random rows apply temperature,
top-k, top-p and min-p, then draw by inverting the row's cumulative
distribution at one uniform number ``u``: the first token whose cumulative
probability exceeds ``u`` times the row's total. A seeded request draws its ``u`` from its own generator, and a
row's softmax and prefix sum do not depend on the other rows: a seeded request
samples the same tokens whatever else is in the batch.

One number a row, not one a vocabulary entry: the exponential race
(``argmax(p / E)``, ``E ~ Exp(1)``, what this sampler did before) drew a
random number for every entry of the vocabulary, and PyTorch's CPU
``exponential_`` costs about 20 ns a number: 47 ms a step for 64 rows of a
32k vocabulary, where the prefix sum and search take about 2.5 ms
(``benchmarks/sampling.py``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from dyn_actor.engine.h2d import to_device, to_device_many
from dyn_actor.protocol import _GREEDY_EPS, Logprobs, SampleResult, SamplingParams  # noqa: F401  (re-exported)


def make_generator(seed: int | None) -> torch.Generator | None:
    if seed is None:
        return None
    g = torch.Generator()
    g.manual_seed(seed)
    return g


#: how many of each row's largest logits top-k / top-p look at first: enough for the nucleus of a
#: trained model's next-token distribution nearly always; a row whose nucleus reaches past them is
#: done by sorting the whole row
TOP_CANDIDATES = 128


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None,
                      max_k: int | None = None, unbounded_top_p: bool = True) -> torch.Tensor:
    """Mask (to -inf) what top-k / top-p exclude, per row. ``top_k`` rows of 0 and ``top_p`` rows of 1
    are off; ``max_k`` (the largest ``top_k``, known to the caller without a device sync) may be given.
    ``unbounded_top_p``: whether a row may have top-p on and top-k off (the caller knows from the
    parameters); only such a row's nucleus can reach past the candidates. On a GPU a Triton kernel
    then finds those rows' thresholds over the whole row (``triton_sampling``), with nothing read
    back; elsewhere this learns which rows they are (a wait for the device) and sorts them whole.

    Top-p keeps the smallest set of the likeliest tokens whose probability (after top-k) reaches p.
    Both are found among each row's ``TOP_CANDIDATES`` (or ``max_k``) largest logits: a partial
    selection instead of sorting the whole vocabulary (on the CPU: 6 vs 169 ms for 64 rows of a
    32k vocabulary). Tokens tied with the last one kept are kept too."""
    if top_k is None and top_p is None:
        return logits
    n, vocab = logits.shape
    if max_k is None:
        max_k = int(top_k.max()) if top_k is not None else 0
    c = min(vocab, max(TOP_CANDIDATES, max_k))
    vals = logits.topk(c, dim=-1).values  # [n, c], largest first
    if top_k is not None:
        k = torch.where(top_k <= 0, torch.full_like(top_k, vocab), top_k.clamp(min=1, max=vocab))
    else:
        k = torch.full((n,), vocab, dtype=torch.long, device=logits.device)
    limited = k <= c  # the row's top-k lies among the candidates (every row with top-k on does)
    count = torch.where(limited, k, torch.full_like(k, c))  # candidates kept
    masked = limited.clone() if c < vocab else (k < vocab)
    uncovered = None
    if top_p is not None:
        in_k = torch.arange(c, device=logits.device).unsqueeze(0) < k.unsqueeze(1)
        # each row's distribution: over its top k where top-k applies, else over the whole row
        lse = torch.where(limited, vals.masked_fill(~in_k, float("-inf")).logsumexp(dim=-1), logits.logsumexp(dim=-1))
        probs = (vals - lse.unsqueeze(1)).exp().masked_fill(~in_k, 0.0)
        before = probs.cumsum(dim=-1) - probs  # mass of the likelier candidates
        nucleus = ((before < top_p.unsqueeze(1)) & in_k).sum(dim=-1).clamp(min=1)  # the top token always stays
        on = top_p < 1.0
        count = torch.where(on, torch.minimum(count, nucleus), count)
        masked = masked | on
        if unbounded_top_p:  # a row with top-k on is always limited: its k is at most max_k <= c
            uncovered = on & ~limited & (nucleus >= c) & (c < vocab)
    last = vals.gather(1, (count - 1).clamp(min=0).unsqueeze(1))
    thresh = torch.where(masked.unsqueeze(1), last, torch.full_like(last, float("-inf")))
    if uncovered is not None and _wide_rows_on_device(logits):
        # the rows whose nucleus passed the candidates get their whole-row threshold on the device
        from dyn_actor.engine.triton_sampling import top_p_thresholds

        thresh = thresh.squeeze(1).contiguous()
        top_p_thresholds(logits, lse, top_p, vals[:, 0], uncovered, thresh)
        return logits.masked_fill(logits < thresh.unsqueeze(1), float("-inf"))
    out = logits.masked_fill(logits < thresh, float("-inf"))
    if uncovered is not None and bool(uncovered.any()):
        rows = uncovered.nonzero().squeeze(1)
        out[rows] = sort_top_k_top_p(logits[rows], None if top_k is None else top_k[rows], top_p[rows])
    return out


#: whether rows whose top-p nucleus passes the candidates get their threshold from the Triton kernel
#: (``triton_sampling``: no wait for the device) rather than by sorting them (which must first learn
#: which rows those are); None: on a GPU, where Triton imports. Tests set it under the interpreter;
#: DYN_ACTOR_TOP_P_KERNEL=off turns it off.
DEVICE_WIDE_TOP_P: bool | None = False if os.environ.get("DYN_ACTOR_TOP_P_KERNEL", "").lower() in ("0", "off") else None
_triton_imports: bool | None = None


def _wide_rows_on_device(logits: torch.Tensor) -> bool:
    global _triton_imports
    if DEVICE_WIDE_TOP_P is not None:
        return DEVICE_WIDE_TOP_P
    if logits.device.type != "cuda":
        return False
    if _triton_imports is None:
        try:
            import dyn_actor.engine.triton_sampling  # noqa: F401
            _triton_imports = True
        except ImportError:
            _triton_imports = False
    return _triton_imports


def sort_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None) -> torch.Tensor:
    """``apply_top_k_top_p`` by sorting each row whole: the reference, and the way for rows whose
    nucleus is wider than the candidates."""
    if top_k is None and top_p is None:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=False)
    vocab = logits.shape[-1]
    if top_k is not None:
        k = top_k.clamp(min=1, max=vocab)
        k = torch.where(top_k <= 0, torch.full_like(k, vocab), k)
        kth = sorted_logits.gather(1, (vocab - k).unsqueeze(1))
        sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
    if top_p is not None:
        probs = sorted_logits.softmax(dim=-1)
        cum = probs.cumsum(dim=-1)
        drop = cum <= (1 - top_p).unsqueeze(1)
        drop[:, -1] = False  # always keep the most likely token
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    probs = logits.softmax(dim=-1)
    threshold = probs.amax(dim=-1, keepdim=True) * min_p.unsqueeze(1)
    return logits.masked_fill(probs < threshold, float("-inf"))


class PenaltyState:
    """What the penalties of one request need, kept on the logits' device and caught up with its
    new tokens at each step (not rebuilt from the whole history): which tokens its prompt or output
    holds, and how often each occurs in the output."""

    __slots__ = ("seen", "counts", "n_out")

    def __init__(self, prompt_ids: Sequence[int], vocab: int, device: torch.device) -> None:
        self.seen = torch.zeros(vocab, dtype=torch.bool, device=device)
        self.seen[to_device(torch.tensor(list(prompt_ids), dtype=torch.long), device)] = True
        self.counts = torch.zeros(vocab, dtype=torch.float32, device=device)
        self.n_out = 0

    def catch_up(self, output_ids: Sequence[int]) -> None:
        if len(output_ids) <= self.n_out:
            return
        new = to_device(torch.tensor(list(output_ids[self.n_out:]), dtype=torch.long), self.counts.device)
        self.add(new)
        self.n_out = len(output_ids)

    def add(self, tokens: torch.Tensor) -> None:
        """Count ``tokens`` (on the device) as output."""
        self.counts.index_add_(0, tokens, torch.ones(tokens.shape[0], device=tokens.device))
        self.seen[tokens] = True

    def add_pending(self, tokens: torch.Tensor) -> None:
        """Count a token the host has not seen yet (``tokens``: one, on the device, sampled by a queued
        step): the next ``catch_up`` skips it, as it will be the next token of the output."""
        self.add(tokens)
        self.n_out += 1


def apply_penalties(logits: torch.Tensor, rows: Sequence[int], states: Sequence[PenaltyState],
                    params: Sequence[SamplingParams]) -> None:
    """vLLM's repetition, frequency and presence penalties on ``logits`` rows ``rows`` (in place;
    ``params`` and ``states`` are those rows')."""
    dev = logits.device
    idx, table = to_device_many([torch.tensor(list(rows), dtype=torch.long),
                                 torch.tensor([[p.repetition_penalty for p in params],
                                               [p.frequency_penalty for p in params],
                                               [p.presence_penalty for p in params]], dtype=torch.float32)], dev)
    rep, freq, pres = (t.unsqueeze(1) for t in table.unbind(0))
    counts = torch.stack([s.counts for s in states])
    seen = torch.stack([s.seen for s in states])
    x = logits.index_select(0, idx)
    x = torch.where(seen, torch.where(x > 0, x / rep, x * rep), x)
    x = x - freq * counts - pres * (counts > 0).float()
    logits.index_copy_(0, idx, x)


def apply_logit_bias(logits: torch.Tensor, rows: Sequence[int], biases: Sequence[dict[int, float]]) -> None:
    """Add each row's ``logit_bias`` to its logits (in place): the rows, token ids and values go over
    in one host-to-device copy."""
    r = [row for row, b in zip(rows, biases) for _ in b]
    t = [tok for b in biases for tok in b]
    v = [val for b in biases for val in b.values()]
    idx, vals = to_device_many([torch.tensor([r, t], dtype=torch.long), torch.tensor(v, dtype=torch.float32)],
                               logits.device)
    logits.index_put_((idx[0], idx[1]), vals.to(logits.dtype), accumulate=True)


def processed(logits: torch.Tensor, params: Sequence[SamplingParams], greedy: Sequence[bool], temps: torch.Tensor,
              top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """The logits that random rows draw from: each row's temperature, then top-k, top-p and min-p
    (the tensors: one value a row, on the logits' device; greedy rows have temperature 1 and the
    filters off). What is off in every row is skipped, decided from ``params`` without a device sync."""
    x = logits / temps.unsqueeze(1)
    max_k = max((p.top_k for p, g in zip(params, greedy) if not g), default=0)
    top_p_on = any(p.top_p < 1.0 and not g for p, g in zip(params, greedy))
    unbounded = any(p.top_p < 1.0 and p.top_k <= 0 and not g for p, g in zip(params, greedy))
    x = apply_top_k_top_p(x, top_k.long() if max_k > 0 else None, top_p if top_p_on else None, max_k, unbounded)
    if any(p.min_p > 0.0 and not g for p, g in zip(params, greedy)):
        x = apply_min_p(x, min_p)
    return x


def draw_from(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One token a row of ``probs`` (``[n, vocab]``, rows not necessarily summing to 1 exactly):
    the first whose cumulative probability exceeds ``u`` (``[n]``, in [0, 1)) times the row's
    total. A token of probability 0 is never drawn."""
    cdf = probs.cumsum(dim=-1)
    target = (u * cdf[:, -1]).unsqueeze(1)
    tokens = torch.searchsorted(cdf, target, right=True).squeeze(1).clamp_(max=probs.shape[1] - 1)
    # u * total rounded up to the total (about one draw in 2^24) would land past the last token
    # with any probability: take the likeliest instead
    ok = probs.gather(1, tokens.unsqueeze(1)).squeeze(1) > 0
    return torch.where(ok, tokens, probs.argmax(dim=-1))


class PendingSample:
    """A step's sampling, launched on the device: ``tokens`` (``[n]``, on the device) can feed the next
    step's inputs before the host has seen them; ``result()`` waits for the one device-to-host copy
    (tokens, and the logprob figures when a row asks for them) and unpacks it."""

    __slots__ = ("tokens", "_host", "_event", "_want", "_kmax", "_ks")

    def __init__(self, tokens: torch.Tensor, packed: torch.Tensor, want: list[int], kmax: int, ks: list[int]) -> None:
        self.tokens = tokens
        self._want, self._kmax, self._ks = want, kmax, ks
        self._event = None
        if packed.device.type == "cpu":
            self._host = packed
        else:  # into pinned memory without waiting; the event says when it has landed
            self._host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
            self._host.copy_(packed, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()

    def result(self) -> SampleResult:
        if self._event is not None:
            self._event.synchronize()
        n = self.tokens.shape[0]
        if not self._want:
            return SampleResult(self._host.tolist(), [None] * n)
        packed = self._host.tolist()
        token_list = [int(t) for t in packed[:n]]
        lp: list[Logprobs | None] = [None] * n
        kmax = self._kmax
        width = 2 + 2 * kmax
        for j, (i, k) in enumerate(zip(self._want, self._ks)):
            row = packed[n + j * width: n + (j + 1) * width]
            tv, ti = row[2:2 + kmax], row[2 + kmax:]
            lp[i] = Logprobs(token_list[i], row[0], int(row[1]), [(int(ti[m]), tv[m]) for m in range(k)])
        return SampleResult(token_list, lp)


def sample(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
    penalties: tuple[Sequence[int], Sequence[PenaltyState]] | None = None,
) -> SampleResult:
    """Sample one token per row of float32 ``logits`` (modified in place by masks the caller applied).
    ``penalties``: the rows whose requests ask for penalties, and their ``PenaltyState``; greedy and
    random draws see the penalized logits, logprobs the raw ones (vLLM's default).

    On a GPU: the rows' parameters go over in one host-to-device copy, and the tokens (with the
    logprob figures when any row asks for them) come back in one device-to-host copy."""
    return sample_async(logits, params, generators, penalties).result()


def sample_async(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
    penalties: tuple[Sequence[int], Sequence[PenaltyState]] | None = None,
) -> PendingSample:
    """``sample`` without waiting for the device: the draw is queued, its copy to the host started.
    Nothing here waits for the device on a GPU. (Where Triton is missing or turned off, a row with
    top-p on and top-k off still makes ``apply_top_k_top_p`` wait once: its nucleus may reach past
    the candidates, and it must learn whether one did.)"""
    n = logits.shape[0]
    dev = logits.device
    raw = logits
    biased = [i for i, p in enumerate(params) if p.logit_bias]
    if (penalties is not None or biased) and any(p.logprobs is not None for p in params):
        logits = logits.clone()  # logprobs are the raw logits'
    if penalties is not None:
        rows, states = penalties
        apply_penalties(logits, rows, states, [params[i] for i in rows])
    if biased:
        apply_logit_bias(logits, biased, [params[i].logit_bias for i in biased])
    greedy = [p.greedy for p in params]
    if all(greedy):
        tokens = logits.argmax(dim=-1)
    else:
        # one table of every row's parameters: temperature, top-k, top-p, min-p, greedy, and the row's
        # uniform draw (a seeded row's from its own generator); one host-to-device copy on a GPU
        table = torch.tensor([[1.0 if g else p.temperature for p, g in zip(params, greedy)],
                              [float(p.top_k if p.top_k > 0 and not g else 0) for p, g in zip(params, greedy)],
                              [1.0 if g else p.top_p for p, g in zip(params, greedy)],
                              [p.min_p for p in params],
                              [1.0 if g else 0.0 for g in greedy],
                              [0.0] * n], dtype=torch.float32)
        table[5].uniform_()
        for i, gen in enumerate(generators):
            if gen is not None and not greedy[i]:
                table[5, i] = torch.rand((), generator=gen)
        table = to_device(table, dev)  # one small copy, not waited for
        temps, top_k_f, top_p_t, min_p_t, greedy_t, u = table.unbind(0)
        x = processed(logits, params, greedy, temps, top_k_f, top_p_t, min_p_t)
        tokens = draw_from(x.softmax(dim=-1), u)
        if any(greedy):
            tokens = torch.where(greedy_t.bool(), logits.argmax(dim=-1), tokens)
    want = [i for i, p in enumerate(params) if p.logprobs is not None]
    if not want:
        return PendingSample(tokens, tokens, [], 0, [])
    # every row's figures computed together, then copied to the host with the tokens, at once
    kmax = max(params[i].logprobs or 0 for i in want)
    rows = to_device(torch.tensor(want), dev)
    logp = raw.index_select(0, rows).log_softmax(dim=-1)
    chosen = tokens.index_select(0, rows).unsqueeze(1)
    vals = logp.gather(1, chosen)
    ranks = (logp > vals).sum(dim=-1, keepdim=True)
    top_v, top_i = logp.topk(kmax, dim=-1) if kmax else (logp[:, :0], chosen[:, :0])
    # a masked-out token (a grammar's, min_tokens') among the top: -9999 as vLLM reports it, not -inf
    # (which JSON cannot carry)
    top_v = top_v.clamp(min=-9999.0)
    # float64 holds token ids and ranks exactly
    figures = torch.cat([vals.double(), ranks.double() + 1, top_v.double(), top_i.double()], dim=1)
    packed = torch.cat([tokens.double(), figures.flatten()])
    return PendingSample(tokens, packed, want, kmax, [params[i].logprobs or 0 for i in want])
