from __future__ import annotations

import pytest

from dyn_actor.engine import EngineConfig, LLMEngine


def _checkpoint_fixture(kind: str):
    """A session fixture: a random ``kind`` checkpoint written once (``tests.checkpoints.write_checkpoint``)."""

    @pytest.fixture(scope="session")
    def fixture(tmp_path_factory):
        from tests.checkpoints import write_checkpoint

        return write_checkpoint(tmp_path_factory.mktemp(kind), kind)

    return fixture


llama_dir = _checkpoint_fixture("llama")
qwen2_dir = _checkpoint_fixture("qwen2")
qwen3_dir = _checkpoint_fixture("qwen3")
mixtral_dir = _checkpoint_fixture("mixtral")
qwen2_moe_dir = _checkpoint_fixture("qwen2_moe")
qwen3_moe_dir = _checkpoint_fixture("qwen3_moe")
gemma3_dir = _checkpoint_fixture("gemma3")
mistral_dir = _checkpoint_fixture("mistral")
phi3_dir = _checkpoint_fixture("phi3")
gemma2_dir = _checkpoint_fixture("gemma2")


@pytest.fixture(scope="session")
def builtin_dir(tmp_path_factory):
    """The built-in model saved as a folder (head_dim 64: vLLM's CPU attention takes it)."""
    from dyn_actor.engine.builtin import save_builtin

    d = tmp_path_factory.mktemp("tiny")
    save_builtin(d)
    return d


@pytest.fixture
def tiny_engine():
    return LLMEngine(EngineConfig(num_kv_blocks=512))
