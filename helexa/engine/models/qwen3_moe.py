"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-Coder-30B-A3B, ...), in plain torch beside qwen3.py.

Ported from transformers' ``modeling_qwen3_moe.py`` and checked against it for logit
parity on random weights (tests/engine/models/test_qwen3_moe_parity.py). Attention, norms,
RoPE, the KV cache and the decode step are Qwen3's, reused as they are: a Qwen3-MoE is a
Qwen3 whose sparse layers have a :class:`SparseMoE` where the dense MLP would be. Which
layers are sparse is the config's ``decoder_sparse_step`` and ``mlp_only_layers``.

Experts are stored stacked, one (n_experts, out, in) tensor per projection (float, or GGUF
blocks as a 3-D QuantizedTensor), so a step picks its experts by indexing on the device;
gate and up, where they share an encoding, as one (n_experts, 2 * moe_ffn, hidden) stack
that both are views of, for the decode step's one gate/up launch.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from helexa.engine.checkpoint.errors import CheckpointError
from helexa.engine.checkpoint.types import Weight
from helexa.engine.models.qwen3 import (
    CheckpointWeights,
    DecoderModel,
    FeedForward,
    Qwen3,
    Qwen3Config,
    fuse_projections,
)
from helexa.engine.quant import ops
from helexa.engine.quant.ops import (
    expert_linear,
    expert_swiglu,
    grouped_linear,
    has_kernel,
    linear,
)
from helexa.engine.quant.tensor import Int8Rows, QuantizedTensor, int8_activations

ARCHITECTURE = "Qwen3MoeForCausalLM"
# HF config.json says qwen3_moe; llama.cpp's GGUF architecture is qwen3moe.
MODEL_TYPES = ("qwen3_moe", "qwen3moe")
PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
# Prompts (or extensions of a cached one) of at most this many tokens run the decode
# step's grouped matvec, as a dense layer's few rows run the matvec
# (quant.triton_kernels.MATVEC_MAX_ROWS); more run the grouped GEMM.
DECODE_TOKENS = 4


@dataclass(frozen=True, kw_only=True)
class Qwen3MoeConfig(Qwen3Config):
    ARCHITECTURE: ClassVar[str] = ARCHITECTURE
    MODEL_TYPES: ClassVar[tuple[str, ...]] = MODEL_TYPES

    num_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()

    @classmethod
    def read_hf(cls, config: dict[str, Any]) -> dict[str, Any]:
        """Qwen3's fields plus the experts'. transformers 5 saves ``num_experts`` as
        ``num_local_experts``; ``intermediate_size`` sizes only the dense layers, so a
        config without one is fine as long as every layer is sparse."""
        fields = super().read_hf(
            {**config, "intermediate_size": config.get("intermediate_size") or 0}
        )
        experts = config.get("num_experts", config.get("num_local_experts"))
        if experts is None:
            raise KeyError("num_experts")
        fields.update(
            num_experts=int(experts),
            num_experts_per_tok=int(config["num_experts_per_tok"]),
            moe_intermediate_size=int(config["moe_intermediate_size"]),
            norm_topk_prob=bool(config.get("norm_topk_prob", False)),
            decoder_sparse_step=int(config.get("decoder_sparse_step") or 1),
            mlp_only_layers=tuple(int(i) for i in config.get("mlp_only_layers") or ()),
        )
        return fields

    def __post_init__(self) -> None:
        if not 0 < self.num_experts_per_tok <= self.num_experts:
            raise CheckpointError(
                f"num_experts_per_tok {self.num_experts_per_tok} must be in 1..{self.num_experts}"
            )
        dense = [i for i in range(self.num_hidden_layers) if not self.is_sparse(i)]
        if dense and self.intermediate_size <= 0:
            raise CheckpointError(f"layers {dense} are dense but intermediate_size is not set")

    def is_sparse(self, layer: int) -> bool:
        """Whether layer ``layer`` has experts, by transformers' Qwen3MoeDecoderLayer rule."""
        return (
            layer not in self.mlp_only_layers
            and self.num_experts > 0
            and (layer + 1) % self.decoder_sparse_step == 0
        )


@dataclass
class SparseMoE:
    """transformers' Qwen3MoeSparseMoeBlock: a softmax router (in float32) picks
    ``top_k`` experts per token, optionally renormalises their probabilities
    (``norm_topk_prob``), and sums the chosen SwiGLU experts' outputs weighted by them.

    ``router`` is (n_experts, hidden); ``gate_proj``/``up_proj`` (n_experts, moe_ffn,
    hidden) and ``down_proj`` (n_experts, hidden, moe_ffn).
    """

    router: torch.Tensor
    gate_proj: Weight
    up_proj: Weight
    down_proj: Weight
    top_k: int
    norm_topk_prob: bool
    # gate and up as one (n_experts, 2 * moe_ffn, hidden) stack, [gate | up] per expert,
    # gate_proj and up_proj views into it (as qwen3.MLP.fused); empty: not fused.
    fused: tuple[Weight, ...] = ()

    @property
    def num_experts(self) -> int:
        return self.router.shape[0]

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights, experts), each (tokens, top_k), for ``x`` (tokens, hidden); the
        weights in ``x``'s dtype, as transformers casts them back."""
        logits = linear(x, self.router)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        weights, experts = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights.to(logits.dtype), experts

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Many tokens (prefill): each expert runs once, on all the tokens routed to it.
        Up to :data:`DECODE_TOKENS` go the decode way, which costs less than sorting them;
        the few row counts that makes are the ones the load's warm-up tunes for."""
        flat = x.reshape(-1, x.shape[-1])
        if flat.shape[0] <= DECODE_TOKENS:
            return self.decode(x)
        weights, experts = self.route(flat)
        return self._grouped(flat, weights, experts).view(x.shape)

    def decode(
        self,
        x: torch.Tensor,
        quantized: Int8Rows | None = None,
        kernels: ModuleType | None = None,
    ) -> torch.Tensor:
        """A decode step's few tokens: every (token, chosen expert) pair is one row of a
        grouped matvec per projection (quant.ops.grouped_linear: one launch on CUDA,
        reading only the routed experts' blocks); graph-capturable, as routing stays on
        the device. This is the reference. ``kernels`` (models.decode_kernels, which the
        CUDA decode step passes where its kernels run) takes :meth:`fused_decode`
        instead, where the Triton matvecs read every expert stack; ``quantized`` is x's
        int8 activations, from the norm kernel before."""
        if kernels is not None and all(
            has_kernel(w) for w in (self.gate_proj, self.up_proj, self.down_proj)
        ):
            return self.fused_decode(x, quantized, kernels)
        flat = x.reshape(-1, x.shape[-1])
        weights, experts = self.route(flat)
        tokens, k = experts.shape
        index = experts.reshape(-1)
        rows = flat[:, None, :].expand(tokens, k, flat.shape[-1]).reshape(tokens * k, -1)
        h = F.silu(grouped_linear(rows, self.gate_proj, index))  # (tokens * k, moe_ffn)
        h = h * grouped_linear(rows, self.up_proj, index)
        out = grouped_linear(h, self.down_proj, index).view(tokens, k, -1)  # (.., hidden)
        return (out * weights[..., None]).sum(dim=1).view(x.shape)

    def fused_decode(
        self, x: torch.Tensor, quantized: Int8Rows | None, kernels: ModuleType
    ) -> torch.Tensor:
        """:meth:`decode` in four launches, with no copy of x and no launch to quantize:
        routing in one kernel (decode_kernels.route), one grouped matvec of the fused
        [gate | up] stacks in which each token's experts read the token's x (its int8
        activations from the norm before), SiLU·mul writing h and h's int8 activations,
        and down with the weighted sum over each token's experts in the same launch.
        Gate and up of different block types take one matvec each. The experts' outputs
        are summed in float32 and rounded once (the reference rounds each weighted
        output, then the sum). Graph-capturable: nothing reads the routing on the host."""
        matvecs = ops.kernels()
        assert matvecs is not None, "fused_decode needs the Triton matvecs"
        flat = x.reshape(-1, x.shape[-1])  # (tokens, hidden)
        k = self.top_k
        weights, experts = kernels.route(flat, self.router, k, self.norm_topk_prob)  # (tokens, k)
        index = experts.view(-1)  # (tokens * k,): token t's experts are pair rows t*k..t*k+k-1
        int8 = int8_activations(x, self.down_proj.shape[-1])
        if self.fused:
            gate_up = matvecs.grouped_matvec(
                flat, self.fused[0], index, quantized=quantized, share=k
            )  # (tokens * k, 2 * moe_ffn): gate then up
            h, hq = kernels.silu_mul(gate_up, quantize=int8)
        else:
            gate, up = (
                matvecs.grouped_matvec(flat, w, index, quantized=quantized, share=k)
                for w in (self.gate_proj, self.up_proj)
            )  # (tokens * k, moe_ffn) each
            h, hq = kernels.silu_mul(gate, quantize=int8, up=up)
        # (tokens * k, moe_ffn) -> (tokens, hidden), summed over each token's k experts
        out = matvecs.grouped_matvec(h, self.down_proj, index, quantized=hq, combine=weights)
        return out.view(x.shape)

    def _grouped(
        self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor
    ) -> torch.Tensor:
        """Sort the (token, expert) pairs by expert, run each projection over all of them
        as one grouped GEMM (quant.ops.expert_swiglu / expert_linear: on CUDA one launch
        reading the quantized blocks, gate and up fused with SiLU·mul where they are one
        stack; else each expert expanded once, however many tokens chose it), and
        scatter-add the weighted results back. The per-expert counts stay on the device
        where the kernel runs (its tile map is made there), so a short prompt's layers
        queue without waiting for the GPU; the other paths read them (a host sync)."""
        k = experts.shape[1]
        flat = experts.reshape(-1)  # (pairs,)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.num_experts)  # (n_experts,), on the device
        token = order // k
        rows = x.index_select(0, token)  # (pairs, hidden), sorted by expert
        fused = self.fused[0] if self.fused else None
        h = expert_swiglu(rows, self.gate_proj, self.up_proj, counts, fused)  # (pairs, moe_ffn)
        out = expert_linear(h, self.down_proj, counts)  # (pairs, hidden)
        out *= weights.reshape(-1).index_select(0, order)[:, None]
        return torch.zeros_like(x).index_add_(0, token, out)


def warm_up_experts(model: DecoderModel) -> int:
    """Run the prefill's expert GEMMs of ``model``'s MoE layers (any that hold a
    SparseMoE, a shared-expert one included) once at each row regime
    (ops.expert_row_regimes), one layer per distinct set of stack types and shapes (what
    picks and compiles the kernels): the load's warm-up prompts reach only the regime
    their few tokens make, and a prompt must not compile a kernel. Layers on CUDA only
    (the CPU compiles nothing; a layer split's stages each on their own device). Returns
    the layers run."""
    seen: set[tuple[Any, ...]] = set()
    for moe in model.parts(SparseMoE):
        device = moe.router.device
        if device.type != "cuda":
            continue
        stacks = (moe.gate_proj, moe.up_proj, moe.down_proj, *moe.fused)
        kinds = (w.qtype if isinstance(w, QuantizedTensor) else w.dtype for w in stacks)
        key = (device, *zip(kinds, (tuple(w.shape) for w in stacks), strict=True))
        if key in seen:
            continue
        seen.add(key)
        fused = moe.fused[0] if moe.fused else None
        hidden = moe.router.shape[1]
        for rows in ops.expert_row_regimes():
            counts = [rows] + [0] * (moe.num_experts - 1)
            x = torch.zeros(rows, hidden, dtype=model.dtype, device=device)
            h = expert_swiglu(x, moe.gate_proj, moe.up_proj, counts, fused)
            expert_linear(h, moe.down_proj, counts)
    return len(seen)


class Qwen3Moe(Qwen3):
    config_class: ClassVar[type[Qwen3Config]] = Qwen3MoeConfig

    @property
    def ffn_width(self) -> int:
        """A sparse layer holds each token ``top_k`` times (its rows gathered per expert,
        their outputs, the scatter-add), a dense one its intermediate size."""
        cfg = self.config
        assert isinstance(cfg, Qwen3MoeConfig)
        sparse = cfg.num_experts_per_tok * (cfg.moe_intermediate_size + 2 * cfg.hidden_size)
        return max(sparse, cfg.intermediate_size)

    @classmethod
    def feed_forward(cls, cfg: Qwen3Config, layer: int, w: CheckpointWeights) -> FeedForward:
        """A SparseMoE for the sparse layers (stacked experts, see
        checkpoint.safetensors.stack_experts), Qwen3's dense MLP for the others."""
        assert isinstance(cfg, Qwen3MoeConfig)
        if not cfg.is_sparse(layer):
            return super().feed_forward(cfg, layer, w)
        return load_sparse_moe(w, f"model.layers.{layer}.mlp.", cfg)


def load_sparse_moe(w: CheckpointWeights, prefix: str, cfg: Any) -> SparseMoE:
    """The router (``{prefix}gate``) and stacked experts under ``prefix``, their shapes
    checked against ``cfg``'s num_experts / moe_intermediate_size / hidden_size (a
    Qwen3MoeConfig, or any config with those fields and num_experts_per_tok /
    norm_topk_prob); gate and up fused where they share an encoding (one block type:
    Q4_K_M files' are both Q4_K), else kept apart."""
    router = w.dense(prefix + "gate.weight")
    gate, up, down = (w.weight(f"{prefix}experts.{name}.weight") for name in PROJECTIONS)
    e, ffn, hidden = cfg.num_experts, cfg.moe_intermediate_size, cfg.hidden_size
    expected = [(e, hidden), (e, ffn, hidden), (e, ffn, hidden), (e, hidden, ffn)]
    names = ["gate.weight", *(f"experts.{name}.weight" for name in PROJECTIONS)]
    for name, t, shape in zip(names, (router, gate, up, down), expected, strict=True):
        if tuple(t.shape) != shape:
            raise CheckpointError(
                f"{w.source}: {prefix}{name} has shape {tuple(t.shape)}, the config says {shape}"
            )
    fused, (gate, up) = fuse_projections([gate, up])
    return SparseMoE(router, gate, up, down, cfg.num_experts_per_tok, cfg.norm_topk_prob, fused)
