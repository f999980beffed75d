"""A Qwen3-30B-A3B-shaped MoE decode step on one GPU: the fused path (SparseMoE.fused_decode:
routing in one launch, one grouped matvec of the fused gate/up stack reading each token's
int8 x once, SiLU·mul, down with the weighted sum over the token's experts) against the
reference path (router matmul, softmax, top-k in torch, one grouped matvec launch per
projection over the routed experts' blocks, the sum in torch) and against what that
replaced (gather the picked experts' blocks, then one matvec launch per (token, expert)
row), each eager and replayed from a CUDA graph; GB/s counts the routed experts' bytes.
The routing alone is timed both ways too.

    python bench/moe.py --layers 8 --out $OUT
    python bench/moe.py --layers 8 --tokens 4
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
from helexa.engine.models import decode_kernels  # noqa: E402
from helexa.engine.models.qwen3 import fuse_projections  # noqa: E402
from helexa.engine.models.qwen3_moe import SparseMoE  # noqa: E402
from helexa.engine.quant.formats import Q  # noqa: E402
from helexa.engine.quant.ops import linear  # noqa: E402
from helexa.engine.quant.quantize import quantize  # noqa: E402
from helexa.engine.quant.tensor import QuantizedTensor  # noqa: E402
from helexa.engine.quant.triton_kernels import quantize_rows  # noqa: E402


def random_layer(shape: dict[str, int], seed: int) -> SparseMoE:
    """Random experts quantized as Q4_K_M keeps them (gate/up Q4_K, fused into one stack as
    the loader fuses them; down Q6_K)."""
    gen = torch.Generator("cuda").manual_seed(seed)
    e, h, m = shape["experts"], shape["hidden"], shape["moe_ffn"]

    def stack(out: int, cols: int, qtype: Q) -> QuantizedTensor:
        w = torch.randn(e, out, cols, generator=gen, device="cuda") * cols**-0.5
        return QuantizedTensor(quantize(w, qtype), qtype, (e, out, cols))

    router = torch.randn(e, h, generator=gen, device="cuda").bfloat16()
    gate, up, down = stack(m, h, Q.Q4_K), stack(m, h, Q.Q4_K), stack(h, m, Q.Q6_K)
    fused, (gate, up) = fuse_projections([gate, up])
    return SparseMoE(router, gate, up, down, shape["experts_per_tok"], True, fused)


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
    # The int8 activations the norm kernel before the block writes with its output.
    xq = quantize_rows(x)

    def fused(moe: SparseMoE, x: torch.Tensor) -> torch.Tensor:
        return moe.fused_decode(x, xq, decode_kernels)

    def route_kernel(moe: SparseMoE, x: torch.Tensor) -> object:
        return decode_kernels.route(x, moe.router, moe.top_k, moe.norm_topk_prob)

    results: dict[str, float] = {}
    for name, ref in (("grouped", SparseMoE.decode), ("gather", gather_and_loop)):
        results[f"fused vs {name} rel err"] = max(
            float((fused(moe, x).float() - ref(moe, x).float()).norm())
            / float(ref(moe, x).float().norm())
            for moe in layers
        )
    steps: dict[str, Callable[[SparseMoE, torch.Tensor], object]] = {
        "fused": fused,
        "grouped": SparseMoE.decode,
        "gather+loop": gather_and_loop,
        "route kernel": route_kernel,
        "route torch": SparseMoE.route,
    }
    for name, step in steps.items():

        def run(step: Callable[[SparseMoE, torch.Tensor], object] = step) -> None:
            for moe in layers:
                step(moe, x)

        run()  # compile + autotune (and the routing's tickets) outside the capture
        eager = cuda_ms(run, reps=10, warmup=2)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            run()
        replay = cuda_ms(graph.replay, reps=20, warmup=3)
        results[f"{name} eager us/layer"] = eager * 1e3 / args.layers
        results[f"{name} graph us/layer"] = replay * 1e3 / args.layers
        if not name.startswith("route"):
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
