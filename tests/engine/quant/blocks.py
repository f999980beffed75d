"""Random block bytes and quantized weights shared by the quant tests."""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType

from helexa.engine.quant.formats import block_format
from helexa.engine.quant.quantize import quantize
from helexa.engine.quant.tensor import QuantizedTensor


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


def quantized_weight(qtype: GGMLQuantizationType, rows: int, cols: int) -> QuantizedTensor:
    """A weight of realistic magnitude (std 1/sqrt(cols)), so outputs stay near 1."""
    dense = torch.randn(rows, cols, generator=torch.Generator().manual_seed(rows + cols))
    return QuantizedTensor(quantize(dense / cols**0.5, qtype), qtype, (rows, cols))
