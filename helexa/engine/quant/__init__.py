"""Quantized weights: ggml block layouts, torch reference dequant/matmul, quantizers.

Everything the model code needs comes from here, so the Triton kernels can later slot in
behind ``linear``/``embedding`` without changing callers.
"""

from helexa.engine.quant.formats import FORMATS, QK_K, BlockFormat, block_format
from helexa.engine.quant.quantize import quantize
from helexa.engine.quant.reference import dequantize, embedding, linear
from helexa.engine.quant.tensor import QuantizedTensor

__all__ = [
    "FORMATS",
    "QK_K",
    "BlockFormat",
    "QuantizedTensor",
    "block_format",
    "dequantize",
    "embedding",
    "linear",
    "quantize",
]
