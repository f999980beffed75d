"""The hybrid Qwen generation (Qwen3-Next, Qwen3.5 dense and MoE), text only, in plain torch.

Ported from transformers' ``modeling_qwen3_next.py``, ``modeling_qwen3_5.py`` and
``modeling_qwen3_5_moe.py`` and checked against them for logit parity on random weights
(tests/engine/models/test_qwen3_next_parity.py). Three of every four layers are Gated
DeltaNet linear attention: a short causal conv over the q/k/v projection, then the gated
delta rule, whose state is one (k_dim, v_dim) matrix per value head that decays and is
corrected by each token. Every fourth layer is full attention with an output gate (the
q projection also yields a per-head gate), zero-centred q/k norms and RoPE on the first
quarter of each head only. All norms but the DeltaNet's gated one scale by ``1 + w``.
Qwen3-Next and Qwen3.5-MoE put a routed MoE plus a sigmoid-gated shared expert where the
MLP would be (:class:`SharedExpertMoE`, composed of qwen3_moe's SparseMoE and qwen3's MLP).

The two generations differ only in how the DeltaNet's input projections are stored:
Qwen3-Next fuses q/k/v/z and b/a, interleaved per key head; Qwen3.5 stores them apart.
They are split at load into Qwen3.5's layout, the one llama.cpp's converter writes for
both. A Qwen3.5 GGUF whose key and value head counts differ has its value heads tiled
(value head j reads key head j % n_k) rather than grouped (j // (n_v / n_k)): the config
says which (``linear_value_heads_tiled``) and only the q/k expansion changes.

Prefill runs the chunked delta rule (chunks of 64 tokens, a triangular solve inside each,
a scan across them) and a decode step the recurrent one; both start from the per-request
:class:`~helexa.engine.models.recurrent_state.RecurrentState`, and a prefill from position
0 starts from zero. :func:`decode_step` is written for capture in a CUDA graph: static
buffers updated in place, the position a device tensor, no host sync.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from types import ModuleType
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel

from helexa.engine.checkpoint.errors import CheckpointError, UnsupportedArchitecture
from helexa.engine.checkpoint.types import Checkpoint, Weight
from helexa.engine.models.cuda_graph import (
    Reduce,
    add_norm,
    masked_attention,
    mlp_step,
    triton_module,
)
from helexa.engine.models.kv_cache import KVCache
from helexa.engine.models.qwen3 import (
    MLP,
    SDPA_BACKENDS,
    CheckpointWeights,
    DecoderModel,
    FeedForward,
    Qwen3Config,
    _rope_params,
    apply_rope,
    attention,
    attention_mask,
    fuse_projections,
    load_mlp,
    projections,
    rope_tables,
)
from helexa.engine.models.qwen3_moe import SparseMoE, load_sparse_moe
from helexa.engine.models.recurrent_state import HybridSnapshots, RecurrentState, state_bytes
from helexa.engine.quant.ops import embedding, linear
from helexa.engine.quant.tensor import Int8Rows, QuantizedTensor, int8_activations

if TYPE_CHECKING:
    from helexa.engine.models.qwen3 import Mask

LINEAR, FULL = "linear_attention", "full_attention"
# Tokens per chunk of the chunked delta rule (transformers' and fla's default).
CHUNK = 64
# transformers' and fla's l2norm epsilon for the DeltaNet's q and k.
L2_EPS = 1e-6


@dataclass(frozen=True, kw_only=True)
class Qwen3NextConfig(Qwen3Config):
    ARCHITECTURE: ClassVar[str] = "Qwen3NextForCausalLM"
    # HF config.json says qwen3_next; llama.cpp's GGUF architecture is qwen3next.
    MODEL_TYPES: ClassVar[tuple[str, ...]] = ("qwen3_next", "qwen3next")

    layer_types: tuple[str, ...]
    partial_rotary_factor: float
    linear_conv_kernel_dim: int
    linear_key_head_dim: int
    linear_value_head_dim: int
    linear_num_key_heads: int
    linear_num_value_heads: int
    # GGUF qwen35/qwen35moe with n_k != n_v: value heads reordered from grouped to tiled.
    linear_value_heads_tiled: bool = False
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    norm_topk_prob: bool = True
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()

    @classmethod
    def read_hf(cls, config: dict[str, Any]) -> dict[str, Any]:
        """Qwen3's fields plus the DeltaNet's and the experts'. ``layer_types`` is derived
        from ``full_attention_interval`` (default 4) when absent, as transformers does;
        ``partial_rotary_factor`` may sit in ``rope_parameters`` (transformers 5) or at the
        top level (the released config.json files)."""
        out = super().read_hf({**config, "intermediate_size": config.get("intermediate_size") or 0})
        layers = out["num_hidden_layers"]
        interval = int(config.get("full_attention_interval") or 4)
        types = config.get("layer_types") or [
            FULL if (i + 1) % interval == 0 else LINEAR for i in range(layers)
        ]
        _, _, rope = _rope_params(config)
        partial = rope.get("partial_rotary_factor", config.get("partial_rotary_factor"))
        experts = config.get("num_experts", config.get("num_local_experts")) or 0
        out.update(
            layer_types=tuple(str(t) for t in types),
            partial_rotary_factor=float(0.25 if partial is None else partial),
            linear_conv_kernel_dim=int(config.get("linear_conv_kernel_dim") or 4),
            linear_key_head_dim=int(config["linear_key_head_dim"]),
            linear_value_head_dim=int(config["linear_value_head_dim"]),
            linear_num_key_heads=int(config["linear_num_key_heads"]),
            linear_num_value_heads=int(config["linear_num_value_heads"]),
            linear_value_heads_tiled=bool(config.get("linear_value_heads_tiled", False)),
            num_experts=int(experts),
            num_experts_per_tok=int(config.get("num_experts_per_tok") or 0),
            moe_intermediate_size=int(config.get("moe_intermediate_size") or 0),
            shared_expert_intermediate_size=int(config.get("shared_expert_intermediate_size") or 0),
            norm_topk_prob=bool(config.get("norm_topk_prob", True)),
            decoder_sparse_step=int(config.get("decoder_sparse_step") or 1),
            mlp_only_layers=tuple(int(i) for i in config.get("mlp_only_layers") or ()),
        )
        return out

    @classmethod
    def check(cls, config: dict[str, Any], source: str = "") -> None:
        super().check(config, source)
        detail = ""
        if config.get("attention_bias"):
            detail = "attention_bias=true is not supported"
        elif config.get("attn_output_gate") is False:
            detail = "attn_output_gate=false is not supported"
        if detail:
            raise UnsupportedArchitecture(cls.ARCHITECTURE, source=source, detail=detail)

    def __post_init__(self) -> None:
        if len(self.layer_types) != self.num_hidden_layers:
            raise CheckpointError(
                f"layer_types names {len(self.layer_types)} layers, the model has "
                f"{self.num_hidden_layers}"
            )
        unknown = sorted(set(self.layer_types) - {LINEAR, FULL})
        if unknown:
            raise CheckpointError(f"layer_types {unknown} are not {LINEAR!r} or {FULL!r}")
        if FULL not in self.layer_types:  # the KV cache is what sizes the context
            raise CheckpointError("layer_types has no full_attention layer")
        if self.linear_num_value_heads % self.linear_num_key_heads:
            raise CheckpointError(
                f"linear_num_value_heads {self.linear_num_value_heads} is not a multiple of "
                f"linear_num_key_heads {self.linear_num_key_heads}"
            )
        if self.num_experts and not 0 < self.num_experts_per_tok <= self.num_experts:
            raise CheckpointError(
                f"num_experts_per_tok {self.num_experts_per_tok} must be in 1..{self.num_experts}"
            )
        dense = [i for i in range(self.num_hidden_layers) if not self.is_sparse(i)]
        if dense and self.intermediate_size <= 0:
            raise CheckpointError(f"layers {dense} are dense but intermediate_size is not set")

    def is_sparse(self, layer: int) -> bool:
        """Whether layer ``layer`` has experts, by transformers' Qwen3NextDecoderLayer rule
        (Qwen3.5-MoE: every layer; Qwen3.5 dense: none, it has no experts)."""
        return (
            layer not in self.mlp_only_layers
            and self.num_experts > 0
            and (layer + 1) % self.decoder_sparse_step == 0
        )

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def key_dim(self) -> int:
        return self.linear_num_key_heads * self.linear_key_head_dim

    @property
    def value_dim(self) -> int:
        return self.linear_num_value_heads * self.linear_value_head_dim

    @property
    def conv_dim(self) -> int:
        return 2 * self.key_dim + self.value_dim

    @property
    def attention_layers(self) -> int:
        return self.layer_types.count(FULL)

    @property
    def state_shape(self) -> tuple[int, int, int, int, int]:
        """A linear layer's recurrent state as RecurrentState and state_bytes take it:
        (conv channels, conv kernel, value heads, key head dim, value head dim)."""
        return (
            self.conv_dim,
            self.linear_conv_kernel_dim,
            self.linear_num_value_heads,
            self.linear_key_head_dim,
            self.linear_value_head_dim,
        )

    def recurrent_state_bytes(self, dtype_bytes: int) -> int:
        """Every linear layer's state at batch 1 (conv in the compute dtype, the
        delta-rule memory in float32)."""
        return state_bytes(*self.state_shape, dtype_bytes) * self.layer_types.count(LINEAR)


@dataclass(frozen=True, kw_only=True)
class Qwen3_5Config(Qwen3NextConfig):
    ARCHITECTURE: ClassVar[str] = "Qwen3_5ForCausalLM"
    MODEL_TYPES: ClassVar[tuple[str, ...]] = ("qwen3_5_text", "qwen3_5", "qwen35")


@dataclass(frozen=True, kw_only=True)
class Qwen3_5MoeConfig(Qwen3NextConfig):
    ARCHITECTURE: ClassVar[str] = "Qwen3_5MoeForCausalLM"
    MODEL_TYPES: ClassVar[tuple[str, ...]] = ("qwen3_5_moe_text", "qwen3_5_moe", "qwen35moe")


# -- the pieces ------------------------------------------------------------------------------


def zc_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The zero-centred RMSNorm: normalise and scale in float32 by ``weight`` = 1 + w
    (kept float32, added at load), then round to ``x``'s dtype, as transformers does."""
    return F.rms_norm(x.float(), (x.shape[-1],), weight, eps).to(x.dtype)


def gated_rms_norm(
    x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float
) -> torch.Tensor:
    """The DeltaNet's output norm: normalise in float32, round, scale by ``weight`` (not
    zero-centred), multiply by silu(gate) in float32, round."""
    h = weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)
    return (h * F.silu(gate.float())).to(x.dtype)


def partial_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on the first ``cos.shape[-1]`` channels of each head, the rest passed through."""
    rot = cos.shape[-1]
    return torch.cat((apply_rope(x[..., :rot], cos, sin), x[..., rot:]), dim=-1)


def l2norm(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + L2_EPS)


def chunk_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor | None,
    chunk: int = CHUNK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gated delta rule over a whole prompt, as transformers' torch_chunk_gated_delta_rule:
    (out [B, T, H, Dv] in q's dtype, final state [B, H, Dk, Dv] float32).

    q, k [B, T, H, Dk] (one per value head, not yet l2-normed), v [B, T, H, Dv], g (log
    decay) and beta [B, T, H]; ``state`` the memory before the first token, None for zero.
    Within a chunk the sequential updates are one unit-triangular solve (the UT transform);
    across chunks a scan carries the state. The sequence is padded to whole chunks.
    """
    dtype = q.dtype
    batch, length, heads, k_dim = k.shape
    v_dim = v.shape[-1]
    q, k, v, beta, g = (x.transpose(1, 2).float().contiguous() for x in (q, k, v, beta, g))
    q = l2norm(q) * k_dim**-0.5  # [B, H, T, Dk]
    k = l2norm(k)
    pad = (chunk - length % chunk) % chunk
    q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
    beta, g = (F.pad(x, (0, pad)) for x in (beta, g))
    n = (length + pad) // chunk
    v_beta = v * beta[..., None]
    k_beta = k * beta[..., None]
    # [B, H, n, C, D]
    q, k, k_beta, v_beta = (x.reshape(batch, heads, n, chunk, -1) for x in (q, k, k_beta, v_beta))
    g = g.reshape(batch, heads, n, chunk).cumsum(dim=-1)  # log decay from the chunk start
    upper = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).triu(1)
    decay = (g[..., :, None] - g[..., None, :]).masked_fill(upper, float("-inf")).exp()
    ut = (k_beta @ k.transpose(-1, -2)) * decay  # [B, H, n, C, C]
    intra = (q @ k.transpose(-1, -2)) * decay
    u = torch.linalg.solve_triangular(ut, v_beta, upper=False, unitriangular=True)
    w = torch.linalg.solve_triangular(
        ut, k_beta * g.exp()[..., None], upper=False, unitriangular=True
    )
    s = (
        torch.zeros(batch, heads, k_dim, v_dim, dtype=torch.float32, device=q.device)
        if state is None
        else state.float()
    )
    out = torch.zeros_like(u)  # [B, H, n, C, Dv]
    q = q * g.exp()[..., None]
    k = k * (g[..., -1:] - g).exp()[..., None]
    chunk_decay = g[..., -1].exp()[..., None, None]  # [B, H, n, 1, 1]
    for i in range(n):
        v_new = u[:, :, i] - w[:, :, i] @ s  # the part of the values the state does not predict
        out[:, :, i] = q[:, :, i] @ s + intra[:, :, i] @ v_new
        s = s * chunk_decay[:, :, i] + k[:, :, i].transpose(-1, -2) @ v_new
    out = out.reshape(batch, heads, -1, v_dim)[:, :, :length]
    return out.transpose(1, 2).to(dtype).contiguous(), s


def recurrent_delta_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor,
) -> torch.Tensor:
    """One token of the gated delta rule, as transformers' torch_recurrent_gated_delta_rule,
    updating ``state`` [B, H, Dk, Dv] (float32) in place: out [B, 1, H, Dv] in q's dtype.

    q, k [B, 1, H, Dk], v [B, 1, H, Dv], g and beta [B, 1, H]. In place and without a host
    sync, so a captured decode step keeps writing the same buffer."""
    dtype = q.dtype
    q, k, v = (x[:, 0].float() for x in (q, k, v))  # [B, H, D]
    q = l2norm(q) / q.shape[-1] ** 0.5
    k = l2norm(k)
    state.mul_(g[:, 0].float().exp()[..., None, None])
    memory = (state * k[..., None]).sum(dim=-2)  # what the state recalls for k: [B, H, Dv]
    delta = (v - memory) * beta[:, 0].float()[..., None]
    state.add_(k[..., None] * delta[..., None, :])
    return (state * q[..., None]).sum(dim=-2)[:, None].to(dtype)


@dataclass
class GatedAttention:
    """A full-attention layer. ``q_proj`` yields, per head, the query then its gate
    ([H, 2 * head_dim] rows); norms are 1 + w in float32."""

    q_proj: Weight
    k_proj: Weight
    v_proj: Weight
    o_proj: Weight
    q_norm: torch.Tensor
    k_norm: torch.Tensor
    cache: KVCache | None = None
    # q/k/v fused as qwen3.Attention.fused (empty: not fused; the three are views then).
    fused: tuple[Weight, ...] = ()


@dataclass
class GatedDeltaNet:
    """A linear-attention layer, in Qwen3.5's layout: ``in_proj_qkv`` (2 key_dim +
    value_dim, hidden), ``in_proj_z`` (value_dim, hidden), ``in_proj_b``/``in_proj_a``
    (n_v, hidden); ``conv`` (conv_dim, kernel); ``neg_a`` = -exp(A_log) and ``dt_bias``
    (n_v,) in float32; ``norm`` (v_dim,) the gated norm's weight."""

    in_proj_qkv: Weight
    in_proj_z: Weight
    in_proj_b: Weight
    in_proj_a: Weight
    conv: torch.Tensor
    neg_a: torch.Tensor
    dt_bias: torch.Tensor
    norm: torch.Tensor
    out_proj: Weight
    state: RecurrentState | None = None
    # The four in-projections fused by encoding (qwen3.fuse_projections), so a decode step
    # runs one or two matvecs instead of four; empty: not fused.
    fused: tuple[Weight, ...] = ()


@dataclass
class SharedExpertMoE:
    """transformers' Qwen3NextSparseMoeBlock: the routed experts plus one shared expert
    whose output is scaled by sigmoid(x @ shared_gate) (shared_gate: (1, hidden))."""

    experts: SparseMoE
    shared: MLP
    shared_gate: torch.Tensor

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.experts(x) + torch.sigmoid(linear(x, self.shared_gate)) * self.shared(x)

    def decode(
        self,
        x: torch.Tensor,
        quantized: Int8Rows | None = None,
        kernels: ModuleType | None = None,
    ) -> torch.Tensor:
        """Both halves take the decode step's kernels and x's int8 activations: the routed
        experts' fused path and the shared expert's fused gate/up (cuda_graph.mlp_step);
        the kernels' gated sum is one launch."""
        routed = self.experts.decode(x, quantized, kernels)
        shared = mlp_step(self.shared, x, quantized, kernels)
        if kernels is not None:
            return kernels.shared_expert_add(routed, shared, x, self.shared_gate)
        return routed + torch.sigmoid(linear(x, self.shared_gate)) * shared


@dataclass
class HybridBlock:
    mixer: GatedAttention | GatedDeltaNet
    input_layernorm: torch.Tensor  # 1 + w, float32
    post_attention_layernorm: torch.Tensor
    mlp: FeedForward


def _float32(w: CheckpointWeights, name: str) -> torch.Tensor:
    """A small vector read at full precision whatever the compute dtype (norm offsets,
    decay rates): dequantized or upcast from the checkpoint's own dtype, never via bf16."""
    t = w.tensors.get(name)
    if t is None:
        raise CheckpointError(f"{w.source}: missing tensor {name!r}")
    dense = t.dequantize(torch.float32) if isinstance(t, QuantizedTensor) else t
    return dense.to(device=w.device, dtype=torch.float32)


def _expect(w: CheckpointWeights, name: str, t: Weight, shape: tuple[int, ...]) -> Weight:
    if tuple(t.shape) != shape:
        raise CheckpointError(
            f"{w.source}: {name} has shape {tuple(t.shape)}, the config says {shape}"
        )
    return t


# -- the model -------------------------------------------------------------------------------


class Qwen3Next(DecoderModel):
    config_class: ClassVar[type[Qwen3NextConfig]] = Qwen3NextConfig
    config: Qwen3NextConfig
    layers: list[HybridBlock]

    @classmethod
    def from_checkpoint(
        cls,
        ckpt: Checkpoint,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> Qwen3Next:
        cfg = cls.config_class.from_hf(ckpt.config, ckpt.source)
        device = torch.device(device)
        w = CheckpointWeights(ckpt, device, dtype)
        layers = []
        for i, kind in enumerate(cfg.layer_types):
            p = f"model.layers.{i}."
            mixer = cls._delta_net(cfg, i, w) if kind == LINEAR else cls._attention(cfg, i, w)
            layers.append(
                HybridBlock(
                    mixer=mixer,
                    input_layernorm=1 + _float32(w, p + "input_layernorm.weight"),
                    post_attention_layernorm=1 + _float32(w, p + "post_attention_layernorm.weight"),
                    mlp=cls._feed_forward(cfg, i, w),
                )
            )
        embed = w.weight("model.embed_tokens.weight")
        tied = cfg.tie_word_embeddings or "lm_head.weight" not in w
        return cls(
            cfg,
            embed_tokens=embed,
            layers=layers,
            norm=1 + _float32(w, "model.norm.weight"),
            lm_head=embed if tied else w.weight("lm_head.weight"),
            device=device,
            dtype=dtype,
        )

    @staticmethod
    def _attention(cfg: Qwen3NextConfig, layer: int, w: CheckpointWeights) -> GatedAttention:
        p = f"model.layers.{layer}.self_attn."
        q = w.weight(p + "q_proj.weight")
        hidden, heads = cfg.hidden_size, cfg.num_attention_heads
        _expect(w, p + "q_proj.weight", q, (2 * heads * cfg.head_dim, hidden))
        fused, (q, k, v) = fuse_projections(
            [q, w.weight(p + "k_proj.weight"), w.weight(p + "v_proj.weight")]
        )
        return GatedAttention(
            q_proj=q,
            k_proj=k,
            v_proj=v,
            o_proj=w.weight(p + "o_proj.weight"),
            q_norm=1 + _float32(w, p + "q_norm.weight"),
            k_norm=1 + _float32(w, p + "k_norm.weight"),
            fused=fused,
        )

    @staticmethod
    def _delta_net(cfg: Qwen3NextConfig, layer: int, w: CheckpointWeights) -> GatedDeltaNet:
        """Qwen3.5's tensors as they are; Qwen3-Next's fused ones (its safetensors, a
        qwen3next GGUF's ssm_ba, an older one's ssm_in) made dense and split into them."""
        p = f"model.layers.{layer}.linear_attn."
        if p + "in_proj_qkvz.weight" in w:
            qkv, z = split_qkvz(w.dense(p + "in_proj_qkvz.weight"), cfg)
        else:
            qkv, z = w.weight(p + "in_proj_qkv.weight"), w.weight(p + "in_proj_z.weight")
        if p + "in_proj_ba.weight" in w:
            b, a = split_ba(w.dense(p + "in_proj_ba.weight"), cfg)
        else:
            b, a = w.weight(p + "in_proj_b.weight"), w.weight(p + "in_proj_a.weight")
        hidden, heads = cfg.hidden_size, cfg.linear_num_value_heads
        _expect(w, p + "in_proj_qkv.weight", qkv, (cfg.conv_dim, hidden))
        _expect(w, p + "in_proj_z.weight", z, (cfg.value_dim, hidden))
        _expect(w, p + "in_proj_b.weight", b, (heads, hidden))
        _expect(w, p + "in_proj_a.weight", a, (heads, hidden))
        conv = w.dense(p + "conv1d.weight")
        _expect(
            w,
            p + "conv1d.weight",
            conv.reshape(cfg.conv_dim, -1),
            (cfg.conv_dim, cfg.linear_conv_kernel_dim),
        )
        # llama.cpp's converter stores -exp(A_log) itself (ssm_a); HF stores A_log.
        if p + "ssm_a" in w:
            neg_a = _float32(w, p + "ssm_a")
        else:
            neg_a = -w.dense(p + "A_log").float().exp()
        fused, (qkv, z, b, a) = fuse_projections([qkv, z, b, a])
        return GatedDeltaNet(
            in_proj_qkv=qkv,
            in_proj_z=z,
            in_proj_b=b,
            in_proj_a=a,
            fused=fused,
            conv=conv.reshape(cfg.conv_dim, -1).contiguous(),
            neg_a=neg_a,
            dt_bias=w.dense(p + "dt_bias").float(),
            norm=w.dense(p + "norm.weight"),
            out_proj=w.weight(p + "out_proj.weight"),
        )

    @staticmethod
    def _feed_forward(cfg: Qwen3NextConfig, layer: int, w: CheckpointWeights) -> FeedForward:
        p = f"model.layers.{layer}.mlp."
        if not cfg.is_sparse(layer):
            return load_mlp(w, p)
        experts = load_sparse_moe(w, p, cfg)
        shared = load_mlp(w, p + "shared_expert.")
        shared_gate = w.dense(p + "shared_expert_gate.weight").reshape(1, cfg.hidden_size)
        return SharedExpertMoE(experts, shared, shared_gate)

    # -- memory ---------------------------------------------------------------------------

    def kv_caches(self) -> list[KVCache]:
        """The full-attention layers' KV caches (empty before setup_cache)."""
        return [
            blk.mixer.cache
            for blk in self.layers
            if isinstance(blk.mixer, GatedAttention) and blk.mixer.cache is not None
        ]

    def recurrent_states(self) -> list[RecurrentState]:
        """The linear layers' states (empty before setup_cache)."""
        return [
            blk.mixer.state
            for blk in self.layers
            if isinstance(blk.mixer, GatedDeltaNet) and blk.mixer.state is not None
        ]

    def snapshots(self) -> HybridSnapshots:
        """The prompt cache's store: KV and recurrent states to host memory and back."""
        return HybridSnapshots(self.kv_caches, self.recurrent_states)

    @property
    def cache_bytes(self) -> int:
        """KV caches plus recurrent states: what a request's context holds on the device."""
        return super().cache_bytes + sum(s.nbytes for s in self.recurrent_states())

    @property
    def prefill_bytes_per_token(self) -> int:
        """What a prefill forward needs per prompt token beyond weights and caches (it
        sizes prefill chunks, see Qwen3.prefill_bytes_per_token): the residual and norms,
        the widest mixer's projections and their normed/rotated or convolved copies, the
        chunked delta rule's float32 working set, the MLP's."""
        cfg = self.config
        attention = (2 * cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * cfg.head_dim
        keys = cfg.linear_num_key_heads * cfg.linear_key_head_dim
        values = cfg.linear_num_value_heads * cfg.linear_value_head_dim
        mixer = max(attention, 2 * keys + 2 * values)
        # The chunked delta rule works in float32: q/k/v and k·beta/v·beta, u and w
        # copies per head, and ~5 [64, 64] tiles (decay, its temporaries, the intra-chunk
        # products) per value head, in units of this dtype's items.
        heads = cfg.linear_num_value_heads
        delta_rule = heads * (3 * cfg.linear_key_head_dim + 3 * cfg.linear_value_head_dim)
        chunk = (delta_rule + 5 * 64 * heads) * 4 // self.dtype.itemsize
        ffn = cfg.intermediate_size
        if cfg.num_experts:
            routed = cfg.num_experts_per_tok * (cfg.moe_intermediate_size + 2 * cfg.hidden_size)
            ffn = max(routed + cfg.shared_expert_intermediate_size, cfg.intermediate_size)
        return (4 * cfg.hidden_size + 6 * mixer + chunk + 4 * ffn) * self.dtype.itemsize

    # -- inference ------------------------------------------------------------------------

    @torch.inference_mode()
    def setup_cache(self, max_batch: int, max_seq: int) -> None:
        """Allocate the KV caches, the recurrent states and the RoPE tables."""
        cfg = self.config
        for blk in self.layers:
            if isinstance(blk.mixer, GatedAttention):
                blk.mixer.cache = None
            else:
                blk.mixer.state = None
        for blk in self.layers:
            if isinstance(blk.mixer, GatedAttention):
                blk.mixer.cache = KVCache(
                    max_batch,
                    cfg.num_key_value_heads,
                    max_seq,
                    cfg.head_dim,
                    dtype=self.dtype,
                    device=self.device,
                )
            else:
                blk.mixer.state = RecurrentState(
                    max_batch, *cfg.state_shape, dtype=self.dtype, device=self.device
                )
        cos, sin = rope_tables(replace(cfg, head_dim=cfg.rotary_dim), max_seq)
        self.cos = cos.to(device=self.device, dtype=self.dtype)
        self.sin = sin.to(device=self.device, dtype=self.dtype)

    @torch.inference_mode()
    def forward(
        self, tokens: torch.Tensor, input_pos: torch.Tensor, *, last_only: bool = False
    ) -> torch.Tensor:
        """Logits (float32) for ``tokens`` [B, T] at consecutive positions ``input_pos`` [T].

        A run from position 0 starts the recurrent states from zero; a run from ``start``
        continues them, so they must hold exactly positions ``0..start`` (the prompt cache
        reuses a prefix only at such a length). ``last_only`` returns [B, 1, vocab]."""
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
                h = zc_rms_norm(x, blk.input_layernorm, cfg.rms_norm_eps)
                if isinstance(blk.mixer, GatedAttention):
                    h = self._full_attention(blk.mixer, h, cos, sin, input_pos, end, mask, causal)
                elif steps == 1 and start > 0:
                    h = self._delta_step(blk.mixer, h)
                else:
                    h = self._delta_prefill(blk.mixer, h, fresh=start == 0)
                x = x + h
                h = zc_rms_norm(x, blk.post_attention_layernorm, cfg.rms_norm_eps)
                x = x + blk.mlp(h)
        x = zc_rms_norm(x, self.norm, cfg.rms_norm_eps)
        if last_only:
            x = x[:, -1:]
        return linear(x, self.lm_head).float()

    __call__ = forward

    def _gated_qkv(
        self,
        attn: GatedAttention,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        quantized: Int8Rows | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v [B, H, T, D] (normed, rotated) and the output gate [B, T, H * D]; a
        decode step's three matvecs share one int8 quantization of x (``quantized``, where
        the norm before wrote it)."""
        cfg = self.config
        batch, steps, _ = x.shape
        d = cfg.head_dim
        parts = (attn.q_proj, attn.k_proj, attn.v_proj)
        q_gate, k, v = projections(x, parts, attn.fused, quantized)
        q, gate = q_gate.view(batch, steps, -1, 2 * d).chunk(2, dim=-1)
        k = k.view(batch, steps, -1, d)
        v = v.view(batch, steps, -1, d)
        q = zc_rms_norm(q, attn.q_norm, cfg.rms_norm_eps).transpose(1, 2)
        k = zc_rms_norm(k, attn.k_norm, cfg.rms_norm_eps).transpose(1, 2)
        q, k = partial_rope(q, cos, sin), partial_rope(k, cos, sin)
        return q, k, v.transpose(1, 2), gate.reshape(batch, steps, -1)

    def _full_attention(
        self,
        attn: GatedAttention,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        input_pos: torch.Tensor,
        end: int,
        mask: Mask | None,
        causal: bool,
    ) -> torch.Tensor:
        batch, steps, _ = x.shape
        q, k, v, gate = self._gated_qkv(attn, x, cos, sin)
        assert attn.cache is not None
        k, v = attn.cache.update(input_pos, k, v, end)
        y = attention(q, k, v, mask, causal)
        y = y.transpose(1, 2).reshape(batch, steps, -1) * torch.sigmoid(gate)
        return linear(y, attn.o_proj)

    @staticmethod
    def _delta_projections(
        net: GatedDeltaNet, x: torch.Tensor, quantized: Int8Rows | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The input matvecs' outputs as they come: q/k/v [B, T, conv_dim], z [B, T,
        value_dim], b and a [B, T, n_v] (a decode step's int8 matvecs share one
        quantization of x)."""
        parts = (net.in_proj_qkv, net.in_proj_z, net.in_proj_b, net.in_proj_a)
        mixed, z, b, a = projections(x, parts, net.fused, quantized)
        return mixed, z, b, a

    def _delta_inputs(
        self, net: GatedDeltaNet, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The conv's input [B, conv_dim, T], the gate z [B, T, n_v, v_dim], beta and the
        log decay g [B, T, n_v] (g float32)."""
        batch, steps, _ = x.shape
        mixed, z, b, a = self._delta_projections(net, x)
        z = z.view(batch, steps, -1, self.config.linear_value_head_dim)
        g = net.neg_a * F.softplus(a.float() + net.dt_bias)
        return mixed.transpose(1, 2), z, b.sigmoid(), g

    def _split_heads(
        self, conv_out: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The conv's output [B, conv_dim, T] as q, k [B, T, n_v, k_dim] (each key head
        repeated for the value heads that read it) and v [B, T, n_v, v_dim]."""
        cfg = self.config
        batch, _, steps = conv_out.shape
        q, k, v = conv_out.transpose(1, 2).split([cfg.key_dim, cfg.key_dim, cfg.value_dim], -1)
        q = q.reshape(batch, steps, -1, cfg.linear_key_head_dim)
        k = k.reshape(batch, steps, -1, cfg.linear_key_head_dim)
        v = v.reshape(batch, steps, -1, cfg.linear_value_head_dim)
        r = cfg.linear_num_value_heads // cfg.linear_num_key_heads
        if r > 1 and cfg.linear_value_heads_tiled:
            q, k = q.repeat(1, 1, r, 1), k.repeat(1, 1, r, 1)
        elif r > 1:
            q, k = q.repeat_interleave(r, dim=2), k.repeat_interleave(r, dim=2)
        return q, k, v

    def _delta_out(self, net: GatedDeltaNet, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        batch, steps = y.shape[:2]
        y = gated_rms_norm(y, z, net.norm, self.config.rms_norm_eps)
        return linear(y.reshape(batch, steps, -1), net.out_proj)

    def _delta_prefill(self, net: GatedDeltaNet, x: torch.Tensor, *, fresh: bool) -> torch.Tensor:
        """Many tokens: the causal conv over [conv history, x], then the chunked delta
        rule from the layer's state (zero when ``fresh``); both states left at the end."""
        state = net.state
        assert state is not None
        batch = x.shape[0]
        mixed, z, beta, g = self._delta_inputs(net, x)
        history = state.conv[:batch]
        if fresh:
            history = torch.zeros_like(history)
        window = torch.cat((history, mixed.to(history.dtype)), dim=-1)  # [B, C, K - 1 + T]
        state.conv[:batch].copy_(window[..., -history.shape[-1] :])
        conv_out = F.silu(F.conv1d(window, net.conv[:, None, :], groups=net.conv.shape[0]))
        q, k, v = self._split_heads(conv_out.to(x.dtype))
        y, final = chunk_delta_rule(q, k, v, g, beta, None if fresh else state.ssm[:batch])
        state.ssm[:batch].copy_(final)
        return self._delta_out(net, y, z)

    def _delta_step(
        self,
        net: GatedDeltaNet,
        x: torch.Tensor,
        kernels: ModuleType | None = None,
        quantized: Int8Rows | None = None,
    ) -> torch.Tensor:
        """One token: the conv over [history, x] (one output), the recurrent delta rule;
        both states updated in place (graph-capturable). With ``kernels`` (delta_kernels)
        everything between the input matvecs and out_proj is two launches; the torch
        path is their reference."""
        state = net.state
        assert state is not None
        batch = x.shape[0]
        if kernels is not None:
            cfg = self.config
            # [B, 1, C] (q, k, v), [B, 1, VH * DV], [B, 1, VH], [B, 1, VH]
            mixed, z, b, a = self._delta_projections(net, x, quantized)
            y, quantized = kernels.gated_delta_step(
                mixed, z, b, a, net.conv, net.neg_a, net.dt_bias, net.norm,
                state.conv, state.ssm,
                key_heads=cfg.linear_num_key_heads, tiled=cfg.linear_value_heads_tiled,
                l2_eps=L2_EPS, eps=cfg.rms_norm_eps, quantize=int8_activations(mixed),
            )  # fmt: skip
            return linear(y, net.out_proj, quantized=quantized)  # [B, 1, hidden]
        mixed, z, beta, g = self._delta_inputs(net, x)
        conv = state.conv[:batch]
        window = torch.cat((conv, mixed.to(conv.dtype)), dim=-1)  # [B, C, K]
        conv.copy_(window[..., 1:])
        # The same depthwise conv as prefill (fp32 accumulation), over exactly one window.
        conv_out = F.silu(F.conv1d(window, net.conv[:, None, :], groups=net.conv.shape[0]))
        q, k, v = self._split_heads(conv_out.to(x.dtype))
        y = recurrent_delta_step(q, k, v, g, beta, state.ssm[:batch])
        return self._delta_out(net, y, z)


class Qwen3_5(Qwen3Next):
    config_class: ClassVar[type[Qwen3NextConfig]] = Qwen3_5Config


class Qwen3_5Moe(Qwen3Next):
    config_class: ClassVar[type[Qwen3NextConfig]] = Qwen3_5MoeConfig


def split_qkvz(t: torch.Tensor, cfg: Qwen3NextConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen3-Next's in_proj_qkvz rows, [q, k, v, z] per key head, as (qkv, z): all heads'
    q, then k, then v (grouped), and z, as llama.cpp's converter splits it."""
    r = cfg.linear_num_value_heads // cfg.linear_num_key_heads
    dk, dv = cfg.linear_key_head_dim, cfg.linear_value_head_dim
    per_head = t.reshape(cfg.linear_num_key_heads, 2 * dk + 2 * r * dv, -1)
    q, k, v, z = per_head.split([dk, dk, r * dv, r * dv], dim=1)
    hidden = t.shape[-1]
    qkv = torch.cat([part.reshape(-1, hidden) for part in (q, k, v)])
    return qkv.contiguous(), z.reshape(-1, hidden).contiguous()


def split_ba(t: torch.Tensor, cfg: Qwen3NextConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen3-Next's in_proj_ba rows, [b, a] per key head, as (b, a) over all value heads."""
    r = cfg.linear_num_value_heads // cfg.linear_num_key_heads
    b, a = t.reshape(cfg.linear_num_key_heads, 2 * r, -1).split([r, r], dim=1)
    hidden = t.shape[-1]
    return b.reshape(-1, hidden).contiguous(), a.reshape(-1, hidden).contiguous()


# -- the graph-capturable decode step ------------------------------------------------------


def delta_kernels(model: Qwen3Next) -> ModuleType | None:
    """helexa.engine.models.delta_kernels where they run the linear layers' decode step (a
    CUDA device with Triton), else None: the torch step."""
    if model.device.type != "cuda":
        return None
    return triton_module("delta_kernels")


def _attention_kernels(
    model: Qwen3Next,
    attn: GatedAttention,
    x: torch.Tensor,
    quantized: Int8Rows | None,
    input_pos: torch.Tensor,
    live: torch.Tensor,
    glue: ModuleType,
) -> tuple[torch.Tensor, Int8Rows | None]:
    """A gated attention layer's decode step up to o_proj, in three launches after its
    projections (decode_kernels): the zero-centred q/k norms, partial RoPE and the cache
    writes in one; attention over the live keys (0..input_pos, not the padded kv_len)
    as split-K, whose merge also applies sigmoid(gate) and writes o_proj's int8
    activations. ``live``: input_pos + 1, the keys attention reads (made once a step).
    Returns (y [B, 1, Hq * D], its int8 activations or None)."""
    assert attn.cache is not None and model.cos is not None and model.sin is not None
    parts = (attn.q_proj, attn.k_proj, attn.v_proj)
    q_gate, k, v = projections(x, parts, attn.fused, quantized)  # [B, 1, *] each
    cache, batch = attn.cache, x.shape[0]
    q = glue.qk_norm_rope_cache(
        q_gate, k, v, attn.q_norm, attn.k_norm, model.cos, model.sin, input_pos,
        cache.k, cache.v, model.config.rms_norm_eps, gated=True,
    )  # fmt: skip  # [B, Hq, 1, D]
    return glue.attention_rows(
        q, cache.k[:batch], cache.v[:batch], live, q_gate, quantize=int8_activations(x)
    )


@torch.inference_mode()
def decode_step(
    model: Qwen3Next,
    tokens: torch.Tensor,
    input_pos: torch.Tensor,
    kv_len: int,
    *,
    reduce: Reduce | None = None,
) -> torch.Tensor:
    """cuda_graph.decode_step for a hybrid model: logits [B, 1, vocab] for one token per
    sequence at ``input_pos`` [1] (a device tensor); the attention layers read the first
    ``kv_len`` cache positions with those past ``input_pos`` masked, the linear layers
    step their states in place (on CUDA in delta_kernels' two launches). No host sync.
    (``reduce`` is accepted for the decoder's signature; a hybrid model is never sharded.)"""
    if model.cos is None or model.sin is None:
        raise RuntimeError("call setup_cache(max_batch, max_seq) before decoding")
    if reduce is not None:
        raise ValueError("a hybrid model is not tensor-parallel")
    cfg = model.config
    eps = cfg.rms_norm_eps
    kernels = delta_kernels(model)
    # The dense models' glue: residual add + norm (writing the next matvecs' int8
    # activations) and the fused-gate/up MLP, in a launch or two each.
    glue = triton_module("decode_kernels") if kernels is not None else None
    if glue is None:  # the torch path's RoPE rows and mask over the kv_len bucket
        cos, sin = model.cos[input_pos], model.sin[input_pos]
        visible = torch.arange(kv_len, device=input_pos.device) <= input_pos
    else:  # the kernels read the position and the live key count from the device
        live = input_pos + 1
    x = embedding(tokens, model.embed_tokens, dtype=model.dtype)  # [B, 1, hidden]
    batch = x.shape[0]
    delta = None
    for blk in model.layers:
        x, h, hq = add_norm(x, delta, blk.input_layernorm, eps, glue, zc_rms_norm)
        if isinstance(blk.mixer, GatedAttention) and glue is not None:
            y, yq = _attention_kernels(model, blk.mixer, h, hq, input_pos, live, glue)
            y = linear(y, blk.mixer.o_proj, quantized=yq)
        elif isinstance(blk.mixer, GatedAttention):
            q, k, v, gate = model._gated_qkv(blk.mixer, h, cos, sin, hq)
            assert blk.mixer.cache is not None
            keys, values = blk.mixer.cache.update(input_pos, k, v, kv_len)
            y = masked_attention(q, keys, values, visible).transpose(1, 2).reshape(batch, 1, -1)
            y = linear(y * torch.sigmoid(gate), blk.mixer.o_proj)
        else:
            y = model._delta_step(blk.mixer, h, kernels, hq)
        x, h, hq = add_norm(x, y, blk.post_attention_layernorm, eps, glue, zc_rms_norm)
        delta = mlp_step(blk.mlp, h, hq, glue)
    _, h, hq = add_norm(x, delta, model.norm, eps, glue, zc_rms_norm)
    return linear(h, model.lm_head, quantized=hq).float()
