"""The Gated DeltaNet decode step's Triton kernels: everything a linear-attention layer
does between its input projections' matvecs and its output projection's, in two launches.

In plain torch (qwen3_next's ``_delta_step``, the reference these are tested against) a
layer's step is 46 small kernels in half precision (aten ops counted on the CPU; 11 of
them casts): the conv-state shift, the depthwise conv and its SiLU, the repeat of the key
heads for their value heads, the q/k l2norms, the decay and beta gates, the delta rule,
the gated RMSNorm. Inside a CUDA graph each still costs 1-2 µs, 24 layers a token on a
Qwen3.5-9B. Here:

- :func:`conv_step` (``_conv_step_kernel``): the short causal conv over [conv state, x]
  for every channel, one output each, SiLU'd; the state shifted by one in place. It is a
  launch of its own because q and k channels feed every value head of their key head: a
  kernel per value head that also shifted the state would race with its siblings reading
  it.
- ``_delta_rule_kernel``: one program per (sequence, value head) reads that head's q, k
  (its key head's, grouped or tiled) and v from the conv's output, l2-normalizes q and k,
  computes the decay ``exp(-exp(A_log) * softplus(a + dt_bias))`` and ``sigmoid(b)``,
  decays its (k_dim, v_dim) float32 state, corrects it by the delta rule, reads it out
  with q, and applies the gated RMSNorm with z; with ``quantize`` it also writes out_proj's
  int8 activations (as decode_kernels' glue does), so that matvec quantizes nothing.

The arithmetic order is the reference's (and flash-linear-attention's fused recurrent
kernel's): decay the state, recall ``S^T k``, ``delta = beta * (v - recall)``, add
``k delta^T``, read out ``S^T q``. Roundings follow the torch step: the conv's and SiLU's
outputs, beta, the readout and the norm's intermediates are rounded to the compute dtype
where torch rounds them, the rest is float32. The head's whole state is one tile of one
program: the norm needs the whole readout of a head, and a layer's heads (32-64 on the
Qwen3-Next/3.5 models, times the batch) already spread its state's traffic over as many
SMs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from helexa.engine.quant import grid_dependency
from helexa.engine.quant.grid_dependency import await_inputs
from helexa.engine.quant.tensor import Int8Rows
from helexa.engine.quant.triton_kernels import quantized_rows, store_quantized

CONV_BLOCK = 256


@triton.jit
def _conv_step_kernel(
    Mixed,  # [B, C] rows (the q/k/v projection's output, row stride below)
    State,  # [B_max, C, KERNEL - 1], contiguous: the last inputs, oldest first
    W,  # [C, KERNEL]
    Out,  # [B, C]
    stride_m,
    channels,
    KERNEL: tl.constexpr,
    BLOCK: tl.constexpr,
    PDL: tl.constexpr,
):
    await_inputs(PDL)
    b = tl.program_id(0)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = c < channels
    state = State + b.to(tl.int64) * channels * (KERNEL - 1) + c * (KERNEL - 1)
    w = W + c * KERNEL
    x = tl.load(Mixed + b * stride_m + c, mask=inside, other=0.0).to(State.dtype.element_ty)
    acc = tl.zeros([BLOCK], tl.float32)
    for j in tl.static_range(KERNEL - 1):
        s = tl.load(state + j, mask=inside, other=0.0)
        acc += s.to(tl.float32) * tl.load(w + j, mask=inside, other=0.0).to(tl.float32)
        if j > 0:  # the shift; the same thread loaded this slot's old value just before
            tl.store(state + j - 1, s, mask=inside)
    acc += x.to(tl.float32) * tl.load(w + KERNEL - 1, mask=inside, other=0.0).to(tl.float32)
    tl.store(state + KERNEL - 2, x, mask=inside)
    y = acc.to(Out.dtype.element_ty).to(tl.float32)  # the conv's output, rounded as torch's
    tl.store(Out + b * channels + c, (y / (1.0 + tl.exp(-y))).to(Out.dtype.element_ty), mask=inside)


def conv_step(mixed: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """silu(depthwise conv of [state, mixed]) for one token: ``mixed`` [B, 1, C] (any row
    stride), ``conv_state`` [B_max, C, K - 1] (rows 0..B-1 shifted in place), ``weight``
    [C, K]. Returns [B, C] in ``mixed``'s dtype."""
    batch, channels = mixed.shape[0], mixed.shape[-1]
    kernel = weight.shape[-1]
    if (
        weight.shape[0] != channels
        or conv_state.shape[1:] != (channels, kernel - 1)
        or batch > conv_state.shape[0]
    ):
        raise ValueError(
            f"conv weight {tuple(weight.shape)} and state {tuple(conv_state.shape)} do not "
            f"hold {batch} rows of {channels} channels"
        )
    if not conv_state.is_contiguous() or not weight.is_contiguous():
        raise ValueError("the conv state and weight must be contiguous")
    m2 = mixed.reshape(batch, channels)
    if m2.stride(-1) != 1:
        m2 = m2.contiguous()
    out = torch.empty(batch, channels, dtype=mixed.dtype, device=mixed.device)
    _conv_step_kernel[(batch, triton.cdiv(channels, CONV_BLOCK))](
        m2, conv_state, weight, out, m2.stride(0), channels, KERNEL=kernel, BLOCK=CONV_BLOCK,
        **grid_dependency.launch(mixed.device),
    )  # fmt: skip
    return out


@triton.jit
def _delta_rule_kernel(
    Conv,  # [B, 2 * KH * DK + VH * DV]: the conv's output, q then k then v
    A,  # [B, VH] rows: the decay projection's output
    Beta,  # [B, VH] rows: the beta projection's output (before its sigmoid)
    NegA,  # [VH] float32: -exp(A_log)
    DtBias,  # [VH] float32
    Z,  # [B, VH * DV] rows: the output gate
    NormW,  # [DV]
    State,  # [B_max, VH, DK, DV] float32, contiguous
    Out,  # [B, VH * DV]
    Q,  # int8 activations of Out (QUANT), see store_quantized
    D,
    S,
    stride_a,
    stride_beta,
    stride_z,
    value_heads,
    key_heads,
    scale,
    l2_eps,
    eps,
    DK: tl.constexpr,
    DV: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    GROUP: tl.constexpr,
    TILED: tl.constexpr,
    ROUND_SCALED: tl.constexpr,
    QUANT: tl.constexpr,
    PDL: tl.constexpr,
):
    await_inputs(PDL)
    pid = tl.program_id(0)
    b = pid // value_heads
    h = pid % value_heads
    # Tiled: value head h reads key head h % KH (a Qwen3.5 GGUF's order); grouped: value
    # heads GROUP * kh .. GROUP * kh + GROUP - 1 read key head kh.
    kh = h % key_heads if TILED else h // GROUP
    dt = Out.dtype.element_ty
    i = tl.arange(0, BK)
    j = tl.arange(0, BV)
    in_k = i < DK
    in_v = j < DV
    key_dim = key_heads * DK
    row = Conv + b.to(tl.int64) * (2 * key_dim + value_heads * DV)
    q = tl.load(row + kh * DK + i, mask=in_k, other=0.0).to(tl.float32)
    k = tl.load(row + key_dim + kh * DK + i, mask=in_k, other=0.0).to(tl.float32)
    v = tl.load(row + 2 * key_dim + h * DV + j, mask=in_v, other=0.0).to(tl.float32)
    q = q * (1.0 / tl.sqrt(tl.sum(q * q, 0) + l2_eps)) * scale
    k = k * (1.0 / tl.sqrt(tl.sum(k * k, 0) + l2_eps))

    beta = tl.load(Beta + b * stride_beta + h).to(tl.float32)
    beta = (1.0 / (1.0 + tl.exp(-beta))).to(Beta.dtype.element_ty).to(tl.float32)
    a = tl.load(A + b * stride_a + h).to(tl.float32) + tl.load(DtBias + h)
    softplus = tl.where(a > 20.0, a, tl.log(1.0 + tl.exp(a)))  # F.softplus's threshold
    decay = tl.exp(tl.load(NegA + h) * softplus)

    tile = i[:, None] * DV + j[None, :]
    live = in_k[:, None] & in_v[None, :]
    state = State + pid.to(tl.int64) * DK * DV  # rows 0..B-1 of the cache are [B, VH]
    s = tl.load(state + tile, mask=live, other=0.0) * decay
    recall = tl.sum(s * k[:, None], 0)  # what the state predicts for k: [BV]
    delta = (v - recall) * beta
    s += k[:, None] * delta[None, :]
    tl.store(state + tile, s, mask=live)
    o = tl.sum(s * q[:, None], 0).to(dt).to(tl.float32)  # the readout, rounded

    # The gated RMSNorm: normalise in float32, round, scale, times silu(z) in float32.
    rstd = 1.0 / tl.sqrt(tl.sum(o * o, 0) / DV + eps)
    scaled = (o * rstd).to(dt).to(tl.float32) * tl.load(NormW + j, mask=in_v, other=0.0).to(
        tl.float32
    )
    if ROUND_SCALED:  # a weight in the compute dtype: torch's product is rounded
        scaled = scaled.to(dt).to(tl.float32)
    z = tl.load(Z + b * stride_z + h * DV + j, mask=in_v, other=0.0).to(tl.float32)
    y = (scaled * (z / (1.0 + tl.exp(-z)))).to(dt)
    width = value_heads * DV
    tl.store(Out + b * width + h * DV + j, y, mask=in_v)
    if QUANT:  # out_proj's int8 activations for this head's DV // 32 blocks
        blocks = h * (DV // 32) + tl.arange(0, DV // 32)[:, None]
        yq = tl.reshape(y.to(tl.float32), [DV // 32, 32])
        store_quantized(yq, blocks, blocks < width // 32, Q + b * width, D + b * (width // 32),
                        S + b * (width // 16), DV // 32)  # fmt: skip


def delta_warps(k_dim: int, v_dim: int) -> int:
    """Warps of a delta-rule program: its head's state tile is the register budget, ~32
    float32 a thread. A 128 x 128 head (16 warps) then builds for sm_90 to 99 registers a
    thread and no spills, where 8 warps take 173 and 4 take 212; a layer's 32 heads are
    32 programs at batch 1, one an SM, and more warps keep more of each tile in flight."""
    tile = triton.next_power_of_2(k_dim) * triton.next_power_of_2(v_dim)
    return min(16, max(1, tile // 1024))


def gated_delta_step(
    mixed: torch.Tensor,
    z: torch.Tensor,
    b: torch.Tensor,
    a: torch.Tensor,
    conv_weight: torch.Tensor,
    neg_a: torch.Tensor,
    dt_bias: torch.Tensor,
    norm_weight: torch.Tensor,
    conv_state: torch.Tensor,
    ssm_state: torch.Tensor,
    *,
    key_heads: int,
    tiled: bool,
    l2_eps: float,
    eps: float,
    quantize: bool = False,
) -> tuple[torch.Tensor, Int8Rows | None]:
    """One token of a Gated DeltaNet layer from its projections' outputs to out_proj's
    input, in two launches: (y [B, 1, VH * DV] in ``mixed``'s dtype, and with
    ``quantize`` its int8 activations, where the head size allows, else None).

    ``mixed`` [B, 1, 2 * KH * DK + VH * DV] (q, k, v before the conv), ``z`` [B, 1, VH *
    DV], ``b``/``a`` [B, 1, VH] (before their sigmoid / softplus): the matvecs' outputs,
    any row stride. ``conv_state`` [B_max, C, K - 1] and ``ssm_state`` [B_max, VH, DK, DV]
    (float32) are the layer's RecurrentState tensors, rows 0..B-1 stepped in place; value
    head j reads key head j % KH when ``tiled``, else j // (VH / KH)."""
    batch = mixed.shape[0]
    if ssm_state.dtype != torch.float32 or not ssm_state.is_contiguous():
        raise ValueError("the delta-rule state must be a contiguous float32 tensor")
    value_heads, k_dim, v_dim = ssm_state.shape[1:]
    if value_heads % key_heads:
        raise ValueError(f"{value_heads} value heads are not a multiple of {key_heads} key heads")
    width = value_heads * v_dim
    if mixed.shape[-1] != 2 * key_heads * k_dim + width or batch > ssm_state.shape[0]:
        raise ValueError(
            f"projection of {mixed.shape[-1]} channels, batch {batch}: the state "
            f"{tuple(ssm_state.shape)} with {key_heads} key heads expects "
            f"{2 * key_heads * k_dim + width} and at most {ssm_state.shape[0]} rows"
        )
    z2, b2, a2 = (t.reshape(batch, t.shape[-1]) for t in (z, b, a))
    for name, t, n in (("z", z2, width), ("b", b2, value_heads), ("a", a2, value_heads)):
        if t.shape[-1] != n or t.stride(-1) != 1:
            raise ValueError(
                f"{name} must be [B, 1, {n}] with contiguous rows, got {tuple(t.shape)}"
            )
    conv = conv_step(mixed, conv_state, conv_weight)  # [B, C]: q, k, v after the conv
    y = torch.empty(batch, 1, width, dtype=mixed.dtype, device=mixed.device)
    block_v = triton.next_power_of_2(v_dim)
    quant = quantize and v_dim % 32 == 0 and block_v == v_dim
    rows = quantized_rows(batch, width, y.device) if quant else None
    block_k = triton.next_power_of_2(k_dim)
    _delta_rule_kernel[(batch * value_heads,)](
        conv, a2, b2, neg_a, dt_bias, z2, norm_weight, ssm_state, y,
        *(rows or (y, y, y)),  # unused without QUANT
        a2.stride(0), b2.stride(0), z2.stride(0), value_heads, key_heads,
        k_dim**-0.5, l2_eps, eps,
        DK=k_dim, DV=v_dim, BK=block_k, BV=block_v,
        GROUP=value_heads // key_heads, TILED=tiled,
        ROUND_SCALED=norm_weight.dtype == mixed.dtype, QUANT=quant,
        num_warps=delta_warps(k_dim, v_dim), **grid_dependency.launch(y.device),
    )  # fmt: skip
    return y, rows
