"""Random-weight GGUFs of real models' shapes, written with helexa's own writer: what every
bench writes when its ``--gguf`` is missing, so a GPU run needs no downloaded model and
helexa and llama.cpp read the very same file.

Two families of presets. A Qwen3 shape (``QWEN3_PRESETS``) is a dense Qwen3, or a
Qwen3-MoE when it has experts (every layer sparse, renormalised top-k, as Qwen3-30B-A3B).
A hybrid shape (``HYBRID_PRESETS``) is a Qwen3.5, or a Qwen3-Next when it has experts
(a shared expert beside the routed ones, as Qwen3-Next-80B-A3B): three Gated-DeltaNet
layers to one full-attention layer, written in llama.cpp's converter's layout (split
DeltaNet projections, tiled value heads, ssm_a = -exp(A_log), 1 + w norms; see
helexa.engine.checkpoint.gguf_write). ``PRESETS`` holds both under distinct names, so one
``--preset`` picks the architecture as well as the size.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from helexa.engine.models.qwen3_next import FULL, LINEAR

QWEN3_PRESETS: dict[str, dict[str, int]] = {
    # hidden, layers, heads, kv heads, head dim, ffn, vocab
    "tiny": dict(hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, ffn=128, vocab=512),
    "small": dict(hidden=512, layers=8, heads=8, kv_heads=4, head_dim=64, ffn=1536, vocab=8192),
    "qwen3-0.6b": dict(
        hidden=1024, layers=28, heads=16, kv_heads=8, head_dim=128, ffn=3072, vocab=151936
    ),
    "qwen3-8b": dict(
        hidden=4096, layers=36, heads=32, kv_heads=8, head_dim=128, ffn=12288, vocab=151936
    ),
    # A MoE preset adds experts, experts per token and each expert's width; ffn is the
    # dense width its config.json declares (unused: every layer is sparse).
    "qwen3-30b-a3b": dict(
        hidden=2048,
        layers=48,
        heads=32,
        kv_heads=4,
        head_dim=128,
        ffn=6144,
        vocab=151936,
        experts=128,
        experts_per_tok=8,
        moe_ffn=768,
    ),  # fmt: skip
    # The same at CI size: rows and expert widths of one Q4_K super-block (so the file has
    # Q4_K_M's real mix), 8 experts, top-2. What the tests and the CPU smoke run write.
    "qwen3-moe-tiny": dict(
        hidden=256,
        layers=2,
        heads=4,
        kv_heads=2,
        head_dim=64,
        ffn=512,
        vocab=512,
        experts=8,
        experts_per_tok=2,
        moe_ffn=256,
    ),  # fmt: skip
}
HYBRID_PRESETS: dict[str, dict[str, int]] = {
    # Qwen3.5-9B's text model (its config.json's shape).
    "qwen3.5-9b": dict(hidden=4096, layers=32, heads=16, kv_heads=4, head_dim=256, ffn=12288,
                       k_heads=16, v_heads=32, k_dim=128, v_dim=128, vocab=248320),
    # At CI size, keeping the 9B's head dims (so the rotated part and the DeltaNet heads
    # are the real ones) and one Q4_K super-block of hidden: 3 DeltaNet layers, 1 attention.
    "qwen3.5-tiny": dict(hidden=256, layers=4, heads=2, kv_heads=1, head_dim=256, ffn=512,
                         k_heads=2, v_heads=4, k_dim=128, v_dim=128, vocab=512),
    # Qwen3-Next-80B-A3B (its config.json's shape): 512 experts of 512, top-10, and a
    # shared expert of 512 in every layer; ffn is the declared dense width (unused).
    "qwen3-next-80b-a3b": dict(hidden=2048, layers=48, heads=16, kv_heads=2, head_dim=256,
                               ffn=5120, k_heads=16, v_heads=32, k_dim=128, v_dim=128,
                               vocab=151936, experts=512, experts_per_tok=10, moe_ffn=512,
                               shared_ffn=512),
    # The same at CI size, as qwen3.5-tiny with 8 experts, top-2.
    "qwen3-next-tiny": dict(hidden=256, layers=4, heads=2, kv_heads=1, head_dim=256, ffn=512,
                            k_heads=2, v_heads=4, k_dim=128, v_dim=128, vocab=512, experts=8,
                            experts_per_tok=2, moe_ffn=256, shared_ffn=256),
}  # fmt: skip
PRESETS = QWEN3_PRESETS | HYBRID_PRESETS
assert len(PRESETS) == len(QWEN3_PRESETS) + len(HYBRID_PRESETS), "preset names must be unique"


def shape_keys(presets: dict[str, dict[str, int]]) -> list[str]:
    """The keys of any of ``presets``' shapes, each once, in order."""
    return list(dict.fromkeys(k for shape in presets.values() for k in shape))


# Every key any preset has: each is a command-line override.
SHAPE_KEYS = shape_keys(PRESETS)
# The windows the real checkpoints declare (max_position_embeddings), written into every
# file of the family so llama.cpp's server may open as long a context as on the real one.
QWEN3_WINDOW = 40960
HYBRID_WINDOW = 262144


def is_hybrid(shape: dict[str, int]) -> bool:
    return "v_heads" in shape


def preset_shape(preset: str, **overrides: int | None) -> dict[str, int]:
    """``preset``'s shape with the given (not None) overrides: how a test or a quick run
    shrinks a big preset (fewer layers, a smaller vocab) and keeps the rest of it. A
    Qwen3 shape takes the MoE keys too (experts make it a MoE); neither family takes the
    other's own keys, which it would silently ignore."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; have {sorted(PRESETS)}")
    shape = dict(PRESETS[preset])
    family = HYBRID_PRESETS if is_hybrid(shape) else QWEN3_PRESETS
    given = {k: v for k, v in overrides.items() if v is not None}
    unknown = set(given) - set(shape_keys(family))
    if unknown:
        raise ValueError(
            f"{preset} takes no shape keys {sorted(unknown)}; it has {shape_keys(family)}"
        )
    return shape | given


def synthetic_config(shape: dict[str, int]) -> dict[str, Any]:
    """An HF config.json of ``shape``: a Qwen3, a Qwen3-MoE or a Qwen3.5."""
    if is_hybrid(shape):
        return _hybrid_config(shape)
    cfg = {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "vocab_size": shape["vocab"],
        "hidden_size": shape["hidden"],
        "intermediate_size": shape["ffn"],
        "num_hidden_layers": shape["layers"],
        "num_attention_heads": shape["heads"],
        "num_key_value_heads": shape["kv_heads"],
        "head_dim": shape["head_dim"],
        "rms_norm_eps": 1e-6,
        "rope_theta": 1_000_000.0,
        "max_position_embeddings": QWEN3_WINDOW,
        "tie_word_embeddings": shape["hidden"] < 2048,  # as the small Qwen3s
    }
    if shape.get("experts"):
        cfg |= {
            "architectures": ["Qwen3MoeForCausalLM"],
            "model_type": "qwen3_moe",
            "num_experts": shape["experts"],
            "num_experts_per_tok": shape["experts_per_tok"],
            "moe_intermediate_size": shape["moe_ffn"],
            "norm_topk_prob": True,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
        }
    return cfg


def _mrope_section(head_dim: int, partial: float) -> list[int]:
    """Qwen3.5's M-RoPE sections, [11, 11, 10] for its 64 rotated dims, split the same way
    for any other head: llama.cpp asserts they cover no more than the rotated pairs."""
    pairs = int(head_dim * partial) // 2
    base, extra = divmod(pairs, 3)
    return [base + (i < extra) for i in range(3)]


def _hybrid_config(shape: dict[str, int]) -> dict[str, Any]:
    layers, partial = shape["layers"], 0.25
    cfg = {
        "architectures": ["Qwen3_5ForCausalLM"],
        "model_type": "qwen3_5_text",
        "vocab_size": shape["vocab"],
        "hidden_size": shape["hidden"],
        "intermediate_size": shape["ffn"],
        "num_hidden_layers": layers,
        "num_attention_heads": shape["heads"],
        "num_key_value_heads": shape["kv_heads"],
        "head_dim": shape["head_dim"],
        "layer_types": [FULL if (i + 1) % 4 == 0 else LINEAR for i in range(layers)],
        "linear_conv_kernel_dim": 4,
        "linear_num_key_heads": shape["k_heads"],
        "linear_num_value_heads": shape["v_heads"],
        "linear_key_head_dim": shape["k_dim"],
        "linear_value_head_dim": shape["v_dim"],
        "rms_norm_eps": 1e-6,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 10_000_000.0,
            "partial_rotary_factor": partial,
            "mrope_section": _mrope_section(shape["head_dim"], partial),
        },
        "max_position_embeddings": HYBRID_WINDOW,
        "tie_word_embeddings": False,
    }
    if shape.get("experts"):  # Qwen3-Next: its rope keys at the top, no M-RoPE
        rope = cfg.pop("rope_parameters")
        cfg |= {
            "architectures": ["Qwen3NextForCausalLM"],
            "model_type": "qwen3_next",
            "rope_theta": rope["rope_theta"],
            "partial_rotary_factor": partial,
            "num_experts": shape["experts"],
            "num_experts_per_tok": shape["experts_per_tok"],
            "moe_intermediate_size": shape["moe_ffn"],
            "shared_expert_intermediate_size": shape["shared_ffn"],
            "norm_topk_prob": True,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
        }
    return cfg


def synthetic_tensors(
    cfg: dict[str, Any], device: str | torch.device, seed: int = 0
) -> dict[str, torch.Tensor]:
    """HF-named random weights of ``cfg``, made (and later quantized) on ``device``: an 8B
    shape takes seconds on a GPU and minutes on a CPU."""
    if "layer_types" in cfg:
        return _hybrid_tensors(cfg, device, seed)
    return _qwen3_tensors(cfg, device, seed)


def _qwen3_tensors(
    cfg: dict[str, Any], device: str | torch.device, seed: int
) -> dict[str, torch.Tensor]:
    """A MoE's experts come stacked, (n_experts, out, in) per projection as the GGUF holds
    them, in bfloat16: a 30B-A3B's are 29B weights, which in float32 would not fit beside
    the rest on one 141 GB GPU."""
    gen = torch.Generator(device).manual_seed(seed)
    h, f, hd = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd

    def w(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=device, dtype=dtype) * shape[-1] ** -0.5

    experts = cfg.get("num_experts", 0)

    tensors = {
        "model.embed_tokens.weight": w(cfg["vocab_size"], h),
        "model.norm.weight": torch.ones(h, device=device),
    }
    if not cfg["tie_word_embeddings"]:
        tensors["lm_head.weight"] = w(cfg["vocab_size"], h)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        tensors |= {
            p + "self_attn.q_proj.weight": w(q, h),
            p + "self_attn.k_proj.weight": w(kv, h),
            p + "self_attn.v_proj.weight": w(kv, h),
            p + "self_attn.o_proj.weight": w(h, q),
            p + "self_attn.q_norm.weight": torch.ones(hd, device=device),
            p + "self_attn.k_norm.weight": torch.ones(hd, device=device),
            p + "input_layernorm.weight": torch.ones(h, device=device),
            p + "post_attention_layernorm.weight": torch.ones(h, device=device),
        }
        if experts:
            e, m, bf16 = experts, cfg["moe_intermediate_size"], torch.bfloat16
            tensors |= {
                p + "mlp.gate.weight": w(e, h),
                p + "mlp.experts.gate_proj.weight": w(e, m, h, dtype=bf16),
                p + "mlp.experts.up_proj.weight": w(e, m, h, dtype=bf16),
                p + "mlp.experts.down_proj.weight": w(e, h, m, dtype=bf16),
            }
        else:
            tensors |= {
                p + "mlp.gate_proj.weight": w(f, h),
                p + "mlp.up_proj.weight": w(f, h),
                p + "mlp.down_proj.weight": w(h, f),
            }
    return tensors


def _hybrid_tensors(
    cfg: dict[str, Any], device: str | torch.device, seed: int
) -> dict[str, torch.Tensor]:
    """Qwen3.5's layout, or Qwen3-Next's (fused in_proj_qkvz and in_proj_ba, routed and
    shared experts) when ``cfg`` has experts; zero-centred norms at 0, the DeltaNet's
    decay rates in transformers' init range.

    A Qwen3-Next's routed experts are drawn once, in bfloat16, and every layer holds the
    same three tensors: an 80B-A3B's 77B expert weights would take 155 GB, more than one
    GPU holds. Each layer is still quantized and stored on its own, so a reader reads as
    many distinct bytes as from the real model; the routers differ per layer."""
    gen = torch.Generator(device).manual_seed(seed)
    h, f, hd = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    nv, kdim = (
        cfg["linear_num_value_heads"],
        cfg["linear_num_key_heads"] * cfg["linear_key_head_dim"],
    )
    vdim = nv * cfg["linear_value_head_dim"]
    experts = cfg.get("num_experts", 0)

    def w(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=device, dtype=dtype) * shape[-1] ** -0.5

    def zeros(n: int) -> torch.Tensor:
        return torch.zeros(n, device=device)

    tensors = {
        "model.embed_tokens.weight": w(cfg["vocab_size"], h),
        "lm_head.weight": w(cfg["vocab_size"], h),
        "model.norm.weight": zeros(h),
    }
    if experts:
        m, s, bf16 = (
            cfg["moe_intermediate_size"],
            cfg["shared_expert_intermediate_size"],
            torch.bfloat16,
        )
        routed = {
            "mlp.experts.gate_proj.weight": w(experts, m, h, dtype=bf16),
            "mlp.experts.up_proj.weight": w(experts, m, h, dtype=bf16),
            "mlp.experts.down_proj.weight": w(experts, h, m, dtype=bf16),
        }
    for i, kind in enumerate(cfg["layer_types"]):
        p = f"model.layers.{i}."
        tensors |= {
            p + "input_layernorm.weight": zeros(h),
            p + "post_attention_layernorm.weight": zeros(h),
        }
        if experts:
            tensors |= {p + name: t for name, t in routed.items()} | {
                p + "mlp.gate.weight": w(experts, h),
                p + "mlp.shared_expert.gate_proj.weight": w(s, h),
                p + "mlp.shared_expert.up_proj.weight": w(s, h),
                p + "mlp.shared_expert.down_proj.weight": w(h, s),
                p + "mlp.shared_expert_gate.weight": w(1, h),
            }
        else:
            tensors |= {
                p + "mlp.gate_proj.weight": w(f, h),
                p + "mlp.up_proj.weight": w(f, h),
                p + "mlp.down_proj.weight": w(h, f),
            }
        if kind == FULL:
            tensors |= {
                p + "self_attn.q_proj.weight": w(2 * q, h),
                p + "self_attn.k_proj.weight": w(kv, h),
                p + "self_attn.v_proj.weight": w(kv, h),
                p + "self_attn.o_proj.weight": w(h, q),
                p + "self_attn.q_norm.weight": zeros(hd),
                p + "self_attn.k_norm.weight": zeros(hd),
            }
            continue
        a = torch.empty(nv, device=device).uniform_(0.01, 16, generator=gen)
        if experts:  # Qwen3-Next's fused projections (random, so their order is moot)
            tensors |= {
                p + "linear_attn.in_proj_qkvz.weight": w(2 * kdim + 2 * vdim, h),
                p + "linear_attn.in_proj_ba.weight": w(2 * nv, h),
            }
        else:
            tensors |= {
                p + "linear_attn.in_proj_qkv.weight": w(2 * kdim + vdim, h),
                p + "linear_attn.in_proj_z.weight": w(vdim, h),
                p + "linear_attn.in_proj_b.weight": w(nv, h),
                p + "linear_attn.in_proj_a.weight": w(nv, h),
            }
        tensors |= {
            p + "linear_attn.conv1d.weight": w(2 * kdim + vdim, 1, 4),
            p + "linear_attn.A_log": a.log(),
            p + "linear_attn.dt_bias": torch.ones(nv, device=device),
            p + "linear_attn.norm.weight": torch.ones(cfg["linear_value_head_dim"], device=device),
            p + "linear_attn.out_proj.weight": w(h, vdim),
        }
    return tensors


def byte_level_vocab(size: int) -> dict[str, Any]:
    """``tokenizer.ggml.*`` fields of a placeholder GPT-2-style vocab llama.cpp can load:
    the 256 byte tokens, one merge, then filler tokens up to ``size``. Benchmarks feed
    token ids, so what the tokens spell does not matter; that there is a vocab does."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    extra = iter(range(0x100, 0x200))
    byte_chars = [chr(b) if b in printable else chr(next(extra)) for b in range(256)]
    tokens = [*byte_chars, "\u0120\u0120"]
    tokens += [f"<|filler{i}|>" for i in range(size - len(tokens))]
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "qwen2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [1] * size,
        "tokenizer.ggml.merges": ["\u0120 \u0120"],
        "tokenizer.ggml.eos_token_id": size - 1,
        "tokenizer.ggml.padding_token_id": size - 1,
    }


def default_device() -> str:
    """Where random weights are made and quantized: the GPU when there is one (seconds
    for an 8B shape), else the CPU (minutes)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def write_shape(
    path: Path, shape: dict[str, int], quant: str, device: str | torch.device | None = None
) -> float:
    """Write a GGUF of ``shape`` at ``path`` unless it exists; seconds taken (0 when it
    existed). Written beside it first and renamed, so a killed run leaves no half file
    that a later run would take for a finished one."""
    if path.exists():
        return 0.0
    from helexa.engine.checkpoint.gguf_write import write_gguf

    device = device or default_device()
    start = time.perf_counter()
    path.parent.mkdir(parents=True, exist_ok=True)
    cfg = synthetic_config(shape)
    tmp = path.with_suffix(".partial")
    tensors = synthetic_tensors(cfg, device)
    vocab = byte_level_vocab(cfg["vocab_size"])
    write_gguf(tmp, config=cfg, tensors=tensors, quant=quant, tokenizer_fields=vocab)
    del tensors
    tmp.rename(path)
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    return time.perf_counter() - start


def write_model(
    path: Path,
    preset: str,
    quant: str,
    device: str | torch.device | None = None,
    **overrides: int | None,
) -> float:
    """``write_shape`` of a preset; ``overrides`` change its shape (see preset_shape)."""
    return write_shape(path, preset_shape(preset, **overrides), quant, device)
