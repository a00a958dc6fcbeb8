"""Compile every Triton kernel of the project for a GPU, on a machine without one.

Triton's interpreter (what the CPU tests run the kernels under) executes a kernel's Python with
numpy: it does not check what only the compiler checks (a loop-carried variable that changes type,
a shape that does not broadcast in the compiled lowering, an unsupported op), and it never takes the
paths that only a GPU takes (half-precision ``tl.dot``, for one). This script drives the project's
own kernel wrappers with CPU tensors of serving shapes (the 1B and 8B Llama shapes, the built-in
model's, every dtype and KV block size the engine takes) while ``JITFunction.run`` records each
launch instead of launching it, then compiles each distinct launch ahead of time for the target
(``sm_90``, the H100/H200, by default) with the ptxas that ships in the triton wheel: no driver and
no GPU needed. With ``--ptxas-info`` it also reports each kernel's registers and spills.

    python scripts/triton_compile.py [--arch 90] [--quick] [--ptxas-info] [--jobs N] [--json out.json]

The launches compile in ``--jobs`` forked processes (default: the cores, at most 4).
``--quick`` (the test suite's run, 20 s cold on 2 cores): bfloat16 and float32 only, four of the six model
shapes; every kernel still compiles in every variant of its compile-time constants that those take.

Exit status 1 if any launch fails to compile. Run with ``TRITON_INTERPRET`` unset.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("triton_compile.py: unset TRITON_INTERPRET (the interpreter compiles nothing)")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

PTR = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.int64: "*i64",
       torch.int32: "*i32", torch.int16: "*i16", torch.int8: "*i8", torch.uint8: "*u8", torch.bool: "*i1"}
OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")


class Launch:
    """One recorded launch: the kernel, its signature and constexprs, the compile options."""

    def __init__(self, fn: JITFunction, args: tuple, kwargs: dict, where: str) -> None:
        self.fn, self.where = fn, where
        names = fn.arg_names
        values = dict(zip(names, args))
        options = {k: kwargs.pop(k) for k in list(kwargs) if k in OPTIONS}
        values.update(kwargs)
        self.signature, self.constexprs = {}, {}
        for i, name in enumerate(names):
            v = values.get(name, fn.params[i].default if hasattr(fn.params[i], "default") else None)
            if i in fn.constexprs:
                self.signature[name] = "constexpr"
                self.constexprs[name] = v
            elif isinstance(v, torch.Tensor):
                self.signature[name] = PTR[v.dtype]
            elif isinstance(v, bool):
                self.signature[name] = "i1"
            elif isinstance(v, int):
                self.signature[name] = "i32" if -2**31 <= v < 2**31 else "i64"
            elif isinstance(v, float):
                self.signature[name] = "fp32"
            elif v is None:
                self.signature[name] = "constexpr"
                self.constexprs[name] = None
            else:
                raise TypeError(f"{fn.__name__}: argument {name} of type {type(v).__name__}")
        self.options = options

    @property
    def key(self) -> tuple:
        return (self.fn.__name__, tuple(self.signature.items()), tuple(sorted(self.constexprs.items())),
                tuple(sorted(self.options.items())))

    def describe(self) -> str:
        consts = ", ".join(f"{k}={v}" for k, v in self.constexprs.items() if v is not None)
        ptrs = ",".join(sorted({t for t in self.signature.values() if t.startswith("*")}))
        opts = ", ".join(f"{k}={v}" for k, v in sorted(self.options.items()))
        return f"{self.fn.__name__}({consts}) [{ptrs}] {opts}".strip()


def record(drive) -> list[Launch]:
    """Run ``drive()`` with every JIT launch recorded instead of run."""
    launches: list[Launch] = []
    original = JITFunction.run

    def fake_run(self, *args, grid, warmup, **kwargs):
        launches.append(Launch(self, args, dict(kwargs), drive.__name__))

    JITFunction.run = fake_run
    try:
        drive()
    finally:
        JITFunction.run = original
    return launches


# ------------------------------------------------------------------------------ what is driven
# (num_heads, num_kv_heads, head_dim, hidden, intermediate): Llama-3.2-1B, Llama-3.1-8B, the built-in
# model, GQA ratios 1 and 2, and Qwen3-0.6B (query heads wider than the hidden size; per-head q/k norms)
MODELS = [(32, 8, 64, 2048, 8192), (32, 8, 128, 4096, 14336), (4, 2, 64, 256, 688), (16, 16, 64, 1024, 2816),
          (8, 4, 128, 1024, 2048), (16, 8, 128, 1024, 3072)]
QK_NORM_MODELS = {(16, 8, 128, 1024, 3072)}
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
BLOCK_SIZES = [16, 32]
#: every kernel the project launches (the run fails if a driver misses one)
KERNELS = {"_add_rms_norm_kernel", "_rope_store_kernel", "_silu_mul_kernel", "_decode_split_kernel",
           "_decode_reduce_kernel", "_prefill_kernel", "_top_p_threshold_kernel", "scatter_rows", "move_rows",
           "_grouped_gemm_kernel"}
#: Gemma 3 (head_dim 256, float32 ``1 + w`` norm weights, sliding windows): the 1B and 4B text shapes
#: (Gemma 2 2B's is the 4B's but for the hidden size; its capped scores are driven on both)
GEMMA_MODELS = [(4, 1, 256, 1152, 6912), (8, 4, 256, 2560, 10240)]
#: mixtures of experts: (experts, experts a token); Qwen3-30B-A3B's 128 of 8, Mixtral's 8 of 2
MOE_SHAPES = [(128, 8), (8, 2)]


def quick() -> None:
    """Fewer shapes and dtypes: the 1B and 8B shapes, GQA 1 and Qwen3's; bfloat16 and float32."""
    MODELS[:] = [MODELS[0], MODELS[1], MODELS[3], MODELS[5]]
    DTYPES[:] = [torch.bfloat16, torch.float32]


def drive_ops() -> None:
    from dyn_actor.engine import triton_ops

    for dt in DTYPES:
        for nh, nkv, d, hidden, inter in MODELS:
            t = 8
            x = torch.zeros(t, hidden, dtype=dt)
            w = torch.zeros(hidden, dtype=dt)
            triton_ops.add_rms_norm(x, x.clone(), w, 1e-5)
            triton_ops.add_rms_norm(x, None, w, 1e-5)
            triton_ops.silu_mul(torch.zeros(t, 2 * inter, dtype=dt))
            for bs in BLOCK_SIZES:
                qkv = torch.zeros(t, (nh + 2 * nkv) * d, dtype=dt)
                cos = torch.zeros(64, d, dtype=dt)
                kc = torch.zeros(4, bs, nkv, d, dtype=dt)
                pos = torch.zeros(t, dtype=torch.long)
                triton_ops.rope_and_store(qkv, cos, cos, pos, pos, pos, kc, kc.clone(), nh, nkv, d)
                if (nh, nkv, d, hidden, inter) in QK_NORM_MODELS:
                    qn = torch.ones(d, dtype=dt)
                    triton_ops.rope_and_store(qkv, cos, cos, pos, pos, pos, kc, kc.clone(), nh, nkv, d, qn, qn, 1e-6)


def drive_attention() -> None:
    from dyn_actor.engine import triton_attention as ta

    for dt in DTYPES:
        for nh, nkv, d, _, _ in MODELS:
            for bs in BLOCK_SIZES:
                kc = torch.zeros(8, bs, nkv, d, dtype=dt)
                for batch, width in ((1, 8), (64, 16), (256, 80)):
                    q = torch.zeros(batch, nh, d, dtype=dt)
                    table = torch.zeros(batch, width, dtype=torch.long)
                    ctx = torch.ones(batch, dtype=torch.long)
                    ta.paged_decode_attention(q, kc, kc, table, ctx, 0.125)
                q = torch.zeros(40, nh, d, dtype=dt)
                lens = torch.zeros(2, dtype=torch.long)
                ta.paged_prefill_attention(q, kc, kc, torch.zeros(2, 8, dtype=torch.long), lens, lens, lens, 0.125, 33)


def drive_gemma() -> None:
    """Gemma 3's launches: norms and head norms with float32 weights over 16-bit rows (multiplied before
    rounding), head_dim 256, and the attention kernels with a sliding window and without."""
    from dyn_actor.engine import triton_attention as ta
    from dyn_actor.engine import triton_ops

    for dt in (torch.bfloat16, torch.float32):
        for nh, nkv, d, hidden, _ in GEMMA_MODELS:
            t = 8
            x = torch.zeros(t, hidden, dtype=dt)
            w = torch.zeros(hidden, dtype=torch.float32)
            triton_ops.add_rms_norm(x, x.clone(), w, 1e-6)
            triton_ops.add_rms_norm(x, None, w, 1e-6)
            for bs in BLOCK_SIZES:
                qkv = torch.zeros(t, (nh + 2 * nkv) * d, dtype=dt)
                cos = torch.zeros(64, d, dtype=dt)
                kc = torch.zeros(8, bs, nkv, d, dtype=dt)
                pos = torch.zeros(t, dtype=torch.long)
                qn = torch.ones(d, dtype=torch.float32)
                triton_ops.rope_and_store(qkv, cos, cos, pos, pos, pos, kc, kc.clone(), nh, nkv, d, qn, qn, 1e-6)
                for window, cap in ((0, 0.0), (512, 0.0), (4096, 50.0), (0, 50.0)):  # Gemma 2: capped scores
                    for batch, width in ((1, 8), (64, 16)):
                        q = torch.zeros(batch, nh, d, dtype=dt)
                        table = torch.zeros(batch, width, dtype=torch.long)
                        ctx = torch.ones(batch, dtype=torch.long)
                        ta.paged_decode_attention(q, kc, kc, table, ctx, 0.0625, window=window, softcap=cap)
                    q = torch.zeros(40, nh, d, dtype=dt)
                    lens = torch.zeros(2, dtype=torch.long)
                    ta.paged_prefill_attention(q, kc, kc, torch.zeros(2, 8, dtype=torch.long), lens, lens, lens, 0.0625,
                                               33, window=window, softcap=cap)


def drive_sampling() -> None:
    from dyn_actor.engine.triton_sampling import top_p_thresholds

    for vocab in (128256, 32000, 1000):
        x = torch.zeros(4, vocab)
        r = torch.zeros(4)
        top_p_thresholds(x, r, r, r, torch.zeros(4, dtype=torch.bool), r.clone())


def drive_kv_moves() -> None:
    from dyn_actor.kv import cuda_ipc

    for row_bytes in (2 << 20, 64 << 10, 16 << 10, 4098, 4099):  # 2 MiB and 64 KiB blocks, odd widths
        pool = torch.zeros(2, row_bytes, dtype=torch.uint8)
        ids = torch.zeros(2, dtype=torch.long)
        cuda_ipc.move_blocks(pool, pool.clone(), ids, ids)
        cuda_ipc.scatter_blocks(pool, pool.clone(), ids)


def drive_moe() -> None:
    """The grouped-experts kernel: each dtype, decode-sized and prefill-sized steps (tiles of 16 and 64
    rows), both projections. The constexprs depend on the widths only through the tile sizes, which
    any width of 64 or more gives, so small widths stand in for the real ones."""
    from dyn_actor.engine import triton_moe

    for dt in DTYPES:
        for experts, top_k in MOE_SHAPES:
            for t in (1, 64, 512):
                h = torch.zeros(t, 128, dtype=dt)
                w13, w2 = torch.zeros(experts, 128, 128, dtype=dt), torch.zeros(experts, 128, 64, dtype=dt)
                ids = torch.zeros(t, top_k, dtype=torch.long)
                triton_moe.fused_experts(h, w13, w2, torch.zeros(t, top_k, dtype=dt), ids,
                                         lambda gu: gu[:, : gu.shape[1] // 2].contiguous())


DRIVERS = [drive_ops, drive_attention, drive_gemma, drive_sampling, drive_kv_moves, drive_moe]


# ------------------------------------------------------------------------------ compiling
def ptxas_info(ptx: str, arch: int) -> dict:
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(arch)  # the one triton compiled with (it may not be the wheel's plain ptxas)
    ptxas = getattr(ptxas, "path", ptxas)
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        out = subprocess.run([str(ptxas), f"-arch=sm_{arch}a", "-v", "-o", os.devnull, f.name],
                             capture_output=True, text=True).stderr
    regs = re.search(r"Used (\d+) registers", out)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", out)
    return {"registers": int(regs.group(1)) if regs else None,
            "spill_stores": int(spill.group(1)) if spill else None,
            "spill_loads": int(spill.group(2)) if spill else None}


def compile_one(launch: Launch, arch: int, info: bool) -> dict:
    t0 = time.perf_counter()
    row = {"kernel": launch.fn.__name__, "launch": launch.describe(), "driver": launch.where}
    try:
        src = ASTSource(fn=launch.fn, signature=launch.signature, constexprs=launch.constexprs)
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=launch.options)
        row["ok"] = True
        row["shared_bytes"] = compiled.metadata.shared
        if info:
            row.update(ptxas_info(compiled.asm["ptx"], arch))
    except Exception as e:  # noqa: BLE001  (every failure is reported, the run goes on)
        row["ok"] = False
        row["error"] = f"{type(e).__name__}: {e}"[-2000:]
    row["seconds"] = round(time.perf_counter() - t0, 2)
    return row


_TODO: tuple = ()


def _compile_index(i: int) -> dict:
    todo, arch, info = _TODO
    return compile_one(todo[i], arch, info)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability as a number: 90 (H100/H200), 80 (A100)")
    ap.add_argument("--ptxas-info", action="store_true", help="also report registers and spills (runs ptxas again)")
    ap.add_argument("--only", default="", help="comma-separated substrings of kernel names to compile")
    ap.add_argument("--quick", action="store_true", help="fewer shapes and dtypes (for the test suite)")
    ap.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1),
                    help="compile in this many forked processes (default: the cores, at most 4)")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args()
    if args.quick:
        quick()
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    launches: dict[tuple, Launch] = {}
    for drive in DRIVERS:
        for launch in record(drive):
            launches.setdefault(launch.key, launch)
    only = [s for s in args.only.split(",") if s]
    todo = [la for la in launches.values() if not only or any(s in la.fn.__name__ for s in only)]
    rows = []
    jobs = max(1, min(args.jobs, len(todo)))
    if jobs > 1:  # forked workers inherit the recorded launches; each compiles the ones it is given by index
        global _TODO
        _TODO = (todo, args.arch, args.ptxas_info)
        pool = multiprocessing.get_context("fork").Pool(jobs)
        results = pool.imap(_compile_index, range(len(todo)))
    else:
        pool, results = None, (compile_one(la, args.arch, args.ptxas_info) for la in todo)
    for row in results:
        rows.append(row)
        status = "ok " if row["ok"] else "FAIL"
        extra = ""
        if row.get("registers") is not None:
            extra = f" regs {row['registers']} spills {row['spill_stores']}/{row['spill_loads']}"
        print(f"{status} {row['seconds']:5.1f}s {row['launch']}{extra}", flush=True)
        if not row["ok"]:
            print("     " + row["error"].strip().replace("\n", "\n     "), flush=True)
    if pool is not None:
        pool.close()
        pool.join()
    failed = [r for r in rows if not r["ok"]]
    print(f"\n{len(rows) - len(failed)} of {len(rows)} distinct launches compile for sm_{args.arch} "
          f"(triton {triton.__version__})")
    missed = set() if only else KERNELS - {la.fn.__name__ for la in launches.values()}
    if missed:
        print("never launched by the drivers: " + ", ".join(sorted(missed)))
    if args.json:
        Path(args.json).write_text(json.dumps({"arch": args.arch, "triton": triton.__version__, "rows": rows},
                                              indent=1))
    return 1 if failed or missed else 0


if __name__ == "__main__":
    sys.exit(main())
