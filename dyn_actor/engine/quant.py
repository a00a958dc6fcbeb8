"""4-bit weight-only checkpoints: GPTQ and AWQ, as their ``quantization_config`` describes them.

Each quantized projection of such a checkpoint stores its weight ``[out, in]`` as 4-bit integers ``q``
(0..15) with a scale ``s`` and a zero point ``z`` per group of ``group_size`` inputs of each output row:
``w = (q - z) * s``. The two formats pack them differently:

- GPTQ (AutoGPTQ, GPTQModel; ``checkpoint_format`` ``gptq``): ``qweight`` int32 ``[in / 8, out]``,
  eight inputs to a word, the first in the low bits; ``qzeros`` int32 ``[groups, out / 8]``, eight
  outputs to a word, each zero stored minus one (``gptq_v2``: as it is); ``scales`` ``[groups, out]``;
  ``g_idx`` ``[in]``, the group of each input. With ``desc_act`` (activation order) the groups are not
  runs of consecutive inputs: the inputs are then reordered here so that they are, and each step's
  activations are reordered the same way (``QuantWeight.perm``).
- AWQ (AutoAWQ, ``version`` ``gemm``): ``qweight`` int32 ``[in, out / 8]``, eight outputs to a word in
  the order 0, 2, 4, 6, 1, 3, 5, 7; ``qzeros`` ``[groups, out / 8]`` packed the same way; ``scales``
  ``[groups, out]``.

Both become one layout of ours (``QuantWeight``): ``q`` two to a byte ``[out, in / 2]``, by chunks of 64
inputs (byte ``k`` of a chunk holds input ``k`` in its low nibble and ``32 + k`` in its high one: what
the kernel widens in two operations), and float32 ``s`` and ``zs = z * s`` ``[out, groups]``, so
``w = q * s - zs``. On the CPU a decode step's few rows go
through ``linear_w4`` (C, ``native_ops``), which reads the 4-bit weights as they are; a step of many
rows dequantizes the weight for one GEMM (``dequant_w4``). On a GPU the weights are dequantized once,
at load, into the model's dtype (no 4-bit kernel there yet: the checkpoint is served, without its
memory saving).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from dyn_actor.engine.model_config import ModelLoadError, quantization_section

_AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble j of an AWQ word holds output column _AWQ_ORDER[j]


@dataclass(frozen=True)
class QuantConfig:
    method: str  # "gptq" or "awq"
    bits: int
    group_size: int  # -1: one group over the whole input
    desc_act: bool
    zeros_minus_one: bool  # GPTQ's v1 format stores each zero point minus one


def quant_config(folder: Path | None, hf: dict) -> QuantConfig | None:
    """The checkpoint's quantization (config.json's ``quantization_config``, or an older GPTQ
    export's ``quantize_config.json``); None for an unquantized one. ``ModelLoadError`` for a method
    or variant this engine does not run, naming what it does."""
    q = quantization_section(folder, hf)
    if q is None:
        return None
    method = str(q.get("quant_method", "")).lower()
    bits = q.get("bits", q.get("w_bit"))
    group = q.get("group_size", q.get("q_group_size", -1))
    if method not in ("gptq", "awq"):
        raise ModelLoadError(f"quantization {method or '(no quant_method)'!r} is not supported: the native engine "
                             "runs 4-bit GPTQ and AWQ checkpoints (or serve it with --engine vllm)")
    if bits != 4:
        raise ModelLoadError(f"{method} with {bits} bits is not supported: the native engine runs 4-bit weights")
    if not isinstance(group, int) or (group != -1 and (group < 32 or group % 32)):
        raise ModelLoadError(f"{method} group_size {group!r} is not supported: -1 or a multiple of 32")
    if method == "awq":
        version = str(q.get("version", "gemm")).lower()
        if version != "gemm":
            raise ModelLoadError(f"AWQ version {version!r} is not supported: the native engine reads 'gemm' exports")
        if q.get("zero_point", True) is False:
            raise ModelLoadError("AWQ without zero points is not supported")
        return QuantConfig("awq", 4, group, False, False)
    fmt = str(q.get("checkpoint_format", "gptq")).lower()
    if fmt not in ("gptq", "gptq_v2"):
        raise ModelLoadError(f"GPTQ checkpoint_format {fmt!r} is not supported: 'gptq' or 'gptq_v2'")
    return QuantConfig("gptq", 4, group, bool(q.get("desc_act", False)), fmt == "gptq")


class QuantWeight:
    """A 4-bit weight ``[out, in]`` in our layout (module docstring): ``q`` uint8 ``[out, in / 2]``, ``s`` and
    ``zs`` float32 ``[out, groups]``; ``perm``: the order in which the activations' columns meet ``q``'s
    (activation-order GPTQ), or None. Row operations (``cat``, ``rows``, ``split``) are what a model
    does to its weights when it fuses or reorders projections."""

    __slots__ = ("q", "s", "zs", "perm", "group_size", "in_features", "dtype")

    def __init__(self, q: torch.Tensor, s: torch.Tensor, zs: torch.Tensor, perm: torch.Tensor | None,
                 group_size: int, in_features: int, dtype: torch.dtype = torch.float32) -> None:
        self.q, self.s, self.zs, self.perm = q, s, zs, perm
        self.group_size, self.in_features, self.dtype = group_size, in_features, dtype

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.q.shape[0], self.in_features))

    @property
    def device(self) -> torch.device:
        return self.q.device

    def _like(self, q: torch.Tensor, s: torch.Tensor, zs: torch.Tensor) -> QuantWeight:
        return QuantWeight(q.contiguous(), s.contiguous(), zs.contiguous(), self.perm, self.group_size,
                           self.in_features, self.dtype)

    def rows(self, index: torch.Tensor) -> QuantWeight:
        return self._like(self.q[index], self.s[index], self.zs[index])

    def split(self, sizes: list[int]) -> list[QuantWeight]:
        return [self._like(q, s, z) for q, s, z in zip(self.q.split(sizes), self.s.split(sizes), self.zs.split(sizes))]

    @staticmethod
    def cat(parts: list[QuantWeight]) -> QuantWeight:
        """The projections of one input stacked (q, k, v; gate, up): they must read it alike."""
        a = parts[0]
        for b in parts[1:]:
            if b.group_size != a.group_size or b.in_features != a.in_features:
                raise ModelLoadError("fused projections are quantized with different group sizes")
            if (a.perm is None) != (b.perm is None) or (a.perm is not None and not torch.equal(a.perm, b.perm)):
                raise ModelLoadError("fused projections have different activation orders (g_idx); not supported")
        return a._like(torch.cat([p.q for p in parts]), torch.cat([p.s for p in parts]),
                       torch.cat([p.zs for p in parts]))

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight ``[out, in]`` as a dense tensor, in the activations' input order."""
        q = unpack(self.q).float()
        g = self.s.shape[1]
        w = (q.view(q.shape[0], g, -1) * self.s[:, :, None] - self.zs[:, :, None]).view(q.shape[0], -1)
        if self.perm is not None:  # back to the checkpoint's input order
            w = torch.empty_like(w).index_copy_(1, self.perm, w)
        return w.to(dtype or self.dtype)


def pack(q: torch.Tensor) -> torch.Tensor:
    """4-bit values ``[out, in]`` (0..15) in our layout: uint8 ``[out, in / 2]`` by chunks of 64 inputs."""
    c = q.to(torch.uint8).reshape(q.shape[0], -1, 2, 32)
    return (c[:, :, 0] | (c[:, :, 1] << 4)).reshape(q.shape[0], -1).contiguous()


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """``pack``'s inverse: uint8 ``[out, in]``."""
    c = packed.reshape(packed.shape[0], -1, 32)
    return torch.stack((c & 15, c >> 4), dim=2).reshape(packed.shape[0], -1)


def _unpack_rows(words: torch.Tensor) -> torch.Tensor:
    """int32 ``[r, c]`` -> its eight nibbles per word along a new dim: uint8 ``[r, c, 8]`` (low bits first)."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    return ((words.to(torch.int32)[..., None] >> shifts) & 15).to(torch.uint8)


def from_checkpoint(qc: QuantConfig, name: str, t: dict[str, torch.Tensor]) -> QuantWeight:
    """One projection's tensors (``qweight``, ``qzeros``, ``scales``, and GPTQ's ``g_idx``) as ours."""
    try:
        qweight, qzeros, scales = t["qweight"], t["qzeros"], t["scales"].float()
    except KeyError as e:
        raise ModelLoadError(f"{name}: quantized projection lacks tensor {e.args[0]!r}") from None
    if qc.method == "gptq":
        q = _unpack_rows(qweight).permute(0, 2, 1).reshape(-1, qweight.shape[1]).t()  # [out, in]
        z = _unpack_rows(qzeros).reshape(qzeros.shape[0], -1).float()  # [groups, out]
        if qc.zeros_minus_one:
            z = z + 1
    else:
        order = torch.tensor(_AWQ_ORDER)
        inv = torch.empty_like(order).index_copy_(0, order, torch.arange(8))  # column c sits in nibble inv[c]
        q = _unpack_rows(qweight)[:, :, inv].reshape(qweight.shape[0], -1).t()  # [out, in]
        z = _unpack_rows(qzeros)[:, :, inv].reshape(qzeros.shape[0], -1).float()
    out, n_in = q.shape
    gs = n_in if qc.group_size == -1 else qc.group_size
    if n_in % gs or n_in % 64:
        raise ModelLoadError(f"{name}: {n_in} inputs do not split into groups of {gs} (and chunks of 64)")
    groups = n_in // gs
    if tuple(scales.shape) != (groups, out) or tuple(z.shape) != (groups, out):
        raise ModelLoadError(f"{name}: scales {tuple(scales.shape)} / zeros {tuple(z.shape)} do not fit "
                             f"{groups} groups of {out} outputs")
    perm = None
    g_idx = t.get("g_idx")
    if g_idx is not None and qc.method == "gptq":
        g_idx = g_idx.to(torch.int64)
        plain = torch.arange(n_in) // gs
        if not torch.equal(g_idx, plain):
            perm = torch.argsort(g_idx, stable=True)
            if not torch.equal(g_idx[perm], plain):
                raise ModelLoadError(f"{name}: g_idx does not give every group {gs} inputs")
            q = q[:, perm]
    packed = pack(q)
    s = scales.t().contiguous()
    zs = (z.t() * s).contiguous()
    return QuantWeight(packed, s, zs, perm, gs, n_in)


def convert_weights(qc: QuantConfig, weights: dict[str, torch.Tensor]) -> dict:
    """The checkpoint's tensors with each quantized projection's ``qweight``/``qzeros``/``scales``/``g_idx``
    replaced by one ``<projection>.weight``, a ``QuantWeight``."""
    out: dict = {}
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in weights.items():
        base, _, leaf = k.rpartition(".")
        if leaf in ("qweight", "qzeros", "scales", "g_idx"):
            groups.setdefault(base, {})[leaf] = v
        else:
            out[k] = v
    if not groups:
        raise ModelLoadError(f"the config says {qc.method} but the checkpoint holds no quantized tensors (qweight)")
    for base, t in groups.items():
        if "qweight" not in t:
            raise ModelLoadError(f"{base}: {', '.join(sorted(t))} without a qweight")
        if "expert" in base or "block_sparse_moe" in base:
            raise ModelLoadError("quantized mixture-of-experts layers are not supported by the native engine")
        out[base + ".weight"] = from_checkpoint(qc, base, t)
    return out


class QuantLinear:
    """The product with a ``QuantWeight`` on the CPU: ``linear_w4`` for up to ``W4_MAX_ROWS`` rows, else the
    weight dequantized for one GEMM (C when the library is built, else PyTorch)."""

    __slots__ = ("w", "bias", "lib", "vector")

    def __init__(self, w: QuantWeight, bias: torch.Tensor | None, lib) -> None:
        self.w = w
        self.bias = None if bias is None else bias.float().contiguous()
        self.lib = lib
        self.vector = lib is not None and bool(lib.linear_w4_vectorized())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        w = self.w
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        m = x2.shape[0]
        if self.vector and m <= W4_MAX_ROWS and x.dtype in (torch.float32, torch.bfloat16):
            if w.perm is not None:
                x2 = x2.index_select(1, w.perm)
            elif x2.stride(1) != 1:
                x2 = x2.contiguous()
            y = torch.empty((m, w.q.shape[0]), dtype=x.dtype)
            xsum = torch.empty((m, w.s.shape[1]), dtype=torch.float32)
            self.lib.linear_w4(x2.data_ptr(), x2.stride(0), int(x.dtype == torch.bfloat16), xsum.data_ptr(),
                               w.q.data_ptr(), w.s.data_ptr(), w.zs.data_ptr(),
                               None if self.bias is None else self.bias.data_ptr(), y.data_ptr(), y.stride(0), m,
                               w.q.shape[0], w.in_features, w.group_size, torch.get_num_threads())
            return y.view(*shape[:-1], -1)
        b = None if self.bias is None else self.bias.to(x.dtype)
        if self.lib is None or x.dtype not in (torch.float32, torch.bfloat16):
            return torch.nn.functional.linear(x, w.dequantize(x.dtype), b)
        dense = _scratch(w.q.shape[0] * w.in_features, x.dtype).view(w.q.shape[0], w.in_features)  # q's order
        self.lib.dequant_w4(w.q.data_ptr(), w.s.data_ptr(), w.zs.data_ptr(), dense.data_ptr(),
                            int(x.dtype == torch.bfloat16), w.q.shape[0], w.in_features, w.group_size,
                            torch.get_num_threads())
        if w.perm is not None:
            x = x.index_select(-1, w.perm)
        return torch.nn.functional.linear(x, dense, b)


#: the most rows ``linear_w4`` takes; a step of more dequantizes the weight for one GEMM (measured on a
#: 2-vCPU AVX-512 host: the kernel is 1.5-2.5x as fast as bfloat16's GEMM up to 8 rows, even at 16, and
#: half as fast from 32)
W4_MAX_ROWS = 16

_scratches: dict[torch.dtype, torch.Tensor] = {}


def _scratch(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A buffer of at least ``numel`` elements for a dequantized weight, kept for the next call (a fresh
    one of tens of MB would be faulted in page by page, each step: slower than the dequantizing).
    The largest projection's size, once per process; a model's forward runs on one thread."""
    buf = _scratches.get(dtype)
    if buf is None or buf.numel() < numel:
        buf = _scratches[dtype] = torch.empty(numel, dtype=dtype)
    return buf[:numel]
