"""What a loader hands the model: one shape for safetensors directories and GGUF files.

Loaders translate their format's names and metadata into HF conventions here, so
``models/`` reads one thing whatever the file was (a MoE's experts, for one, always as one
stacked (n_experts, out, in) tensor per projection).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from helexa.engine.quant.tensor import QuantizedTensor

Weight = torch.Tensor | QuantizedTensor
# Called by a loader with the fraction (0..1) of weight bytes placed so far: a cold load of
# a large model takes long enough that the fleet and the dashboard should show how far it is.
Progress = Callable[[float], None]


class ByteProgress:
    """Counts bytes placed against a total and reports the fraction to ``report``."""

    def __init__(self, total: int, report: Progress | None) -> None:
        self.total, self.done, self.report = max(total, 1), 0, report

    def add(self, nbytes: int) -> None:
        self.done += nbytes
        if self.report is not None:
            self.report(min(1.0, self.done / self.total))


@dataclass
class Checkpoint:
    # HF config.json keys: architectures, hidden_size, intermediate_size, num_hidden_layers,
    # num_attention_heads, num_key_value_heads, head_dim, rms_norm_eps, rope_theta,
    # vocab_size, max_position_embeddings, tie_word_embeddings, ...
    config: dict[str, Any]
    # HF parameter names: model.embed_tokens.weight, model.layers.0.self_attn.q_proj.weight, ...
    tensors: dict[str, Weight]
    # Everything helexa.engine.text.tokenizer needs: either {"tokenizer_json": str} or the GGUF
    # tokenizer.ggml.* fields, plus special-token strings (bos/eos/pad).
    tokenizer: dict[str, Any] = field(default_factory=dict)
    chat_template: str | None = None
    generation_config: dict[str, Any] = field(default_factory=dict)
    source: str = ""  # the file or directory it came from, for messages
    file_bytes: int = 0  # bytes of weights on disk, for memory accounting
    # Where the read's seconds went, by part, where the loader times them (a GGUF's): the
    # load log's split of its "weights read" step, so a slow read says disk, bus or GIL.
    read_seconds: dict[str, float] = field(default_factory=dict)
