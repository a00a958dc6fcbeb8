"""A request's state inside the engine."""

from __future__ import annotations

import enum

import torch

from dyn_actor.engine.sampling import PenaltyState, SamplingParams, make_generator
from dyn_actor.protocol import Logprobs


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    WAITING_FOR_REMOTE_KV = "waiting_for_remote_kv"
    FINISHED = "finished"


class Request:
    __slots__ = (
        "request_id",
        "prompt_token_ids",
        "params",
        "output_token_ids",
        "all_token_ids",
        "num_computed_tokens",
        "num_cached_tokens",
        "status",
        "generator",
        "eos_token_ids",
        "max_tokens",
        "finish_reason",
        "stop_reason",
        "num_preemptions",
        "hold_blocks",
        "penalty",
        "prompt_logprobs",
        "prompt_logprobs_sent",
        "pending_step",
        "pending_row",
        "grammar",
        "spec_token_ids",
        "ngram_buf",
        "lora",
        "lora_root",
        "pooling",
        "pool_acc",
        "allowed",
    )

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        eos_token_ids: tuple[int, ...],
        max_tokens: int,
    ) -> None:
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.params = params
        self.output_token_ids: list[int] = []
        self.all_token_ids = list(prompt_token_ids)
        self.num_computed_tokens = 0
        self.num_cached_tokens = -1  # prefix-cache hit at first schedule; -1 until known
        self.status = RequestStatus.WAITING
        self.generator: torch.Generator | None = make_generator(params.seed)
        # allowed_token_ids as a set (a drawn token outside it means no token was left: ``engine._emit``)
        self.allowed = None if params.allowed_token_ids is None else frozenset(params.allowed_token_ids)
        self.eos_token_ids = () if params.ignore_eos else eos_token_ids
        self.max_tokens = max_tokens
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.num_preemptions = 0
        self.hold_blocks = False  # keep the KV blocks after finishing (a prefill worker reads them)
        self.penalty: PenaltyState | None = None  # token counts for the penalties (made when first sampled)
        # prompt_logprobs asked: one entry per prompt token computed so far (the first has none)
        self.prompt_logprobs: list[Logprobs | None] | None = [None] if params.prompt_logprobs is not None else None
        self.prompt_logprobs_sent = False
        # overlapped steps: the queued step that sampled this request's next token, not yet appended
        # (the token is its row ``pending_row`` of that step's samples); None when there is none
        self.pending_step: object | None = None
        self.pending_row = -1
        self.grammar = None  # a structured output's GrammarState (engine/structured.py), or None
        # speculative decoding: the draft tokens this step checks after the input token (spec_decode.py),
        # and the request's tokens packed for the n-gram lookup
        self.spec_token_ids: list[int] = []
        self.ngram_buf: bytearray | None = None
        # a LoRA adapter's slot in the model (0: none) and the parent hash of the request's first
        # KV block (lora.lora_root; None: the base model's root)
        self.lora = 0
        self.lora_root: int | None = None
        # an embedding request: how its hidden states are pooled (LAST, MEAN, CLS; pooling.py), and what
        # its chunks gave so far (MEAN: their sum; LAST, CLS: the row); None for a generating request
        self.pooling: str | None = None
        self.pool_acc: torch.Tensor | None = None

    def pool_positions(self, start: int, end: int) -> range:
        """The positions in ``[start, end)`` whose final hidden states an embedding request pools."""
        if self.pooling == "MEAN":
            return range(start, end)
        if self.pooling == "CLS":
            return range(0, 1) if start == 0 < end else range(0)
        last = self.num_tokens - 1
        return range(last, last + 1) if start <= last < end else range(0)

    @property
    def pools_every_position(self) -> bool:
        """MEAN and CLS pooling need positions a cached prefix would skip: such a request takes no hit."""
        return self.pooling in ("MEAN", "CLS")

    def prompt_logprob_positions(self, start: int, end: int) -> range:
        """The positions in ``[start, end)`` whose logits give prompt logprobs still missing (position
        j's logits score prompt token j + 1); empty unless ``prompt_logprobs`` was asked."""
        if self.prompt_logprobs is None:
            return range(0)
        lo = max(start, len(self.prompt_logprobs) - 1)
        hi = min(end, len(self.prompt_token_ids) - 1)
        return range(lo, hi) if lo < hi else range(0)

    @property
    def prompt_logprobs_pending(self) -> bool:
        return self.prompt_logprobs is not None and len(self.prompt_logprobs) < len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    def check_stop(self, max_model_len: int) -> bool:
        """After a token was appended: set finish_reason/stop_reason and return True if the request is done."""
        tok = self.output_token_ids[-1]
        n = len(self.output_token_ids)
        if n >= self.params.min_tokens:
            if tok in self.eos_token_ids:
                self.finish_reason, self.stop_reason = "stop", None
                return True
            if tok in self.params.stop_token_ids:
                self.finish_reason, self.stop_reason = "stop", tok
                return True
        if n >= self.max_tokens or self.num_tokens >= max_model_len:
            self.finish_reason = "length"
            return True
        return False

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, {self.status.value}, prompt={self.num_prompt_tokens}, "
            f"out={self.num_output_tokens}, computed={self.num_computed_tokens})"
        )
