"""Offline generation: ``LLM(model).generate(prompts, params)``, text in and text out."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

from dyn_actor.engine.detokenizer import TextStream
from dyn_actor.engine.engine import EngineConfig, LLMEngine
from dyn_actor.engine.sampling import Logprobs, SamplingParams
from dyn_actor.engine.spec_decode import SpeculativeConfig


@dataclass
class CompletionOutput:
    text: str
    token_ids: list[int]
    finish_reason: str | None
    stop_reason: int | str | None = None
    logprobs: list[Logprobs] = field(default_factory=list)


@dataclass
class GenerationOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    output: CompletionOutput
    num_cached_tokens: int = 0


@dataclass
class EmbeddingOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    embedding: list[float]


@dataclass
class ScoreOutput:
    score: float
    prompt_token_ids: list[int]  # a cross-encoder's input for the pair (a bi-encoder's: empty)


class LLM:
    def __init__(self, model: str = "builtin:tiny", speculative_config: dict | str | None = None,
                 lora_modules: dict[str, str] | None = None, **engine_options) -> None:
        """``engine_options``: ``EngineConfig``'s fields; ``speculative_config`` as vLLM's ``LLM`` takes it
        (``{"method": "ngram", "num_speculative_tokens": 4, ...}``); ``lora_modules``: LoRA adapters
        (name -> PEFT folder) that ``generate(..., lora_name=)`` serves prompts through."""
        if speculative_config is not None:
            engine_options["speculative"] = SpeculativeConfig.parse(speculative_config)
        if lora_modules:
            engine_options["lora_modules"] = dict(lora_modules)
        self.engine = LLMEngine(EngineConfig(model=model, **engine_options))
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def generate(
        self,
        prompts: str | Sequence[str] | Sequence[Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        lora_name: str | Sequence[str | None] | None = None,
    ) -> list[GenerationOutput]:
        """Run every prompt to completion (continuously batched); outputs in prompt order.
        ``lora_name``: the LoRA adapter of every prompt, or one per prompt (None: the base model)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        params_list = list(params) if isinstance(params, Sequence) else [params or SamplingParams()] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError("give one SamplingParams, or one per prompt")
        loras = [lora_name] * len(prompts) if lora_name is None or isinstance(lora_name, str) else list(lora_name)
        if len(loras) != len(prompts):
            raise ValueError("give one lora_name, or one per prompt")
        engine = self.engine
        order: list[str] = []
        state: dict[str, tuple[GenerationOutput, TextStream]] = {}
        for prompt, sp, lora in zip(prompts, params_list, loras):
            text = prompt if isinstance(prompt, str) else None
            ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
            rid = f"gen-{next(self._ids)}"
            engine.add_request(rid, ids, sp, lora_name=lora)
            stream = TextStream(self.tokenizer, ids, sp.stop, sp.include_stop_str_in_output, sp.skip_special_tokens)
            state[rid] = (GenerationOutput(rid, text, ids, CompletionOutput("", [], None)), stream)
            order.append(rid)
        while engine.has_unfinished_requests():
            for out in engine.step():
                gen, stream = state[out.request_id]
                comp = gen.output
                comp.token_ids.extend(out.new_token_ids)
                if out.logprobs:
                    comp.logprobs.extend(out.logprobs)
                gen.num_cached_tokens = out.num_cached_tokens
                _, stopped = stream.update(out.new_token_ids, out.finished,
                                           out.finished and out.finish_reason == "stop")
                if stopped:
                    if not out.finished:
                        engine.abort_request(out.request_id)
                    comp.finish_reason, comp.stop_reason = "stop", stream.stop_reason
                elif out.finished:
                    comp.finish_reason, comp.stop_reason = out.finish_reason, out.stop_reason
                comp.text = stream.text
        return [state[rid][0] for rid in order]

    def embed(self, prompts: str | Sequence[str] | Sequence[Sequence[int]], dimensions: int | None = None,
              normalize: bool | None = None, task: str = "embed", lora_name: str | None = None) -> list[EmbeddingOutput]:
        """Each prompt's embedding (an engine with ``runner="pooling"``, or an embedding model's folder),
        in prompt order, as vLLM's ``LLM.embed``; ``dimensions``: a Matryoshka model's shorter vectors;
        ``normalize``: None for the model's pooler's choice; ``lora_name``: through that adapter."""
        import array

        from dyn_actor.protocol import PoolingParams

        if isinstance(prompts, str):
            prompts = [prompts]
        params = SamplingParams(max_tokens=1, pooling=PoolingParams(dimensions=dimensions, normalize=normalize, task=task))
        outputs: dict[str, EmbeddingOutput] = {}
        for prompt in prompts:
            ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
            rid = f"embd-{next(self._ids)}"
            self.engine.add_request(rid, ids, params, lora_name=lora_name)
            outputs[rid] = EmbeddingOutput(rid, prompt if isinstance(prompt, str) else None, ids, [])
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                if out.error is not None:
                    raise RuntimeError(f"{out.request_id}: {out.error}")
                outputs[out.request_id].embedding = array.array("f", out.embedding).tolist()
        return list(outputs.values())

    def classify(self, prompts: str | Sequence[str] | Sequence[Sequence[int]],
                 use_activation: bool | None = None, lora_name: str | None = None) -> list[EmbeddingOutput]:
        """A sequence classifier's label probabilities for each prompt (``embedding`` holds them, by
        label index; ``self.engine.model_config.labels`` names them), as vLLM's ``LLM.classify``."""
        return self.embed(prompts, normalize=use_activation, task="classify", lora_name=lora_name)

    def score(self, data_1: str | Sequence[str], data_2: str | Sequence[str], use_activation: bool | None = None,
              chat_template: str | None = None, lora_name: str | None = None, **template_kwargs) -> list[ScoreOutput]:
        """vLLM's ``LLM.score``: one text against many, or as many on each side, paired in order. An
        embedding model's score is the cosine similarity of the pair's embeddings; a one-label
        classifier's (a cross-encoder) its score of the pair read as one input (``pooling.pair_ids``,
        rendered by ``chat_template`` where given)."""
        from dyn_actor.engine.pooling import pair_ids

        first = [data_1] if isinstance(data_1, str) else list(data_1)
        second = [data_2] if isinstance(data_2, str) else list(data_2)
        if not first or not second or len(first) not in (1, len(second)):
            raise ValueError("score: data_1 must hold one text or as many as data_2 (neither empty)")
        pairs = [(first[0] if len(first) == 1 else first[i], d) for i, d in enumerate(second)]
        cfg = self.engine.model_config
        if len(cfg.labels) > 1:
            raise ValueError(f"score needs an embedding model or a one-label classifier; this one has "
                             f"{len(cfg.labels)} labels (use classify)")
        if cfg.labels:
            ids = [pair_ids(self.tokenizer, q, d, cfg.use_sep_token, chat_template, **template_kwargs)
                   for q, d in pairs]
            outs = self.embed(ids, normalize=use_activation, task="classify", lora_name=lora_name)
            return [ScoreOutput(o.embedding[0], i) for o, i in zip(outs, ids)]
        texts = list(dict.fromkeys(t for pair in pairs for t in pair))
        vec = {t: o.embedding for t, o in zip(texts, self.embed(texts, normalize=True, lora_name=lora_name))}
        return [ScoreOutput(sum(x * y for x, y in zip(vec[q], vec[d])), []) for q, d in pairs]

    def chat(
        self, messages: list[dict], params: SamplingParams | None = None, add_generation_prompt: bool = True,
        continue_final_message: bool = False,
    ) -> GenerationOutput:
        """One answer to ``messages`` (``continue_final_message``: the last message goes on, as in
        vLLM's ``LLM.chat``; give ``add_generation_prompt=False`` with it)."""
        ids = self.tokenizer.encode_chat(messages, add_generation_prompt, continue_final_message)
        return self.generate([ids], params)[0]
