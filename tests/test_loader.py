from __future__ import annotations

import json
import math
import shutil
import time

import pytest
import torch

from dyn_actor.engine import EngineConfig, LLMEngine, SamplingParams
from dyn_actor.engine.builtin import build_weights, save_builtin
from dyn_actor.engine.loader import load_model
from dyn_actor.engine.model_config import ModelLoadError
from dyn_actor.engine.tokenizer import ChatTemplateError, Tokenizer
from tests.helpers import run_all


def test_builtin_is_seeded_and_fast():
    t0 = time.perf_counter()
    a = load_model("builtin:tiny")
    assert time.perf_counter() - t0 < 5  # generous for a loaded CI box; ~0.1 s normally
    b = build_weights()
    assert all(torch.equal(a.weights[k], b[k]) for k in b)
    text = "Hi there!\n\tok"
    assert a.tokenizer.decode(a.tokenizer.encode(text)) == text
    assert a.tokenizer.encode("A")[0] == a.tokenizer.bos_token_id
    assert a.tokenizer.decode(a.tokenizer.encode("naïve")) == "na?ve"  # outside the vocabulary


def test_builtin_output_is_readable_text():
    engine = LLMEngine(EngineConfig(num_kv_blocks=64))
    tok = engine.tokenizer
    res = run_all(engine, {"a": (tok.encode("Hello"), SamplingParams(max_tokens=40, temperature=1.0, seed=1))})
    text = tok.decode(res["a"][0])
    assert text and all(c.isprintable() or c in "\t\n" for c in text)


def test_saved_builtin_folder_loads_identically(tmp_path):
    d = save_builtin(tmp_path / "tiny")
    p = [0, 10, 20, 30, 40, 50]
    e1 = LLMEngine(EngineConfig(num_kv_blocks=32))
    e2 = LLMEngine(EngineConfig(model=str(d), num_kv_blocks=32))
    assert torch.equal(e1.score([p])[0], e2.score([p])[0])
    assert e2.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}]) == "<s>user: hi\nassistant:"


@pytest.mark.parametrize(
    "breakage, message",
    [
        (lambda d: (d / "config.json").unlink(), "config.json"),
        (lambda d: (d / "model.safetensors").unlink(), "safetensors"),
        (lambda d: (d / "tokenizer.json").unlink(), "tokenizer.json"),
        (lambda d: (d / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"]}'), "GPT2LMHeadModel"),
        (lambda d: (d / "config.json").write_text("{not json"), "JSON"),
        (lambda d: (d / "model.safetensors").write_bytes(b"garbage"), "cannot read"),
    ],
)
def test_broken_folders_give_one_line_errors(tmp_path, breakage, message):
    d = save_builtin(tmp_path / "m")
    breakage(d)
    with pytest.raises(ModelLoadError, match=message) as info:
        LLMEngine(EngineConfig(model=str(d), num_kv_blocks=32))
    assert "\n" not in str(info.value)


def test_missing_tensor_and_missing_folder(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "nope"))
    with pytest.raises(ModelLoadError, match="unknown built-in"):
        load_model("builtin:huge")
    d = save_builtin(tmp_path / "m")
    from safetensors.torch import load_file, save_file

    w = load_file(str(d / "model.safetensors"))
    del w["model.layers.1.mlp.up_proj.weight"]
    save_file(w, str(d / "model.safetensors"))
    with pytest.raises(ModelLoadError, match="layers.1.mlp.up_proj.weight"):
        LLMEngine(EngineConfig(model=str(d), num_kv_blocks=32))


def _edit_config(d, **changes):
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"architectures": ["Qwen3ForCausalLM"]}, "q_norm.weight"),  # Qwen3 without its head norms
        ({"partial_rotary_factor": 0.3}, "partial_rotary_factor 0.3 of head_dim 64"),  # 19 dimensions: odd
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "original_max_position_embeddings"),
        ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "'dynamic'"),
    ],
)
def test_configs_the_engine_cannot_run_are_one_line_errors(tmp_path, changes, message):
    d = save_builtin(tmp_path / "m")
    _edit_config(d, **changes)
    with pytest.raises(ModelLoadError, match=message) as info:
        LLMEngine(EngineConfig(model=str(d), num_kv_blocks=32))
    assert "\n" not in str(info.value)


def test_qwen3_by_model_type_and_yarn_from_the_top_level(tmp_path):
    from dyn_actor.engine.model_config import ModelConfig

    d = save_builtin(tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    del cfg["architectures"]
    cfg.update(model_type="qwen3", original_max_position_embeddings=64,
               rope_scaling={"type": "yarn", "factor": 2.0})
    mc = ModelConfig.from_hf_dict(cfg)
    assert mc.architecture == "Qwen3ForCausalLM" and mc.qk_norm
    assert mc.rope_scaling["original_max_position_embeddings"] == 64
    assert abs(mc.rope_attention_factor() - (0.1 * math.log(2.0) + 1)) < 1e-12
    # the interpolated (slow) end of the frequencies is divided by the factor, the fast end kept
    plain = ModelConfig.from_hf_dict({**cfg, "rope_scaling": None}).rope_inv_freq()
    yarn = mc.rope_inv_freq()
    assert torch.equal(yarn[0], plain[0]) and torch.allclose(yarn[-1], plain[-1] / 2)


def test_chat_template_sources(tmp_path):
    d = save_builtin(tmp_path / "m")
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    # 1) in tokenizer_config.json (older transformers)
    assert Tokenizer.from_dir(d).apply_chat_template([{"role": "user", "content": "x"}]).startswith("<s>user: x")
    # 2) chat_template.jinja wins (current transformers writes it there)
    (d / "chat_template.jinja").write_text("{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}")
    assert Tokenizer.from_dir(d).apply_chat_template([{"role": "user", "content": "x"}]) == "[user]x"
    # 3) none: a clear error
    (d / "chat_template.jinja").unlink()
    del cfg["chat_template"]
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ChatTemplateError, match="no chat template"):
        Tokenizer.from_dir(d).apply_chat_template([{"role": "user", "content": "x"}])


def test_chat_template_content_parts_and_raise_exception():
    tok = load_model("builtin:tiny").tokenizer
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    assert tok.apply_chat_template([{"role": "user", "content": parts}]) == "<s>user: ab\nassistant:"
    ids = tok.encode_chat([{"role": "user", "content": "hi"}])
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    strict = Tokenizer(tok.backend, "{{ raise_exception('roles must alternate') }}", "<s>", "</s>")
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        strict.apply_chat_template([{"role": "user", "content": "x"}])


def test_bfloat16_runs_close_to_float32(tmp_path):
    p = [0, 10, 20, 30, 40, 50, 60, 70]
    f32 = LLMEngine(EngineConfig(num_kv_blocks=32)).score([p])[0]
    bf16 = LLMEngine(EngineConfig(num_kv_blocks=32, dtype="bfloat16")).score([p])[0]
    assert bf16.dtype == torch.float32
    assert (f32.softmax(-1) - bf16.softmax(-1)).abs().max() < 0.1


def test_real_checkpoint_tokenizer_and_eos(llama_dir, tmp_path):
    d = tmp_path / "copy"
    shutil.copytree(llama_dir, d)
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 7]}))
    loaded = load_model(str(d))
    assert set(loaded.eos_token_ids) == {1, 7}
    assert loaded.config.architecture == "LlamaForCausalLM"


def test_gpu_plan_hands_out_cards_in_order_and_splits_shared_ones():
    from launcher.config import gpu_plan

    assert gpu_plan(["decode 0", "prefill 0"], [], 0.9) == {}
    assert gpu_plan(["decode 0", "prefill 0"], [0, 1], 0.9) == {"decode 0": (0, 0.9), "prefill 0": (1, 0.9)}
    plan = gpu_plan(["decode 0", "prefill 0"], [3], 0.9)  # 1p1d on one card: each gets half of it
    assert plan == {"decode 0": (3, 0.45), "prefill 0": (3, 0.45)}
    plan = gpu_plan(["decode 0", "decode 1", "prefill 0"], [0, 1], 0.8)
    assert plan == {"decode 0": (0, 0.4), "decode 1": (1, 0.8), "prefill 0": (0, 0.4)}


def test_prefill_workers_see_every_card_their_own_first():
    from launcher.config import visible_devices

    # a prefill worker writes into decode pools on other cards: it must see them, and compute on its own
    assert visible_devices("prefill", 2, [0, 1, 2, 3]) == [2, 0, 1, 3]
    assert visible_devices("prefill", 5, [5]) == [5]
    assert visible_devices("prefill", 1, [0, 1, 0, 1]) == [1, 0]
    assert visible_devices("decode", 2, [0, 1, 2, 3]) == [2]
    assert visible_devices("worker", 0, [0, 1]) == [0]


def test_bad_words_spellings_as_vllm_makes_them():
    """``bad_words`` as token sequences: a word as written, plus its spelling after a space where
    that is as many tokens and starts with another one (a byte-level BPE has " cat" as a token)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tk = HFTokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(["the cat sat on the mat", "cat catalog the cat"] * 50,
                           trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = Tokenizer(tk)

    def enc(s):
        return tok.encode(s, add_special_tokens=False)

    assert len(enc("cat")) == len(enc(" cat")) == 1 and enc("cat") != enc(" cat")
    assert tok.bad_words_ids(["cat", " the cat"]) == [enc("cat"), enc(" cat"), enc("the cat"), enc(" the cat")]
    assert len(enc("zq")) != len(enc(" zq"))  # the spaced spelling has its own space token: left out
    assert tok.bad_words_ids(["zq"]) == [enc("zq")]
    with pytest.raises(ValueError, match="more than 128"):
        tok.bad_words_ids([f"cat{i}" for i in range(100)])
