"""Where the bits sit in ggml's block formats, as data plus pairs of inverse functions.

A quantized row is a run of fixed-size blocks; a block is a few f16 scales followed by
small integers packed several to a byte. This module knows only the arrangement (ggml's
``block_q*`` structs in ggml-common.h); what the numbers mean lives in reference.py
(decode) and quantize.py (encode). Keeping the layout separate lets the Triton kernels
and both directions of the torch code read one description.

Layouts (``d``/``dmin``/``m`` are f16; element ``e`` of a block):

====== ===== ===== ===================================================================
type   elems bytes fields, in order
====== ===== ===== ===================================================================
Q8_0   32    34    d, qs int8[32]                                  x = d*q
Q4_0   32    18    d, qs[16]                                       x = d*(q-8)
Q4_1   32    20    d, m, qs[16]                                    x = d*q + m
Q5_0   32    22    d, qh[4], qs[16]                                x = d*(q-16)
Q5_1   32    24    d, m, qh[4], qs[16]                             x = d*q + m
Q4_K   256   144   d, dmin, scales[12], qs[128]                    x = d*sc[s]*q - dmin*mn[s]
Q5_K   256   176   d, dmin, scales[12], qh[32], qs[128]            as Q4_K, 5-bit q
Q6_K   256   210   ql[128], qh[64], scales int8[16], d             x = d*scales[e//16]*(q-32)
====== ===== ===== ===================================================================

Packing: 4-bit ``qs`` hold element ``e`` of each group of ``2*g`` elements in the low
nibble of byte ``e`` and element ``g+e`` in the high nibble (g = 16 for the 32-element
formats, 32 for Q4_K/Q5_K, 64 for Q6_K's ``ql``). High bits ``qh`` are bit planes: Q5_0/
Q5_1 bit ``e`` of a little-endian u32; Q5_K bit ``s`` of byte ``l`` for element ``32*s+l``;
Q6_K two bits at ``2*t`` of byte ``32*h+l`` for element ``128*h+32*t+l``. All of these are
one rule, :func:`unpack_bits` with a (bits, group) pair. Q4_K/Q5_K sub-block scales and
mins are 6-bit, eight of each squeezed into 12 bytes (:func:`unpack_scale_min_k4`).
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod

import torch
from gguf import GGMLQuantizationType

Q = GGMLQuantizationType
QK_K = 256  # elements per k-quant super-block


@dataclass(frozen=True)
class BlockFormat:
    """One ggml block type: how many weights a block holds and its named byte fields."""

    qtype: GGMLQuantizationType
    block_size: int  # weights per block
    fields: tuple[tuple[str, int], ...]  # (name, bytes) in storage order

    @property
    def type_size(self) -> int:
        """Bytes per block."""
        return sum(size for _, size in self.fields)

    @property
    def is_float(self) -> bool:
        return self.qtype in (Q.F32, Q.F16, Q.BF16)

    def offset(self, name: str) -> int:
        """Byte offset of a field inside a block, for kernels that index bytes directly."""
        start = 0
        for field, size in self.fields:
            if field == name:
                return start
            start += size
        raise KeyError(f"{self.qtype.name} has no field {name!r}")

    def row_bytes(self, n_elements: int) -> int:
        """Bytes taken by a row of ``n_elements`` weights; they must fill whole blocks."""
        if n_elements % self.block_size:
            raise ValueError(
                f"{self.qtype.name} rows must be a multiple of {self.block_size} elements, "
                f"got {n_elements}"
            )
        return n_elements // self.block_size * self.type_size

    def nbytes(self, shape: tuple[int, ...]) -> int:
        """Bytes a tensor of ``shape`` (torch orientation, last dim innermost) takes."""
        return prod(shape[:-1]) * self.row_bytes(shape[-1]) if shape else self.type_size

    def split(self, blocks: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views of each field of ``blocks`` (uint8, one block per row)."""
        parts = blocks.split([size for _, size in self.fields], dim=-1)
        return {name: part for (name, _), part in zip(self.fields, parts, strict=True)}


FORMATS: dict[GGMLQuantizationType, BlockFormat] = {
    fmt.qtype: fmt
    for fmt in (
        BlockFormat(Q.F32, 1, (("value", 4),)),
        BlockFormat(Q.F16, 1, (("value", 2),)),
        BlockFormat(Q.BF16, 1, (("value", 2),)),
        BlockFormat(Q.Q8_0, 32, (("d", 2), ("qs", 32))),
        BlockFormat(Q.Q4_0, 32, (("d", 2), ("qs", 16))),
        BlockFormat(Q.Q4_1, 32, (("d", 2), ("m", 2), ("qs", 16))),
        BlockFormat(Q.Q5_0, 32, (("d", 2), ("qh", 4), ("qs", 16))),
        BlockFormat(Q.Q5_1, 32, (("d", 2), ("m", 2), ("qh", 4), ("qs", 16))),
        BlockFormat(Q.Q4_K, QK_K, (("d", 2), ("dmin", 2), ("scales", 12), ("qs", 128))),
        BlockFormat(Q.Q5_K, QK_K, (("d", 2), ("dmin", 2), ("scales", 12), ("qh", 32), ("qs", 128))),
        BlockFormat(Q.Q6_K, QK_K, (("ql", 128), ("qh", 64), ("scales", 16), ("d", 2))),
    )
}


def block_format(qtype: GGMLQuantizationType | int) -> BlockFormat:
    """The layout of ``qtype``, or a ValueError naming the types we can read."""
    fmt = FORMATS.get(qtype)  # type: ignore[call-overload]  # IntEnum keys match plain ints
    if fmt is None:
        name = Q(qtype).name if qtype in Q._value2member_map_ else str(qtype)
        known = ", ".join(q.name for q in FORMATS)
        raise ValueError(f"unsupported tensor type {name} (supported: {known})")
    return fmt


def _shifts(bits: int, device: torch.device) -> torch.Tensor:
    return torch.arange(0, 8, bits, dtype=torch.uint8, device=device).view(1, 1, -1, 1)


def unpack_bits(packed: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Split each byte into ``8 // bits`` fields of ``bits`` bits.

    ``packed`` is (n, B) uint8. Bytes go in groups of ``group``; field ``t`` (counting
    from the least significant bits) of byte ``l`` in group ``g`` becomes element
    ``(g * (8 // bits) + t) * group + l`` of the (n, B * 8 // bits) result.
    """
    n, width = packed.shape
    fields = packed.reshape(n, width // group, 1, group) >> _shifts(bits, packed.device)
    return (fields & ((1 << bits) - 1)).reshape(n, -1)


def pack_bits(values: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Inverse of :func:`unpack_bits`: ``values`` (n, E) uint8, each below ``2**bits``."""
    n, width = values.shape
    per_byte = 8 // bits
    fields = values.reshape(n, width // (per_byte * group), per_byte, group)
    shifted = fields.to(torch.int32) << _shifts(bits, values.device).to(torch.int32)
    return shifted.sum(dim=2).to(torch.uint8).reshape(n, -1)


def read_f16(field: torch.Tensor) -> torch.Tensor:
    """A (n, 2) uint8 field as (n, 1) float32."""
    return field.contiguous().view(torch.float16).float()


def f16_bytes(values: torch.Tensor) -> torch.Tensor:
    """(n, 1) floats as the (n, 2) uint8 bytes of their f16 rounding."""
    return values.to(torch.float16).contiguous().view(torch.uint8)


def unpack_scale_min_k4(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K 12-byte field -> (sc, mn), each (n, 8) uint8 in 0..63.

    Bytes 0-3 hold sc[0:4] in their low 6 bits, bytes 4-7 mn[0:4]; bytes 8-11 hold the
    low nibbles of sc[4:8] (low) and mn[4:8] (high), whose top 2 bits ride in the spare
    top bits of bytes 0-3 (sc) and 4-7 (mn).
    """
    lo_sc, lo_mn, packed = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    sc = torch.cat([lo_sc & 0x3F, (packed & 0x0F) | ((lo_sc >> 6) << 4)], dim=1)
    mn = torch.cat([lo_mn & 0x3F, (packed >> 4) | ((lo_mn >> 6) << 4)], dim=1)
    return sc, mn


def pack_scale_min_k4(sc: torch.Tensor, mn: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`unpack_scale_min_k4`: two (n, 8) uint8 in 0..63 -> (n, 12)."""
    lo_sc = sc[:, 0:4] | ((sc[:, 4:8] >> 4) << 6)
    lo_mn = mn[:, 0:4] | ((mn[:, 4:8] >> 4) << 6)
    packed = (sc[:, 4:8] & 0x0F) | ((mn[:, 4:8] & 0x0F) << 4)
    return torch.cat([lo_sc, lo_mn, packed], dim=1)
