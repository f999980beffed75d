"""Model implementations and what runs them on devices.

- ``qwen3``: Qwen3 dense in plain torch, ``Qwen3.from_checkpoint``, its config and checks.
- ``qwen3_moe``: Qwen3-MoE, a Qwen3 whose sparse layers route tokens to stacked experts.
- ``qwen3_next``: the hybrid generation (Qwen3-Next, Qwen3.5, Qwen3.5-MoE): Gated DeltaNet
  linear attention with every fourth layer gated full attention, MoE with a shared expert.
- ``architectures``: which of them runs a checkpoint (loading and preflight ask here).
- ``kv_cache``: the static KV cache the model writes into.
- ``recurrent_state``: a linear-attention layer's per-request state, beside the KV cache.
- ``cuda_graph``: the decode step captured and replayed as CUDA graphs.
- ``parallel``: one model over several GPUs (tensor parallel, layer split).

Import from the modules: this package imports nothing.
"""
