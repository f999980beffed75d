"""Plain-torch dequantization and the matmul/embedding paths built on it.

The reference path: correct on any device, vectorised over blocks, and the oracle the
Triton kernels are tested against. Each decoder mirrors ggml's ``dequantize_row_*``
arithmetic in float32 and in the same order, so results match ggml (and gguf-py)
bit for bit. ``linear`` never keeps a dequantized copy of a weight: it expands a slice
of rows at a time, so a quantized model costs about its file size in memory.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType

from helexa.engine.quant.dispatch import cuda_linear
from helexa.engine.quant.formats import (
    FORMATS,
    Q,
    block_format,
    read_f16,
    unpack_bits,
    unpack_scale_min_k4,
)

if TYPE_CHECKING:
    from helexa.engine.quant.tensor import QuantizedTensor

# Weights expanded per step of ``linear``: 4M float32 = 16 MiB of scratch, big enough
# for efficient matmuls, small enough not to matter next to the weights themselves.
CHUNK_ELEMENTS = 1 << 22

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


def linear(
    x: torch.Tensor,
    weight: torch.Tensor | QuantizedTensor,
    bias: torch.Tensor | None = None,
    *,
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """``x @ weight.T + bias`` where ``weight`` (out, in) may be quantized.

    A quantized weight is expanded ``chunk_rows`` output rows at a time (default: about
    :data:`CHUNK_ELEMENTS` weights) in ``x.dtype`` and discarded after use. On CUDA with
    Triton the blocks go straight to a kernel instead (helexa.engine.quant.dispatch).
    """
    if isinstance(weight, torch.Tensor):
        return F.linear(x, weight, bias)
    fast = cuda_linear(x, weight, bias)
    if fast is not None:
        return fast
    out_features, in_features = weight.shape
    if x.shape[-1] != in_features:
        raise ValueError(f"linear: input has {x.shape[-1]} features, weight expects {in_features}")
    step = chunk_rows or max(1, CHUNK_ELEMENTS // in_features)
    out = x.new_empty(*x.shape[:-1], out_features)
    for start in range(0, out_features, step):
        rows = weight.data[start : start + step]
        w = dequantize(rows, weight.qtype, (rows.shape[0], in_features), dtype=x.dtype)
        out[..., start : start + rows.shape[0]] = x @ w.T
    if bias is not None:
        out += bias
    return out


def embedding(
    ids: torch.Tensor,
    weight: torch.Tensor | QuantizedTensor,
    *,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Rows ``ids`` of an embedding table; a quantized table expands only those rows.

    ``dtype`` defaults to the table's dtype (float32 for a quantized one).
    """
    if isinstance(weight, torch.Tensor):
        out = F.embedding(ids, weight)
        return out if dtype is None else out.to(dtype)
    rows = weight.data.index_select(0, ids.reshape(-1))
    shape = (*ids.shape, weight.shape[1])
    return dequantize(rows, weight.qtype, shape, dtype=dtype or torch.float32)
