"""Float weights -> ggml block bytes, vectorised in torch (any device).

gguf-py only quantizes the legacy formats, so the k-quants are ours. The legacy
encoders repeat ggml's ``quantize_row_*_ref`` arithmetic exactly (the tests check the
bytes against gguf-py's). The k-quant encoders are the simple form of ggml's: per
sub-block min/max (Q4_K/Q5_K) or signed absolute max (Q6_K), sub-block scales rounded to
6/8 bits against the super-block's f16 scale, then each weight rounded against the scale
it will actually be decoded with. ggml additionally searches a few candidate scales per
sub-block; that buys a little accuracy, not compatibility.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from gguf import GGMLQuantizationType

from helexa.engine.quant.formats import (
    Q,
    block_format,
    f16_bytes,
    pack_bits,
    pack_scale_min_k4,
)

Encoder = Callable[[torch.Tensor], torch.Tensor]

# Blocks encoded per step, bounding the float32 intermediates to a few hundred MiB.
_BLOCKS_PER_STEP = 1 << 16


def _round_half_away(x: torch.Tensor) -> torch.Tensor:
    """C's roundf, which ggml uses for Q8_0 (torch.round rounds half to even)."""
    return torch.sign(x) * torch.floor(x.abs() + 0.5)


def _inverse(d: torch.Tensor) -> torch.Tensor:
    """1/d with 0 where d == 0, so all-zero blocks encode as zeros."""
    return torch.where(d == 0, torch.zeros_like(d), 1 / d)


def _signed_absmax(x: torch.Tensor) -> torch.Tensor:
    """The element of largest magnitude along the last dim, keeping its sign."""
    return x.gather(-1, x.abs().argmax(dim=-1, keepdim=True))


def _f32(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(torch.uint8)


def _f16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16).contiguous().view(torch.uint8)


def _bf16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.bfloat16).contiguous().view(torch.uint8)


def _q8_0(x: torch.Tensor) -> torch.Tensor:
    d = x.abs().amax(dim=1, keepdim=True) / 127
    q = _round_half_away(x * _inverse(d)).to(torch.int8)
    return torch.cat([f16_bytes(d), q.view(torch.uint8)], dim=1)


def _symmetric(x: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_0/Q5_0: the extreme weight maps to -levels/2, others rounded (ggml: trunc(+0.5))."""
    d = _signed_absmax(x) / -(levels // 2)
    q = torch.trunc(x * _inverse(d) + (levels // 2 + 0.5)).clamp(0, levels - 1)
    return d, q.to(torch.uint8)


def _affine(x: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_1/Q5_1: min..max spread over ``levels`` steps."""
    lo = x.amin(dim=1, keepdim=True)
    d = (x.amax(dim=1, keepdim=True) - lo) / (levels - 1)
    q = torch.trunc((x - lo) * _inverse(d) + 0.5).clamp(0, levels - 1)
    return d, lo, q.to(torch.uint8)


def _q4_0(x: torch.Tensor) -> torch.Tensor:
    d, q = _symmetric(x, 16)
    return torch.cat([f16_bytes(d), pack_bits(q, 4, 16)], dim=1)


def _q4_1(x: torch.Tensor) -> torch.Tensor:
    d, lo, q = _affine(x, 16)
    return torch.cat([f16_bytes(d), f16_bytes(lo), pack_bits(q, 4, 16)], dim=1)


def _split_five_bit(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q5_0/Q5_1: (qh, qs) for 5-bit quants; see formats.unpack_bits."""
    return pack_bits(q >> 4, 1, 1), pack_bits(q & 0x0F, 4, 16)


def _q5_0(x: torch.Tensor) -> torch.Tensor:
    d, q = _symmetric(x, 32)
    qh, qs = _split_five_bit(q)
    return torch.cat([f16_bytes(d), qh, qs], dim=1)


def _q5_1(x: torch.Tensor) -> torch.Tensor:
    d, lo, q = _affine(x, 32)
    qh, qs = _split_five_bit(q)
    return torch.cat([f16_bytes(d), f16_bytes(lo), qh, qs], dim=1)


def _quantize_scales(values: torch.Tensor, top: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-negative per-sub-block ``values`` (n, S) -> (f16-rounded super scale (n, 1),
    integer multipliers (n, S) in 0..top) with super * multiplier ~= value."""
    peak = values.amax(dim=1, keepdim=True)
    multipliers = torch.round(values * _inverse(peak / top)).clamp(0, top)
    return (peak / top).to(torch.float16).float(), multipliers


def _k_affine(x: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K common part: (header bytes d|dmin|scales, quants (n, 256) uint8)."""
    n = x.shape[0]
    sub = x.reshape(n, 8, 32)
    lo = sub.amin(dim=2).clamp(max=0)  # ggml keeps the offset non-positive
    spread = (sub.amax(dim=2) - lo) / (levels - 1)
    d, sc = _quantize_scales(spread, 63)
    dmin, mn = _quantize_scales(-lo, 63)
    step = (d * sc).unsqueeze(-1)
    offset = (dmin * mn).unsqueeze(-1)
    q = torch.round((sub + offset) * _inverse(step)).clamp(0, levels - 1)
    scales = pack_scale_min_k4(sc.to(torch.uint8), mn.to(torch.uint8))
    header = torch.cat([f16_bytes(d), f16_bytes(dmin), scales], dim=1)
    return header, q.to(torch.uint8).reshape(n, -1)


def _q4_k(x: torch.Tensor) -> torch.Tensor:
    header, q = _k_affine(x, 16)
    return torch.cat([header, pack_bits(q, 4, 32)], dim=1)


def _q5_k(x: torch.Tensor) -> torch.Tensor:
    header, q = _k_affine(x, 32)
    return torch.cat([header, pack_bits(q >> 4, 1, 32), pack_bits(q & 0x0F, 4, 32)], dim=1)


def _q6_k(x: torch.Tensor) -> torch.Tensor:
    n = x.shape[0]
    sub = x.reshape(n, 16, 16)
    # Signed scales let the extreme weight use -32, the wider end of -32..31.
    scale = _signed_absmax(sub).squeeze(-1) / -32
    peak = _signed_absmax(scale)
    d = (peak / -128).to(torch.float16).float()
    sc = torch.round(scale * _inverse(peak / -128)).clamp(-128, 127)
    step = (d * sc).unsqueeze(-1)
    q = (torch.round(sub * _inverse(step)).clamp(-32, 31) + 32).to(torch.uint8).reshape(n, -1)
    ql = pack_bits(q & 0x0F, 4, 64)
    qh = pack_bits(q >> 4, 2, 32)
    return torch.cat([ql, qh, sc.to(torch.int8).view(torch.uint8), f16_bytes(d)], dim=1)


ENCODERS: dict[GGMLQuantizationType, Encoder] = {
    Q.F32: _f32,
    Q.F16: _f16,
    Q.BF16: _bf16,
    Q.Q8_0: _q8_0,
    Q.Q4_0: _q4_0,
    Q.Q4_1: _q4_1,
    Q.Q5_0: _q5_0,
    Q.Q5_1: _q5_1,
    Q.Q4_K: _q4_k,
    Q.Q5_K: _q5_k,
    Q.Q6_K: _q6_k,
}


def quantize(weights: torch.Tensor, qtype: GGMLQuantizationType) -> torch.Tensor:
    """Encode ``weights`` (any shape, innermost dim last) as ``qtype`` block bytes.

    Returns uint8 of shape (*weights.shape[:-1], row_bytes) on the weights' device: the
    exact bytes a GGUF file holds, and a valid ``QuantizedTensor.data`` for 2-D weights.
    """
    fmt = block_format(qtype)
    if weights.ndim == 0:
        raise ValueError("cannot quantize a scalar")
    row_bytes = fmt.row_bytes(weights.shape[-1])
    blocks = weights.detach().float().reshape(-1, fmt.block_size)
    encode = ENCODERS[fmt.qtype]
    encoded = torch.cat([encode(step) for step in blocks.split(_BLOCKS_PER_STEP)])
    return encoded.reshape(*weights.shape[:-1], row_bytes)
