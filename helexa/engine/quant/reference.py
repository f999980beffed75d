"""Plain-torch dequantization: what ggml block bytes mean, as numbers.

The reference: correct on any device, vectorised over blocks, and the oracle the Triton
kernels are tested against, so it imports neither them nor anything that picks between
paths (that is helexa.engine.quant.ops). Each decoder mirrors ggml's
``dequantize_row_*`` arithmetic in float32 and in the same order, so results match ggml
(and gguf-py) bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from gguf import GGMLQuantizationType

from helexa.engine.quant.formats import (
    FORMATS,
    Q,
    block_format,
    read_f16,
    unpack_bits,
    unpack_scale_min_k4,
)

Decoder = Callable[[torch.Tensor], torch.Tensor]


def _f32(blocks: torch.Tensor) -> torch.Tensor:
    return blocks.contiguous().view(torch.float32)


def _f16(blocks: torch.Tensor) -> torch.Tensor:
    return blocks.contiguous().view(torch.float16).float()


def _bf16(blocks: torch.Tensor) -> torch.Tensor:
    return blocks.contiguous().view(torch.bfloat16).float()


def _q8_0(blocks: torch.Tensor) -> torch.Tensor:
    f = FORMATS[Q.Q8_0].split(blocks)
    return read_f16(f["d"]) * f["qs"].view(torch.int8).float()


def _q4_0(blocks: torch.Tensor) -> torch.Tensor:
    f = FORMATS[Q.Q4_0].split(blocks)
    q = unpack_bits(f["qs"], 4, 16).float() - 8
    return read_f16(f["d"]) * q


def _q4_1(blocks: torch.Tensor) -> torch.Tensor:
    f = FORMATS[Q.Q4_1].split(blocks)
    q = unpack_bits(f["qs"], 4, 16).float()
    return read_f16(f["d"]) * q + read_f16(f["m"])


def _five_bit(qs: torch.Tensor, qh: torch.Tensor) -> torch.Tensor:
    """Q5_0/Q5_1 quants: low nibbles plus bit ``e`` of the little-endian u32 ``qh``."""
    return (unpack_bits(qs, 4, 16) | (unpack_bits(qh, 1, 1) << 4)).float()


def _q5_0(blocks: torch.Tensor) -> torch.Tensor:
    f = FORMATS[Q.Q5_0].split(blocks)
    return read_f16(f["d"]) * (_five_bit(f["qs"], f["qh"]) - 16)


def _q5_1(blocks: torch.Tensor) -> torch.Tensor:
    f = FORMATS[Q.Q5_1].split(blocks)
    return read_f16(f["d"]) * _five_bit(f["qs"], f["qh"]) + read_f16(f["m"])


def _k_affine(f: dict[str, torch.Tensor], q: torch.Tensor) -> torch.Tensor:
    """Q4_K/Q5_K: eight 32-element sub-blocks, each ``d*sc*q - dmin*mn``."""
    n = q.shape[0]
    sc, mn = unpack_scale_min_k4(f["scales"])
    scale = (read_f16(f["d"]) * sc.float()).unsqueeze(-1)
    offset = (read_f16(f["dmin"]) * mn.float()).unsqueeze(-1)
    return (scale * q.float().reshape(n, 8, 32) - offset).reshape(n, -1)


def _q4_k(blocks: torch.Tensor) -> torch.Tensor:
    f = FORMATS[Q.Q4_K].split(blocks)
    return _k_affine(f, unpack_bits(f["qs"], 4, 32))


def _q5_k(blocks: torch.Tensor) -> torch.Tensor:
    f = FORMATS[Q.Q5_K].split(blocks)
    q = unpack_bits(f["qs"], 4, 32) | (unpack_bits(f["qh"], 1, 32) << 4)
    return _k_affine(f, q)


def _q6_k(blocks: torch.Tensor) -> torch.Tensor:
    f = FORMATS[Q.Q6_K].split(blocks)
    n = blocks.shape[0]
    q = unpack_bits(f["ql"], 4, 64) | (unpack_bits(f["qh"], 2, 32) << 4)
    scale = (read_f16(f["d"]) * f["scales"].view(torch.int8).float()).unsqueeze(-1)
    return (scale * (q.float() - 32).reshape(n, 16, 16)).reshape(n, -1)


DECODERS: dict[GGMLQuantizationType, Decoder] = {
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


def dequantize(
    raw: torch.Tensor,
    qtype: GGMLQuantizationType,
    shape: tuple[int, ...],
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Expand ggml-encoded bytes into a ``shape`` tensor on ``raw``'s device.

    ``raw`` is uint8 of any shape holding exactly the bytes of ``shape`` (innermost dim
    last, as torch and as GGUF's ne[0]).
    """
    fmt = block_format(qtype)
    if raw.dtype != torch.uint8:
        raise TypeError(f"quantized data must be uint8, got {raw.dtype}")
    expected = fmt.nbytes(tuple(shape))
    if raw.numel() != expected:
        raise ValueError(
            f"{fmt.qtype.name} tensor of shape {tuple(shape)} needs {expected} bytes, "
            f"got {raw.numel()}"
        )
    values = DECODERS[fmt.qtype](raw.reshape(-1, fmt.type_size))
    return values.reshape(shape).to(dtype)
