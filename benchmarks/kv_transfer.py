"""KV-transfer bandwidth between processes vs a plain memcpy of the same bytes, in one run.

    python benchmarks/kv_transfer.py

CPU: the owner (decode side) creates its pool in shared memory; a second
process (prefill side) attaches and moves N blocks from scattered ids of its own
pool to scattered ids of the shared one with ``RemoteKvPool.write_blocks_from``
(one call, no staging copy), beside the older gather-then-scatter path. The
baseline, in the same writer process and run, is ``dst.copy_(src)`` of the same
number of bytes between two private contiguous tensors. Target: at least 0.7x.
GPU (CUDA IPC), when a GPU is present: the owner's pool is device memory; the
writer process opens it by IPC handle and moves N blocks from its own device pool
with one kernel (``RemoteCudaKvPool.write_blocks_from``, stream synchronised),
against a contiguous device-to-device ``copy_`` of the same bytes, the scatter of
a staged tensor and ``index_copy_`` through the same mapping, in the same run.
Target: at least 0.85x of the copy for 128 MiB and more.

    python benchmarks/kv_transfer.py [--gpu-only]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
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
    own = torch.randn(tuple(desc.shape))  # the writer's own pool, as a prefill worker's
    for n in counts:
        src = torch.randn((n, *desc.shape[1:]))
        ids = rng.sample(range(desc.shape[0]), n)
        src_ids = rng.sample(range(desc.shape[0]), n)
        # what a prefill worker does: its pool's blocks straight into the remote pool (one call)
        t_direct = _time(lambda ids=ids, s=src_ids: remote.write_blocks_from(ids, own, s))
        # what it did before: gather them into a staging tensor, then scatter that
        t_staged = _time(lambda ids=ids, s=src_ids: remote.write_blocks(ids, own[torch.tensor(s)]))
        dst = torch.empty_like(src)
        t_copy = _time(lambda dst=dst, src=src: dst.copy_(src))
        nbytes = src.numel() * src.element_size()
        rows.append({"blocks": n, "MiB": nbytes / 2**20, "transfer_GBps": nbytes / t_direct / 1e9,
                     "staged_GBps": nbytes / t_staged / 1e9, "memcpy_GBps": nbytes / t_copy / 1e9,
                     "ratio": t_copy / t_direct, "transfer_ms": t_direct * 1e3})
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


# GPU: a Llama-3-8B-like bf16 KV block (32 layers x K/V x 16 tokens x 8 heads x 128: 2 MiB),
# and one layer of it (64 KiB)
GPU_LAYOUTS = {"2MiB": dict(num_layers=32, block_size=16, num_kv_heads=8, head_dim=128, dtype=torch.bfloat16),
               "64KiB": dict(num_layers=1, block_size=16, num_kv_heads=8, head_dim=128, dtype=torch.bfloat16)}
GPU_POOL_BYTES = 2 << 30


def _cuda_time(fn, reps: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


SWEEP = [(w, nw) for w in (512, 1024, 2048, 4096, 8192) for nw in (4, 8, 16)]


def _gpu_writer(descs: dict, conn, sweep: bool = False) -> None:
    from dyn_actor.kv.cuda_ipc import ROUTE_ENV, move_blocks
    from dyn_actor.kv.transfer import open_remote_pool

    rows, sweep_rows = [], []
    for label, desc in descs.items():
        remote = open_remote_pool(desc)
        os.environ[ROUTE_ENV] = "host"  # the route for two cards without peer access, forced on this one
        staged = open_remote_pool(desc)
        del os.environ[ROUTE_ENV]
        num_blocks = desc.shape[0]
        block_bytes = remote.block_nbytes
        own = torch.empty(tuple(desc.shape), dtype=remote.data.dtype, device=remote.device)  # the writer's pool
        for total_mib in (32, 128, 512):
            n = min(num_blocks, (total_mib << 20) // block_bytes)
            src = torch.randn((n, *desc.shape[1:]), device=remote.device).to(remote.data.dtype)
            ids_list = random.Random(n).sample(range(num_blocks), n)
            src_list = random.Random(n + 1).sample(range(num_blocks), n)
            ids = torch.as_tensor(ids_list, device=remote.device)
            src_ids = torch.as_tensor(src_list, device=remote.device)
            t_direct = _cuda_time(lambda r=remote, i=ids_list, s=src_list, o=own: r.write_blocks_from(i, o, s))
            # where the direct call's time goes: the two id lists to the device (checks, pinned copy)
            t_ids = _cuda_time(lambda r=remote, i=ids_list, s=src_list: r._device_ids(i, s))
            # the kernel alone: ids already on the device
            t_kernel = _cuda_time(lambda r=remote, i=ids, s=src_ids, o=own: move_blocks(r.data, o, i, s))
            for cfg in SWEEP if sweep else ():
                t = _cuda_time(lambda r=remote, i=ids, s=src_ids, o=own, c=cfg: move_blocks(r.data, o, i, s, config=c))
                sweep_rows.append({"block": label, "MiB": n * block_bytes / 2**20, "words": cfg[0],
                                   "warps": cfg[1], "GBps": n * block_bytes / t / 1e9})
            t_host = _cuda_time(lambda r=staged, i=ids_list, s=src_list, o=own: r.write_blocks_from(i, o, s), reps=5)
            t_ipc = _cuda_time(lambda r=remote, src=src, ids_list=ids_list: r.write_blocks(ids_list, src))
            t_index_copy = _cuda_time(
                lambda r=remote, ids=ids, s=src_ids, o=own: r.data.index_copy_(0, ids, o.index_select(0, s)))
            dst = torch.empty_like(src)
            t_copy = _cuda_time(lambda dst=dst, src=src: dst.copy_(src))
            nbytes = src.numel() * src.element_size()
            rows.append({"block": label, "blocks": n, "MiB": nbytes / 2**20,
                         "direct_GBps": nbytes / t_direct / 1e9, "kernel_GBps": nbytes / t_kernel / 1e9,
                         "ipc_scatter_GBps": nbytes / t_ipc / 1e9,
                         "index_copy_GBps": nbytes / t_index_copy / 1e9, "host_route_GBps": nbytes / t_host / 1e9,
                         "d2d_copy_GBps": nbytes / t_copy / 1e9, "ratio": t_copy / t_direct,
                         "kernel_ratio": t_copy / t_kernel,
                         "direct_us": t_direct * 1e6, "ids_us": t_ids * 1e6, "kernel_us": t_kernel * 1e6})
            del src, dst, ids, src_ids
        del own
        remote.close()
        staged.close()
    conn.send((rows, sweep_rows))


def gpu_benchmark(sweep: bool = False) -> tuple[list[dict], list[dict]]:
    from dyn_actor.kv.transfer import make_shared_pool

    pools = {}
    for label, kw in GPU_LAYOUTS.items():
        n = GPU_POOL_BYTES // KvLayout(1, **kw).block_nbytes
        pools[label] = make_shared_pool(KvLayout(num_blocks=n, **kw), "cuda")
    try:
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe()
        p = ctx.Process(target=_gpu_writer, args=({k: v.descriptor() for k, v in pools.items()}, child, sweep))
        p.start()
        rows = parent.recv()
        p.join(120)
        return rows
    finally:
        for pool in pools.values():
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
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gpu-only", action="store_true", help="skip the CPU part")
    ap.add_argument("--sweep", action="store_true", help="GPU: also time the move kernel's (words, warps) configs")
    args = ap.parse_args()
    rows: list[dict] = []
    if not args.gpu_only:
        rows = cpu_benchmark([4, 16, 64, 256])
        print(f"CPU, block = {KvLayout(1, **LAYOUT).block_nbytes // 1024} KiB (12 layers x K/V x 16 tokens x 4 x 64 fp32)")
        print("transfer: the writer's own pool straight into the shared one (one call); staged: gathered first")
        print_table(rows, ["blocks", "MiB", "transfer_ms", "transfer_GBps", "staged_GBps", "memcpy_GBps", "ratio"])
    gpu = sweep = None
    if torch.cuda.is_available():
        gpu, sweep = gpu_benchmark(args.sweep)
        print(f"\nGPU ({torch.cuda.get_device_name(0)}): pool to pool through CUDA IPC from another process "
              "(direct: write_blocks_from with Python id lists, one kernel, source ids in, destination ids out; "
              "kernel: the same kernel with the ids already on the device) vs a d2d copy of the same bytes")
        print_table(gpu, ["block", "blocks", "MiB", "direct_GBps", "kernel_GBps", "ipc_scatter_GBps",
                          "index_copy_GBps", "d2d_copy_GBps", "ratio", "kernel_ratio", "direct_us", "ids_us",
                          "kernel_us", "host_route_GBps"])
        print("host_route: through a pinned host buffer, the route between two cards without peer access "
              "(forced here on one card)")
        if sweep:
            print("\nmove kernel configs (GB/s, ids on the device)")
            print_table(sweep, ["block", "MiB", "words", "warps", "GBps"])
    else:
        print("\nGPU: none on this machine; the CUDA IPC path was not run")
    out = write_json("kv_transfer_gpu.json" if args.gpu_only else "kv_transfer.json", {"cpu": rows, "gpu": gpu,
                                                                                       "sweep": sweep})
    if rows:
        png = RESULTS / "kv_transfer.png"
        plot(rows, png)
        print(f"wrote {out} and {png}")
    else:
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
