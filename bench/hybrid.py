"""helexa vs llama.cpp on a hybrid model: a Qwen3.5-9B-shaped GGUF with random weights.

Writes the GGUF with helexa's own writer (llama.cpp's converter's layout: split DeltaNet
projections, tiled value heads, ssm_a = -exp(A_log), 1 + w norms; see
helexa.engine.checkpoint.gguf_write) unless it exists, then measures helexa's prefill
tok/s at each ``--prompts`` length (one forward per PREFILL_CHUNK, as the server runs it)
and batch-1 decode tok/s over ``--gen`` tokens (CUDA-graph steps of
qwen3_next.decode_step, argmax synced every token). With ``--llama-bench`` the same file
goes through llama-bench (bench/llama_cpp.py builds it) and the table shows both.

    python bench/hybrid.py --gguf /tmp/hx/q35-9b.gguf --out $OUT               # on the GPU
    python bench/hybrid.py --preset tiny --quant F32 --gguf /tmp/t.gguf --device cpu \
        --prompts 80 --gen 8                                                   # a smoke run

Nothing here asserts a speed: it prints what it measured (and writes hybrid.json to --out).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.decode import timed  # noqa: E402
from bench.gpu import byte_level_vocab  # noqa: E402
from helexa.engine.checkpoint.safetensors import load_checkpoint  # noqa: E402
from helexa.engine.generate import PREFILL_CHUNK  # noqa: E402
from helexa.engine.models.architectures import model_class  # noqa: E402
from helexa.engine.models.cuda_graph import GraphDecoder  # noqa: E402
from helexa.engine.models.qwen3_next import FULL, LINEAR, Qwen3Next, decode_step  # noqa: E402

PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(hidden=64, layers=4, heads=4, kv_heads=2, head_dim=16, ffn=128,
                 k_heads=2, v_heads=4, k_dim=16, v_dim=16, vocab=512),
    # Qwen3.5-9B's text model (its config.json's shape).
    "qwen3.5-9b": dict(hidden=4096, layers=32, heads=16, kv_heads=4, head_dim=256, ffn=12288,
                       k_heads=16, v_heads=32, k_dim=128, v_dim=128, vocab=248320),
}  # fmt: skip


def synthetic_config(shape: dict[str, int], context: int) -> dict[str, Any]:
    layers = shape["layers"]
    return {
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
            "partial_rotary_factor": 0.25,
            "mrope_section": [11, 11, 10],
        },
        "max_position_embeddings": max(context, 4096),
        "tie_word_embeddings": False,
    }


def synthetic_tensors(cfg: dict[str, Any], device: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """HF-named random weights (Qwen3.5's layout), made on ``device``; zero-centred norms
    at 0, the DeltaNet's decay rates in transformers' init range."""
    gen = torch.Generator(device).manual_seed(seed)
    h, f, hd = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    nv, kdim = (
        cfg["linear_num_value_heads"],
        cfg["linear_num_key_heads"] * cfg["linear_key_head_dim"],
    )
    vdim = nv * cfg["linear_value_head_dim"]

    def w(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=device) * shape[-1] ** -0.5

    def zeros(n: int) -> torch.Tensor:
        return torch.zeros(n, device=device)

    tensors = {
        "model.embed_tokens.weight": w(cfg["vocab_size"], h),
        "lm_head.weight": w(cfg["vocab_size"], h),
        "model.norm.weight": zeros(h),
    }
    for i, kind in enumerate(cfg["layer_types"]):
        p = f"model.layers.{i}."
        tensors |= {
            p + "input_layernorm.weight": zeros(h),
            p + "post_attention_layernorm.weight": zeros(h),
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
        tensors |= {
            p + "linear_attn.in_proj_qkv.weight": w(2 * kdim + vdim, h),
            p + "linear_attn.in_proj_z.weight": w(vdim, h),
            p + "linear_attn.in_proj_b.weight": w(nv, h),
            p + "linear_attn.in_proj_a.weight": w(nv, h),
            p + "linear_attn.conv1d.weight": w(2 * kdim + vdim, 1, 4),
            p + "linear_attn.A_log": a.log(),
            p + "linear_attn.dt_bias": torch.ones(nv, device=device),
            p + "linear_attn.norm.weight": torch.ones(cfg["linear_value_head_dim"], device=device),
            p + "linear_attn.out_proj.weight": w(h, vdim),
        }
    return tensors


def write_model(path: Path, preset: str, quant: str, context: int, device: str) -> None:
    if path.exists():
        return
    from helexa.engine.checkpoint.gguf_write import write_gguf

    cfg = synthetic_config(PRESETS[preset], context)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial")
    vocab = byte_level_vocab(cfg["vocab_size"])
    tensors = synthetic_tensors(cfg, device)
    write_gguf(tmp, config=cfg, tensors=tensors, quant=quant, tokenizer_fields=vocab)
    tmp.rename(path)


def helexa(path: Path, device: torch.device, prompts: list[int], gen: int) -> dict[str, float]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    ckpt = load_checkpoint(path, device)
    model = model_class(ckpt.config).from_checkpoint(ckpt, device, dtype)
    assert isinstance(model, Qwen3Next)
    model.setup_cache(1, max(prompts) + gen)
    vocab = model.vocab_size
    out: dict[str, float] = {}
    for length in sorted(prompts):
        tokens = torch.randint(0, vocab, (1, length), device=device)

        def prefill(tokens: torch.Tensor = tokens, length: int = length) -> int:
            for start in range(0, length, PREFILL_CHUNK):
                chunk = tokens[:, start : start + PREFILL_CHUNK]
                pos = torch.arange(start, start + chunk.shape[1], device=device)
                logits = model.forward(chunk, pos, last_only=True)
            return int(logits[0, -1].argmax())

        timed(device, prefill)  # first-call kernels and allocations
        first, seconds = timed(device, prefill)
        out[f"pp{length} tok/s"] = length / seconds
    decoder = GraphDecoder(model, step=decode_step)

    def decode() -> None:
        token, start = first, max(prompts)
        for pos in range(start, start + gen):
            logits = decoder(torch.tensor([[token]], device=device), pos)
            token = int(logits[0, -1].argmax())

    timed(device, prefill)
    timed(device, decode)  # captures the graphs of the kv buckets it crosses
    timed(device, prefill)
    out[f"tg{gen} tok/s"] = gen / timed(device, decode)[1]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--gguf", type=Path, required=True, help="written here unless it exists")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="qwen3.5-9b")
    ap.add_argument("--quant", default="Q4_K_M")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--prompts", type=int, nargs="+", default=[512, 16384])
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--llama-bench", type=Path, help="a built llama-bench binary")
    ap.add_argument("--out", type=Path, help="directory for hybrid.json")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    start = time.perf_counter()
    write_model(args.gguf, args.preset, args.quant, max(args.prompts) + args.gen, args.device)
    print(f"GGUF ready in {time.perf_counter() - start:.0f} s: {args.gguf}", file=sys.stderr)
    results = {"helexa": helexa(args.gguf, device, args.prompts, args.gen)}
    if args.llama_bench:
        from bench.llama_cpp import run_bench, summarise

        records = run_bench(args.llama_bench, args.gguf, prompts=tuple(args.prompts), gen=args.gen)
        results["llama.cpp"] = summarise(records)
    for name, row in results.items():
        print(name, "  ".join(f"{k} {v:.1f}" for k, v in row.items()))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "hybrid.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
