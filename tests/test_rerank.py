"""Cross-encoders (rerankers): a one-label sequence classifier scores a (query, document) pair read
as one input, at vLLM's ``/score`` and ``/rerank`` and by ``LLM.score``: the tokenizer's text pair,
or an LLM reranker's concatenation or ``--chat-template`` rendering; a causal LM made a reranker by
``--hf-overrides`` (``classifier_from_token``, an original Qwen3-Reranker's shape). Equal to
transformers' classifier (and causal LM) on the same tokens; and what is refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
import requests
import torch

from dyn_actor.engine import EngineConfig, LLMEngine
from dyn_actor.engine.llm import LLM
from dyn_actor.engine.model_config import ModelLoadError
from tests.checkpoints import write_checkpoint, write_classifier_checkpoint
from tests.helpers import metric, pooling_server
from tests.server import InprocServer

QUERY = "where is the cat"
DOCS = ["the cat sat on the mat", "stock prices fell", "a cat, a mat", "rain"]
# an original Qwen3-Reranker's flags, with two tokens of the built-in tokenizer for its "no" and "yes"
OVERRIDES = {"architectures": ["Qwen3ForSequenceClassification"], "classifier_from_token": ["n", "y"],
             "is_original_qwen3_reranker": True}
# the shape of Qwen3-Reranker's template: the pair as two messages, an instruction from the request
TEMPLATE = ("{% if instruction == 'fail' %}{{ raise_exception('no instruction') }}{% endif %}"
            "<judge>{{ instruction or 'relevant?' }}{% for m in messages %}<{{ m.role }}>{{ m.content }}"
            "{% endfor %}<answer>")


def separate_pairs(folder):
    """The folder's tokenizer made to put a separator between a pair's texts and after them, as a
    cross-encoder's tokenizer does (the built-in one writes a pair as one run of characters)."""
    from tokenizers import Tokenizer, processors

    tk = Tokenizer.from_file(str(folder / "tokenizer.json"))
    # (not </s>: transformers' classifier takes that, the config's pad token, for padding)
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A | $B:1 |:1",
                                                      special_tokens=[("<s>", 0), ("|", tk.token_to_id("|"))])
    tk.save(str(folder / "tokenizer.json"))
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("rerankers")
    return {"ce": write_classifier_checkpoint(root / "ce", "qwen3", ["score"]),
            "llama-ce": separate_pairs(write_classifier_checkpoint(root / "llama-ce", "llama", ["relevance"])),
            "lm": write_checkpoint(root / "lm", "qwen3", seed=3)}


def hf_cross_scores(folder, query: str, docs: list[str]) -> tuple[list[float], list[float], list[list[int]]]:
    """transformers' classifier on ``tokenizer(query, doc)``: sigmoid scores, raw logits, the inputs."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    hf = AutoModelForSequenceClassification.from_pretrained(str(folder), dtype=torch.float32)
    scores, logits, inputs = [], [], []
    for d in docs:
        ids = tok(query, d)["input_ids"]
        with torch.no_grad():
            logit = hf(torch.tensor([ids])).logits[0, 0]
        scores.append(torch.sigmoid(logit).item())
        logits.append(logit.item())
        inputs.append(ids)
    return scores, logits, inputs


def hf_reranker_scores(folder, texts: list[str]) -> list[float]:
    """An LLM reranker's score read off transformers' causal LM: the 2-way softmax of the next token
    being "y" rather than "n", after each rendered text."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    lm = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    no, yes = tok.convert_tokens_to_ids("n"), tok.convert_tokens_to_ids("y")
    out = []
    for t in texts:
        with torch.no_grad():
            logits = lm(torch.tensor([tok(t)["input_ids"]])).logits[0, -1]
        out.append(torch.softmax(logits[[no, yes]], 0)[1].item())
    return out


@pytest.mark.parametrize("name", ["ce", "llama-ce"])
def test_cross_encoder_equals_transformers(folders, name):
    """``LLM.score``: each pair tokenized as transformers' text pair, scored by the head through a
    sigmoid (one label); ``use_activation=False`` gives the logit; one text against many or pairwise."""
    want, logits, inputs = hf_cross_scores(folders[name], QUERY, DOCS)
    llm = LLM(str(folders[name]), kv_cache_memory=16 << 20, max_num_batched_tokens=16)
    got = llm.score(QUERY, DOCS)
    assert [g.prompt_token_ids for g in got] == inputs
    sep = llm.tokenizer.backend.token_to_id("|")
    assert inputs[0].count(sep) == (2 if name == "llama-ce" else 0)  # the separators, where the tokenizer has them
    np.testing.assert_allclose([g.score for g in got], want, atol=2e-5)
    np.testing.assert_allclose([g.score for g in llm.score(QUERY, DOCS, use_activation=False)], logits, atol=2e-5)
    pairwise = llm.score([QUERY, DOCS[0]], [DOCS[1], DOCS[2]])
    np.testing.assert_allclose([g.score for g in pairwise],
                               [hf_cross_scores(folders[name], q, [d])[0][0]
                                for q, d in [(QUERY, DOCS[1]), (DOCS[0], DOCS[2])]], atol=2e-5)
    with pytest.raises(ValueError, match="one text or as many"):
        llm.score([QUERY, QUERY], DOCS)


def test_llm_reranker_from_causal_lm(folders):
    """A causal LM with ``classifier_from_token`` (an original Qwen3-Reranker under vLLM's
    ``--hf-overrides``): the head is the "y" row minus the "n" row of the LM head, so its sigmoid is
    the 2-way softmax of those two next tokens; the pair concatenated (no separator), or rendered by
    a template with the request's instruction."""
    llm = LLM(str(folders["lm"]), kv_cache_memory=16 << 20, hf_overrides=OVERRIDES)
    cfg = llm.engine.model_config
    assert cfg.labels == ("LABEL_0",) and not cfg.use_sep_token and cfg.classifier_method == "from_2_way_softmax"
    np.testing.assert_allclose([g.score for g in llm.score(QUERY, DOCS)],
                               hf_reranker_scores(folders["lm"], [QUERY + d for d in DOCS]), atol=2e-5)
    got = llm.score(QUERY, DOCS[:2], chat_template=TEMPLATE, instruction="is it about cats?")
    texts = [f"<judge>is it about cats?<query>{QUERY}<document>{d}<answer>" for d in DOCS[:2]]
    np.testing.assert_allclose([g.score for g in got], hf_reranker_scores(folders["lm"], texts), atol=2e-5)


def test_classifier_from_token_refusals(folders):
    lm = str(folders["lm"])
    for overrides, match in [({**OVERRIDES, "classifier_from_token": ["n", "no such token"]}, "not a token"),
                             ({"architectures": ["Qwen3ForSequenceClassification"],
                               "classifier_from_token": ["n", "y"]}, "needs a method"),
                             ({"classifier_from_token": ["n", "y"], "method": "from_2_way_softmax"},
                              "ForSequenceClassification architecture"),
                             ({**OVERRIDES, "method": "sideways"}, "unsupported classifier method"),
                             ({**OVERRIDES, "classifier_from_token": ["n", "y", "m"]}, "needs two")]:
        with pytest.raises(ModelLoadError, match=match):
            LLMEngine(EngineConfig(model=lm, kv_cache_memory=16 << 20, hf_overrides=overrides))
    # a label per token: their LM-head rows as they are, a softmax over them
    e = LLM(lm, kv_cache_memory=16 << 20, hf_overrides={**OVERRIDES, "classifier_from_token": ["n", "y", "m"],
                                                        "method": "no_post_processing"})
    assert len(e.engine.model_config.labels) == 3
    probs = e.classify(["hello"])[0].embedding
    assert len(probs) == 3 and abs(sum(probs) - 1) < 1e-5


def test_sentence_transformers_activation(tmp_path):
    """A cross-encoder's configured activation (sentence-transformers' ``activation_fn``) replaces the
    default sigmoid; an activation outside the few known is refused at load."""
    folder = write_classifier_checkpoint(tmp_path / "ce", "qwen3", ["score"])
    cfg = json.loads((folder / "config.json").read_text())
    raw = [g.score for g in LLM(str(folder), kv_cache_memory=16 << 20).score(QUERY, DOCS, use_activation=False)]
    cfg["sentence_transformers"] = {"activation_fn": "torch.nn.modules.linear.Identity"}
    (folder / "config.json").write_text(json.dumps(cfg))
    np.testing.assert_allclose([g.score for g in LLM(str(folder), kv_cache_memory=16 << 20).score(QUERY, DOCS)],
                               raw, atol=1e-6)
    cfg["sentence_transformers"] = {"activation_fn": "os.system"}
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="unsupported classifier activation"):
        LLM(str(folder), kv_cache_memory=16 << 20)


@pytest.fixture(scope="module", params=["agg", "1p1d"])
def server(request, folders):
    s = pooling_server(folders["ce"], "rr", request.param)
    yield s
    s.stop()


def test_served_score_and_rerank(server, folders):
    """``/score`` (under its several names for the two sides) and ``/rerank`` (best first, ``top_n``)
    give transformers' cross-encoder scores; usage counts each pair's tokens; in 1p1d the decode
    worker scores locally."""
    want, logits, inputs = hf_cross_scores(folders["ce"], QUERY, DOCS)
    r = requests.post(server.url + "/score", json={"model": "rr", "text_1": QUERY, "text_2": DOCS}, timeout=60).json()
    assert [d["index"] for d in r["data"]] == [0, 1, 2, 3] and r["object"] == "list" and r["model"] == "rr"
    np.testing.assert_allclose([d["score"] for d in r["data"]], want, atol=2e-5)
    assert r["usage"]["prompt_tokens"] == sum(map(len, inputs))
    r = requests.post(server.url + "/v1/score", json={"queries": [QUERY, QUERY], "documents": DOCS[:2],
                                                      "use_activation": False}, timeout=60).json()
    np.testing.assert_allclose([d["score"] for d in r["data"]], logits[:2], atol=2e-5)
    r = requests.post(server.url + "/v1/rerank", json={"query": QUERY, "documents": DOCS, "top_n": 2},
                      timeout=60).json()
    best = sorted(range(4), key=lambda i: -want[i])[:2]
    assert [x["index"] for x in r["results"]] == best
    assert [x["document"]["text"] for x in r["results"]] == [DOCS[i] for i in best]
    np.testing.assert_allclose([x["relevance_score"] for x in r["results"]], [want[i] for i in best], atol=2e-5)
    assert r["usage"]["total_tokens"] == sum(map(len, inputs))
    assert metric(server, "dyn_remote_prefills_total") == 0


def test_served_token_limits(server, folders):
    """``max_tokens_per_query`` and ``max_tokens_per_doc`` cut each text first (the built-in tokenizer
    has a token a character); ``truncate_prompt_tokens`` keeps each pair's first tokens; limits at or
    past the context are a 400."""
    r = requests.post(server.url + "/rerank", json={"query": QUERY, "documents": DOCS[:2], "max_tokens_per_query": 5,
                                                    "max_tokens_per_doc": 7}, timeout=60).json()
    want, _, _ = hf_cross_scores(folders["ce"], QUERY[:5], [d[:7] for d in DOCS[:2]])
    np.testing.assert_allclose(sorted(x["relevance_score"] for x in r["results"]), sorted(want), atol=2e-5)
    r = requests.post(server.url + "/score", json={"text_1": QUERY, "text_2": DOCS[0], "truncate_prompt_tokens": 9},
                      timeout=60).json()
    assert r["usage"]["prompt_tokens"] == 9
    for body in [{"max_tokens_per_doc": 256}, {"max_tokens_per_query": 1000}]:
        r = requests.post(server.url + "/rerank", json={"query": QUERY, "documents": DOCS, **body}, timeout=30)
        assert r.status_code == 400 and "must be less than the context length" in r.json()["error"]["message"]
    r = requests.post(server.url + "/score", json={"text_1": [QUERY, QUERY], "text_2": DOCS}, timeout=30)
    assert r.status_code == 400 and "one text or as many" in r.json()["error"]["message"]
    r = requests.post(server.url + "/v1/embeddings", json={"input": "x"}, timeout=30)
    assert r.status_code == 400 and "sequence classifier" in r.json()["error"]["message"]
    r = requests.post(server.url + "/v1/completions", json={"prompt": "x"}, timeout=30)
    assert r.status_code == 400 and "use /classify, /score or /rerank" in r.json()["error"]["message"]
    assert requests.get(server.url + "/health", timeout=10).json()["status"] == "ok"


@pytest.mark.parametrize("flags", [["--hf-overrides", json.dumps(OVERRIDES)],
                                   ["--convert", "classify", "--hf-overrides",
                                    json.dumps({"classifier_from_token": ["n", "y"], "method": "from_2_way_softmax"})]])
def test_served_llm_reranker(folders, flags):
    """An original Qwen3-Reranker's way of being served with vLLM: ``--hf-overrides`` (the classifier
    architecture, or ``--convert classify``) and ``--chat-template``; the request's ``instruction``
    reaches the template."""
    s = InprocServer("--model", str(folders["lm"]), *flags, "--chat-template",
                     TEMPLATE, "--kv-cache-memory-gb", "0.05", "--max-model-len", "256")
    try:
        r = requests.post(s.url + "/rerank", json={"query": QUERY, "documents": DOCS, "instruction": "cats?"},
                          timeout=60).json()
        texts = [f"<judge>cats?<query>{QUERY}<document>{d}<answer>" for d in DOCS]
        want = hf_reranker_scores(folders["lm"], texts)
        assert [x["index"] for x in r["results"]] == sorted(range(4), key=lambda i: -want[i])
        np.testing.assert_allclose([x["relevance_score"] for x in r["results"]], sorted(want, reverse=True),
                                   atol=2e-5)
        # a template that fails is the request's error, not the server's
        r = requests.post(s.url + "/score", json={"text_1": "a", "text_2": "b",
                                                  "chat_template_kwargs": {"instruction": "fail"}}, timeout=30)
        assert r.status_code == 400 and "no instruction" in r.json()["error"]["message"]
        assert requests.get(s.url + "/health", timeout=10).json()["status"] == "ok"
    finally:
        s.stop()


def test_launcher_refusals(tmp_path):
    from launcher.config import ConfigError, parse_args

    with pytest.raises(ConfigError, match="--hf-overrides must be a JSON object"):
        parse_args(["--hf-overrides", "[1]"])
    with pytest.raises(ConfigError, match="--hf-overrides must be a JSON object"):
        parse_args(["--hf-overrides", "{"])
    three = write_classifier_checkpoint(tmp_path / "three", "llama", ["a", "b", "c"])
    s = InprocServer("--model", str(three), "--kv-cache-memory-gb", "0.05", "--max-model-len", "256")
    try:
        r = requests.post(s.url + "/rerank", json={"query": "a", "documents": ["b"]}, timeout=30)
        assert r.status_code == 400 and "3 labels" in r.json()["error"]["message"]
        assert r.json()["error"]["code"] == "model_not_supported"
    finally:
        s.stop()


def test_qwen3_reranker_template():
    """``docs/templates/qwen3_reranker.jinja`` renders a pair in the format of Qwen3-Reranker's model
    card (its system line, the instruction, query and document, an empty thinking block), with the
    card's default instruction unless the request gives one."""
    from pathlib import Path

    from dyn_actor.engine.tokenizer import Tokenizer
    from tests.checkpoints import write_tokenizer

    source = (Path(__file__).resolve().parent.parent / "docs" / "templates" / "qwen3_reranker.jinja").read_text()

    def card(task: str) -> str:
        return ("<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the "
                'Instruct provided. Note that the answer can only be "yes" or "no".<|im_end|>\n<|im_start|>user\n'
                f"<Instruct>: {task}\n<Query>: {QUERY}\n<Document>: {DOCS[0]}<|im_end|>\n"
                "<|im_start|>assistant\n<think>\n\n</think>\n\n")

    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        write_tokenizer(Path(tmp))
        tok = Tokenizer.from_dir(tmp)
    msgs = [{"role": "query", "content": QUERY}, {"role": "document", "content": DOCS[0]}]
    assert tok.render_template(source, msgs) == card(
        "Given a web search query, retrieve relevant passages that answer the query")
    assert tok.render_template(source, msgs, instruction="find cats") == card("find cats")


def test_convert(folders):
    """vLLM's ``--convert``: ``classify`` reads a causal LM as its classifier (with
    ``classifier_from_token`` and a method: the same reranker as the overridden architecture; without
    them the checkpoint must hold a ``score`` head), ``embed`` serves its embeddings; neither goes
    with ``--runner generate``."""
    from launcher.config import ConfigError, parse_args

    lm = str(folders["lm"])
    tokens = {"classifier_from_token": ["n", "y"], "method": "from_2_way_softmax"}
    want = [g.score for g in LLM(lm, kv_cache_memory=16 << 20, hf_overrides=OVERRIDES).score(QUERY, DOCS)]
    got = LLM(lm, kv_cache_memory=16 << 20, convert="classify", hf_overrides=tokens)
    assert got.engine.runner == "pooling" and got.engine.model_config.labels == ("LABEL_0",)
    np.testing.assert_allclose([g.score for g in got.score(QUERY, DOCS)], want, atol=1e-6)
    with pytest.raises(ModelLoadError, match="score.weight"):
        LLMEngine(EngineConfig(model=lm, kv_cache_memory=16 << 20, convert="classify"))
    emb = LLM(lm, kv_cache_memory=16 << 20, convert="embed")
    assert emb.engine.runner == "pooling" and len(emb.embed(["hi"])[0].embedding) == 128
    with pytest.raises(ModelLoadError, match="does not go with --runner generate"):
        LLMEngine(EngineConfig(model=lm, kv_cache_memory=16 << 20, convert="embed", runner="generate"))
    with pytest.raises(ConfigError, match="does not go with --runner generate"):
        parse_args(["--model", lm, "--convert", "classify", "--runner", "generate"])
    assert parse_args(["--model", lm, "--convert", "classify"]).convert == "classify"
