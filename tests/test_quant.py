"""4-bit GPTQ and AWQ checkpoints on the native engine (``engine/quant.py``, ``linear_w4`` in C).

The checkpoints are written here (``tests.checkpoints.write_quantized_checkpoint``: round-to-nearest
4-bit weights packed as each format stores them), beside the same model with those weights
dequantized to float32: what the quantized model must compute."""

from __future__ import annotations

import json

import pytest
import torch

from dyn_actor.engine import EngineConfig, LLMEngine, SamplingParams
from dyn_actor.engine import quant as quant_mod
from dyn_actor.engine.loader import load_model
from dyn_actor.engine.model_config import ModelLoadError
from dyn_actor.engine.quant import QuantConfig, QuantLinear, QuantWeight, from_checkpoint, pack, unpack
from dyn_actor.native_ops import native_lib
from tests.checkpoints import quantize_projection, write_checkpoint, write_quantized_checkpoint
from tests.helpers import remote_prefill_matches_local, run_all, served_1p1d_remote_texts_match

VARIANTS = [("gptq", 32, False), ("gptq", 64, True), ("awq", 128, False), ("gptq", -1, False)]


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("src"), "llama", hidden_size=256, intermediate_size=512)


@pytest.fixture(scope="module", params=VARIANTS[:3], ids=lambda v: f"{v[0]}-g{v[1]}{'-act' if v[2] else ''}")
def pair(request, src, tmp_path_factory):
    method, gs, act = request.param
    return write_quantized_checkpoint(src, tmp_path_factory.mktemp("q"), method, gs, act)


def test_pack_roundtrip():
    q = torch.randint(0, 16, (6, 192), dtype=torch.uint8)
    assert torch.equal(unpack(pack(q)), q)


@pytest.mark.parametrize("method, gs, act", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("native", [True, False], ids=["c", "torch"])
def test_product_matches_the_dequantized_weight(method, gs, act, dtype, native):
    torch.manual_seed(0)
    out, n = 96, 512
    w = torch.randn(out, n) * 0.05
    tensors, deq = quantize_projection(w, method, n if gs == -1 else gs, torch.randperm(n) if act else None)
    qw = from_checkpoint(QuantConfig(method, 4, gs, act, True), "proj", tensors)
    assert torch.equal(qw.dequantize(torch.float32), deq)
    assert (qw.perm is not None) == act and qw.q.dtype == torch.uint8 and qw.q.shape == (out, n // 2)
    bias = torch.randn(out)
    lin = QuantLinear(qw, bias, native_lib() if native else None)
    for m in (1, 2, 3, 4, 5, 9, quant_mod.W4_MAX_ROWS + 3):  # the kernel's row counts, and the dequantized GEMM
        x = torch.randn(m, n).to(dtype)
        got = lin(x)
        assert got.dtype == dtype and got.shape == (m, out)
        want = x.float() @ deq.t() + bias
        err = ((got.float() - want).abs().max() / want.abs().max()).item()
        assert err < (1e-5 if dtype == torch.float32 else 1e-2), (m, err)


def test_loaded_as_four_bit(pair):
    q_dir, dense_dir = pair
    loaded, dense = load_model(str(q_dir)), load_model(str(dense_dir))
    quantized = {k: v for k, v in loaded.weights.items() if isinstance(v, QuantWeight)}
    assert len(quantized) == 3 * 7  # every projection of the three layers
    for k, v in quantized.items():
        assert torch.equal(v.dequantize(torch.float32), dense.weights[k].float()), k
    engine = LLMEngine(EngineConfig(model=str(q_dir), num_kv_blocks=16, dtype="bfloat16"))
    layer = engine.model.layers[0]
    assert all(lin.quant is not None and lin.quant.w.q.dtype == torch.uint8 for lin in layer.linears())


def test_greedy_tokens_equal_the_dequantized_model(pair):
    """float32: the same greedy tokens as the dense model, for prompts alone and batched (the kernel's
    rows and the dequantized GEMM), and after a prefix-cache hit."""
    q_dir, dense_dir = pair
    prompts = {f"p{i}": (list(range(3 + i, 40 + 9 * i)), SamplingParams(max_tokens=12, temperature=0))
               for i in range(6)}
    got = {}
    for name, d in (("q", q_dir), ("dense", dense_dir)):
        engine = LLMEngine(EngineConfig(model=str(d), num_kv_blocks=64, dtype="float32"))
        got[name] = {k: v[0] for k, v in run_all(engine, prompts).items()}
        again = run_all(engine, {"p1": prompts["p1"]})["p1"][0]  # alone, its prefix cached
        assert again == got[name]["p1"], name
    assert got["q"] == got["dense"]


def test_bfloat16_logits_are_close(pair):
    q_dir, dense_dir = pair
    prompt = list(range(5, 70))
    logits = [LLMEngine(EngineConfig(model=str(d), num_kv_blocks=16, dtype="bfloat16")).score([prompt])[0].float()
              for d in (q_dir, dense_dir)]
    ref = LLMEngine(EngineConfig(model=str(dense_dir), num_kv_blocks=16, dtype="float32")).score([prompt])[0]
    err = (logits[0] - ref).abs().max().item()
    assert err <= 2 * (logits[1] - ref).abs().max().item() + 0.05, err  # no worse than the dense model in bf16


def test_remote_prefill_of_a_quantized_model(pair):
    q_dir, _ = pair
    remote_prefill_matches_local(
        lambda: LLMEngine(EngineConfig(model=str(q_dir), num_kv_blocks=32, dtype="float32")),
        list(range(4, 60)), SamplingParams(max_tokens=8, temperature=0))


def test_served_1p1d(src, tmp_path):
    q_dir, dense_dir = write_quantized_checkpoint(src, tmp_path, "gptq", 64, True)
    engine = LLMEngine(EngineConfig(model=str(dense_dir), num_kv_blocks=64, dtype="float32"))
    prompts = {"a": list(range(3, 45)), "b": list(range(20, 90))}
    want = {k: v[0] for k, v in run_all(engine, {k: (p, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
                                                for k, p in prompts.items()}).items()}
    served_1p1d_remote_texts_match(q_dir, prompts, want, 8)


def _edit(folder, fn):
    cfg = json.loads((folder / "config.json").read_text())
    fn(cfg["quantization_config"])
    (folder / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("edit, message", [
    (lambda q: q.update(quant_method="bitsandbytes"), "'bitsandbytes' is not supported"),
    (lambda q: q.update(bits=8), "8 bits is not supported"),
    (lambda q: q.update(group_size=48), "group_size 48"),
    (lambda q: q.update(checkpoint_format="marlin"), "checkpoint_format 'marlin'"),
])
def test_unsupported_quantizations_are_one_line_errors(src, tmp_path, edit, message):
    q_dir, _ = write_quantized_checkpoint(src, tmp_path, "gptq", 32)
    _edit(q_dir, edit)
    with pytest.raises(ModelLoadError, match=message) as e:
        load_model(str(q_dir))
    assert "\n" not in str(e.value)


def test_awq_gemv_and_missing_tensors(src, tmp_path):
    q_dir, _ = write_quantized_checkpoint(src, tmp_path / "a", "awq", 32)
    _edit(q_dir, lambda q: q.update(version="gemv"))
    with pytest.raises(ModelLoadError, match="AWQ version 'gemv'"):
        load_model(str(q_dir))
    q_dir, _ = write_quantized_checkpoint(src, tmp_path / "b", "gptq", 32)
    from safetensors.torch import load_file, save_file

    t = load_file(str(q_dir / "model.safetensors"))
    del t["model.layers.1.mlp.up_proj.qzeros"]
    save_file(t, str(q_dir / "model.safetensors"))
    with pytest.raises(ModelLoadError, match="up_proj: quantized projection lacks tensor 'qzeros'"):
        load_model(str(q_dir))


def test_lora_adapters_on_a_quantized_base(src, tmp_path):
    """A LoRA adapter over the 4-bit model (QLoRA's way of serving): the dequantized dense model with the
    same adapter gives the same greedy tokens, batched with requests of no adapter."""
    pytest.importorskip("peft")
    from tests.checkpoints import write_lora

    q_dir, dense_dir = write_quantized_checkpoint(src, tmp_path, "awq", 64)
    adapter = write_lora(dense_dir, tmp_path / "a", seed=3)
    prompts = {"plain": list(range(3, 30)), "lora": list(range(10, 60)), "lora2": list(range(5, 12))}
    got = {}
    for name, d in (("q", q_dir), ("dense", dense_dir)):
        engine = LLMEngine(EngineConfig(model=str(d), dtype="float32", num_kv_blocks=64,
                                        lora_modules={"a": str(adapter)}))
        for k, p in prompts.items():
            engine.add_request(k, p, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True),
                               lora_name=None if k == "plain" else "a")
        got[name] = {k: [] for k in prompts}
        while engine.has_unfinished_requests():
            for out in engine.step():
                got[name][out.request_id].extend(out.new_token_ids)
    assert got["q"] == got["dense"]


def test_an_older_gptq_export_with_quantize_config_json(src, tmp_path):
    """AutoGPTQ's older exports keep the settings in quantize_config.json, not in config.json."""
    q_dir, dense_dir = write_quantized_checkpoint(src, tmp_path, "gptq", 32)
    cfg = json.loads((q_dir / "config.json").read_text())
    q = cfg.pop("quantization_config")
    q.pop("quant_method")
    (q_dir / "config.json").write_text(json.dumps(cfg))
    (q_dir / "quantize_config.json").write_text(json.dumps(q))
    loaded, dense = load_model(str(q_dir)), load_model(str(dense_dir))
    w = loaded.weights["model.layers.2.self_attn.o_proj.weight"]
    assert isinstance(w, QuantWeight)
    assert torch.equal(w.dequantize(torch.float32), dense.weights["model.layers.2.self_attn.o_proj.weight"])
    from launcher.config import parse_args

    assert parse_args(["--model", str(q_dir), "--quantization", "gptq_marlin"]).quantization == "gptq_marlin"


def test_the_quantization_flag_is_checked_against_the_checkpoint(src, tmp_path):
    """vLLM's ``--quantization`` (``-q``): the method is the checkpoint's own; a flag that names it
    (or vLLM's marlin name for it) starts, one that does not, or names a method the native engine
    does not run, is a one-line error before anything starts."""
    from launcher.config import ConfigError, parse_args

    gptq, dense = write_quantized_checkpoint(src, tmp_path / "g", "gptq", 32)
    awq, _ = write_quantized_checkpoint(src, tmp_path / "a", "awq", 128)
    for folder, flag in ((gptq, "gptq"), (gptq, "GPTQ_Marlin"), (awq, "awq"), (awq, "awq_marlin")):
        assert parse_args(["--model", str(folder), "-q", flag]).quantization == flag
    for folder, flag, says in ((gptq, "awq", "quantized with gptq"), (dense, "gptq", "is not quantized"),
                               ("builtin:tiny", "awq", "is not quantized"), (gptq, "fp8", "native engine runs")):
        with pytest.raises(ConfigError, match=says) as e:
            parse_args(["--model", str(folder), "--quantization", flag])
        assert "\n" not in str(e.value)
