from __future__ import annotations

import pytest

from dyn_actor.engine import EngineConfig, LLMEngine


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory):
    from tests.checkpoints import write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("llama"), "llama")


@pytest.fixture(scope="session")
def qwen2_dir(tmp_path_factory):
    from tests.checkpoints import write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("qwen2"), "qwen2")


@pytest.fixture(scope="session")
def qwen3_dir(tmp_path_factory):
    from tests.checkpoints import write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("qwen3"), "qwen3")


@pytest.fixture(scope="session")
def mixtral_dir(tmp_path_factory):
    from tests.checkpoints import write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("mixtral"), "mixtral")


@pytest.fixture(scope="session")
def qwen2_moe_dir(tmp_path_factory):
    from tests.checkpoints import write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("qwen2_moe"), "qwen2_moe")


@pytest.fixture(scope="session")
def qwen3_moe_dir(tmp_path_factory):
    from tests.checkpoints import write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("qwen3_moe"), "qwen3_moe")


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
