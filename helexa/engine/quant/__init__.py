"""Quantized weights: ggml block layouts, what their bytes mean, and matmuls over them.

- ``formats``: the block layouts (``BlockFormat``, ``block_format``, ``FORMATS``).
- ``reference``: plain-torch ``dequantize``, the oracle everything else is checked against.
- ``tensor``: ``QuantizedTensor``, a weight kept in its block encoding on the device.
- ``ops``: ``linear`` and ``embedding``, what the model calls; they pick the Triton kernels
  (``triton_kernels``) on CUDA and the reference elsewhere.
- ``quantize``: encoders, the inverse of ``reference``, for writing GGUFs in tests and demos.

Import from the modules: this package imports nothing, so loading one of them does not
pull in the others (and none of them imports the package back).
"""
