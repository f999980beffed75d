"""A MoE prefill's grouped GEMM straight from the experts' ggml blocks (vLLM's fused_moe,
llama.cpp's mmq).

Rows of x (R, K) arrive sorted by expert, ``counts[e]`` of them for expert ``e`` of an
(E, N, K) stack. Expanding every expert to bf16 first (quant.ops.dequantize_experts)
writes and re-reads 2 bytes a weight (a Q4_K block holds 0.56) per projection whatever
the prompt; at 512 tokens an expert of a Qwen3-30B-A3B gets ~32 rows, so that traffic,
not the arithmetic, is the prefill. Here one launch covers all experts: a tile map
(:func:`expert_tiles`, as vLLM's moe_align_block_size, but the rows are already
contiguous per expert; :func:`device_tiles` where the counts stay on the device) names
the expert and rows of each M-tile, experts with no rows have no tiles, and each program decodes its BLOCK_N weight rows one unit (a k-quant
super-block, or up to 4 Q8_0 blocks) at a time in registers with quant.triton_kernels'
decoders, and feeds them to ``tl.dot`` in x's dtype with float32 accumulation; nothing
dequantized reaches memory.

The decoders' tiles follow the byte layout, not the element order; a dot's sum does not
care about the order along K, so each tile meets the activations at the element offsets
the decoder returns, and no weight is ever moved into element order.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from helexa.engine.quant.expert_rows import Counts, rows_per_expert
from helexa.engine.quant.formats import Q
from helexa.engine.quant.tensor import QuantizedTensor
from helexa.engine.quant.triton_kernels import (
    _check,
    _k_quant,
    _q8_0,
    _unit,
    _weight_rows,
)

# The activation dtypes the kernel multiplies in (the dequantized tiles are cast to x's).
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@triton.jit
def _dot_tile(acc, w, e, x_rows, keep, k0, BLOCK_N: tl.constexpr, SWAP: tl.constexpr, PRECISION: tl.constexpr):  # fmt: skip
    """``acc + x[:, k0 + e] @ w.T`` for one decoder tile ``w`` [BLOCK_N, 1, A, B] and its
    element offsets ``e`` [1, 1, A, B]; ``SWAP``: acc is transposed ([BLOCK_N, BLOCK_M],
    ``w @ x.T``), so a tile of few rows is the MMA's narrow N instead of its M (which is
    64 a warpgroup on Hopper, and the weights, produced in registers, are its A)."""
    width: tl.constexpr = w.shape[2] * w.shape[3]
    w = tl.reshape(w, [BLOCK_N, width]).to(x_rows.dtype.element_ty)
    # Every decoder's offsets run 16 or more contiguous from multiples of 16 (Q6_K's are
    # 16 long, Q4_K/Q5_K 32, Q8_0 all): vector loads of x.
    e = tl.max_contiguous(tl.multiple_of(tl.reshape(e, [width]), 16), 16)
    x = tl.load(x_rows + (k0 + e)[None, :], mask=keep, other=0.0)
    if SWAP:
        acc = tl.dot(w, tl.trans(x), acc, input_precision=PRECISION)
    else:
        acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)
    return acc


@triton.jit
def _dot_unit(acc, blk, x_rows, keep, k0, QTYPE: tl.constexpr, G: tl.constexpr, BLOCK_N: tl.constexpr, SWAP: tl.constexpr, PRECISION: tl.constexpr):  # fmt: skip
    """``acc`` plus one unit's products: the blocks at ``blk`` [BLOCK_N, 1, 1, 1] decoded
    (Q8_0 one tile of G blocks, k-quants two tiles of 128 weights) against x's columns
    from ``k0``."""
    if QTYPE == 8:
        w, e = _q8_0(blk, G)
        acc = _dot_tile(acc, w, e, x_rows, keep, k0, BLOCK_N, SWAP, PRECISION)
    else:
        w_a, e_a, w_b, e_b = _k_quant(blk, QTYPE)
        acc = _dot_tile(acc, w_a, e_a, x_rows, keep, k0, BLOCK_N, SWAP, PRECISION)
        acc = _dot_tile(acc, w_b, e_b, x_rows, keep, k0, BLOCK_N, SWAP, PRECISION)
    return acc


@triton.jit
def _expert_gemm_kernel(
    x_ptr,
    w_ptr,
    y_ptr,
    tiles_ptr,
    N,
    stride_x,
    stride_w,
    stride_e,
    stride_y,
    N_UNITS: tl.constexpr,
    QTYPE: tl.constexpr,
    UNIT: tl.constexpr,
    UNIT_BYTES: tl.constexpr,
    G: tl.constexpr,
    GLU: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SWAP: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """y[r, n] = sum_k x[r, k] * W_e[n, k] for the rows r of M-tile ``program_id(0)``
    (tile map row: expert e, first row, end of e's rows) and BLOCK_N columns n.

    Grid (tiles, column tiles), tiles fastest: an expert's M-tiles are consecutive in the
    map, so the programs reading one weight tile run together and share it in L2.
    ``GLU``: the stack is a fused [gate | up] (E, 2N, K) and y = silu(gate) * up, both
    from one read of x's tile, in float32 and rounded once."""
    tile = tl.program_id(0)
    start = tl.load(tiles_ptr + 3 * tile + 1)
    stop = tl.load(tiles_ptr + 3 * tile + 2)
    if start >= stop:  # a map made on the device is padded to its most tiles with empty ones
        return
    rows = start + tl.arange(0, BLOCK_M)
    keep = (rows < stop)[:, None]
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_x
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    w_rows = _weight_rows(w_ptr, tiles_ptr, 3 * tile, cols, N, stride_w, stride_e, True)
    if SWAP:
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_up = acc
    up = N.to(tl.int64) * stride_w  # the up rows, N past the gate rows
    for u in range(N_UNITS):
        blk = w_rows + u * UNIT_BYTES
        acc = _dot_unit(acc, blk, x_rows, keep, u * UNIT, QTYPE, G, BLOCK_N, SWAP, PRECISION)
        if GLU:
            acc_up = _dot_unit(
                acc_up, blk + up, x_rows, keep, u * UNIT, QTYPE, G, BLOCK_N, SWAP, PRECISION
            )
    if GLU:
        acc = acc * tl.sigmoid(acc) * acc_up
    if SWAP:
        acc = tl.trans(acc)
    y = y_ptr + rows.to(tl.int64)[:, None] * stride_y + cols[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=keep & (cols < N)[None, :])


# Average rows per expert with rows -> (BLOCK_M, BLOCK_N, SWAP, num_warps, num_stages):
# the first entry whose bound the average is within. Few rows: an M-tile barely wider
# than them (padding rows cost MMA work and nothing else) with the weights as the MMA's
# M side (SWAP); many: 64-row tiles, x as M (a Hopper warpgroup MMA is 64 rows). Eight
# warps: at four, ptxas (sm_90) needs all 255 registers and spills for Q6_K and Q8_0.
# From bench/moe_prefill.py on an H200 (a 30B-A3B's layers, Q4_K gate/up fused, Q6_K
# down; µs a layer for 4 / 32 / 128 / 256 rows an expert): 128 columns beat 64 at every
# count (m16 813 vs 964 at 4 rows, m32 1 131 vs 1 683 at 32, m64 2 940 vs 3 465 at
# 128); a third pipeline stage changed nothing. The whole table is in bench/RESULTS.md.
CONFIGS: tuple[tuple[float, dict[str, Any]], ...] = (
    (16, dict(BLOCK_M=16, BLOCK_N=128, SWAP=True, num_warps=8, num_stages=2)),
    (32, dict(BLOCK_M=32, BLOCK_N=128, SWAP=True, num_warps=8, num_stages=2)),
    (float("inf"), dict(BLOCK_M=64, BLOCK_N=128, SWAP=False, num_warps=8, num_stages=2)),
)
# Q6_K's fused gate/up holds four decoded tiles at once: at 64 columns it spills (~300 B
# a thread on sm_90), at 32 (with x as the MMA's M side, which needs 64 rows) it does not.
Q6_K_GLU = dict(BLOCK_M=64, BLOCK_N=32, SWAP=False)
# Q8_0 blocks per unit: 8 (a 256-wide K step, as the matvec reads them) needs ~2x the
# registers of 4 for the same tile.
Q8_0_BLOCKS = 4


def config_for(
    counts: Counts, qtype: Q, glu: bool = False, rows: int | None = None
) -> dict[str, Any]:
    """The launch options for ``counts`` rows per expert of ``qtype`` (see :data:`CONFIGS`;
    ``rows``: their sum, needed where the counts are on the device, see
    quant.expert_rows)."""
    avg = rows_per_expert(counts, rows)
    cfg = dict(next(cfg for bound, cfg in CONFIGS if avg <= bound))
    if glu and qtype == Q.Q6_K:
        cfg.update(Q6_K_GLU)
    return cfg


def gemm_unit(qtype: Q, k: int) -> tuple[int, int, int]:
    """(weights, bytes, Q8_0 blocks) per K step: the matvec's unit (triton_kernels._unit),
    at most :data:`Q8_0_BLOCKS` Q8_0 blocks."""
    unit, unit_bytes, g = _unit(qtype, k)
    if g > Q8_0_BLOCKS:  # g and Q8_0_BLOCKS are powers of two: a smaller one divides K too
        unit, unit_bytes, g = unit // g * Q8_0_BLOCKS, unit_bytes // g * Q8_0_BLOCKS, Q8_0_BLOCKS
    return unit, unit_bytes, g


# The last tile map built: a MoE layer's projections share their counts (gate/up, down).
_last_tiles: tuple[tuple[Any, ...], torch.Tensor] | None = None


def expert_tiles(counts: list[int], block_m: int, device: torch.device) -> torch.Tensor:
    """The tile map, int32 (tiles, 3) on ``device``: per M-tile of ``block_m`` rows its
    expert, first row, and the end of its expert's rows (a tile's last rows may be
    short). Experts' tiles in order; experts with no rows have none. Built in Python:
    torch's CPU ops (repeat_interleave) took 7 ms a call on a busy 16-core host, 0.66 s
    of a 64-token prompt's 0.82 s on a 48-layer MoE."""
    global _last_tiles
    key = (tuple(counts), block_m, device)
    if _last_tiles is not None and _last_tiles[0] == key:
        return _last_tiles[1]
    rows: list[tuple[int, int, int]] = []
    end = 0
    for expert, count in enumerate(counts):
        start, end = end, end + count
        rows.extend((expert, first, end) for first in range(start, end, block_m))
    tiles = torch.tensor(rows, dtype=torch.int32).reshape(-1, 3).to(device)
    _last_tiles = (key, tiles)
    return tiles


# The last map device_tiles made, for the counts tensor it was made from (held, so that
# no other tensor can take its identity).
_last_device_tiles: tuple[torch.Tensor, tuple[int, int], torch.Tensor] | None = None


def device_tiles(counts: torch.Tensor, rows: int, block_m: int) -> torch.Tensor:
    """:func:`expert_tiles` from per-expert row counts still on the device (E,), with no
    host sync: the map padded to the most tiles ``rows`` rows can need,
    cdiv(rows, block_m) + E, its tiles first and the rest empty (first row == end),
    which the kernel skips. A prefill's MoE layer then never waits for the GPU. The last
    map is kept for the same counts tensor (a layer's gate/up and down share it)."""
    global _last_device_tiles
    last = _last_device_tiles
    if last is not None and last[0] is counts and last[1] == (rows, block_m):
        return last[2]
    given, e = counts, counts.shape[0]
    counts = counts.to(torch.int64)
    per = (counts + block_m - 1) // block_m  # tiles per expert
    tile_end = per.cumsum(0)  # each expert's tiles end here
    row_end = counts.cumsum(0)
    t = torch.arange(triton.cdiv(rows, block_m) + e, device=counts.device)
    expert = torch.searchsorted(tile_end, t, right=True).clamp_(max=e - 1)
    live = t < tile_end[-1]
    start = row_end[expert] - counts[expert] + (t - tile_end[expert] + per[expert]) * block_m
    end = row_end[expert]
    start, end = torch.where(live, start, 0), torch.where(live, end, 0)
    tiles = torch.stack([expert, start, end], dim=1).to(torch.int32)
    _last_device_tiles = (given, (rows, block_m), tiles)
    return tiles


def expert_gemm(
    x: torch.Tensor,
    experts: QuantizedTensor,
    counts: Counts,
    *,
    glu: bool = False,
    config: dict[str, Any] | None = None,
) -> torch.Tensor:
    """Rows of ``x`` (R, K) sorted by expert, ``counts[e]`` of them for expert ``e`` of the
    quantized stack ``experts`` (E, N, K), each times its expert: (R, N) in x's dtype, in
    one launch. ``glu``: ``experts`` is a fused [gate | up] stack (E, 2F, K) and the
    result silu(x @ gate.T) * (x @ up.T), (R, F). ``config``: launch options
    (BLOCK_M, BLOCK_N, SWAP, num_warps, num_stages) instead of :func:`config_for`'s.
    ``counts`` may be an (E,) integer tensor on x's device (a MoE layer's bincount): then
    nothing reads them on the host (:func:`device_tiles`), and they are trusted to be
    non-negative and to add up to x's rows, which checking would need a sync for."""
    _check(experts)
    if len(experts.shape) != 3:
        raise ValueError(f"expert_gemm takes an (E, N, K) expert stack, got {experts.shape}")
    e, n, k = experts.shape
    if x.dim() != 2 or x.shape[1] != k or x.stride(-1) != 1:
        raise ValueError(
            f"expert_gemm: x must be (rows, {k}) with unit stride, got {tuple(x.shape)}"
        )
    if x.dtype not in DTYPES:
        raise ValueError(f"expert_gemm: x must be bfloat16, float16 or float32, got {x.dtype}")
    if isinstance(counts, torch.Tensor):
        if counts.shape != (e,) or counts.is_floating_point() or counts.device != x.device:
            raise ValueError(
                f"expert_gemm: counts must be {e} integer row counts on {x.device}, got "
                f"{counts.dtype} {tuple(counts.shape)} on {counts.device}"
            )
    elif len(counts) != e or any(c < 0 for c in counts) or sum(counts) != x.shape[0]:
        raise ValueError(
            f"expert_gemm: counts must be {e} non-negative row counts adding up to x's "
            f"{x.shape[0]} rows, got {len(counts)} adding up to {sum(counts)}"
        )
    if x.device != experts.device:
        raise ValueError(f"expert_gemm: x on {x.device}, experts on {experts.device}")
    if glu and n % 2:
        raise ValueError(f"expert_gemm: a fused gate/up stack has an even width, got {n}")
    width = n // 2 if glu else n
    y = torch.empty(x.shape[0], width, dtype=x.dtype, device=x.device)
    if x.shape[0] == 0:
        return y
    cfg = dict(config or config_for(counts, experts.qtype, glu, x.shape[0]))
    if isinstance(counts, torch.Tensor):
        tiles = device_tiles(counts, x.shape[0], cfg["BLOCK_M"])
    else:
        tiles = expert_tiles(counts, cfg["BLOCK_M"], x.device)
    unit, unit_bytes, g = gemm_unit(experts.qtype, k)
    data = experts.data
    grid = (tiles.shape[0], triton.cdiv(width, cfg["BLOCK_N"]))
    _expert_gemm_kernel[grid](
        x, data, y, tiles, width, x.stride(0), data.stride(1), data.stride(0), y.stride(0),
        N_UNITS=k // unit, QTYPE=int(experts.qtype), UNIT=unit, UNIT_BYTES=unit_bytes, G=g,
        GLU=glu, PRECISION="ieee" if x.dtype == torch.float32 else None, **cfg,
    )  # fmt: skip
    return y
