"""A weight matrix (or a stack of them) kept in its ggml block encoding on the device."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from gguf import GGMLQuantizationType

from helexa.engine.quant.formats import block_format
from helexa.engine.quant.reference import dequantize


@dataclass(eq=False)
class QuantizedTensor:
    """The raw blocks of an (out_features, in_features) weight, one row of blocks per row,
    or of a stack of such weights (a MoE layer's experts: (n_experts, out, in)).

    ``data`` is uint8 (*stack, rows, row_bytes): exactly the GGUF bytes, so memory use
    equals the file's and kernels can address a row as ``data[r]`` (an expert's rows as
    ``data[e]``). ``shape`` is in torch orientation (GGUF's ne reversed). Matmuls take 2-D
    weights; ``w[e]`` and :meth:`index_select` give an expert's.
    """

    data: torch.Tensor
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        self.qtype = block_format(self.qtype).qtype
        self.shape = tuple(int(d) for d in self.shape)
        if len(self.shape) < 2:
            raise ValueError(f"a quantized weight has at least 2 dims, got shape {self.shape}")
        *outer, cols = self.shape
        row_bytes = block_format(self.qtype).row_bytes(cols)
        if self.data.dtype != torch.uint8 or tuple(self.data.shape) != (*outer, row_bytes):
            raise ValueError(
                f"{self.qtype.name} weight of shape {self.shape} needs uint8 data of shape "
                f"{(*outer, row_bytes)}, got {self.data.dtype} {tuple(self.data.shape)}"
            )

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def nbytes(self) -> int:
        return self.data.numel()

    def __getitem__(self, index: int) -> QuantizedTensor:
        """One weight of a stack (a view of its blocks, no copy)."""
        if len(self.shape) < 3:
            raise IndexError("only a stack of quantized weights can be indexed")
        return QuantizedTensor(self.data[index], self.qtype, self.shape[1:])

    def index_select(self, index: torch.Tensor) -> QuantizedTensor:
        """The stack's weights at ``index`` (a 1-D device tensor), gathered on the device
        with no host sync: how a decode step picks its experts inside a CUDA graph."""
        if len(self.shape) < 3:
            raise IndexError("only a stack of quantized weights can be indexed")
        data = self.data.index_select(0, index)
        return QuantizedTensor(data, self.qtype, (index.shape[0], *self.shape[1:]))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The full dense weight; for tests and one-off conversions, not the hot path."""
        return dequantize(self.data, self.qtype, self.shape, dtype=dtype)

    def to(self, device: str | torch.device, *, non_blocking: bool = False) -> QuantizedTensor:
        return QuantizedTensor(
            self.data.to(device, non_blocking=non_blocking), self.qtype, self.shape
        )

    def __repr__(self) -> str:
        return f"QuantizedTensor({self.qtype.name}, shape={self.shape}, device={self.device})"


# Activations as the int8 matvec reads them: q int8 (rows, K), d float32 (rows, K/32) per
# 32-element block, s float32 (rows, K/16) = d * sum(q) per 16 (triton_kernels.store_quantized).
Int8Rows = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
# The activation dtypes the int8 matvec takes (it rounds to 8 bits per 32, as llama.cpp
# does): the model's half-precision ones, not a float32 caller's, who asked for precision.
INT8_DTYPES = (torch.bfloat16, torch.float16)


def int8_activations(x: torch.Tensor, width: int | None = None) -> bool:
    """Whether a kernel writing rows of ``width`` (default x's last dim) from ``x``
    quantizes them for the int8 matvec: for half-precision activations, in rows of whole
    32-element blocks (a shared expert of 48 would not be)."""
    return x.dtype in INT8_DTYPES and (width or x.shape[-1]) % 32 == 0
