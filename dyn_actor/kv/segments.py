"""The shared-memory segments that hold CPU KV pools, by name: their prefix, a room check before one
is made, and the clean-up of those a dead process left. No torch here: the launcher uses it."""

from __future__ import annotations

import os

SHM_PREFIX = "dyn-actor-kv-"


def check_shm_room(nbytes: int, path: str = "/dev/shm") -> None:
    """Refuse a pool that ``/dev/shm`` cannot hold: the segment would be created, then the process
    killed by SIGBUS when it first touches the pages that do not fit."""
    try:
        st = os.statvfs(path)
    except OSError:
        return
    free = st.f_bavail * st.f_frsize
    if nbytes > free:
        mib = 1 << 20
        raise MemoryError(
            f"the KV pool needs {nbytes / mib:,.0f} MiB of shared memory but {path} has {free / mib:,.0f} MiB free: "
            f"lower --kv-cache-memory-gb (to at most {free / (1 << 30) * 0.9:.2f}) or give {path} more room "
            "(in Docker: --shm-size)")


def leftover_segments() -> list[str]:
    """Segments of this project still in /dev/shm (for tests and cleanup)."""
    try:
        return sorted(n for n in os.listdir("/dev/shm") if n.startswith(SHM_PREFIX))
    except FileNotFoundError:
        return []


def remove_segments_of(pid: int) -> list[str]:
    """Remove the KV segments a (dead) process created; return their names."""
    removed = []
    for name in leftover_segments():
        if name.startswith(f"{SHM_PREFIX}{pid}-"):
            try:
                os.unlink(f"/dev/shm/{name}")
                removed.append(name)
            except FileNotFoundError:
                pass
    return removed
