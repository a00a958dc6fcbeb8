"""LoRA adapters in the native engine, against PEFT itself: adapters written by PEFT's
``save_pretrained`` and served beside the base model give the greedy tokens of the merged
checkpoint (PEFT's ``merge_and_unload``) and of PEFT's own forward pass, alone and in batches that
mix adapters, with chunked prefill, preemption, drafts, prefix caching kept apart per adapter."""

from __future__ import annotations

import json
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # the Triton path's test, as the other Triton tests

from dyn_actor.engine import EngineConfig, LLMEngine, SamplingParams
from dyn_actor.engine.model_config import ModelLoadError

pytest.importorskip("peft")

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
PROMPTS = {"short": [0, 5, 6, 7], "blocks": [0] + [(7 * k) % 90 + 3 for k in range(40)],
           "long": [0] + [(11 * k) % 93 + 2 for k in range(70)]}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    from tests.checkpoints import merge_lora, write_checkpoint, write_lora

    root = tmp_path_factory.mktemp("lora")
    base = write_checkpoint(root / "base", "llama")
    a = write_lora(base, root / "a", seed=1)
    b = write_lora(base, root / "b", seed=2, r=4, alpha=4.0, targets=["q_proj", "v_proj"], use_rslora=True)
    return {"base": base, "a": a, "b": b, "merged_a": merge_lora(base, a, root / "merged_a"),
            "merged_b": merge_lora(base, b, root / "merged_b")}


def _engine(model, **kw) -> LLMEngine:
    kw.setdefault("num_kv_blocks", 128)
    return LLMEngine(EngineConfig(model=str(model), dtype="float32", **kw))


def _tokens(engine: LLMEngine, prompts: dict, lora: dict | None = None, params=GREEDY) -> dict[str, list[int]]:
    for k, p in prompts.items():
        engine.add_request(k, p, params, lora_name=(lora or {}).get(k))
    got: dict[str, list[int]] = {k: [] for k in prompts}
    while engine.has_unfinished_requests():
        for out in engine.step():
            got[out.request_id].extend(out.new_token_ids)
    assert engine.block_manager.num_used_blocks == 0
    return got


@pytest.fixture(scope="module")
def want(dirs):
    """Each prompt's greedy tokens on the base model and on each merged checkpoint."""
    return {name: _tokens(_engine(dirs[m]), PROMPTS) for name, m in
            (("base", "base"), ("a", "merged_a"), ("b", "merged_b"))}


def test_adapters_change_the_tokens_and_equal_the_merged_checkpoints(dirs, want):
    assert want["a"] != want["base"] and want["b"] != want["base"] and want["a"] != want["b"]
    engine = _engine(dirs["base"], lora_modules={"a": str(dirs["a"]), "b": str(dirs["b"])})
    for name in ("a", "b"):
        assert _tokens(engine, PROMPTS, {k: name for k in PROMPTS}) == want[name], name
    assert _tokens(engine, PROMPTS) == want["base"]  # requests without an adapter: the base model


def test_peft_forward_gives_the_same_tokens(dirs):
    """PEFT's own forward pass (the adapter applied beside the weights, not merged) as the reference."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(dirs["base"]), dtype=torch.float32),
                                      str(dirs["a"])).eval()
    engine = _engine(dirs["base"], lora_modules={"a": str(dirs["a"])})
    got = _tokens(engine, PROMPTS, {k: "a" for k in PROMPTS})
    for k, p in PROMPTS.items():
        with torch.no_grad():
            ref = model.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False, min_new_tokens=12,
                                 pad_token_id=1)[0, len(p):].tolist()
        if 1 in got[k]:  # generate()'s min_new_tokens masks end-of-sequence where ignore_eos keeps it
            continue
        assert got[k] == ref, k
    assert any(1 not in v for v in got.values())


@pytest.mark.parametrize("form", ["auto", "grouped", "dense"])
@pytest.mark.parametrize("setup", ["one batch", "chunked prefill", "preemption", "drafts", "overlapped", "graphs"])
def test_mixed_batches(dirs, want, setup, form, monkeypatch):
    """Requests of adapter a, adapter b and none in the same steps: each gets its own tokens, with the
    adapters applied per adapter on its rows (grouped), all at once masked per row (dense), or as the
    engine picks for each step (auto)."""
    from dyn_actor.engine.spec_decode import SpeculativeConfig

    monkeypatch.setenv("DYN_ACTOR_LORA_FORM", form)
    kw = {"one batch": {}, "chunked prefill": {"max_num_batched_tokens": 24}, "preemption": {"num_kv_blocks": 9},
          "drafts": {"speculative": SpeculativeConfig.parse({"method": "ngram", "num_speculative_tokens": 3,
                                                             "prompt_lookup_min": 1, "prompt_lookup_max": 3})},
          "overlapped": {"async_scheduling": "on"}, "graphs": {"cuda_graphs": "on", "num_kv_blocks": 24}}[setup]
    engine = _engine(dirs["base"], lora_modules={"a": str(dirs["a"]), "b": str(dirs["b"])}, **kw)
    assert engine.lora_form == form
    prompts, lora, expect = {}, {}, {}
    for k, p in PROMPTS.items():
        for name in ("a", "b", "base"):
            key = f"{k}-{name}"
            prompts[key] = p
            if name != "base":
                lora[key] = name
            expect[key] = want[name][k]
    assert _tokens(engine, prompts, lora) == expect
    if setup == "preemption":
        assert engine.stats().num_preemptions > 0
    if setup == "drafts":
        assert engine.stats().spec_accepted_tokens > 0
    if setup in ("graphs", "overlapped"):  # decode steps replayed from the graph runner, adapters in it
        assert engine.graphs is not None and engine.graphs.lora


def test_prefix_cache_is_kept_apart_per_adapter(dirs, want):
    from dyn_actor.engine.lora import lora_root
    from dyn_actor.kv.block_hash import hash_blocks

    engine = _engine(dirs["base"], lora_modules={"a": str(dirs["a"]), "b": str(dirs["b"])})
    p = PROMPTS["long"]
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)

    def run(rid, lora):
        engine.add_request(rid, p, params, lora_name=lora)
        req = engine.requests[rid]
        toks = []
        while engine.has_unfinished_requests():
            for out in engine.step():
                toks.extend(out.new_token_ids)
        return toks, req.num_cached_tokens

    base_toks, cached = run("base-1", None)
    assert cached == 0 and base_toks == want["base"]["long"][:4]
    a_toks, cached = run("a-1", "a")  # the base model's blocks hold other KV: no hit
    assert cached == 0 and a_toks == want["a"]["long"][:4]
    assert run("a-2", "a") == (a_toks, 64)  # its own: a hit
    assert run("b-1", "b")[1] == 0
    assert run("base-2", None)[1] == 64
    # the KV events say so: adapter a's blocks hash on its root, as the router hashes its requests
    stored = {h for ev in engine.drain_kv_events() for h in getattr(ev, "block_hashes", [])}
    for root in (None, lora_root("a"), lora_root("b")):
        assert set(hash_blocks(p, 16, root)[:4]) <= stored
    assert len({lora_root("a"), lora_root("b"), None}) == 3


def test_remote_prefill_hooks_carry_the_adapter(dirs, want):
    """The disaggregation hooks: a decode engine allocates for adapter a, a prefill engine computes the
    prompt with adapter a and its KV is copied into the decode engine's blocks; decoding continues
    with the adapter's tokens. Imported prefixes are cached under the adapter's root only."""
    lora = {"a": str(dirs["a"])}
    dec, pre = _engine(dirs["base"], lora_modules=lora), _engine(dirs["base"], lora_modules=lora)
    p = PROMPTS["long"]
    alloc = dec.allocate_remote_prefill("r", p, GREEDY, lora_name="a")
    assert alloc is not None
    pre.add_request("r", p, SamplingParams(max_tokens=1, temperature=0), hold_blocks=True, lora_name="a")
    first = []
    while pre.has_unfinished_requests():
        first += [t for o in pre.step() for t in o.new_token_ids]
    src = pre.block_ids("r")
    dec.pool.write_blocks(alloc.block_ids, pre.pool.read_blocks(src))
    pre.release_blocks("r")
    got = list(first)
    out = dec.finish_remote_prefill("r", first[0])
    assert out is not None
    while dec.has_unfinished_requests():
        got += [t for o in dec.step() for t in o.new_token_ids]
    assert got == want["a"]["long"]
    assert dec.cached_prefix(p, "a")[1] == 64 and dec.cached_prefix(p)[1] == 0


def test_bad_adapters_and_names_are_one_line_errors(dirs, tmp_path):
    import shutil

    def broken(name, edit):
        d = tmp_path / name
        shutil.copytree(dirs["a"], d)
        cfg = json.loads((d / "adapter_config.json").read_text())
        edit(d, cfg)
        (d / "adapter_config.json").write_text(json.dumps(cfg))
        return d

    cases = [
        (tmp_path / "nope", "does not exist"),
        (broken("dora", lambda d, c: c.update(use_dora=True)), "DoRA"),
        (broken("save", lambda d, c: c.update(modules_to_save=["lm_head"])), "modules_to_save"),
        (broken("rank", lambda d, c: c.update(r=64)), "above --max-lora-rank"),
        (broken("shape", lambda d, c: c.update(r=4)), "another base model"),
        (broken("bias", lambda d, c: c.update(bias="all")), "bias"),
        (broken("nofile", lambda d, c: (d / "adapter_model.safetensors").unlink()), "no adapter_model"),
    ]
    for path, message in cases:
        with pytest.raises(ModelLoadError, match=message) as info:
            _engine(dirs["base"], lora_modules={"x": str(path)})
        assert "\n" not in str(info.value)
    engine = _engine(dirs["base"], lora_modules={"a": str(dirs["a"])})
    with pytest.raises(ValueError, match="unknown LoRA adapter 'zz'.*adapters: a"):
        engine.add_request("r", [0, 5, 6], GREEDY, lora_name="zz")
    assert not engine.requests and engine.block_manager.num_used_blocks == 0


def test_offline_llm_takes_adapters(dirs, want):
    from dyn_actor.engine.llm import LLM

    llm = LLM(str(dirs["base"]), lora_modules={"a": str(dirs["a"])}, dtype="float32", num_kv_blocks=64)
    keys = ["short", "blocks"]
    outs = llm.generate([PROMPTS[k] for k in keys], GREEDY, lora_name=["a", None])
    assert [o.output.token_ids for o in outs] == [want["a"]["short"], want["base"]["blocks"]]
    assert llm.generate([PROMPTS["long"]], GREEDY, lora_name="a")[0].output.token_ids == want["a"]["long"]
    with pytest.raises(ValueError, match="one per prompt"):
        llm.generate([PROMPTS["short"]], GREEDY, lora_name=["a", "a"])


def test_parse_lora_modules():
    from dyn_actor.engine.lora import parse_lora_modules

    assert parse_lora_modules(["a=/x", ' {"name": "b", "path": "/y", "base_model_name": "m"} ']) == {
        "a": "/x", "b": "/y"}
    for bad, msg in ((["a"], "NAME=PATH"), (["a=/x", "a=/y"], "twice"), (["=/x"], "both"),
                     (['{"name": "a"}'], "'name' and 'path'")):
        with pytest.raises(ValueError, match=msg):
            parse_lora_modules(bad)


def test_the_triton_path_applies_adapters(dirs, tmp_path):
    """The fused GPU path (under Triton's interpreter here) with an adapter, eagerly and with the
    graph runners on (steps with adapter rows run eagerly beside them): the default path's tokens."""
    pytest.importorskip("triton")
    from tests.checkpoints import write_checkpoint, write_lora

    base = write_checkpoint(tmp_path / "one", num_hidden_layers=1)
    a = write_lora(base, tmp_path / "a", seed=3)
    prompts = {"x": PROMPTS["blocks"], "y": [0, 9, 8]}
    lora = {"x": "a", "y": "a"}
    params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    want = _tokens(_engine(base, lora_modules={"a": str(a)}, max_model_len=64), prompts, lora, params)
    for kw in ({}, {"cuda_graphs": "on", "piecewise_graphs": "on"}):
        engine = _engine(base, lora_modules={"a": str(a)}, max_model_len=64, attention="triton", **kw)
        assert _tokens(engine, prompts, lora, params) == want, kw


def _complete(server, model, prompt, **kw):
    import requests

    r = requests.post(server.url + "/v1/completions", timeout=60, json={
        "model": model, "prompt": prompt, "max_tokens": 12, "temperature": 0, "ignore_eos": True, **kw})
    return r


def test_served_1p1d_with_adapters(dirs, want):
    """The launcher's flags, 1p1d with every prefill remote: each request's model picks its adapter (the
    prefill worker computes with it too), /v1/models lists the adapters, the answer names the adapter,
    an unknown model is a 404 naming what is served."""
    import requests

    from dyn_actor.engine.loader import load_tokenizer
    from tests.helpers import metric
    from tests.server import Server

    tok = load_tokenizer(str(dirs["base"]))
    s = Server("--topology", "1p1d", "--max-local-prefill-length", "0", "--model", str(dirs["base"]),
               "--served-model-name", "base", "--dtype", "float32", "--kv-cache-memory-gb", "0.1",
               "--enable-lora", "--lora-modules", f"a={dirs['a']}", f'{{"name": "b", "path": "{dirs["b"]}"}}')
    try:
        models = requests.get(s.url + "/v1/models", timeout=10).json()["data"]
        assert [(m["id"], m["parent"]) for m in models] == [("base", None), ("a", "base"), ("b", "base")]
        assert models[1]["root"] == str(dirs["a"])
        for name, model in (("a", "a"), ("b", "b"), ("base", "base")):
            for k in ("blocks", "long"):
                r = _complete(s, model, PROMPTS[k])
                assert r.status_code == 200, r.text
                assert r.json()["model"] == model
                assert r.json()["choices"][0]["text"] == tok.decode(want[name][k]), (name, k)
        chunks = requests.post(s.url + "/v1/chat/completions", timeout=60, stream=True, json={
            "model": "a", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True})
        lines = [ln for ln in chunks.iter_lines() if ln.startswith(b"data: {")]
        assert lines and all(json.loads(ln[6:])["model"] == "a" for ln in lines)
        r = _complete(s, "zz", [0, 5, 6])
        assert r.status_code == 404 and "'base', 'a', 'b'" in r.json()["error"]["message"]
        assert metric(s, "dyn_remote_prefills_total") >= 6
        text = requests.get(s.url + "/metrics", timeout=10).text
        assert 'dyn_lora_requests_total{adapter="a"} 3' in text and 'dyn_lora_requests_total{adapter="b"} 2' in text
    finally:
        code, err = s.stop()
    assert code == 0, err[-2000:]


def test_kv_router_keeps_adapters_apart(dirs, tmp_path):
    """Two aggregated workers behind the kv router, the adapters from a YAML config: a conversation of
    adapter a returns to the worker that caches it; the same prompt for adapter b, or the base model,
    is predicted no overlap there and hits no cache (their blocks hash apart)."""
    from tests.helpers import metric
    from tests.server import InprocServer

    config = tmp_path / "lora.yaml"
    config.write_text(f"lora-modules:\n  a: {dirs['a']}\n  b: {dirs['b']}\nmax-loras: 2\n")
    s = InprocServer("--config", str(config), "--workers", "2", "--model", str(dirs["base"]), "--dtype", "float32",
                     "--kv-cache-memory-gb", "0.1", "--served-model-name", "base")
    try:
        p = PROMPTS["long"]
        first = _complete(s, "a", p).json()
        assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        from tests.helpers import eventually

        def hits(model):
            return _complete(s, model, p).json()["usage"]["prompt_tokens_details"]["cached_tokens"]

        assert eventually(lambda: hits("a") == 64, timeout=5)  # routed back to its cache
        predicted = metric(s, "dyn_router_predicted_overlap_tokens_total")
        assert hits("b") == 0 and hits("base") == 0
        assert metric(s, "dyn_router_predicted_overlap_tokens_total") == predicted
    finally:
        s.stop()


def test_launcher_refuses_bad_lora_flags(dirs, tmp_path):
    from launcher.config import ConfigError, parse_args

    for argv, msg in ((["--lora-modules", "a"], "NAME=PATH"),
                      (["--lora-modules", f"a={tmp_path}"], "no adapter_config.json"),
                      (["--lora-modules", f"a={dirs['a']}", f"b={dirs['b']}", "--max-loras", "1"], "every one"),
                      (["--max-loras", "2"], "needs --lora-modules"),
                      (["--lora-modules", f"builtin:tiny={dirs['a']}"], "base model's name"),
                      (["--max-lora-rank", "0"], "--max-lora-rank")):
        with pytest.raises(ConfigError, match=msg):
            parse_args(argv)
    cfg = parse_args(["--lora-modules", f"a={dirs['a']}"])
    assert cfg.enable_lora and cfg.lora_modules == [f"a={dirs['a']}"]


def test_phi3_adapters_of_its_fused_projections(tmp_path):
    """Phi-3's adapters target the projections it stores fused (``qkv_proj``, ``gate_up_proj``) and its
    heads turn half their dimensions (the model reorders them; so must the adapter's query and key rows):
    served through the adapter, the greedy tokens are the merged checkpoint's, mixed with base rows."""
    from tests.checkpoints import merge_lora, write_checkpoint, write_lora

    base = write_checkpoint(tmp_path / "base", "phi3")
    lora = write_lora(base, tmp_path / "lora", seed=3, targets=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"])
    merged = _tokens(_engine(merge_lora(base, lora, tmp_path / "merged")), PROMPTS)
    plain = _tokens(_engine(base), PROMPTS)
    assert merged != plain
    engine = _engine(base, lora_modules={"p": str(lora)})
    mixed = _tokens(engine, PROMPTS, {"short": "p", "long": "p"})
    assert mixed == {"short": merged["short"], "blocks": plain["blocks"], "long": merged["long"]}
