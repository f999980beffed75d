"""Torch dequantization against gguf-py's numpy reference, and the bytes a QuantizedTensor takes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

from helexa.engine.quant.formats import FORMATS, block_format
from helexa.engine.quant.reference import dequantize
from helexa.engine.quant.tensor import QuantizedTensor
from tests.engine.devices import DEVICES
from tests.engine.quant.blocks import quantized_weight, random_blocks

Q = GGMLQuantizationType
BLOCK_TYPES = [q for q, fmt in FORMATS.items() if not fmt.is_float]


def random_float_bytes(qtype: GGMLQuantizationType, n: int) -> np.ndarray:
    values = torch.randn(n, 1, generator=torch.Generator().manual_seed(1))
    dtype = {Q.F32: torch.float32, Q.F16: torch.float16, Q.BF16: torch.bfloat16}[qtype]
    return values.to(dtype).view(torch.uint8).numpy()


@pytest.mark.parametrize("qtype", BLOCK_TYPES, ids=lambda q: q.name)
@pytest.mark.parametrize("device", DEVICES)
def test_block_types_match_gguf_exactly(qtype: GGMLQuantizationType, device: str) -> None:
    fmt = block_format(qtype)
    raw = random_blocks(qtype, 64)
    expected = gguf_dequantize(raw, qtype).reshape(8, 8 * fmt.block_size)
    got = dequantize(torch.from_numpy(raw).to(device), qtype, (8, 8 * fmt.block_size))
    assert got.device.type == device
    assert got.dtype == torch.float32
    assert np.array_equal(got.cpu().numpy(), expected)


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16], ids=lambda q: q.name)
def test_float_types_match_gguf(qtype: GGMLQuantizationType) -> None:
    raw = random_float_bytes(qtype, 96)
    expected = gguf_dequantize(raw.reshape(-1), qtype)
    got = dequantize(torch.from_numpy(raw), qtype, (4, 24))
    assert np.array_equal(got.numpy(), expected.reshape(4, 24))


def test_dequantize_checks_size_and_dtype() -> None:
    raw = torch.from_numpy(random_blocks(Q.Q4_K, 2))
    with pytest.raises(ValueError, match="needs 432 bytes, got 288"):
        dequantize(raw, Q.Q4_K, (3, 256))
    with pytest.raises(TypeError, match="uint8"):
        dequantize(raw.to(torch.int16), Q.Q4_K, (2, 256))


def test_dequantize_casts_to_requested_dtype() -> None:
    raw = torch.from_numpy(random_blocks(Q.Q8_0, 4))
    half = dequantize(raw, Q.Q8_0, (2, 64), dtype=torch.float16)
    assert half.dtype == torch.float16
    assert torch.equal(half, dequantize(raw, Q.Q8_0, (2, 64)).half())


def test_quantized_tensor_validates_its_bytes() -> None:
    w = quantized_weight(Q.Q6_K, 3, 512)
    assert w.nbytes == 3 * 2 * 210 and w.shape == (3, 512) and w.device.type == "cpu"
    with pytest.raises(ValueError, match=r"\(3, 420\)"):
        QuantizedTensor(w.data[:, :-1], Q.Q6_K, (3, 512))
    with pytest.raises(ValueError, match="unsupported tensor type"):
        QuantizedTensor(w.data, Q.IQ4_NL, (3, 512))
