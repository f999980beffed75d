"""Batch-1 latency of the engine's Qwen3: load time, time to first token, prefill and decode
throughput, and the weight bandwidth decode achieves.

    python bench/decode.py --model /models/Qwen3-0.6B-Q8_0.gguf --device cuda
    python bench/decode.py --synthetic --preset small --quant Q8_0 --device cpu

``--synthetic`` writes a random-weight GGUF of the given shape (with helexa's own
quantizers) to a temp dir first, so the benchmark needs no downloaded model. Tokens are
random ids and the next token is the argmax, synced every step as real generation is:
this measures the model loop, not the tokenizer.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from helexa.engine.checkpoint.safetensors import load_checkpoint  # noqa: E402
from helexa.engine.models.architectures import model_class  # noqa: E402
from helexa.engine.models.cuda_graph import GraphDecoder  # noqa: E402
from helexa.engine.models.qwen3 import Qwen3  # noqa: E402

PRESETS: dict[str, dict[str, int]] = {
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
}
# Every key any preset has: each is a command-line override.
SHAPE_KEYS = list(dict.fromkeys(k for shape in PRESETS.values() for k in shape))
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def preset_shape(preset: str, **overrides: int | None) -> dict[str, int]:
    """``preset``'s shape with the given (not None) overrides: how a test or a quick run
    shrinks a big preset (fewer layers, a smaller vocab) and keeps the rest of it."""
    shape = dict(PRESETS[preset])
    unknown = set(overrides) - set(SHAPE_KEYS)
    if unknown:
        raise ValueError(f"unknown shape keys {sorted(unknown)}; have {SHAPE_KEYS}")
    shape |= {k: v for k, v in overrides.items() if v is not None}
    return shape


def synthetic_config(shape: dict[str, int], context: int) -> dict[str, Any]:
    """An HF config.json of ``shape``: a Qwen3, or a Qwen3-MoE (every layer sparse,
    renormalised top-k as Qwen3-30B-A3B) when the shape has experts."""
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
        "max_position_embeddings": max(context, 4096),
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


def synthetic_tensors(
    cfg: dict[str, Any], device: str | torch.device, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Random weights made (and later quantized) on ``device``: an 8B shape takes seconds
    on a GPU and minutes on a CPU. A MoE's experts come stacked, (n_experts, out, in) per
    projection as the GGUF holds them, in bfloat16: a 30B-A3B's are 29B weights, which in
    float32 would not fit beside the rest on one 141 GB GPU."""
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


def write_synthetic(
    path: Path, shape: dict[str, int], quant: str, context: int, device: torch.device
) -> Path:
    from helexa.engine.checkpoint.gguf_write import write_gguf

    cfg = synthetic_config(shape, context)
    return write_gguf(path, config=cfg, tensors=synthetic_tensors(cfg, device), quant=quant)


def timed(device: torch.device, fn: Callable[[], Any]) -> tuple[Any, float]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - start


def run(
    path: Path, device: torch.device, dtype: torch.dtype, prompt: int, new: int, repeat: int = 1
) -> dict:
    """Best of ``repeat`` timed runs (after one warm-up): on a shared machine the fastest
    run is the one least disturbed by neighbours."""

    def load() -> Qwen3:
        ckpt = load_checkpoint(path, device)
        model = model_class(ckpt.config, ckpt.source).from_checkpoint(ckpt, device, dtype)
        model.setup_cache(1, prompt + new)
        return model

    model, load_s = timed(device, load)
    vocab = model.vocab_size
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (1, prompt), generator=gen).to(device)

    def prefill() -> int:
        logits = model.forward(tokens, torch.arange(prompt, device=device), last_only=True)
        return int(logits[0, -1].argmax())

    # Decode steps as generation runs them: CUDA-graph replays on CUDA, forward elsewhere.
    graphs = GraphDecoder(model) if device.type == "cuda" else None

    def decode() -> int:
        token = first
        for pos in range(prompt, prompt + new - 1):
            step = torch.tensor([[token]], device=device)
            if graphs is not None:
                logits = graphs(step, pos)
            else:
                logits = model.forward(step, torch.tensor([pos], device=device), last_only=True)
            token = int(logits[0, -1].argmax())  # a host sync per token, as in generation
        return token

    timed(device, prefill)  # warm-up: first-call allocations and kernel selection
    ttft_s = decode_s = float("inf")
    for _ in range(repeat):
        first, seconds = timed(device, prefill)
        ttft_s = min(ttft_s, seconds)
        decode_s = min(decode_s, timed(device, decode)[1])
    decode_tps = (new - 1) / decode_s if new > 1 else float("nan")
    return {
        "load s": load_s,
        "TTFT ms": ttft_s * 1e3,
        "prefill tok/s": prompt / ttft_s,
        "decode tok/s": decode_tps,
        "weights MB": model.weight_bytes / 2**20,
        "weight GB/s": model.weight_bytes * decode_tps / 1e9,
    }


def table(rows: list[tuple[str, dict[str, float]]]) -> str:
    cols = list(rows[0][1])
    name_w = max(len("model"), *(len(n) for n, _ in rows))
    head = f"{'model':<{name_w}}  " + "  ".join(f"{c:>13}" for c in cols)
    lines = [head, "-" * len(head)]
    for name, row in rows:
        lines.append(f"{name:<{name_w}}  " + "  ".join(f"{row[c]:>13.2f}" for c in cols))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", type=Path, help="a .gguf file or HF model directory")
    src.add_argument("--synthetic", action="store_true", help="write and bench a random GGUF")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="small")
    for key in SHAPE_KEYS:
        ap.add_argument(f"--{key.replace('_', '-')}", type=int, help=f"override the preset's {key}")
    ap.add_argument(
        "--quant", default="Q8_0", help="synthetic file quant (F32, F16, Q8_0, Q4_K_M...)"
    )
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument(
        "--dtype", choices=sorted(DTYPES), help="activations (bfloat16 on CUDA, else float32)"
    )
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, help="torch CPU threads")
    ap.add_argument("--repeat", type=int, default=1, help="report the best of N runs")
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = (
        DTYPES[args.dtype]
        if args.dtype
        else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    )
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        if args.synthetic:
            shape = preset_shape(args.preset, **{k: getattr(args, k) for k in SHAPE_KEYS})
            path, write_s = timed(
                torch.device("cpu"),
                lambda: write_synthetic(
                    Path(tmp) / "synthetic.gguf",
                    shape,
                    args.quant,
                    args.prompt_tokens + args.new_tokens,
                    device,
                ),
            )
            name = f"synthetic {args.preset} {args.quant}"
            print(
                f"wrote {path.stat().st_size / 2**20:.1f} MB GGUF in {write_s:.1f} s",
                file=sys.stderr,
            )
        else:
            path, name = args.model, args.model.name
        result = run(path, device, dtype, args.prompt_tokens, args.new_tokens, args.repeat)
    where = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or platform.machine()
    )
    print(
        f"# {where}, torch {torch.__version__}, {str(dtype).removeprefix('torch.')}, "
        f"threads {torch.get_num_threads()}, prompt {args.prompt_tokens}, new {args.new_tokens}, "
        f"best of {args.repeat}"
    )
    print(table([(name, result)]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
