"""The int8 matvec's launch configs on each decode shape of the Qwen3 8B (Q4_K_M) and 0.6B
(Q8_0) files bench/synthetic.py writes: µs per call replayed from a CUDA graph (as decode
runs it, activations already quantized as the glue kernels leave them) and the weight
bandwidth that is, per config, so a change to the kernel or to its config list can be
judged shape by shape before it goes through the server. The weights are random blocks
quantized by helexa's own quantizer; the error column is against a float32 matmul of
their dequantized values.

Each call reads a weight from DRAM, as decode does (every weight once a token, 5 GB of
them through a 50 MB L2): one graph replays the matvec over as many copies of the
weight as span four L2s and the time is divided by their number. ``--resident``
replays one copy, as this script did before stop 30, where a matrix under the L2's
size (the 8B's q/k, o and v, each of the 0.6B's but lm_head) is read from L2 after
the first replay: the autotuner's timing at load is that one.

    python3 bench/matvec_configs.py                  # every shape, every config
    python3 bench/matvec_configs.py --only lm_head --configs 1,4,1 1,8,1
    python3 bench/matvec_configs.py --only 8b --resident   # one copy, L2-warm

Prints one table (a row per shape, the fastest config and the list's fastest beside it);
nothing is asserted.
"""

from __future__ import annotations

import argparse
import math
import time
from functools import partial

import torch
from gguf import GGMLQuantizationType as Q

# (name, out rows N, in K, block type): the 8B's fused q/k, o, fused gate/up, down, v and
# lm_head as its Q4_K_M mix quantizes them, and the 0.6B's Q8_0 ones.
SHAPES = [
    ("8b qk", 5120, 4096, Q.Q4_K),
    ("8b v", 1024, 4096, Q.Q6_K),
    ("8b o", 4096, 4096, Q.Q4_K),
    ("8b gate_up", 24576, 4096, Q.Q4_K),
    ("8b down", 4096, 12288, Q.Q6_K),
    ("8b lm_head", 151936, 4096, Q.Q6_K),
    ("0.6b qkv", 4096, 1024, Q.Q8_0),
    ("0.6b o", 1024, 2048, Q.Q8_0),
    ("0.6b gate_up", 6144, 1024, Q.Q8_0),
    ("0.6b down", 1024, 3072, Q.Q8_0),
    ("0.6b lm_head", 151936, 1024, Q.Q8_0),
]
# Beyond the kernel's own list: more rows and warps a program (an H200 sweep in stop 27
# found each slower than the list's (1, 4, 1) on every shape above).
EXTRA = [(4, 16, 4), (8, 8, 8), (8, 16, 8), (4, 16, 8), (2, 16, 8), (4, 4, 4)]


def _cell(timed: tuple[float, tuple[int, ...]], mb: float) -> str:
    return f"{timed[1]}: {timed[0]:.1f} µs, {mb / timed[0]:.2f} TB/s"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="*", default=[], help="shapes whose name contains one")
    ap.add_argument("--configs", nargs="*", help="BLOCK_N,U,num_warps triples (default: all)")
    ap.add_argument("--resident", action="store_true", help="replay one copy (L2-warm)")
    args = ap.parse_args(argv)
    from triton.testing import do_bench_cudagraph  # a GPU's: imported past --help

    from helexa.engine.quant import triton_kernels as tk
    from helexa.engine.quant.quantize import quantize
    from helexa.engine.quant.tensor import QuantizedTensor

    listed = [(c.kwargs["BLOCK_N"], c.kwargs["U"], c.num_warps) for c in tk._INT8_CONFIGS]
    configs = [tuple(int(v) for v in c.split(",")) for c in args.configs or []]
    configs = configs or [*listed, *EXTRA]
    props = torch.cuda.get_device_properties(0)
    span = 4 * props.L2_cache_size  # bytes of weights a timed graph reads, at least
    reads = "one copy (L2-warm)" if args.resident else f"copies spanning {span / 1e6:.0f} MB"
    print(f"# {props.name}; {reads}; configs (BLOCK_N, U, num_warps): {configs}")
    print("| shape | MB | fastest listed (µs, TB/s) | fastest (µs, TB/s) | max rel. error |")
    print("|---|---:|---|---|---:|")
    start = time.perf_counter()
    for name, n, k, qtype in SHAPES:
        if args.only and not any(part in name for part in args.only):
            continue
        gen = torch.Generator("cuda").manual_seed(n + k)
        dense = torch.randn(n, k, device="cuda", generator=gen) * 0.02
        weight = QuantizedTensor(quantize(dense, qtype).view(n, -1), qtype, (n, k))
        del dense
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16, generator=gen)
        xq = tk.quantize_rows(x)
        want = x.float() @ weight.dequantize(torch.float32).T
        copies = 1 if args.resident else min(64, math.ceil(span / weight.nbytes))
        weights = [weight] + [
            QuantizedTensor(weight.data.clone(), qtype, (n, k)) for _ in range(copies - 1)
        ]
        timed: list[tuple[float, tuple[int, ...]]] = []
        error = 0.0
        for bn, u, warps in configs:
            config = {"BLOCK_N": bn, "U": u, "num_warps": warps, "INT8": True}
            run = partial(tk.matvec, x, weight, config, quantized=xq)
            try:
                got = run().float()
            except Exception as e:  # a config this GPU cannot launch (registers, shared memory)
                print(f"# {name} {(bn, u, warps)}: {type(e).__name__}: {str(e)[:120]}")
                continue
            error = max(error, ((got - want).abs().max() / want.abs().max()).item())
            calls = [partial(tk.matvec, x, w, config, quantized=xq) for w in weights]
            us = do_bench_cudagraph(lambda calls=calls: [c() for c in calls], rep=20) * 1e3
            timed.append((us / copies, (bn, u, warps)))
        del weights
        mb = weight.nbytes / 1e6
        mine = [t for t in timed if t[1] in listed]
        best_listed = _cell(min(mine), mb) if mine else ""
        print(f"| {name} | {mb:.1f} | {best_listed} | {_cell(min(timed), mb)} | {error:.4f} |")
        print("|  |  | " + " ".join(f"{c}:{t:.1f}" for t, c in timed) + " |  |  |", flush=True)
    print(f"# {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
