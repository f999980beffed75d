"""Model implementations and what runs them on devices.

- ``qwen3``: Qwen3 dense in plain torch, ``Qwen3.from_checkpoint`` and the architecture check.
- ``kv_cache``: the static KV cache the model writes into.
- ``cuda_graph``: the decode step captured and replayed as CUDA graphs.
- ``parallel``: one model over several GPUs (tensor parallel, layer split).

Import from the modules: this package imports nothing.
"""
