"""Our encoders: legacy formats byte-identical to gguf-py's, k-quants read back by
gguf-py's own numpy dequantizer within each format's error budget."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from helexa.engine.quant.formats import block_format
from helexa.engine.quant.quantize import quantize
from helexa.engine.quant.reference import dequantize

Q = GGMLQuantizationType
LEGACY = [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1]
K_QUANTS = [Q.Q4_K, Q.Q5_K, Q.Q6_K]


def weights(rows: int = 32, cols: int = 1024, seed: int = 0) -> torch.Tensor:
    """Gaussian rows whose scales span five decades, plus one all-zero row."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=gen) * torch.logspace(-3, 2, rows).unsqueeze(1)
    x[rows // 2] = 0
    return x


@pytest.mark.parametrize("qtype", LEGACY, ids=lambda q: q.name)
def test_legacy_formats_match_gguf_byte_for_byte(qtype: GGMLQuantizationType) -> None:
    x = weights()
    x[3, :32] = 0.25  # a constant block: min == max
    ours = quantize(x, qtype).numpy()
    assert np.array_equal(ours, gguf_quantize(x.numpy(), qtype))


# Largest error as a fraction of its super-block's largest |weight|: half a quantization
# step (the range spans 15/31/63 steps of Q4_K/Q5_K/Q6_K's signed half-range of 32), with
# slack for the 6- or 8-bit rounding of each sub-block's scale.
MAX_ERROR = {Q.Q4_K: 1.25 / 15, Q.Q5_K: 1.25 / 31, Q.Q6_K: 2.5 / 64}
# Row RMS error relative to the row's RMS, for Gaussian weights.
RMS_ERROR = {Q.Q4_K: 0.10, Q.Q5_K: 0.05, Q.Q6_K: 0.025}


def rms(t: torch.Tensor) -> torch.Tensor:
    return t.pow(2).mean(1).sqrt()


@pytest.mark.parametrize("qtype", K_QUANTS, ids=lambda q: q.name)
def test_k_quants_read_back_by_gguf_within_budget(qtype: GGMLQuantizationType) -> None:
    x = weights()
    encoded = quantize(x, qtype)
    assert encoded.shape == (32, block_format(qtype).row_bytes(1024))
    back = torch.from_numpy(gguf_dequantize(encoded.numpy(), qtype)).reshape(x.shape)
    blocks, errors = x.reshape(32, -1, 256), (back - x).reshape(32, -1, 256)
    peak = blocks.abs().amax(-1)
    assert torch.all(errors.abs().amax(-1) <= MAX_ERROR[qtype] * peak)
    nonzero = rms(x) > 0
    assert torch.all(rms(back - x)[nonzero] <= RMS_ERROR[qtype] * rms(x)[nonzero])
    assert torch.all(back[16] == 0)  # the zero row comes back exactly, no NaN


def test_more_bits_means_less_error() -> None:
    x = weights()
    errors = [
        (dequantize(quantize(x, q), q, tuple(x.shape)) - x).pow(2).mean().item()
        for q in (Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.Q8_0)
    ]
    assert errors == sorted(errors, reverse=True)


@pytest.mark.parametrize(
    ("qtype", "dtype"), [(Q.F32, torch.float32), (Q.F16, torch.float16), (Q.BF16, torch.bfloat16)]
)
def test_float_types_are_plain_casts(qtype: GGMLQuantizationType, dtype: torch.dtype) -> None:
    x = weights(4, 64)
    encoded = quantize(x, qtype)
    assert torch.equal(encoded.view(dtype), x.to(dtype))


def test_shapes_keep_leading_dims_and_need_whole_blocks() -> None:
    assert quantize(torch.randn(2, 3, 512), Q.Q6_K).shape == (2, 3, 2 * 210)
    assert quantize(torch.randn(64), Q.Q8_0).shape == (2 * 34,)
    with pytest.raises(ValueError, match="multiple of 256"):
        quantize(torch.randn(4, 96), Q.Q4_K)
