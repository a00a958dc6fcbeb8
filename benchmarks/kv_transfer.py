"""KV-transfer bandwidth between processes vs a plain memcpy of the same bytes, in one run.

    python benchmarks/kv_transfer.py

CPU: the owner (decode side) creates its pool in shared memory; a second
process (prefill side) attaches and writes N blocks at scattered block ids
with ``RemoteKvPool.write_blocks`` (one ``index_copy_``). The baseline, in
the same writer process and run, is ``dst.copy_(src)`` of the same number of
bytes between two private contiguous tensors. Target: at least 0.7x.
GPU (CUDA IPC) is measured when a GPU is present; otherwise the script says so.
"""

from __future__ import annotations

import multiprocessing as mp
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks.common import RESULTS, print_table, pyplot, write_json  # noqa: E402
from dyn_actor.kv.pool import KvLayout  # noqa: E402
from dyn_actor.kv.transfer import RemoteKvPool, SharedKvPool  # noqa: E402

# the 125M benchmark model's KV: 12 layers, 4 KV heads of 64, blocks of 16 tokens, float32 (384 KiB a block)
LAYOUT = dict(num_layers=12, block_size=16, num_kv_heads=4, head_dim=64, dtype=torch.float32)
POOL_BLOCKS = 1024


def _time(fn, reps: int = 9) -> float:
    fn()
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def _writer(desc, counts: list[int], conn) -> None:
    remote = RemoteKvPool(desc)
    rng = random.Random(0)
    rows = []
    for n in counts:
        src = torch.randn((n, *desc.shape[1:]))
        ids = rng.sample(range(desc.shape[0]), n)
        t_scatter = _time(lambda ids=ids, src=src: remote.write_blocks(ids, src))
        dst = torch.empty_like(src)
        t_copy = _time(lambda dst=dst, src=src: dst.copy_(src))
        nbytes = src.numel() * src.element_size()
        rows.append({"blocks": n, "MiB": nbytes / 2**20, "transfer_GBps": nbytes / t_scatter / 1e9,
                     "memcpy_GBps": nbytes / t_copy / 1e9, "ratio": t_copy / t_scatter,
                     "transfer_ms": t_scatter * 1e3})
    remote.close()
    conn.send(rows)


def cpu_benchmark(counts: list[int]) -> list[dict]:
    layout = KvLayout(num_blocks=POOL_BLOCKS, **LAYOUT)
    pool = SharedKvPool(layout)
    try:
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe()
        p = ctx.Process(target=_writer, args=(pool.descriptor(), counts, child))
        p.start()
        rows = parent.recv()
        p.join(60)
        return rows
    finally:
        pool.close()


def plot(rows: list[dict], path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["MiB"] for r in rows], [r["transfer_GBps"] for r in rows], "o-", label="shm scatter (other process)")
    ax.plot([r["MiB"] for r in rows], [r["memcpy_GBps"] for r in rows], "s--", label="memcpy (same bytes)")
    ax.set_xscale("log")
    ax.set_xlabel("MiB per transfer")
    ax.set_ylabel("GB/s")
    ax.set_title("KV transfer on CPU")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> int:
    counts = [4, 16, 64, 256]
    rows = cpu_benchmark(counts)
    print(f"CPU, block = {KvLayout(1, **LAYOUT).block_nbytes // 1024} KiB (12 layers x K/V x 16 tokens x 4 x 64 fp32)")
    print_table(rows, ["blocks", "MiB", "transfer_ms", "transfer_GBps", "memcpy_GBps", "ratio"])
    gpu = None
    if torch.cuda.is_available():
        print("\nGPU present, but the CUDA IPC transfer is not implemented yet: nothing measured")
    else:
        print("\nGPU: none on this machine; the CUDA IPC path was not run")
    out = write_json("kv_transfer.json", {"cpu": rows, "gpu": gpu})
    png = RESULTS / "kv_transfer.png"
    plot(rows, png)
    print(f"wrote {out} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
