"""Triton kernels that read ggml blocks straight from device memory.

Decode is memory-bound: every weight byte is read once per token, so the matvec reads the
blocks once, unpacks them in registers and accumulates in float32; nothing dequantized ever
reaches memory. Prefill is compute-bound: a chunk of rows is dequantized to the activation
dtype by a second kernel and handed to cuBLAS, which does the arithmetic far better than
we would (dequant traffic is small next to the matmul at hundreds of tokens).

Both kernels share one decoder per format (``_q8_0``, ``_q4_k``, ``_q5_k``, ``_q6_k``).
A decoder turns the blocks of ``BLOCK_N`` rows at one "unit" (a k-quant super-block of
256 weights, or ``G`` Q8_0 blocks) into float32 tiles plus the position of each tile
element inside the unit. The tiles follow the byte layout, not the element order, so
each byte is loaded once and both of its nibbles are used; the matvec gathers the
matching activations by position and the dequant kernel scatters to them. Layouts are
documented in :mod:`helexa.engine.quant.formats`; the arithmetic mirrors reference.py.
"""

from __future__ import annotations

import inspect
import os
from typing import Any

import torch
import triton
import triton.language as tl

from helexa.engine.quant import grid_dependency
from helexa.engine.quant.formats import QK_K, Q, block_format
from helexa.engine.quant.grid_dependency import await_inputs
from helexa.engine.quant.kernel_choices import KernelChoices
from helexa.engine.quant.tensor import INT8_DTYPES, Int8Rows, QuantizedTensor

SUPPORTED = (Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K)
# Up to this many activation rows the matvec wins (each row re-reads the weights from L2);
# past it, dequantize + cuBLAS matmul.
MATVEC_MAX_ROWS = 4
# Weights dequantized per prefill step: 64M bf16 = 128 MiB of scratch.
DEQUANT_CHUNK_ELEMENTS = 1 << 26
# One fixed matvec config instead of autotuning: under the interpreter (TRITON_INTERPRET=1,
# for debugging on a CPU) and for tests (HELEXA_TRITON_AUTOTUNE=0), where tuning every tiny
# shape would cost minutes of compiles.
AUTOTUNE = (
    os.environ.get("TRITON_INTERPRET") != "1" and os.environ.get("HELEXA_TRITON_AUTOTUNE") != "0"
)

_Q8_0, _Q4_K, _Q5_K, _Q6_K = int(Q.Q8_0), int(Q.Q4_K), int(Q.Q5_K), int(Q.Q6_K)


@triton.jit
def _f16_at(ptr):
    """An f16 field at a (2-byte aligned) byte pointer, as float32."""
    return tl.load(ptr.to(tl.pointer_type(tl.float16))).to(tl.float32)


@triton.jit
def _scale_min_k4(sp, s):
    """Q4_K/Q5_K 6-bit scale and min of sub-block ``s`` from the 12 bytes at ``sp``."""
    b_s = tl.load(sp + s).to(tl.int32)
    b_s4 = tl.load(sp + s + 4).to(tl.int32)
    b_m4 = tl.load(sp + tl.where(s >= 4, s - 4, s)).to(tl.int32)
    return _unpack_scale_min(b_s, b_s4, b_m4, s < 4)


@triton.jit
def _unpack_scale_min(b_s, b_s4, b_m4, low):
    """Q4_K/Q5_K's 6-bit scale and min of sub-block s from its scale bytes s, s + 4 and
    s - 4 (the last read only past the first four, ``low`` false), as float32."""
    sc = tl.where(low, b_s & 63, (b_s4 & 15) | ((b_m4 >> 6) << 4))
    mn = tl.where(low, b_s4 & 63, (b_s4 >> 4) | ((b_s >> 6) << 4))
    return sc.to(tl.float32), mn.to(tl.float32)


@triton.jit
def _q8_0_affine(blk, G: tl.constexpr):
    """``G`` consecutive Q8_0 blocks (34 bytes: d, 32 x int8) as (q [BN, U, G, 32], d
    [BN, U, G, 1], element offsets): weight = d * q."""
    g = tl.arange(0, G)[None, None, :, None]
    i = tl.arange(0, 32)[None, None, None, :]
    d = _f16_at(blk + 34 * g)
    q = tl.load((blk + 34 * g + 2 + i).to(tl.pointer_type(tl.int8))).to(tl.float32)
    return q, d, 32 * g + i


@triton.jit
def _q8_0(blk, G: tl.constexpr):
    """``G`` consecutive Q8_0 blocks -> one [BN, U, G, 32] tile of weights."""
    q, d, e = _q8_0_affine(blk, G)
    return d * q, e


@triton.jit
def _k4_affine(blk, j):
    """Q4_K/Q5_K sub-block scales of the low- and high-nibble tiles (j = 64-group): each
    weight is ``a * q + b`` with a = d * scale, b = -dmin * min, [BN, U, 4, 1] each."""
    d = _f16_at(blk)
    dmin = _f16_at(blk + 2)
    sc_lo, mn_lo = _scale_min_k4(blk + 4, 2 * j)
    sc_hi, mn_hi = _scale_min_k4(blk + 4, 2 * j + 1)
    return d * sc_lo, -(dmin * mn_lo), d * sc_hi, -(dmin * mn_hi)


@triton.jit
def _q4_k_affine(blk):
    """One Q4_K super-block (d, dmin, scales[12], qs[128]): byte ``32j + i`` of qs holds
    element ``64j + i`` (low nibble, sub-block 2j) and ``64j + 32 + i`` (high, 2j + 1).
    Returns the two tiles' (q [BN, U, 4, 32], a, b, element offsets)."""
    j = tl.arange(0, 4)[None, None, :, None]
    i = tl.arange(0, 32)[None, None, None, :]
    qs = tl.load(blk + 16 + 32 * j + i).to(tl.int32)
    a_lo, b_lo, a_hi, b_hi = _k4_affine(blk, j)
    e = 64 * j + i
    return (qs & 15).to(tl.float32), a_lo, b_lo, e, (qs >> 4).to(tl.float32), a_hi, b_hi, e + 32


@triton.jit
def _q5_k_affine(blk):
    """Q5_K: Q4_K plus qh[32] at byte 16, whose bit ``s`` of byte ``i`` is the fifth bit
    of element ``32s + i``; qs moves to byte 48."""
    j = tl.arange(0, 4)[None, None, :, None]
    i = tl.arange(0, 32)[None, None, None, :]
    qs = tl.load(blk + 48 + 32 * j + i).to(tl.int32)
    qh = tl.load(blk + 16 + i).to(tl.int32)
    q_lo = (qs & 15) | (((qh >> (2 * j)) & 1) << 4)
    q_hi = (qs >> 4) | (((qh >> (2 * j + 1)) & 1) << 4)
    a_lo, b_lo, a_hi, b_hi = _k4_affine(blk, j)
    e = 64 * j + i
    return q_lo.to(tl.float32), a_lo, b_lo, e, q_hi.to(tl.float32), a_hi, b_hi, e + 32


@triton.jit
def _q6_k_affine(blk):
    """One Q6_K super-block (ql[128], qh[64], int8 scales[16], d).

    Tiles are [BN, U, 8, 16]: row ``g`` = (half h = g // 4, column c = g % 4), so ql byte
    ``64h + b`` (b = 16c + r) carries element ``128h + b`` (low nibble) and
    ``128h + 64 + b`` (high); their top two bits sit in qh byte ``32h + b % 32`` at bit
    ``2 * (b // 32)`` (+4 for the high one), and each 16 elements share one scale. The
    weight is ``a * q`` with q = the 6-bit value - 32 and a = d * scale (b is 0).
    """
    g = tl.arange(0, 8)[None, None, :, None]
    r = tl.arange(0, 16)[None, None, None, :]
    h = g // 4
    c = g % 4
    b = 16 * c + r
    ql = tl.load(blk + 64 * h + b).to(tl.int32)
    qh = tl.load(blk + 128 + 32 * h + (b % 32)).to(tl.int32)
    shift = 2 * (b // 32)
    q_lo = (ql & 15) | (((qh >> shift) & 3) << 4)
    q_hi = (ql >> 4) | (((qh >> (shift + 4)) & 3) << 4)
    scales = (blk + 192 + 8 * h + c).to(tl.pointer_type(tl.int8))
    d = _f16_at(blk + 208)
    a_lo = d * tl.load(scales).to(tl.float32)
    a_hi = d * tl.load(scales + 4).to(tl.float32)
    e = 128 * h + b
    return (q_lo - 32).to(tl.float32), a_lo, 0.0, e, (q_hi - 32).to(tl.float32), a_hi, 0.0, e + 64


@triton.jit
def _k_quant_affine(blk, QTYPE: tl.constexpr):
    """The two (q, a, b, offsets) tiles of one Q4_K (12), Q5_K (13) or Q6_K (14)
    super-block, chosen at compile time."""
    if QTYPE == 12:
        q_a, a_a, b_a, e_a, q_b, a_b, b_b, e_b = _q4_k_affine(blk)
    elif QTYPE == 13:
        q_a, a_a, b_a, e_a, q_b, a_b, b_b, e_b = _q5_k_affine(blk)
    else:
        q_a, a_a, b_a, e_a, q_b, a_b, b_b, e_b = _q6_k_affine(blk)
    return q_a, a_a, b_a, e_a, q_b, a_b, b_b, e_b


@triton.jit
def _k_quant(blk, QTYPE: tl.constexpr):
    """The two tiles of one Q4_K (12), Q5_K (13) or Q6_K (14) super-block and their element
    offsets, chosen at compile time: what both kernels need from a k-quant unit."""
    q_a, a_a, b_a, e_a, q_b, a_b, b_b, e_b = _k_quant_affine(blk, QTYPE)
    return a_a * q_a + b_a, e_a, a_b * q_b + b_b, e_b


@triton.jit
def _products(w, x_unit, e, valid):
    """``w * x[e]`` over a [BN, U, A, B] tile; units not ``valid`` are 0."""
    x = tl.load(x_unit + e, mask=valid, other=0.0).to(tl.float32)
    return w * x


@triton.jit
def _row_sums(t):
    """Per-row sum of a [BN, U, A, B] tile."""
    return tl.sum(tl.sum(tl.sum(t, axis=3), axis=2), axis=1)


@triton.jit
def _weight_rows(w_ptr, idx_ptr, m, rows, N, stride_w, stride_e, GROUPED: tl.constexpr):
    """Byte pointers [BN, 1, 1, 1] to weight rows ``rows`` for pair row ``m``: of the one
    matrix, or (``GROUPED``) of expert ``idx[m]`` in a stack ``stride_e`` bytes apart.
    Rows past N read row N-1 (always valid memory), dropped at the store."""
    if GROUPED:
        w_ptr += tl.load(idx_ptr + m).to(tl.int64) * stride_e
    safe = tl.minimum(rows, N - 1)
    return (w_ptr + safe.to(tl.int64) * stride_w)[:, None, None, None]


@triton.jit
def _pair(t, j, SHARE: tl.constexpr, SLOTS: tl.constexpr):
    """(pair row, row of x) of slot ``j`` of output row ``t``. A pair row is one row of
    weights met by one row of activations: output row t sums its ``SLOTS`` consecutive
    pair rows (a MoE token's routed experts, weighted; 1 elsewhere), and ``SHARE``
    consecutive pair rows read one row of x (a token's activations, read by each of its
    experts with no expanded copy; 1 elsewhere)."""
    m = t * SLOTS + j
    return m, m // SHARE


@triton.jit
def _add_slot(acc, dot, wt_ptr, m, WEIGHTED: tl.constexpr):
    """``acc + dot``, the pair's dot products weighted by ``wt[m]`` (a router weight,
    rounded as the caller stored it) where ``WEIGHTED``."""
    if WEIGHTED:
        dot = dot * tl.load(wt_ptr + m).to(tl.float32)
    return acc + dot


@triton.jit
def _store_rows(y_ptr, t, stride_y, rows, N, acc):
    """Output row ``t``'s ``rows``, rounded once to y's dtype; rows past N dropped."""
    y = y_ptr + t.to(tl.int64) * stride_y + rows
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=rows < N)


@triton.jit
def _step_units(row_ptr, u0, N_UNITS: tl.constexpr, UNIT_BYTES: tl.constexpr, U: tl.constexpr):
    """The ``U`` units a matvec step reads from ``u0``: their blocks' pointers (per row),
    their indices (to find their activations) and which of them exist: units past
    ``N_UNITS`` re-read the last one and are zeroed through the activations."""
    units = u0 + tl.arange(0, U)
    valid = (units < N_UNITS)[None, :, None, None]
    units = tl.minimum(units, N_UNITS - 1)[None, :, None, None]
    return row_ptr + units * UNIT_BYTES, units, valid


@triton.jit
def _plain_dots(
    x_row,
    row_ptr,
    N_UNITS: tl.constexpr,
    QTYPE: tl.constexpr,
    UNIT: tl.constexpr,
    UNIT_BYTES: tl.constexpr,
    G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    U: tl.constexpr,
    DEFER: tl.constexpr,
):
    """:func:`_matvec_kernel`'s [BLOCK_N] dot products of the rows at ``row_ptr`` with
    the activations at ``x_row``, a dequantized tile per step."""
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    # DEFER's running products, shaped as the decoders' tiles: Q8_0 one [G, 32] per unit,
    # Q4_K/Q5_K two [4, 32], Q6_K two [8, 16] (see the decoders).
    if QTYPE == 8:
        tile_a = tl.zeros([BLOCK_N, U, G, 32], dtype=tl.float32)
        tile_b = tile_a
    elif QTYPE == 14:
        tile_a = tl.zeros([BLOCK_N, U, 8, 16], dtype=tl.float32)
        tile_b = tl.zeros([BLOCK_N, U, 8, 16], dtype=tl.float32)
    else:
        tile_a = tl.zeros([BLOCK_N, U, 4, 32], dtype=tl.float32)
        tile_b = tl.zeros([BLOCK_N, U, 4, 32], dtype=tl.float32)
    # U units per step: enough bytes in flight per program to cover memory latency.
    for u0 in range(0, N_UNITS, U):
        blk, units, valid = _step_units(row_ptr, u0, N_UNITS, UNIT_BYTES, U)
        x_unit = x_row + units * UNIT
        if QTYPE == 8:
            w, e = _q8_0(blk, G)
            if DEFER:
                tile_a += _products(w, x_unit, e, valid)
            else:
                acc += _row_sums(_products(w, x_unit, e, valid))
        else:
            w_a, e_a, w_b, e_b = _k_quant(blk, QTYPE)
            p_a, p_b = _products(w_a, x_unit, e_a, valid), _products(w_b, x_unit, e_b, valid)
            if DEFER:
                tile_a += p_a
                tile_b += p_b
            else:
                acc += _row_sums(p_a) + _row_sums(p_b)
    if DEFER:
        acc = _row_sums(tile_a) if QTYPE == 8 else _row_sums(tile_a) + _row_sums(tile_b)
    return acc


@triton.jit
def _matvec_kernel(
    x_ptr,
    w_ptr,
    y_ptr,
    idx_ptr,
    wt_ptr,
    M,
    N,
    stride_x,
    stride_w,
    stride_y,
    stride_e,
    N_UNITS: tl.constexpr,
    GROUPED: tl.constexpr,
    QTYPE: tl.constexpr,
    UNIT: tl.constexpr,
    UNIT_BYTES: tl.constexpr,
    G: tl.constexpr,
    SHARE: tl.constexpr,
    SLOTS: tl.constexpr,
    WEIGHTED: tl.constexpr,
    BLOCK_N: tl.constexpr,
    U: tl.constexpr,
    DEFER: tl.constexpr,
    PDL: tl.constexpr,
):
    """y[t, n] = sum_k x[t, k] * W[n, k] for BLOCK_N rows n over ``N_UNITS`` units.

    One grid axis (the others cap at 65535, fewer than an lm_head's row tiles), t fastest
    so the programs sharing a weight tile run together and share it in L2. ``DEFER`` keeps
    the products of every step in a register tile and sums rows once at the end, instead
    of a cross-thread reduction (and, over several warps, a barrier) at every step; which
    is faster depends on the shape, so the autotuner tries both.

    ``GROUPED``: ``w_ptr`` is a stack of experts ``stride_e`` bytes apart and pair row m
    meets expert ``idx[m]``, read here on the device: a MoE decode step's routed experts
    in one launch, with no copy of their blocks and no host sync. ``SHARE``, ``SLOTS``
    and ``WEIGHTED`` map output rows to pair rows and rows of x (see :func:`_pair`): a
    token's experts reading its one x, and their outputs summed by router weight ``wt``."""
    pid = tl.program_id(0)
    t = pid % M
    rows = (pid // M) * BLOCK_N + tl.arange(0, BLOCK_N)
    await_inputs(PDL)  # nothing above reads what a kernel before writes
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for j in tl.static_range(SLOTS):
        m, xm = _pair(t, j, SHARE, SLOTS)
        row_ptr = _weight_rows(w_ptr, idx_ptr, m, rows, N, stride_w, stride_e, GROUPED)
        x_row = x_ptr + xm.to(tl.int64) * stride_x
        dots = _plain_dots(x_row, row_ptr, N_UNITS, QTYPE, UNIT, UNIT_BYTES, G, BLOCK_N, U, DEFER)
        acc = _add_slot(acc, dots, wt_ptr, m, WEIGHTED)
    _store_rows(y_ptr, t, stride_y, rows, N, acc)


@triton.jit
def _scaled_sums(q, a, b, x_unit, e, valid):
    """``sum(w * x)`` per sub-block of a [BN, U, A, B] tile of weights ``a * q + b``,
    with the scales out of the inner loop: ``a * sum(q * x) + b * sum(x)`` -> [BN, U, A, 1]."""
    x = tl.load(x_unit + e, mask=valid, other=0.0).to(tl.float32)
    dots = tl.sum(q * x, axis=3, keep_dims=True)
    return a * dots + b * tl.sum(x, axis=3, keep_dims=True)


@triton.jit
def _affine_dots(
    x_row,
    row_ptr,
    N_UNITS: tl.constexpr,
    QTYPE: tl.constexpr,
    UNIT: tl.constexpr,
    UNIT_BYTES: tl.constexpr,
    G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    U: tl.constexpr,
):
    """:func:`_matvec_affine_kernel`'s [BLOCK_N] dot products, each sub-block's scale
    applied once to its sum."""
    # Per-sub-block partial sums, one per unit slot: Q8_0 G blocks, Q4_K/Q5_K 2 x 4, Q6_K 2 x 8.
    if QTYPE == 8:
        tile = tl.zeros([BLOCK_N, U, G, 1], dtype=tl.float32)
    elif QTYPE == 14:
        tile = tl.zeros([BLOCK_N, U, 8, 1], dtype=tl.float32)
    else:
        tile = tl.zeros([BLOCK_N, U, 4, 1], dtype=tl.float32)
    for u0 in range(0, N_UNITS, U):
        blk, units, valid = _step_units(row_ptr, u0, N_UNITS, UNIT_BYTES, U)
        x_unit = x_row + units * UNIT
        if QTYPE == 8:
            q, d, e = _q8_0_affine(blk, G)
            tile += _scaled_sums(q, d, 0.0, x_unit, e, valid)
        else:
            q_a, a_a, b_a, e_a, q_b, a_b, b_b, e_b = _k_quant_affine(blk, QTYPE)
            tile += _scaled_sums(q_a, a_a, b_a, x_unit, e_a, valid)
            tile += _scaled_sums(q_b, a_b, b_b, x_unit, e_b, valid)
    return _row_sums(tile)


@triton.jit
def _matvec_affine_kernel(
    x_ptr,
    w_ptr,
    y_ptr,
    idx_ptr,
    wt_ptr,
    M,
    N,
    stride_x,
    stride_w,
    stride_y,
    stride_e,
    N_UNITS: tl.constexpr,
    GROUPED: tl.constexpr,
    QTYPE: tl.constexpr,
    UNIT: tl.constexpr,
    UNIT_BYTES: tl.constexpr,
    G: tl.constexpr,
    SHARE: tl.constexpr,
    SLOTS: tl.constexpr,
    WEIGHTED: tl.constexpr,
    BLOCK_N: tl.constexpr,
    U: tl.constexpr,
    PDL: tl.constexpr,
):
    """:func:`_matvec_kernel`'s sums with each sub-block's scale applied once to its dot
    product (llama.cpp's order) instead of to every weight: per weight one multiply-add
    on the raw quant value, and no dequantized tile. Same grid, same row/unit handling,
    same ``GROUPED`` expert stacks and pair rows."""
    pid = tl.program_id(0)
    t = pid % M
    rows = (pid // M) * BLOCK_N + tl.arange(0, BLOCK_N)
    await_inputs(PDL)  # nothing above reads what a kernel before writes
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for j in tl.static_range(SLOTS):
        m, xm = _pair(t, j, SHARE, SLOTS)
        row_ptr = _weight_rows(w_ptr, idx_ptr, m, rows, N, stride_w, stride_e, GROUPED)
        x_row = x_ptr + xm.to(tl.int64) * stride_x
        dots = _affine_dots(x_row, row_ptr, N_UNITS, QTYPE, UNIT, UNIT_BYTES, G, BLOCK_N, U)
        acc = _add_slot(acc, dots, wt_ptr, m, WEIGHTED)
    _store_rows(y_ptr, t, stride_y, rows, N, acc)


# Run Triton's PTX for integer dot products, or (under the interpreter, which has no PTX)
# the same arithmetic spelled out.
ASM = os.environ.get("TRITON_INTERPRET") != "1"


@triton.jit
def store_quantized(x, b, keep, q_row, d_row, s_row, BLOCKS: tl.constexpr):
    """Store ``x`` [BLOCKS, 32] (float32; 32-element blocks ``b`` [BLOCKS, 1] of one row,
    those not ``keep`` skipped) as the integer matvec reads activations (llama.cpp's q8_1
    scheme): q = round(x / d) as int8 with d = amax / 127 per block, and s = d * sum(q) per
    16 elements, from which a format's offsets and mins are subtracted once per sub-block
    instead of once per weight. The decode glue kernels call this on the rows they write,
    so the matvec after them needs no launch of its own to quantize."""
    i = tl.arange(0, 32)[None, :]
    amax = tl.max(tl.abs(x), axis=1, keep_dims=True)
    v = x * tl.where(amax > 0, 127.0 / amax, 0.0)
    q = (v + tl.where(v >= 0, 0.5, -0.5)).to(tl.int32)  # to nearest, halves away from 0
    d = amax / 127.0
    tl.store(q_row + 32 * b + i, q.to(tl.int8), mask=keep)
    tl.store(d_row + b, d, mask=keep)
    halves = tl.sum(tl.reshape(q, [BLOCKS, 2, 16]), axis=2).to(tl.float32)  # (BLOCKS, 2)
    tl.store(s_row + 2 * b + tl.arange(0, 2)[None, :], d * halves, mask=keep)


@triton.jit
def _quantize_rows_kernel(
    x_ptr, q_ptr, d_ptr, s_ptr, stride_x, K, BLOCKS: tl.constexpr, PDL: tl.constexpr
):
    """Row m's activations for the integer matvec, ``BLOCKS`` blocks per program."""
    await_inputs(PDL)
    m = tl.program_id(0)
    b = tl.program_id(1) * BLOCKS + tl.arange(0, BLOCKS)[:, None]  # (BLOCKS, 1) block index
    keep = b < K // 32
    row = m.to(tl.int64)
    x = tl.load(x_ptr + row * stride_x + 32 * b + tl.arange(0, 32)[None, :], mask=keep, other=0.0)
    store_quantized(
        x.to(tl.float32),
        b,
        keep,
        q_ptr + row * K,
        d_ptr + row * (K // 32),
        s_ptr + row * (K // 16),
        BLOCKS,
    )


@triton.jit
def _dp4a(a, b, SIGNED: tl.constexpr, ASM: tl.constexpr):
    """Per int32 lane: the dot product of a's four bytes (unsigned unless ``SIGNED``) with
    b's four signed bytes, one instruction where the weights took ~12 per element."""
    if ASM:
        if SIGNED:
            op: tl.constexpr = "dp4a.s32.s32 $0, $1, $2, $3;"
        else:
            op: tl.constexpr = "dp4a.u32.s32 $0, $1, $2, $3;"
        return tl.inline_asm_elementwise(
            op, "=r,r,r,r", [a, b, tl.zeros_like(a)], dtype=tl.int32, is_pure=True, pack=1
        )
    else:
        s = tl.zeros_like(a)
        for k in tl.static_range(4):
            if SIGNED:  # noqa: SIM108 (a constexpr branch, not a runtime select)
                byte_a = (a << (24 - 8 * k)) >> 24
            else:
                byte_a = (a >> (8 * k)) & 255
            s += byte_a * ((b << (24 - 8 * k)) >> 24)
        return s


@triton.jit
def _to_float(i):
    """int32 -> float32 for |i| < 2**22 (every dp4a sum here): an add and a float subtract
    on the full-rate pipes instead of the quarter-rate conversion unit."""
    return (i + 0x4B400000).to(tl.float32, bitcast=True) - 12582912.0


@triton.jit
def _i32_at(ptr):
    """The little-endian int32s at 16-byte aligned byte pointers ``ptr`` + 4 * arange(4)
    along the last axis, in one 16-byte load (Q4_K's and Q5_K's blocks keep that
    alignment; Q8_0's 34- and Q6_K's 210-byte ones are read by :func:`_i32_from_words`)."""
    return tl.load(ptr.to(tl.pointer_type(tl.int32)) + tl.arange(0, 4))


@triton.jit
def _i32_from_words(ptr):
    """:func:`_i32_at` for 2-byte aligned ``ptr`` (Q8_0's and Q6_K's blocks) in 5 loads
    instead of 8 16-bit halves: the four words and the one after from the 4-byte aligned
    address at or below ptr, then, where ptr sits 2 bytes past it, each result word from
    the upper half of one and the lower half of the next. The int8 matvec is bound by its
    L1 requests (an H200, stop 29: the 8B's Q6_K down matvec 22.6 -> 17.7 µs, lm_head
    249 -> 193 µs; stop 30, with the activations loaded in the weights' layout: the
    0.6B's Q8_0 lm_head 51.3 -> 47.5 µs, its o and down 10-20% faster, gate/up 15%
    slower). The fifth word passes the 16 bytes only by the 2 in the same aligned word,
    which never crosses a page or an allocation's end."""
    t = tl.arange(0, 4)
    mis = ptr.to(tl.int64) & 3  # 0 or 2
    base = (ptr - mis).to(tl.pointer_type(tl.int32))
    w = tl.load(base + t)
    w4 = tl.load(base + 4, mask=mis != 0, other=0)
    w1, w2, w3 = _word(w, 1), _word(w, 2), _word(w, 3)
    after = tl.where(t == 0, w1, tl.where(t == 1, w2, tl.where(t == 2, w3, w4)))
    return tl.where(mis == 0, w, ((w >> 16) & 0xFFFF) | (after << 16))


@triton.jit
def _tile_load(ptr, valid, like):
    """The activation values at ``ptr`` (0 where not ``valid``) loaded by every tile row
    of the weights, in ``like``'s shape: see :func:`_dot4`."""
    return tl.load(
        tl.broadcast_to(ptr, like.shape), mask=tl.broadcast_to(valid, like.shape), other=0.0
    )


@triton.jit
def _dot4(w, xw, SIGNED: tl.constexpr, ASM: tl.constexpr):
    """Per tile row: the four weight words ``w`` [BN, U, R, 4] against the four activation
    words at ``xw`` [1, U, R, 1] + arange(4), summed in integers and converted once ->
    [BN, U, R, 1].

    Each of the BN rows loads the activations itself (their addresses coalesce in one
    request), so they arrive in the weights' layout, each thread's four words beside its
    four weight words. Loaded once as [1, U, R, 4], Triton spread them over the lanes and
    shuffled them, and then the weights, into place every step (27 shuffles a step at two
    rows a warp, on the L1/shared-memory pipe the kernel is bound by): the sm_90 loop of
    Q4_K at (2, 2, 1) went from 150 instructions to 97, and on an H200 (stop 30) the 8B's
    gate/up 25.7 -> 23.8 µs, and four rows a warp, (4, 1, 1), became the fastest config
    of the 8B's q/k (7.2 -> 5.9 µs) and lm_head (192.7 -> 174.4) and the 0.6B's
    (92.7 -> 47.5)."""
    dots = _dp4a(w, tl.load(tl.broadcast_to(xw + tl.arange(0, 4), w.shape)), SIGNED, ASM)
    return _to_float(tl.sum(dots, axis=3, keep_dims=True))


@triton.jit
def _q8_0_int8(blk, xw, xd, valid, G: tl.constexpr, ASM: tl.constexpr):
    """``G`` Q8_0 blocks against the int8 activations: [BN, U, 2G, 1] partial sums, one
    per half block (16 weights, 4 words), d_w * d_x * dot."""
    r = tl.arange(0, 2 * G)[None, None, :, None]
    g = r // 2
    w = _i32_from_words(blk + 34 * g + 2 + 16 * (r % 2))
    d_w = _f16_at(blk + 34 * g)
    scale = d_w * _tile_load(xd + g, valid, d_w)
    return _dot4(w, xw + 4 * r, True, ASM) * scale


@triton.jit
def _word(words, K: tl.constexpr):
    """Word ``K`` of the 4 along ``words``' last axis (one thread's registers): [.., 1]."""
    t = tl.arange(0, 4)[None, None, None, :]
    return tl.sum(tl.where(t == K, words, 0), axis=3, keep_dims=True)


@triton.jit
def _k4_header_affine(blk, j):
    """:func:`_k4_affine` from one 16-byte load of the super-block's header (d, dmin and
    the 12 scale bytes; 16-byte aligned in Q4_K's 144- and Q5_K's 176-byte blocks)
    instead of two f16 and six byte loads. The integer matvec is bound by its L1 requests,
    not its DRAM bytes (ncu on the 8B's gate/up: L1 83% busy, DRAM 37%): with this
    Q4_K's loop issues 8 loads instead of 15, and the gate/up matvec ran 31.3 -> 25.6 µs
    on an H200 (with two rows a warp, BLOCK_N=2, U=2). Row j's sub-blocks 2j and 2j + 1
    take their bytes from scale words 1-3 at bit 16 (j % 2), as _scale_min_k4 indexes
    them."""
    hdr = _i32_at(blk + 0 * j)  # [BN, U, 8, 4]: d | dmin, scales 0-3, 4-7, 8-11
    w0, w1, w2, w3 = _word(hdr, 0), _word(hdr, 1), _word(hdr, 2), _word(hdr, 3)
    d = w0.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    dmin = (w0 >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    low = j < 2  # sub-blocks 0-3: 6-bit scale and min in bytes s and s + 4
    at_s = tl.where(low, w1, w2)  # the word holding byte s
    at_s4 = tl.where(low, w2, w3)  # byte s + 4
    shift = 16 * (j % 2)
    a_lo, b_lo = _k4_sub_block(at_s, at_s4, w1, shift, low, d, dmin)
    a_hi, b_hi = _k4_sub_block(at_s, at_s4, w1, shift + 8, low, d, dmin)
    return a_lo, b_lo, a_hi, b_hi


@triton.jit
def _k4_sub_block(at_s, at_s4, at_m4, shift, low, d, dmin):
    """(d * scale, -dmin * min) of the sub-block whose bytes s, s + 4 and s - 4 sit at bit
    ``shift`` of the words ``at_s``, ``at_s4`` and ``at_m4``."""
    b_s = (at_s >> shift) & 255
    b_s4 = (at_s4 >> shift) & 255
    b_m4 = (at_m4 >> shift) & 255
    scale, mn = _unpack_scale_min(b_s, b_s4, b_m4, low)
    return d * scale, -(dmin * mn)


@triton.jit
def _k4_int8(blk, xw, xd, xs, valid, QTYPE: tl.constexpr, ASM: tl.constexpr):
    """One Q4_K or Q5_K super-block against the int8 activations: [BN, U, 8, 1] partial
    sums. Row r = (64-group j, half): its 4 words are qs bytes 32j + 16 half + 4t, whose
    low nibbles are elements 64j + 16 half + 4t.. (sub-block 2j) and high nibbles those
    + 32 (sub-block 2j + 1); Q5_K's fifth bits are bits 2j / 2j + 1 of the same qh words
    (bytes 16 half + 4t). The mins come in through the activation sums, half per row."""
    r = tl.arange(0, 8)[None, None, :, None]
    j = r // 2
    half = r % 2
    if QTYPE == 13:
        w = _i32_at(blk + 48 + 16 * r)
        qh = _i32_at(blk + 16 + 16 * half)
        lo = (w & 0x0F0F0F0F) | (((qh >> (2 * j)) & 0x01010101) << 4)
        hi = ((w >> 4) & 0x0F0F0F0F) | (((qh >> (2 * j + 1)) & 0x01010101) << 4)
    else:
        w = _i32_at(blk + 16 + 16 * r)
        lo = w & 0x0F0F0F0F
        hi = (w >> 4) & 0x0F0F0F0F
    a_lo, b_lo, a_hi, b_hi = _k4_header_affine(blk, j)  # [BN, U, 8, 1] each
    d_lo = _tile_load(xd + 2 * j, valid, a_lo)
    d_hi = _tile_load(xd + 2 * j + 1, valid, a_lo)
    # this row's 16 activations of each sub-block: 16-element sums 4j + half, 4j + 2 + half
    s_lo = _tile_load(xs + 4 * j + half, valid, a_lo)
    s_hi = _tile_load(xs + 4 * j + 2 + half, valid, a_lo)
    word = 16 * j + 4 * half  # the activations' word of the row's first low-nibble element
    dot_lo = _dot4(lo, xw + word, False, ASM)
    dot_hi = _dot4(hi, xw + word + 8, False, ASM)
    return dot_lo * (a_lo * d_lo) + dot_hi * (a_hi * d_hi) + (b_lo * s_lo + b_hi * s_hi)


@triton.jit
def _q6_k_int8(blk, xw, xd, xs, valid, ASM: tl.constexpr):
    """One Q6_K super-block against the int8 activations: [BN, U, 8, 1] partial sums.

    Row r = (half h, column c, quarter q) = 4h + 2c + q: its 4 words are the ql bytes
    ``64h + 32c + 16q + 4t``, whose low nibbles are elements 128h + 32c + 16q + 4t.. and
    high nibbles those + 64 (see _q6_k_affine); the 16 elements of each share one scale.
    The 6-bit values are used unsigned, and the -32 comes in through the activation sums."""
    r = tl.arange(0, 8)[None, None, :, None]
    h = r // 4
    c = (r // 2) % 2
    ql = _i32_from_words(blk + 16 * r)
    qh = _i32_from_words(blk + 128 + 32 * h + 16 * (r % 2))
    lo = (ql & 0x0F0F0F0F) | (((qh >> (2 * c)) & 0x03030303) << 4)
    hi = ((ql >> 4) & 0x0F0F0F0F) | (((qh >> (2 * c + 4)) & 0x03030303) << 4)
    group = r + 4 * h  # the low nibbles' 16-element group: 8h + 2c + q; the high ones' is +4
    scales = (blk + 192 + group).to(tl.pointer_type(tl.int8))
    d = _f16_at(blk + 208)
    a_lo = d * tl.load(scales).to(tl.float32)
    a_hi = d * tl.load(scales + 4).to(tl.float32)
    d_lo = _tile_load(xd + group // 2, valid, a_lo)
    d_hi = _tile_load(xd + group // 2 + 2, valid, a_lo)
    s_lo = _tile_load(xs + group, valid, a_lo)
    s_hi = _tile_load(xs + group + 4, valid, a_lo)
    dot_lo = _dot4(lo, xw + 4 * group, False, ASM)
    dot_hi = _dot4(hi, xw + 4 * group + 16, False, ASM)
    offsets = -32.0 * (a_lo * s_lo + a_hi * s_hi)
    return dot_lo * (a_lo * d_lo) + dot_hi * (a_hi * d_hi) + offsets


@triton.jit
def _int8_dots(
    xq_ptr,
    xd_ptr,
    xs_ptr,
    xm,
    row_ptr,
    N_UNITS: tl.constexpr,
    QTYPE: tl.constexpr,
    UNIT: tl.constexpr,
    UNIT_BYTES: tl.constexpr,
    G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    U: tl.constexpr,
    ASM: tl.constexpr,
):
    """:func:`_matvec_int8_kernel`'s [BLOCK_N] dot products of the rows at ``row_ptr``
    with row ``xm`` of the int8 activations."""
    K: tl.constexpr = N_UNITS * UNIT
    xw_row = xq_ptr.to(tl.pointer_type(tl.int32)) + xm * (K // 4)
    xd_row = xd_ptr + xm * (K // 32)
    xs_row = xs_ptr + xm * (K // 16)
    # One partial sum per tile row of 4 weight words: Q8_0 2 per block, k-quants 8 per unit.
    acc = tl.zeros([BLOCK_N, U, 2 * G if QTYPE == 8 else 8, 1], dtype=tl.float32)
    for u0 in range(0, N_UNITS, U):
        # Units past N_UNITS: their activation scales read as 0.
        blk, units, valid = _step_units(row_ptr, u0, N_UNITS, UNIT_BYTES, U)
        xw = xw_row + units * (UNIT // 4)
        xd = xd_row + units * (UNIT // 32)
        if QTYPE == 8:
            acc += _q8_0_int8(blk, xw, xd, valid, G, ASM)
        elif QTYPE == 14:
            acc += _q6_k_int8(blk, xw, xd, xs_row + units * (UNIT // 16), valid, ASM)
        else:
            acc += _k4_int8(blk, xw, xd, xs_row + units * (UNIT // 16), valid, QTYPE, ASM)
    return _row_sums(acc)


@triton.jit
def _matvec_int8_kernel(
    xq_ptr,
    xd_ptr,
    xs_ptr,
    w_ptr,
    y_ptr,
    idx_ptr,
    wt_ptr,
    M,
    N,
    stride_w,
    stride_y,
    stride_e,
    N_UNITS: tl.constexpr,
    GROUPED: tl.constexpr,
    QTYPE: tl.constexpr,
    UNIT: tl.constexpr,
    UNIT_BYTES: tl.constexpr,
    G: tl.constexpr,
    SHARE: tl.constexpr,
    SLOTS: tl.constexpr,
    WEIGHTED: tl.constexpr,
    BLOCK_N: tl.constexpr,
    U: tl.constexpr,
    ASM: tl.constexpr,
    PDL: tl.constexpr,
):
    """:func:`_matvec_kernel`'s sums over activations quantized to int8 by
    :func:`_quantize_rows_kernel` (llama.cpp's MMVQ): each 32-bit word of weights is
    masked into four byte lanes and meets four activations in one dp4a, so a weight costs
    about one instruction instead of ~12 (unpack, convert, gather, multiply), which is what
    kept the float kernels at a third of the memory bandwidth. Same grid, same rows, same
    ``GROUPED`` stacks and pair rows; per-thread partial sums are reduced once per pair."""
    pid = tl.program_id(0)
    t = pid % M
    rows = (pid // M) * BLOCK_N + tl.arange(0, BLOCK_N)
    await_inputs(PDL)  # nothing above reads what a kernel before writes
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for j in tl.static_range(SLOTS):
        m, xm = _pair(t, j, SHARE, SLOTS)
        row_ptr = _weight_rows(w_ptr, idx_ptr, m, rows, N, stride_w, stride_e, GROUPED)
        dots = _int8_dots(
            xq_ptr, xd_ptr, xs_ptr, xm, row_ptr, N_UNITS, QTYPE, UNIT, UNIT_BYTES, G, BLOCK_N, U, ASM
        )  # fmt: skip
        acc = _add_slot(acc, dots, wt_ptr, m, WEIGHTED)
    _store_rows(y_ptr, t, stride_y, rows, N, acc)


@triton.jit
def _dequant_kernel(
    w_ptr,
    out_ptr,
    N,
    stride_w,
    stride_o,
    QTYPE: tl.constexpr,
    UNIT: tl.constexpr,
    UNIT_BYTES: tl.constexpr,
    G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PDL: tl.constexpr,
):
    """out[n, :] = dequantized W[n, :] for BLOCK_N rows at one unit; grid (rows, units)."""
    await_inputs(PDL)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    u = tl.program_id(1)
    safe = tl.minimum(rows, N - 1)
    blk = (w_ptr + safe.to(tl.int64) * stride_w)[:, None, None, None] + u * UNIT_BYTES
    out = (out_ptr + rows.to(tl.int64) * stride_o)[:, None, None, None] + u * UNIT
    keep = (rows < N)[:, None, None, None]
    dtype = out_ptr.dtype.element_ty
    if QTYPE == 8:
        w, e = _q8_0(blk, G)
        tl.store(out + e, w.to(dtype), mask=keep)
    else:
        w_a, e_a, w_b, e_b = _k_quant(blk, QTYPE)
        tl.store(out + e_a, w_a.to(dtype), mask=keep)
        tl.store(out + e_b, w_b.to(dtype), mask=keep)


# Decode shapes differ a lot (1024 to 151936 rows, 4096 to 12288 columns): let Triton pick
# per shape once, at the first call (before any CUDA graph capture, which replays it).
_MATVEC_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "U": u, "DEFER": defer}, num_warps=w)
    for bn, u, w in [
        (1, 8, 2),
        (1, 16, 4),
        (2, 8, 4),
        (2, 16, 8),
        (4, 4, 4),
        (4, 8, 8),
        (8, 4, 8),
        (16, 2, 8),
    ]
    for defer in (False, True)
]
# Without autotuning (interpreter, tests): the config the first kernels were tested with.
FIXED_CONFIG = {"BLOCK_N": 2, "U": 8, "DEFER": False, "num_warps": 4}
# Tuning results kept on disk beside the compiled kernels (see quant/ops.py), where this
# Triton has ``cache_results`` (recent ones do): the choice per shape survives a restart.
# Grouped rows each read their own expert (no L2 sharing between them): tuned apart, and
# so is a MoE's weighted sum over a token's experts (SLOTS of them in each program).
_TUNING: dict[str, Any] = {"key": ["N", "N_UNITS", "QTYPE", "GROUPED", "SLOTS"]}
if "cache_results" in inspect.signature(triton.autotune).parameters:
    _TUNING["cache_results"] = True
# Triton times each config for 25 + 100 ms by default: with ~40 configs and ~10 decode
# shapes that is most of a first load's minute. A matvec runs for 10-500 µs, so 10 ms of
# graph replays still averages 20-1000 runs per config.
if "do_bench" in inspect.signature(triton.autotune).parameters:
    _TUNING["do_bench"] = lambda fn, quantiles: _bench(fn, quantiles)  # defined below


def _bench(fn: Any, quantiles: Any) -> Any:
    """The autotuner's benchmark: launches replayed from a CUDA graph, as decode runs them.
    Timed from Python, a 10 µs matvec measures the launch (the autotuner's wrapper costs
    more than the kernel), so every config looks alike and small shapes got any of them;
    and the int8 kernel, two launches, looked slower than it is."""
    from triton.testing import do_bench, do_bench_cudagraph

    if torch.cuda.is_available():
        return do_bench_cudagraph(fn, rep=10, quantiles=quantiles)
    return do_bench(fn, warmup=5, rep=25, quantiles=quantiles)


_matvec_tuned = triton.autotune(_MATVEC_CONFIGS, **_TUNING)(_matvec_kernel)
_AFFINE_CONFIGS = [
    triton.Config({"BLOCK_N": c.kwargs["BLOCK_N"], "U": c.kwargs["U"]}, num_warps=c.num_warps)
    for c in _MATVEC_CONFIGS
    if not c.kwargs["DEFER"]
]
_affine_tuned = triton.autotune(_AFFINE_CONFIGS, **_TUNING)(_matvec_affine_kernel)
# The integer kernel holds one float per weight word (4 weights), a quarter of the float
# kernels' tiles, so it takes bigger steps for the same registers.
_INT8_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "U": u}, num_warps=w)
    # 4 or 8 weight words (32 or 64 weights) per thread per step
    # (2, 2, 1), (4, 1, 1) and (2, 4, 1): two or four rows a warp, the activations' loads
    # shared by them (an H200 in stop 29: the 8B's gate/up 25.6 and 26.4 µs, (1, 4, 1)
    # 31.3, o 5.3 vs 5.9; stop 30, see _dot4: (4, 1, 1) the 8B's and 0.6B's lm_head)
    for bn, u, w in [(1, 4, 1), (2, 2, 1), (4, 1, 1), (2, 4, 1), (1, 8, 1), (1, 8, 2), (1, 16, 2), (2, 8, 2), (2, 8, 4), (4, 8, 4), (2, 16, 4)]
]  # fmt: skip
_int8_tuned = triton.autotune(_INT8_CONFIGS, **_TUNING)(_matvec_int8_kernel)
# Which of the tuned matvecs is fastest, per (M rounded up to a power of two, N, K, type,
# grouped, whether int8 activations may be used): measured once per GPU model at the first
# call (the load's warm-up) and kept on disk beside Triton's own tuning (see
# KernelChoices), so a restart skips it.
_faster: dict[tuple[Any, ...], str] = {}
# The plain kernel (a dequantized tile per step) is not among them: on an H200 the
# scale-factored one beat it on every decode shape of an 8B Q4_K_M (by 0-25%), and each
# tuned candidate costs a first load ~30 s of compiles. It stays the fixed config's kernel.
_KERNELS = ("affine", "int8")


# Every kernel by name, tuned (``matvec(kernel=...)`` may name the plain one) and as is.
_TUNED = {"plain": _matvec_tuned, "affine": _affine_tuned, "int8": _int8_tuned}
_UNTUNED = {"plain": _matvec_kernel, "affine": _matvec_affine_kernel, "int8": _matvec_int8_kernel}


_choices = KernelChoices(os.environ.get("TRITON_CACHE_DIR"), names=_KERNELS)


def _unit(qtype: Q, k: int) -> tuple[int, int, int]:
    """(weights, bytes, Q8_0 blocks) per kernel unit: a k-quant super-block, or as many
    Q8_0 blocks (up to 8) as evenly divide the row."""
    fmt = block_format(qtype)
    if qtype != Q.Q8_0:
        return QK_K, fmt.type_size, 1
    g = next(g for g in (8, 4, 2, 1) if (k // 32) % g == 0)
    return 32 * g, fmt.type_size * g, g


def _check(weight: QuantizedTensor) -> None:
    """A type with a kernel, and each row's blocks contiguous: the kernels address rows
    (and experts) by stride, so a view of some rows of a fused weight (gate of a fused
    [gate | up] expert stack) is read in place."""
    if weight.qtype not in SUPPORTED:
        names = ", ".join(q.name for q in SUPPORTED)
        raise ValueError(f"no Triton kernel for {weight.qtype.name} (have {names})")
    if weight.data.stride(-1) != 1:
        raise ValueError("quantized weight rows must be contiguous")


def matvec(
    x: torch.Tensor,
    weight: QuantizedTensor,
    config: dict[str, Any] | None = None,
    kernel: str | None = None,
    quantized: Int8Rows | None = None,
) -> torch.Tensor:
    """``x @ W.T`` for a few rows ``x`` (M, K) straight from the blocks; out (M, N) in
    ``x.dtype``. Autotuned, it runs whichever kernel is fastest for the shape; ``kernel``
    (one of ``_KERNELS``) runs that one, tuned, and ``config`` (BLOCK_N, U, DEFER,
    num_warps; AFFINE or INT8 for those kernels) one fixed variant: for tests and the
    benchmarks that compare kernels. ``quantized``: x's int8 activations where the kernel
    that wrote x made them too (used if the int8 kernel runs)."""
    _check(weight)
    if len(weight.shape) != 2:
        raise ValueError(f"matvec takes one (N, K) weight, got {weight.shape}: see grouped_matvec")
    return _launch(x, weight, None, config, kernel, [quantized] if quantized else None)


def matvecs(
    x: torch.Tensor, weights: tuple[QuantizedTensor, ...], quantized: Int8Rows | None = None
) -> list[torch.Tensor]:
    """:func:`matvec` of one ``x`` by each of ``weights`` (a fused q/k/v kept as one
    weight per block type): the int8 kernels among them share one quantization of x (made
    here once, unless ``quantized`` brings it)."""
    shared: list[Int8Rows] = [quantized] if quantized else []
    for w in weights:
        _check(w)
    return [_launch(x, w, None, None, None, shared) for w in weights]


def grouped_matvec(
    x: torch.Tensor,
    experts: QuantizedTensor,
    index: torch.Tensor,
    config: dict[str, Any] | None = None,
    *,
    quantized: Int8Rows | None = None,
    share: int = 1,
    combine: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pair row ``r`` (a row of x, see ``share``) times expert ``index[r]`` of the stack
    ``experts`` (E, N, K): out (R, N) in ``x.dtype``, in one launch. ``index`` (R,) stays
    on the device and is read by the kernel, so the step that routes and applies the
    experts has no host sync and replays in a CUDA graph; an index must be in 0..E-1 (a
    router's top-k always is; this is not checked, which would need a sync).

    ``share``: each row of x (R / share, K) serves ``share`` consecutive pair rows, so a
    MoE token's top-k experts all read the token's activations (and its int8 ones, made
    once) with no expanded copy. ``combine`` (T, k) router weights, T * k = R: out is
    (T, N) instead, row t the sum of pair rows t*k .. t*k+k-1 weighted by combine[t]
    (float32 sums, rounded once): the MoE's weighted sum over a token's experts, in the
    same launch. ``quantized``: x's int8 activations where the kernel that wrote x made
    them (used if the int8 kernel runs)."""
    _check(experts)
    if len(experts.shape) != 3:
        raise ValueError(f"grouped_matvec takes an (E, N, K) stack, got {experts.shape}")
    if share < 1 or x.dim() != 2:
        raise ValueError(
            f"grouped_matvec: x (rows, K) and share >= 1, got {tuple(x.shape)}, {share}"
        )
    r = x.shape[0] * share
    if index.shape != (r,) or index.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"grouped_matvec: index must be ({r},) int64/int32, one expert per row of x "
            f"times share ({share}), got {index.dtype} {tuple(index.shape)}"
        )
    if index.device != x.device or experts.device != x.device:
        raise ValueError("grouped_matvec: x, experts and index must be on one device")
    if combine is not None:
        if combine.dim() != 2 or combine.numel() != r or not combine.is_floating_point():
            raise ValueError(
                f"grouped_matvec: combine must be float (tokens, k) weights for {r} pair "
                f"rows, got {combine.dtype} {tuple(combine.shape)}"
            )
        combine = combine.contiguous()
    if quantized is not None and quantized[0].shape != x.shape:
        raise ValueError(
            f"grouped_matvec: quantized activations {tuple(quantized[0].shape)} are not x's "
            f"{tuple(x.shape)}"
        )
    shared = [quantized] if quantized else None
    return _launch(x, experts, index.contiguous(), config, None, shared, share, combine)


def quantized_rows(rows: int, k: int, device: torch.device) -> Int8Rows:
    """Empty (q int8 (rows, K), d float32 (rows, K/32), s float32 (rows, K/16)): what
    :func:`store_quantized` fills, for a kernel that quantizes its output."""
    if k % 32:
        raise ValueError(f"int8 activations need K a multiple of 32, got {k}")
    return (
        torch.empty(rows, k, dtype=torch.int8, device=device),
        torch.empty(rows, k // 32, dtype=torch.float32, device=device),
        torch.empty(rows, k // 16, dtype=torch.float32, device=device),
    )


def quantize_rows(x: torch.Tensor) -> Int8Rows:
    """x (M, K) for the int8 matvec: x ~= d * q per 32-element block (see
    :func:`store_quantized`)."""
    m, k = x.shape
    q, d, s = quantized_rows(m, k, x.device)
    if m:
        blocks = 32
        grid = (m, triton.cdiv(k // 32, blocks))
        _quantize_rows_kernel[grid](
            x, q, d, s, x.stride(0), k, BLOCKS=blocks, num_warps=4,
            **grid_dependency.launch(x.device),
        )  # fmt: skip
    return q, d, s


def _launch(
    x: torch.Tensor,
    weight: QuantizedTensor,
    index: torch.Tensor | None,
    config: dict[str, Any] | None,
    kernel: str | None = None,
    shared: list[Int8Rows] | None = None,
    share: int = 1,
    combine: torch.Tensor | None = None,
) -> torch.Tensor:
    """One matvec: plain (``index`` None, ``weight`` (N, K)) or grouped (``weight`` an
    (E, N, K) stack, expert ``index[r]`` for pair row r; ``share`` and ``combine`` as
    :func:`grouped_matvec` says), by the kernel measured fastest for the shape, or as
    ``config`` says. ``shared`` holds x's int8 quantization once a call made it, for the
    next matvec of the same x (see :func:`matvecs`)."""
    n, k = weight.shape[-2:]
    if x.shape[-1] != k or x.stride(-1) != 1:
        raise ValueError(f"matvec: x must be (M, {k}) with unit stride, got {tuple(x.shape)}")
    pairs = x.shape[0] * share  # rows of weights met, one row of x each
    slots = 1 if combine is None else combine.shape[1]
    m = pairs // slots  # output rows
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return y
    unit, unit_bytes, g = _unit(weight.qtype, k)
    data = weight.data
    grouped = index is not None
    # unused pointers (no index, no weights) point at y
    pointers = (data, y, index if grouped else y, y if combine is None else combine)
    strides = (data.stride(-2), y.stride(0), data.stride(0) if grouped else 0)
    meta = dict(
        N_UNITS=k // unit, GROUPED=grouped, QTYPE=int(weight.qtype), UNIT=unit,
        UNIT_BYTES=unit_bytes, G=g, SHARE=share, SLOTS=slots, WEIGHTED=combine is not None,
        **grid_dependency.launch(x.device),
    )  # fmt: skip

    def run(name: str, fixed: dict[str, Any] | None = None, reuse: bool = False) -> None:
        """Launch kernel ``name``, autotuned, or with the ``fixed`` config; ``reuse``: take
        and leave x's quantization in ``shared`` (timings never do: they pay for it)."""
        if fixed is None:
            grid: Any = lambda c: (m * triton.cdiv(n, c["BLOCK_N"]),)  # noqa: E731
            kernel, extra = _TUNED[name], {}
        else:
            grid = (m * triton.cdiv(n, fixed["BLOCK_N"]),)
            kernel, extra = _UNTUNED[name], fixed
        if name == "int8":
            if reuse and shared:
                q, d, s = shared[0]
            else:
                q, d, s = quantize_rows(x)
                if reuse and shared is not None:
                    shared.append((q, d, s))
            kernel[grid](q, d, s, *pointers, m, n, *strides, **meta, ASM=ASM, **extra)
        else:
            kernel[grid](x, *pointers, m, n, x.stride(0), *strides, **meta, **extra)

    if kernel is not None:
        if kernel not in _TUNED:
            raise ValueError(f"matvec: no kernel {kernel!r} (have {', '.join(_TUNED)})")
        run(kernel, reuse=True)
    elif AUTOTUNE and config is None:
        # Rows by power of two: a prefill's grouped call has any row count, and each new
        # key costs a timing of every kernel. A weighted sum over slots is its own shape
        # (its key alone grows, so the choices kept on disk for the others stay valid).
        int8 = x.dtype in INT8_DTYPES
        # x's int8 rows came with the call (the decode step's glue kernels write them):
        # the int8 kernel is then one launch, not two, and is timed so.
        given = bool(shared)
        key = (1 << (pairs - 1).bit_length(), n, k, int(weight.qtype), grouped, int8)
        key += ((slots,) if slots > 1 else ()) + (("given",) if given else ())
        gpu = torch.cuda.get_device_name(x.device) if x.is_cuda else x.device.type
        name = _faster.get((gpu, *key))  # mismatched cards each measure their own
        if name is None:
            name = _choices.get(gpu, key)
            if name is None:
                name = _pick_faster(run, _KERNELS if int8 else ("affine",), given)
                _choices.put(gpu, key, name)
            _faster[(gpu, *key)] = name
        run(name, reuse=True)
    else:
        fixed = dict(FIXED_CONFIG if config is None else config)
        name = (
            "int8"
            if fixed.pop("INT8", False)
            else "affine"
            if fixed.pop("AFFINE", False)
            else "plain"
        )
        if name != "plain":
            fixed.pop("DEFER", None)
        run(name, fixed, reuse=True)
    return y


def _pick_faster(run: Any, names: tuple[str, ...], given: bool = False) -> str:
    """The fastest of the tuned matvecs ``names`` for one shape (each tuned first), timed
    as the autotuner times configs (see _bench); ``given``: the int8 activations come
    with the call, so the int8 kernel is timed without the launch that makes them (on
    an H200 that launch made the float kernel look faster for an 8B's v_proj and half a
    0.6B's Q8_0 matvecs, where the int8 one is faster as decode runs it)."""
    if len(names) == 1:
        return names[0]
    timings = {}
    for name in names:
        run(name, reuse=given)  # tunes (or reads the tuning from disk)
        timings[name] = _bench(lambda name=name: run(name, reuse=given), None)
    return min(timings, key=timings.__getitem__)


def dequantize_rows(
    weight: QuantizedTensor,
    start: int = 0,
    stop: int | None = None,
    dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """Rows ``start:stop`` of the weight as a dense (rows, K) tensor of ``dtype``."""
    _check(weight)
    data = weight.data[start:stop]
    rows, k = data.shape[0], weight.shape[1]
    out = torch.empty(rows, k, dtype=dtype, device=data.device)
    if rows == 0:
        return out
    unit, unit_bytes, g = _unit(weight.qtype, k)
    block_n = 8
    grid = (triton.cdiv(rows, block_n), k // unit)
    _dequant_kernel[grid](
        data, out, rows, data.stride(0), out.stride(0),
        QTYPE=int(weight.qtype), UNIT=unit, UNIT_BYTES=unit_bytes, G=g, BLOCK_N=block_n,
        num_warps=4, **grid_dependency.launch(data.device),
    )  # fmt: skip
    return out


def linears(
    x: torch.Tensor, weights: tuple[QuantizedTensor, ...], quantized: Int8Rows | None = None
) -> list[torch.Tensor]:
    """:func:`linear` of one ``x`` by each of ``weights``, no biases: for a decode step's
    few rows, :func:`matvecs` (one quantization of x for all of them)."""
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    if x2.shape[0] > MATVEC_MAX_ROWS or any(w.shape[1] != k for w in weights):
        return [linear(x, w) for w in weights]
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    return [y.view(*x.shape[:-1], -1) for y in matvecs(x2, weights, quantized)]


def linear(
    x: torch.Tensor,
    weight: QuantizedTensor,
    bias: torch.Tensor | None = None,
    quantized: Int8Rows | None = None,
) -> torch.Tensor:
    """``x @ W.T + bias`` for quantized ``W`` on the GPU: the matvec for a few rows, else
    chunks of dequantized rows through cuBLAS."""
    n, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(f"linear: input has {x.shape[-1]} features, weight expects {k}")
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if x2.shape[0] <= MATVEC_MAX_ROWS:
        out = matvec(x2, weight, quantized=quantized)
    else:
        step = max(1, DEQUANT_CHUNK_ELEMENTS // k)
        if step >= n:
            out = x2 @ dequantize_rows(weight, dtype=x.dtype).T
        else:
            out = x2.new_empty(x2.shape[0], n)
            for start in range(0, n, step):
                w = dequantize_rows(weight, start, start + step, dtype=x.dtype)
                out[:, start : start + w.shape[0]] = x2 @ w.T
    if bias is not None:
        out += bias
    return out.view(*x.shape[:-1], n)
