"""The engine a worker drives: ``add_request`` / ``abort_request`` / ``step``.

The core does no I/O: each ``step`` schedules, runs one forward pass over a
flat batch, samples and returns per-request token deltas. Text (incremental
detokenization, stop strings) is handled by whoever holds the tokenizer on the
output side; ``dyn_actor.engine.llm.LLM`` does it for offline use.

Hooks for disaggregated serving:

- ``cached_prefix(tokens)``: which leading blocks are already cached here;
- ``allocate_remote_prefill(...)``: allocate a prompt's blocks without computing it;
- ``finish_remote_prefill(id, first_token)``: the blocks were filled externally,
  continue from the end of the prompt with this first token;
- ``pool.read_blocks`` / ``pool.write_blocks`` (and the byte variants): raw block memory.
"""

from __future__ import annotations

import gc
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field

import msgspec
import torch

from dyn_actor.engine.h2d import to_device, to_device_many
from dyn_actor.engine.loader import LoadedModel, load_model, resolve_device, resolve_dtype
from dyn_actor.engine.model import ForwardBatch, LlamaModel, PrefillMeta, PrefillSeq
from dyn_actor.engine.model_config import ModelLoadError
from dyn_actor.engine.pooling import PoolerConfig, classify, converted, pooler_for, resolve_runner
from dyn_actor.engine.pooling import finish as finish_pooled
from dyn_actor.engine.request import Request, RequestStatus
from dyn_actor.engine.sampling import Logprobs, PenaltyState, PendingSample, SamplingParams, sample, sample_async
from dyn_actor.engine.scheduler import Scheduler, SchedulerConfig
from dyn_actor.engine.spec_decode import NgramProposer, SpeculativeConfig, verify
from dyn_actor.engine.structured import Grammars, GrammarState
from dyn_actor.kv.block_manager import BlockManager
from dyn_actor.kv.events import KvEvent
from dyn_actor.kv.pool import KvLayout, KvPool
from dyn_actor.native_ops import keep_freed_heap

GiB = 1 << 30
_FENCE = "\x00fence:"  # owner name of fenced blocks (no request id from a client can start with NUL)
log = logging.getLogger(__name__)


#: a step with at least this many tokens runs with ``EngineConfig.prefill_threads``
PREFILL_THREADS_MIN_TOKENS = 128
#: ... and so does a decode step of a heavy model: one that takes at least this many core-ms (its time
#: times its threads) and this many core-ms per sampled row. The frontend's work for a streamed token
#: is 50-80 us of a core (docs/benchmarks.md), so past this the core kept for it idles most of the step;
#: a step that falls under half of both goes back to ``num_threads``
WIDE_DECODE_CORE_MS = 4.0
WIDE_DECODE_CORE_MS_PER_ROW = 1.0
#: a wide decode step ``WIDE_DECODE_SLOWER`` times as slow a row as the last narrow one of about its
#: size (the extra core is busy with another process: every parallel region waits for the thread that
#: shares it) sends decode and prefill steps back to ``num_threads`` for ``WIDE_DECODE_BACKOFF_S``
#: seconds before they try again
WIDE_DECODE_BACKOFF_S = 5.0
WIDE_DECODE_SLOWER = 1.5


@dataclass
class EngineConfig:
    model: str = "builtin:tiny"
    dtype: str = "auto"
    block_size: int = 16
    kv_cache_memory: int | None = 1 * GiB  # bytes for the KV pool; None on a GPU: what profiling leaves free
    gpu_memory_utilization: float = 0.9  # share of the card this engine may use (weights, activations, KV)
    num_kv_blocks: int | None = None  # overrides kv_cache_memory
    max_model_len: int | None = None
    max_num_seqs: int = 128
    max_num_batched_tokens: int = 2048
    long_prefill_token_threshold: int = 0
    enable_prefix_caching: bool = True
    num_threads: int | None = None
    # threads for a step that computes many prompt tokens (at least PREFILL_THREADS_MIN_TOKENS); None:
    # num_threads. A prefill step is compute-bound and produces no tokens for the frontend to stream,
    # so the core kept free for the frontend during decoding can help it (docs/benchmarks.md)
    prefill_threads: int | None = None
    native_ops: bool = True  # the C decode-attention kernel (falls back to PyTorch without a compiler)
    device: str = "auto"  # auto: the GPU when torch sees one
    # attention kernels: auto (Triton on a GPU, the C kernel / PyTorch on the CPU), native, torch, or
    # triton (on the CPU only under Triton's interpreter, to test the GPU path)
    attention: str = "auto"
    # decode steps from CUDA graphs: auto (on a GPU), off (--enforce-eager), on (on the CPU: the same
    # bucketing and padding replayed eagerly, for tests)
    cuda_graphs: str = "auto"
    # overlapped steps: while the device runs one step, the host schedules and queues the next (the
    # input tokens that step sampled taken on the device) and only then turns the first step's tokens
    # into outputs. auto: on a GPU; on (also on the CPU, for tests, where with cuda_graphs auto it turns
    # the graph runner on too); off
    async_scheduling: str = "auto"
    # prefill and mixed steps of up to 1,024 tokens from CUDA graphs captured in pieces around attention
    # (piecewise.py): auto (with the decode graphs, on a GPU, Triton attention), on (also on the CPU,
    # replayed eagerly, for tests; needs attention="triton"), off. $DYN_ACTOR_PIECEWISE_GRAPHS sets the default
    piecewise_graphs: str = field(default_factory=lambda: os.environ.get("DYN_ACTOR_PIECEWISE_GRAPHS", "auto"))
    shared_kv: bool = False  # put the KV pool in shared memory, so another process can write blocks into it
    # speculative decoding with n-gram drafts (spec_decode.py); None: off
    speculative: SpeculativeConfig | None = None
    # LoRA adapters served beside the base model, name -> PEFT folder (lora.py); requests pick one by name
    lora_modules: dict[str, str] | None = None
    max_lora_rank: int = 16
    # generate (tokens), or pooling (embeddings: each prompt pooled into one vector, pooling.py); auto:
    # pooling for an embedding model's folder (sentence-transformers files, or a bare ``*Model``)
    runner: str = "auto"
    # how a pooling runner pools (vLLM's --pooler-config, JSON or a dict): pooling_type, normalize
    pooler_config: str | dict | None = None
    # keys set over the model's config.json (vLLM's --hf-overrides): e.g. a causal LM served as a
    # reranker ({"architectures": [...ForSequenceClassification], "classifier_from_token": [...]})
    hf_overrides: dict | None = None
    # vLLM's --convert: classify (a causal LM read as its *ForSequenceClassification), embed (a pooling
    # runner over it), none, auto
    convert: str = "auto"


class RequestOutput(msgspec.Struct, kw_only=True):
    """What one step produced for one request."""

    request_id: str
    new_token_ids: list[int]
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None
    logprobs: list[Logprobs] | None = None
    # prompt_logprobs asked: one per prompt token (None for the first), on the request's first output
    prompt_logprobs: list[Logprobs | None] | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    error: str | None = None  # the step that computed this request failed: it ended with this error
    error_type: str = "EngineError"  # ValueError: the request's own input was at fault (a grammar that does not compile)
    embedding: bytes | None = None  # a pooling request's vector, little-endian float32 (``pooling.finish``)


class RemoteAllocation(msgspec.Struct):
    block_ids: list[int]
    num_cached_tokens: int  # leading prompt tokens whose KV is already in those blocks


class _InFlight:
    """A step queued on the device whose tokens the host has not taken yet: its rows' requests, each
    one's computed-token count after it, the requests it samples (in the order of its samples), the
    sampling under way, and the requests whose blocks are freed once it has run (they ended or were
    preempted while it was queued: it still writes their KV)."""

    __slots__ = ("reqs", "computed", "samplers", "pending", "deferred")

    def __init__(self, reqs: list[Request], computed: list[int], samplers: list[Request],
                 pending: PendingSample) -> None:
        self.reqs, self.computed, self.samplers, self.pending = reqs, computed, samplers, pending
        self.deferred: list[str] = []


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    num_waiting_remote: int
    kv_blocks_used: int
    kv_blocks_total: int
    kv_blocks_cached: int
    prompt_tokens: int
    prefix_cache_hit_tokens: int
    generated_tokens: int
    num_preemptions: int
    spec_drafts: int = 0  # speculative decoding: drafts checked, their tokens, and those kept
    spec_draft_tokens: int = 0
    spec_accepted_tokens: int = 0


CONFLICT = ("no token is left to draw: allowed_token_ids, bad_words and the request's other constraints "
            "(min_tokens, a structured output) rule out every one")


def bad_word_bans(req: Request) -> list[int]:
    """The tokens a request's ``bad_words`` ban at its next token: each word's last, where its output
    so far ends with the rest of the word (a one-token word: always)."""
    out = req.output_token_ids
    banned = []
    for ids in req.params.bad_words_ids:
        k = len(ids) - 1
        if k == 0 or (k <= len(out) and out[len(out) - k:] == ids[:k]):
            banned.append(ids[k])
    return banned


class LLMEngine:
    def __init__(self, config: EngineConfig | None = None, loaded: LoadedModel | None = None) -> None:
        self.config = config = config or EngineConfig()
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self._threads = torch.get_num_threads()
        self._wide_decode = False  # decode steps heavy enough to take the prefill threads too (``_forward``)
        self._narrow_step = (0, 0.0)  # the last narrow decode step's rows and seconds
        self._wide_blocked_until = 0.0  # (self._clock) no wide decode steps before this
        self._clock = time.monotonic  # (tests set their own)
        self._prefill_threads = (config.prefill_threads if config.prefill_threads and config.prefill_threads > self._threads
                                 else 0)
        if config.block_size < 1 or config.block_size > 1024:
            raise ValueError(f"block_size must be between 1 and 1024, got {config.block_size}")
        loaded = loaded or load_model(config.model, converted(config.model, config.convert, config.hf_overrides))
        self.model_name = loaded.name
        self.model_config = cfg = loaded.config
        self.tokenizer = loaded.tokenizer
        self.eos_token_ids = loaded.eos_token_ids
        self.device = torch.device(resolve_device(config.device))
        self.dtype = resolve_dtype(config.dtype, cfg, self.device.type)
        self.attention = config.attention
        if self.attention == "auto":
            self.attention = "triton" if self.device.type == "cuda" else "native"
        if self.attention not in ("native", "torch", "triton"):
            raise ValueError(f"unknown attention backend {config.attention!r}: use auto, native, torch or triton")
        if self.device.type == "cpu":
            keep_freed_heap()  # a step's activations reused, not faulted in afresh (native_ops)
        limit = cfg.max_position_embeddings
        if config.max_model_len:
            if config.max_model_len > limit:
                raise ModelLoadError(f"max_model_len {config.max_model_len} exceeds the model's limit of {limit}")
            limit = config.max_model_len
        self.max_model_len = limit
        bs = config.block_size
        # the model first: on a GPU the KV pool gets what the weights and a full step leave free
        self.model = LlamaModel(cfg, loaded.weights, self.dtype, limit, native_ops=config.native_ops,
                                device=self.device, attention=self.attention)
        # embeddings (pooling.py): every request pools its prompt's final hidden states; nothing is sampled
        self.runner = resolve_runner(config.runner, loaded.name, cfg.base_model_only or bool(cfg.labels), config.convert)
        self.pooler: PoolerConfig | None = None
        if self.runner == "pooling":
            self.pooler = pooler_for(loaded.name, config.pooler_config)
            self.model.pool_hidden = True
            self.model.lm_head = self.model.lm_head_linear = None  # never used: its memory goes to the KV cache
            log.info("serving embeddings: %s pooling%s (%s)", self.pooler.pooling_type,
                     ", normalized" if self.pooler.normalize else "", self.pooler.source)
            if config.speculative is not None:
                raise ValueError("speculative decoding does not apply to a pooling runner (it generates nothing)")
        elif cfg.labels:
            raise ModelLoadError(f"{loaded.name} is a sequence classifier ({len(cfg.labels)} labels): serve it with "
                                 "--runner pooling (/classify)")
        elif cfg.base_model_only:
            raise ModelLoadError(f"{loaded.name} holds a bare {cfg.architecture.replace('ForCausalLM', 'Model')} "
                                 "with no LM head: serve it with --runner pooling (embeddings)")
        # LoRA adapters: every one loaded now, slot i + 1 (0: none); steps with adapter rows run eagerly
        self.loras: dict[str, int] = {}
        if config.lora_modules:
            from dyn_actor.engine.lora import load_adapter, lora_root

            for name, path in config.lora_modules.items():
                slot = len(self.loras) + 1
                self.model.add_adapter(slot, load_adapter(name, path, cfg, self.dtype, self.device,
                                                          config.max_lora_rank))
                self.loras[name] = slot
            self.model.stack_adapters(len(self.loras))
            self._lora_roots = {name: lora_root(name) for name in self.loras}
            log.info("LoRA adapters: %s", ", ".join(f"{n} ({p})" for n, p in config.lora_modules.items()))
        self.lora_modules = dict(config.lora_modules or {})
        # how a step with adapter rows applies them (LoraRows): auto, grouped or dense ($DYN_ACTOR_LORA_FORM)
        self.lora_form = os.environ.get("DYN_ACTOR_LORA_FORM", "auto")
        if self.lora_form not in ("auto", "grouped", "dense"):
            raise ValueError(f"DYN_ACTOR_LORA_FORM must be auto, grouped or dense, got {self.lora_form!r}")
        layout = KvLayout(1, cfg.num_layers, bs, cfg.num_kv_heads, cfg.head_dim, self.dtype)
        blocks_per_seq = -(-limit // bs)
        if config.num_kv_blocks:
            num_blocks = config.num_kv_blocks
        else:
            kv_bytes = config.kv_cache_memory
            if kv_bytes is None:
                kv_bytes = self._free_memory_for_kv(config.gpu_memory_utilization) if self.device.type == "cuda" \
                    else 1 * GiB
            num_blocks = min(kv_bytes // layout.block_nbytes, blocks_per_seq * config.max_num_seqs)
        if num_blocks < blocks_per_seq:
            if config.max_model_len or num_blocks < 1:
                raise ModelLoadError(
                    f"the KV cache holds {num_blocks} blocks of {bs} tokens, fewer than one {limit}-token sequence "
                    f"needs ({blocks_per_seq}); raise the KV memory or lower max_model_len"
                )
            # no explicit context length asked for: serve the longest one that fits
            limit = num_blocks * bs
            log.warning("KV cache fits %d tokens: max_model_len lowered to that", limit)
            self.max_model_len = limit
        # the graphs replay the Triton kernels (or, on the CPU, the C ones); the PyTorch path's padded
        # mask is not capturable
        # overlapped steps asked for explicitly bring the graph runner with them (on the CPU: replayed eagerly)
        # (a pooling runner has no decode steps, and its steps' outputs are hidden states: eager, one at a time)
        pooling = self.runner == "pooling"
        graphs = not pooling and (config.cuda_graphs == "on" or (config.cuda_graphs == "auto" and (
            (self.device.type == "cuda" and self.attention == "triton") or config.async_scheduling == "on")))
        if config.piecewise_graphs not in ("auto", "on", "off"):
            raise ValueError(f"piecewise_graphs must be auto, on or off, got {config.piecewise_graphs!r}")
        pieces = not pooling and self.attention == "triton" and (config.piecewise_graphs == "on" or (
            config.piecewise_graphs == "auto" and graphs and self.device.type == "cuda"))
        # with graphs, one more block than the block manager hands out: the padding rows' scratch
        scratch = graphs or pieces
        self.layout = KvLayout(num_blocks + scratch, cfg.num_layers, bs, cfg.num_kv_heads, cfg.head_dim, self.dtype)
        if config.shared_kv:
            from dyn_actor.kv.transfer import make_shared_pool

            self.pool: KvPool = make_shared_pool(self.layout, self.device)
        else:
            self.pool = KvPool(self.layout, self.device)
        self.block_manager = BlockManager(num_blocks, bs, config.enable_prefix_caching)
        self.scheduler = Scheduler(
            SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens, config.long_prefill_token_threshold),
            self.block_manager,
        )
        self.graphs = None
        if graphs:
            from dyn_actor.engine.cuda_graphs import DecodeGraphs

            self.graphs = DecodeGraphs(self.model, self.pool, config.max_num_seqs, blocks_per_seq,
                                       scratch_block=num_blocks)
            self.graphs.capture()
        self.pieces = None
        if pieces:
            from dyn_actor.engine.piecewise import PiecewiseGraphs

            try:
                self.pieces = PiecewiseGraphs(self.model, self.pool, config.max_num_batched_tokens, num_blocks)
                self.pieces.capture()
            except Exception as e:  # noqa: BLE001 - eager steps still work: serve with those
                log.warning("prefill/mixed-step graphs not captured (%s: %s): those steps run eagerly",
                            type(e).__name__, e)
                self.pieces = None
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
        if config.async_scheduling not in ("auto", "on", "off"):
            raise ValueError(f"async_scheduling must be auto, on or off, got {config.async_scheduling!r}")
        self._overlap = not pooling and (config.async_scheduling == "on" or (
            config.async_scheduling == "auto" and self.device.type == "cuda"))
        self.speculative = config.speculative
        self._proposer = None
        self._spec_drafts = self._spec_draft_tokens = self._spec_accepted = 0
        if self.speculative is not None:
            if config.async_scheduling == "on":
                raise ValueError("speculative decoding and overlapped steps (async scheduling) do not go together")
            # a step's drafts come from the tokens of the step before: the host must have them first
            self._overlap = False
            self._proposer = NgramProposer(self.speculative)
            self.scheduler.propose = self._propose
        self._inflight: _InFlight | None = None  # the step queued on the device, its tokens not taken yet
        self.scheduler.release = self._release
        self.overlapped_steps = 0  # steps queued before the host had the tokens of the step before
        self.requests: dict[str, Request] = {}
        self._held: dict[str, Request] = {}  # finished, blocks kept until release_blocks
        self._fenced: dict[str, int] = {}  # request id -> blocks held back from a remote prefill that may still write
        self._prompt_tokens = 0
        self._hit_tokens = 0
        self._generated = 0
        self._preemptions = 0
        # structured outputs: requests whose grammar is still compiling wait here, out of the scheduler
        self.grammars = Grammars(self.tokenizer, cfg.vocab_size, self.eos_token_ids)
        self._compiling: dict[str, Request] = {}
        self.wake: Callable[[], None] = lambda: None  # called (from any thread) when a grammar is ready
        # what start-up made (modules, weights' wrappers, graphs) lives as long as the process: out of
        # the cyclic collector's way, whose full passes over it cost ~0.5 ms a step on a busy step loop
        gc.collect()
        gc.freeze()

    @property
    def device_name(self) -> str:
        """``cpu``, or ``cuda:N (card name)`` with N as this process sees it."""
        if self.device.type != "cuda":
            return "cpu"
        return f"{self.device} ({torch.cuda.get_device_name(self.device)})"

    def _free_memory_for_kv(self, utilization: float) -> int:
        """Bytes of this GPU the KV pool may take: ``utilization`` of the card, less the weights and
        the peak of a profiling step at the largest batch of prompt tokens (and never more than is
        free now: other processes may share the card)."""
        cfg, bs = self.model_config, self.config.block_size
        n = max(1, min(self.config.max_num_batched_tokens, self.max_model_len))
        blocks = -(-n // bs)
        scratch = KvPool(KvLayout(blocks, cfg.num_layers, bs, cfg.num_kv_heads, cfg.head_dim, self.dtype), self.device)
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        pos = torch.arange(n, device=self.device)
        rows = torch.arange(min(n, self.config.max_num_seqs), device=self.device)
        seq = PrefillSeq(0, n, 0, torch.arange(blocks, device=self.device), None)
        meta = PrefillMeta(seq.block_ids.unsqueeze(0), *(torch.tensor([v], device=self.device) for v in (0, n, 0)), n)
        batch = ForwardBatch(torch.zeros(n, dtype=torch.long, device=self.device), pos, pos // bs, pos % bs, 0,
                             None, None, None, [seq], rows, meta)
        self.model.forward(batch, scratch)
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - scratch.layout.nbytes
        del scratch, batch
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(self.device)
        budget = int(total * utilization) - peak
        kv = max(0, min(budget, int(free * 0.95)))
        log.info("GPU memory: %.1f GiB card, %.2f GiB for weights and a %d-token step, %.2f GiB for the KV cache "
                 "(utilization %.2f)", total / GiB, peak / GiB, n, kv / GiB, utilization)
        return kv

    # ------------------------------------------------------------- requests
    def _make_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                      validated: bool = False, lora_name: str | None = None) -> Request:
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        if lora_name is None:
            lora_name = params.lora_name
        slot = self.lora_slot(lora_name)
        n = len(prompt_token_ids)
        pooling = params.pooling is not None
        if validated:  # checked at the edge (the frontend's processor): only the invariants a step relies on
            assert 0 < n < self.max_model_len + pooling, f"{request_id}: a {n}-token prompt"
            assert 0 <= min(prompt_token_ids) and max(prompt_token_ids) < self.model_config.vocab_size, \
                f"{request_id}: prompt token ids outside the vocabulary"
        else:
            self.validate_request(prompt_token_ids, params)
        self._check_runner(params)
        room = self.max_model_len - n
        max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        req = Request(request_id, prompt_token_ids, params, self.eos_token_ids, max(1, max_tokens))
        if pooling:
            req.pooling = self.pooler.pooling_type
        if slot:
            req.lora, req.lora_root = slot, self._lora_roots[lora_name]
        if params.structured is not None:
            fut = self.grammars.compile(params.structured)
            fut.add_done_callback(lambda _: self.wake())
            req.grammar = GrammarState(fut, params.structured.start_after)
        return req

    def _check_runner(self, params: SamplingParams) -> None:
        """``ValueError`` for a request of the other kind than this engine's runner serves, or for
        embedding dimensions the model cannot give."""
        p = params.pooling
        if self.runner == "pooling" and p is None:
            raise ValueError("this model is served for embeddings (--runner pooling): it generates no text; "
                             "use /v1/embeddings")
        if self.runner != "pooling" and p is not None:
            raise ValueError("this model is served for generation: embeddings need --runner pooling")
        if p is not None and (p.task == "classify") != bool(self.model_config.labels):
            raise ValueError("this model is a sequence classifier: use /classify" if self.model_config.labels
                             else "this model is not a sequence classifier: /classify needs one")
        if p is not None and p.task == "classify" and p.dimensions is not None:
            raise ValueError("dimensions applies to embeddings, not to classification")
        if p is None or p.dimensions is None:
            return
        cfg = self.model_config
        if not cfg.matryoshka:
            raise ValueError(f"this model does not support Matryoshka embeddings: dimensions must be unset "
                             f"(got {p.dimensions})")
        if not 1 <= p.dimensions <= cfg.hidden_size:
            raise ValueError(f"dimensions must be between 1 and {cfg.hidden_size}, got {p.dimensions}")
        if cfg.matryoshka_dimensions and p.dimensions not in cfg.matryoshka_dimensions:
            raise ValueError(f"this model supports dimensions {list(cfg.matryoshka_dimensions)}, got {p.dimensions}")

    def lora_slot(self, lora_name: str | None) -> int:
        """The model's slot of adapter ``lora_name`` (0 for None); ``ValueError`` for one not loaded."""
        if not lora_name:
            return 0
        slot = self.loras.get(lora_name)
        if slot is None:
            known = ", ".join(sorted(self.loras)) or "none are loaded"
            raise ValueError(f"unknown LoRA adapter {lora_name!r} (adapters: {known})")
        return slot

    def lora_root(self, lora_name: str | None) -> int | None:
        """The parent hash of the first KV block of a request served with ``lora_name``."""
        return self._lora_roots[lora_name] if lora_name and self.lora_slot(lora_name) else None

    def validate_request(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise ``ValueError`` (a message for the user) for input this engine cannot run: what a
        caller without the frontend's checks (the offline API, tests) gets from ``add_request``."""
        if params.bad_words and not params.bad_words_ids:  # texts alone (the frontend sends both)
            params.bad_words_ids = self.tokenizer.bad_words_ids(params.bad_words)
        params.validate(self.model_config.vocab_size)
        n = len(prompt_token_ids)
        if n == 0:
            raise ValueError("the prompt is empty")
        if params.pooling is not None and n > self.max_model_len:
            raise ValueError(f"the prompt has {n} tokens; this model's context is {self.max_model_len} tokens")
        if params.pooling is None and n >= self.max_model_len:
            raise ValueError(
                f"the prompt has {n} tokens; this model's context is {self.max_model_len} tokens, "
                "which must also hold at least one generated token"
            )
        vocab = self.model_config.vocab_size
        if any(not 0 <= t < vocab for t in prompt_token_ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams | None = None,
        hold_blocks: bool = False,
        validated: bool = False,
        lora_name: str | None = None,
    ) -> None:
        """Queue a request. Raises ``ValueError`` (a message for the user) for bad input.

        ``hold_blocks``: keep the request's KV blocks when it finishes, until
        ``release_blocks`` (a prefill worker copies them out first). ``validated``: the input was
        checked at the edge (a worker's requests come from the frontend, which did): not again.
        ``lora_name``: serve it with that LoRA adapter (one of ``EngineConfig.lora_modules``).
        """
        if request_id in self._held:
            raise ValueError(f"request id {request_id!r} is already in use")
        req = self._make_request(request_id, prompt_token_ids, params or SamplingParams(), validated, lora_name)
        req.hold_blocks = hold_blocks
        self.requests[request_id] = req
        if req.grammar is not None:
            self._compiling[request_id] = req  # scheduled once its grammar is ready (``_admit_compiled``)
        else:
            self.scheduler.add(req)

    def abort_request(self, request_id: str) -> bool:
        """Stop a request wherever it is; its blocks are freed. False if it is unknown or already done."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return self.release_blocks(request_id)
        req.finish_reason = "abort"
        if self._compiling.pop(request_id, None) is not None:  # never scheduled: holds nothing
            req.status = RequestStatus.FINISHED
            return True
        self.scheduler.finish(req)
        return True

    def _release(self, request_id: str) -> None:
        """Free a request's blocks now, or, where the step queued on the device still writes its KV,
        once that step has run (a block handed on sooner, to a remote prefill say, would get it).
        Called when a request ends or is preempted: rare next to steps, so the queued step's rows
        are searched here rather than indexed at every step."""
        queued = self._inflight
        if queued is not None and any(r.request_id == request_id for r in queued.reqs):
            queued.deferred.append(request_id)
        else:
            self.block_manager.free(request_id)

    def block_ids(self, request_id: str) -> list[int]:
        """The KV blocks a live (or finished and held) request owns, in token order."""
        return self.block_manager.block_ids(request_id)

    def release_blocks(self, request_id: str) -> bool:
        """Free the blocks of a finished request started with ``hold_blocks=True``."""
        if self._held.pop(request_id, None) is None:
            return False
        self.block_manager.free(request_id)
        return True

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.num_unfinished > 0 or self._inflight is not None or bool(self._compiling)

    def has_work(self) -> bool:
        """Whether ``step`` would compute something now (requests waiting for remote KV, or for their
        grammar to compile, do not count)."""
        return bool(self.scheduler.waiting or self.scheduler.running or self._inflight is not None
                    or any(r.grammar.ready for r in self._compiling.values()))

    def _admit_compiled(self) -> list[RequestOutput]:
        """Hand requests whose grammar is ready to the scheduler, in arrival order; end those whose
        grammar did not compile, with the reason (the client's input: a 400 before the first token)."""
        outputs = []
        for rid, req in list(self._compiling.items()):
            fut = req.grammar.future
            if not fut.done():
                continue
            del self._compiling[rid]
            exc = fut.exception()
            if exc is None:
                self.scheduler.add(req)
                continue
            self.requests.pop(rid, None)
            req.status, req.finish_reason = RequestStatus.FINISHED, "error"
            outputs.append(RequestOutput(request_id=rid, new_token_ids=[], finished=True, finish_reason="error",
                                         error=str(exc), error_type="ValueError" if isinstance(exc, ValueError)
                                         else "EngineError", num_prompt_tokens=req.num_prompt_tokens))
        return outputs

    # ------------------------------------------------------------ remote KV
    def cached_prefix(self, token_ids: list[int], lora_name: str | None = None) -> tuple[list[int], int]:
        """(block ids, token count) of the leading full blocks of ``token_ids`` cached here (for
        requests of adapter ``lora_name``)."""
        hits = self.block_manager.find_cached_prefix(token_ids, max_tokens=len(token_ids) - 1,
                                                     root=self.lora_root(lora_name))
        return [b.block_id for b in hits], len(hits) * self.layout.block_size

    def import_prefix(
        self, token_ids: list[int], num_blocks: int, read_blocks: Callable[[list[int]], torch.Tensor],
        lora_name: str | None = None,
    ) -> list[int]:
        """Put KV computed elsewhere for the first ``num_blocks`` full blocks of ``token_ids`` into
        this engine's prefix cache, so a request for that prompt computes only the rest.

        ``read_blocks(indices)`` returns the KV of those prompt blocks (``[n, *block_shape]``); it is
        called only for blocks not cached here already. Returns the ids of the blocks copied in (for
        ``discard_prefix`` if what was read turns out not to be trustworthy).
        """
        todo = self.block_manager.import_cached_blocks(token_ids, num_blocks, root=self.lora_root(lora_name))
        ids = [b for _, b in todo]
        if todo:
            try:
                self.pool.write_blocks(ids, read_blocks([i for i, _ in todo]))
            except BaseException:
                self.block_manager.discard_cached(ids)  # never leave unwritten blocks in the cache
                raise
        return ids

    def discard_prefix(self, block_ids: list[int]) -> None:
        """Forget blocks put in the prefix cache by ``import_prefix`` (those no request holds now)."""
        self.block_manager.discard_cached(block_ids)

    def allocate_remote_prefill(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, validated: bool = False,
        lora_name: str | None = None,
    ) -> RemoteAllocation | None:
        """Allocate the prompt's blocks for an external prefill; None when the pool has no room now."""
        req = self._make_request(request_id, prompt_token_ids, params, validated, lora_name)
        if not self.scheduler.allocate_remote(req):
            return None
        self.requests[request_id] = req
        self._count_prompt(req)
        return RemoteAllocation(self.block_manager.block_ids(request_id), req.num_cached_tokens)

    def finish_remote_prefill(
        self, request_id: str, first_token_id: int, logprobs: Logprobs | None = None
    ) -> RequestOutput | None:
        """The prompt's KV was written into this request's blocks; continue with ``first_token_id``."""
        req = self.requests.get(request_id)
        if req is None or req.status is not RequestStatus.WAITING_FOR_REMOTE_KV:
            return None
        self.scheduler.resume_remote(req)
        return self._emit(req, first_token_id, logprobs)

    def fail_remote_prefill(self, request_id: str) -> bool:
        """The remote prefill is lost: compute the prompt locally in the blocks already held."""
        req = self.requests.get(request_id)
        if req is None or req.status is not RequestStatus.WAITING_FOR_REMOTE_KV:
            return False
        self.scheduler.fallback_to_local(req)
        return True

    def fence_remote_blocks(self, request_id: str, restart: bool = True) -> int:
        """A remote prefill was given up while its writer may still be writing: take the request's
        blocks out of circulation (until ``release_fence``) and, with ``restart``, compute the prompt
        here in fresh blocks; without it the request ends. Returns the blocks fenced."""
        n = self.block_manager.transfer(request_id, _FENCE + request_id)
        self._fenced[request_id] = n
        req = self.requests.get(request_id)
        if req is not None and req.status is RequestStatus.WAITING_FOR_REMOTE_KV:
            if restart:
                req.num_computed_tokens = 0
                self.scheduler.fallback_to_local(req)  # it owns no blocks now: admitted afresh
            else:
                self.requests.pop(request_id)
                req.finish_reason = "abort"
                self.scheduler.finish(req, free_blocks=False)
        return n

    def release_fence(self, request_id: str) -> bool:
        """No write can land in the fenced blocks of ``request_id`` any more: free them."""
        if self._fenced.pop(request_id, None) is None:
            return False
        self.block_manager.free(_FENCE + request_id)
        return True

    @property
    def num_fenced_blocks(self) -> int:
        return sum(self._fenced.values())

    def remote_request_ids(self) -> list[str]:
        return list(self.scheduler.remote)

    # ------------------------------------------------------------------ step
    def _count_prompt(self, req: Request) -> None:
        self._prompt_tokens += req.num_prompt_tokens
        self._hit_tokens += max(0, req.num_cached_tokens)

    def _emit(self, req: Request, token: int, lp: Logprobs | None) -> RequestOutput:
        p = req.params
        # every token masked out (its constraints leave none) draws one it may not have
        conflict = (p.allowed_token_ids is not None or p.bad_words_ids) and (
            token in bad_word_bans(req) or (req.allowed is not None and token not in req.allowed))
        req.append_token(token)
        self._generated += 1
        finished = req.check_stop(self.max_model_len)
        error = None
        if conflict:
            req.finish_reason, finished = "error", True
            error = CONFLICT, "ValueError"
        elif req.grammar is not None and not finished:
            error = self._grammar_after(req)
            finished = error is not None or req.finish_reason is not None
        return self._output(req, [token], [lp] if lp is not None else None, finished, error)

    def _output(self, req: Request, tokens: list[int], lps: list[Logprobs] | None, finished: bool,
                error: tuple[str, str] | None = None) -> RequestOutput:
        """The output of a request's new ``tokens`` (already appended); a finished request leaves the
        engine here, its blocks freed (or held, for a prefill worker's)."""
        out = RequestOutput(
            request_id=req.request_id,
            new_token_ids=tokens,
            logprobs=lps,
            num_prompt_tokens=req.num_prompt_tokens,
            num_cached_tokens=max(0, req.num_cached_tokens),
        )
        if req.prompt_logprobs is not None and not req.prompt_logprobs_sent:
            out.prompt_logprobs = req.prompt_logprobs
            req.prompt_logprobs_sent = True
        if finished:
            out.finished = True
            out.finish_reason = req.finish_reason
            out.stop_reason = req.stop_reason
            if error is not None:
                out.error, out.error_type = error
            self.requests.pop(req.request_id, None)
            self.scheduler.finish(req, free_blocks=not req.hold_blocks)
            if req.hold_blocks:
                self._held[req.request_id] = req
        return out

    def _grammar_after(self, req: Request) -> tuple[str, str] | None:
        """A structured-output request has a new token: feed its grammar. Sets the request's finish
        reason when the grammar has terminated (an end-of-sequence token closed a complete text);
        returns (message, error type) if it cannot go on."""
        g = req.grammar
        try:
            g.sync(req.output_token_ids)
        except Exception as e:  # noqa: BLE001 - its grammar did not compile (it was prefilled elsewhere meanwhile)
            req.finish_reason = "error"
            return str(e) or type(e).__name__, "ValueError" if isinstance(e, ValueError) else "EngineError"
        if g.broken is not None:
            req.finish_reason = "error"
            if req.params.allowed_token_ids is not None or req.params.bad_words_ids:  # the masks left it nothing
                return CONFLICT, "ValueError"
            log.error("%s: token %d is outside its grammar", req.request_id, g.broken)
            return f"the sampled token {g.broken} is outside the request's grammar", "EngineError"
        if g.terminated:
            req.finish_reason, req.stop_reason = "stop", None
        return None

    def _apply_masks(self, logits: torch.Tensor, samplers: list[Request]) -> None:
        """What no sampler may draw: the stop tokens of rows short of their ``min_tokens`` (counting a
        token a queued step sampled, not appended yet), tokens outside a row's ``allowed_token_ids``,
        the token that would complete one of its ``bad_words``, tokens outside its grammar. One pass
        over the rows (this runs every step); no wait for the device."""
        rows: list[int] = []
        cols: list[int] = []
        grammar_rows: list[int] = []
        allowed_rows: list[int] = []
        for i, req in enumerate(samplers):
            p = req.params
            if req.grammar is not None:  # the grammar alone decides where its text may end
                grammar_rows.append(i)
            elif req.num_output_tokens + (req.pending_step is not None) < p.min_tokens:
                banned = list(req.eos_token_ids) + list(p.stop_token_ids)
                rows += [i] * len(banned)
                cols += banned
            if p.allowed_token_ids is not None:
                allowed_rows.append(i)
            if p.bad_words_ids:  # (a request with a longer one never has a token in flight: ``_can_queue``)
                banned = bad_word_bans(req)
                rows += [i] * len(banned)
                cols += banned
        if allowed_rows:
            self._keep_allowed(logits, allowed_rows, [samplers[i].params.allowed_token_ids for i in allowed_rows])
        if rows:
            idx = to_device(torch.tensor([rows, cols], dtype=torch.long), logits.device)
            logits.index_put_((idx[0], idx[1]), torch.full((), float("-inf"), dtype=logits.dtype, device=logits.device))
        if grammar_rows:
            self._apply_grammars(logits, samplers, grammar_rows)

    @staticmethod
    def _keep_allowed(logits: torch.Tensor, rows: list[int], allowed: list[list[int]]) -> None:
        """-inf in ``rows`` of ``logits`` but at each row's allowed token ids (ids in one copy)."""
        at = [rows[j] for j, ids in enumerate(allowed) for _ in ids]
        idx, rows_t = to_device_many([torch.tensor([at, [t for ids in allowed for t in ids]], dtype=torch.long),
                                      torch.tensor(rows, dtype=torch.long)], logits.device)
        kept = logits[idx[0], idx[1]]
        logits.index_fill_(0, rows_t, float("-inf"))
        logits.index_put_((idx[0], idx[1]), kept)

    def _apply_grammars(self, logits: torch.Tensor, samplers: list[Request], rows: list[int]) -> None:
        keep, states = [], []
        for i in rows:
            g = samplers[i].grammar
            try:
                g.sync(samplers[i].output_token_ids)
            except Exception:  # noqa: BLE001 - drawn unmasked; ``_emit`` ends it with its grammar's error
                continue
            if g.broken is None and g.active:  # (a row still waiting for its start is drawn free)
                keep.append(i)
                states.append(g)
        if keep:
            self.grammars.apply(logits, keep, states)

    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """Schedule and run one forward pass; return what each sampled request produced (and the
        requests whose grammar failed to compile)."""
        if not self._compiling:
            return self._step()
        if not self.has_work():  # only compiles under way (an offline loop): wait a little for one
            wait_futures([r.grammar.future for r in self._compiling.values()], timeout=0.05,
                         return_when=FIRST_COMPLETED)
        early = self._admit_compiled()
        return early + self._step()

    def _step(self) -> list[RequestOutput]:
        """Schedule and run one forward pass; return what each sampled request produced.

        With overlapped steps (``async_scheduling``) a call returns the tokens of the step before:
        it schedules and queues the next step on the device, the tokens it needs from the queued one
        taken there, and only then waits for the queued step's tokens and turns them into outputs.
        Steps with a row that scores prompt tokens or holds its blocks take the queued step's tokens
        first and run one at a time."""
        queued = self._inflight
        sched = self.scheduler.schedule()
        self._preemptions += len(sched.preempted)
        for req in sched.admitted:
            self._count_prompt(req)
        scheduled = sched.scheduled
        if queued is not None:  # a request whose token in flight is its last by length computes nothing more
            limit = self.max_model_len
            scheduled = [(r, n) for r, n in scheduled if r.pending_step is None or (
                len(r.output_token_ids) + 1 < r.max_tokens and len(r.all_token_ids) + 1 < limit)]
        if self._overlap and scheduled and self._can_queue(scheduled):
            try:
                nxt = self._queue(scheduled, queued)
            except Exception as e:  # noqa: BLE001 - ends the step's requests below, as a failed step does
                self._drain_device()  # nothing of it may still be writing when their blocks are freed
                self._inflight = None
                outputs = self._take(queued) if queued is not None else []
                return outputs + self._fail([r for r, _ in scheduled if r.status is RequestStatus.RUNNING], e)
            self._inflight = nxt
            self.overlapped_steps += queued is not None
            return self._take(queued) if queued is not None else []
        self._inflight = None
        outputs = self._take(queued) if queued is not None else []
        if queued is not None:  # a request may have ended on the token the queued step gave it
            scheduled = [(r, n) for r, n in scheduled if r.status is RequestStatus.RUNNING]
        if not scheduled:
            return outputs
        try:
            return outputs + self._run(scheduled)
        except Exception as e:  # noqa: BLE001 - whatever one batch did, the engine goes on
            return outputs + self._fail([r for r, _ in scheduled], e)

    # ------------------------------------------------------- overlapped steps
    def _can_queue(self, scheduled: list[tuple[Request, int]]) -> bool:
        """Whether a step can be queued without the host seeing its tokens first: not where a row
        scores prompt tokens, holds its blocks (a prefill worker's, read right after), or follows a
        grammar or has a bad word of several tokens (their masks need the token before)."""
        for r, _ in scheduled:
            if r.hold_blocks or r.grammar is not None or (
                    r.prompt_logprobs is not None and r.prompt_logprobs_pending) or (
                    r.params.bad_words_ids and any(len(ids) > 1 for ids in r.params.bad_words_ids)):
                return False
        return True

    def _queue(self, scheduled: list[tuple[Request, int]], queued: _InFlight | None) -> _InFlight:
        """Run the forward pass of ``scheduled`` and queue its sampling, without waiting for the
        device. Rows whose input token ``queued`` sampled take it from there, on the device."""
        # a request with a token in flight computes just that one, as a decode row; decode rows come
        # first in a step's inputs, in schedule order (``_build_batch``; the graphs take only those)
        new_rows, src_rows = [], []
        row = 0
        for r, n in scheduled:
            if n == 1:
                if r.pending_step is not None:  # always ``queued``: one step is in flight at a time
                    new_rows.append(row)
                    src_rows.append(r.pending_row)
                row += 1
        fill = None
        if new_rows:
            tokens = queued.pending.tokens
            if new_rows == src_rows and len(src_rows) == tokens.shape[0]:
                def fill(ids: torch.Tensor) -> None:
                    ids[: tokens.shape[0]].copy_(tokens)
            else:
                idx = to_device(torch.tensor([new_rows, src_rows]), tokens.device)

                def fill(ids: torch.Tensor) -> None:
                    ids.index_copy_(0, idx[0], tokens.index_select(0, idx[1]))
        logits, samplers = self._forward(scheduled, fill)
        computed = []
        for r, n in scheduled:
            r.num_computed_tokens += n
            computed.append(r.num_computed_tokens)
        self._apply_masks(logits, samplers)
        pending = sample_async(logits, [r.params for r in samplers], [r.generator for r in samplers],
                               self._penalties(samplers, logits))
        step = _InFlight([r for r, _ in scheduled], computed, samplers, pending)
        for i, r in enumerate(samplers):
            r.pending_step, r.pending_row = step, i
        return step

    def _take(self, queued: _InFlight) -> list[RequestOutput]:
        """Wait for a queued step's tokens and turn them into outputs (the caller has already made the
        step after it, if any, ``_inflight``). Its requests' blocks are done being written: frees held
        back for it happen now. A request that ended meanwhile gets nothing; one preempted meanwhile
        still gets its token (it was sampled from the right KV)."""
        try:
            result = queued.pending.result()
        finally:
            self._settle(queued)
        cache = self.block_manager.cache_full_blocks
        running, finished = RequestStatus.RUNNING, RequestStatus.FINISHED
        for r, computed in zip(queued.reqs, queued.computed):
            if r.status is running:
                cache(r.request_id, r.all_token_ids, computed)
        outputs = []
        for r, tok, lp in zip(queued.samplers, result.token_ids, result.logprobs):
            if r.status is not finished:
                outputs.append(self._emit(r, tok, lp))
        return outputs

    def _settle(self, queued: _InFlight) -> None:
        """``queued`` has run (or is given up): its pending tokens and KV writes are no longer in
        flight; apply the frees held back for it."""
        for r in queued.samplers:
            if r.pending_step is queued:
                r.pending_step, r.pending_row = None, -1
        for rid in queued.deferred:
            self.block_manager.free(rid)
        queued.deferred.clear()

    def _drain_device(self) -> None:
        if self.device.type == "cuda":
            try:
                torch.cuda.synchronize(self.device)
            except Exception:  # noqa: BLE001 - the error is reported by the caller
                log.exception("synchronizing after a failed step")

    def _forward(self, scheduled: list[tuple[Request, int]], fill: Callable[[torch.Tensor], None] | None = None,
                 scores: list | None = None, pooled: list | None = None) -> tuple[torch.Tensor, list[Request]]:
        """The step's forward pass (decode graphs, piecewise graphs or eager); the logits of the rows
        that sample (after any prompt-scoring rows, with ``scores``) and their requests. ``fill``
        writes input tokens the host does not have into the step's input ids on the device. A pooling
        runner's (``pooled``): the final hidden states of the rows its requests pool instead."""
        g = self.graphs
        if g is not None and sum(n for _, n in scheduled) <= g.max_batch and all(
                (n == 1 or r.spec_token_ids) and (r.prompt_logprobs is None or not r.prompt_logprobs_pending)
                for r, n in scheduled):
            return self._decode_from_graph(scheduled, fill)  # the graphs hold the adapters, if any
        if self.loras and any(r.lora for r, _ in scheduled):
            return self._forward_lora(scheduled, fill, scores, pooled)
        batch, samplers = self._build_batch(scheduled, scores=scores, pooled=pooled)  # prefill and mixed steps
        if fill is not None:
            fill(batch.input_ids)
        tokens = sum(n for _, n in scheduled)
        prefill = tokens >= PREFILL_THREADS_MIN_TOKENS
        # (not while a decode step found the extra core taken: a prefill step would wait for it as well)
        wide = self._prefill_threads and ((prefill and self._clock() >= self._wide_blocked_until)
                                          or self._wide_decode)
        if wide:
            torch.set_num_threads(self._prefill_threads)
        t0 = time.perf_counter()
        try:
            if self.pieces is not None and self.pieces.fits(tokens):
                return self.pieces.forward(batch), samplers
            return self.model.forward(batch, self.pool), samplers
        finally:
            if wide:
                torch.set_num_threads(self._threads)
            if self._prefill_threads and not prefill and samplers:
                self._note_decode_cost(time.perf_counter() - t0, self._prefill_threads if wide else self._threads,
                                       len(samplers))

    def _note_decode_cost(self, seconds: float, threads: int, rows: int) -> None:
        """After a CPU decode step: whether the next ones take the prefill threads (``WIDE_DECODE_*``).
        Not where they do not help: a wide step slower a row than the last narrow one (a core taken by
        another process) sends them back for ``WIDE_DECODE_BACKOFF_S``."""
        now = self._clock()
        if threads > self._threads:
            narrow_rows, narrow_s = self._narrow_step
            # (compared with a narrow step of about as many rows: a row's cost falls as a step grows)
            if narrow_rows and 0.75 <= rows / narrow_rows <= 1.33 and \
                    seconds / rows > WIDE_DECODE_SLOWER * narrow_s / narrow_rows:
                self._wide_decode = False
                self._wide_blocked_until = now + WIDE_DECODE_BACKOFF_S
                return
        else:
            self._narrow_step = (rows, seconds)
        core_ms = 1000 * seconds * threads
        if now < self._wide_blocked_until:
            self._wide_decode = False
        elif core_ms >= WIDE_DECODE_CORE_MS and core_ms / rows >= WIDE_DECODE_CORE_MS_PER_ROW:
            self._wide_decode = True
        elif core_ms < WIDE_DECODE_CORE_MS / 2 or core_ms / rows < WIDE_DECODE_CORE_MS_PER_ROW / 2:
            self._wide_decode = False

    def _forward_lora(self, scheduled: list[tuple[Request, int]], fill: Callable[[torch.Tensor], None] | None,
                      scores: list | None, pooled: list | None = None) -> tuple[torch.Tensor, list[Request]]:
        """A step with rows of LoRA adapters: eagerly (the graphs hold no adapter), each projection told
        which rows take which adapter. Rows are laid out as ``_build_batch`` does: decode rows (one per
        request, or one per position of a checked draft) in schedule order, then the prefill chunks."""
        batch, samplers = self._build_batch(scheduled, scores=scores, pooled=pooled)
        if fill is not None:
            fill(batch.input_ids)
        slots: list[int] = []  # each row's adapter slot (0: none), in row order
        for part in ([(r, n) for r, n in scheduled if n == 1 or r.spec_token_ids],
                     [(r, n) for r, n in scheduled if n > 1 and not r.spec_token_ids]):
            for r, n in part:
                slots.extend([r.lora] * n)
        rows = self.model.lora_rows
        runs = {}  # slot -> its rows
        for i, slot in enumerate(slots):
            if slot:
                runs.setdefault(slot, []).append(i)
        form = self.lora_form
        if form == "auto":  # one adapter over consecutive rows (a batch of one adapter, a long prompt): its
            # products on those rows alone; otherwise every adapter at once, masked per row
            (idx,) = runs.values() if len(runs) == 1 else ([0, -1],)
            form = "grouped" if idx[-1] - idx[0] + 1 == len(idx) else "dense"
        if form == "grouped":
            for slot, idx in runs.items():
                rows.groups.append((slot, slice(idx[0], idx[-1] + 1) if idx[-1] - idx[0] + 1 == len(idx)
                                    else to_device(torch.tensor(idx, dtype=torch.long), self.device)))
        else:
            rows.row_slot = to_device(torch.tensor(slots, dtype=torch.long), self.device)
        try:
            return self.model.forward(batch, self.pool), samplers
        finally:
            rows.clear()

    def _run(self, scheduled: list[tuple[Request, int]]) -> list[RequestOutput]:
        if self.pooler is not None:
            return self._run_pooling(scheduled)
        scores: list[tuple[Request, int, int, int]] = []
        logits, samplers = self._forward(scheduled, scores=scores)
        if scores:  # rows that score prompt tokens come first in the logits; the sampled rows follow
            logits = self._score_prompts(logits, scores)
        drafted = False
        for req, n in scheduled:
            if req.spec_token_ids:  # how far it got is known once its draft is checked
                drafted = True
                continue
            req.num_computed_tokens += n
            self.block_manager.cache_full_blocks(req.request_id, req.all_token_ids, req.num_computed_tokens)
        if drafted:
            return self._sample_with_drafts(logits, samplers)
        outputs: list[RequestOutput] = []
        if samplers:
            self._apply_masks(logits, samplers)
            result = sample(logits, [r.params for r in samplers], [r.generator for r in samplers],
                            self._penalties(samplers, logits))
            for req, tok, lp in zip(samplers, result.token_ids, result.logprobs):
                outputs.append(self._emit(req, tok, lp))
        return outputs

    def _run_pooling(self, scheduled: list[tuple[Request, int]]) -> list[RequestOutput]:
        """A pooling runner's step: each request's pooled rows taken from the final hidden states (a
        MEAN request's chunks summed on the device); a request whose prompt is complete ends with its
        vector (``pooling.finish``: cut, normalized), all of the step's in one device-to-host copy."""
        pooled: list[tuple[Request, int, int, int]] = []
        hidden, _ = self._forward(scheduled, pooled=pooled)
        for req, n in scheduled:
            req.num_computed_tokens += n
            self.block_manager.cache_full_blocks(req.request_id, req.all_token_ids, req.num_computed_tokens)
        for req, row, k, first in pooled:
            rows = hidden[row:row + k]
            if req.pooling == "MEAN":  # a chunk from position 0 starts over (a preempted request recomputes)
                s = rows.sum(0)
                req.pool_acc = s if first == 0 or req.pool_acc is None else req.pool_acc + s
            else:
                req.pool_acc = rows[0]
        done = [r for r, _ in scheduled if r.num_computed_tokens >= r.num_tokens]
        if not done:
            return []
        vectors = torch.stack([r.pool_acc / r.num_tokens if r.pooling == "MEAN" else r.pool_acc
                               for r in done]).float()
        default = self.pooler.normalize
        use = [default if r.params.pooling.normalize is None else r.params.pooling.normalize for r in done]
        if self.model.score is not None:  # a classifier: its head's scores (on the device), then their activation
            blobs = classify((vectors.float() @ self.model.score.t()).cpu(), use, self.model_config.problem_type,
                             self.model_config.classifier_activation)
        else:
            blobs = finish_pooled(vectors.cpu(), [r.params.pooling.dimensions for r in done], use)
        outputs = []
        for req, blob in zip(done, blobs):
            req.pool_acc = None
            req.finish_reason = "stop"
            out = self._output(req, [], None, True)
            out.embedding = blob
            outputs.append(out)
        return outputs

    # ------------------------------------------------------- speculative decoding
    def _propose(self, req: Request, budget: int) -> list[int]:
        """The draft a decode row checks this step (the scheduler asks, with its token budget left):
        none for a request whose sampling needs what drafted rows do not give (penalties, logit bias,
        allowed tokens, bad words, logprobs, a grammar, stop tokens still banned by ``min_tokens``), nor
        for a prefill worker's;
        at most what its ``max_tokens`` and the context length leave after the token the step adds."""
        p = req.params
        if (req.grammar is not None or req.hold_blocks or p.logprobs is not None or p.penalized or p.logit_bias
                or p.allowed_token_ids is not None or p.bad_words_ids
                or req.num_output_tokens < p.min_tokens or req.prompt_logprobs_pending):
            return []
        k = min(self._proposer.k, budget - 1, req.max_tokens - req.num_output_tokens - 1,
                self.max_model_len - req.num_tokens - 1)
        if k <= 0:
            return []
        tokens = req.all_token_ids
        req.ngram_buf = buf = NgramProposer.packed(tokens, req.ngram_buf)
        return self._proposer.propose(tokens, k, buf)

    @staticmethod
    def _drafted_rows(req: Request) -> list[tuple[int, int]]:
        """(position, input token) of each row of a request checking its draft: its last token, then
        the draft's, each row attending to the KV the rows before it write in the same step."""
        c = req.num_computed_tokens
        return [(c, req.all_token_ids[c]), *((c + 1 + j, t) for j, t in enumerate(req.spec_token_ids))]

    def _sample_with_drafts(self, logits: torch.Tensor, samplers: list[Request]) -> list[RequestOutput]:
        """A step where some rows checked drafts (``len(draft) + 1`` logits rows each; the others one):
        the plain rows sampled as usual, the drafts verified (``spec_decode.verify``); each drafted
        request emits the draft tokens kept and one more, and its computed length moves over the
        input token and the kept ones."""
        plain_rows: list[int] = []
        plain: list[Request] = []
        spec_rows: list[int] = []
        spec: list[Request] = []
        row = 0
        for r in samplers:
            k = len(r.spec_token_ids)
            if k:
                spec_rows.extend(range(row, row + k + 1))
                spec.append(r)
                row += k + 1
            else:
                plain_rows.append(row)
                plain.append(r)
                row += 1
        outputs: list[RequestOutput] = []
        if plain:
            lg = logits.index_select(0, to_device(torch.tensor(plain_rows), logits.device))
            self._apply_masks(lg, plain)
            result = sample(lg, [r.params for r in plain], [r.generator for r in plain], self._penalties(plain, lg))
            for req, tok, lp in zip(plain, result.token_ids, result.logprobs):
                outputs.append(self._emit(req, tok, lp))
        lg = logits.index_select(0, to_device(torch.tensor(spec_rows), logits.device))
        checked = verify(lg, [r.params for r in spec], [r.generator for r in spec], [r.spec_token_ids for r in spec])
        for req, v in zip(spec, checked):
            self._spec_drafts += 1
            self._spec_draft_tokens += len(req.spec_token_ids)
            self._spec_accepted += v.accepted
            req.spec_token_ids = []
            outputs.append(self._emit_many(req, v.tokens, req.num_computed_tokens + 1 + v.accepted))
        return outputs

    def _emit_many(self, req: Request, tokens: list[int], computed: int) -> RequestOutput:
        """``_emit`` for the tokens a checked draft gave (no logprobs, no grammar), up to the first
        that ends the request; ``computed``: the request's computed length after the step (the KV of
        every emitted token but the last), whose full blocks enter the prefix cache before a finished
        request frees them."""
        finished = False
        taken = 0
        for tok in tokens:
            req.append_token(tok)
            taken += 1
            if req.check_stop(self.max_model_len):
                finished = True
                break
        self._generated += taken
        req.num_computed_tokens = min(computed, req.num_tokens)
        self.block_manager.cache_full_blocks(req.request_id, req.all_token_ids, req.num_computed_tokens)
        return self._output(req, tokens[:taken], None, finished)

    def _score_prompts(self, logits: torch.Tensor, scores: list[tuple[Request, int, int, int]]) -> torch.Tensor:
        """Append each request's prompt logprobs from its rows of ``logits`` (``scores``: request, first
        position, first row, rows; position j scores prompt token j + 1), the model's raw
        log-probabilities as vLLM reports them, all in one device-to-host copy; return the rows
        after them (the sampled ones)."""
        used = sum(k for *_, k in scores)
        lsm = torch.log_softmax(logits[:used].float(), dim=-1)
        targets = torch.tensor([t for r, pos, _, k in scores for t in r.prompt_token_ids[pos + 1:pos + 1 + k]],
                               dtype=torch.long, device=lsm.device)
        chosen = lsm.gather(1, targets.unsqueeze(1))
        ranks = (lsm > chosen).sum(dim=1) + 1
        k_max = max(r.params.prompt_logprobs or 0 for r, *_ in scores)
        parts = [targets.double(), chosen.squeeze(1).double(), ranks.double()]  # ids are exact in float64
        if k_max:
            top_v, top_i = lsm.topk(k_max, dim=-1)
            parts += [top_v.double().flatten(), top_i.double().flatten()]
        host = torch.cat(parts).cpu()
        tok = host[:used].long().tolist()
        val = host[used:2 * used].tolist()
        rank = host[2 * used:3 * used].long().tolist()
        top_v = host[3 * used:3 * used + used * k_max].view(used, k_max).tolist() if k_max else None
        top_i = host[3 * used + used * k_max:].long().view(used, k_max).tolist() if k_max else None
        for r, _pos, row0, k in scores:
            want = r.params.prompt_logprobs or 0
            for j in range(row0, row0 + k):
                top = list(zip(top_i[j][:want], top_v[j][:want])) if want else []
                r.prompt_logprobs.append(Logprobs(tok[j], val[j], rank[j], top))
        return logits[used:]

    def _fail(self, reqs: list[Request], exc: Exception) -> list[RequestOutput]:
        """A step raised: end the requests of its batch, each with the error, and free their blocks.
        The others, and the engine, go on with the next step."""
        log.error("engine step failed (%s: %s): ending its %d requests", type(exc).__name__, exc, len(reqs),
                  exc_info=exc)
        outputs = []
        for req in reqs:
            if self.requests.pop(req.request_id, None) is None:
                continue
            req.finish_reason = "error"
            self.scheduler.finish(req)
            outputs.append(RequestOutput(request_id=req.request_id, new_token_ids=[], finished=True,
                                         finish_reason="error", error=f"{type(exc).__name__}: {exc}",
                                         num_prompt_tokens=req.num_prompt_tokens))
        return outputs

    def _penalties(self, reqs: list[Request], logits: torch.Tensor) -> tuple[list[int], list[PenaltyState]] | None:
        """The rows whose requests ask for penalties, and their token counts brought up to date (a
        token a queued step sampled, not appended yet, counted from the device)."""
        rows = [i for i, r in enumerate(reqs) if r.params.penalized]
        if not rows:
            return None
        states = []
        for i in rows:
            r = reqs[i]
            if r.penalty is None:
                r.penalty = PenaltyState(r.prompt_token_ids, logits.shape[1], logits.device)
            r.penalty.catch_up(r.output_token_ids)
            if r.pending_step is not None and r.penalty.n_out == len(r.output_token_ids):
                row = r.pending_row
                r.penalty.add_pending(r.pending_step.pending.tokens[row:row + 1])
            states.append(r.penalty)
        return rows, states

    def _decode_from_graph(self, scheduled: list[tuple[Request, int]],
                           fill: Callable[[torch.Tensor], None] | None = None) -> tuple[torch.Tensor, list[Request]]:
        """A decode-only step straight into the graphs' host buffers: no per-field tensors, one
        host-to-device copy, one replay. This loop is most of the host's work in a decode step on a
        GPU (where the step itself is ~2 ms), so it does the least per row: whole columns written at
        once, and only the block-table entries a row does not hold yet. ``fill``: writes the input
        tokens a queued step sampled (the host has not taken them yet) on the device."""
        bs = self.layout.block_size
        g = self.graphs
        table_of = self.block_manager.block_table
        set_row = g.set_table_row
        samplers: list[Request] = []
        rows: list[int] = []
        ids: list[int] = []
        positions: list[int] = []
        slot_blocks: list[int] = []
        loras: list[int] | None = [] if self.loras else None  # each row's adapter slot
        width = 0
        row = -1
        for r, n in scheduled:
            blocks = table_of(r.request_id)
            if loras is not None:
                loras.extend([r.lora] * n)
            if n > 1:  # a drafted request: a row for each of its positions
                for pos, tok in self._drafted_rows(r):
                    row += 1
                    n_blocks = pos // bs + 1
                    ids.append(tok)
                    positions.append(pos)
                    slot_blocks.append(blocks[n_blocks - 1])
                    set_row(row, blocks, n_blocks)
                    width = max(width, n_blocks)
                    rows.append(row)
                samplers.append(r)
                continue
            row += 1
            pos = r.num_computed_tokens
            n_blocks = pos // bs + 1
            known = len(r.all_token_ids)
            ids.append(r.all_token_ids[pos] if pos < known else 0)  # else: a queued step's token, filled in
            positions.append(pos)
            slot_blocks.append(blocks[n_blocks - 1])
            set_row(row, blocks, n_blocks)
            if n_blocks > width:
                width = n_blocks
            if pos + 1 >= known:
                rows.append(row)
                samplers.append(r)
        logits = g.replay_rows(ids, positions, slot_blocks, width, fill, loras)
        if len(rows) != row + 1:
            logits = logits.index_select(0, to_device(torch.tensor(rows), logits.device))
        return logits, samplers

    def _build_batch(
        self, scheduled: list[tuple[Request, int]], all_logits: bool = False,
        scores: list[tuple[Request, int, int, int]] | None = None,
        pooled: list[tuple[Request, int, int, int]] | None = None,
    ) -> tuple[ForwardBatch, list[Request]]:
        """The forward pass's inputs, and the requests sampled from its logits, in row order. Where
        ``scores`` is given, it gets (request, first position, its first row in the logits, rows) for
        the positions that score prompt tokens of requests that asked for prompt logprobs: their
        logits rows come first, the sampled rows after them. A pooling runner's step (``pooled``)
        samples nothing: ``pooled`` gets (request, its first row in the output, rows, first position)
        for the positions each request pools (``Request.pool_positions``), the output's only rows."""
        bs = self.layout.block_size
        # a request that checks a draft is a decode row for each of its positions (``_drafted_rows``)
        decodes = [(r, n) for r, n in scheduled if (n == 1 or r.spec_token_ids) and not all_logits]
        prefills = [(r, n) for r, n in scheduled if (n > 1 and not r.spec_token_ids) or all_logits]
        ids: list[int] = []
        positions: list[int] = []
        slot_blocks: list[int] = []
        slot_offsets: list[int] = []
        logits_rows: list[int] = []
        score_rows: list[int] = []  # token rows that score prompt tokens: their logits come first
        samplers: list[Request] = []
        table = mask = ctx_lens = None
        nd = sum(n for _, n in decodes)
        if nd:
            tables = []
            ctx = []
            row = -1
            for r, n in decodes:
                blocks = self.block_manager.block_table(r.request_id)
                if n > 1:
                    for pos, tok in self._drafted_rows(r):
                        row += 1
                        ids.append(tok)
                        positions.append(pos)
                        slot_blocks.append(blocks[pos // bs])
                        slot_offsets.append(pos % bs)
                        tables.append(blocks[:pos // bs + 1])
                        ctx.append(pos + 1)
                        logits_rows.append(row)
                    samplers.append(r)
                    continue
                row += 1
                pos = r.num_computed_tokens
                ids.append(r.all_token_ids[pos] if pos < r.num_tokens else 0)  # else: filled in on the device
                positions.append(pos)
                slot_blocks.append(blocks[pos // bs])
                slot_offsets.append(pos % bs)
                n_blocks = pos // bs + 1
                tables.append(blocks[:n_blocks])
                ctx.append(pos + 1)
                if scores is not None and r.prompt_logprobs is not None and r.prompt_logprob_positions(pos, pos + 1):
                    scores.append((r, pos, len(score_rows), 1))
                    score_rows.append(row)
                if pooled is not None:
                    if r.pool_positions(pos, pos + 1):
                        pooled.append((r, len(logits_rows), 1, pos))
                        logits_rows.append(row)
                elif pos + 1 >= r.num_tokens:
                    logits_rows.append(row)
                    samplers.append(r)
            width = max(len(t) for t in tables)
            table = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.long)
            ctx_lens = torch.tensor(ctx, dtype=torch.long)
            if self.model.native is None and self.attention != "triton":
                valid = torch.arange(width * bs).unsqueeze(0) < ctx_lens.unsqueeze(1)
                mask = torch.zeros((nd, 1, 1, width * bs), dtype=self.dtype)
                mask.masked_fill_(~valid.view(nd, 1, 1, width * bs), float("-inf"))
        seqs: list[PrefillSeq] = []
        start = nd
        for r, n in prefills:
            c = r.num_computed_tokens
            blocks = self.block_manager.block_table(r.request_id)
            end = c + n
            ids.extend(r.all_token_ids[c:end])
            pos = torch.arange(c, end)
            positions.extend(pos.tolist())
            bt = torch.tensor(blocks[: -(-end // bs)], dtype=torch.long)
            slot_blocks.extend(bt[pos // bs].tolist())
            slot_offsets.extend((pos % bs).tolist())
            pmask = None
            if c > 0 and self.attention != "triton":  # the Triton kernel masks by positions itself
                pmask = torch.arange(end).unsqueeze(0) <= (pos.unsqueeze(1))
            seqs.append(PrefillSeq(start, n, c, bt, pmask))
            if scores is not None and r.prompt_logprobs is not None:
                span = r.prompt_logprob_positions(c, end)
                if span:
                    scores.append((r, span.start, len(score_rows), len(span)))
                    score_rows.extend(range(start + span.start - c, start + span.stop - c))
            if all_logits:
                logits_rows.extend(range(start, start + n))
            elif pooled is not None:
                span = r.pool_positions(c, end)
                if span:
                    pooled.append((r, len(logits_rows), len(span), span.start))
                    logits_rows.extend(range(start + span.start - c, start + span.stop - c))
            elif end == r.num_tokens:
                logits_rows.append(start + n - 1)
                samplers.append(r)
            start += n
        meta = None
        if seqs and self.attention == "triton":
            width = max(len(p.block_ids) for p in seqs)
            meta = PrefillMeta(
                torch.stack([torch.nn.functional.pad(p.block_ids, (0, width - len(p.block_ids))) for p in seqs]),
                torch.tensor([p.start - nd for p in seqs], dtype=torch.long),
                torch.tensor([p.length for p in seqs], dtype=torch.long),
                torch.tensor([p.context_len for p in seqs], dtype=torch.long),
                max(p.length for p in seqs))
        # the step's metadata onto the device: one pinned buffer and one copy per dtype (``h2d``); the
        # prefills' own block lists and masks only for the PyTorch attention path, which reads them
        host = [torch.tensor(ids, dtype=torch.long), torch.tensor(positions, dtype=torch.long),
                torch.tensor(slot_blocks, dtype=torch.long), torch.tensor(slot_offsets, dtype=torch.long),
                torch.tensor(score_rows + logits_rows, dtype=torch.long), table, ctx_lens, mask]
        if meta is not None:
            host += [meta.block_tables, meta.q_starts, meta.q_lens, meta.ctx_lens]
        per_seq = self.device.type != "cpu" and self.attention != "triton"
        if per_seq:
            host += [t for p in seqs for t in (p.block_ids, p.mask)]
        dev = to_device_many(host, self.device)
        input_ids, positions_t, slot_blocks_t, slot_offsets_t, logits_indices, table, ctx_lens, mask = dev[:8]
        if meta is not None:
            meta = PrefillMeta(*dev[8:12], meta.max_q_len)
        if per_seq:
            rest = dev[12 if meta is not None else 8:]
            seqs = [PrefillSeq(p.start, p.length, p.context_len, rest[2 * i], rest[2 * i + 1])
                    for i, p in enumerate(seqs)]
        batch = ForwardBatch(
            input_ids=input_ids,
            positions=positions_t,
            slot_blocks=slot_blocks_t,
            slot_offsets=slot_offsets_t,
            num_decode=nd,
            decode_block_table=table,
            decode_ctx_lens=ctx_lens,
            decode_mask=mask,
            prefills=seqs,
            logits_indices=logits_indices,
            prefill_meta=meta,
        )
        return batch, samplers

    @torch.inference_mode()
    def score(self, prompts: list[list[int]]) -> list[torch.Tensor]:
        """Logits (float32, ``[len(prompt), vocab]``) at every position of each prompt, in one batched pass.

        Uses the same paged-attention path as serving (blocks are allocated and
        freed again); for tests and prompt log-probabilities.
        """
        reqs = []
        try:
            for i, p in enumerate(prompts):
                req = self._make_request(f"__score_{i}", p, SamplingParams(max_tokens=1))
                if self.block_manager.allocate(req.request_id, req.num_tokens) is None:
                    raise RuntimeError("not enough free KV blocks to score these prompts")
                reqs.append(req)
            batch, _ = self._build_batch([(r, r.num_tokens) for r in reqs], all_logits=True)
            logits = self.model.forward(batch, self.pool)
        finally:
            for r in reqs:
                self.block_manager.free(r.request_id)
        out, start = [], 0
        for p in prompts:
            out.append(logits[start : start + len(p)])
            start += len(p)
        return out

    # ---------------------------------------------------------------- status
    def drain_kv_events(self) -> list[KvEvent]:
        return self.block_manager.drain_events()

    def stats(self) -> EngineStats:
        s = self.scheduler
        bm = self.block_manager
        return EngineStats(
            num_running=len(s.running),
            num_waiting=len(s.waiting) + len(self._compiling),
            num_waiting_remote=len(s.remote),
            kv_blocks_used=bm.num_used_blocks,
            kv_blocks_total=bm.num_blocks,
            kv_blocks_cached=bm.num_cached_blocks,
            prompt_tokens=self._prompt_tokens,
            prefix_cache_hit_tokens=self._hit_tokens,
            generated_tokens=self._generated,
            num_preemptions=self._preemptions,
            spec_drafts=self._spec_drafts,
            spec_draft_tokens=self._spec_draft_tokens,
            spec_accepted_tokens=self._spec_accepted,
        )

    def close(self) -> None:
        """Release resources that outlive the process otherwise (a shared-memory KV pool)."""
        if self._inflight is not None:
            self._drain_device()
            self._settle(self._inflight)
            self._inflight = None
        self.grammars.close()
        close = getattr(self.pool, "close", None)
        if close is not None:
            close()
