"""Model files in, one ``Checkpoint`` out: everything format-specific about weights on disk.

- ``types``: ``Checkpoint`` (what a loader hands the model), ``Weight``, ``Progress``.
- ``errors``: ``CheckpointError``, ``UnsupportedArchitecture`` (no torch: preflight catches them).
- ``gguf_header``: the GGUF header parsed without gguf-py's reader (no torch).
- ``gguf``: GGUF file -> Checkpoint, and the facts preflight reads without loading a weight.
- ``safetensors``: HF directory -> Checkpoint, and ``load_checkpoint`` for either format.
- ``gguf_write``: a Qwen3 / Qwen3-MoE GGUF from an HF config and state dict (tests, demos,
  benchmarks).

Import from the modules: this package imports nothing, so reading a GGUF header does not
pull in torch.
"""
