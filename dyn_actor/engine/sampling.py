"""Sampling parameters and the batched sampler.

Each row of a batch has its own parameters. Greedy rows take the argmax of
the raw logits; random rows apply temperature, top-k, top-p and min-p, then
draw by the exponential race (``argmax(p / E)``, ``E ~ Exp(1)``), with the
noise for a seeded request drawn from that request's own generator: a seeded
request samples the same tokens whatever else is in the batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dyn_actor.protocol import _GREEDY_EPS, Logprobs, SampleResult, SamplingParams  # noqa: F401  (re-exported)


def make_generator(seed: int | None) -> torch.Generator | None:
    if seed is None:
        return None
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None) -> torch.Tensor:
    """Mask (to -inf) what top-k / top-p exclude, per row. ``top_k`` rows of 0 and ``top_p`` rows of 1 are off."""
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


def sample(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
) -> SampleResult:
    """Sample one token per row of float32 ``logits`` (modified in place by masks the caller applied).

    On a GPU: the rows' parameters go over in one host-to-device copy, and the tokens (with the
    logprob figures when any row asks for them) come back in one device-to-host copy."""
    n = logits.shape[0]
    dev = logits.device
    raw = logits
    greedy = [p.greedy for p in params]
    if all(greedy):
        tokens = logits.argmax(dim=-1)
    else:
        # one table of every row's parameters: temperature, top-k, top-p, min-p, greedy
        table = torch.tensor([[1.0 if g else p.temperature for p, g in zip(params, greedy)],
                              [float(p.top_k if p.top_k > 0 else 0) for p in params],
                              [p.top_p for p in params],
                              [p.min_p for p in params],
                              [1.0 if g else 0.0 for g in greedy]], dtype=torch.float32)
        if dev.type != "cpu":
            table = table.to(dev)  # one small copy: pinning a fresh buffer each step would cost more
        temps, top_k_f, top_p_t, min_p_t, greedy_t = table.unbind(0)
        x = logits / temps.unsqueeze(1)
        top_k = top_k_f.long() if any(p.top_k > 0 and not g for p, g in zip(params, greedy)) else None
        top_p = top_p_t if any(p.top_p < 1.0 and not g for p, g in zip(params, greedy)) else None
        x = apply_top_k_top_p(x, top_k, top_p)
        if any(p.min_p > 0.0 and not g for p, g in zip(params, greedy)):
            x = apply_min_p(x, min_p_t)
        probs = x.softmax(dim=-1)
        noise = torch.empty_like(probs).exponential_()
        for i in range(n):
            if generators[i] is not None and not greedy[i]:
                # a seeded row draws from its own (CPU) generator: the same tokens on every device
                row = torch.empty(probs.shape[1], dtype=probs.dtype).exponential_(generator=generators[i])
                noise[i] = row if dev.type == "cpu" else row.to(dev, non_blocking=True)
        tokens = (probs / noise).argmax(dim=-1)
        if any(greedy):
            tokens = torch.where(greedy_t.bool(), raw.argmax(dim=-1), tokens)
    want = [i for i, p in enumerate(params) if p.logprobs is not None]
    if not want:
        return SampleResult(tokens.tolist(), [None] * n)
    # every row's figures computed together, then copied to the host with the tokens, at once
    kmax = max(params[i].logprobs or 0 for i in want)
    rows = torch.tensor(want)
    rows = rows.to(dev)
    logp = raw.index_select(0, rows).log_softmax(dim=-1)
    chosen = tokens.index_select(0, rows).unsqueeze(1)
    vals = logp.gather(1, chosen)
    ranks = (logp > vals).sum(dim=-1, keepdim=True)
    top_v, top_i = logp.topk(kmax, dim=-1) if kmax else (logp[:, :0], chosen[:, :0])
    # float64 holds token ids and ranks exactly
    figures = torch.cat([vals.double(), ranks.double() + 1, top_v.double(), top_i.double()], dim=1)
    packed = torch.cat([tokens.double(), figures.flatten()]).tolist()
    token_list = [int(t) for t in packed[:n]]
    lp: list[Logprobs | None] = [None] * n
    width = 2 + 2 * kmax
    for j, i in enumerate(want):
        row = packed[n + j * width: n + (j + 1) * width]
        k = params[i].logprobs or 0
        tv, ti = row[2:2 + kmax], row[2 + kmax:]
        lp[i] = Logprobs(token_list[i], row[0], int(row[1]), [(int(ti[m]), tv[m]) for m in range(k)])
    return SampleResult(token_list, lp)
