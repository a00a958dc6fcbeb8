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


@pytest.fixture
def tiny_engine():
    return LLMEngine(EngineConfig(num_kv_blocks=512))
