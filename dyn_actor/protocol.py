"""The types that travel between processes and over HTTP's edge: what a request asks of the
sampler, and the logprobs it returns. torch-free, so that the frontend, the router and the queue
can import them without loading the engine."""

from __future__ import annotations

import msgspec

_GREEDY_EPS = 1e-5


_I32 = 2**31 - 1  # integers that go into tensors
MAX_BAD_WORDS = 128  # token sequences of a request's bad_words (each word spelled two ways), as vLLM
MAX_SPEC_CHARS = 256 * 1024  # the longest schema, regex, grammar (or all choices) a request may give


class StructuredOutput(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A constraint on the output's text (vLLM's ``structured_outputs``), exactly one of: ``json``, a
    JSON schema as JSON text; ``json_object``, any JSON object; ``regex``; ``choice``, one of these
    strings; ``grammar``, a grammar in EBNF (xgrammar's GBNF-like dialect, ``root ::= ...`` its start rule)
    or in Lark (``start: ...``); ``structural_tag``, vLLM's structural tag as JSON text (free text in
    which each trigger opens a tagged part held to its schema: ``{"structures": [{"begin", "schema",
    "end"}], "triggers": [...]}``, or xgrammar's ``{"format": {...}}``).
    The engine masks each step's logits to the tokens that keep the text inside it, and the request
    ends once the text is complete and nothing may follow."""

    json: str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    structural_tag: str | None = None
    # JSON (json, json_object) without whitespace between its tokens; by default any is allowed
    disable_any_whitespace: bool = False
    # token ids that the constraint starts after (a reasoning model's end of thinking, "</think>"):
    # the output is free until it holds them; empty: constrained from the first token
    start_after: list[int] = []

    def _given(self) -> list[str]:
        given = [k for k in ("json", "regex", "choice", "grammar", "structural_tag") if getattr(self, k) is not None]
        return given + ["json_object"] if self.json_object else given

    def validate(self) -> StructuredOutput:
        given = self._given()
        if len(given) != 1:
            raise ValueError("a structured output takes exactly one of json, json_object, regex, choice, grammar "
                             f"and structural_tag, got {', '.join(given) or 'none'}")
        if self.choice is not None:
            if not self.choice:
                raise ValueError("choice must list at least one string")
            size = sum(len(c) for c in self.choice)
        elif self.json_object:
            size = 0
        else:
            size = len(getattr(self, given[0]))
            if size == 0:
                raise ValueError(f"the structured output's {given[0]} is empty")
        if size > MAX_SPEC_CHARS:
            raise ValueError(f"the structured output's {given[0]} is longer than {MAX_SPEC_CHARS} characters")
        if len(self.start_after) > 64:
            raise ValueError("start_after takes at most 64 token ids")
        return self

    @property
    def kind(self) -> str:
        """Which one it is (of a validated spec)."""
        return self._given()[0]


class PoolingParams(msgspec.Struct, kw_only=True, omit_defaults=True):
    """An embedding request (a model served with ``--runner pooling``): the prompt's hidden states
    pooled into one vector instead of tokens generated. ``dimensions``: keep the first this many
    (a Matryoshka model's shorter embeddings; vLLM's field); ``normalize``: scale it to unit length
    (None: the model's pooler decides; vLLM calls it ``use_activation``)."""

    dimensions: int | None = None
    normalize: bool | None = None
    # embed (a vector), or classify (a sequence classifier's label probabilities, ``/classify``; there
    # ``normalize`` is vLLM's ``use_activation``: softmax or sigmoid over the scores, or the raw scores)
    task: str = "embed"

    def validate(self) -> PoolingParams:
        if self.task not in ("embed", "classify"):
            raise ValueError(f"unknown pooling task {self.task!r}: embed or classify")
        if self.dimensions is not None and not 1 <= self.dimensions <= _I32:
            raise ValueError(f"dimensions must be at least 1, got {self.dimensions}")
        return self


class SamplingParams(msgspec.Struct, kw_only=True, omit_defaults=True):
    max_tokens: int | None = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    seed: int | None = None
    stop: list[str] = []
    stop_token_ids: list[int] = []
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: int | None = None  # None: none; k >= 0: the sampled token's plus the top k
    # the same for each prompt token after the first (vLLM's prompt_logprobs): the model's raw
    # log-probabilities; the request computes its whole prompt (no prefix-cache hit, no remote prefill)
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    # vLLM's three: a token seen in the prompt or the output has its logit divided (if positive) or
    # multiplied (if negative) by repetition_penalty; each output occurrence costs frequency_penalty,
    # any output occurrence presence_penalty
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # OpenAI's logit_bias: added to the token's logit before the penalties' result is sampled
    # (in [-100, 100]; -100 bans a token in practice, +100 all but forces it); logprobs stay raw
    logit_bias: dict[int, float] = {}
    # vLLM's allowed_token_ids: only these may be sampled (None: any); and bad_words: texts that must
    # not be generated, each as token sequences (``bad_words_ids``, made from the texts by
    # ``tokenizer.bad_words_ids`` at the frontend, or by the engine where a caller gave texts alone):
    # a sequence's last token is banned where the output ends with the ones before it
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] = []
    bad_words_ids: list[list[int]] = []
    # the output's text constrained to a JSON schema, a regex, a choice or a grammar (None: free)
    structured: StructuredOutput | None = None
    # the LoRA adapter that serves the request (the request's ``model``, when it names one; None: the
    # base model). Not a sampling parameter as such: it travels here so that every path that carries
    # a request's parameters (to a worker, through the prefill queue, to vLLM) carries it too
    lora_name: str | None = None
    # an embedding request (``PoolingParams``): the engine pools the prompt's hidden states and
    # generates nothing. It travels here for the same reason as ``lora_name``
    pooling: PoolingParams | None = None

    def validate(self, vocab_size: int | None = None) -> SamplingParams:
        """Raise ``ValueError`` with a user-facing message for any bad value; return self."""
        if self.max_tokens is not None and not 1 <= self.max_tokens <= _I32:
            raise ValueError(f"max_tokens must be between 1 and {_I32}, got {self.max_tokens}")
        if not self.temperature >= 0.0:
            raise ValueError(f"temperature must be non-negative, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not -1 <= self.top_k <= _I32:
            raise ValueError(f"top_k must be -1 (off), 0 (off) or positive (at most {_I32}), got {self.top_k}")
        if self.seed is not None and not -(2**63) <= self.seed < 2**63:
            raise ValueError(f"seed must fit in 64 bits, got {self.seed}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if not 0 <= self.min_tokens <= _I32:
            raise ValueError(f"min_tokens must be between 0 and {_I32}, got {self.min_tokens}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise ValueError(f"logprobs must be between 0 and 20, got {self.logprobs}")
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= 20:
            raise ValueError(f"prompt_logprobs must be between 0 and 20, got {self.prompt_logprobs}")
        if not 0.0 < self.repetition_penalty <= 100.0:
            raise ValueError(f"repetition_penalty must be in (0, 100], got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        for bias in self.logit_bias.values():
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"logit_bias values must be in [-100, 100], got {bias}")
        if self.allowed_token_ids is not None and not self.allowed_token_ids:
            raise ValueError("allowed_token_ids must not be empty (leave it out to allow every token)")
        if any(not w for w in self.bad_words):
            raise ValueError("bad_words must not contain an empty string")
        if len(self.bad_words_ids) > MAX_BAD_WORDS or any(not ids for ids in self.bad_words_ids):
            raise ValueError(f"bad_words must come to at most {MAX_BAD_WORDS} token sequences, none empty "
                             f"(got {len(self.bad_words_ids)})")
        if self.structured is not None:
            self.structured.validate()
        if self.pooling is not None:
            self.pooling.validate()
        if vocab_size is not None:
            outside = self.outside_vocab(vocab_size)
            if outside is not None:
                raise ValueError(outside[1])
        return self

    def outside_vocab(self, vocab_size: int) -> tuple[str, str] | None:
        """(field, message) for the first token-id field naming an id outside the vocabulary, or None."""
        bad = [t for t in self.stop_token_ids if not 0 <= t < vocab_size]
        if bad:
            return "stop_token_ids", f"stop_token_ids {bad} are outside the vocabulary (size {vocab_size})"
        bad = sorted(t for t in self.logit_bias if not 0 <= t < vocab_size)
        if bad:
            return "logit_bias", f"logit_bias token ids {bad[:10]} are outside the vocabulary (size {vocab_size})"
        bad = sorted({t for t in self.allowed_token_ids or () if not 0 <= t < vocab_size})
        if bad:
            return ("allowed_token_ids",
                    f"allowed_token_ids {bad[:10]} are outside the vocabulary (size {vocab_size})")
        bad = sorted({t for ids in self.bad_words_ids for t in ids if not 0 <= t < vocab_size})
        if bad:
            return "bad_words", f"bad_words tokenize to ids {bad[:10]} outside the vocabulary (size {vocab_size})"
        return None

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


class Logprobs(msgspec.Struct, array_like=True):
    """Logprob of the sampled token and of the top alternatives at one position."""

    token_id: int
    logprob: float
    rank: int
    top: list[tuple[int, float]]


class SampleResult(msgspec.Struct):
    token_ids: list[int]
    logprobs: list[Logprobs | None]
