"""A Qwen3-30B-A3B-shaped MoE decode step on one GPU: the grouped matvec (one launch per
projection over the routed experts' blocks) against what it replaced (gather the picked
experts' blocks, then one matvec launch per (token, expert) row), both eager and replayed
from a CUDA graph; GB/s counts the routed experts' bytes.

    python bench/moe.py --layers 8 --out $OUT
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.gpu import cuda_ms  # noqa: E402
from bench.synthetic import QWEN3_PRESETS  # noqa: E402
from helexa.engine.models.qwen3_moe import SparseMoE  # noqa: E402
from helexa.engine.quant.formats import Q  # noqa: E402
from helexa.engine.quant.ops import linear  # noqa: E402
from helexa.engine.quant.quantize import quantize  # noqa: E402
from helexa.engine.quant.tensor import QuantizedTensor  # noqa: E402


def random_layer(shape: dict[str, int], seed: int) -> SparseMoE:
    """Random experts quantized as Q4_K_M keeps them (gate/up Q4_K, down Q6_K)."""
    gen = torch.Generator("cuda").manual_seed(seed)
    e, h, m = shape["experts"], shape["hidden"], shape["moe_ffn"]

    def stack(out: int, cols: int, qtype: Q) -> QuantizedTensor:
        w = torch.randn(e, out, cols, generator=gen, device="cuda") * cols**-0.5
        return QuantizedTensor(quantize(w, qtype), qtype, (e, out, cols))

    router = torch.randn(e, h, generator=gen, device="cuda").bfloat16()
    gate, up, down = stack(m, h, Q.Q4_K), stack(m, h, Q.Q4_K), stack(h, m, Q.Q6_K)
    return SparseMoE(router, gate, up, down, shape["experts_per_tok"], True)


def gather_and_loop(moe: SparseMoE, x: torch.Tensor) -> torch.Tensor:
    """The decode step before the grouped kernel, kept here as the baseline."""
    weights, experts = moe.route(x)
    tokens, k = experts.shape
    index = experts.reshape(-1)
    rows = x[:, None, :].expand(tokens, k, x.shape[-1]).reshape(tokens * k, -1)

    def per_row(inp: torch.Tensor, stack: QuantizedTensor) -> torch.Tensor:
        picked = stack.index_select(index)
        return torch.cat([linear(inp[j : j + 1], picked[j]) for j in range(index.shape[0])])

    h = F.silu(per_row(rows, moe.gate_proj)) * per_row(rows, moe.up_proj)
    out = per_row(h, moe.down_proj).view(tokens, k, -1)
    return (out * weights[..., None]).sum(dim=1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--layers", type=int, default=8, help="distinct layers (beyond L2)")
    ap.add_argument("--tokens", type=int, default=1, help="decode batch")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    shape = QWEN3_PRESETS["qwen3-30b-a3b"]
    layers = [random_layer(shape, seed) for seed in range(args.layers)]
    x = torch.randn(args.tokens, shape["hidden"], device="cuda").bfloat16() * 0.1
    moe0 = layers[0]
    per_row = (
        moe0.gate_proj.nbytes // moe0.num_experts * 2 + moe0.down_proj.nbytes // moe0.num_experts
    )
    routed = args.layers * per_row * moe0.top_k * args.tokens
    results: dict[str, float] = {}
    err = max(
        float((moe.decode(x).float() - gather_and_loop(moe, x).float()).norm())
        / float(gather_and_loop(moe, x).float().norm())
        for moe in layers
    )
    results["grouped vs gather rel err"] = err
    for name, step in (("grouped", SparseMoE.decode), ("gather+loop", gather_and_loop)):

        def run(step: Callable[[SparseMoE, torch.Tensor], torch.Tensor] = step) -> None:
            for moe in layers:
                step(moe, x)

        run()  # compile + autotune outside the capture
        eager = cuda_ms(run, reps=10, warmup=2)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            run()
        replay = cuda_ms(graph.replay, reps=20, warmup=3)
        results[f"{name} eager us/layer"] = eager * 1e3 / args.layers
        results[f"{name} graph us/layer"] = replay * 1e3 / args.layers
        results[f"{name} graph GB/s"] = routed / (replay / 1e3) / 1e9
    print(f"# {torch.cuda.get_device_name()}, {args.layers} layers, {args.tokens} token(s)")
    for key, value in results.items():
        print(f"{key:<28}{value:>12.3g}")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "moe.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
