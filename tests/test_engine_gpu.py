"""The native engine on a GPU (skipped without one; run by ``scripts/gpu_check.sh``): parity with
transformers, and the same greedy tokens whatever the batch, cache or schedule."""

from __future__ import annotations

import random

import pytest
import torch

from dyn_actor.engine import EngineConfig, LLMEngine, SamplingParams
from tests.helpers import run_all

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
transformers = pytest.importorskip("transformers")

PROMPT_LENS = [3, 16, 37, 70, 97]


def _prompts(vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[0] + [rng.randrange(2, vocab) for _ in range(n - 1)] for n in PROMPT_LENS]


def _engine(model_dir, dtype="float32", **kw) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(model_dir), device="cuda", dtype=dtype,
                                  **{"num_kv_blocks": 256, "max_model_len": 512, **kw}))


def _generate(hf, prompt: list[int], n: int) -> list[int]:
    """transformers' greedy ``generate()`` of exactly ``n`` tokens (end of sequence masked, as min_tokens)."""
    with torch.no_grad():
        return hf.generate(torch.tensor([prompt], device="cuda"), max_new_tokens=n, do_sample=False,
                           min_new_tokens=n, pad_token_id=1)[0, len(prompt):].tolist()


def test_float32_greedy_matches_generate_and_bf16_logits_are_close(llama_dir):
    from transformers import AutoModelForCausalLM

    engine = _engine(llama_dir)
    hf = AutoModelForCausalLM.from_pretrained(str(llama_dir), dtype=torch.float32).cuda().eval()
    prompts = _prompts(engine.model_config.vocab_size, seed=1)
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    got = run_all(engine, {str(i): (p, params) for i, p in enumerate(prompts)})
    for i, p in enumerate(prompts):
        assert got[str(i)][0] == _generate(hf, p, 24), f"prompt {i} ({len(p)} tokens)"
    bf16 = _engine(llama_dir, dtype="bfloat16")
    for ours, ref in zip(bf16.score(prompts), engine.score(prompts)):
        assert (ours.float() - ref).abs().max().item() < 0.1 * ref.abs().max().item()


def test_float32_tokens_do_not_depend_on_batch_cache_or_schedule(llama_dir):
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    vocab = _engine(llama_dir).model_config.vocab_size
    rng = random.Random(4)
    prompts = {f"r{i}": [0] + [rng.randrange(2, vocab) for _ in range(rng.randint(5, 90))] for i in range(64)}
    alone = {k: run_all(_engine(llama_dir), {k: (p, params)})[k][0] for k, p in list(prompts.items())[:6]}
    batch = run_all(_engine(llama_dir), {k: (p, params) for k, p in prompts.items()})
    assert {k: batch[k][0] for k in alone} == alone
    warm = _engine(llama_dir)  # a prefix-cache hit: the same prompts again
    run_all(warm, {k: (p, params) for k, p in list(prompts.items())[:6]})
    again = run_all(warm, {k: (p, params) for k, p in list(prompts.items())[:6]})
    assert {k: v[0] for k, v in again.items()} == alone
    chunked = run_all(_engine(llama_dir, max_num_batched_tokens=32), {k: (p, params) for k, p in prompts.items()})
    assert {k: chunked[k][0] for k in alone} == alone
    small = _engine(llama_dir, num_kv_blocks=24, max_model_len=128)  # preemption
    tight = run_all(small, {k: (p, params) for k, p in prompts.items()})
    assert {k: tight[k][0] for k in alone} == alone and small.stats().num_preemptions > 0


def test_overlapped_steps_give_the_tokens_of_steps_one_at_a_time(llama_dir):
    """On the GPU the next step really is queued before the host has the tokens it starts from (its
    inputs taken on the device): greedy, seeded sampling, logprobs and min_tokens give what steps
    taken one at a time give, as requests come and go (prefills and mixed steps queued too)."""
    vocab = _engine(llama_dir).model_config.vocab_size
    rng = random.Random(6)
    kinds = [lambda: SamplingParams(max_tokens=rng.randint(1, 30), temperature=0, ignore_eos=True),
             lambda: SamplingParams(max_tokens=rng.randint(5, 30), temperature=0.8, top_k=50, seed=rng.randrange(99)),
             lambda: SamplingParams(max_tokens=20, temperature=0, logprobs=3, ignore_eos=True),
             lambda: SamplingParams(max_tokens=20, temperature=1.0, seed=rng.randrange(99), min_tokens=10)]
    jobs = {f"r{i}": ([0] + [rng.randrange(2, vocab) for _ in range(rng.randint(5, 90))], kinds[i % 4]())
            for i in range(40)}

    def summary(result):
        return {k: (toks, reason, [(lp.token_id, lp.rank) for o in outs for lp in (o.logprobs or [])])
                for k, (toks, reason, outs) in result.items()}

    stepwise = summary(run_all(_engine(llama_dir, async_scheduling="off", max_num_seqs=16), jobs))
    engine = _engine(llama_dir, max_num_seqs=16)
    assert engine._overlap  # auto: on with the graphs on a GPU
    assert summary(run_all(engine, jobs)) == stepwise
    assert engine.overlapped_steps > 50 and engine.block_manager.num_used_blocks == 0


def test_prefill_and_mixed_steps_from_piecewise_graphs_give_the_eager_tokens(llama_dir):
    """Prompt steps of up to 1,024 tokens replay graphs captured in pieces around attention
    (``piecewise.py``): the same float32 greedy tokens as eager steps, for prompts that fill
    buckets differently, chunked, after a prefix hit, and mixed into running decodes."""
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    vocab = _engine(llama_dir).model_config.vocab_size
    rng = random.Random(9)
    prompts = {f"r{i}": [0] + [rng.randrange(2, vocab) for _ in range(n - 1)]
               for i, n in enumerate([3, 9, 40, 100, 130, 260, 400, 33, 7, 64])}
    jobs = {k: (p, params) for k, p in prompts.items()}

    def run(**kw):
        engine = _engine(llama_dir, max_num_seqs=4, **kw)  # 4 at a time: arrivals join running decodes
        first = run_all(engine, jobs)
        again = run_all(engine, {f"{k}-again": (p + [5, 6, 7], params) for k, p in prompts.items()})  # prefix hits
        return engine, {**{k: v[0] for k, v in first.items()}, **{k: v[0] for k, v in again.items()}}

    _, eager = run(piecewise_graphs="off")
    engine, pieces = run()
    assert engine.pieces is not None and engine.pieces.buckets[-1] == 1024
    assert pieces == eager
    _, chunked = run(max_num_batched_tokens=64)
    assert chunked == eager


def test_structured_outputs_on_the_gpu(llama_dir):
    """Grammar rows beside free ones on the GPU, from the decode graphs with overlapped steps (the
    defaults there): the bitmask unpacked on the device, every text kept to its spec, and the
    grammar rows' greedy tokens those of the same engine in eager stepwise mode."""
    pytest.importorskip("xgrammar")
    import re

    from dyn_actor.protocol import StructuredOutput

    spec = StructuredOutput(regex=r"[a-z]{2,8}-[0-9]{3}")

    def run(**kw):
        e = _engine(llama_dir, **kw)
        vocab = e.model_config.vocab_size
        rng = random.Random(9)
        reqs = {f"free{i}": ([0] + [rng.randrange(2, vocab) for _ in range(20 + i)],
                             SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)) for i in range(12)}
        reqs.update({f"g{i}": ([0] + [rng.randrange(2, vocab) for _ in range(10 + i)],
                               SamplingParams(max_tokens=40, temperature=0 if i < 4 else 1.0, seed=i, structured=spec))
                     for i in range(8)})
        out = run_all(e, reqs)
        assert e.block_manager.num_used_blocks == 0
        return {k: (e.tokenizer.decode(v[0]), v[1]) for k, v in out.items()}

    graphs = run()
    for i in range(8):
        text, reason = graphs[f"g{i}"]
        assert reason == "stop" and re.fullmatch(r"[a-z]{2,8}-[0-9]{3}", text), (i, text)
    eager = run(cuda_graphs="off", piecewise_graphs="off", async_scheduling="off")
    assert {k: graphs[k] for k in graphs if k.startswith("free") or k in ("g0", "g1", "g2", "g3")} == \
        {k: eager[k] for k in graphs if k.startswith("free") or k in ("g0", "g1", "g2", "g3")}


def test_drafted_steps_give_the_plain_greedy_tokens(llama_dir):
    """Speculative decoding on the card: drafted rows replayed from the decode graphs (and run
    eagerly) give the tokens of the plain engine (graphs, overlapped steps). Prompts repeat a pattern
    so that the n-gram lookup finds drafts, kept or not."""
    from dyn_actor.engine.spec_decode import SpeculativeConfig

    spec = SpeculativeConfig.parse({"num_speculative_tokens": 4, "prompt_lookup_min": 1, "prompt_lookup_max": 3})
    params = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
    vocab = _engine(llama_dir).model_config.vocab_size
    rng = random.Random(9)
    prompts = {}
    for i in range(24):
        pattern = [rng.randrange(2, vocab) for _ in range(rng.randint(2, 9))]
        prompts[f"r{i}"] = [0] + pattern * rng.randint(2, 8)
    jobs = {k: (p, params) for k, p in prompts.items()}
    plain = {k: v[0] for k, v in run_all(_engine(llama_dir), jobs).items()}
    for kw in ({}, {"cuda_graphs": "off", "piecewise_graphs": "off"}):
        engine = _engine(llama_dir, speculative=spec, **kw)
        assert {k: v[0] for k, v in run_all(engine, jobs).items()} == plain, kw
        assert engine.stats().spec_draft_tokens > 0
        assert engine.block_manager.num_used_blocks == 0


def test_lora_adapters_in_the_graphs_give_the_merged_checkpoints_tokens(llama_dir, tmp_path):
    """Two adapters (written without PEFT, which the GPU machine lacks) and base requests in the same
    decode steps replayed from the CUDA graphs, and eagerly: the tokens of the checkpoint with each
    adapter merged into its weights, float32."""
    import json

    from safetensors.torch import load_file

    from benchmarks.checkpoints import write_random_lora
    from dyn_actor.engine.loader import load_model

    adapters = {n: str(write_random_lora(llama_dir, tmp_path / n, rank=8, seed=i)) for i, n in enumerate("ab")}
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    prompts = _prompts(_engine(llama_dir).model_config.vocab_size, seed=6)
    want = {}
    for name in adapters:
        loaded = load_model(str(llama_dir))
        acfg = json.loads((tmp_path / name / "adapter_config.json").read_text())
        lw = load_file(str(tmp_path / name / "adapter_model.safetensors"))
        w = dict(loaded.weights)
        for key, a in lw.items():
            if ".lora_A." in key:
                target = key.replace("base_model.model.", "").replace(".lora_A.weight", ".weight")
                w[target] = w[target] + acfg["lora_alpha"] / acfg["r"] * lw[key.replace(".lora_A.", ".lora_B.")] @ a
        loaded.weights = w
        merged = LLMEngine(EngineConfig(model=str(llama_dir), device="cuda", dtype="float32", num_kv_blocks=256,
                                        max_model_len=512), loaded=loaded)
        want[name] = {str(i): v[0] for i, v in run_all(merged, {str(i): (p, params) for i, p in enumerate(prompts)}).items()}
    base = {str(i): v[0] for i, v in run_all(_engine(llama_dir), {str(i): (p, params)
                                                                  for i, p in enumerate(prompts)}).items()}
    for kw in ({}, {"cuda_graphs": "off"}):
        engine = _engine(llama_dir, lora_modules=adapters, **kw)
        assert (engine.graphs is not None) == (not kw)
        for i, p in enumerate(prompts):
            for name in ("a", "b", None):
                engine.add_request(f"{name}-{i}", p, params, lora_name=name)
        got: dict[str, list[int]] = {}
        while engine.has_unfinished_requests():
            for o in engine.step():
                got.setdefault(o.request_id, []).extend(o.new_token_ids)
        for i in range(len(prompts)):
            assert got[f"a-{i}"] == want["a"][str(i)] and got[f"b-{i}"] == want["b"][str(i)], (kw, i)
            assert got[f"None-{i}"] == base[str(i)], (kw, i)


@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe", "gemma3", "mistral", "gemma2", "phi3"])
def test_model_families_on_the_gpu(kind, tmp_path):
    """A sparse MoE checkpoint (and Gemma 3's, Mistral's sliding windows of 8 tokens, Gemma 2's capped
    scores, Phi-3's partial rotary) on the card:
    float32 greedy tokens equal transformers' ``generate()`` (the grouped-experts kernel in IEEE
    float32; the windowed attention kernels), a batch of 64 through the decode graphs equals
    ``--enforce-eager`` and the prompts alone, and bf16 greedy runs through the graphs."""
    from transformers import AutoModelForCausalLM

    from tests.checkpoints import write_checkpoint

    model_dir = write_checkpoint(tmp_path / kind, kind)
    engine = _engine(model_dir)
    hf = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).cuda().eval()
    prompts = _prompts(engine.model_config.vocab_size, seed=2)
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    got = run_all(engine, {str(i): (p, params) for i, p in enumerate(prompts)})
    for i, p in enumerate(prompts):
        assert got[str(i)][0] == _generate(hf, p, 16), f"{kind}: prompt {i} ({len(p)} tokens)"
    rng = random.Random(5)
    vocab = engine.model_config.vocab_size
    many = {f"r{i}": [0] + [rng.randrange(2, vocab) for _ in range(rng.randint(5, 90))] for i in range(64)}
    graphs = run_all(_engine(model_dir), {k: (p, params) for k, p in many.items()})
    eager = run_all(_engine(model_dir, cuda_graphs="off", piecewise_graphs="off", async_scheduling="off"), {k: (p, params) for k, p in many.items()})
    assert {k: v[0] for k, v in graphs.items()} == {k: v[0] for k, v in eager.items()}
    alone = {k: run_all(engine, {k: (p, params)})[k][0] for k, p in list(many.items())[:4]}
    assert {k: graphs[k][0] for k in alone} == alone
    bf16 = run_all(_engine(model_dir, dtype="bfloat16"), {k: (p, params) for k, p in many.items()})
    assert all(len(v[0]) == 16 for v in bf16.values())


def test_embeddings_on_the_gpu(tmp_path):
    """A bare Qwen3Model with last-token pooling (Qwen3-Embedding's shape) on the GPU path: float32
    vectors equal to transformers' ``AutoModel`` states, in chunks; bf16 close."""
    from transformers import AutoModel

    from dyn_actor.protocol import PoolingParams
    from tests.checkpoints import write_embedding_checkpoint

    folder = write_embedding_checkpoint(tmp_path / "emb", "qwen3", "lasttoken")
    hf = AutoModel.from_pretrained(str(folder), dtype=torch.float32).to("cuda")
    prompts = _prompts(100)
    for dtype, tol in (("float32", 1e-4), ("bfloat16", 3e-2)):
        engine = _engine(folder, dtype, max_num_batched_tokens=32)
        reqs = {str(i): (p, SamplingParams(max_tokens=1, pooling=PoolingParams())) for i, p in enumerate(prompts)}
        for rid, (p, sp) in reqs.items():
            engine.add_request(rid, p, sp)
        got = {}
        while engine.has_unfinished_requests():
            for o in engine.step():
                got[o.request_id] = torch.frombuffer(bytearray(o.embedding), dtype=torch.float32)
        for i, p in enumerate(prompts):
            with torch.no_grad():
                ref = hf(torch.tensor([p], device="cuda")).last_hidden_state[0, -1]
            ref = torch.nn.functional.normalize(ref, dim=0).cpu()
            assert (got[str(i)] - ref).abs().max() < tol, (dtype, i)


def test_four_bit_checkpoint_on_the_gpu(tmp_path):
    """A 4-bit GPTQ export on the GPU (dequantized once at load): the dense model's greedy tokens."""
    from tests.checkpoints import write_checkpoint, write_quantized_checkpoint

    src = write_checkpoint(tmp_path / "src", "llama", hidden_size=256, intermediate_size=512)
    q_dir, dense_dir = write_quantized_checkpoint(src, tmp_path, "gptq", 64, True)
    prompts = _prompts(99, seed=3)
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    got = [run_all(_engine(d), {str(i): (p, params) for i, p in enumerate(prompts)}) for d in (q_dir, dense_dir)]
    assert {k: v[0] for k, v in got[0].items()} == {k: v[0] for k, v in got[1].items()}
