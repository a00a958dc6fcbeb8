"""The processor: what the frontend does with text and token ids, with no I/O of its own (pure,
so it is unit-tested without a server). The model's limits checked on a prompt, chat templates,
tokenizing, the per-request text stream (incremental detokenization and stop strings), and the
OpenAI shapes of logprobs."""

from __future__ import annotations

import copy

import msgspec

from dyn_actor.components.openai_api import RequestError, message_text
from dyn_actor.components.tools import template_messages
from dyn_actor.engine.detokenizer import TextStream
from dyn_actor.engine.tokenizer import ChatTemplateError, Tokenizer
from dyn_actor.protocol import Logprobs, SamplingParams


class Processor:
    def __init__(self, model_name: str, tokenizer: Tokenizer, max_model_len: int, vocab_size: int,
                 lora_names: list[str] | tuple[str, ...] = ()) -> None:
        self.model_name = model_name
        self.lora_names = frozenset(lora_names)
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size

    # ------------------------------------------------------------- requests
    def check_model(self, model: str | None) -> str | None:
        """The LoRA adapter a request's ``model`` names (None: the base model); a 404 for a name this
        server does not serve."""
        if model is None or model == self.model_name:
            return None
        if model in self.lora_names:
            return model
        served = ", ".join(repr(m) for m in [self.model_name, *sorted(self.lora_names)])
        raise RequestError(f"the model {model!r} does not exist; this server serves {served}", 404,
                           "invalid_request_error", "model_not_found", "model")

    def check_prompt(self, prompt_ids: list[int], max_tokens: int | None, params: SamplingParams | None = None) -> int:
        """What only the model can tell of a request: the context length, the vocabulary of the
        prompt and of ``stop_token_ids``. A 400 naming the parameter; return the prompt's length."""
        n, limit = len(prompt_ids), self.max_model_len
        if n == 0:
            raise RequestError("the prompt is empty", param="prompt")
        if n >= limit:
            raise RequestError(
                f"this model's maximum context length is {limit} tokens; the prompt has {n} tokens, which leaves "
                "no room for a completion", code="context_length_exceeded")
        if max_tokens is not None and n + max_tokens > limit:
            raise RequestError(
                f"this model's maximum context length is {limit} tokens; the prompt has {n} tokens and max_tokens "
                f"asks for {max_tokens}; lower max_tokens to at most {limit - n}", code="context_length_exceeded",
                param="max_tokens")
        vocab = self.vocab_size
        if any(not 0 <= t < vocab for t in prompt_ids):
            raise RequestError(f"prompt token ids must be in [0, {vocab})", param="prompt")
        outside = params.outside_vocab(vocab) if params is not None else None
        if outside is not None:
            raise RequestError(outside[1], param=outside[0])
        return n

    def chat_prompt(self, messages, add_generation_prompt: bool, tools: list[dict] | None = None,
                    kwargs: dict | None = None, continue_final_message: bool = False) -> list[int]:
        """The chat template applied and tokenized (slow for long conversations: call it off the loop).
        ``tools``: shown to the template (as ``tools``), as vLLM does; ``kwargs``: more variables for
        it (the request's ``chat_template_kwargs``, checked); ``continue_final_message``: the prompt
        ends inside the last message (``Tokenizer.encode_chat``)."""
        msgs = []
        for m in messages:
            d = {"role": m.role, "content": message_text(m.content)}
            if bytes(m.tool_calls) not in (b"null", b"[]"):
                d["tool_calls"] = msgspec.json.decode(m.tool_calls)
            if m.tool_call_id is not None:
                d["tool_call_id"] = m.tool_call_id
            if m.name is not None:
                d["name"] = m.name
            reasoning = m.reasoning if m.reasoning is not None else m.reasoning_content
            if reasoning is not None:  # templates read reasoning_content (Qwen3, DeepSeek-R1)
                d["reasoning_content"] = d["reasoning"] = reasoning
            msgs.append(d)
        extra = dict(kwargs or {})
        if tools:
            extra["tools"] = tools
        try:
            return self.tokenizer.encode_chat(template_messages(msgs), add_generation_prompt, continue_final_message,
                                              **extra)
        except ChatTemplateError as e:
            raise RequestError(str(e), param="messages") from None

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def bad_words_ids(self, params: list[SamplingParams]) -> None:
        """The token sequences of the choices' ``bad_words`` (the same texts in each), set on them."""
        if not params or not params[0].bad_words:
            return
        try:
            ids = self.tokenizer.bad_words_ids(params[0].bad_words)
        except ValueError as e:
            raise RequestError(str(e), param="bad_words") from None
        for p in params:
            p.bad_words_ids = ids

    # -------------------------------------------------------------- outputs
    def text_stream(self, prompt_ids: list[int], params: SamplingParams) -> TextStream:
        return TextStream(self.tokenizer, prompt_ids, params.stop, params.include_stop_str_in_output,
                          params.skip_special_tokens)

    def decode(self, token_ids: list[int]) -> str:
        """A prompt's text from its token ids (completions' echo), special tokens kept."""
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=False)

    def token_str(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def naming_token_ids(self) -> Processor:
        """This processor with its logprobs naming each token ``token_id:N`` instead of its text
        (vLLM's ``return_tokens_as_token_ids``: the ids of tokens that are no text of their own)."""
        view = copy.copy(self)
        view.token_str = lambda token_id: f"token_id:{token_id}"  # type: ignore[method-assign]
        return view

    def chat_logprobs(self, lps: list[Logprobs]) -> dict:
        content = []
        for lp in lps:
            s = self.token_str(lp.token_id)
            content.append({"token": s, "logprob": lp.logprob, "bytes": list(s.encode()),
                            "top_logprobs": [{"token": (t := self.token_str(i)), "logprob": v,
                                              "bytes": list(t.encode())} for i, v in lp.top]})
        return {"content": content}

    def prompt_logprobs(self, prompt_ids: list[int], lps: list[Logprobs | None]) -> list[dict | None]:
        """vLLM's ``prompt_logprobs``: per prompt token, None for the first, else ``{token id: {logprob,
        rank, decoded_token}}`` for the prompt token and the top alternatives."""
        out: list[dict | None] = []
        for tok, lp in zip(prompt_ids, lps):
            if lp is None:
                out.append(None)
                continue
            entry = {str(i): {"logprob": v, "rank": rank, "decoded_token": self.token_str(i)}
                     for rank, (i, v) in enumerate(lp.top, 1)}
            entry[str(tok)] = {"logprob": lp.logprob, "rank": lp.rank, "decoded_token": self.token_str(tok)}
            out.append(entry)
        return out

    def echo_logprobs(self, prompt_ids: list[int], prompt_lps: list[Logprobs | None], lps: list[Logprobs],
                      offset: int = 0) -> dict:
        """Completions' ``logprobs`` with ``echo``: the prompt's tokens first (the first with no
        figures), then the generated ones; ``offset``: where the first token starts in the text."""
        tokens = [self.token_str(t) for t in prompt_ids] + [self.token_str(lp.token_id) for lp in lps]
        offsets, pos = [], offset
        for t in tokens:
            offsets.append(pos)
            pos += len(t)
        every = [*prompt_lps, *lps]
        return {"tokens": tokens, "token_logprobs": [None if lp is None else lp.logprob for lp in every],
                "top_logprobs": [None if lp is None else {self.token_str(i): v for i, v in lp.top} for lp in every],
                "text_offset": offsets}

    def text_logprobs(self, lps: list[Logprobs]) -> dict:
        tokens = [self.token_str(lp.token_id) for lp in lps]
        offsets, pos = [], 0
        for t in tokens:
            offsets.append(pos)
            pos += len(t)
        return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in lps],
                "top_logprobs": [{self.token_str(i): v for i, v in lp.top} for lp in lps], "text_offset": offsets}
