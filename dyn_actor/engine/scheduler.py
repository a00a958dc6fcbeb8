"""Continuous batching with chunked prefill, prefix caching and preemption by recompute.

Each step has a token budget. Running requests are served first (a decode
token each, or the next chunk of an unfinished prefill), oldest first; then
waiting requests are admitted, their prefix-cache hits skipped, their prompt
cut into chunks that fit the budget. When blocks run out, the most recently
admitted running request is preempted: its blocks are freed and it goes back
to the head of the queue, to be recomputed (mostly from the prefix cache).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from dyn_actor.engine.request import Request, RequestStatus
from dyn_actor.kv.block_manager import BlockManager

# prompt tokens a step computes for a request that asked for prompt logprobs: each has a logits row
# (the vocabulary wide, in float32, and its log-softmax), which this bounds (512 x 128k: 256 MiB)
SCORED_CHUNK = 512


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 128
    max_num_batched_tokens: int = 2048
    #: cap on one request's prefill chunk per step (0: only the step budget caps it)
    long_prefill_token_threshold: int = 0


@dataclass
class SchedulerOutput:
    scheduled: list[tuple[Request, int]] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    admitted: list[Request] = field(default_factory=list)  # scheduled for the first time

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.scheduled)


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager) -> None:
        if config.max_num_batched_tokens < 1 or config.max_num_seqs < 1:
            raise ValueError("max_num_batched_tokens and max_num_seqs must be positive")
        self.config = config
        self.bm = block_manager
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.remote: dict[str, Request] = {}  # allocated, KV being written by a prefill worker
        # frees a request's blocks; the engine defers it while a queued step still writes them
        self.release: Callable[[str], None] = block_manager.free
        # speculative decoding: (request, token budget left) -> the draft tokens for a decode row to
        # check this step (spec_decode.py); None: off
        self.propose: Callable[[Request, int], list[int]] | None = None

    # ------------------------------------------------------------------ state
    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running) + len(self.remote)

    def add(self, req: Request) -> None:
        req.status = RequestStatus.WAITING
        self.waiting.append(req)

    def finish(self, req: Request, free_blocks: bool = True) -> None:
        """Remove a request that has ended (stop, length, abort) and free its blocks unless told not to."""
        if req.status is RequestStatus.RUNNING:
            self.running.remove(req)
        elif req.status is RequestStatus.WAITING:
            self.waiting.remove(req)
        elif req.status is RequestStatus.WAITING_FOR_REMOTE_KV:
            del self.remote[req.request_id]
        req.status = RequestStatus.FINISHED
        if free_blocks:
            self.release(req.request_id)

    # ------------------------------------------------------------ remote KV
    def allocate_remote(self, req: Request) -> bool:
        """Allocate blocks for the whole prompt without computing it (prefix hits are shared)."""
        hits = self.bm.find_cached_prefix(req.all_token_ids, max_tokens=req.num_tokens - 1, root=req.lora_root)
        if self.bm.allocate(req.request_id, req.num_tokens, hits, root=req.lora_root) is None:
            return False
        req.num_computed_tokens = len(hits) * self.bm.block_size
        req.num_cached_tokens = req.num_computed_tokens
        req.status = RequestStatus.WAITING_FOR_REMOTE_KV
        self.remote[req.request_id] = req
        return True

    def resume_remote(self, req: Request) -> None:
        """The prompt's KV is in place: decode from here on."""
        del self.remote[req.request_id]
        req.num_computed_tokens = req.num_prompt_tokens
        self.bm.cache_full_blocks(req.request_id, req.all_token_ids, req.num_computed_tokens)
        req.status = RequestStatus.RUNNING
        self.running.append(req)

    def fallback_to_local(self, req: Request) -> None:
        """A remote prefill failed: compute the prompt here, keeping blocks already allocated."""
        del self.remote[req.request_id]
        req.status = RequestStatus.WAITING
        self.waiting.appendleft(req)

    # --------------------------------------------------------------- schedule
    def _chunk(self, req: Request, budget: int, computed: int | None = None) -> int:
        """Tokens to compute for ``req`` this step, from ``computed`` (default: its progress so far)."""
        done = req.num_computed_tokens if computed is None else computed
        n = min(req.num_tokens - done, budget)
        if self.config.long_prefill_token_threshold > 0:
            n = min(n, self.config.long_prefill_token_threshold)
        if req.prompt_logprobs is not None:
            n = min(n, SCORED_CHUNK)
        return n

    def _preempt(self, req: Request) -> None:
        self.release(req.request_id)
        req.spec_token_ids = []
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        req.status = RequestStatus.WAITING
        self.waiting.appendleft(req)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        cap = self.config.long_prefill_token_threshold
        running = self.running
        extend = self.bm.extend
        propose = self.propose
        i = 0
        while i < len(running) and budget > 0:  # the hot loop of every decode step: kept lean
            req = running[i]
            # a token sampled by a queued step, not appended yet, is computed next like one that is
            n = min(len(req.all_token_ids) + (req.pending_step is not None) - req.num_computed_tokens, budget)
            if 0 < cap < n:
                n = cap
            if n > SCORED_CHUNK and req.prompt_logprobs is not None:
                n = SCORED_CHUNK
            if n <= 0:
                i += 1
                continue
            if propose is not None and n == 1 and req.pending_step is None:
                # a decode row checks a draft where one is found and its blocks can grow without preempting
                draft = propose(req, budget)
                if draft and extend(req.request_id, req.num_computed_tokens + 1 + len(draft)):
                    n += len(draft)
                else:
                    draft = []
                req.spec_token_ids = draft
            allocated = True
            while not extend(req.request_id, req.num_computed_tokens + n):
                victim = self.running.pop()
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is req:
                    allocated = False
                    break
            if not allocated:
                break
            out.scheduled.append((req, n))
            budget -= n
            i += 1
        if out.preempted:
            return out
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            if req.pending_step is not None:  # preempted with its last token still on the device
                break
            hits = []
            if not self.bm.has_request(req.request_id):
                limit = req.num_tokens - 1
                if req.prompt_logprobs is not None:  # the positions that score missing prompt tokens are computed
                    limit = min(limit, len(req.prompt_logprobs) - 1)
                if req.pools_every_position:
                    limit = 0
                hits = self.bm.find_cached_prefix(req.all_token_ids, max_tokens=limit, root=req.lora_root)
                computed = len(hits) * self.bm.block_size
            else:  # blocks kept from a failed remote prefill
                computed = req.num_computed_tokens
            n = self._chunk(req, budget, computed)
            if self.bm.allocate(req.request_id, computed + n, hits, root=req.lora_root) is None:
                break
            self.waiting.popleft()
            req.num_computed_tokens = computed
            if req.num_cached_tokens < 0:
                req.num_cached_tokens = computed
                out.admitted.append(req)
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            out.scheduled.append((req, n))
            budget -= n
        return out
