"""Embeddings (``--runner pooling``, ``engine/pooling.py``, ``POST /v1/embeddings``): each prompt pooled
into one vector from the final hidden states, equal to transformers' ``AutoModel`` hidden states pooled
the same way (last token, mean, first token), whatever the chunking, batching, prefix hits and
preemption; Matryoshka cuts; the sentence-transformers files and ``--pooler-config`` read as vLLM
reads them; the route through the openai client, in both topologies; vLLM's ``/score`` and
``/rerank``; sequence classifiers at ``/classify``, equal to transformers'; and what is refused."""

from __future__ import annotations

import base64
import json
import os
import time

import numpy as np
import pytest
import requests
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported

from dyn_actor.engine import EngineConfig, LLMEngine, SamplingParams
from dyn_actor.engine.model_config import ModelLoadError
from dyn_actor.engine.pooling import PoolerConfig, parse_pooler_config, sentence_transformers_pooler
from dyn_actor.protocol import PoolingParams
from tests.checkpoints import write_checkpoint, write_classifier_checkpoint, write_embedding_checkpoint
from tests.helpers import metric, pooling_server
from tests.server import InprocServer

PROMPTS = [list(range(5, 8)), list(range(9, 26)), [(7 * i) % 90 + 3 for i in range(50)]]
MODES = {"lasttoken": "LAST", "mean": "MEAN", "cls": "CLS"}


def embed(engine: LLMEngine, prompts: list[list[int]], pooling: PoolingParams | None = None,
          ids: list[str] | None = None) -> dict[str, tuple[np.ndarray, int]]:
    """Run every prompt at once; request id -> (vector, cached prompt tokens)."""
    ids = ids or [str(i) for i in range(len(prompts))]
    for rid, p in zip(ids, prompts):
        engine.add_request(rid, p, SamplingParams(max_tokens=1, pooling=pooling or PoolingParams()))
    out = {}
    for _ in range(10_000):
        if not engine.has_unfinished_requests():
            break
        for o in engine.step():
            assert o.finished and o.new_token_ids == [] and o.error is None, o
            out[o.request_id] = (np.frombuffer(o.embedding, "<f4").copy(), o.num_cached_tokens)
    assert sorted(out) == sorted(ids)
    return out


def reference(folder, prompts: list[list[int]], mode: str, normalize: bool = True) -> list[np.ndarray]:
    from transformers import AutoModel

    hf = AutoModel.from_pretrained(str(folder), dtype=torch.float32)
    refs = []
    with torch.no_grad():
        for p in prompts:
            h = hf(torch.tensor([p])).last_hidden_state[0]
            v = {"LAST": h[-1], "MEAN": h.mean(0), "CLS": h[0]}[mode]
            refs.append((torch.nn.functional.normalize(v, dim=0) if normalize else v).numpy())
    return refs


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("embedding-models")
    return {
        # Qwen3-Embedding's shape: a bare Qwen3Model, last-token pooling, normalized, Matryoshka
        "qwen3": write_embedding_checkpoint(root / "qwen3", "qwen3", "lasttoken", config={"is_matryoshka": True}),
        "llama-mean": write_embedding_checkpoint(root / "llama", "llama", "mean"),
        "qwen2-cls": write_embedding_checkpoint(root / "qwen2", "qwen2", "cls", normalize=False,
                                                config={"matryoshka_dimensions": [16, 64]}),
    }


@pytest.mark.parametrize("name", ["qwen3", "llama-mean", "qwen2-cls"])
def test_pooled_states_equal_transformers(folders, name):
    """Chunks of 16 tokens (a 50-token prompt in four), three prompts in one batch."""
    folder = folders[name]
    e = LLMEngine(EngineConfig(model=str(folder), kv_cache_memory=16 << 20, max_num_batched_tokens=16))
    mode = e.pooler.pooling_type
    assert e.runner == "pooling" and e.pooler.source == "sentence-transformers"
    assert mode == {"qwen3": "LAST", "llama-mean": "MEAN", "qwen2-cls": "CLS"}[name]
    got = embed(e, PROMPTS)
    for i, ref in enumerate(reference(folder, PROMPTS, mode, e.pooler.normalize)):
        np.testing.assert_allclose(got[str(i)][0], ref, atol=2e-5, rtol=1e-4)
    assert e.block_manager.num_used_blocks == 0 and not e.requests


def test_the_triton_path_pools_the_same_states(folders):
    """The GPU path's kernels (Triton attention, fused norms and RoPE; under the interpreter off a
    GPU): the same vectors as the default path, in chunks after a cached prefix. The graph runners
    asked for are not built: a pooling runner's steps are prompts, run eagerly."""
    pytest.importorskip("triton")
    folder = folders["qwen3"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    want = embed(LLMEngine(EngineConfig(model=str(folder), kv_cache_memory=16 << 20)), PROMPTS)
    e = LLMEngine(EngineConfig(model=str(folder), attention="triton", device=device, dtype="float32",
                               num_kv_blocks=64, max_num_batched_tokens=16, cuda_graphs="on", piecewise_graphs="on"))
    assert e.graphs is None and e.pieces is None
    first = embed(e, PROMPTS[2:], ids=["2"])
    got = {**first, **embed(e, PROMPTS[:2])}
    for k in want:
        np.testing.assert_allclose(got[k][0], want[k][0], atol=1e-4)


def test_offline_embed(folders):
    from dyn_actor.engine.llm import LLM

    llm = LLM(str(folders["qwen3"]), kv_cache_memory=16 << 20)
    outs = llm.embed(["hello", PROMPTS[1]], dimensions=16)
    assert [len(o.embedding) for o in outs] == [16, 16] and outs[1].prompt_token_ids == PROMPTS[1]
    assert abs(float(np.linalg.norm(outs[0].embedding)) - 1) < 1e-5


def test_causal_lm_served_for_embeddings(tmp_path):
    """A causal LM's folder with --runner pooling: vLLM's default pooler (last token, normalized);
    --pooler-config changes it."""
    folder = write_checkpoint(tmp_path / "llama", "llama")
    e = LLMEngine(EngineConfig(model=str(folder), runner="pooling", kv_cache_memory=16 << 20))
    assert e.pooler == PoolerConfig("LAST", True, "default") and e.model.lm_head is None
    got = embed(e, PROMPTS)
    for i, ref in enumerate(reference(folder, PROMPTS, "LAST")):
        np.testing.assert_allclose(got[str(i)][0], ref, atol=2e-5, rtol=1e-4)
    e = LLMEngine(EngineConfig(model=str(folder), runner="pooling", kv_cache_memory=16 << 20,
                               pooler_config='{"pooling_type": "MEAN", "normalize": false}'))
    got = embed(e, PROMPTS)
    for i, ref in enumerate(reference(folder, PROMPTS, "MEAN", normalize=False)):
        np.testing.assert_allclose(got[str(i)][0], ref, atol=2e-5, rtol=1e-4)
    assert abs(np.linalg.norm(got["2"][0]) - 1) > 1e-3
    # the same folder without the flag generates
    assert LLMEngine(EngineConfig(model=str(folder), kv_cache_memory=16 << 20)).runner == "generate"


def test_prefix_hits_batching_and_preemption(folders):
    """LAST pooling reuses a cached prefix; MEAN and CLS take no hit. Alone, batched, after a hit and
    after preemption (four 50-token prompts in chunks of 16, side by side, in a pool of 6 blocks), the
    vectors agree."""
    long = [[(k * i + 5) % 90 + 3 for i in range(50)] for k in (3, 7, 11, 13)]
    for name in ("qwen3", "llama-mean"):
        e = LLMEngine(EngineConfig(model=str(folders[name]), kv_cache_memory=16 << 20, max_num_batched_tokens=32))
        alone = [embed(e, [p], ids=[f"a{i}"])[f"a{i}"][0] for i, p in enumerate(PROMPTS + long)]
        again = embed(e, PROMPTS)  # the same prompts again: cached blocks
        for i in range(3):
            np.testing.assert_allclose(again[str(i)][0], alone[i], atol=1e-5)
        hits = again["2"][1]
        assert (hits == 48) if name == "qwen3" else (hits == 0)
        small = LLMEngine(EngineConfig(model=str(folders[name]), num_kv_blocks=6, max_num_batched_tokens=64,
                                       long_prefill_token_threshold=16, enable_prefix_caching=False))
        got = embed(small, long)
        for i in range(4):
            np.testing.assert_allclose(got[str(i)][0], alone[3 + i], atol=1e-5)
        assert small.stats().num_preemptions > 0
        assert small.block_manager.num_used_blocks == 0


def test_matryoshka_dimensions_and_normalize(folders):
    e = LLMEngine(EngineConfig(model=str(folders["qwen3"]), kv_cache_memory=16 << 20))
    raw = embed(e, PROMPTS[:1], PoolingParams(normalize=False))["0"][0]
    cut = embed(e, PROMPTS[:1], PoolingParams(dimensions=32))["0"][0]
    assert raw.shape == (128,) and cut.shape == (32,)
    np.testing.assert_allclose(cut, raw[:32] / np.linalg.norm(raw[:32]), atol=1e-6)
    with pytest.raises(ValueError, match="between 1 and 128"):
        e.add_request("x", PROMPTS[0], SamplingParams(pooling=PoolingParams(dimensions=129)))
    listed = LLMEngine(EngineConfig(model=str(folders["qwen2-cls"]), kv_cache_memory=16 << 20))
    assert embed(listed, PROMPTS[:1], PoolingParams(dimensions=16))["0"][0].shape == (16,)
    with pytest.raises(ValueError, match=r"supports dimensions \[16, 64\]"):
        listed.add_request("x", PROMPTS[0], SamplingParams(pooling=PoolingParams(dimensions=32)))
    plain = LLMEngine(EngineConfig(model=str(folders["llama-mean"]), kv_cache_memory=16 << 20))
    with pytest.raises(ValueError, match="does not support Matryoshka"):
        plain.add_request("x", PROMPTS[0], SamplingParams(pooling=PoolingParams(dimensions=8)))
    assert not plain.requests and plain.block_manager.num_used_blocks == 0


def test_runner_refusals(folders):
    e = LLMEngine(EngineConfig(model=str(folders["qwen3"]), kv_cache_memory=16 << 20))
    with pytest.raises(ValueError, match="served for embeddings"):
        e.add_request("g", PROMPTS[0], SamplingParams(max_tokens=4))
    gen = LLMEngine(EngineConfig(model="builtin:tiny", kv_cache_memory=16 << 20))
    with pytest.raises(ValueError, match="need --runner pooling"):
        gen.add_request("p", PROMPTS[0], SamplingParams(pooling=PoolingParams()))
    with pytest.raises(ModelLoadError, match="no LM head: serve it with --runner pooling"):
        LLMEngine(EngineConfig(model=str(folders["qwen3"]), runner="generate", kv_cache_memory=16 << 20))
    # a prompt as long as the whole context is embedded (nothing is generated after it)
    full = LLMEngine(EngineConfig(model=str(folders["qwen3"]), kv_cache_memory=16 << 20, max_model_len=64))
    assert embed(full, [list(range(3, 67))])["0"][0].shape == (128,)
    with pytest.raises(ValueError, match="65 tokens"):
        full.add_request("long", list(range(3, 68)), SamplingParams(pooling=PoolingParams()))


def test_pooler_configuration(tmp_path):
    assert parse_pooler_config('{"pooling_type": "mean"}', PoolerConfig()) == PoolerConfig("MEAN", True, "flag")
    assert parse_pooler_config('{"use_activation": false}', PoolerConfig("CLS")).normalize is False
    for bad, msg in [("[1]", "JSON object"), ("{", "not valid JSON"), ('{"pooling_type": "MAX"}', "LAST, MEAN"),
                     ('{"normalize": 1}', "true or false"), ('{"dimensions": 8}', "unsupported keys")]:
        with pytest.raises(ModelLoadError, match=msg):
            parse_pooler_config(bad, PoolerConfig())
    (tmp_path / "modules.json").write_text(json.dumps([{"path": "1_Pooling",
                                                        "type": "sentence_transformers.models.Pooling"}]))
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_max_tokens": True}))
    with pytest.raises(ModelLoadError, match="max_tokens' is not supported"):
        sentence_transformers_pooler(tmp_path)
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode": "mean"}))
    assert sentence_transformers_pooler(tmp_path) == PoolerConfig("MEAN", False, "sentence-transformers")


@pytest.fixture(scope="module", params=["agg", "1p1d"])
def server(request, folders):
    s = pooling_server(folders["qwen3"], "emb", request.param)
    yield s
    s.stop()


def test_served_embeddings(server, folders):
    """Through the openai client (which asks for base64) and as floats; equal to the engine's vectors;
    usage counts the prompt tokens; in 1p1d the decode worker pools locally."""
    openai = pytest.importorskip("openai")
    from dyn_actor.engine.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(folders["qwen3"])
    texts = ["hello there", "a somewhat longer input, long enough for two blocks of tokens"]
    ids = [tok.encode(t) for t in texts]
    e = LLMEngine(EngineConfig(model=str(folders["qwen3"]), kv_cache_memory=16 << 20))
    want = embed(e, ids)
    client = openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0, timeout=60)
    r = client.embeddings.create(model="emb", input=texts)
    assert [d.index for d in r.data] == [0, 1] and r.usage.prompt_tokens == sum(map(len, ids))
    for i, d in enumerate(r.data):
        np.testing.assert_allclose(d.embedding, want[str(i)][0], atol=1e-5)
    body = requests.post(server.url + "/v1/embeddings", json={"input": ids[1], "encoding_format": "float",
                                                              "dimensions": 24}, timeout=60).json()
    vec = np.array(body["data"][0]["embedding"], dtype=np.float32)
    assert vec.shape == (24,) and abs(np.linalg.norm(vec) - 1) < 1e-5 and body["object"] == "list"
    b64 = requests.post(server.url + "/v1/embeddings", json={"input": [ids[0]], "encoding_format": "base64"},
                        timeout=60).json()["data"][0]["embedding"]
    np.testing.assert_allclose(np.frombuffer(base64.b64decode(b64), "<f4"), want["0"][0], atol=1e-5)
    chat = requests.post(server.url + "/v1/embeddings", json={"messages": [{"role": "user", "content": "hi"}]},
                         timeout=60).json()
    assert len(chat["data"][0]["embedding"]) == 128
    many = client.embeddings.create(model="emb", input=[f"text number {i}" for i in range(40)])
    assert len(many.data) == 40 and [d.index for d in many.data] == list(range(40))
    assert metric(server, "dyn_remote_prefills_total") == 0 and metric(server, "dyn_local_prefills_total") >= 45


def test_served_embed_dtypes(server):
    """vLLM's ``embed_dtype`` and ``endianness`` for base64 embeddings: float16 and bfloat16 as torch
    rounds them, big-endian where asked; floats stay float32; fp8 and unknown dtypes are a 400."""
    def get(**kw) -> str:
        r = requests.post(server.url + "/v1/embeddings", json={"input": "some words to embed", **kw}, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()["data"][0]["embedding"]

    floats = torch.tensor(get(encoding_format="float"), dtype=torch.float32)
    for dtype, endian in [("float16", "native"), ("bfloat16", "little"), ("bfloat16", "big"), ("float32", "big")]:
        raw = base64.b64decode(get(encoding_format="base64", embed_dtype=dtype, endianness=endian))
        want = floats.to(getattr(torch, dtype))
        got = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(-1, want.element_size())
        if endian == "big":
            got = got.flip(1)
        assert torch.equal(got.contiguous().view(want.dtype).view(-1), want), (dtype, endian)
    for bad in ["fp8_e4m3", "int4"]:
        r = requests.post(server.url + "/v1/embeddings", json={"input": "x", "encoding_format": "base64",
                                                                "embed_dtype": bad}, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == "embed_dtype"


def test_served_score_and_rerank(server, folders):
    """vLLM's bi-encoder ``/score`` and ``/rerank``: cosine similarities of the embeddings, one text
    against many or pairwise, documents best first and cut to ``top_n``."""
    from dyn_actor.engine.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(folders["qwen3"])
    query, docs = "where is the cat", ["the cat sat on the mat", "stock prices fell", "a cat, a mat", "rain"]
    e = LLMEngine(EngineConfig(model=str(folders["qwen3"]), kv_cache_memory=16 << 20))
    vec = {t: v for t, (v, _) in zip([query, *docs], embed(e, [tok.encode(t) for t in [query, *docs]]).values())}
    want = [float(np.dot(vec[query], vec[d]) / np.linalg.norm(vec[query]) / np.linalg.norm(vec[d])) for d in docs]
    r = requests.post(server.url + "/score", json={"text_1": query, "text_2": docs}, timeout=60).json()
    assert [d["index"] for d in r["data"]] == [0, 1, 2, 3] and r["object"] == "list"
    np.testing.assert_allclose([d["score"] for d in r["data"]], want, atol=1e-5)
    n_tokens = sum(len(tok.encode(query)) + len(tok.encode(d)) for d in docs)
    assert r["usage"]["prompt_tokens"] == n_tokens
    pairwise = requests.post(server.url + "/v1/score", json={"queries": [query, docs[1]], "documents": docs[:2]},
                             timeout=60).json()
    np.testing.assert_allclose([d["score"] for d in pairwise["data"]], [want[0], 1.0], atol=1e-5)
    rr = requests.post(server.url + "/v1/rerank", json={"query": query, "documents": docs, "top_n": 2},
                       timeout=60).json()
    best = sorted(range(4), key=lambda i: -want[i])[:2]
    assert [x["index"] for x in rr["results"]] == best
    assert [x["document"]["text"] for x in rr["results"]] == [docs[i] for i in best]
    np.testing.assert_allclose([x["relevance_score"] for x in rr["results"]], [want[i] for i in best], atol=1e-5)
    for path, body, msg in [("/score", {"text_1": ["a", "b"], "text_2": ["c", "d", "e"]}, "one text or as many"),
                            ("/score", {"text_1": "a"}, "give one pair"),
                            ("/score", {"text_1": "a", "text_2": [], }, "empty"),
                            ("/rerank", {"query": "a", "documents": []}, "empty"),
                            ("/rerank", {"query": "a", "documents": ["b"], "top_n": -1}, "top_n")]:
        r = requests.post(server.url + path, json=body, timeout=30)
        assert r.status_code == 400 and msg in r.json()["error"]["message"], (path, body, r.text)


def test_client_gone_aborts_the_rest(server):
    """A client that gives up on a large embeddings request: its inputs still queued are aborted, and
    the workers hold no request and no block soon after (400 inputs of 250 tokens would take seconds)."""
    body = {"input": [[3 + (i * 7 + k) % 90 for k in range(250)] for i in range(400)]}

    def aborted() -> float:
        text = requests.get(server.url + "/metrics", timeout=10).text
        return sum(float(x.rsplit(" ", 1)[1]) for x in text.splitlines()
                   if x.startswith('dyn_requests_total{outcome="abort"}'))

    before = aborted()
    with pytest.raises(requests.exceptions.ReadTimeout):
        requests.post(server.url + "/v1/embeddings", json=body, timeout=0.5)

    def idle() -> bool:
        return sum(metric(server, f"dyn_worker_{m}") for m in ("requests_running", "requests_waiting",
                                                                "kv_blocks_used")) == 0

    deadline = time.monotonic() + 5
    while not idle() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert idle() and aborted() - before >= 100  # most inputs were never computed
    r = requests.post(server.url + "/v1/embeddings", json={"input": "still serving"}, timeout=30)
    assert r.status_code == 200


def test_served_refusals(server):
    url = server.url + "/v1/embeddings"
    cases = [({"input": "x" * 400}, "maximum context length is 256"),
             ({"input": []}, "empty"),
             ({"input": "a", "messages": [{"role": "user", "content": "b"}]}, "exactly one of input or messages"),
             ({"input": "a", "dimensions": 0}, "dimensions"),
             ({"input": "a", "dimensions": 200}, "between 1 and 128"),
             ({"input": "a", "encoding_format": "int8"}, "encoding_format"),
             ({"input": "a", "embed_dtype": "fp8_e4m3"}, "embed_dtype"),
             ({"input": [[1, 2, 99999]]}, "token ids must be in"),
             ({"input": "a", "model": "other"}, "does not exist")]
    for body, msg in cases:
        r = requests.post(url, json=body, timeout=30)
        assert r.status_code in (400, 404) and msg in r.json()["error"]["message"], (body, r.text)
    r = requests.post(url, json={"input": "x" * 400, "truncate_prompt_tokens": 100}, timeout=30)
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 100
    r = requests.post(server.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]},
                      timeout=30)
    assert r.status_code == 400 and "served for embeddings" in r.json()["error"]["message"]
    r = requests.post(server.url + "/v1/completions", json={"prompt": "hi"}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "model_not_supported"
    assert requests.get(server.url + "/health", timeout=10).json()["status"] == "ok"


def test_generation_server_refuses_embeddings():
    s = InprocServer("--kv-cache-memory-gb", "0.05")
    try:
        for path, body in [("/v1/embeddings", {"input": "hi"}), ("/score", {"text_1": "a", "text_2": "b"}),
                           ("/v1/rerank", {"query": "a", "documents": ["b"]})]:
            r = requests.post(s.url + path, json=body, timeout=30)
            assert r.status_code == 400 and "--runner pooling" in r.json()["error"]["message"], path
    finally:
        s.stop()


def test_launcher_flags():
    from launcher.config import ConfigError, parse_args

    if _has_vllm():  # (without vLLM, --engine vllm is refused for that first)
        with pytest.raises(ConfigError, match="agg topology only"):
            parse_args(["--runner", "pooling", "--engine", "vllm", "--topology", "1p1d"])
    with pytest.raises(ConfigError, match="not valid JSON"):
        parse_args(["--runner", "pooling", "--pooler-config", "{"])
    with pytest.raises(ConfigError, match="applies to --runner pooling"):
        parse_args(["--runner", "generate", "--pooler-config", '{"pooling_type": "MEAN"}'])
    assert parse_args(["--runner", "pooling", "--pooler-config", '{"pooling_type": "CLS"}']).runner == "pooling"


def _has_vllm() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


@pytest.mark.parametrize("kind,labels,problem", [("llama", ["neg", "neu", "pos"], None), ("qwen3", ["score"], None),
                                                 ("qwen2", ["a", "b"], "multi_label_classification"),
                                                 ("mistral", ["value"], "regression"), ("gemma2", ["score"], None),
                                                 ("gemma3", ["a", "b", "c"], None), ("phi3", ["x", "y"], None),
                                                 ("qwen3_moe", ["score"], None)])
def test_classifiers_equal_transformers(tmp_path, kind, labels, problem):
    """``*ForSequenceClassification``: the last token's state through the score head, then softmax (several
    labels), sigmoid (one label, or multi-label) or nothing (regression), as vLLM applies them; equal to
    transformers' logits so activated; ``use_activation: false`` gives the raw scores."""
    from transformers import AutoModelForSequenceClassification

    from dyn_actor.engine.llm import LLM

    folder = write_classifier_checkpoint(tmp_path / kind, kind, labels, problem)
    llm = LLM(str(folder), kv_cache_memory=16 << 20, max_num_batched_tokens=16)
    assert llm.engine.runner == "pooling" and llm.engine.model_config.labels == tuple(labels)
    got = [np.array(o.embedding) for o in llm.classify(PROMPTS)]
    raw = [np.array(o.embedding) for o in llm.classify(PROMPTS, use_activation=False)]
    hf = AutoModelForSequenceClassification.from_pretrained(str(folder), dtype=torch.float32)
    for p, g, r in zip(PROMPTS, got, raw):
        with torch.no_grad():
            logits = hf(torch.tensor([p])).logits[0]
        want = (logits if problem == "regression" else torch.sigmoid(logits)
                if problem == "multi_label_classification" or len(labels) == 1 else torch.softmax(logits, 0))
        np.testing.assert_allclose(g, want.numpy(), atol=2e-5)
        np.testing.assert_allclose(r, logits.numpy(), atol=2e-5)
    with pytest.raises(ValueError, match="use /classify"):
        llm.embed(PROMPTS[:1])
    with pytest.raises(ModelLoadError, match="sequence classifier"):
        LLMEngine(EngineConfig(model=str(folder), runner="generate", kv_cache_memory=16 << 20))


def test_served_classify(tmp_path, folders):
    folder = write_classifier_checkpoint(tmp_path / "cls", "llama", ["neg", "neu", "pos"])
    from dyn_actor.engine.llm import LLM

    want = [np.array(o.embedding) for o in LLM(str(folder), kv_cache_memory=16 << 20).classify(["good", "bad"])]
    s = InprocServer("--model", str(folder), "--served-model-name", "cls", "--kv-cache-memory-gb", "0.05",
                     "--max-model-len", "256")
    try:
        r = requests.post(s.url + "/classify", json={"model": "cls", "input": ["good", "bad"]}, timeout=60).json()
        assert [d["index"] for d in r["data"]] == [0, 1] and r["data"][0]["num_classes"] == 3
        for d, w in zip(r["data"], want):
            np.testing.assert_allclose(d["probs"], w, atol=1e-5)
            assert d["label"] == ["neg", "neu", "pos"][int(np.argmax(w))]
        r = requests.post(s.url + "/v1/embeddings", json={"input": "x"}, timeout=30)
        assert r.status_code == 400 and "sequence classifier" in r.json()["error"]["message"]
        r = requests.post(s.url + "/score", json={"text_1": "a", "text_2": "b"}, timeout=30)
        assert r.status_code == 400 and "3 labels" in r.json()["error"]["message"]
    finally:
        s.stop()
    e = InprocServer("--model", str(folders["qwen3"]), "--kv-cache-memory-gb", "0.05", "--max-model-len", "256")
    try:
        r = requests.post(e.url + "/classify", json={"input": "x"}, timeout=30)
        assert r.status_code == 400 and "not a sequence classifier" in r.json()["error"]["message"]
    finally:
        e.stop()


def test_lora_embeddings(tmp_path):
    """A LoRA adapter over an embedding model (a causal LM with ``--runner pooling``): ``LLM.embed``
    and ``/v1/embeddings`` with the adapter's name give the merged checkpoint's vectors, the base
    model's without it, in one batch."""
    from dyn_actor.engine.llm import LLM
    from tests.checkpoints import merge_lora, write_lora

    base = write_checkpoint(tmp_path / "base", "qwen3")
    lora = write_lora(base, tmp_path / "a", seed=1)
    merged = merge_lora(base, lora, tmp_path / "merged")
    want = [np.array(o.embedding) for o in LLM(str(merged), runner="pooling", kv_cache_memory=16 << 20).embed(PROMPTS)]
    llm = LLM(str(base), runner="pooling", lora_modules={"a": str(lora)}, kv_cache_memory=16 << 20)
    plain = [np.array(o.embedding) for o in llm.embed(PROMPTS)]
    got = [np.array(o.embedding) for o in llm.embed(PROMPTS, lora_name="a")]
    for g, w, p in zip(got, want, plain):
        np.testing.assert_allclose(g, w, atol=2e-5)
        assert np.abs(p - w).max() > 1e-2  # (the adapter changes the vectors)
    s = InprocServer("--model", str(base), "--runner", "pooling", "--lora-modules", f"a={lora}",
                     "--kv-cache-memory-gb", "0.05", "--max-model-len", "256")
    try:
        r = requests.post(s.url + "/v1/embeddings", json={"model": "a", "input": PROMPTS}, timeout=60).json()
        assert r["model"] == "a"
        for d, w in zip(r["data"], want):
            np.testing.assert_allclose(d["embedding"], w, atol=2e-5)
    finally:
        s.stop()


def test_truncation_sides(server):
    """truncate_prompt_tokens on a pooling model keeps an input's first tokens, as vLLM's pooling
    runner does (``truncation_side`` "right"); "left" keeps its last ones."""
    url = server.url + "/v1/embeddings"
    ids = [3 + (7 * k) % 90 for k in range(30)]

    def vec(body):
        r = requests.post(url, json=body, timeout=30)
        assert r.status_code == 200, r.text
        return r.json()["data"][0]["embedding"]

    head, tail = vec({"input": [ids[:8]]}), vec({"input": [ids[-8:]]})
    assert head != tail
    assert vec({"input": [ids], "truncate_prompt_tokens": 8}) == pytest.approx(head, abs=1e-6)
    assert vec({"input": [ids], "truncate_prompt_tokens": 8, "truncation_side": "right"}) == pytest.approx(head, abs=1e-6)
    assert vec({"input": [ids], "truncate_prompt_tokens": 8, "truncation_side": "left"}) == pytest.approx(tail, abs=1e-6)
