"""Decode steps replayed from CUDA graphs captured at bucketed batch sizes.

A decode-only step (one token per sequence, no prefill) costs a few milliseconds of kernel
launches in eager mode on a GPU, more than the kernels themselves for a small model. Captured
once per batch-size bucket at start-up, the step is one graph launch. The graph reads its inputs
from static buffers: a step of ``n`` sequences copies its metadata into the first ``n`` rows of
the bucket ``b >= n`` and pads the rest with rows that read and write only a scratch KV block
that no request ever owns. The attention kernels' grids depend only on the bucket and the block
table's width (``max_blocks``, fixed), never on the contexts, which is what makes them capturable.

On the CPU (for tests) the same runner "replays" by running the forward pass on the static
buffers: the bucketing, padding and copying are the same code.

With LoRA adapters loaded, the graphs hold them too, in their dense form (``lora.LoraRows``): each
row's adapter slot is one more static input (0 for none, and for padding rows), so a decode step
whose requests use adapters replays like any other.
"""

from __future__ import annotations

import contextlib
import gc
import logging
from collections.abc import Callable, Iterator
from unittest import mock

import numpy as np
import torch

from dyn_actor.engine.model import ForwardBatch, LlamaModel
from dyn_actor.kv.pool import KvPool

log = logging.getLogger(__name__)


def graph_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then steps of 8 to 64 and of 16 beyond, up to ``max_batch`` (at most 512)."""
    top = max(1, min(max_batch, 512))
    sizes = {1, 2, 4, 8, *range(16, 65, 8), *range(80, 513, 16)}
    out = sorted(s for s in sizes if s < top)
    return [*out, top]


@contextlib.contextmanager
def quiet_capture() -> Iterator[None]:
    """Captures without the full collection and cache flush ``torch.cuda.graph`` runs on entering
    each one: with hundreds of captures over a heap holding torch and transformers they would take
    seconds of start-up (the pool is handed to each capture anyway)."""
    with mock.patch.object(gc, "collect", lambda *a, **k: 0), \
            mock.patch.object(torch.cuda, "empty_cache", lambda: None):
        yield


class DecodeGraphs:
    def __init__(self, model: LlamaModel, pool: KvPool, max_batch: int, max_blocks: int, scratch_block: int) -> None:
        self.model, self.pool = model, pool
        self.buckets = graph_buckets(max_batch)
        self.max_batch, self.max_blocks, self.scratch = self.buckets[-1], max_blocks, scratch_block
        dev = pool.device
        n = self.max_batch
        # the graphs' inputs: the per-row values (token, position, slot block, slot offset, context
        # length, LoRA adapter slot) in one [6, n] tensor, the block table in another; each has a host
        # twin (pinned on a GPU) that a step fills in place and copies over whole, one copy each
        self.vec = torch.zeros((6, n), dtype=torch.long, device=dev)
        self.vec[2].fill_(scratch_block)
        self.vec[4].fill_(1)
        self.ids, self.positions, self.slot_blocks, self.slot_offsets, self.ctx, self.lora_slot = self.vec.unbind(0)
        self.lora = model.has_adapters  # the graphs apply the adapters of rows whose slot is set
        self.table = torch.full((n, max_blocks), scratch_block, dtype=torch.long, device=dev)
        self.rows = torch.arange(n, device=dev)
        pin = dev.type == "cuda"
        # two sets of host twins, used in turn: with the engine's overlapped steps the host fills one
        # step's inputs while the previous step's copy of the other set may still be queued
        self._twins = []
        for _ in range(2):
            host_vec = self.vec.cpu().pin_memory() if pin else self.vec.clone()
            host_table = self.table.cpu().pin_memory() if pin else self.table.clone()
            # what each host table row holds: (a request's block list, how many of its entries); the
            # block manager's lists only grow while a request owns them, so an entry written stays right
            row_held: list[tuple[list[int] | None, int]] = [(None, 0)] * n
            self._twins.append((host_vec, host_table, host_vec.numpy(), host_table.numpy(), row_held))
        self._turn = 0
        self._use(0)
        self._replays: dict[int, tuple[Callable[[], None], torch.Tensor]] = {}
        self._mempool = None

    def _use(self, turn: int) -> None:
        self._turn = turn
        self.host_vec, self._host_table, self._host_vec_np, self._host_table_np, self._row_held = self._twins[turn]

    def _static(self, b: int) -> ForwardBatch:
        return ForwardBatch(self.ids[:b], self.positions[:b], self.slot_blocks[:b], self.slot_offsets[:b], b,
                            self.table[:b], self.ctx[:b], None, [], self.rows[:b])

    def _forward(self, b: int) -> torch.Tensor:
        """The forward pass of bucket ``b`` on the static inputs (captured, or run as a CPU replay)."""
        rows = self.model.lora_rows
        if self.lora:
            rows.row_slot = self.lora_slot[:b]
        try:
            return self.model.forward(self._static(b), self.pool)
        finally:
            rows.clear()

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket, the largest first (the smaller ones reuse its memory pool)."""
        if self.pool.device.type != "cuda":
            for b in self.buckets:
                out = torch.empty(0)

                def replay(b: int = b) -> None:
                    self._replays[b] = (self._replays[b][0], self._forward(b))

                self._replays[b] = (replay, out)
            return
        self._mempool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm up (Triton compiles, cuBLAS picks its kernels) outside the capture
                self._forward(self.max_batch)
        torch.cuda.current_stream().wait_stream(stream)
        with quiet_capture():
            for b in reversed(self.buckets):
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self._mempool):
                    out = self._forward(b)
                self._replays[b] = (graph.replay, out)
        torch.cuda.synchronize()
        log.info("captured decode graphs for batch sizes %s", ",".join(map(str, self.buckets)))

    def set_table_row(self, row: int, blocks: list[int], n: int) -> None:
        """Make host table row ``row`` start with ``blocks[:n]``, writing only what it lacks: a
        sequence that keeps its row from step to step adds one entry per ``block_size`` tokens."""
        held, k = self._row_held[row]
        if held is blocks:
            if k >= n:
                return
            self._host_table_np[row, k:n] = blocks[k:n]
        else:
            self._host_table_np[row, :n] = blocks[:n]
        self._row_held[row] = (blocks, n)

    @torch.inference_mode()
    def replay_rows(self, ids: list[int], positions: list[int], slot_blocks: list[int], width: int,
                    fill: Callable[[torch.Tensor], None] | None = None,
                    lora_slots: list[int] | None = None) -> torch.Tensor:
        """Replay a step of ``len(ids)`` sequences (their block tables set with ``set_table_row``):
        the logits of its rows. Slot offsets and context lengths follow from the positions. ``fill``
        then writes, on the device, input tokens the host does not have yet (sampled by the step
        before, still queued) into the static ids. ``lora_slots``: each row's adapter (graphs that
        hold adapters only; None: none for every row)."""
        n = len(ids)
        v = self._host_vec_np
        v[0, :n] = ids
        v[1, :n] = positions
        v[2, :n] = slot_blocks
        if self.lora:
            v[5, :n] = 0 if lora_slots is None else lora_slots
        np.remainder(v[1, :n], self.pool.layout.block_size, out=v[3, :n])
        np.add(v[1, :n], 1, out=v[4, :n])
        return self.replay_host(n, width, fill)

    @torch.inference_mode()
    def replay_host(self, n: int, width: int, fill: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
        """Replay the bucket that holds ``n`` rows the caller wrote into the host twins (``width``
        table columns used); the logits of rows ``[0, n)``. The next replay fills the other twins."""
        b = next(s for s in self.buckets if s >= n)
        if width > self.max_blocks:
            raise ValueError(f"a block table of {width} blocks, the graphs hold {self.max_blocks}")
        v = self._host_vec_np
        if b > n:  # padding rows: one token of context, in the scratch block
            v[0, n:b] = 0
            v[1, n:b] = 0
            v[2, n:b] = self.scratch
            v[3, n:b] = 0
            v[4, n:b] = 1
            v[5, n:b] = 0
            self._host_table_np[n:b, 0] = self.scratch
            self._row_held[n:b] = [(None, 0)] * (b - n)
        self.vec.copy_(self.host_vec, non_blocking=True)
        self.table[:b].copy_(self._host_table[:b], non_blocking=True)
        if fill is not None:
            fill(self.ids)
        self._use(1 - self._turn)
        replay, _ = self._replays[b]
        replay()
        return self._replays[b][1][:n]
