"""Sparse mixture-of-experts MLPs: Mixtral, Qwen2-MoE and Qwen3-MoE.

On a sparse layer each token's hidden row goes to a router (one linear map to a score per
expert), the softmax of the scores picks the ``top_k`` experts, and the token's MLP output is the
sum of those experts' SwiGLU MLPs weighted by their probabilities (renormalised over the chosen
ones where the model says so: Mixtral always, Qwen by ``norm_topk_prob``). Qwen2-MoE adds a shared
expert that every token passes through, scaled by a sigmoid gate of its own.

The experts' weights are stacked: ``w13`` ``[E, 2I, H]`` (each expert's gate rows, then its up rows,
as the dense MLP fuses them) and ``w2`` ``[E, H, I]``. Two ways to run them:

- ``experts_loop`` (the CPU, and a GPU with ``--enforce-eager``): group the (token, expert)
  assignments by expert, then per expert that has any, two matrix products over its tokens and a
  weighted scatter-add. The number of tokens per expert is read on the host, so the step cannot
  be captured in a CUDA graph.
- ``triton_moe.fused_experts`` (the Triton path): the same grouping done on the device with fixed
  sizes, then one grouped matrix-product kernel per projection over tiles of one expert's rows,
  so decode steps replay from CUDA graphs like a dense model's.

Routing follows transformers' order of operations (router logits in the activations' dtype,
softmax in float32, ``torch.topk``, weights cast back), so float32 greedy tokens match it.
"""

from __future__ import annotations

from collections.abc import Callable, Container

import torch
import torch.nn.functional as F

from dyn_actor.engine.model_config import ModelConfig, ModelLoadError
from dyn_actor.native_ops import linear_bf16, linear_bf16_lib


class SparseMoe:
    __slots__ = ("gate", "w13", "w2", "top_k", "renormalize", "shared_gu", "shared_down", "shared_gate", "triton",
                 "bf16")

    def __init__(self, gate: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, top_k: int, renormalize: bool,
                 shared: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None, triton: bool = False,
                 native: bool = False) -> None:
        self.gate, self.w13, self.w2 = gate, w13, w2
        self.top_k, self.renormalize = top_k, renormalize
        # bfloat16 on the CPU (``native``): one sequence's router and experts through the C kernel
        self.bf16 = linear_bf16_lib() if native and w13.dtype == torch.bfloat16 and w13.device.type == "cpu" else None
        # Qwen2-MoE: the shared expert's fused gate/up [2I, H], its down [H, I], and its gate [1, H]
        self.shared_gu, self.shared_down, self.shared_gate = shared if shared is not None else (None, None, None)
        self.triton = triton

    @property
    def num_experts(self) -> int:
        return self.gate.shape[0]

    def route(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's experts ``[T, top_k]`` (int64) and their weights (in ``h``'s dtype)."""
        logits = F.linear(h, self.gate) if self.bf16 is None or h.shape[0] != 1 else \
            linear_bf16(self.bf16, h, self.gate, None, torch.get_num_threads())
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        weights, experts = torch.topk(probs, self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights.to(h.dtype), experts

    def __call__(self, h: torch.Tensor, silu_mul: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        weights, experts = self.route(h)
        if self.triton:
            from dyn_actor.engine.triton_moe import fused_experts

            out = fused_experts(h, self.w13, self.w2, weights, experts, silu_mul)
        else:
            out = experts_loop(h, self.w13, self.w2, weights, experts, silu_mul, self.bf16)
        if self.shared_gu is not None:
            shared = F.linear(silu_mul(F.linear(h, self.shared_gu)), self.shared_down)
            out = out + torch.sigmoid(F.linear(h, self.shared_gate)) * shared
        return out


#: the padded batched form when most experts are in use and padding at most doubles the rows computed
#: (or adds no more than this many: a decode step's few rows a expert cost little against its weights)
PADDED_SLACK_ROWS = 2048
PADDED = True  # False: always the per-expert form (tests)


def experts_loop(h: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor,
                 silu_mul: Callable[[torch.Tensor], torch.Tensor], bf16=None) -> torch.Tensor:
    """``sum_j weights[t, j] * expert_{experts[t, j]}(h[t])`` for every row ``t``, grouped by expert.

    The assignments (row, j) are sorted by expert. A step that uses most experts, where padding each
    expert's rows to the busiest expert's count at most doubles the rows (or adds fewer than
    ``PADDED_SLACK_ROWS``: a decode step of many sequences), runs every expert in two batched products:
    a few large operations that stream the stacked weights instead of five small ones per expert.
    Otherwise (a prefill whose tokens crowd a few experts) two products per expert in use; a single
    row (one sequence's decode) goes through its experts directly (7% of a bf16 decode step on the
    benchmark's 8-layer model, against grouping it), by the C kernel where ``bf16`` is its library."""
    t, top_k = experts.shape
    if t == 1:  # one sequence's decode step: its experts one after the other, nothing to group
        out = None
        threads = torch.get_num_threads()
        for j, ex in enumerate(experts[0].tolist()):
            if bf16 is not None:
                act = silu_mul(linear_bf16(bf16, h, w13[ex], None, threads))
                y = linear_bf16(bf16, act, w2[ex], None, threads) * weights[0, j]
            else:
                y = F.linear(silu_mul(F.linear(h, w13[ex])), w2[ex]) * weights[0, j]
            out = y if out is None else out + y
        return out
    e = w13.shape[0]
    flat = experts.reshape(-1)
    order = torch.argsort(flat, stable=True)  # assignments (row * top_k + j) grouped by expert
    counts = torch.bincount(flat, minlength=e).tolist()
    rows_sorted = torch.div(order, top_k, rounding_mode="floor")
    scale = weights.reshape(-1)[order, None]
    out = torch.zeros_like(h)
    width = max(counts)
    if PADDED and t > 1 and 2 * sum(1 for n in counts if n) > e and e * width <= max(2 * t * top_k, PADDED_SLACK_ROWS):
        expert_sorted = flat[order]
        first = torch.tensor([0] + counts[:-1], device=h.device).cumsum(0)
        slot = torch.arange(order.shape[0], device=h.device) - first[expert_sorted]  # place within its expert
        pick = torch.full((e, width), t, dtype=torch.long, device=h.device)  # row t: a row of zeros
        pick[expert_sorted, slot] = rows_sorted
        x = torch.cat([h, h.new_zeros((1, h.shape[1]))])[pick]
        act = silu_mul(torch.bmm(x, w13.transpose(1, 2)).view(e * width, -1)).view(e, width, -1)
        y = torch.bmm(act, w2.transpose(1, 2))[expert_sorted, slot]
        return out.index_add_(0, rows_sorted, y * scale)
    start = 0
    for ex, n in enumerate(counts):
        if not n:
            continue
        rows = rows_sorted[start : start + n]
        y = F.linear(silu_mul(F.linear(h.index_select(0, rows), w13[ex])), w2[ex])
        out.index_add_(0, rows, y * scale[start : start + n])
        start += n
    return out


def silu_mul_torch(gu: torch.Tensor) -> torch.Tensor:
    inter = gu.shape[-1] // 2
    return F.silu(gu[:, :inter]) * gu[:, inter:]


def load_sparse_moe(cfg: ModelConfig, layer: int, take: Callable[..., torch.Tensor | None], names: Container[str],
                    triton: bool, native: bool = False) -> SparseMoe:
    """Layer ``layer``'s experts from a checkpoint, in any of the names transformers writes: Mixtral's
    ``block_sparse_moe.experts.J.w1/w3/w2``, Qwen's ``mlp.experts.J.gate_proj/up_proj/down_proj``, or
    the stacked ``mlp.experts.gate_up_proj`` ``[E, 2I, H]`` / ``mlp.experts.down_proj`` ``[E, H, I]``.
    ``take(name, required=True)`` returns the tensor on the model's device and dtype; ``names`` are the
    checkpoint's tensor names (which naming it uses is read from them, nothing copied to find out)."""
    e, h, inter = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
    p = f"layers.{layer}."
    prefix = p + "block_sparse_moe." if p + "block_sparse_moe.gate.weight" in names else p + "mlp."
    gate = take(prefix + "gate.weight")
    if tuple(gate.shape) != (e, h):
        raise ModelLoadError(f"{prefix}gate.weight has shape {tuple(gate.shape)}, config says ({e}, {h})")
    x = prefix + "experts."
    if x + "gate_up_proj" in names:
        w13, w2 = take(x + "gate_up_proj"), take(x + "down_proj")
    else:
        g, u, d = ("w1", "w3", "w2") if x + "0.w1.weight" in names else ("gate_proj", "up_proj", "down_proj")
        w13 = torch.stack([torch.cat([take(f"{x}{j}.{g}.weight"), take(f"{x}{j}.{u}.weight")]) for j in range(e)])
        w2 = torch.stack([take(f"{x}{j}.{d}.weight") for j in range(e)])
    if tuple(w13.shape) != (e, 2 * inter, h) or tuple(w2.shape) != (e, h, inter):
        raise ModelLoadError(f"layer {layer}'s experts have shapes {tuple(w13.shape)} and {tuple(w2.shape)}, "
                             f"config says ({e}, {2 * inter}, {h}) and ({e}, {h}, {inter})")
    shared = None
    if cfg.shared_expert_intermediate_size:
        s = prefix + "shared_expert."
        shared = (torch.cat([take(s + "gate_proj.weight"), take(s + "up_proj.weight")]).contiguous(),
                  take(s + "down_proj.weight"), take(prefix + "shared_expert_gate.weight"))
    return SparseMoe(gate, w13.contiguous(), w2.contiguous(), cfg.experts_per_token, cfg.norm_topk_prob, shared,
                     triton=triton, native=native)
