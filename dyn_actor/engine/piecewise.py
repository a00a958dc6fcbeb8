"""Prefill and mixed steps from CUDA graphs captured piece by piece around attention.

A decode-only step replays one whole graph (``cuda_graphs.py``). Steps that compute prompt tokens
(a prefill, or new requests' chunks beside running decodes, what most steps under a steady stream
of arrivals are) cannot: the attention kernels' grids follow the prompts. Run eagerly, such a step
of a 16-layer model launches about 160 kernels from Python, ~5 ms on an H100 for work that takes
well under that on the card. Everything but attention works row by row on the step's flat
``[tokens, hidden]`` activations, though, so it is captured per bucket of token counts in
``layers + 1`` pieces: the embedding and layer 0 up to attention; then, for each layer boundary,
the rest of layer ``i`` and layer ``i + 1`` up to attention; then the rest of the last layer. The
attention of each layer runs eagerly between two pieces, reading the QKV rows the piece before
left in a static buffer and writing its output into another that the next piece reads. The final
norm and LM head run eagerly on the rows that are sampled.

Rows past the step's tokens, up to the bucket, are padding: position 0, their KV written into the
scratch block that no request owns; attention leaves their rows alone, and every other operation
keeps rows apart, so they touch nothing real. Steps of more tokens than the largest bucket run
eagerly (there the kernels' own time dominates). On the CPU (tests) the pieces run eagerly on the
same static buffers: the bucketing, padding and copying are the same code.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from dyn_actor.engine.cuda_graphs import quiet_capture
from dyn_actor.engine.model import ForwardBatch, LlamaModel
from dyn_actor.kv.pool import KvPool

log = logging.getLogger(__name__)

#: the largest step (in tokens) that replays pieces; larger ones are compute-bound enough to run eagerly
MAX_TOKENS = 1024


def token_buckets(max_tokens: int) -> list[int]:
    """Powers of two from 8 and the points halfway between them from 48 (a step pads by at most half),
    up to ``max_tokens`` (at most ``MAX_TOKENS``): 13 buckets for 1,024."""
    top = max(1, min(max_tokens, MAX_TOKENS))
    sizes = {8, 16, 32, *(s for k in range(5, 11) for s in (3 << (k - 1), 1 << (k + 1)))}
    return [*sorted(s for s in sizes if s < top), top]


class PiecewiseGraphs:
    def __init__(self, model: LlamaModel, pool: KvPool, max_tokens: int, scratch_block: int) -> None:
        self.model, self.pool = model, pool
        self.buckets = token_buckets(max_tokens)
        self.max_tokens = self.buckets[-1]
        self.num_layers = len(model.layers)
        cfg = model.cfg
        dev, dt = pool.device, model.dtype
        n = self.max_tokens
        # the step's per-token inputs (token, position, slot block, slot offset), and what a padding
        # row holds instead
        self.vec = torch.zeros((4, n), dtype=torch.long, device=dev)
        self.vec[2].fill_(scratch_block)
        self.pad = self.vec.clone()
        self.ids, self.positions, self.slot_blocks, self.slot_offsets = self.vec.unbind(0)
        # the activations that cross from piece to piece and to attention
        self.x = torch.zeros((n, cfg.hidden_size), dtype=dt, device=dev)
        self.qkv = torch.zeros((n, (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim), dtype=dt, device=dev)
        self.attn = torch.zeros((n, cfg.num_heads * cfg.head_dim), dtype=dt, device=dev)
        self.delta = torch.zeros((n, cfg.hidden_size), dtype=dt, device=dev)
        self._replays: dict[int, list[Callable[[], None]]] = {}
        self._graphs: list = []  # the captured graphs (on a GPU), kept alive with their replays
        self._mempool = None

    def _piece(self, p: int, t: int) -> None:
        """Piece ``p`` of a step of ``t`` rows (a bucket), on the static buffers."""
        m, L = self.model, self.num_layers
        x = self.x[:t]
        pos, sb, so = self.positions[:t], self.slot_blocks[:t], self.slot_offsets[:t]
        if p == 0:
            x.copy_(m.embed_tokens(self.ids[:t]))
            delta = None
        else:
            delta = m.post_attention(p - 1, x, self.attn[:t])
        if p < L:
            self.qkv[:t].copy_(m.pre_attention(p, x, delta, pos, sb, so, self.pool))
        else:
            self.delta[:t].copy_(delta)

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every piece of every bucket, the largest bucket first (the pieces share one memory
        pool: they replay one after another). Each bucket runs once eagerly first (Triton compiles
        for its shapes, cuBLAS picks its kernels) outside any capture."""
        pieces = range(self.num_layers + 1)
        if self.pool.device.type != "cuda":
            for b in self.buckets:
                self._replays[b] = [lambda p=p, b=b: self._piece(p, b) for p in pieces]
            return
        self._mempool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for b in self.buckets:
                for p in pieces:
                    self._piece(p, b)
        torch.cuda.current_stream().wait_stream(stream)
        graphs = []
        with quiet_capture():
            for b in reversed(self.buckets):
                replays = []
                for p in pieces:
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=self._mempool):
                        self._piece(p, b)
                    graphs.append(graph)
                    replays.append(graph.replay)
                self._replays[b] = replays
        self._graphs = graphs
        torch.cuda.synchronize()
        log.info("captured prefill/mixed-step pieces (%d per step) for token counts %s", self.num_layers + 1,
                 ",".join(map(str, self.buckets)))

    def fits(self, num_tokens: int) -> bool:
        return num_tokens <= self.max_tokens

    @torch.inference_mode()
    def forward(self, b: ForwardBatch) -> torch.Tensor:
        """``LlamaModel.forward`` of a step of at most ``max_tokens`` tokens (Triton attention): the
        pieces replayed, attention eager between them; float32 logits of ``b.logits_indices``."""
        m = self.model
        t = b.input_ids.shape[0]
        bucket = next(s for s in self.buckets if s >= t)
        for i, src in enumerate((b.input_ids, b.positions, b.slot_blocks, b.slot_offsets)):
            self.vec[i, :t].copy_(src)
        if bucket > t:
            self.vec[:, t:bucket].copy_(self.pad[:, : bucket - t])
        nh, d = m.cfg.num_heads, m.cfg.head_dim
        q = self.qkv[:t, : nh * d].view(t, nh, d)
        out = self.attn[:t].view(t, nh, d)
        replays = self._replays[bucket]
        for i in range(self.num_layers):
            replays[i]()
            m._attention(q, None, None, i, self.pool, b, out=out)
        replays[-1]()
        return m.final_logits(self.x[:t], self.delta[:t], b.logits_indices)
