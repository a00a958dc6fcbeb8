"""Top-p over whole rows on the device (``triton_sampling``, under Triton's interpreter without a GPU):
the same masks as sorting every row, and no read of a device value on the host on the way."""

from __future__ import annotations

import contextlib
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from dyn_actor.engine import SamplingParams, sampling  # noqa: E402
from dyn_actor.engine.sampling import apply_top_k_top_p, make_generator, sample_async, sort_top_k_top_p  # noqa: E402
from dyn_actor.engine.triton_sampling import top_p_thresholds  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _logits(n: int, vocab: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scale = torch.tensor([0.05, 0.3, 1.0, 4.0, 12.0]).repeat(n // 5 + 1)[:n].unsqueeze(1)  # flat to peaked
    x = torch.randn(n, vocab, generator=g) * scale
    x[1, :100] = 1.0  # a run of ties at the top of a flat row, with more than p = 0.5 of the mass
    x[2, ::3] = float("-inf")  # masked entries (by min-p or a grammar, say)
    x[3, 7] = x[3, 11] = x[3].max() + 1.0  # a tie at the top
    return x.to(DEVICE)


@pytest.mark.parametrize("vocab", [300, 4099])
def test_thresholds_equal_sorting(vocab, monkeypatch):
    """Against the candidates' path with every token a candidate (which keeps the ties of the last
    token kept, where sorting keeps one of them), and against sorting where no ties are."""
    n = 10
    x = _logits(n, vocab)
    top_p = torch.tensor([0.9, 0.5, 0.99, 0.3, 0.95, 0.1, 0.999, 0.7, 0.6, 0.8], device=DEVICE)
    need = torch.tensor([True] * (n - 2) + [False, False], device=DEVICE)
    thresh = torch.full((n,), 123.0, device=DEVICE)
    top_p_thresholds(x, x.logsumexp(dim=-1), top_p, x.amax(dim=-1), need, thresh)
    assert thresh[-2:].tolist() == [123.0, 123.0]  # rows not asked for keep what they had
    monkeypatch.setattr(sampling, "TOP_CANDIDATES", vocab)
    want = apply_top_k_top_p(x.clone(), None, top_p) > float("-inf")
    got = x >= thresh.unsqueeze(1)
    assert torch.equal(got[:-2], want[:-2])
    assert got[1].sum() >= 100 and got[3, 7] and got[3, 11]  # ties kept
    no_ties = [0, 2, 4, 5, 6, 7]
    assert torch.equal(got[no_ties], (sort_top_k_top_p(x.clone(), None, top_p) > float("-inf"))[no_ties])
    assert (want[:-2].sum(dim=1) > 1).any() and (want[:-2].sum(dim=1) > vocab // 4).any()  # narrow and wide
    # the threshold is one of the row's own values, the smallest kept
    for r in range(n - 2):
        assert thresh[r] == x[r][got[r]].min()


def test_masks_equal_sorting_through_the_sampler(monkeypatch):
    """``apply_top_k_top_p`` with the kernel for the rows whose nucleus passes the candidates: the
    masks of sorting whole rows, for top-p rows with and without top-k beside them."""
    monkeypatch.setattr(sampling, "TOP_CANDIDATES", 16)
    monkeypatch.setattr(sampling, "DEVICE_WIDE_TOP_P", True)
    n, vocab = 20, 700
    x = _logits(n, vocab, seed=1)
    top_k = torch.tensor([0, 0, 5, 0, 0, 3, 0, 0, 0, 12] * 2, device=DEVICE)
    top_p = torch.tensor([0.9, 0.5, 0.99, 0.3, 1.0, 0.95, 0.999, 0.7, 0.6, 0.8] * 2, device=DEVICE)
    for k in (None, top_k):
        got = apply_top_k_top_p(x.clone(), k, top_p, None if k is None else int(k.max()))
        want = sort_top_k_top_p(x.clone(), k, top_p)
        assert torch.equal(torch.isinf(got), torch.isinf(want))
    wide = (sort_top_k_top_p(x, None, top_p) > float("-inf")).sum(dim=1)
    assert (wide > 16).any() and ((wide > 1) & (wide < 16)).any()  # rows on both sides of the candidates


@contextlib.contextmanager
def _no_host_reads():
    """Fail on any read of a tensor's value on the host (what makes the host wait for a GPU)."""
    def refuse(*a, **k):
        raise AssertionError("a tensor's value was read on the host")

    with contextlib.ExitStack() as stack:
        for name in ("__bool__", "item", "tolist", "__int__", "__float__", "__index__"):
            stack.enter_context(pytest.MonkeyPatch.context()).setattr(torch.Tensor, name, refuse)
        yield


def test_top_p_draws_read_nothing_back(monkeypatch):
    """A batch of top-p rows without top-k, some flat (their nuclei pass the candidates): the draw is
    queued without reading any value back, and gives the tokens the sorting path gives for the same
    seeds."""
    monkeypatch.setattr(sampling, "TOP_CANDIDATES", 16)
    n, vocab = 10, 500
    x = _logits(n, vocab, seed=2)
    params = [SamplingParams(max_tokens=4, temperature=t, top_p=p, seed=s, logprobs=lp)
              for s, (t, p, lp) in enumerate([(1.0, 0.9, None), (0.7, 0.95, 2), (1.0, 0.5, None), (1.3, 0.99, None),
                                               (1.0, 1.0, None), (0.0, 1.0, None), (1.0, 0.8, None),
                                               (0.9, 0.9, 1), (1.0, 0.6, None), (1.0, 0.999, None)])]

    def draw(wide_on_device: bool, guard: bool):
        monkeypatch.setattr(sampling, "DEVICE_WIDE_TOP_P", wide_on_device)
        gens = [make_generator(p.seed) for p in params]
        with _no_host_reads() if guard else contextlib.nullcontext():
            pending = sample_async(x.clone(), params, gens)
        return pending.result()

    got, want = draw(True, guard=True), draw(False, guard=False)
    assert got.token_ids == want.token_ids
    assert got.logprobs == want.logprobs
    with pytest.raises(AssertionError, match="read on the host"):  # the guard catches the sorting path's wait
        draw(False, guard=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="serving sizes: on a GPU (scripts/gpu_check.sh)")
@pytest.mark.parametrize("scale", [0.5, 3.0, 12.0])
def test_serving_sizes_on_the_gpu(scale, monkeypatch):
    """64 rows of Llama 3's vocabulary, flat to peaked, top-p 0.9 and 0.95: the kernel's masks equal
    the candidates' path over whole rows, up to where the two sums of ~100k float32 terms round
    differently: a flat row's tokens carry ~1e-5 each, so the boundary may move by a token there."""
    monkeypatch.setattr(sampling, "DEVICE_WIDE_TOP_P", True)
    n, vocab = 64, 128256
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(n, vocab, generator=g) * scale).to(DEVICE)
    top_p = torch.tensor([0.9, 0.95] * (n // 2), device=DEVICE)
    got = apply_top_k_top_p(x.clone(), None, top_p)
    monkeypatch.setattr(sampling, "TOP_CANDIDATES", vocab)
    want = apply_top_k_top_p(x.clone(), None, top_p)
    kept, kept_want = ~torch.isinf(got), ~torch.isinf(want)
    probs = x.softmax(dim=-1)
    moved = ((kept ^ kept_want) * probs).sum(dim=-1)  # both are thresholds of one row: nested sets
    assert float(moved.max()) < 1e-4
    assert int((kept.sum(dim=-1) != kept_want.sum(dim=-1)).sum()) <= n // 4
    if scale >= 12.0:  # peaked rows: the candidates' nucleus, exactly
        assert torch.equal(kept, kept_want)
