"""Optional C kernels for the CPU, compiled on first use with the system C compiler.

``paged_decode_attention`` reads K/V in place from the paged pool instead of
gathering them into a contiguous copy first (that copy, then attention over
it, is what the pure-PyTorch path does; it moves ~3x the bytes). When no
compiler is available, or ``DYN_ACTOR_NATIVE_OPS=0``, the engine uses the
PyTorch path; both are tested against each other.

The shared library is cached under ``$XDG_CACHE_HOME/dyn_actor`` (or
``~/.cache/dyn_actor``) keyed by the source's hash, so it is built once per
machine. It links OpenMP by soname, so it shares the ``libgomp`` that torch
already loaded (one thread pool, no oversubscription).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)
_SRC = Path(__file__).with_name("csrc") / "paged_attention.c"
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dyn_actor"


def _build() -> ctypes.CDLL | None:
    src = _SRC.read_bytes()
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        log.warning("no C compiler found: using the PyTorch attention path")
        return None
    flags = ["-O3", "-march=native", "-fPIC", "-shared", "-fopenmp", "-ffp-contract=fast", "-fno-math-errno",
             "-fno-trapping-math"]
    key = hashlib.sha256(src + " ".join(flags).encode()).hexdigest()[:16]
    out = _cache_dir() / f"paged_attention-{key}.so"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
            tmp_out = Path(tmp) / out.name
            proc = subprocess.run([cc, *flags, str(_SRC), "-o", str(tmp_out), "-lm"], capture_output=True, text=True)
            if proc.returncode != 0:
                log.warning("building the C attention kernel failed, using PyTorch: %s", proc.stderr.strip()[:500])
                return None
            os.replace(tmp_out, out)  # atomic: concurrent builders do not see a partial file
    lib = ctypes.CDLL(str(out))
    i64, p, f32, cint = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float, ctypes.c_int
    for name in ("paged_decode_attention_f32", "paged_decode_attention_bf16"):
        fn = getattr(lib, name)
        fn.argtypes = [p, i64, p, p, i64, p, i64, p, p, i64, i64, i64, i64, i64, f32, i64, f32, cint]
        fn.restype = None
    for name in ("scatter_blocks", "gather_blocks"):
        fn = getattr(lib, name)
        fn.argtypes = [p, p, p, i64, i64, cint]
        fn.restype = None
    lib.move_blocks.argtypes = [p, p, p, p, i64, i64, cint]
    lib.move_blocks.restype = None
    lib.add_rms_norm_f32.argtypes = [p, i64, p, i64, p, p, i64, i64, i64, f32, cint]
    lib.rope_inplace_f32.argtypes = [p, i64, p, p, i64, p, i64, i64, i64, cint]
    lib.silu_mul_f32.argtypes = [p, i64, p, i64, i64, i64, cint]
    for fn in (lib.add_rms_norm_f32, lib.rope_inplace_f32, lib.silu_mul_f32):
        fn.restype = None
    lib.linear_bf16_available.argtypes = []
    lib.linear_bf16_available.restype = cint
    lib.linear_bf16.argtypes = [p, i64, p, p, p, i64, i64, i64, i64, cint]
    lib.linear_bf16.restype = None
    lib.linear_w4_vectorized.argtypes = []
    lib.linear_w4_vectorized.restype = cint
    lib.linear_w4.argtypes = [p, i64, cint, p, p, p, p, p, p, i64, i64, i64, i64, i64, cint]
    lib.linear_w4.restype = None
    lib.dequant_w4.argtypes = [p, p, p, p, cint, i64, i64, i64, cint]
    lib.dequant_w4.restype = None
    return lib


def native_lib() -> ctypes.CDLL | None:
    global _lib, _tried
    if _tried:
        return _lib
    with _lock:
        if not _tried:
            if os.environ.get("DYN_ACTOR_NATIVE_OPS", "1") != "0":
                try:
                    _lib = _build()
                except OSError as e:
                    log.warning("loading the C attention kernel failed, using PyTorch: %s", e)
                    _lib = None
            _tried = True
    return _lib


def paged_decode_attention(
    lib: ctypes.CDLL,
    q: torch.Tensor,  # [num_seqs, nh, d], rows may be strided, heads and dims contiguous
    k_layer: torch.Tensor,  # [num_blocks, block_size, nkv, d] strided view of the pool
    v_layer: torch.Tensor,
    table: torch.Tensor,  # [num_seqs, max_blocks] int64, contiguous
    ctx: torch.Tensor,  # [num_seqs] int64
    scale: float,
    window: int = 0,  # > 0: a sliding window, only the last ``window`` positions of each context
    softcap: float = 0.0,  # > 0: scores capped to softcap * tanh(score / softcap) (Gemma 2)
) -> torch.Tensor:
    n, nh, d = q.shape
    nb, bs, nkv, _ = k_layer.shape
    assert q.stride(2) == 1 and q.stride(1) == d and k_layer.stride(1) == nkv * d and k_layer.stride(3) == 1
    assert table.is_contiguous() and ctx.is_contiguous() and table.dtype == torch.int64
    out = torch.empty((n, nh, d), dtype=q.dtype)
    fn = lib.paged_decode_attention_f32 if q.dtype == torch.float32 else lib.paged_decode_attention_bf16
    fn(
        q.data_ptr(), q.stride(0), k_layer.data_ptr(), v_layer.data_ptr(), k_layer.stride(0),
        table.data_ptr(), table.shape[1], ctx.data_ptr(), out.data_ptr(),
        n, nh, nkv, d, bs, scale, window, softcap, torch.get_num_threads(),
    )
    return out


def copy_blocks(dst: torch.Tensor, src: torch.Tensor, ids: list[int], scatter: bool) -> None:
    """``dst[ids[i]] = src[i]`` (scatter) or ``dst[i] = src[ids[i]]`` (gather), whole blocks along dim 0.

    Both tensors are contiguous CPU tensors of one dtype whose dim-0 slices are blocks.
    One call: parallel memcpy per block in C, or a loop of block copies without it.
    """
    if not ids:
        return
    lib = native_lib()
    if lib is not None:
        idx = torch.as_tensor(ids, dtype=torch.int64)
        block_bytes = src[0].numel() * src.element_size()
        fn = lib.scatter_blocks if scatter else lib.gather_blocks
        fn(dst.data_ptr(), src.data_ptr(), idx.data_ptr(), len(ids), block_bytes, torch.get_num_threads())
        return
    if scatter:
        for i, b in enumerate(ids):
            dst[b].copy_(src[i])
    else:
        for i, b in enumerate(ids):
            dst[i].copy_(src[b])


def move_blocks(dst: torch.Tensor, src: torch.Tensor, dst_ids: list[int], src_ids: list[int]) -> None:
    """``dst[dst_ids[i]] = src[src_ids[i]]``, whole blocks along dim 0 of two contiguous CPU tensors of
    one dtype and block shape: straight from one pool into another, no staging copy."""
    if len(dst_ids) != len(src_ids):
        raise ValueError(f"{len(dst_ids)} destination blocks for {len(src_ids)} source blocks")
    if not dst_ids:
        return
    lib = native_lib()
    if lib is not None:
        di = torch.as_tensor(dst_ids, dtype=torch.int64)
        si = torch.as_tensor(src_ids, dtype=torch.int64)
        block_bytes = src[0].numel() * src.element_size()
        lib.move_blocks(dst.data_ptr(), src.data_ptr(), di.data_ptr(), si.data_ptr(), len(dst_ids), block_bytes,
                        torch.get_num_threads())
        return
    for d, s in zip(dst_ids, src_ids):
        dst[d].copy_(src[s])


class CpuFusedOps:
    """The elementwise work of a layer in one C pass each (float32 on the CPU): the same functions
    as ``engine.triton_ops`` offers the GPU path, except that RoPE works in place and leaves the
    KV write to the caller (the CPU attention reads the fresh keys and values from ``qkv``)."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self.lib = lib

    def add_rms_norm(self, x: torch.Tensor, dx: torch.Tensor | None, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """``x += dx`` in place (when ``dx`` is given), then return ``rms_norm(x) * weight``."""
        t, n = x.shape
        assert x.stride(1) == 1 and weight.is_contiguous() and (dx is None or dx.stride(1) == 1)
        h = torch.empty((t, n), dtype=x.dtype)
        self.lib.add_rms_norm_f32(x.data_ptr(), x.stride(0), None if dx is None else dx.data_ptr(),
                                  0 if dx is None else dx.stride(0), weight.data_ptr(), h.data_ptr(), h.stride(0),
                                  t, n, eps, torch.get_num_threads())
        return h

    def rope_(self, qkv: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor, positions: torch.Tensor,
              heads: int, head_dim: int) -> None:
        """RoPE in place on the first ``heads`` heads of each row of ``qkv`` (queries, then keys)."""
        assert qkv.stride(1) == 1 and cos.stride(1) == 1 and positions.dtype == torch.int64
        pos = positions.contiguous()
        self.lib.rope_inplace_f32(qkv.data_ptr(), qkv.stride(0), cos.data_ptr(), sin_signed.data_ptr(), cos.stride(0),
                                  pos.data_ptr(), qkv.shape[0], heads, head_dim, torch.get_num_threads())

    def silu_mul(self, gu: torch.Tensor) -> torch.Tensor:
        """``silu(gu[:, :I]) * gu[:, I:]``."""
        t, n = gu.shape
        assert gu.stride(1) == 1
        out = torch.empty((t, n // 2), dtype=gu.dtype)
        self.lib.silu_mul_f32(gu.data_ptr(), gu.stride(0), out.data_ptr(), out.stride(0), t, n // 2,
                              torch.get_num_threads())
        return out


#: glibc mallopt parameters
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_heap_kept = False


#: the most rows ``linear_bf16`` takes (a decode step of a few sequences; more go to oneDNN's GEMM)
LINEAR_BF16_MAX_ROWS = 4


def linear_bf16_lib() -> ctypes.CDLL | None:
    """The C library when its ``linear_bf16`` runs here (built for a CPU with AVX-512 BF16), unless
    ``DYN_ACTOR_LINEAR_BF16=0`` keeps torch's (oneDNN) for every bfloat16 linear map."""
    if os.environ.get("DYN_ACTOR_LINEAR_BF16", "1") == "0":
        return None
    lib = native_lib()
    return lib if lib is not None and lib.linear_bf16_available() else None


def linear_bf16(lib: ctypes.CDLL, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None,
                nthreads: int) -> torch.Tensor:
    """``F.linear(x, w, b)`` for bfloat16 ``x`` of at most ``LINEAR_BF16_MAX_ROWS`` rows (last dimension
    contiguous) and a contiguous ``w`` ``[O, I]``, by the C kernel (``lib.linear_bf16_available()``)."""
    import torch

    m, i = x.shape
    o = w.shape[0]
    y = torch.empty((m, o), dtype=torch.bfloat16)
    lib.linear_bf16(x.data_ptr(), x.stride(0), w.data_ptr(), None if b is None else b.data_ptr(), y.data_ptr(), o,
                    m, o, i, nthreads)
    return y


def keep_freed_heap(mmap_below: int = 32 << 20, keep: int = 1 << 30) -> bool:
    """glibc only: serve allocations under ``mmap_below`` bytes from the heap and keep up to ``keep``
    freed bytes there instead of giving them back to the kernel.

    A CPU forward allocates its activations afresh each step (MBs each); with glibc's defaults
    many of them come from a fresh ``mmap`` and are faulted in and zeroed page by page, every
    step: 1,000-5,000 page faults for an 8 x 128-token prefill of the built-in model here. Kept on the
    heap they are reused (a few faults a step). The process keeps its peak step's working set,
    as a caching allocator would. ``DYN_ACTOR_KEEP_HEAP=0`` leaves glibc's defaults. Once per
    process; returns whether it took effect."""
    global _heap_kept
    if _heap_kept:
        return True
    if os.environ.get("DYN_ACTOR_KEEP_HEAP", "1") == "0":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    _heap_kept = bool(mallopt(_M_MMAP_THRESHOLD, mmap_below)) and bool(mallopt(_M_TRIM_THRESHOLD, keep))
    return _heap_kept
