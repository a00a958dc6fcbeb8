"""The subset of a Hugging Face ``config.json`` the native engine understands."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                           "MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM", "Gemma3ForCausalLM",
                           "Phi3ForCausalLM", "Gemma2ForCausalLM")
#: architectures that RMS-normalise each query and key head (weights ``q_norm`` / ``k_norm``) before RoPE
QK_NORM_ARCHITECTURES = ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM", "Gemma3ForCausalLM")
#: Gemma 2 and 3: scaled embeddings, norms of ``(1 + w)`` around attention and the MLP (four a layer),
#: GeLU-tanh MLP, sliding-window layers among global ones (Gemma 3's with a RoPE base of their own;
#: Gemma 2's scores capped by tanh)
GEMMA_ARCHITECTURES = ("Gemma3ForCausalLM", "Gemma2ForCausalLM")
#: what Gemma 3's text config means when it leaves a key out (transformers' ``Gemma3TextConfig``);
#: the 4B-27B checkpoints' ``text_config`` lists only what differs from these
GEMMA3_TEXT_DEFAULTS: dict[str, Any] = {
    "vocab_size": 262208, "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh", "max_position_embeddings": 131072, "rms_norm_eps": 1e-6,
    "query_pre_attn_scalar": 256, "sliding_window": 4096, "sliding_window_pattern": 6, "rope_theta": 1e6,
    "rope_local_base_freq": 1e4, "tie_word_embeddings": True, "bos_token_id": 2, "eos_token_id": 1,
}
#: multimodal checkpoints whose language model is served alone (text in, text out): the class, and the
#: prefixes its language model's tensors carry (transformers < 5 and 5 save the first; some exports the second)
TEXT_OF_MULTIMODAL = {"Gemma3ForConditionalGeneration": "Gemma3ForCausalLM"}
TEXT_WEIGHT_PREFIXES = (("language_model.model.", "model."), ("model.language_model.", "model."),
                        ("language_model.lm_head.", "lm_head."))
#: the bare transformer of a causal LM, with no LM head (an embedding model's folder): served as its
#: causal LM's architecture, by default with ``--runner pooling``
BASE_MODEL_OF = {"LlamaModel": "LlamaForCausalLM", "MistralModel": "MistralForCausalLM",
                 "Qwen2Model": "Qwen2ForCausalLM", "Qwen3Model": "Qwen3ForCausalLM"}
#: a causal LM's transformer under a classification head (``score``: labels x hidden) over its last
#: token: reward models, classifiers; served with ``--runner pooling`` at ``/classify``
CLASSIFIER_OF = {**{a.replace("ForCausalLM", "ForSequenceClassification"): a for a in SUPPORTED_ARCHITECTURES
                    if a != "Gemma3ForCausalLM"},
                 # (transformers' Gemma3ForSequenceClassification is the multimodal model's)
                 "Gemma3TextForSequenceClassification": "Gemma3ForCausalLM"}
#: sparse mixture-of-experts architectures (``moe.SparseMoe`` in place of the MLP on their sparse layers)
MOE_ARCHITECTURES = ("MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM")
ROPE_TYPES = ("default", "linear", "llama3", "yarn", "longrope")


class ModelLoadError(ValueError):
    """A model folder cannot be served; the message says what is wrong."""


def quantization_section(folder: Any, hf: dict) -> dict | None:
    """A checkpoint's quantization settings as written (config.json's ``quantization_config``, or an
    older GPTQ export's ``quantize_config.json`` in ``folder``, a ``Path`` or None), ``quant_method``
    always set; None for an unquantized checkpoint. Read without torch (the launcher checks flags)."""
    import json

    q = hf.get("quantization_config")
    if q is None and folder is not None and (folder / "quantize_config.json").is_file():
        try:
            q = json.loads((folder / "quantize_config.json").read_text())
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"{folder / 'quantize_config.json'}: {e}".splitlines()[0]) from None
        if isinstance(q, dict):
            q.setdefault("quant_method", "gptq")
    if q is not None and not isinstance(q, dict):
        raise ModelLoadError("quantization_config must be an object")
    return q


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    torch_dtype: str
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    sliding_window: int | None = None
    #: each layer's attention window (0: the whole context; n: a sliding window of the last n tokens)
    layer_windows: tuple[int, ...] = ()
    hidden_act: str = "silu"
    #: attention scores scaled by this ** -0.5 (Gemma's ``query_pre_attn_scalar``; None: head_dim)
    query_pre_attn_scalar: float | None = None
    final_logit_softcapping: float | None = None
    #: attention scores squashed to ``c * tanh(score / c)`` before the softmax (Gemma 2)
    attn_logit_softcapping: float | None = None
    #: RoPE of the sliding-window layers where it differs from the global one (Gemma 3): theta, scaling
    local_rope: tuple[float, dict[str, Any] | None] | None = None
    #: the multimodal architecture whose language model this is (its other towers are not loaded)
    text_of: str | None = None
    #: the checkpoint is a bare ``*Model`` (no LM head): an embedding model (``BASE_MODEL_OF``)
    base_model_only: bool = False
    #: embeddings may be cut to fewer dimensions (a Matryoshka model: ``is_matryoshka`` or
    #: ``matryoshka_dimensions`` in its config); the allowed sizes, where it lists them
    matryoshka: bool = False
    matryoshka_dimensions: tuple[int, ...] = ()
    #: a sequence classifier (``CLASSIFIER_OF``): its labels (``id2label``, by index; 0 of them: not
    #: one), and transformers' ``problem_type`` (which activation its scores take)
    labels: tuple[str, ...] = ()
    problem_type: str | None = None
    #: a classifier's activation named by sentence-transformers (``activation_fn`` of its
    #: ``sentence_transformers`` block, or ``sbert_ce_default_activation_function``): Sigmoid,
    #: Identity or Tanh; None: the one ``problem_type`` implies
    classifier_activation: str | None = None
    #: a one-label classifier scores a query and a document (a cross-encoder, ``/score`` and
    #: ``/rerank``) as a tokenizer's text pair (its separator between them); False: one text, the
    #: two concatenated (an LLM reranker's ``use_sep_token: false``)
    use_sep_token: bool = True
    #: a causal LM served as a classifier (vLLM's ``classifier_from_token``, e.g. an original
    #: Qwen3-Reranker): the head is made at load from these tokens' LM-head rows, by ``method``
    #: (``from_2_way_softmax``: one label, the second row minus the first; ``no_post_processing``: a
    #: label per token)
    classifier_from_token: tuple[str, ...] = ()
    classifier_method: str = ""
    #: the leading dimensions of each query and key head that RoPE turns (``partial_rotary_factor``;
    #: 0: all of them)
    rotary_dim: int = 0
    # sparse mixture of experts (0 experts: a dense model): the experts, how many each token uses, their
    # MLP width, whether the chosen experts' weights are renormalised to sum to 1, the layers that are
    # sparse (the others keep a dense MLP of ``intermediate_size``), and Qwen2-MoE's gated shared expert
    num_experts: int = 0
    experts_per_token: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    moe_layers: tuple[int, ...] = ()
    shared_expert_intermediate_size: int = 0
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_hf_dict(cls, cfg: dict[str, Any]) -> ModelConfig:
        archs = cfg.get("architectures") or []
        arch = archs[0] if archs else _arch_from_model_type(cfg.get("model_type"))
        text_of = None
        base_only = arch in BASE_MODEL_OF
        if base_only:
            arch = BASE_MODEL_OF[arch]
        labels: tuple[str, ...] = ()
        from_token, method = _classifier_from_token(arch, cfg)
        if arch in CLASSIFIER_OF:
            arch = CLASSIFIER_OF[arch]
            id2label = cfg.get("id2label") or {}
            n = int(cfg.get("num_labels") or len(id2label) or 2)
            if from_token:  # the head's rows come from these tokens: it has as many labels as they give
                n = 1 if method == "from_2_way_softmax" else len(from_token)
                id2label = {} if n != len(id2label) else id2label
            labels = tuple(str(id2label.get(str(i), id2label.get(i, f"LABEL_{i}"))) for i in range(n))
        if arch in TEXT_OF_MULTIMODAL:  # its language model, from the nested text_config
            text_of, arch = arch, TEXT_OF_MULTIMODAL[arch]
            top = {k: cfg[k] for k in ("eos_token_id", "bos_token_id", "tie_word_embeddings", "torch_dtype", "dtype")
                   if cfg.get(k) is not None}
            cfg = {**top, **(cfg.get("text_config") or {}), "architectures": [arch]}
        if arch == "Gemma3ForCausalLM":
            cfg = {**GEMMA3_TEXT_DEFAULTS, **cfg}
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ModelLoadError(
                f"unsupported architecture {arch!r}: the native engine runs {', '.join(SUPPORTED_ARCHITECTURES)}, "
                f"as embedding models {', '.join(BASE_MODEL_OF)}, and as classifiers {', '.join(CLASSIFIER_OF)}"
            )
        gemma = arch in GEMMA_ARCHITECTURES
        act = (cfg.get("hidden_activation") or cfg.get("hidden_act")) if gemma else cfg.get("hidden_act", "silu")
        if act not in (("gelu_pytorch_tanh",) if gemma else ("silu",)):
            want = "'gelu_pytorch_tanh'" if gemma else "'silu' (SwiGLU)"
            raise ModelLoadError(f"unsupported hidden_act {act!r}: only {want} is implemented for {arch}")
        prf = float((cfg.get("rope_parameters") or {}).get("partial_rotary_factor",
                                                            cfg.get("partial_rotary_factor") or 1.0))
        try:
            hidden = int(cfg["hidden_size"])
            heads = int(cfg["num_attention_heads"])
            rope = dict(cfg.get("rope_parameters") or {})
            local_rope = None
            if "full_attention" in rope or "sliding_attention" in rope:  # per layer type (Gemma 3, transformers 5)
                local = dict(rope.get("sliding_attention") or {})
                rope = dict(rope.get("full_attention") or {})
                local_rope = (float(local.pop("rope_theta", 10000.0)), _rope_scaling(local or None, cfg))
            elif arch == "Gemma3ForCausalLM":  # transformers < 5: the local layers' base apart, unscaled
                local_rope = (float(cfg.get("rope_local_base_freq", 10000.0)), None)
            # transformers < 5 keeps theta and scaling at the top level
            theta = float(rope.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
            rope.pop("partial_rotary_factor", None)
            scaling = _rope_scaling(rope or cfg.get("rope_scaling") or None, cfg)
            eos = cfg.get("eos_token_id")
            eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
            sliding = cfg.get("sliding_window")
            if cfg.get("use_sliding_window") is False:
                sliding = None
            layers = int(cfg["num_hidden_layers"])
            windows = _layer_windows(arch, cfg, layers, int(sliding) if sliding else 0)
            moe = _moe_fields(arch, cfg) if arch in MOE_ARCHITECTURES else {}
            scalar = cfg.get("query_pre_attn_scalar") if gemma else None
            softcap = cfg.get("final_logit_softcapping")
            attn_cap = cfg.get("attn_logit_softcapping")
            head_dim = int(cfg.get("head_dim") or hidden // heads)
            rotary = int(head_dim * prf)
            if not 0 < prf <= 1 or rotary < 2 or rotary % 2:
                raise ModelLoadError(f"partial_rotary_factor {prf} of head_dim {head_dim} does not give an even "
                                     "number of rotated dimensions")
            if scaling is not None and scaling["rope_type"] == "longrope":
                for key in ("short_factor", "long_factor"):
                    if len(scaling.get(key) or ()) != rotary // 2:
                        raise ModelLoadError(f"longrope {key} needs {rotary // 2} values (one a rotated pair)")
            return cls(
                architecture=arch,
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(cfg["intermediate_size"]),
                num_layers=layers,
                num_heads=heads,
                num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
                head_dim=head_dim,
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                rope_theta=theta,
                rope_scaling=scaling,
                max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                torch_dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32"),
                eos_token_ids=eos_ids,
                bos_token_id=cfg.get("bos_token_id"),
                sliding_window=int(sliding) if sliding else None,
                layer_windows=windows,
                hidden_act=act,
                query_pre_attn_scalar=float(scalar) if scalar else None,
                final_logit_softcapping=float(softcap) if softcap else None,
                attn_logit_softcapping=float(attn_cap) if attn_cap else None,
                local_rope=local_rope if gemma else None,
                text_of=text_of,
                base_model_only=base_only,
                matryoshka=bool(cfg.get("is_matryoshka") or cfg.get("matryoshka_dimensions")),
                matryoshka_dimensions=tuple(int(d) for d in cfg.get("matryoshka_dimensions") or ()),
                labels=labels,
                problem_type=cfg.get("problem_type") if labels else None,
                classifier_activation=_classifier_activation(cfg) if labels else None,
                # an LLM reranker (a head made from tokens) concatenates by default, a cross-encoder separates
                use_sep_token=bool(cfg["use_pad_token"] if cfg.get("use_pad_token") is not None
                                   else cfg.get("use_sep_token", not from_token)),
                classifier_from_token=from_token,
                classifier_method=method,
                rotary_dim=rotary if rotary < head_dim else 0,
                **moe,
                extra=cfg,
            )
        except KeyError as e:
            raise ModelLoadError(f"config.json lacks {e.args[0]!r}") from None

    @property
    def is_gemma(self) -> bool:
        return self.architecture in GEMMA_ARCHITECTURES

    @property
    def attention_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    def window(self, layer: int) -> int:
        """Layer ``layer``'s sliding window in tokens (0: it attends over the whole context)."""
        return self.layer_windows[layer] if self.layer_windows else 0

    def local(self) -> ModelConfig:
        """This config with the sliding-window layers' RoPE (Gemma 3's local base) as its own."""
        if self.local_rope is None:
            return self
        from dataclasses import replace

        return replace(self, rope_theta=self.local_rope[0], rope_scaling=self.local_rope[1], local_rope=None)

    @property
    def qk_norm(self) -> bool:
        """Whether each query and key head is RMS-normalised (own weights) before RoPE, as in Qwen3."""
        return self.architecture in QK_NORM_ARCHITECTURES

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def num_parameters(self) -> int:
        h, i = self.hidden_size, self.intermediate_size
        per_layer = h * (self.q_size + 2 * self.kv_size) + self.q_size * h + (4 if self.is_gemma else 2) * h
        if self.qk_norm:
            per_layer += 2 * self.head_dim
        sparse = len(self.moe_layers)
        moe = self.num_experts * (3 * h * self.moe_intermediate_size + h)
        if self.shared_expert_intermediate_size:
            moe += 3 * h * self.shared_expert_intermediate_size + h
        emb = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * per_layer + (self.num_layers - sparse) * 3 * h * i + sparse * moe + emb + h

    @property
    def rotated(self) -> int:
        """The head dimensions RoPE turns."""
        return self.rotary_dim or self.head_dim

    def uses_long_rope(self, max_len: int) -> bool:
        """LongRoPE: whether the long factors apply, for an engine serving up to ``max_len`` tokens. As
        vLLM decides it: once for the engine (the long ones when it may go past the original context), so
        that a sequence's cached keys never change frequencies as it grows (transformers switches per
        forward pass, by the length so far: the same on any sequence within the original context)."""
        s = self.rope_scaling
        return s is not None and s["rope_type"] == "longrope" and max_len > int(s["original_max_position_embeddings"])

    def rope_inv_freq(self, long: bool = False):  # -> torch.Tensor
        """Inverse frequencies as transformers computes them (float32), with rope scaling applied; one
        a pair of rotated dimensions. ``long``: LongRoPE's long factors (``uses_long_rope``)."""
        import torch

        d = self.rotated
        inv_freq = 1.0 / (self.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
        s = self.rope_scaling
        if s is None:
            return inv_freq
        if s["rope_type"] == "longrope":
            ext = torch.tensor(s["long_factor" if long else "short_factor"], dtype=torch.float32)
            return 1.0 / (ext * self.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
        if s["rope_type"] == "linear":
            return inv_freq / float(s["factor"])
        if s["rope_type"] == "yarn":
            return self._yarn_inv_freq(inv_freq)
        # llama3: keep high frequencies, divide low ones by factor, blend in between
        factor = float(s["factor"])
        low, high = float(s["low_freq_factor"]), float(s["high_freq_factor"])
        old_ctx = float(s["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return torch.where(is_medium, smoothed, scaled)


    def _yarn_factor(self) -> float:
        s = self.rope_scaling or {}
        factor = s.get("factor")
        if factor is None:  # as DeepSeek-V3's configs: the ratio of the context lengths
            factor = self.max_position_embeddings / float(s["original_max_position_embeddings"])
        return float(factor)

    def _yarn_inv_freq(self, inv_freq):  # -> torch.Tensor
        """YaRN (arXiv 2309.00071): frequencies that turn fewer than ``beta_slow`` times over the original
        context are divided by ``factor`` (interpolated), those that turn more than ``beta_fast`` times are
        kept (extrapolated), with a linear ramp over the dimensions between."""
        import torch

        s, d = self.rope_scaling or {}, self.rotated
        factor = self._yarn_factor()
        old_ctx = float(s["original_max_position_embeddings"])
        beta_fast, beta_slow = float(s.get("beta_fast") or 32), float(s.get("beta_slow") or 1)

        def dim_of(rotations: float) -> float:  # the dimension whose frequency turns this often over old_ctx
            return d * math.log(old_ctx / (rotations * 2 * math.pi)) / (2 * math.log(self.rope_theta))

        low, high = dim_of(beta_fast), dim_of(beta_slow)
        if s.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, d - 1)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(d // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
        keep = 1 - ramp  # share of the unscaled (extrapolated) frequency
        return (inv_freq / factor) * (1 - keep) + inv_freq * keep

    def rope_attention_factor(self) -> float:
        """The factor on the cos/sin tables: 1, or YaRN's ``0.1 ln(factor) + 1`` (or its mscale ratio)."""
        s = self.rope_scaling
        if s is None or s["rope_type"] not in ("yarn", "longrope"):
            return 1.0
        if s.get("attention_factor") is not None:
            return float(s["attention_factor"])
        if s["rope_type"] == "longrope":  # sqrt(1 + ln(factor) / ln(original context)), as transformers
            orig = float(s["original_max_position_embeddings"])
            lr_factor = float(s.get("factor") or self.max_position_embeddings / orig)
            return 1.0 if lr_factor <= 1 else math.sqrt(1 + math.log(lr_factor) / math.log(orig))
        factor = self._yarn_factor()

        def mscale(m: float) -> float:
            return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0

        if s.get("mscale") and s.get("mscale_all_dim"):
            return mscale(float(s["mscale"])) / mscale(float(s["mscale_all_dim"]))
        return mscale(1.0)


def _rope_scaling(scaling: dict[str, Any] | None, cfg: dict[str, Any]) -> dict[str, Any] | None:
    """A checked copy of a RoPE scaling dict, ``rope_type`` always set; None for no scaling."""
    if scaling is None:
        return None
    scaling = dict(scaling)
    scaling.pop("rope_theta", None)
    rtype = scaling.get("rope_type", scaling.get("type", "default"))
    if rtype == "su":  # Phi-3's first name for LongRoPE
        rtype = "longrope"
    if rtype not in ROPE_TYPES:
        raise ModelLoadError(f"unsupported rope_type {rtype!r}: {', '.join(map(repr, ROPE_TYPES))} are")
    if rtype in ("yarn", "longrope") and not scaling.get("original_max_position_embeddings"):
        omax = cfg.get("original_max_position_embeddings")
        if not omax:
            raise ModelLoadError(f"rope_type {rtype!r} needs original_max_position_embeddings")
        scaling["original_max_position_embeddings"] = omax
    scaling["rope_type"] = rtype
    return None if rtype == "default" else scaling


#: sentence-transformers' activations of a cross-encoder's scores (by their torch class path), as
#: vLLM accepts them (only classes of ``torch.nn.modules``)
CLASSIFIER_ACTIVATIONS = {"torch.nn.modules.activation.Sigmoid": "Sigmoid", "torch.nn.modules.linear.Identity": "Identity",
                          "torch.nn.modules.activation.Tanh": "Tanh"}


def _classifier_activation(cfg: dict[str, Any]) -> str | None:
    st = cfg.get("sentence_transformers")
    name = st.get("activation_fn") if isinstance(st, dict) else None
    name = name or cfg.get("sbert_ce_default_activation_function")
    if name is None:
        return None
    if name not in CLASSIFIER_ACTIVATIONS:
        raise ModelLoadError(f"unsupported classifier activation {name!r}: the native engine applies "
                             + ", ".join(CLASSIFIER_ACTIVATIONS))
    return CLASSIFIER_ACTIVATIONS[name]


def _classifier_from_token(arch: str, cfg: dict[str, Any]) -> tuple[tuple[str, ...], str]:
    """A classifier's head made from LM-head rows (vLLM's ``classifier_from_token`` and ``method``,
    usually set by ``--hf-overrides`` over a causal LM's folder): the tokens and the method, checked."""
    tokens = cfg.get("classifier_from_token")
    if not tokens:
        return (), ""
    if arch not in CLASSIFIER_OF:
        raise ModelLoadError("classifier_from_token needs a *ForSequenceClassification architecture (set "
                             "architectures in --hf-overrides as well)")
    if not isinstance(tokens, list) or not all(isinstance(t, str) and t for t in tokens):
        raise ModelLoadError("classifier_from_token must be a list of tokens")
    # an original Qwen3-Reranker's flag implies the 2-way softmax of its "no" and "yes" tokens
    method = cfg.get("method") or ("from_2_way_softmax" if cfg.get("is_original_qwen3_reranker") else None)
    if method is None:
        raise ModelLoadError("classifier_from_token needs a method: from_2_way_softmax or no_post_processing")
    if method not in ("from_2_way_softmax", "no_post_processing"):
        raise ModelLoadError(f"unsupported classifier method {method!r}: use from_2_way_softmax or "
                             "no_post_processing")
    if method == "from_2_way_softmax" and len(tokens) != 2:
        raise ModelLoadError("method from_2_way_softmax needs two classifier_from_token tokens (false, true)")
    return tuple(tokens), method


def _layer_windows(arch: str, cfg: dict[str, Any], layers: int, sliding: int) -> tuple[int, ...]:
    """Each layer's sliding window (0: full attention), as transformers assigns them: ``layer_types``
    where the config lists them; else Gemma 3's pattern (every ``sliding_window_pattern``-th layer
    global), Qwen2/3's (sliding from ``max_window_layers`` on), or every layer (Mistral, Mixtral)."""
    if not sliding:
        return ()
    types = cfg.get("layer_types")
    if types is not None:
        if len(types) != layers:
            raise ModelLoadError(f"layer_types lists {len(types)} layers, config has {layers}")
        unknown = set(types) - {"full_attention", "sliding_attention"}
        if unknown:
            raise ModelLoadError(f"unsupported layer types {sorted(unknown)}: full_attention and sliding_attention are")
        return tuple(sliding if t == "sliding_attention" else 0 for t in types)
    if arch == "Gemma2ForCausalLM":  # every other layer, the first windowed
        return tuple(0 if i % 2 else sliding for i in range(layers))
    if arch in GEMMA_ARCHITECTURES:
        pattern = int(cfg.get("sliding_window_pattern") or cfg.get("_sliding_window_pattern") or 6)
        return tuple(0 if (i + 1) % pattern == 0 else sliding for i in range(layers))
    if arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM"):
        first = int(cfg.get("max_window_layers") or 0)
        return tuple(sliding if i >= first else 0 for i in range(layers))
    return (sliding,) * layers


def _moe_fields(arch: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """The mixture-of-experts settings of a Mixtral / Qwen2-MoE / Qwen3-MoE ``config.json``."""
    experts = int(cfg.get("num_local_experts") or cfg.get("num_experts") or 0)
    top_k = int(cfg.get("num_experts_per_tok") or 0)
    if experts < 1 or not 1 <= top_k <= experts:
        raise ModelLoadError(f"{arch} needs num_experts >= 1 and 1 <= num_experts_per_tok <= num_experts "
                             f"(config has {experts} and {top_k})")
    layers = int(cfg["num_hidden_layers"])
    if arch == "MixtralForCausalLM":  # every layer sparse, experts as wide as the MLP, weights renormalised
        return dict(num_experts=experts, experts_per_token=top_k, moe_intermediate_size=int(cfg["intermediate_size"]),
                    norm_topk_prob=True, moe_layers=tuple(range(layers)))
    step = int(cfg.get("decoder_sparse_step") or 1)
    dense = set(cfg.get("mlp_only_layers") or ())
    shared = int(cfg.get("shared_expert_intermediate_size") or 0) if arch == "Qwen2MoeForCausalLM" else 0
    return dict(num_experts=experts, experts_per_token=top_k, moe_intermediate_size=int(cfg["moe_intermediate_size"]),
                norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
                moe_layers=tuple(i for i in range(layers) if i not in dense and (i + 1) % step == 0),
                shared_expert_intermediate_size=shared)


def _arch_from_model_type(model_type: str | None) -> str:
    return {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
            "qwen3": "Qwen3ForCausalLM", "mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
            "qwen3_moe": "Qwen3MoeForCausalLM", "gemma3_text": "Gemma3ForCausalLM", "phi3": "Phi3ForCausalLM",
            "gemma2": "Gemma2ForCausalLM"}.get(
        model_type or "", f"<model_type {model_type!r}>"
    )
