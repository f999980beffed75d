"""Block layout descriptions and the bit-packing helpers both codecs share."""

from __future__ import annotations

import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from helexa.engine.quant.formats import (
    FORMATS,
    QK_K,
    block_format,
    pack_bits,
    pack_scale_min_k4,
    unpack_bits,
    unpack_scale_min_k4,
)

Q = GGMLQuantizationType


@pytest.mark.parametrize("qtype", list(FORMATS))
def test_sizes_agree_with_ggml(qtype: GGMLQuantizationType) -> None:
    fmt = block_format(qtype)
    assert (fmt.block_size, fmt.type_size) == GGML_QUANT_SIZES[qtype]


def test_field_offsets_follow_storage_order() -> None:
    q6 = block_format(Q.Q6_K)
    assert [q6.offset(n) for n in ("ql", "qh", "scales", "d")] == [0, 128, 192, 208]
    with pytest.raises(KeyError):
        q6.offset("dmin")


def test_row_bytes_requires_whole_blocks() -> None:
    assert block_format(Q.Q4_K).row_bytes(2 * QK_K) == 2 * 144
    assert block_format(Q.Q4_K).nbytes((3, 512)) == 3 * 2 * 144
    with pytest.raises(ValueError, match="multiple of 256"):
        block_format(Q.Q4_K).row_bytes(320)


def test_unknown_type_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="IQ2_XXS"):
        block_format(Q.IQ2_XXS)
    assert block_format(int(Q.Q8_0)).qtype is Q.Q8_0


@pytest.mark.parametrize(
    ("bits", "group", "width"), [(4, 16, 16), (4, 64, 128), (1, 1, 4), (1, 32, 32), (2, 32, 64)]
)
def test_pack_bits_inverts_unpack_bits(bits: int, group: int, width: int) -> None:
    packed = torch.randint(0, 256, (5, width), dtype=torch.uint8)
    values = unpack_bits(packed, bits, group)
    assert values.shape == (5, width * 8 // bits)
    assert int(values.max()) < 2**bits
    assert torch.equal(pack_bits(values, bits, group), packed)


def test_unpack_bits_places_fields_as_documented() -> None:
    # Q6_K qh: two bits at 2*t of byte 32*h + l hold element 128*h + 32*t + l.
    packed = torch.zeros(1, 64, dtype=torch.uint8)
    packed[0, 32 + 5] = 0b10_00_00_00  # h=1, l=5, t=3
    values = unpack_bits(packed, 2, 32)
    assert values.nonzero().tolist() == [[0, 128 + 96 + 5]]
    assert int(values[0, 229]) == 2


def test_scale_min_k4_round_trip() -> None:
    sc = torch.randint(0, 64, (7, 8), dtype=torch.uint8)
    mn = torch.randint(0, 64, (7, 8), dtype=torch.uint8)
    packed = pack_scale_min_k4(sc, mn)
    assert packed.shape == (7, 12)
    got_sc, got_mn = unpack_scale_min_k4(packed)
    assert torch.equal(got_sc, sc) and torch.equal(got_mn, mn)
    # every byte pattern is a valid encoding, so unpack->pack is the identity too
    raw = torch.randint(0, 256, (7, 12), dtype=torch.uint8)
    assert torch.equal(pack_scale_min_k4(*unpack_scale_min_k4(raw)), raw)
