"""A weight matrix kept in its ggml block encoding on the device."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from gguf import GGMLQuantizationType

from helexa.engine.quant.formats import block_format
from helexa.engine.quant.reference import dequantize


@dataclass(eq=False)
class QuantizedTensor:
    """The raw blocks of an (out_features, in_features) weight, one row of blocks per row.

    ``data`` is uint8 (rows, row_bytes): exactly the GGUF bytes, so memory use equals the
    file's and kernels can address a row as ``data[r]``. ``shape`` is in torch orientation
    (GGUF's ne reversed).
    """

    data: torch.Tensor
    qtype: GGMLQuantizationType
    shape: tuple[int, int]

    def __post_init__(self) -> None:
        self.qtype = block_format(self.qtype).qtype
        self.shape = (int(self.shape[0]), int(self.shape[1]))
        rows, cols = self.shape
        row_bytes = block_format(self.qtype).row_bytes(cols)
        if self.data.dtype != torch.uint8 or tuple(self.data.shape) != (rows, row_bytes):
            raise ValueError(
                f"{self.qtype.name} weight of shape {self.shape} needs uint8 data of shape "
                f"({rows}, {row_bytes}), got {self.data.dtype} {tuple(self.data.shape)}"
            )

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def nbytes(self) -> int:
        return self.data.numel()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The full dense weight; for tests and one-off conversions, not the hot path."""
        return dequantize(self.data, self.qtype, self.shape, dtype=dtype)

    def to(self, device: str | torch.device, *, non_blocking: bool = False) -> QuantizedTensor:
        return QuantizedTensor(
            self.data.to(device, non_blocking=non_blocking), self.qtype, self.shape
        )

    def __repr__(self) -> str:
        return f"QuantizedTensor({self.qtype.name}, shape={self.shape}, device={self.device})"
