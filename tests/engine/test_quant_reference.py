"""Torch dequantization against gguf-py's numpy reference, and the matmul/lookup paths."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

from helexa.engine.quant import (
    FORMATS,
    QuantizedTensor,
    block_format,
    dequantize,
    embedding,
    linear,
    quantize,
)

Q = GGMLQuantizationType
BLOCK_TYPES = [q for q, fmt in FORMATS.items() if not fmt.is_float]
DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.cuda,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
        ],
    ),
]


def random_blocks(qtype: GGMLQuantizationType, n_blocks: int, seed: int = 0) -> np.ndarray:
    """Random block bytes whose f16 scales are finite and small (d, m in [-1, 1],
    dmin in [0, 1]); every other byte pattern is a valid encoding as it is."""
    rng = np.random.default_rng(seed)
    fmt = block_format(qtype)
    raw = rng.integers(0, 256, size=(n_blocks, fmt.type_size), dtype=np.uint8)
    for name, _ in fmt.fields:
        if name in ("d", "dmin", "m"):
            low = 0.0 if name == "dmin" else -1.0
            scales = rng.uniform(low, 1.0, size=(n_blocks, 1)).astype(np.float16)
            at = fmt.offset(name)
            raw[:, at : at + 2] = scales.view(np.uint8)
    return raw


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


def quantized_weight(qtype: GGMLQuantizationType, rows: int, cols: int) -> QuantizedTensor:
    """A weight of realistic magnitude (std 1/sqrt(cols)), so outputs stay near 1."""
    dense = torch.randn(rows, cols, generator=torch.Generator().manual_seed(rows + cols))
    return QuantizedTensor(quantize(dense / cols**0.5, qtype), qtype, (rows, cols))


def test_quantized_tensor_validates_its_bytes() -> None:
    w = quantized_weight(Q.Q6_K, 3, 512)
    assert w.nbytes == 3 * 2 * 210 and w.shape == (3, 512) and w.device.type == "cpu"
    with pytest.raises(ValueError, match=r"\(3, 420\)"):
        QuantizedTensor(w.data[:, :-1], Q.Q6_K, (3, 512))
    with pytest.raises(ValueError, match="unsupported tensor type"):
        QuantizedTensor(w.data, Q.IQ4_NL, (3, 512))


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q6_K, Q.Q8_0, Q.Q5_1], ids=lambda q: q.name)
@pytest.mark.parametrize("chunk_rows", [None, 7])
def test_linear_equals_dequantize_then_matmul(
    qtype: GGMLQuantizationType, chunk_rows: int | None
) -> None:
    w = quantized_weight(qtype, 20, 512)
    x = torch.randn(3, 5, 512, generator=torch.Generator().manual_seed(2))
    bias = torch.randn(20, generator=torch.Generator().manual_seed(3))
    expected = x @ w.dequantize().T + bias
    got = linear(x, w, bias, chunk_rows=chunk_rows)
    assert got.shape == (3, 5, 20)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_linear_in_half_precision_dequantizes_to_the_input_dtype() -> None:
    w = quantized_weight(Q.Q4_K, 8, 256)
    x = torch.randn(2, 256, dtype=torch.bfloat16)
    got = linear(x, w)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, x @ w.dequantize(torch.bfloat16).T)


def test_linear_passes_dense_weights_to_torch() -> None:
    w = torch.randn(6, 16)
    x = torch.randn(4, 16)
    torch.testing.assert_close(linear(x, w), x @ w.T)
    with pytest.raises(ValueError, match="input has 16 features, weight expects 256"):
        linear(x, quantized_weight(Q.Q4_K, 2, 256))


@pytest.mark.parametrize("device", DEVICES)
def test_embedding_expands_only_the_selected_rows(device: str) -> None:
    w = quantized_weight(Q.Q5_K, 50, 256).to(device)
    ids = torch.tensor([[3, 49, 3], [0, 7, 12]], device=device)
    got = embedding(ids, w)
    assert got.shape == (2, 3, 256) and got.dtype == torch.float32
    torch.testing.assert_close(got, w.dequantize()[ids], rtol=0, atol=0)
    assert embedding(ids, w, dtype=torch.float16).dtype == torch.float16


def test_embedding_of_a_dense_table() -> None:
    table = torch.randn(10, 8)
    ids = torch.tensor([1, 9])
    assert torch.equal(embedding(ids, table), table[ids])
    assert embedding(ids, table, dtype=torch.float16).dtype == torch.float16
