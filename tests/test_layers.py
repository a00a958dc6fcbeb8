"""Layers import downward only: the wire types load no torch, the KV layer loads no engine."""

from __future__ import annotations

import subprocess
import sys

from tests.server import ROOT


def _loaded(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys; print(' '.join(sys.modules))"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    return set(out.split())


def test_wire_types_load_no_torch():
    mods = _loaded("import dyn_actor.protocol, dyn_actor.components.messages, dyn_actor.components.openai_api, "
                   "dyn_actor.components.disagg_messages, dyn_actor.kv.descriptor")
    assert "torch" not in mods and not any(m.startswith("dyn_actor.engine") for m in mods)


def test_the_kv_layer_loads_no_engine():
    mods = _loaded("import dyn_actor.kv.transfer, dyn_actor.kv.cuda_ipc, dyn_actor.kv.block_manager")
    assert not any(m.startswith("dyn_actor.engine") for m in mods)
