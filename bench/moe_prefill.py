"""A Qwen3-30B-A3B-shaped MoE prefill's expert GEMMs on one GPU: the grouped GEMM kernel
that reads the quantized blocks (quant.expert_gemm, fused gate/up with SiLU·mul, then
down) under each of its launch configs, against dequantize + torch._grouped_mm (what
expert_linear ran before), per prompt length. What it answers: which config each row
count wants (expert_gemm.CONFIGS) and where the kernel stops beating torch
(ops.EXPERT_GEMM_MAX_ROWS). Rows per expert = tokens * 8 / 128 on average.

    python bench/moe_prefill.py --tokens 512 4096 --layers 4 --out $OUT
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.gpu import cuda_ms  # noqa: E402
from bench.moe import random_layer  # noqa: E402
from bench.synthetic import QWEN3_PRESETS  # noqa: E402
from helexa.engine.models.qwen3_moe import SparseMoE  # noqa: E402
from helexa.engine.quant import expert_gemm, ops  # noqa: E402
from helexa.engine.quant.tensor import QuantizedTensor  # noqa: E402


def sorted_rows(moe: SparseMoE, x: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """x's (token, expert) rows sorted by expert and the counts, as SparseMoE._grouped."""
    _, experts = moe.route(x)
    flat = experts.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=moe.num_experts).tolist()
    return x.index_select(0, order // moe.top_k), counts


def torch_path(moe: SparseMoE, rows: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Dequantize + torch._grouped_mm (the kernel never preferred)."""
    keep = ops.EXPERT_GEMM_MAX_ROWS
    ops.EXPERT_GEMM_MAX_ROWS = 0
    try:
        h = ops.expert_swiglu(rows, moe.gate_proj, moe.up_proj, counts, moe.fused[0])
        return ops.expert_linear(h, moe.down_proj, counts)
    finally:
        ops.EXPERT_GEMM_MAX_ROWS = keep


def kernel_path(
    moe: SparseMoE, rows: torch.Tensor, counts: list[int], cfg: dict[str, Any] | None
) -> torch.Tensor:
    """The grouped GEMM kernel with launch config ``cfg`` (None: the one it picks)."""
    fused = moe.fused[0]
    assert isinstance(fused, QuantizedTensor) and isinstance(moe.down_proj, QuantizedTensor)
    h = expert_gemm.expert_gemm(rows, fused, counts, glu=True, config=cfg)
    return expert_gemm.expert_gemm(h, moe.down_proj, counts, config=cfg)


def config_name(c: dict[str, Any]) -> str:
    swap = "s" if c["SWAP"] else ""
    return f"m{c['BLOCK_M']}n{c['BLOCK_N']}{swap}w{c['num_warps']}p{c['num_stages']}"


def per_layer_us(
    path: Any, layers: list[SparseMoE], inputs: list[tuple[torch.Tensor, list[int]]]
) -> float:
    """Median microseconds per layer of ``path`` over every layer's rows."""

    def run() -> None:
        for moe, (rows, counts) in zip(layers, inputs, strict=True):
            path(moe, rows, counts)

    return cuda_ms(run, reps=10, warmup=2) * 1e3 / len(layers)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tokens", type=int, nargs="+", default=[512, 4096])
    ap.add_argument("--layers", type=int, default=4, help="distinct layers (beyond L2)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    shape = QWEN3_PRESETS["qwen3-30b-a3b"]
    layers = [random_layer(shape, seed) for seed in range(args.layers)]
    # The wrapper's own pick, each config it can pick, and each with wider column tiles or
    # a deeper pipeline.
    base = [dict(cfg) for _, cfg in expert_gemm.CONFIGS]
    variants = base + [{**c, "BLOCK_N": 128} for c in base] + [{**c, "num_stages": 3} for c in base]
    configs: dict[str, dict[str, Any] | None] = {"default": None}
    configs |= {config_name(c): c for c in variants}
    flop_per_row = 2 * 3 * shape["hidden"] * shape["moe_ffn"]  # gate, up, down
    results: dict[str, Any] = {"gpu": torch.cuda.get_device_name()}
    for tokens in args.tokens:
        x = torch.randn(tokens, shape["hidden"], device="cuda").bfloat16() * 0.1
        inputs = [sorted_rows(moe, x) for moe in layers]
        used = sum(1 for c in inputs[0][1] if c)
        row = {"rows/expert": tokens * shape["experts_per_tok"] / used}
        want = [torch_path(moe, r, c).float() for moe, (r, c) in zip(layers, inputs, strict=True)]

        row["torch us/layer"] = per_layer_us(torch_path, layers, inputs)
        for name, cfg in configs.items():
            err = max(
                float((kernel_path(moe, r, c, cfg).float() - w).norm() / w.norm())
                for moe, (r, c), w in zip(layers, inputs, want, strict=True)
            )
            us = per_layer_us(
                lambda moe, r, c, cfg=cfg: kernel_path(moe, r, c, cfg), layers, inputs
            )
            row[f"{name} us/layer"] = us
            row[f"{name} TFLOP/s"] = tokens * shape["experts_per_tok"] * flop_per_row / us / 1e6
            row[f"{name} rel err"] = err
        row["expert_linear picks"] = "kernel" if ops.prefer_expert_gemm(inputs[0][1]) else "torch"
        results[str(tokens)] = row
        print(f"# {results['gpu']}, {tokens} tokens, {row['rows/expert']:.0f} rows/expert")
        for key, value in row.items():
            print(
                f"{key:<32}{value:>12.4g}" if isinstance(value, float) else f"{key:<32}{value:>12}"
            )
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "moe_prefill.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
