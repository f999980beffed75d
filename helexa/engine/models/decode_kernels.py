"""The decode step's own Triton kernels: attention over the live KV length, and the glue
between the matvecs fused into single launches.

A batch-1 decode step is memory-bound, and inside a CUDA graph each tiny kernel still
costs 1-2 µs; a Qwen3 layer done in plain torch is ~33 of them (norms, residual adds,
q/k norms, RoPE, cache writes, attention, SiLU·mul). These kernels make it ~10:

- :func:`split_k_attention` ("flash-decoding"): one query token per sequence attends to
  the live prefix of a static KV cache. Read as one matmul per head that is a few long dot
  products on a handful of SMs, so the keys are cut into ``SPLITS`` slices, every
  (sequence, KV head, slice) is a program running an online softmax over its slice for all
  the query heads sharing that KV head (GQA), and a second kernel merges the slices by
  their log-sum-exp. The live length is read from device memory (the step's position + 1),
  never from the host: the grid is fixed by the cache's shape, so one CUDA graph serves
  every position, and each program stops at the live length, reading no padding.
  :func:`attention_rows` is the same as the decode step calls it: the merge also writes
  o_proj's int8 activations and, for the hybrid models' gated attention, applies
  sigmoid(gate).
- :func:`add_rms_norm`: the residual add and the next RMSNorm in one pass.
- :func:`qk_norm_rope_cache`: Qwen3's per-head q/k RMSNorm, RoPE at the step's position,
  and the k/v writes into the cache, for every head in one launch (also the hybrid
  models' zero-centred norms and partial RoPE).
- :func:`silu_mul`: SwiGLU's ``silu(gate) * up`` over the fused gate/up matvec's output.
- :func:`route`: a MoE router (logits, softmax, top-k, renormalisation) in one launch.
- :func:`shared_expert_add`: Qwen3-Next's routed + sigmoid(x @ gate) * shared expert.

Arithmetic is float32 inside and rounded once on the way out; the torch step in
cuda_graph.py is the reference they are tested against.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from helexa.engine.quant import grid_dependency
from helexa.engine.quant.grid_dependency import await_inputs
from helexa.engine.quant.tensor import Int8Rows
from helexa.engine.quant.triton_kernels import quantized_rows, store_quantized

BLOCK_N = 64
# Query rows of one program's tile: tl.dot needs at least 16; GQA groups are 1-16 heads.
MIN_GROUP_TILE = 16


@triton.jit
def _split_kernel(
    Q,  # [B, Hq, D]
    K,  # [B, Hkv, S, D], last dim contiguous
    V,
    Length,  # [1] int64: keys 0..Length-1 are live
    Part,  # [B, Hq, SPLITS, D] float32
    Lse,  # [B, Hq, SPLITS] float32
    stride_qb,
    stride_qh,
    stride_kb,
    stride_kh,
    stride_ks,
    stride_vb,
    stride_vh,
    stride_vs,
    kv_heads,
    scale,
    GROUP: tl.constexpr,
    GROUP_TILE: tl.constexpr,
    D: tl.constexpr,
    BLOCK: tl.constexpr,
    SPLITS: tl.constexpr,
    PRECISION: tl.constexpr,
    PDL: tl.constexpr,
):
    await_inputs(PDL)
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // kv_heads
    h = bh % kv_heads
    length = tl.load(Length).to(tl.int32)
    per_split = tl.cdiv(tl.cdiv(length, SPLITS), BLOCK) * BLOCK
    start = split * per_split
    end = tl.minimum(start + per_split, length)

    g = tl.arange(0, GROUP_TILE)
    d = tl.arange(0, D)
    heads = h * GROUP + g  # the query heads of KV head h
    live = g < GROUP
    q = tl.load(
        Q + b * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=live[:, None], other=0.0
    )

    m = tl.full([GROUP_TILE], float("-inf"), tl.float32)
    denom = tl.zeros([GROUP_TILE], tl.float32)
    acc = tl.zeros([GROUP_TILE, D], tl.float32)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    for n in range(start, end, BLOCK):
        keys = n + tl.arange(0, BLOCK)
        visible = keys < end
        k = tl.load(
            k_base + keys[None, :] * stride_ks + d[:, None], mask=visible[None, :], other=0.0
        )
        s = tl.dot(q, k, input_precision=PRECISION) * scale  # [GROUP_TILE, BLOCK] float32
        s = tl.where(visible[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m - m_new)
        denom = denom * alpha + tl.sum(p, 1)
        v = tl.load(
            v_base + keys[:, None] * stride_vs + d[None, :], mask=visible[:, None], other=0.0
        )
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m = m_new

    empty = denom == 0.0  # a slice past the live length
    out = acc / tl.where(empty, 1.0, denom)[:, None]
    lse = tl.where(empty, float("-inf"), m + tl.log(tl.where(empty, 1.0, denom)))
    rows = (b * kv_heads * GROUP + heads) * SPLITS + split  # [B, Hq, SPLITS] flattened
    # An empty slice writes only its -inf log-sum-exp: at a short live length most slices
    # are empty (the grid is sized for the whole cache), and the merge skips their parts.
    tl.store(Part + rows[:, None] * D + d[None, :], out, mask=(live & (denom > 0.0))[:, None])
    tl.store(Lse + rows, lse, mask=live)


@triton.jit
def _merge_kernel(
    Part, Lse, Out, Gate, Q, Dq, S, stride_gate, heads,
    D: tl.constexpr, SPLITS: tl.constexpr, GATED: tl.constexpr, QUANT: tl.constexpr,
    PDL: tl.constexpr,
):  # fmt: skip
    await_inputs(PDL)
    row = tl.program_id(0)  # one (sequence, query head)
    s = tl.arange(0, SPLITS)
    d = tl.arange(0, D)
    lse = tl.load(Lse + row * SPLITS + s)
    weight = tl.exp(lse - tl.max(lse, 0))  # an empty slice weighs 0
    # only the live slices' parts are read (an empty slice wrote none)
    filled = (lse > float("-inf"))[:, None]
    part = tl.load(Part + (row * SPLITS + s[:, None]) * D + d[None, :], mask=filled, other=0.0)
    dtype = Out.dtype.element_ty
    out = (tl.sum(part * weight[:, None], 0) / tl.sum(weight, 0)).to(dtype)
    if GATED:  # y * sigmoid(gate), each rounded as the torch ops round them
        b, h = row // heads, row % heads
        g = tl.load(Gate + b * stride_gate + h * 2 * D + D + d).to(tl.float32)
        sig = (1.0 / (1.0 + tl.exp(-g))).to(dtype).to(tl.float32)
        out = (out.to(tl.float32) * sig).to(dtype)
    tl.store(Out + row * D + d, out)
    if QUANT:  # o_proj's int8 activations: a head is D // 32 whole blocks of its row
        blocks = tl.arange(0, D // 32)[:, None]
        oq = tl.reshape(out.to(tl.float32), [D // 32, 32])
        store_quantized(oq, blocks, blocks < D // 32, Q + row * D, Dq + row * (D // 32),
                        S + row * (D // 16), D // 32)  # fmt: skip


def splits_for(programs: int, max_seq: int, sms: int) -> int:
    """Slices per (sequence, KV head): enough programs to fill every SM about twice, no
    more slices than blocks of keys the cache holds, a power of two (the merge's tile)."""
    want = max(1, (2 * sms + programs - 1) // programs)
    cap = max(1, triton.cdiv(max_seq, BLOCK_N))
    return min(triton.next_power_of_2(want), triton.next_power_of_2(cap))


def _split(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, length: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The split-K pass: each (sequence, KV head, slice of keys) program's partial output
    and log-sum-exp, and the number of slices."""
    batch, heads, _, dim = q.shape
    kv_heads, max_seq = k.shape[1], k.shape[2]
    group = heads // kv_heads
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 8
    splits = splits_for(batch * kv_heads, max_seq, sms)
    q3 = q.reshape(batch, heads, dim)
    part = torch.empty(batch, heads, splits, dim, dtype=torch.float32, device=q.device)
    lse = torch.empty(batch, heads, splits, dtype=torch.float32, device=q.device)
    _split_kernel[(batch * kv_heads, splits)](
        q3, k, v, length, part, lse,
        q3.stride(0), q3.stride(1), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), kv_heads, dim**-0.5,
        GROUP=group, GROUP_TILE=max(MIN_GROUP_TILE, triton.next_power_of_2(group)), D=dim,
        BLOCK=BLOCK_N, SPLITS=splits,
        # float32 caches (tests, CPU-exact models) get float32 products, not TF32's 10 bits
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        **grid_dependency.launch(q.device),
    )  # fmt: skip
    return part, lse, splits


def split_k_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, length: torch.Tensor
) -> torch.Tensor:
    """Attention of one query per head over the first ``length`` keys of a cache.

    q [B, Hq, 1, D]; k, v [B, Hkv, S, D] (views of the cache, last dim contiguous);
    ``length`` [1] int64 on the device. Returns [B, Hq, 1, D] in q's dtype (the decode
    step takes :func:`attention_rows`, the same as o_proj's input rows)."""
    y, _ = attention_rows(q, k, v, length)
    return y.view(q.shape)


def attention_rows(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    length: torch.Tensor,
    q_gate: torch.Tensor | None = None,
    quantize: bool = False,
) -> tuple[torch.Tensor, Int8Rows | None]:
    """:func:`split_k_attention` as the rows o_proj reads: y [B, 1, Hq * D] and, with
    ``quantize``, its int8 activations, both written by the merge (so o_proj's matvec
    needs no launch to quantize), where a head is whole 32-element blocks (a head of 16
    gets None, and o_proj quantizes its own input).

    With ``q_gate``, the hybrid models' gated attention: y times sigmoid(gate), where
    ``q_gate`` is the [B, 1, Hq * 2D] projection q came from, each head's gate after its
    q (any row stride)."""
    batch, heads, _, dim = q.shape
    quantize = quantize and dim % 32 == 0
    gate = q_gate.reshape(batch, -1) if q_gate is not None else None
    if gate is not None and (gate.shape[-1] != 2 * heads * dim or gate.stride(-1) != 1):
        raise ValueError(f"attention_rows: q_gate {tuple(gate.shape)} for q {tuple(q.shape)}")
    part, lse, splits = _split(q, k, v, length)
    out = torch.empty(batch, 1, heads * dim, dtype=q.dtype, device=q.device)
    quant = quantized_rows(batch, heads * dim, q.device) if quantize else None
    _merge_kernel[(batch * heads,)](
        part, lse, out, out if gate is None else gate, *(quant or (out, out, out)),
        0 if gate is None else gate.stride(0), heads,
        D=dim, SPLITS=splits, GATED=gate is not None, QUANT=quantize,
        **grid_dependency.launch(q.device),
    )  # fmt: skip
    return out, quant


@triton.jit
def _add_rms_norm_kernel(
    X, Delta, W, Out, H, Q, D, S, width, eps,
    HAS_DELTA: tl.constexpr, QUANT: tl.constexpr, SCALE_FP32: tl.constexpr, BLOCK: tl.constexpr,
    PDL: tl.constexpr,
):  # fmt: skip
    await_inputs(PDL)
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    inside = cols < width
    x = tl.load(X + row * width + cols, mask=inside, other=0.0)
    if HAS_DELTA:
        x = x + tl.load(Delta + row * width + cols, mask=inside, other=0.0)
        tl.store(Out + row * width + cols, x, mask=inside)  # the residual stream, rounded
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, 0) / width + eps)
    w = tl.load(W + cols, mask=inside, other=0.0)
    # The zero-centred norm's float32 1 + w scales in float32, then rounds; Qwen3's norm
    # (as torch) normalises, rounds, then scales.
    normed = xf * rstd if SCALE_FP32 else (xf * rstd).to(x.dtype)
    h = (normed * w).to(x.dtype)
    tl.store(H + row * width + cols, h, mask=inside)
    if QUANT:  # the next matvec's int8 activations, from the rounded h it would read
        b = tl.arange(0, BLOCK // 32)[:, None]
        hq = tl.reshape(h.to(tl.float32), [BLOCK // 32, 32])
        store_quantized(hq, b, b < width // 32, Q + row * width, D + row * (width // 32),
                        S + row * (width // 16), BLOCK // 32)  # fmt: skip


def add_rms_norm(
    x: torch.Tensor,
    delta: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    quantize: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, Int8Rows | None]:
    """(x + delta, rms_norm(x + delta) * weight, and with ``quantize`` the latter's int8
    activations for the matvec it feeds) for rows of ``x`` [..., width]; ``delta`` None
    normalises ``x`` as it is (the first layer). A float32 ``weight`` beside half-precision
    ``x`` scales before rounding, as the hybrid models' zero-centred norm (its 1 + w kept
    float32, qwen3_next.zc_rms_norm) does; otherwise the normalised row is rounded first,
    as Qwen3's norm in torch."""
    width = x.shape[-1]
    rows = x.numel() // width
    x = x.contiguous()
    out = torch.empty_like(x) if delta is not None else x
    h = torch.empty_like(x)
    quant = quantized_rows(rows, width, x.device) if quantize else None
    _add_rms_norm_kernel[(rows,)](
        x,
        delta.contiguous() if delta is not None else x,
        weight,
        out,
        h,
        *(quant or (h, h, h)),  # unused without QUANT
        width,
        eps,
        HAS_DELTA=delta is not None,
        QUANT=quantize,
        SCALE_FP32=weight.dtype == torch.float32 and x.dtype != torch.float32,
        BLOCK=triton.next_power_of_2(width),
        **grid_dependency.launch(x.device),
    )
    return out, h, quant


@triton.jit
def _qk_norm_rope_cache_kernel(
    Q,  # [B, Hq * stride_qh] rows (views of the projections' output: row strides below)
    K,  # [B, Hkv*D]
    V,  # [B, Hkv*D]
    QNorm,  # [D]
    KNorm,  # [D]
    Cos,  # [max_seq, ROT]
    Sin,
    Pos,  # [1] int64
    QOut,  # [B, Hq, D]
    KCache,  # [B_max, Hkv, S, D]
    VCache,
    stride_q,
    stride_qh,  # D, or 2 * D where each q head is followed by its output gate
    stride_k,
    stride_v,
    stride_cb,
    stride_ch,
    stride_cs,
    q_heads,
    eps,
    D: tl.constexpr,
    ROT: tl.constexpr,  # the leading channels RoPE rotates (NEOX halves); the rest pass
    SCALE_FP32: tl.constexpr,  # the zero-centred norm: scale by float32 1 + w, then round
    PDL: tl.constexpr,
):
    await_inputs(PDL)
    b = tl.program_id(0)
    head = tl.program_id(1)  # q heads, then k heads (each with its v head)
    d = tl.arange(0, D)
    rotated = d < ROT
    partner = tl.where(d < ROT // 2, d + ROT // 2, d - ROT // 2)  # rotate_half's source
    partner = tl.where(rotated, partner, d)
    pos = tl.load(Pos)
    cos = tl.load(Cos + pos * ROT + d, mask=rotated, other=1.0).to(tl.float32)
    sin = tl.load(Sin + pos * ROT + d, mask=rotated, other=0.0).to(tl.float32)
    sin = tl.where(d < ROT // 2, -sin, sin)
    if head < q_heads:
        src = Q + b * stride_q + head * stride_qh
        norm = QNorm
    else:
        src = K + b * stride_k + (head - q_heads) * D
        norm = KNorm
    x = tl.load(src + d)
    a = x.to(tl.float32)
    c = tl.load(src + partner).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(a * a, 0) / D + eps)
    w, wp = tl.load(norm + d).to(tl.float32), tl.load(norm + partner).to(tl.float32)
    if SCALE_FP32:
        n = (a * rstd * w).to(x.dtype).to(tl.float32)
        np_ = (c * rstd * wp).to(x.dtype).to(tl.float32)
    else:
        n = (a * rstd).to(x.dtype).to(tl.float32) * w
        np_ = (c * rstd).to(x.dtype).to(tl.float32) * wp
    r = tl.where(rotated, n * cos + np_ * sin, n).to(x.dtype)
    if head < q_heads:
        tl.store(QOut + (b * q_heads + head) * D + d, r)
    else:
        kv = head - q_heads
        at = b * stride_cb + kv * stride_ch + pos * stride_cs
        tl.store(KCache + at + d, r)
        tl.store(VCache + at + d, tl.load(V + b * stride_v + kv * D + d))


def qk_norm_rope_cache(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_norm: torch.Tensor,
    k_norm: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    pos: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    eps: float,
    gated: bool = False,
) -> torch.Tensor:
    """The attention's inputs for one decode step: q, k, v [B, 1, H*D] (the projections'
    output, any row stride) -> q normed and rotated [B, Hq, 1, D]; k normed and rotated,
    and v, written into the caches [B_max, Hkv, S, D] at ``pos`` [1] (a device tensor).
    ``cos``/``sin`` are the model's whole [max_seq, R] tables: RoPE turns the first R
    channels of a head (all of them for Qwen3, a quarter for the hybrid models' partial
    RoPE). ``gated``: q is [B, 1, Hq * 2D], each head followed by its output gate (the
    hybrid models' gated attention). A float32 norm weight beside half-precision q is
    the zero-centred norm's 1 + w, which scales before rounding (as add_rms_norm)."""
    batch, dim = q.shape[0], q_norm.shape[0]
    q_heads, kv_heads = q.shape[-1] // (2 * dim if gated else dim), k.shape[-1] // dim
    q2, k2, v2 = (t.reshape(batch, t.shape[-1]) for t in (q, k, v))
    if q2.stride(-1) != 1 or k2.stride(-1) != 1 or v2.stride(-1) != 1:
        raise ValueError("qk_norm_rope_cache: q, k and v rows must be contiguous")
    out = torch.empty(batch, q_heads, 1, dim, dtype=q.dtype, device=q.device)
    _qk_norm_rope_cache_kernel[(batch, q_heads + kv_heads)](
        q2, k2, v2, q_norm, k_norm, cos, sin, pos, out, k_cache, v_cache,
        q2.stride(0), 2 * dim if gated else dim, k2.stride(0), v2.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), q_heads, eps,
        D=dim, ROT=cos.shape[-1],
        SCALE_FP32=q_norm.dtype == torch.float32 and q.dtype != torch.float32,
        **grid_dependency.launch(q.device),
    )  # fmt: skip
    return out


@triton.jit
def _silu_mul_kernel(
    Gate, Up, Out, Q, D, S, width, stride_gate, stride_up,
    QUANT: tl.constexpr, BLOCK: tl.constexpr,
    PDL: tl.constexpr,
):  # fmt: skip
    await_inputs(PDL)
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = cols < width
    gate = tl.load(Gate + row * stride_gate + cols, mask=inside, other=0.0)
    up = tl.load(Up + row * stride_up + cols, mask=inside, other=0.0)
    g = gate.to(tl.float32)
    silu = (g / (1.0 + tl.exp(-g))).to(gate.dtype)  # rounded as torch's F.silu output
    h = (silu * up).to(gate.dtype)
    tl.store(Out + row * width + cols, h, mask=inside)
    if QUANT:  # down_proj's int8 activations
        b = tl.program_id(1) * (BLOCK // 32) + tl.arange(0, BLOCK // 32)[:, None]
        hq = tl.reshape(h.to(tl.float32), [BLOCK // 32, 32])
        store_quantized(hq, b, b < width // 32, Q + row * width, D + row * (width // 32),
                        S + row * (width // 16), BLOCK // 32)  # fmt: skip


def silu_mul(
    gate_up: torch.Tensor, quantize: bool = False, up: torch.Tensor | None = None
) -> tuple[torch.Tensor, Int8Rows | None]:
    """``silu(gate) * up`` where ``gate_up`` [..., 2F] holds gate then up (one fused
    matvec's output), or with ``up`` [..., F] is the gate alone (gate and up of different
    block types, two matvecs): [..., F], and with ``quantize`` its int8 activations for
    down_proj. Rows may be strided; each row's elements must be contiguous."""
    if up is None:
        width = gate_up.shape[-1] // 2
        gate, up = gate_up[..., :width], gate_up[..., width:]
    else:
        gate, width = gate_up, gate_up.shape[-1]
        if up.shape != gate.shape:
            raise ValueError(f"silu_mul: gate {tuple(gate.shape)} and up {tuple(up.shape)}")
    rows = gate.numel() // width
    g2, u2 = gate.reshape(rows, width), up.reshape(rows, width)  # views where the rows allow
    if g2.stride(-1) != 1 or u2.stride(-1) != 1:
        raise ValueError("silu_mul: gate and up rows must be contiguous")
    out = torch.empty(*gate.shape[:-1], width, dtype=gate.dtype, device=gate.device)
    quant = quantized_rows(rows, width, gate.device) if quantize else None
    block = 1024
    _silu_mul_kernel[(rows, triton.cdiv(width, block))](
        g2, u2, out, *(quant or (out, out, out)), width, g2.stride(0), u2.stride(0),
        QUANT=quantize, BLOCK=block,
        **grid_dependency.launch(gate.device),
    )  # fmt: skip
    return out, quant


@triton.jit
def _shared_expert_add_kernel(
    X,  # [T, H]: the sparse block's input
    Gate,  # [H]: shared_expert_gate's one row
    Routed,  # [T, N]: the routed experts' weighted sum
    Shared,  # [T, N]: the shared expert's output
    Out,  # [T, N]
    H,
    N,
    stride_x,
    stride_r,
    stride_s,
    BLOCK_H: tl.constexpr,
    BLOCK: tl.constexpr,
    PDL: tl.constexpr,
):
    await_inputs(PDL)
    row, pid = tl.program_id(0), tl.program_id(1)
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for start in range(0, H, BLOCK_H):
        cols = start + tl.arange(0, BLOCK_H)
        mask = cols < H
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        acc += x * tl.load(Gate + cols, mask=mask, other=0.0).to(tl.float32)
    dtype = Out.dtype.element_ty
    logit = tl.sum(acc, axis=0).to(dtype).to(tl.float32)  # rounded as the gate's linear
    gate = (1.0 / (1.0 + tl.exp(-logit))).to(dtype).to(tl.float32)  # and its sigmoid
    cols = pid * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    routed = tl.load(Routed + row * stride_r + cols, mask=mask).to(tl.float32)
    shared = tl.load(Shared + row * stride_s + cols, mask=mask).to(tl.float32)
    tl.store(Out + row * N + cols, (routed + gate * shared).to(dtype), mask=mask)


def shared_expert_add(
    routed: torch.Tensor, shared: torch.Tensor, x: torch.Tensor, gate: torch.Tensor
) -> torch.Tensor:
    """``routed + sigmoid(x @ gate.T) * shared`` (qwen3_next.SharedExpertMoE's sum) in one
    launch instead of five (the gate's dot and its reduction, sigmoid, mul, add): for
    ``x`` [..., H], ``gate`` (1, H) and ``routed``/``shared`` [..., N], [..., N] in their
    dtype. The gate's logit and sigmoid are rounded to that dtype as the torch ops round
    them; the sum is taken in float32 and rounded once (the reference rounds the product
    first)."""
    hidden, width = x.shape[-1], routed.shape[-1]
    if gate.shape != (1, hidden) or shared.shape != routed.shape:
        raise ValueError(
            f"shared_expert_add: gate {tuple(gate.shape)}, routed {tuple(routed.shape)}, "
            f"shared {tuple(shared.shape)} for x {tuple(x.shape)}"
        )
    rows = routed.numel() // width
    x2, r2, s2 = (t.reshape(rows, t.shape[-1]) for t in (x, routed, shared))
    if any(t.stride(-1) != 1 for t in (x2, r2, s2)) or not gate.is_contiguous():
        raise ValueError("shared_expert_add: rows must be contiguous")
    out = torch.empty(*routed.shape, dtype=routed.dtype, device=routed.device)
    block = 1024
    _shared_expert_add_kernel[(rows, triton.cdiv(width, block))](
        x2, gate, r2, s2, out, hidden, width, x2.stride(0), r2.stride(0), s2.stride(0),
        BLOCK_H=min(1024, triton.next_power_of_2(hidden)), BLOCK=block,
        **grid_dependency.launch(x.device),
    )  # fmt: skip
    return out


@triton.jit
def _route_kernel(
    X,  # [T, H]
    Router,  # [E, H]
    Logits,  # [T, E] float32 scratch
    Tickets,  # [>= T] int32, all 0 between launches: token t's programs done so far
    Weights,  # [T, TOP_K] in X's dtype
    Experts,  # [T, TOP_K] int32
    H,
    stride_x,
    stride_r,
    E: tl.constexpr,
    E_TILE: tl.constexpr,  # E rounded up to a power of two
    TOP_K: tl.constexpr,
    K_TILE: tl.constexpr,  # TOP_K rounded up to a power of two
    NORM: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCKS: tl.constexpr,  # programs per token: cdiv(E, BLOCK_E)
    PDL: tl.constexpr,
):
    t = tl.program_id(0)
    e = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    live = e < E
    rows = Router + e[:, None] * stride_r
    # The router's first BLOCK_H columns (all of a 30B-A3B's) are weights, which no kernel
    # writes: read while the norm before still runs (see grid_dependency), so its trip to
    # memory is off the step's path.
    cols = tl.arange(0, BLOCK_H)
    w = tl.load(rows + cols[None, :], mask=live[:, None] & (cols < H)[None, :], other=0.0)
    await_inputs(PDL)
    x = tl.load(X + t * stride_x + cols, mask=cols < H, other=0.0).to(tl.float32)
    acc = w.to(tl.float32) * x[None, :]  # [BLOCK_E, BLOCK_H]
    for h0 in range(BLOCK_H, H, BLOCK_H):
        cols = h0 + tl.arange(0, BLOCK_H)
        inside = cols < H
        x = tl.load(X + t * stride_x + cols, mask=inside, other=0.0).to(tl.float32)
        w = tl.load(rows + cols[None, :], mask=live[:, None] & inside[None, :], other=0.0)
        acc += w.to(tl.float32) * x[None, :]
    logits = tl.sum(acc, 1).to(X.dtype.element_ty).to(tl.float32)  # rounded as F.linear's
    tl.store(Logits + t * E + e, logits, mask=live)
    # The last of the token's programs to finish routes it: every thread's logits stored
    # before one thread's release of the ticket, read after its acquire (CUTLASS's
    # split-K semaphore: barrier, then a gpu-scope release), and past L1 (.cg).
    tl.debug_barrier()
    if tl.atomic_add(Tickets + t, 1, sem="acq_rel", scope="gpu") == BLOCKS - 1:
        every = tl.arange(0, E_TILE)
        all_logits = tl.load(
            Logits + t * E + every, mask=every < E, other=float("-inf"), cache_modifier=".cg"
        )
        p = tl.exp(all_logits - tl.max(all_logits, 0))
        p = p / tl.sum(p, 0)  # softmax in float32; padding is 0
        # One max per pick over (probability bits, E_TILE - 1 - id): a probability is >= 0,
        # so its bits order as it does, and equal ones give the lower id.
        key = (p.to(tl.int32, bitcast=True).to(tl.int64) << 32) | (E_TILE - 1 - every)
        slot = tl.arange(0, K_TILE)
        top = tl.zeros([K_TILE], dtype=tl.float32)
        ids = tl.zeros([K_TILE], dtype=tl.int32)
        for j in tl.static_range(TOP_K):  # largest first, as torch.topk sorts them
            best = tl.max(key, 0)
            prob = (best >> 32).to(tl.int32).to(tl.float32, bitcast=True)
            top = tl.where(slot == j, prob, top)
            ids = tl.where(slot == j, E_TILE - 1 - (best & 0xFFFFFFFF).to(tl.int32), ids)
            key = tl.where(key == best, -1, key)  # taken
        if NORM:
            top = top / tl.sum(top, 0)
        keep = slot < TOP_K
        tl.store(Weights + t * TOP_K + slot, top.to(Weights.dtype.element_ty), mask=keep)
        tl.store(Experts + t * TOP_K + slot, ids, mask=keep)
        tl.store(Tickets + t, 0)  # for the next launch (each launch is stream-ordered)


# Router rows per routing program: 4 rows of a 2048-wide bf16 router are 16 KB, so a
# 128-expert router is read by 32 programs per token, not by one SM. A program loads its
# rows in one pass up to ROUTE_COLUMNS wide: the loop is not pipelined, and at 512
# columns a 2048-wide router cost four dependent trips to memory (7 µs a layer in an
# H200 profile of a 30B-A3B's decode). Past 2048, four rows of float32 sums would crowd
# four warps' registers.
ROUTE_EXPERTS = 4
ROUTE_COLUMNS = 2048
# Per device, the routing kernels' tickets (one int32 per token, zero between launches),
# grown as batches grow. Outgrown ones are kept: a captured graph may still replay them.
_tickets: dict[torch.device, torch.Tensor] = {}
_outgrown: list[torch.Tensor] = []


def _route_tickets(device: torch.device, tokens: int) -> torch.Tensor:
    """Zeroed int32 tickets for ``tokens`` tokens on ``device``, shared by every MoE layer
    there: the step's launches on a device run one after another (one worker thread per
    device, one stream at a time), and each launch leaves them zero again."""
    tickets = _tickets.get(device)
    if tickets is None or tickets.numel() < tokens:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                f"route: {tokens} tokens need new tickets during CUDA graph capture; run "
                "the step once eagerly first (as GraphDecoder's warm-up does)"
            )
        if tickets is not None:
            _outgrown.append(tickets)
        tickets = torch.zeros(max(tokens, 64), dtype=torch.int32, device=device)
        _tickets[device] = tickets
    return tickets


def route(
    x: torch.Tensor, router: torch.Tensor, top_k: int, norm_topk_prob: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """qwen3_moe.SparseMoE.route (transformers' Qwen3MoeSparseMoeBlock router) in one
    launch: for x [T, H] and the dense router [E, H], (weights [T, top_k] in x's dtype,
    experts [T, top_k] int32), largest first. Logits are rounded to x's dtype as the
    router's linear would, softmax and the optional renormalisation are float32, and the
    weights are cast back as transformers casts them. Ties pick the lower expert id
    (torch.topk leaves their order unspecified). No host sync: graph-capturable, once an
    eager call has made the tickets for this many tokens."""
    tokens, hidden = x.shape
    experts = router.shape[0]
    if router.shape != (experts, hidden) or router.dtype != x.dtype:
        raise ValueError(
            f"route: router {router.dtype} {tuple(router.shape)} for x {x.dtype} {tuple(x.shape)}"
        )
    if not 0 < top_k <= experts:
        raise ValueError(f"route: top_k {top_k} must be in 1..{experts}")
    x, router = x.contiguous(), router.contiguous()
    weights = torch.empty(tokens, top_k, dtype=x.dtype, device=x.device)
    ids = torch.empty(tokens, top_k, dtype=torch.int32, device=x.device)
    if tokens == 0:
        return weights, ids
    logits = torch.empty(tokens, experts, dtype=torch.float32, device=x.device)
    blocks = triton.cdiv(experts, ROUTE_EXPERTS)
    _route_kernel[(tokens, blocks)](
        x, router, logits, _route_tickets(x.device, tokens), weights, ids,
        hidden, x.stride(0), router.stride(0),
        E=experts, E_TILE=triton.next_power_of_2(experts), TOP_K=top_k,
        K_TILE=triton.next_power_of_2(top_k), NORM=norm_topk_prob, BLOCK_E=ROUTE_EXPERTS,
        BLOCK_H=min(ROUTE_COLUMNS, triton.next_power_of_2(hidden)), BLOCKS=blocks,
        num_warps=4,
        **grid_dependency.launch(x.device),
    )  # fmt: skip
    return weights, ids
