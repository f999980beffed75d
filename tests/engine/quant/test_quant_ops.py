"""linear and embedding over quantized weights on the torch path: the numbers of
dequantizing first, without keeping the dense weight; dense weights go to torch as they are."""

from __future__ import annotations

import pytest
import torch
from gguf import GGMLQuantizationType

from helexa.engine.models.qwen3 import fuse_projections
from helexa.engine.quant.ops import embedding, fuse_rows, linear
from tests.engine.devices import DEVICES
from tests.engine.quant.blocks import quantized_weight

Q = GGMLQuantizationType


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


@pytest.mark.parametrize("dense", [False, True], ids=["quantized", "dense"])
def test_fused_rows_compute_the_parts_side_by_side_in_the_same_memory(dense: bool) -> None:
    parts = [quantized_weight(Q.Q4_K, rows, 512) for rows in (24, 8, 8)]
    if dense:
        parts = [p.dequantize() for p in parts]
    fused = fuse_rows(parts)
    assert fused is not None
    weight, views = fused
    x = torch.randn(2, 512, generator=torch.Generator().manual_seed(4))
    expected = torch.cat([linear(x, p) for p in parts], dim=-1)
    torch.testing.assert_close(linear(x, weight), expected)
    for view, part in zip(views, parts, strict=True):
        torch.testing.assert_close(linear(x, view), linear(x, part))
    # The views are rows of the fused weight, not copies: the memory is counted once.
    raw = (lambda w: w) if dense else (lambda w: w.data)
    assert raw(views[0]).untyped_storage().data_ptr() == raw(weight).untyped_storage().data_ptr()
    assert sum(v.nbytes for v in views) == weight.nbytes


def test_fusing_needs_one_encoding_and_one_input_width() -> None:
    q4, q6 = quantized_weight(Q.Q4_K, 8, 512), quantized_weight(Q.Q6_K, 8, 512)
    assert fuse_rows([q4, q6]) is None
    assert fuse_rows([q4, quantized_weight(Q.Q4_K, 8, 256)]) is None
    assert fuse_rows([q4, q4.dequantize()]) is None
    # Q4_K_M's mix: q and k fuse, v (a wider type) stays alone.
    fused, views = fuse_projections([q4, quantized_weight(Q.Q4_K, 4, 512), q6])
    assert len(fused) == 2 and fused[0].shape == (12, 512) and fused[1] is q6
    assert views[2] is q6 and views[1].shape == (4, 512)
    assert fuse_projections([q4, q6]) == ((), [q4, q6])
    # Each run of neighbours fuses: a DeltaNet's q/k/v and z, then its tiny b and a.
    qkv, z = quantized_weight(Q.Q4_K, 16, 512), quantized_weight(Q.Q4_K, 8, 512)
    b, a = (quantized_weight(Q.Q8_0, 2, 512) for _ in "ba")
    fused, views = fuse_projections([qkv, z, b, a])
    assert [w.shape for w in fused] == [(24, 512), (4, 512)]
    assert [v.shape for v in views] == [(16, 512), (8, 512), (2, 512), (2, 512)]
    assert [w.qtype for w in fused] == [Q.Q4_K, Q.Q8_0]  # type: ignore[union-attr]
    # Leading alone, the rest together: still one launch fewer.
    fused, views = fuse_projections([q6, q4, quantized_weight(Q.Q4_K, 4, 512)])
    assert len(fused) == 2 and fused[0] is q6 and fused[1].shape == (12, 512)


def test_split_outputs_cuts_fused_outputs_into_views() -> None:
    from helexa.engine.models.qwen3 import split_outputs

    outs = [torch.arange(12.0).reshape(1, 6, 2).transpose(1, 2), torch.ones(1, 2, 3)]  # [1, 2, 6]
    q, k, v, g = split_outputs(outs, [3, 1, 2, 3])
    assert [t.shape[-1] for t in (q, k, v, g)] == [3, 1, 2, 3]
    assert torch.equal(k, outs[0][..., 3:4]) and torch.equal(g, outs[1])
    assert q.data_ptr() == outs[0].data_ptr()  # a view, not a copy


def test_int8_activations_are_written_for_half_precision_rows_of_whole_blocks() -> None:
    """A kernel quantizes its output for the int8 matvec only where the matvec can read it:
    half-precision rows of whole 32-element blocks. A shared expert of 48 (a gate/up of
    96, whose SiLU·mul writes 48) gets plain rows, not a ValueError inside a graph capture."""
    from helexa.engine.quant.tensor import int8_activations

    gate_up = torch.empty(2, 96, dtype=torch.bfloat16)
    assert int8_activations(gate_up)
    assert not int8_activations(gate_up, 48)
    assert int8_activations(gate_up, 64)
    assert not int8_activations(gate_up.float())
