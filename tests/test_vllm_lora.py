"""``--engine vllm`` with LoRA adapters (skipped unless vLLM is installed; ``.ci/run``'s second pass
runs it): ``--lora-modules`` become vLLM LoRARequests named by each request's model, in ``1p1d``
with every prefill remote (our connector tells the prefill worker the adapter, whose vLLM computes
the prompt's KV with it). The greedy text of each adapter equals the native engine's on the
checkpoint with that adapter merged (PEFT's ``merge_and_unload``), and the base model's stays the
base model's."""

from __future__ import annotations

import os

import pytest
import requests

from dyn_actor.components.vllm_worker import patch_vllm_version
from tests.server import Server

pytestmark = pytest.mark.vllm
patch_vllm_version()
if os.environ.get("DYN_REQUIRE_VLLM") == "1":
    import vllm  # noqa: F401
else:
    vllm = pytest.importorskip("vllm", reason="vLLM is not installed (pip install -e '.[vllm]')")
pytest.importorskip("peft")

PROMPTS = [[0] + [5 + (7 * k + n) % 90 for k in range(n - 1)] for n in (5, 40, 150)]


def test_vllm_1p1d_serves_each_adapter_as_its_merged_checkpoint(tmp_path):
    from dyn_actor.engine import EngineConfig, LLMEngine, SamplingParams
    from tests.checkpoints import merge_lora, write_checkpoint, write_lora
    from tests.helpers import metric, run_all

    # head_dim 64: vLLM's CPU attention takes it
    base = write_checkpoint(tmp_path / "base", hidden_size=256, intermediate_size=512, num_attention_heads=4,
                            num_key_value_heads=2)
    adapters = {"a": write_lora(base, tmp_path / "a", seed=1),
                "b": write_lora(base, tmp_path / "b", seed=2, r=4, targets=["q_proj", "v_proj", "down_proj"])}
    want = {}
    for name, model in (("base", base), *((n, merge_lora(base, d, tmp_path / f"m{n}")) for n, d in adapters.items())):
        engine = LLMEngine(EngineConfig(model=str(model), dtype="float32", num_kv_blocks=64))
        got = run_all(engine, {str(i): (p, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
                               for i, p in enumerate(PROMPTS)})
        want[name] = [engine.tokenizer.decode(got[str(i)][0]) for i in range(len(PROMPTS))]
    assert want["a"] != want["base"] and want["b"] != want["base"]
    s = Server("--engine", "vllm", "--topology", "1p1d", "--max-local-prefill-length", "0", "--model", str(base),
               "--served-model-name", "base", "--dtype", "float32", "--max-model-len", "512",
               "--kv-cache-memory-gb", "1", "--lora-modules", f"a={adapters['a']}", f"b={adapters['b']}",
               timeout=420)
    try:
        models = requests.get(s.url + "/v1/models", timeout=10).json()["data"]
        assert [(m["id"], m["parent"]) for m in models] == [("base", None), ("a", "base"), ("b", "base")]
        for name in ("a", "base", "b"):
            texts = []
            for p in PROMPTS:
                r = requests.post(s.base_url + "/completions", timeout=120, json={
                    "model": name, "prompt": p, "max_tokens": 12, "temperature": 0, "ignore_eos": True})
                assert r.status_code == 200, r.text
                assert r.json()["model"] == name
                texts.append(r.json()["choices"][0]["text"])
            assert texts == want[name], name
        assert metric(s, "dyn_remote_prefills_total") >= 3 * len(PROMPTS)
        r = requests.post(s.base_url + "/completions", timeout=60, json={"model": "c", "prompt": "x"})
        assert r.status_code == 404
    finally:
        code, err = s.stop()
    assert code == 0, err[-2000:]
