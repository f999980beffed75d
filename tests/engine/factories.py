"""Tiny Qwen3 and Qwen3-MoE models for engine tests: random weights in a transformers model
(the parity reference), saved as an HF directory our loader reads.

Weights are drawn wider than transformers' init (std 0.02, norms exactly 1) so logits
differ visibly between tokens and a wrong norm, rope or head mapping cannot hide.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers import (
    PreTrainedModel,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

TINY_SHAPE: dict[str, Any] = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
    rope_theta=1_000_000.0,
    rms_norm_eps=1e-6,
)


def tiny_config(vocab_size: int = 128, *, tie: bool = True, **overrides: Any) -> Qwen3Config:
    shape = {**TINY_SHAPE, **overrides}
    theta = shape.pop("rope_theta")
    rope = shape.pop("rope_parameters", None) or {"rope_type": "default", "rope_theta": theta}
    return Qwen3Config(
        vocab_size=vocab_size, tie_word_embeddings=tie, rope_parameters=rope, **shape
    )


@torch.no_grad()
def randomize(model: PreTrainedModel, seed: int) -> None:
    """Reproducible random weights, wider than transformers' init (see the module doc)."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=gen)
        if name.endswith("norm.weight"):
            param.copy_(1.0 + 0.2 * noise)
        else:
            param.copy_(noise * (0.5 / param.shape[-1] ** 0.5) if param.dim() > 1 else noise * 0.1)


def make_tiny_hf_model(
    vocab_size: int = 128, *, tie: bool = True, seed: int = 0, **overrides: Any
) -> Qwen3ForCausalLM:
    """A float32, eval-mode transformers Qwen3 with reproducible random weights."""
    model = Qwen3ForCausalLM(tiny_config(vocab_size, tie=tie, **overrides)).eval()
    randomize(model, seed)
    return model


# Eight experts, two per token: enough that routing differs token to token.
TINY_MOE_SHAPE: dict[str, Any] = dict(
    moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True
)


def make_tiny_moe_hf_model(
    vocab_size: int = 128, *, tie: bool = False, seed: int = 0, **overrides: Any
) -> Qwen3MoeForCausalLM:
    """A float32, eval-mode transformers Qwen3-MoE, TINY_SHAPE plus TINY_MOE_SHAPE
    (every layer sparse unless ``decoder_sparse_step`` / ``mlp_only_layers`` say)."""
    shape = {**TINY_SHAPE, **TINY_MOE_SHAPE, **overrides}
    theta = shape.pop("rope_theta")
    rope = shape.pop("rope_parameters", None) or {"rope_type": "default", "rope_theta": theta}
    config = Qwen3MoeConfig(
        vocab_size=vocab_size, tie_word_embeddings=tie, rope_parameters=rope, **shape
    )
    model = Qwen3MoeForCausalLM(config).eval()
    randomize(model, seed)
    return model


def save_model_dir(
    path: Path,
    model: PreTrainedModel,
    *,
    tokenizer_json: str | None = None,
    tokenizer_config: dict[str, Any] | None = None,
    generation_config: dict[str, Any] | None = None,
) -> Path:
    """``save_pretrained`` plus the tokenizer files a real HF repo ships."""
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    if tokenizer_json is not None:
        (path / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
    if tokenizer_config is not None:
        (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config), encoding="utf-8")
    if generation_config is not None:
        (path / "generation_config.json").write_text(
            json.dumps(generation_config), encoding="utf-8"
        )
    return path


def hf_state_dict(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """HF-named tensors as a loader would produce them (lm_head dropped when tied)."""
    tensors = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    return tensors


def make_tiny_model_dir(
    path: Path, *, seed: int = 0, moe: bool = False, **generation_config: Any
) -> Path:
    """A complete HF model directory: random tiny Qwen3 (Qwen3-MoE with ``moe``) sized to
    the tiny tokenizer, its tokenizer.json / tokenizer_config.json (with the Qwen3 chat
    template) and, if given, a generation_config.json."""
    from helexa.engine.text.tokenizer import Tokenizer
    from tests.engine.tiny_tokenizer import make_tiny_tokenizer_config, make_tiny_tokenizer_json

    tokenizer_json = make_tiny_tokenizer_json()
    vocab = Tokenizer.from_hf(tokenizer_json).vocab_size
    make = make_tiny_moe_hf_model if moe else make_tiny_hf_model
    return save_model_dir(
        path,
        make(vocab, seed=seed),
        tokenizer_json=tokenizer_json,
        tokenizer_config=make_tiny_tokenizer_config(),
        generation_config=generation_config or None,
    )


# The hybrid generation (Qwen3-Next, Qwen3.5): two key heads read by four value heads (so
# the grouping of value heads matters), layers 0-2 linear attention and 3 full attention,
# partial RoPE on a quarter of the 16-wide heads.
TINY_HYBRID_SHAPE: dict[str, Any] = dict(
    hidden_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    linear_key_head_dim=16,
    linear_value_head_dim=8,
    linear_conv_kernel_dim=4,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
)
TINY_HYBRID_MOE: dict[str, Any] = dict(
    num_experts=8,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
    shared_expert_intermediate_size=48,
)
HYBRID_KINDS = ("qwen3_next", "qwen3_5", "qwen3_5_moe")


def make_tiny_hybrid_hf_model(
    kind: str, vocab_size: int = 128, *, seed: int = 0, **overrides: Any
) -> PreTrainedModel:
    """A float32, eval-mode transformers Qwen3NextForCausalLM (``kind`` qwen3_next, MoE with
    a shared expert), Qwen3_5ForCausalLM (qwen3_5, dense) or Qwen3_5MoeForCausalLM
    (qwen3_5_moe) with reproducible random weights. The zero-centred norms (scaled by
    1 + w) are drawn around 0, the others around 1."""
    from transformers import Qwen3NextConfig, Qwen3NextForCausalLM
    from transformers.models.qwen3_5 import Qwen3_5ForCausalLM, Qwen3_5TextConfig
    from transformers.models.qwen3_5_moe import Qwen3_5MoeForCausalLM, Qwen3_5MoeTextConfig

    classes = {
        "qwen3_next": (
            Qwen3NextForCausalLM,
            Qwen3NextConfig,
            {**TINY_HYBRID_MOE, "intermediate_size": 128},
        ),
        "qwen3_5": (Qwen3_5ForCausalLM, Qwen3_5TextConfig, {"intermediate_size": 128}),
        "qwen3_5_moe": (Qwen3_5MoeForCausalLM, Qwen3_5MoeTextConfig, TINY_HYBRID_MOE),
    }
    model_cls, config_cls, extra = classes[kind]
    if kind != "qwen3_next":  # Qwen3.5's M-RoPE sections, as its config.json has them
        rope = {"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25}
        extra = {**extra, "rope_parameters": {**rope, "mrope_section": [1, 1, 0]}}
    config = config_cls(vocab_size=vocab_size, **{**TINY_HYBRID_SHAPE, **extra, **overrides})
    model = model_cls(config).eval()
    randomize(model, seed)
    zero_centred(model)
    return model


@torch.no_grad()
def zero_centred(model: PreTrainedModel) -> None:
    """Shift the (1 + w)-scaled norms of a hybrid model back around 0 after randomize."""
    for name, param in model.named_parameters():
        if name.endswith("norm.weight") and "linear_attn." not in name:
            param.sub_(1.0)


def make_tiny_multimodal_qwen3_5(vocab_size: int = 128, *, seed: int = 0) -> PreTrainedModel:
    """A float32, eval-mode Qwen3_5ForConditionalGeneration: a one-block vision tower
    beside the tiny Qwen3.5 text model, saved (save_pretrained) as its repo would be."""
    from transformers.models.qwen3_5 import Qwen3_5Config, Qwen3_5ForConditionalGeneration

    vision = dict(
        depth=1,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        out_hidden_size=64,
        patch_size=4,
        spatial_merge_size=2,
        temporal_patch_size=2,
        num_position_embeddings=16,
    )
    text = {**TINY_HYBRID_SHAPE, "vocab_size": vocab_size, "intermediate_size": 128}
    config = Qwen3_5Config(text_config=text, vision_config=vision)
    model = Qwen3_5ForConditionalGeneration(config).eval()
    randomize(model, seed)
    zero_centred(model)
    return model
