"""Qwen3 dense, in plain torch.

Ported from transformers' ``modeling_qwen3.py`` and checked against it for logit parity on
random weights (tests/engine/models/test_qwen3_parity.py). Weights are plain tensors or GGUF
``QuantizedTensor``s; every matmul goes through :func:`helexa.engine.quant.ops.linear`
(and the token lookup through :func:`~helexa.engine.quant.ops.embedding`) so quantized
weights stay quantized in memory and are dequantized on the fly.

The model is a handful of weight records plus functions, not ``nn.Module``s: a quantized
weight is not a Parameter, nothing here is trained, and the forward pass reads top to bottom.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, is_dataclass
from types import ModuleType
from typing import Any, ClassVar, Protocol

import torch
import torch.nn.functional as F
from torch.backends.cuda import SDPAParams, can_use_efficient_attention, can_use_flash_attention
from torch.nn.attention import SDPBackend, sdpa_kernel

from helexa.engine.checkpoint.errors import CheckpointError, UnsupportedArchitecture
from helexa.engine.checkpoint.types import Checkpoint, Weight
from helexa.engine.models.kv_cache import KVCache
from helexa.engine.quant.ops import embedding, fuse_rows, linear, linears
from helexa.engine.quant.tensor import Int8Rows, QuantizedTensor

ARCHITECTURE = "Qwen3ForCausalLM"
MODEL_TYPE = "qwen3"
ROPE_TYPES = ("default", "linear", "yarn")
# cuDNN attention builds a new execution plan for every new key length: ~2 ms of CPU per
# layer per decode step, which dwarfs the step itself. Flash / mem-efficient / math do not.
SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@dataclass(frozen=True)
class Qwen3Config:
    # What a checkpoint's config.json names for this config to read it.
    ARCHITECTURE: ClassVar[str] = ARCHITECTURE
    MODEL_TYPES: ClassVar[tuple[str, ...]] = (MODEL_TYPE,)

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10_000.0
    # Normalised rope scaling: {"rope_type": "linear"|"yarn", "factor": ..., ...} or None.
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 40960
    tie_word_embeddings: bool = False
    attention_bias: bool = False

    @classmethod
    def from_hf(cls, config: dict[str, Any], source: str = "") -> Qwen3Config:
        """Read an HF ``config.json`` dict; anything this file cannot run raises
        :class:`UnsupportedArchitecture` here, before a byte of weights is allocated."""
        cls.check(config, source)
        try:
            return cls(**cls.read_hf(config))
        except KeyError as exc:
            raise CheckpointError(f"{source or 'Qwen3 config'}: missing {exc.args[0]!r}") from None

    @classmethod
    def read_hf(cls, config: dict[str, Any]) -> dict[str, Any]:
        """This config's fields from an HF config dict (a KeyError names a missing key)."""
        heads = int(config["num_attention_heads"])
        hidden = int(config["hidden_size"])
        rope_type, theta, scaling = _rope_params(config)
        return dict(
            vocab_size=int(config["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(config["intermediate_size"]),
            num_hidden_layers=int(config["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or hidden // heads),
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling if rope_type != "default" else None,
            max_position_embeddings=int(config.get("max_position_embeddings", 40960)),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            attention_bias=bool(config.get("attention_bias", False)),
        )

    @classmethod
    def describes(cls, config: dict[str, Any]) -> bool:
        """Whether ``config`` names this architecture (in ``architectures``, or by
        ``model_type`` when that list is absent), supported options or not."""
        archs = config.get("architectures") or []
        return cls.ARCHITECTURE in archs if archs else config.get("model_type") in cls.MODEL_TYPES

    @classmethod
    def check(cls, config: dict[str, Any], source: str = "") -> None:
        """Raise :class:`UnsupportedArchitecture` unless ``config`` describes this
        architecture with options the engine runs."""
        if not cls.describes(config):
            archs = config.get("architectures") or []
            found = ", ".join(archs) or f"model_type {config.get('model_type')!r}"
            raise UnsupportedArchitecture(found, source=source, supported=(cls.ARCHITECTURE,))
        detail = ""
        rope_type, _, _ = _rope_params(config)
        if config.get("use_sliding_window"):
            detail = "use_sliding_window=true is not supported"
        elif config.get("hidden_act", "silu") != "silu":
            detail = f"hidden_act {config['hidden_act']!r} is not supported"
        elif rope_type not in ROPE_TYPES:
            detail = f"rope scaling {rope_type!r} is not supported ({', '.join(ROPE_TYPES)} are)"
        if detail:
            raise UnsupportedArchitecture(cls.ARCHITECTURE, source=source, detail=detail)


def _rope_params(config: dict[str, Any]) -> tuple[str, float, dict[str, Any]]:
    """(rope_type, theta, params) from either transformers 5 ``rope_parameters`` or the
    older top-level ``rope_theta`` + ``rope_scaling`` keys."""
    params = {**(config.get("rope_scaling") or {}), **(config.get("rope_parameters") or {})}
    theta = float(params.get("rope_theta", config.get("rope_theta", 10_000.0)))
    rope_type = str(params.get("rope_type", params.get("type", "default")))
    return rope_type, theta, params


def rope_inv_freq(cfg: Qwen3Config) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and the cos/sin scale, as transformers' ROPE_INIT_FUNCTIONS."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    scaling = cfg.rope_scaling
    if scaling is None:
        return inv_freq, 1.0
    factor = float(scaling["factor"])
    if scaling["rope_type"] == "linear":
        return inv_freq / factor, 1.0
    # YaRN: interpolate low frequencies, keep high ones, blend linearly in between.
    original = float(scaling.get("original_max_position_embeddings", cfg.max_position_embeddings))
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        attention_factor = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
    beta_fast = float(scaling.get("beta_fast") or 32)
    beta_slow = float(scaling.get("beta_slow") or 1)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(cfg.rope_theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp
    inv_freq = inv_freq / factor * (1 - extrapolation) + inv_freq * extrapolation
    return inv_freq, float(attention_factor)


def rope_tables(cfg: Qwen3Config, max_seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin: [max_seq, head_dim] float32, NEOX layout (the two halves repeat)."""
    inv_freq, scale = rope_inv_freq(cfg)
    freqs = torch.arange(max_seq, dtype=torch.float32)[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos() * scale, emb.sin() * scale


@dataclass(frozen=True)
class LowerRight:
    """The causal mask of ``steps`` queries over ``end`` keys aligned to the bottom right
    (query i sees keys 0..end-steps+i), left unmade: :func:`attention` runs it inside
    flash or memory-efficient attention, where a materialized [steps, end] mask would
    send SDPA to its quadratic math kernel."""

    steps: int
    end: int


# What attention takes besides is_causal: a materialized boolean mask or LowerRight.
Mask = torch.Tensor | LowerRight

# _efficient_attention_forward's custom_mask_type for the bottom-right-aligned causal mask
# (0: none, 1: top left, as is_causal; torch's CausalVariant.LOWER_RIGHT).
_LOWER_RIGHT_MASK_TYPE = 2


def lower_right_mask(steps: int, end: int, device: torch.device) -> torch.Tensor:
    """:class:`LowerRight` as a [steps, end] boolean mask (True: attend)."""
    return torch.ones(steps, end, dtype=torch.bool, device=device).tril(end - steps)


def attention_mask(
    start: int, steps: int, end: int, device: torch.device
) -> tuple[Mask | None, bool]:
    """:func:`attention`'s (mask, is_causal) for ``steps`` queries at positions
    ``start..end`` over cache keys ``0..end``, on ``device``."""
    if steps == 1:
        return None, False  # one query sees the whole prefix
    if start == 0:
        return None, True  # plain prefill: SDPA's causal fast path
    # A prompt extending what the cache holds: query i sees keys 0..start+i. On CUDA the
    # fused kernels apply that mask themselves (lower_right_attention); elsewhere SDPA has
    # no kernel that could, so the mask is made once for all the layers.
    if device.type == "cuda":
        return LowerRight(steps, end), False
    return lower_right_mask(steps, end, device), False


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Mask | None, causal: bool
) -> torch.Tensor:
    """SDPA of q [B, H, T, D] over k, v [B, H_kv, S, D] (GQA: H_kv divides H) with
    :func:`attention_mask`'s mask: [B, H, T, D]."""
    if isinstance(mask, LowerRight):
        return lower_right_attention(q, k, v)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=True
    )


def lower_right_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """:func:`attention` under the bottom-right-aligned causal mask: torch's
    ``causal_lower_right`` CausalBias, its checks and aten calls as they are in torch 2.11
    and 2.13, without its module, which imports torch._dynamo (a second or more of import
    holding the GIL, which slowed the weights read it overlapped on a GPU host).

    Flash attention's is_causal aligns to the bottom right when there are fewer queries
    than keys; the checks are asked as for a mask-less, non-causal call (SDPA itself
    refuses flash for is_causal on a non-square score matrix, which it means top left),
    and honour ``sdpa_kernel``'s backends. Where neither fused kernel takes the inputs,
    SDPA gets the materialized mask. Inference only: no log-sum-exp for a backward."""
    params = SDPAParams(q, k, v, None, 0.0, False, True)
    if can_use_flash_attention(params):
        head_dim = q.shape[-1]
        scale = 1.0 / math.sqrt(head_dim)  # of the real head size, not the padded one
        pad = -head_dim % 8  # flash's head size comes in multiples of 8
        if pad:
            q, k, v = (F.pad(t, (0, pad)) for t in (q, k, v))
        out = torch.ops.aten._scaled_dot_product_flash_attention(
            q, k, v, 0.0, is_causal=True, return_debug_mask=False, scale=scale
        )[0]
        return out[..., :head_dim] if pad else out
    if can_use_efficient_attention(params):
        # [B, T, H, D] in and out, and its own mask type for the bottom-right alignment.
        out = torch.ops.aten._efficient_attention_forward(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            None,  # bias
            None,  # cu_seqlens_q
            None,  # cu_seqlens_k
            None,  # max_seqlen_q
            None,  # max_seqlen_k
            0.0,  # dropout_p
            _LOWER_RIGHT_MASK_TYPE,
            False,  # compute_log_sumexp
        )[0]
        return out.transpose(1, 2)
    mask = lower_right_mask(q.shape[-2], k.shape[-2], q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """torch's fused RMSNorm: one kernel instead of transformers' seven (identical in
    float32, within one bf16 ulp in bfloat16), which matters at one token per step."""
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


@dataclass
class Attention:
    q_proj: Weight
    k_proj: Weight
    v_proj: Weight
    o_proj: Weight
    q_norm: torch.Tensor
    k_norm: torch.Tensor
    q_bias: torch.Tensor | None = None
    k_bias: torch.Tensor | None = None
    v_bias: torch.Tensor | None = None
    o_bias: torch.Tensor | None = None
    cache: KVCache | None = None
    # q/k/v fused into as few weights as their encodings allow (their outputs, side by
    # side, are [q | k | v]): one matvec launch each in the decode step. q_proj, k_proj and
    # v_proj are views into them, so they cost no memory; empty: not fused.
    fused: tuple[Weight, ...] = ()


class FeedForward(Protocol):
    """A layer's MLP: dense (:class:`MLP`) or a mixture of experts (qwen3_moe.SparseMoE).

    ``decode`` is the same function for the few tokens of a decode step, written so that
    it can be captured in a CUDA graph (no host sync, no branch on a computed value).
    Where the CUDA step runs its kernels it passes them (models.decode_kernels) and x's
    int8 activations from the norm before (``quantized``); either may be None."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...

    def decode(
        self,
        x: torch.Tensor,
        quantized: Int8Rows | None = None,
        kernels: ModuleType | None = None,
    ) -> torch.Tensor: ...


@dataclass
class MLP:
    """The dense SwiGLU MLP: ``down(silu(gate(x)) * up(x))``."""

    gate_proj: Weight
    up_proj: Weight
    down_proj: Weight
    # gate and up as one weight ([gate | up] out), as Attention.fused; empty: not fused.
    fused: tuple[Weight, ...] = ()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return linear(F.silu(linear(x, self.gate_proj)) * linear(x, self.up_proj), self.down_proj)

    def decode(
        self,
        x: torch.Tensor,
        quantized: Int8Rows | None = None,
        kernels: ModuleType | None = None,
    ) -> torch.Tensor:
        """The reference; the fused step (one gate/up matvec on the int8 activations) is
        cuda_graph.mlp_step's, which every decode step calls."""
        return self(x)


@dataclass
class Block:
    attn: Attention
    input_layernorm: torch.Tensor
    post_attention_layernorm: torch.Tensor
    mlp: FeedForward


def fuse_projections(weights: list[Weight]) -> tuple[tuple[Weight, ...], list[Weight]]:
    """Projections of one input fused for the decode step: each run of neighbours that
    share an encoding into one weight (all of them where they all do; Q4_K_M often gives
    v a wider type than q and k, and keeps a DeltaNet's tiny b/a projections apart from
    its q/k/v/z). Returns the weights a step multiplies by, in order (empty if nothing
    fused), and the projections again, as views where they were fused."""
    fused: list[Weight] = []
    parts: list[Weight] = []
    start = 0
    while start < len(weights):
        # The longest run from ``start`` that fuses; a weight alone if none does.
        stop, run = len(weights), None
        while stop - start > 1 and (run := fuse_rows(weights[start:stop])) is None:
            stop -= 1
        weight, views = run if run is not None else (weights[start], [weights[start]])
        fused.append(weight)
        parts.extend(views)
        start = stop
    if len(fused) == len(weights):
        return (), weights
    return tuple(fused), parts


def projections(
    x: torch.Tensor,
    parts: tuple[Weight, ...],
    fused: tuple[Weight, ...],
    quantized: Int8Rows | None = None,
) -> list[torch.Tensor]:
    """Each of ``parts``' outputs for ``x`` (projections of one input), through the weights
    fuse_projections made of them where it fused any (one matvec a fused run, its output
    cut back into views), else one matvec each; the int8 matvecs share one quantization
    of x (``quantized``, where the norm before wrote it)."""
    outs = linears(x, fused or parts, quantized)
    return split_outputs(outs, [w.shape[0] for w in parts])


def split_outputs(outs: list[torch.Tensor], widths: list[int]) -> list[torch.Tensor]:
    """The fused weights' outputs cut back into each projection's (views, no copies):
    ``widths`` are the projections' output sizes, in order."""
    parts: list[torch.Tensor] = []
    for out in outs:
        start = 0
        while start < out.shape[-1]:
            width = widths[len(parts)]
            parts.append(out[..., start : start + width])
            start += width
    return parts


def load_mlp(w: CheckpointWeights, prefix: str) -> MLP:
    """The SwiGLU MLP under ``prefix`` (``gate_proj``/``up_proj``/``down_proj``), gate and
    up fused for the decode step where they share an encoding: a dense layer's MLP, or a
    hybrid model's shared expert."""
    fused, (gate, up) = fuse_projections(
        [w.weight(prefix + "gate_proj.weight"), w.weight(prefix + "up_proj.weight")]
    )
    return MLP(gate, up, w.weight(prefix + "down_proj.weight"), fused)


class CheckpointWeights:
    """A checkpoint's tensors as a model takes them onto ``device``: float weights cast to
    ``dtype`` once, quantized ones moved as their raw blocks, a missing one named."""

    def __init__(self, ckpt: Checkpoint, device: torch.device, dtype: torch.dtype) -> None:
        self.tensors = ckpt.tensors
        self.source = ckpt.source or "checkpoint"
        self.device, self.dtype = device, dtype

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def device_of(self, name: str) -> torch.device:
        """The device tensor ``name`` goes to: one for all here; a layer split
        (helexa.engine.models.layer_split) places each layer's tensors on its own."""
        return self.device

    def weight(self, name: str) -> Weight:
        t = self.tensors.get(name)
        if t is None:
            raise CheckpointError(f"{self.source}: missing tensor {name!r}")
        device = self.device_of(name)
        if isinstance(t, QuantizedTensor):
            return t.to(device)
        return t.to(device=device, dtype=self.dtype)

    def dense(self, name: str) -> torch.Tensor:
        """A weight always used dense (norms, biases, a router): dequantized once."""
        t = self.weight(name)
        if isinstance(t, QuantizedTensor):
            return t.dequantize(self.dtype).to(self.device_of(name))
        return t

    def optional(self, name: str) -> torch.Tensor | None:
        return self.dense(name) if name in self.tensors else None


class DecoderModel:
    """What every model family here holds and counts the same way: the embedding, a list
    of layer records, the final norm and lm_head, the RoPE tables, and the memory they and
    the caches take (for preflight, ``/models`` and the prompt cache's budget). A family
    says which caches it has (:meth:`kv_caches`, and any recurrent state in
    :attr:`cache_bytes`)."""

    def __init__(
        self,
        config: Any,
        *,
        embed_tokens: Weight,
        layers: list[Any],
        norm: torch.Tensor,
        lm_head: Weight,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.config = config
        self.embed_tokens = embed_tokens
        self.layers = layers
        self.norm = norm
        self.lm_head = lm_head
        self.device = device
        self.dtype = dtype
        self.cos: torch.Tensor | None = None
        self.sin: torch.Tensor | None = None

    def parts(self, kind: type | tuple[type, ...]) -> list[Any]:
        """Every distinct instance of ``kind`` the model holds, found through its layer
        records (dataclasses; tuples are not walked), caches and states aside."""
        out: dict[int, Any] = {}

        def walk(value: Any) -> None:
            if isinstance(value, kind):
                out[id(value)] = value
            elif is_dataclass(value) and not isinstance(value, type):
                for f in fields(value):
                    if f.name not in ("cache", "state"):
                        walk(getattr(value, f.name))

        for value in (self.embed_tokens, self.lm_head, self.norm, *self.layers):
            walk(value)
        return list(out.values())

    def weights(self) -> list[Weight]:
        """Every distinct weight (a tied embedding counted once; a fused projection is
        its parts' memory, counted through them), caches and states aside."""
        return self.parts((torch.Tensor, QuantizedTensor))

    @property
    def weight_bytes(self) -> int:
        return sum(w.nbytes for w in self.weights())

    def kv_caches(self) -> list[KVCache]:
        """The layers' KV caches (empty before setup_cache)."""
        raise NotImplementedError

    @property
    def cache_bytes(self) -> int:
        return sum(cache.nbytes for cache in self.kv_caches())

    @property
    def nbytes(self) -> int:
        """Device memory the model holds: weights plus the allocated caches."""
        return self.weight_bytes + self.cache_bytes

    @property
    def vocab_size(self) -> int:
        return int(self.config.vocab_size)

    @property
    def max_seq(self) -> int:
        caches = self.kv_caches()
        return caches[0].max_seq if caches else 0


class Qwen3(DecoderModel):
    config_class: ClassVar[type[Qwen3Config]] = Qwen3Config
    config: Qwen3Config
    layers: list[Block]

    @classmethod
    def from_checkpoint(
        cls,
        ckpt: Checkpoint,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> Qwen3:
        """Move (and for float weights, cast) each tensor to ``device`` once; quantized
        weights move as their raw blocks."""
        cfg = cls.config_class.from_hf(ckpt.config, ckpt.source)
        return cls.from_weights(cfg, CheckpointWeights(ckpt, torch.device(device), dtype))

    @classmethod
    def from_weights(cls, cfg: Qwen3Config, w: CheckpointWeights) -> Qwen3:
        """The model of ``cfg`` built from ``w``, each tensor where ``w`` places it."""
        layers = []
        for i in range(cfg.num_hidden_layers):
            p = f"model.layers.{i}."
            attn = Attention(
                q_proj=w.weight(p + "self_attn.q_proj.weight"),
                k_proj=w.weight(p + "self_attn.k_proj.weight"),
                v_proj=w.weight(p + "self_attn.v_proj.weight"),
                o_proj=w.weight(p + "self_attn.o_proj.weight"),
                q_norm=w.dense(p + "self_attn.q_norm.weight"),
                k_norm=w.dense(p + "self_attn.k_norm.weight"),
                q_bias=w.optional(p + "self_attn.q_proj.bias"),
                k_bias=w.optional(p + "self_attn.k_proj.bias"),
                v_bias=w.optional(p + "self_attn.v_proj.bias"),
                o_bias=w.optional(p + "self_attn.o_proj.bias"),
            )
            if attn.q_bias is None and attn.k_bias is None and attn.v_bias is None:
                attn.fused, qkv = fuse_projections([attn.q_proj, attn.k_proj, attn.v_proj])
                attn.q_proj, attn.k_proj, attn.v_proj = qkv
            layers.append(
                Block(
                    attn=attn,
                    input_layernorm=w.dense(p + "input_layernorm.weight"),
                    post_attention_layernorm=w.dense(p + "post_attention_layernorm.weight"),
                    mlp=cls.feed_forward(cfg, i, w),
                )
            )
        embed = w.weight("model.embed_tokens.weight")
        tied = cfg.tie_word_embeddings or "lm_head.weight" not in w
        return cls(
            cfg,
            embed_tokens=embed,
            layers=layers,
            norm=w.dense("model.norm.weight"),
            lm_head=embed if tied else w.weight("lm_head.weight"),
            device=w.device,
            dtype=w.dtype,
        )

    @classmethod
    def feed_forward(cls, cfg: Qwen3Config, layer: int, w: CheckpointWeights) -> FeedForward:
        """Layer ``layer``'s MLP: the one part a Qwen3 variant builds differently."""
        return load_mlp(w, f"model.layers.{layer}.mlp.")

    # -- memory ---------------------------------------------------------------------------

    def kv_caches(self) -> list[KVCache]:
        """Each layer's KV cache (empty before setup_cache)."""
        return [blk.attn.cache for blk in self.layers if blk.attn.cache is not None]

    @property
    def prefill_bytes_per_token(self) -> int:
        """Device memory a prefill forward needs per prompt token beyond the weights and
        the KV cache: the activations alive at once in a layer (the residual and its norm,
        q/k/v with their normed and rotated copies, the attention output, the MLP's gate,
        up and product). Flash attention's own memory is linear in the tokens and small
        beside these. It sizes prefill chunks: one forward when the prompt fits, chunks
        only where memory needs them."""
        cfg = self.config
        qkv = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * cfg.head_dim
        width = 4 * cfg.hidden_size + 6 * qkv + 4 * self.ffn_width
        return width * self.dtype.itemsize

    @property
    def ffn_width(self) -> int:
        """The widest per-token activation of a layer's MLP (its intermediate size)."""
        return self.config.intermediate_size

    # -- inference ------------------------------------------------------------------------

    def new_cache(self, max_batch: int, max_seq: int, device: torch.device) -> KVCache:
        """One layer's static KV cache on ``device``."""
        cfg = self.config
        kv_heads, head_dim = cfg.num_key_value_heads, cfg.head_dim
        return KVCache(max_batch, kv_heads, max_seq, head_dim, dtype=self.dtype, device=device)

    @torch.inference_mode()
    def setup_cache(self, max_batch: int, max_seq: int) -> None:
        """Allocate the static KV cache and RoPE tables for ``max_seq`` positions."""
        cfg = self.config
        for blk in self.layers:
            blk.attn.cache = None  # free the old one before allocating the new one
        for blk in self.layers:
            blk.attn.cache = self.new_cache(max_batch, max_seq, self.device)
        cos, sin = rope_tables(cfg, max_seq)
        self.cos = cos.to(device=self.device, dtype=self.dtype)
        self.sin = sin.to(device=self.device, dtype=self.dtype)

    @torch.inference_mode()
    def forward(
        self, tokens: torch.Tensor, input_pos: torch.Tensor, *, last_only: bool = False
    ) -> torch.Tensor:
        """Logits (float32) for ``tokens`` [B, T] at consecutive positions ``input_pos`` [T].

        Writes their keys/values into the cache, so positions before ``input_pos[0]`` must
        have been run already. ``last_only`` returns [B, 1, vocab]: prefill needs only the
        last position's logits, and the full [T, vocab] would dwarf the activations.
        """
        if self.cos is None or self.sin is None:
            raise RuntimeError("call setup_cache(max_batch, max_seq) before forward")
        cfg = self.config
        start, steps = int(input_pos[0]), tokens.shape[1]
        end = start + steps
        if end > self.max_seq:
            raise ValueError(f"position {end - 1} is past the KV cache ({self.max_seq} tokens)")
        cos, sin = self.cos[input_pos], self.sin[input_pos]
        mask, causal = attention_mask(start, steps, end, self.device)

        x = embedding(tokens, self.embed_tokens, dtype=self.dtype)
        with sdpa_kernel(SDPA_BACKENDS):
            for blk in self.layers:
                x = self.block(blk, x, cos, sin, input_pos, end, mask, causal)
        x = rms_norm(x, self.norm, cfg.rms_norm_eps)
        if last_only:
            x = x[:, -1:]
        return linear(x, self.lm_head).float()

    __call__ = forward

    def block(
        self,
        blk: Block,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        input_pos: torch.Tensor,
        end: int,
        mask: Mask | None,
        causal: bool,
    ) -> torch.Tensor:
        """One decoder layer on the residual ``x`` [B, T, hidden]: the step a layer
        split (helexa.engine.models.layer_split) runs on each layer's own device."""
        eps = self.config.rms_norm_eps
        h = rms_norm(x, blk.input_layernorm, eps)
        x = x + self._attention(blk.attn, h, cos, sin, input_pos, end, mask, causal)
        h = rms_norm(x, blk.post_attention_layernorm, eps)
        return x + blk.mlp(h)

    def _attention(
        self,
        attn: Attention,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        input_pos: torch.Tensor,
        end: int,
        mask: Mask | None,
        causal: bool,
    ) -> torch.Tensor:
        cfg = self.config
        batch, steps, _ = x.shape
        head_dim = cfg.head_dim
        q = linear(x, attn.q_proj, attn.q_bias).view(batch, steps, -1, head_dim)
        k = linear(x, attn.k_proj, attn.k_bias).view(batch, steps, -1, head_dim)
        v = linear(x, attn.v_proj, attn.v_bias).view(batch, steps, -1, head_dim)
        # Qwen3's per-head norms come before RoPE.
        q = rms_norm(q, attn.q_norm, cfg.rms_norm_eps).transpose(1, 2)
        k = rms_norm(k, attn.k_norm, cfg.rms_norm_eps).transpose(1, 2)
        v = v.transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        assert attn.cache is not None
        k, v = attn.cache.update(input_pos, k, v, end)
        y = attention(q, k, v, mask, causal).transpose(1, 2).reshape(batch, steps, -1)
        return linear(y, attn.o_proj, attn.o_bias)
