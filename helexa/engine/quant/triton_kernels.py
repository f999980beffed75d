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

from helexa.engine.quant.formats import QK_K, Q, block_format
from helexa.engine.quant.kernel_choices import KernelChoices
from helexa.engine.quant.tensor import QuantizedTensor

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
    low = s < 4
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
    """Byte pointers [BN, 1, 1, 1] to weight rows ``rows`` for activation row ``m``: of
    the one matrix, or (``GROUPED``) of expert ``idx[m]`` in a stack ``stride_e`` bytes
    apart. Rows past N read row N-1 (always valid memory), dropped at the store."""
    if GROUPED:
        w_ptr += tl.load(idx_ptr + m).to(tl.int64) * stride_e
    safe = tl.minimum(rows, N - 1)
    return (w_ptr + safe.to(tl.int64) * stride_w)[:, None, None, None]


@triton.jit
def _step_units(row_ptr, x_row, u0, N_UNITS: tl.constexpr, UNIT: tl.constexpr,
                UNIT_BYTES: tl.constexpr, U: tl.constexpr):  # fmt: skip
    """The ``U`` units a matvec step reads from ``u0``: their blocks' pointers (per row),
    their activations' start, and which of them exist (units past ``N_UNITS`` re-read the
    last one and are zeroed through x)."""
    units = u0 + tl.arange(0, U)
    valid = (units < N_UNITS)[None, :, None, None]
    units = tl.minimum(units, N_UNITS - 1)[None, :, None, None]
    return row_ptr + units * UNIT_BYTES, x_row + units * UNIT, valid


@triton.jit
def _matvec_kernel(
    x_ptr,
    w_ptr,
    y_ptr,
    idx_ptr,
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
    BLOCK_N: tl.constexpr,
    U: tl.constexpr,
    DEFER: tl.constexpr,
):
    """y[m, n] = sum_k x[m, k] * W[n, k] for BLOCK_N rows n over ``N_UNITS`` units.

    One grid axis (the others cap at 65535, fewer than an lm_head's row tiles), m fastest
    so the programs sharing a weight tile run together and share it in L2. ``DEFER`` keeps
    the products of every step in a register tile and sums rows once at the end, instead
    of a cross-thread reduction (and, over several warps, a barrier) at every step; which
    is faster depends on the shape, so the autotuner tries both.

    ``GROUPED``: ``w_ptr`` is a stack of experts ``stride_e`` bytes apart and row m of x
    meets expert ``idx[m]``, read here on the device: a MoE decode step's routed experts
    in one launch, with no copy of their blocks and no host sync."""
    pid = tl.program_id(0)
    m = pid % M
    rows = (pid // M) * BLOCK_N + tl.arange(0, BLOCK_N)
    # Units past N_UNITS re-read the last unit and are zeroed through x.
    row_ptr = _weight_rows(w_ptr, idx_ptr, m, rows, N, stride_w, stride_e, GROUPED)
    x_row = x_ptr + m.to(tl.int64) * stride_x
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
        blk, x_unit, valid = _step_units(row_ptr, x_row, u0, N_UNITS, UNIT, UNIT_BYTES, U)
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
    y = y_ptr + m.to(tl.int64) * stride_y + rows
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=rows < N)


@triton.jit
def _scaled_sums(q, a, b, x_unit, e, valid):
    """``sum(w * x)`` per sub-block of a [BN, U, A, B] tile of weights ``a * q + b``,
    with the scales out of the inner loop: ``a * sum(q * x) + b * sum(x)`` -> [BN, U, A, 1]."""
    x = tl.load(x_unit + e, mask=valid, other=0.0).to(tl.float32)
    dots = tl.sum(q * x, axis=3, keep_dims=True)
    return a * dots + b * tl.sum(x, axis=3, keep_dims=True)


@triton.jit
def _matvec_affine_kernel(
    x_ptr,
    w_ptr,
    y_ptr,
    idx_ptr,
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
    BLOCK_N: tl.constexpr,
    U: tl.constexpr,
):
    """:func:`_matvec_kernel`'s sums with each sub-block's scale applied once to its dot
    product (llama.cpp's order) instead of to every weight: per weight one multiply-add
    on the raw quant value, and no dequantized tile. Same grid, same row/unit handling,
    same ``GROUPED`` expert stacks."""
    pid = tl.program_id(0)
    m = pid % M
    rows = (pid // M) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ptr = _weight_rows(w_ptr, idx_ptr, m, rows, N, stride_w, stride_e, GROUPED)
    x_row = x_ptr + m.to(tl.int64) * stride_x
    # Per-sub-block partial sums, one per unit slot: Q8_0 G blocks, Q4_K/Q5_K 2 x 4, Q6_K 2 x 8.
    if QTYPE == 8:
        tile = tl.zeros([BLOCK_N, U, G, 1], dtype=tl.float32)
    elif QTYPE == 14:
        tile = tl.zeros([BLOCK_N, U, 8, 1], dtype=tl.float32)
    else:
        tile = tl.zeros([BLOCK_N, U, 4, 1], dtype=tl.float32)
    for u0 in range(0, N_UNITS, U):
        blk, x_unit, valid = _step_units(row_ptr, x_row, u0, N_UNITS, UNIT, UNIT_BYTES, U)
        if QTYPE == 8:
            q, d, e = _q8_0_affine(blk, G)
            tile += _scaled_sums(q, d, 0.0, x_unit, e, valid)
        else:
            q_a, a_a, b_a, e_a, q_b, a_b, b_b, e_b = _k_quant_affine(blk, QTYPE)
            tile += _scaled_sums(q_a, a_a, b_a, x_unit, e_a, valid)
            tile += _scaled_sums(q_b, a_b, b_b, x_unit, e_b, valid)
    acc = _row_sums(tile)
    y = y_ptr + m.to(tl.int64) * stride_y + rows
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=rows < N)


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
):
    """out[n, :] = dequantized W[n, :] for BLOCK_N rows at one unit; grid (rows, units)."""
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
# Grouped rows each read their own expert (no L2 sharing between them): tuned apart.
_TUNING: dict[str, Any] = {"key": ["N", "N_UNITS", "QTYPE", "GROUPED"]}
if "cache_results" in inspect.signature(triton.autotune).parameters:
    _TUNING["cache_results"] = True
# Triton times each config for 25 + 100 ms by default: with ~27 configs and ~10 decode
# shapes that is most of a first load's minute. A matvec runs for 10-500 µs, so 5 + 25 ms
# still averages 50-2500 runs per config.
if "do_bench" in inspect.signature(triton.autotune).parameters:
    _TUNING["do_bench"] = lambda fn, quantiles: _bench(fn, quantiles)  # defined below


def _bench(fn: Any, quantiles: Any) -> Any:
    """Triton's do_bench with the short timing above (the autotuner's benchmark hook)."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=5, rep=25, quantiles=quantiles)


_matvec_tuned = triton.autotune(_MATVEC_CONFIGS, **_TUNING)(_matvec_kernel)
_AFFINE_CONFIGS = [
    triton.Config({"BLOCK_N": c.kwargs["BLOCK_N"], "U": c.kwargs["U"]}, num_warps=c.num_warps)
    for c in _MATVEC_CONFIGS
    if not c.kwargs["DEFER"]
]
_affine_tuned = triton.autotune(_AFFINE_CONFIGS, **_TUNING)(_matvec_affine_kernel)
# Which of the two tuned matvecs is faster, per (M rounded up to a power of two, N, K,
# type, grouped): measured once per GPU model at the first call (the load's warm-up) and
# kept on disk beside Triton's own tuning (see KernelChoices), so a restart skips it.
_faster: dict[tuple[str, int, int, int, int, bool], Any] = {}
_KERNELS = {"plain": _matvec_tuned, "affine": _affine_tuned}


_choices = KernelChoices(os.environ.get("TRITON_CACHE_DIR"), names=tuple(_KERNELS))


def _unit(qtype: Q, k: int) -> tuple[int, int, int]:
    """(weights, bytes, Q8_0 blocks) per kernel unit: a k-quant super-block, or as many
    Q8_0 blocks (up to 8) as evenly divide the row."""
    fmt = block_format(qtype)
    if qtype != Q.Q8_0:
        return QK_K, fmt.type_size, 1
    g = next(g for g in (8, 4, 2, 1) if (k // 32) % g == 0)
    return 32 * g, fmt.type_size * g, g


def _check(weight: QuantizedTensor) -> None:
    if weight.qtype not in SUPPORTED:
        names = ", ".join(q.name for q in SUPPORTED)
        raise ValueError(f"no Triton kernel for {weight.qtype.name} (have {names})")
    if not weight.data.is_contiguous():
        raise ValueError("quantized weight data must be contiguous")


def matvec(
    x: torch.Tensor, weight: QuantizedTensor, config: dict[str, Any] | None = None
) -> torch.Tensor:
    """``x @ W.T`` for a few rows ``x`` (M, K) straight from the blocks; out (M, N) in
    ``x.dtype``. ``config`` (BLOCK_N, U, DEFER, num_warps; AFFINE for the scale-factored
    kernel) skips the autotuner: for tests and benchmarks that compare kernel variants.
    Autotuned, it runs whichever of the two kernels is faster for the shape."""
    _check(weight)
    if len(weight.shape) != 2:
        raise ValueError(f"matvec takes one (N, K) weight, got {weight.shape}: see grouped_matvec")
    return _launch(x, weight, None, config)


def grouped_matvec(
    x: torch.Tensor,
    experts: QuantizedTensor,
    index: torch.Tensor,
    config: dict[str, Any] | None = None,
) -> torch.Tensor:
    """Row ``r`` of ``x`` (R, K) times expert ``index[r]`` of the stack ``experts``
    (E, N, K): out (R, N) in ``x.dtype``, in one launch. ``index`` (R,) stays on the
    device and is read by the kernel, so the step that routes and applies the experts
    has no host sync and replays in a CUDA graph; an index must be in 0..E-1 (a router's
    top-k always is; this is not checked, which would need a sync)."""
    _check(experts)
    if len(experts.shape) != 3:
        raise ValueError(f"grouped_matvec takes an (E, N, K) stack, got {experts.shape}")
    r = x.shape[0]
    if index.shape != (r,) or index.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"grouped_matvec: index must be ({r},) int64/int32, one expert per row of x, "
            f"got {index.dtype} {tuple(index.shape)}"
        )
    if index.device != x.device or experts.device != x.device:
        raise ValueError("grouped_matvec: x, experts and index must be on one device")
    return _launch(x, experts, index.contiguous(), config)


def _launch(
    x: torch.Tensor,
    weight: QuantizedTensor,
    index: torch.Tensor | None,
    config: dict[str, Any] | None,
) -> torch.Tensor:
    """One matvec launch: plain (``index`` None, ``weight`` (N, K)) or grouped (``weight``
    an (E, N, K) stack, expert ``index[m]`` for row m)."""
    n, k = weight.shape[-2:]
    m = x.shape[0]
    if x.shape[-1] != k or x.stride(-1) != 1:
        raise ValueError(f"matvec: x must be (M, {k}) with unit stride, got {tuple(x.shape)}")
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return y
    unit, unit_bytes, g = _unit(weight.qtype, k)
    data = weight.data
    grouped = index is not None
    args = (
        x, data, y, index if grouped else y, m, n, x.stride(0), data.stride(-2), y.stride(0),
        data.stride(0) if grouped else 0,
    )  # fmt: skip
    meta = dict(
        N_UNITS=k // unit, GROUPED=grouped, QTYPE=int(weight.qtype), UNIT=unit,
        UNIT_BYTES=unit_bytes, G=g,
    )  # fmt: skip
    if AUTOTUNE and config is None:
        # Rows by power of two: a prefill's grouped call has any row count, and each new
        # key costs a timing of both kernels.
        key = (1 << (m - 1).bit_length(), n, k, int(weight.qtype), grouped)
        gpu = torch.cuda.get_device_name(x.device) if x.is_cuda else x.device.type
        kernel = _faster.get((gpu, *key))  # mismatched cards each measure their own
        if kernel is None:
            name = _choices.get(gpu, key)
            if name is None:
                name = _pick_faster(args, meta, m, n)
                _choices.put(gpu, key, name)
            kernel = _faster[(gpu, *key)] = _KERNELS[name]
        kernel[lambda c: (m * triton.cdiv(n, c["BLOCK_N"]),)](*args, **meta)
    else:
        fixed = dict(FIXED_CONFIG if config is None else config)
        grid = (m * triton.cdiv(n, fixed["BLOCK_N"]),)
        if fixed.pop("AFFINE", False):
            fixed.pop("DEFER", None)
            _matvec_affine_kernel[grid](*args, **meta, **fixed)
        else:
            _matvec_kernel[grid](*args, **meta, **fixed)
    return y


def _pick_faster(args: tuple[Any, ...], meta: dict[str, Any], m: int, n: int) -> str:
    """The name of the faster of the two autotuned matvecs for one shape (each tuned
    first)."""
    from triton.testing import do_bench

    timings = {}
    for name, kernel in _KERNELS.items():

        def launch(kernel: Any = kernel) -> None:
            kernel[lambda c: (m * triton.cdiv(n, c["BLOCK_N"]),)](*args, **meta)

        launch()  # tunes (or reads the tuning from disk)
        timings[name] = do_bench(launch, warmup=5, rep=20)
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
        num_warps=4,
    )  # fmt: skip
    return out


def linear(
    x: torch.Tensor, weight: QuantizedTensor, bias: torch.Tensor | None = None
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
        out = matvec(x2, weight)
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
