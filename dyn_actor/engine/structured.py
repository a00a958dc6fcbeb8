"""Structured outputs: a request's text held to a JSON schema, a regex, a choice of strings or a
grammar (EBNF or Lark), by masking each step's logits to the tokens that keep it inside.

The grammar engine is xgrammar (an optional dependency, the ``[structured]`` extra): it compiles a
spec against the tokenizer's vocabulary once (cached), and per request a matcher walks the tokens
sampled so far and says which tokens may come next, as a bitmask. Everything here runs on the
host; the mask reaches the logits in one copy per step.

- Compiling runs on a thread of its own, never on the engine's step loop: xgrammar itself is
  imported there on first use (it brings transformers with it: about 1-3 s on a small host), and a
  large schema over a large vocabulary takes a while. The engine keeps such a request out of the
  scheduler until its grammar is ready (``LLMEngine._compiling``).
- A request's matcher catches up with its output lazily (``GrammarState.sync``): a first token
  sampled by a prefill worker elsewhere, or tokens kept across a preemption, are fed in before the
  next mask is made.
- Once the text is complete and nothing may follow, the grammar allows only the end-of-sequence
  tokens; when one is sampled the matcher terminates and the request stops (``ignore_eos`` too).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import torch

from dyn_actor.engine.h2d import to_device_many
from dyn_actor.protocol import StructuredOutput

if TYPE_CHECKING:
    from dyn_actor.engine.tokenizer import Tokenizer

log = logging.getLogger(__name__)

MISSING = "structured outputs need the xgrammar package on the worker: pip install 'dyn-actor[structured]'"
# JSON: at most this many whitespace characters in a row between two tokens of the text (enough to
# indent 9 levels by 2). Unbounded, a model that favours "\n" or " " can spend all of max_tokens on
# whitespace inside an unfinished object (seen here with the built-in model; vLLM 0.32 leaves it
# unbounded); disable_any_whitespace allows none.
MAX_WHITESPACE = 20
# compiled grammars kept for reuse (least recently used dropped first): a server that sees a new
# schema in every request must not grow without bound (xgrammar's own default has no limit)
CACHE_BYTES = 256 << 20
_XGR_PREFIX = re.compile(r"^\[[\d:.]+\] \S+?:\d+: (Check failed: .*? is false: )?")


def available() -> bool:
    return importlib.util.find_spec("xgrammar") is not None


class GrammarError(ValueError):
    """The spec does not compile (bad schema, regex or grammar): the client's input."""


class Grammars:
    """One engine's grammar compiler over its tokenizer. ``compile`` returns at once with a future;
    the work happens on this object's thread."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, stop_token_ids: tuple[int, ...]) -> None:
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._stop = list(stop_token_ids)
        self._pool: ThreadPoolExecutor | None = None
        self._compiler: Any = None
        self._lock = threading.Lock()
        self._shifts: dict[torch.device, torch.Tensor] = {}
        self.torch_masks = False  # the GPU's way on the CPU too (tests compare the two)
        self._bitmask: torch.Tensor | None = None
        self._bitmask_vocab = 0

    def compile(self, spec: StructuredOutput) -> Future:
        """Start compiling ``spec``; the future gives the compiled grammar or raises ``GrammarError``.
        Raises ``ValueError`` now where no grammar can be compiled at all (xgrammar missing)."""
        if not available():
            raise ValueError(MISSING)
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(1, thread_name_prefix="grammar")
            return self._pool.submit(self._compile, spec)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------ compile thread
    def _make_compiler(self) -> Any:
        import xgrammar as xgr

        tk = self._tokenizer.backend
        vocab = tk.get_vocab(with_added_tokens=True)
        size = self._vocab_size
        encoded = [""] * size
        for token, i in vocab.items():
            if i < size:
                encoded[i] = token
        # special tokens (BOS, EOS, chat markers) are never text: xgrammar takes "" for "not text",
        # where a raw vocabulary would otherwise let "<s>" stand for its letters inside a string
        for i, added in tk.get_added_tokens_decoder().items():
            if added.special and i < size:
                encoded[i] = ""
        try:
            meta = xgr.TokenizerInfo._detect_metadata_from_hf(tk.to_str())
            vocab_type, prefix_space = meta["vocab_type"], meta["add_prefix_space"]
        except Exception:  # noqa: BLE001 - a private helper: fall back to reading the decoder ourselves
            vocab_type, prefix_space = _vocab_type(tk.to_str(), xgr), False
        info = xgr.TokenizerInfo(encoded, vocab_type, vocab_size=size, stop_token_ids=self._stop or None,
                                 add_prefix_space=prefix_space)
        threads = max(1, min(8, os.cpu_count() or 1))
        log.info("structured outputs: xgrammar over a %d-token vocabulary (%s)", size, vocab_type.name)
        return xgr.GrammarCompiler(info, max_threads=threads, cache_limit_bytes=CACHE_BYTES)

    def _compile(self, spec: StructuredOutput) -> Any:
        if self._compiler is None:
            self._compiler = self._make_compiler()
        c = self._compiler
        kind = spec.kind
        try:
            if kind == "json":
                return c.compile_json_schema(spec.json, **_whitespace(spec))
            if kind == "json_object":
                return c.compile_json_schema('{"type": "object"}', **_whitespace(spec))
            if kind == "regex":
                return c.compile_regex(spec.regex)
            if kind == "choice":
                alts = " | ".join(json.dumps(s, ensure_ascii=False) for s in spec.choice or [])
                return c.compile_grammar(f"root ::= {alts}")
            if kind == "structural_tag":
                return _compile_structural_tag(c, spec.structural_tag)
            if "::=" not in spec.grammar:  # Lark's rules are "name: ...", EBNF's "name ::= ..."
                return c.compile_lark(spec.grammar)
            return c.compile_grammar(spec.grammar)
        except (RuntimeError, ValueError, TypeError) as e:  # xgrammar's parse and conversion errors
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise GrammarError(f"the structured output's {kind} does not compile: {_XGR_PREFIX.sub('', first)}") \
                from None

    # ------------------------------------------------------------------ masks
    def apply(self, logits: torch.Tensor, rows: list[int], states: list[GrammarState]) -> None:
        """Mask ``logits`` rows ``rows`` (in place) to the tokens each state's grammar allows next."""
        import xgrammar as xgr

        n, vocab = logits.shape
        # one row per logits row, reused from step to step (only the grammar rows are filled, and read)
        if self._bitmask is None or self._bitmask.shape[0] < n or self._bitmask_vocab != vocab:
            self._bitmask, self._bitmask_vocab = xgr.allocate_token_bitmask(max(n, 64), vocab), vocab
        bitmask = self._bitmask[:n]
        for row, st in zip(rows, states):
            st.matcher.fill_next_token_bitmask(bitmask, row)
        if logits.device.type == "cpu" and not self.torch_masks:
            xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=vocab, indices=rows, backend="cpu")
            return
        # on a GPU: the rows' bitmask over in one copy, unpacked to a boolean mask there
        dev = logits.device
        shifts = self._shifts.get(dev)
        if shifts is None:
            shifts = self._shifts[dev] = torch.arange(32, dtype=torch.int32, device=dev)
        sel = torch.tensor(rows, dtype=torch.long)
        bits, idx = to_device_many([bitmask.index_select(0, sel), sel], dev)
        allowed = ((bits.unsqueeze(-1) >> shifts) & 1).view(len(rows), -1)[:, :vocab].bool()
        logits.index_copy_(0, idx, logits.index_select(0, idx).masked_fill_(~allowed, float("-inf")))


def _compile_structural_tag(compiler: Any, text: str) -> Any:
    """vLLM's structural tag: the older form (``structures`` of begin, schema, end, and ``triggers``)
    through xgrammar's items, as vLLM compiles it; any other (``{"format": ...}``) as xgrammar reads it."""
    import xgrammar as xgr

    tag = json.loads(text)
    if "structures" not in tag:
        return compiler.compile_structural_tag(text)
    items = [xgr.StructuralTagItem(begin=s["begin"], schema=json.dumps(s["schema"]), end=s["end"])
             for s in tag["structures"]]
    return compiler.compile_structural_tag(items, tag["triggers"])


def _whitespace(spec: StructuredOutput) -> dict[str, Any]:
    if spec.disable_any_whitespace:  # none at all: not even after the separators
        return {"any_whitespace": False, "separators": (",", ":")}
    return {"any_whitespace": True, "max_whitespace_cnt": MAX_WHITESPACE}


def _vocab_type(tokenizer_json: str, xgr: Any) -> Any:
    decoder = json.loads(tokenizer_json).get("decoder") or {}
    parts = decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" else [decoder]
    types = {p.get("type") for p in parts if isinstance(p, dict)}
    if "ByteLevel" in types:
        return xgr.VocabType.BYTE_LEVEL
    if "ByteFallback" in types:
        return xgr.VocabType.BYTE_FALLBACK
    return xgr.VocabType.RAW


class GrammarState:
    """One request's grammar: the compile in progress, then its matcher and how many of the
    request's output tokens it has taken. With ``start_after`` (the end of a reasoning block), the
    grammar starts after the first place those ids appear in the output; before, the row is free."""

    __slots__ = ("future", "matcher", "accepted", "broken", "after", "start", "_scanned")

    def __init__(self, future: Future, start_after: list[int] | tuple[int, ...] = ()) -> None:
        self.future = future
        self.matcher: Any = None
        self.accepted = 0
        self.broken: int | None = None  # a sampled token the grammar refused (never expected)
        self.after = tuple(start_after)
        self.start: int | None = None if self.after else 0  # where in the output the grammar starts
        self._scanned = 0  # output tokens searched for ``after`` so far

    @property
    def ready(self) -> bool:
        return self.future.done()

    @property
    def active(self) -> bool:
        """Whether the grammar holds the next token (False while the output waits for ``after``)."""
        return self.start is not None

    def sync(self, output_token_ids: list[int]) -> None:
        """Make the matcher (waiting for the compile if it is still running) and feed it the output
        tokens it has not taken yet."""
        if self.matcher is None:
            import xgrammar as xgr

            self.matcher = xgr.GrammarMatcher(self.future.result())
        if self.start is None:
            self._find_start(output_token_ids)
            if self.start is None:
                return
        while self.accepted < len(output_token_ids) and self.broken is None:
            tok = output_token_ids[self.accepted]
            if not self.matcher.accept_token(tok):
                self.broken = tok
                break
            self.accepted += 1

    def _find_start(self, ids: list[int]) -> None:
        k = len(self.after)
        for end in range(max(self._scanned, k), len(ids) + 1):
            if tuple(ids[end - k:end]) == self.after:
                self.start = self.accepted = end
                return
        self._scanned = len(ids) + 1

    @property
    def terminated(self) -> bool:
        return self.matcher is not None and self.start is not None and self.matcher.is_terminated()
