"""Route quantized matmuls on CUDA to the Triton kernels when Triton is there.

A separate module so reference.py stays importable (and pure torch) on machines without
Triton: the kernels are imported on first use, and a failed import means "use torch".
"""

from __future__ import annotations

import importlib.util
from types import ModuleType
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from helexa.engine.quant.tensor import QuantizedTensor

_kernels: ModuleType | None = None
_available = importlib.util.find_spec("triton") is not None


def kernels() -> ModuleType | None:
    """helexa.engine.quant.triton_kernels, or None where Triton cannot be imported."""
    global _kernels, _available
    if _kernels is None and _available:
        try:
            from helexa.engine.quant import triton_kernels
        except ImportError:
            _available = False
        else:
            _kernels = triton_kernels
    return _kernels


def cuda_linear(
    x: torch.Tensor, weight: QuantizedTensor, bias: torch.Tensor | None
) -> torch.Tensor | None:
    """``x @ W.T + bias`` through a Triton kernel, or None when none applies (not on
    CUDA, no Triton, or a block type without a kernel)."""
    if not weight.data.is_cuda:
        return None
    k = kernels()
    if k is None or weight.qtype not in k.SUPPORTED:
        return None
    return k.linear(x, weight, bias)
