"""Llama-family forward pass (Llama 2/3, Mistral, Qwen2, Qwen3, TinyLlama, SmolLM, their mixtures of
experts, Gemma 3's text model) over a paged KV pool.

Plain tensors, no ``nn.Module``: the engine feeds one flat batch of tokens
per step (decode tokens first, then prefill chunks) and gets logits back for
the rows that sample.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from dyn_actor.engine.lora import LoraAdapter, LoraRows
from dyn_actor.engine.model_config import ModelConfig, ModelLoadError
from dyn_actor.engine.moe import load_sparse_moe, silu_mul_torch
from dyn_actor.engine.quant import QuantLinear, QuantWeight
from dyn_actor.kv.pool import KvPool
from dyn_actor.native_ops import (
    LINEAR_BF16_MAX_ROWS,
    CpuFusedOps,
    linear_bf16,
    linear_bf16_lib,
    native_lib,
    paged_decode_attention,
)


@dataclass
class PrefillSeq:
    """A run of ``length`` new tokens of one sequence, after ``context_len`` tokens already in the pool."""

    start: int
    length: int
    context_len: int
    block_ids: torch.Tensor  # blocks covering context_len + length tokens
    mask: torch.Tensor | None  # [length, context_len + length] bool, None when context_len == 0


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    slot_blocks: torch.Tensor  # [T] block id of each token's KV
    slot_offsets: torch.Tensor  # [T] offset inside that block
    num_decode: int  # rows [0, num_decode) are one token each, attending over their whole context
    decode_block_table: torch.Tensor | None  # [num_decode, max_blocks] block ids (padded with 0)
    decode_ctx_lens: torch.Tensor | None  # [num_decode] context length including the new token
    decode_mask: torch.Tensor | None  # [num_decode, 1, 1, max_blocks * block_size] additive; PyTorch path only
    prefills: list[PrefillSeq]
    logits_indices: torch.Tensor  # [S] rows whose logits are returned
    prefill_meta: PrefillMeta | None = None  # the prefills as tensors, for the Triton kernel
    # the PyTorch attention path's sliding-window masks, made once a step: (kind, index, window) -> mask
    window_masks: dict = field(default_factory=dict)


@dataclass
class PrefillMeta:
    block_tables: torch.Tensor  # [P, max_blocks]
    q_starts: torch.Tensor  # [P] first row of each prefill, counted from the first prefill row
    q_lens: torch.Tensor  # [P]
    ctx_lens: torch.Tensor  # [P] tokens already in the pool before the chunk
    max_q_len: int


#: padding allowed when prompts share one attention call: the group's padded work (count x longest^2)
#: stays within this factor of the work of the prompts alone (sum of length^2)
FRESH_PAD_FACTOR = 1.25


def fresh_prompt_groups(prefills: list[PrefillSeq]) -> list[list[PrefillSeq]]:
    """The prefills with nothing cached, grouped by length for batched attention: sorted by length,
    a group grows while padding its members to its longest keeps within ``FRESH_PAD_FACTOR``."""
    fresh = sorted((p for p in prefills if p.context_len == 0), key=lambda p: p.length)
    groups: list[list[PrefillSeq]] = []
    work = 0
    for p in fresh:
        if groups and (len(groups[-1]) + 1) * p.length**2 <= FRESH_PAD_FACTOR * (work + p.length**2):
            groups[-1].append(p)
            work += p.length**2
        else:
            groups.append([p])
            work = p.length**2
    return groups


def d_half(cfg: ModelConfig) -> int:
    return cfg.head_dim // 2


def rotary_order(cfg: ModelConfig) -> torch.Tensor:
    """Partial rotary (RoPE on the first ``r`` of ``d`` head dimensions, pairing ``i`` with ``i + r/2``):
    the head dimensions reordered so that every kernel's whole-head RoPE (pairing ``j`` with ``j + d/2``)
    does it. New position ``j`` takes old dimension ``order[j]``: the rotated pairs at ``j < r/2`` and
    ``j + d/2``, the unrotated dimensions between, turning at frequency 0 (cos 1, sin 0). Queries and keys
    are reordered alike (their products do not change); values are not."""
    r, d = cfg.rotated, cfg.head_dim
    h, rest = r // 2, (d - r) // 2
    return torch.cat([torch.arange(0, h), torch.arange(r, r + rest), torch.arange(h, r), torch.arange(r + rest, d)])


def gelu_tanh_mul_torch(gu: torch.Tensor) -> torch.Tensor:
    """Gemma's MLP activation: ``gelu_tanh(gu[:, :I]) * gu[:, I:]``."""
    inter = gu.shape[-1] // 2
    return F.gelu(gu[:, :inter], approximate="tanh") * gu[:, inter:]


class _Layer:
    # ln1 / ln2: the norms before attention and before the MLP; post_attn / post_ff: Gemma's norms of the
    # attention's and the MLP's outputs (None elsewhere); window: a sliding window in tokens (0: none)
    __slots__ = ("ln1", "wqkv", "wo", "ln2", "wgu", "wdown", "qn", "kn", "moe", "post_attn", "post_ff", "window",
                 "cos", "sin")

    def linears(self) -> list[Linear]:
        """The projections that LoRA adapters can update (a sparse layer's experts are not among them)."""
        return [lin for lin in (self.wqkv, self.wo, self.wgu, self.wdown) if lin is not None]


class Linear:
    """``y = x @ W.T + b``; float32 weights are also pre-packed for MKL's sgemm when torch has it
    (about 20% faster for the small batches of decode steps)."""

    __slots__ = ("weight", "bias", "packed", "lora", "rows", "stacked", "bf16", "quant")

    def __init__(self, weight: torch.Tensor | QuantWeight, bias: torch.Tensor | None, pack: bool,
                 rows: LoraRows | None = None) -> None:
        self.weight, self.bias, self.packed = weight, bias, None
        # a 4-bit weight (GPTQ, AWQ; on the CPU): its own product (engine/quant.py)
        self.quant = QuantLinear(weight, bias, native_lib() if pack else None) if isinstance(
            weight, QuantWeight) else None
        if self.quant is not None:
            weight = torch.empty(0, dtype=torch.uint8)  # for the checks below: no bf16 kernel, no packing
        # bfloat16 weights on the CPU: a decode step's few rows through the C kernel (native_ops.linear_bf16)
        self.bf16 = (linear_bf16_lib() if pack and weight.dtype == torch.bfloat16 and weight.is_contiguous()
                     and (bias is None or bias.dtype == torch.bfloat16) else None)
        # LoRA adapters of this projection, slot -> (A [r, in], B [out, r] scaled), and the step's
        # rows of each adapter (shared by every projection of the model)
        self.lora: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.rows = rows
        # every slot's A and B stacked for the dense form (``stack_adapters``): (A [S w, in], B [out, S w], w, S)
        self.stacked: tuple[torch.Tensor, torch.Tensor, int, int] | None = None
        if pack and weight.dtype == torch.float32:
            try:
                self.packed = torch.ops.mkl._mkl_reorder_linear_weight(weight, 64)
            except (AttributeError, RuntimeError):
                self.packed = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.quant is not None:
            y = self.quant(x)
        elif self.packed is not None:
            y = torch.ops.mkl._mkl_linear(x, self.packed, self.weight, self.bias, 64)
        elif self.bf16 is not None and x.dim() == 2 and x.shape[0] <= LINEAR_BF16_MAX_ROWS and x.stride(1) == 1 \
                and x.dtype == torch.bfloat16:
            y = linear_bf16(self.bf16, x, self.weight, self.bias, torch.get_num_threads())
        else:
            y = F.linear(x, self.weight, self.bias)
        if self.lora and self.rows.active:
            if self.rows.row_slot is not None:
                a, b, width, slots = self.stacked
                y.addmm_((x @ a.t()).mul_(self.rows.mask(width, slots, x.dtype)), b.t())
                return y
            for slot, rows in self.rows.groups:
                ab = self.lora.get(slot)
                if ab is None:
                    continue
                a, b = ab
                if isinstance(rows, slice):
                    y[rows].addmm_(x[rows] @ a.t(), b.t())
                else:
                    y.index_add_(0, rows, (x.index_select(0, rows) @ a.t()) @ b.t())
        return y


def _rows(w: torch.Tensor | QuantWeight, index: torch.Tensor) -> torch.Tensor | QuantWeight:
    """The rows ``index`` of a weight, dense or 4-bit."""
    return w.rows(index) if isinstance(w, QuantWeight) else w[index]


def _cat_rows(parts: list) -> torch.Tensor | QuantWeight:
    """Projections of one input stacked into one weight, dense or 4-bit (a checkpoint quantizes all or none)."""
    if any(isinstance(p, QuantWeight) for p in parts):
        if not all(isinstance(p, QuantWeight) for p in parts):
            raise ModelLoadError("a fused projection is quantized in part only")
        return QuantWeight.cat(parts)
    return torch.cat(parts).contiguous()


class LlamaModel:
    def __init__(
        self,
        cfg: ModelConfig,
        weights: dict[str, torch.Tensor],
        dtype: torch.dtype,
        max_len: int,
        native_ops: bool = True,
        device: torch.device | str = "cpu",
        attention: str = "native",
    ):
        self.cfg = cfg
        self.device = device = torch.device(device)
        self.attention = attention
        on_cpu = device.type == "cpu"
        self.native = None
        if attention == "native" and on_cpu and native_ops and dtype in (torch.float32, torch.bfloat16):
            self.native = native_lib()
        # float32 on the CPU: norms, RoPE and SiLU-mul in one C pass each (DYN_ACTOR_FUSED_OPS=0: PyTorch's)
        self.cpu_ops = (CpuFusedOps(self.native) if self.native is not None and dtype == torch.float32
                        and os.environ.get("DYN_ACTOR_FUSED_OPS", "1") != "0" else None)
        if attention == "triton":
            from dyn_actor.engine import triton_attention, triton_ops

            self.triton = triton_attention
            self.ops = triton_ops  # the fused norms, RoPE + KV write and SiLU-mul
        pack = on_cpu and native_ops and os.environ.get("DYN_ACTOR_MKL_PACK", "1") != "0"
        self.dtype = dtype
        self.scale = cfg.attention_scale
        self.softcap = cfg.attn_logit_softcapping or 0.0  # Gemma 2: attention scores capped by tanh
        self.gemma = cfg.is_gemma
        self.lora_rows = LoraRows()
        w = {k.removeprefix("model."): v for k, v in weights.items()}

        def take(name: str, required: bool = True) -> torch.Tensor | None:
            t = w.get(name)
            if t is None:
                if required:
                    raise ModelLoadError(f"checkpoint lacks tensor {name!r}")
                return None
            if isinstance(t, QuantWeight):  # 4-bit: kept so on the CPU, dequantized once on a GPU
                if device.type != "cpu":
                    return t.dequantize(dtype).to(device).contiguous()
                t.dtype = dtype
                return t
            return t.to(device=device, dtype=dtype).contiguous()

        def take_norm(name: str) -> torch.Tensor:
            """An RMSNorm weight; Gemma's as ``1 + w`` in float32 (its norms multiply before rounding)."""
            if not self.gemma:
                return take(name)
            t = w.get(name)
            if t is None:
                raise ModelLoadError(f"checkpoint lacks tensor {name!r}")
            return (1.0 + t.to(device=device, dtype=torch.float32)).contiguous()

        self.embed = take("embed_tokens.weight")
        # Gemma scales the embeddings by sqrt(hidden), that factor rounded to the dtype first
        self.embed_scale = (torch.tensor(cfg.hidden_size**0.5).to(dtype).to(device) if self.gemma else None)
        self.norm = take_norm("norm.weight")
        head = weights.get("lm_head.weight")
        if isinstance(head, QuantWeight):  # a quantized LM head (GPTQ's lm_head option): served dense
            head = head.dequantize(dtype)
        if head is None:
            if not cfg.tie_word_embeddings and "lm_head.weight" not in weights:
                # some exports omit it and still tie; accept, as transformers does
                pass
            self.lm_head = self.embed
        else:
            self.lm_head = head.to(device=device, dtype=dtype).contiguous()
        if tuple(self.embed.shape) != (cfg.vocab_size, cfg.hidden_size):
            raise ModelLoadError(
                f"embed_tokens has shape {tuple(self.embed.shape)}, config says ({cfg.vocab_size}, {cfg.hidden_size})"
            )
        self.layers: list[_Layer] = []
        for i in range(cfg.num_layers):
            p = f"layers.{i}."
            a = p + "self_attn."
            layer = _Layer()
            layer.ln1 = take_norm(p + "input_layernorm.weight")
            if self.gemma:
                layer.post_attn = take_norm(p + "post_attention_layernorm.weight")
                layer.ln2 = take_norm(p + "pre_feedforward_layernorm.weight")
                layer.post_ff = take_norm(p + "post_feedforward_layernorm.weight")
            else:
                layer.ln2 = take_norm(p + "post_attention_layernorm.weight")
                layer.post_attn = layer.post_ff = None
            layer.window = cfg.window(i)
            # Qwen3, Gemma 3: an RMSNorm over each query and key head before RoPE
            layer.qn = take_norm(a + "q_norm.weight") if cfg.qk_norm else None
            layer.kn = take_norm(a + "k_norm.weight") if cfg.qk_norm else None
            if cfg.rotary_dim and cfg.qk_norm:
                layer.qn, layer.kn = layer.qn[rotary_order(cfg).to(device)], layer.kn[rotary_order(cfg).to(device)]
            if a + "qkv_proj.weight" in w:  # Phi-3: the three projections stored as one
                wq, wk, wv = take(a + "qkv_proj.weight").split([cfg.q_size, cfg.kv_size, cfg.kv_size])  # type: ignore[union-attr]
            else:
                wq, wk, wv = take(a + "q_proj.weight"), take(a + "k_proj.weight"), take(a + "v_proj.weight")
            if cfg.rotary_dim:  # partial rotary: each query and key head's dimensions reordered (``rotary_order``)
                order = rotary_order(cfg).to(device)
                wq = _rows(wq, (torch.arange(cfg.num_heads, device=device)[:, None] * cfg.head_dim + order).view(-1))
                wk = _rows(wk, (torch.arange(cfg.num_kv_heads, device=device)[:, None] * cfg.head_dim + order).view(-1))
            wqkv = _cat_rows([wq, wk, wv])
            biases = [take(a + f"{n}_proj.bias", required=False) for n in "qkv"]
            if cfg.rotary_dim and any(b is not None for b in biases[:2]):
                raise ModelLoadError("query/key biases with a partial rotary factor are not supported")
            bqkv = None
            if any(b is not None for b in biases):
                if any(b is None for b in biases):
                    raise ModelLoadError(f"layer {i} has a bias on only some of q/k/v")
                bqkv = torch.cat(biases).contiguous()  # type: ignore[arg-type]
            rows = self.lora_rows
            layer.wqkv = Linear(wqkv, bqkv, pack, rows)
            layer.wo = Linear(take(a + "o_proj.weight"), take(a + "o_proj.bias", required=False), pack, rows)
            m = p + "mlp."
            layer.moe = layer.wgu = layer.wdown = None
            if i in cfg.moe_layers:
                layer.moe = load_sparse_moe(cfg, i, take, w.keys(), triton=attention == "triton", native=pack)
            else:
                gu = (take(m + "gate_up_proj.weight") if m + "gate_up_proj.weight" in w  # Phi-3: stored as one
                      else _cat_rows([take(m + "gate_proj.weight"), take(m + "up_proj.weight")]))
                layer.wgu = Linear(gu, None, pack, rows)
                layer.wdown = Linear(take(m + "down_proj.weight"), None, pack, rows)
                if take(m + "down_proj.bias", required=False) is not None:
                    raise ModelLoadError("MLP biases are not supported")
            self.layers.append(layer)
        self.lm_head_linear = Linear(self.lm_head, None, pack)
        self.pool_hidden = False  # a pooling runner's: ``forward`` returns final hidden states, not logits
        # a sequence classifier's head (labels x hidden), applied to the pooled state (engine/pooling.py)
        # (in float32, as vLLM keeps a pooling model's head)
        self.score = None
        if cfg.labels:
            if "score.weight" not in w:
                raise ModelLoadError("checkpoint lacks tensor 'score.weight' (a classifier's head)")
            self.score = w["score.weight"].to(device=device, dtype=torch.float32).contiguous()
        if self.score is not None and tuple(self.score.shape) != (len(cfg.labels), cfg.hidden_size):
            raise ModelLoadError(f"score.weight has shape {tuple(self.score.shape)}, the config says "
                                 f"({len(cfg.labels)}, {cfg.hidden_size}) (num_labels, hidden_size)")
        self.act_mul = gelu_tanh_mul_torch if cfg.hidden_act == "gelu_pytorch_tanh" else None
        self.cos, self.sin = self._rope_tables(cfg, max_len)
        # Gemma 3's sliding-window layers turn at their own RoPE base
        local = self._rope_tables(cfg.local(), max_len) if cfg.local_rope is not None else (self.cos, self.sin)
        for layer in self.layers:
            layer.cos, layer.sin = local if layer.window and cfg.local_rope is not None else (self.cos, self.sin)

    def _rope_tables(self, cfg: ModelConfig, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sign-folded sin tables ``[max_len, head_dim]`` of ``cfg``'s RoPE."""
        inv_freq = cfg.rope_inv_freq(long=cfg.uses_long_rope(max_len))
        pairs = inv_freq.shape[0]
        # YaRN and LongRoPE scale the tables, over the rotated pairs only
        scale = torch.full((d_half(cfg),), cfg.rope_attention_factor())
        if cfg.rotary_dim:  # partial rotary: the unrotated pairs turn at frequency 0, unscaled (``rotary_order``)
            inv_freq = torch.cat([inv_freq, inv_freq.new_zeros(d_half(cfg) - pairs)])
            scale[pairs:] = 1.0
        scale = torch.cat((scale, scale))
        pos = torch.arange(max_len, dtype=torch.float32)
        freqs = torch.outer(pos, inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * scale).to(device=self.device, dtype=self.dtype)
        # sin with the sign of rotate_half folded in: rope(x) = x*cos + roll(x, d/2)*sin_signed
        sin = emb.sin() * scale
        sin = torch.cat((-sin[:, : d_half(cfg)], sin[:, d_half(cfg) :]), dim=-1).to(device=self.device, dtype=self.dtype)
        return cos, sin

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        x = F.embedding(ids, self.embed)
        return x if self.embed_scale is None else x * self.embed_scale

    def add_adapter(self, slot: int, adapter: LoraAdapter) -> None:
        """Make LoRA ``adapter`` slot ``slot`` of every projection it updates (``lora.load_adapter``)."""
        for layer, fused in zip(self.layers, adapter.layers):
            for key, ab in fused.items():
                {"qkv": layer.wqkv, "o": layer.wo, "gu": layer.wgu, "down": layer.wdown}[key].lora[slot] = ab

    @property
    def has_adapters(self) -> bool:
        return any(lin.stacked is not None for layer in self.layers for lin in layer.linears())

    def stack_adapters(self, slots: int) -> None:
        """After ``add_adapter`` for slots 1..``slots``: each projection's adapters stacked for the dense
        form, every slot ``w`` columns wide (the widest of its fused rank; narrower ones zero-padded)."""
        for layer in self.layers:
            for lin in layer.linears():
                if not lin.lora:
                    continue
                width = max(a.shape[0] for a, _ in lin.lora.values())
                w = lin.weight
                a_all = torch.zeros((slots * width, w.shape[1]), dtype=w.dtype, device=w.device)
                b_all = torch.zeros((w.shape[0], slots * width), dtype=w.dtype, device=w.device)
                for slot, (a, b) in list(lin.lora.items()):
                    lo, hi = (slot - 1) * width, (slot - 1) * width + a.shape[0]
                    a_all[lo:hi] = a
                    b_all[:, lo:hi] = b
                    lin.lora[slot] = (a_all[lo:hi], b_all[:, lo:hi])  # the grouped form reads the same memory
                lin.stacked = (a_all, b_all, width, slots)

    # ------------------------------------------------------------------ pieces
    def _rms_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """RMSNorm as transformers rounds it: a weight in the activations' dtype multiplies the normalised
        rows after they are rounded (Llama); a float32 weight (Gemma's ``1 + w``) before."""
        if x.dtype == torch.float32 or weight.dtype == torch.float32:
            return F.rms_norm(x.float(), (x.shape[-1],), weight, self.cfg.rms_norm_eps).to(x.dtype)
        xf = F.rms_norm(x.float(), (x.shape[-1],), None, self.cfg.rms_norm_eps)
        return weight * xf.to(x.dtype)

    def _qk_norm_(self, qkv: torch.Tensor, layer: _Layer) -> None:
        """Qwen3's per-head RMSNorm of the query and key heads, in place in the QKV rows."""
        cfg = self.cfg
        t, nh, nkv, d = qkv.shape[0], cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q = qkv[:, : nh * d].view(t, nh, d)
        k = qkv[:, nh * d : (nh + nkv) * d].view(t, nkv, d)
        q.copy_(self._rms_norm(q, layer.qn))
        k.copy_(self._rms_norm(k, layer.kn))

    @staticmethod
    def _rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
        # x*cos + rotate_half(x)*sin, where rotate_half(x) = cat(-x2, x1) = roll(x, d/2) * sign
        return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), sin_signed)

    def _attention(self, q, k, v, layer: int, pool: KvPool, b: ForwardBatch, out: torch.Tensor | None = None
                   ) -> torch.Tensor:
        cfg = self.cfg
        nh, nkv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        if out is None:
            out = torch.empty((q.shape[0], nh, d), dtype=q.dtype, device=q.device)
        k_rows, v_rows = pool.k_rows[layer], pool.v_rows[layer]
        nd = b.num_decode
        window = self.layers[layer].window
        if self.attention == "triton":
            kc, vc = pool.k[layer], pool.v[layer]
            if nd:
                self.triton.paged_decode_attention(q[:nd], kc, vc, b.decode_block_table, b.decode_ctx_lens,
                                                   self.scale, out=out[:nd], window=window, softcap=self.softcap)
            m = b.prefill_meta
            if m is not None:
                self.triton.paged_prefill_attention(q[nd:], kc, vc, m.block_tables, m.q_starts, m.q_lens, m.ctx_lens,
                                                    self.scale, m.max_q_len, out=out[nd:], window=window,
                                                    softcap=self.softcap)
            return out.view(q.shape[0], nh * d)
        if nd and self.native is not None:
            out[:nd] = paged_decode_attention(
                self.native, q[:nd], pool.k[layer], pool.v[layer], b.decode_block_table, b.decode_ctx_lens, self.scale,
                window, self.softcap,
            )
        elif nd:
            table = b.decode_block_table.view(-1)
            s = b.decode_mask.shape[-1]
            kd = k_rows.index_select(0, table).view(nd, s, nkv, d).transpose(1, 2)
            vd = v_rows.index_select(0, table).view(nd, s, nkv, d).transpose(1, 2)
            qd = q[:nd].view(nd, nkv, nh // nkv, d)  # heads grouped by their kv head
            o = self._sdpa(qd, kd, vd, self._decode_mask(b, window), False, False)
            out[:nd] = o.reshape(nd, nh, d)
        gqa = nkv != nh
        singles = []
        for group in fresh_prompt_groups(b.prefills):
            if len(group) == 1:
                singles.append(group[0])
            else:
                self._fresh_prompts_attention(q, k, v, group, out, window)
        for p in singles + [p for p in b.prefills if p.context_len > 0]:
            lo, hi = p.start, p.start + p.length
            if p.context_len == 0:
                ks, vs = k[lo:hi], v[lo:hi]
            else:
                total = p.context_len + p.length
                ks = k_rows.index_select(0, p.block_ids).view(-1, nkv, d)[:total]
                vs = v_rows.index_select(0, p.block_ids).view(-1, nkv, d)[:total]
            mask = self._prefill_mask(b, p, window)
            # 4-D inputs: the CPU flash kernel is only chosen for [batch, heads, seq, dim]
            o = self._sdpa(q[lo:hi].transpose(0, 1).unsqueeze(0), ks.transpose(0, 1).unsqueeze(0),
                           vs.transpose(0, 1).unsqueeze(0), mask, mask is None, gqa)
            out[lo:hi] = o[0].transpose(0, 1)
        return out.view(q.shape[0], nh * d)

    def _sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, causal: bool,
              gqa: bool) -> torch.Tensor:
        """``scaled_dot_product_attention`` over ``[batch, heads, seq, dim]``; with Gemma 2's score cap, the
        same written out (scores, ``softcap * tanh(scores / softcap)``, mask, softmax), which SDPA lacks.
        ``mask``: bool (True: visible) or additive; ``causal``: a causal mask instead."""
        if not self.softcap:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=self.scale,
                                                  enable_gqa=gqa)
        if gqa:
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
        s = (q.float() @ k.float().transpose(-1, -2)) * self.scale
        s = s.div_(self.softcap).tanh_().mul_(self.softcap)
        if causal:
            mask = torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).tril_(s.shape[-1] - s.shape[-2])
        if mask is not None:
            s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask
        return (s.softmax(-1) @ v.float()).to(q.dtype)

    @staticmethod
    def _band(q_pos: torch.Tensor, n_keys: int, window: int) -> torch.Tensor:
        """``[len(q_pos), n_keys]`` bool: key j visible from query position p when p - window < j <= p."""
        j = torch.arange(n_keys, device=q_pos.device).unsqueeze(0)
        p = q_pos.unsqueeze(1)
        return (j <= p) & (j > p - window)

    def _decode_mask(self, b: ForwardBatch, window: int) -> torch.Tensor:
        """The PyTorch decode path's additive mask; with a sliding window, the window's own (made once a step)."""
        if not window:
            return b.decode_mask
        key = ("decode", 0, window)
        if key not in b.window_masks:
            s = b.decode_mask.shape[-1]
            visible = self._band(b.decode_ctx_lens.to(b.decode_mask.device) - 1, s, window)
            b.window_masks[key] = b.decode_mask.masked_fill(~visible.view(b.num_decode, 1, 1, s), float("-inf"))
        return b.window_masks[key]

    def _prefill_mask(self, b: ForwardBatch, p: PrefillSeq, window: int) -> torch.Tensor | None:
        """A prefill's bool mask (None: plainly causal); with a sliding window narrower than its context, the band."""
        total = p.context_len + p.length
        if not window or total <= window:
            return p.mask
        key = ("prefill", p.start, window)
        if key not in b.window_masks:
            device = p.mask.device if p.mask is not None else b.input_ids.device
            b.window_masks[key] = self._band(torch.arange(p.context_len, total, device=device), total, window)
        return b.window_masks[key]

    def _fresh_prompts_attention(self, q, k, v, group: list[PrefillSeq], out: torch.Tensor, window: int = 0) -> None:
        """Causal attention of several prompts with nothing cached, as one ``[batch, heads, seq, dim]``
        call: shorter prompts are padded at the end (a causal row never sees the padding after it;
        the padded rows' output is dropped). Prompts of one length that lie back to back in the
        batch, as a wave of equal prompts does, are viewed in place without a copy."""
        nh, nkv, d = q.shape[1], k.shape[1], q.shape[2]
        n, longest = len(group), max(p.length for p in group)
        lo = group[0].start
        in_place = all(p.length == longest and p.start == lo + i * longest for i, p in enumerate(group))
        if in_place:
            hi = lo + n * longest
            qb, kb, vb = (x[lo:hi].view(n, longest, -1, d) for x in (q, k, v))
        else:
            qb = q.new_zeros((n, longest, nh, d))
            kb = k.new_zeros((n, longest, nkv, d))
            vb = v.new_zeros((n, longest, nkv, d))
            for i, p in enumerate(group):
                qb[i, : p.length] = q[p.start : p.start + p.length]
                kb[i, : p.length] = k[p.start : p.start + p.length]
                vb[i, : p.length] = v[p.start : p.start + p.length]
        mask = None
        if window and longest > window:  # a sliding window: the band, the same for every row of the group
            mask = self._band(torch.arange(longest, device=q.device), longest, window)
        o = self._sdpa(qb.transpose(1, 2), kb.transpose(1, 2), vb.transpose(1, 2), mask, mask is None,
                       nkv != nh).transpose(1, 2)
        if in_place:
            out[lo:hi].view(n, longest, nh, d).copy_(o)
        else:
            for i, p in enumerate(group):
                out[p.start : p.start + p.length] = o[i, : p.length]

    # ----------------------------------------------------------------- forward
    @torch.inference_mode()
    def forward(self, b: ForwardBatch, pool: KvPool) -> torch.Tensor:
        """Run one step; write every token's KV into ``pool``; return float32 logits of ``logits_indices``."""
        if self.attention == "triton":
            return self._forward_fused(b, pool)
        if self.cpu_ops is not None:
            return self._forward_cpu_fused(b, pool)
        cfg = self.cfg
        nh, nkv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        t = b.input_ids.shape[0]
        x = self.embed_tokens(b.input_ids)
        tables = {}  # each RoPE table's rows of the step's positions, gathered once
        qk_size = (nh + nkv) * d
        act = self.act_mul or silu_mul_torch
        for i, layer in enumerate(self.layers):
            if id(layer.cos) not in tables:
                tables[id(layer.cos)] = (layer.cos[b.positions].unsqueeze(1), layer.sin[b.positions].unsqueeze(1))
            cos, sin = tables[id(layer.cos)]
            h = self._rms_norm(x, layer.ln1)
            qkv = layer.wqkv(h)
            if layer.qn is not None:
                self._qk_norm_(qkv, layer)
            qk = self._rope(qkv[:, :qk_size].view(t, nh + nkv, d), cos, sin)
            q, k = qk[:, :nh], qk[:, nh:]
            v = qkv[:, qk_size:].view(t, nkv, d)
            pool.k[i][b.slot_blocks, b.slot_offsets] = k
            pool.v[i][b.slot_blocks, b.slot_offsets] = v
            attn = layer.wo(self._attention(q, k, v, i, pool, b))
            x = x + (attn if layer.post_attn is None else self._rms_norm(attn, layer.post_attn))
            h = self._rms_norm(x, layer.ln2)
            mlp = self._mlp(layer, h, act)
            x = x + (mlp if layer.post_ff is None else self._rms_norm(mlp, layer.post_ff))
        h = self._rms_norm(x[b.logits_indices], self.norm)
        return self._head(h)

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        """The final-normed rows to float32 logits; for a pooling runner (``pool_hidden``), the rows
        themselves in float32 (the embeddings are pooled from them)."""
        if self.pool_hidden:
            return h.float()
        return self._softcap(self.lm_head_linear(h).float())

    def _softcap(self, logits: torch.Tensor) -> torch.Tensor:
        """``final_logit_softcapping``: logits squashed into (-c, c) by ``c * tanh(logits / c)``."""
        c = self.cfg.final_logit_softcapping
        return logits if c is None else logits.div_(c).tanh_().mul_(c)

    def _forward_cpu_fused(self, b: ForwardBatch, pool: KvPool) -> torch.Tensor:
        """``forward`` on the CPU with the elementwise work fused (``native_ops.CpuFusedOps``): the
        residual add inside the norm, RoPE in place on the projected rows, SiLU-mul in one pass."""
        cfg, ops = self.cfg, self.cpu_ops
        assert ops is not None
        nh, nkv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        eps = cfg.rms_norm_eps
        t = b.input_ids.shape[0]
        qk_size = (nh + nkv) * d
        x = self.embed_tokens(b.input_ids)
        act = self.act_mul or ops.silu_mul
        delta = None
        for i, layer in enumerate(self.layers):
            h = ops.add_rms_norm(x, delta, layer.ln1, eps)
            qkv = layer.wqkv(h)
            if layer.qn is not None:
                self._qk_norm_(qkv, layer)
            ops.rope_(qkv, layer.cos, layer.sin, b.positions, nh + nkv, d)
            q = qkv[:, : nh * d].view(t, nh, d)
            k = qkv[:, nh * d : qk_size].view(t, nkv, d)
            v = qkv[:, qk_size:].view(t, nkv, d)
            pool.k[i][b.slot_blocks, b.slot_offsets] = k
            pool.v[i][b.slot_blocks, b.slot_offsets] = v
            attn = layer.wo(self._attention(q, k, v, i, pool, b))
            if layer.post_attn is not None:
                attn = ops.add_rms_norm(attn, None, layer.post_attn, eps)
            h = ops.add_rms_norm(x, attn, layer.ln2, eps)
            delta = self._mlp(layer, h, act)
            if layer.post_ff is not None:
                delta = ops.add_rms_norm(delta, None, layer.post_ff, eps)
        x = x[b.logits_indices]
        h = ops.add_rms_norm(x, None if delta is None else delta[b.logits_indices], self.norm, eps)
        return self._head(h)

    def _forward_fused(self, b: ForwardBatch, pool: KvPool) -> torch.Tensor:
        """The Triton path: the same computation with the elementwise work fused (``triton_ops``):
        per layer three matrix products around attention and the MLP, and four small kernels."""
        nh, d = self.cfg.num_heads, self.cfg.head_dim
        t = b.input_ids.shape[0]
        x = self.embed_tokens(b.input_ids)
        delta = None
        for i in range(len(self.layers)):
            qkv = self.pre_attention(i, x, delta, b.positions, b.slot_blocks, b.slot_offsets, pool)
            attn = self._attention(qkv[:, : nh * d].view(t, nh, d), None, None, i, pool, b)
            delta = self.post_attention(i, x, attn)
        return self.final_logits(x, delta, b.logits_indices)

    # the Triton path's layer in two halves around attention (the pieces of ``PiecewiseGraphs``)
    def pre_attention(self, i: int, x: torch.Tensor, delta: torch.Tensor | None, positions: torch.Tensor,
                      slot_blocks: torch.Tensor, slot_offsets: torch.Tensor, pool: KvPool) -> torch.Tensor:
        """Layer ``i`` up to attention: ``x += delta`` (the MLP output of the layer before), the norm,
        the QKV product, RoPE with the keys and values written to their slots; the QKV rows."""
        cfg, layer = self.cfg, self.layers[i]
        h = self.ops.add_rms_norm(x, delta, layer.ln1, cfg.rms_norm_eps)
        qkv = layer.wqkv(h)
        self.ops.rope_and_store(qkv, layer.cos, layer.sin, positions, slot_blocks, slot_offsets, pool.k[i], pool.v[i],
                                cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, layer.qn, layer.kn, cfg.rms_norm_eps)
        return qkv

    def post_attention(self, i: int, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """Layer ``i`` after attention: ``x +=`` the output product (Gemma: its norm), the norm, the MLP
        (Gemma: and its norm); its output."""
        layer, eps = self.layers[i], self.cfg.rms_norm_eps
        a = layer.wo(attn)
        if layer.post_attn is not None:
            a = self.ops.add_rms_norm(a, None, layer.post_attn, eps)
        h = self.ops.add_rms_norm(x, a, layer.ln2, eps)
        out = self._mlp(layer, h, self.act_mul or self.ops.silu_mul)
        return out if layer.post_ff is None else self.ops.add_rms_norm(out, None, layer.post_ff, eps)

    @staticmethod
    def _mlp(layer: _Layer, h: torch.Tensor, silu_mul) -> torch.Tensor:
        """The layer's MLP: dense SwiGLU, or its sparse mixture of experts."""
        if layer.moe is not None:
            return layer.moe(h, silu_mul)
        return layer.wdown(silu_mul(layer.wgu(h)))

    def final_logits(self, x: torch.Tensor, delta: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        h = self.ops.add_rms_norm(x[rows], delta[rows], self.norm, self.cfg.rms_norm_eps)
        return self._head(h)
