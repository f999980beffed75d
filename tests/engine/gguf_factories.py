"""Tiny Qwen3 GGUF files for engine tests, written by helexa's own checkpoint.gguf_write.

The k-quants work on 256-weight rows, so :data:`KQUANT_SHAPE` widens the tiny model just
enough (hidden 256, ffn 512) for Q4_K/Q5_K/Q6_K to apply to every matrix; with the
64-wide TINY_SHAPE the writer falls back to Q5_0/Q5_1/Q8_0 like llama.cpp would.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter
from transformers import PreTrainedModel, Qwen3ForCausalLM, Qwen3MoeForCausalLM

from helexa.engine.checkpoint.gguf_write import write_gguf
from tests.engine.factories import make_tiny_hf_model, make_tiny_moe_hf_model

KQUANT_SHAPE: dict[str, Any] = dict(hidden_size=256, intermediate_size=512, head_dim=64)


def make_kquant_moe_hf_model(*, seed: int = 0, **overrides: Any) -> Qwen3MoeForCausalLM:
    """The tiny random Qwen3-MoE, widened so its experts' rows (hidden and
    moe_intermediate_size long) are whole k-quant super-blocks too."""
    return make_tiny_moe_hf_model(seed=seed, **KQUANT_SHAPE, moe_intermediate_size=256, **overrides)


def make_kquant_hf_model(
    vocab_size: int = 128, *, tie: bool = True, seed: int = 0
) -> Qwen3ForCausalLM:
    """The tiny random Qwen3, widened so every matrix row is a whole k-quant super-block."""
    return make_tiny_hf_model(vocab_size, tie=tie, seed=seed, **KQUANT_SHAPE)


def write_model_gguf(
    path: Path,
    model: PreTrainedModel,
    *,
    quant: str = "F32",
    tokenizer_json: str | None = None,
    tokenizer_fields: dict[str, Any] | None = None,
    chat_template: str | None = None,
) -> Path:
    """``model`` as a GGUF; ``tokenizer_json`` is converted with the engine's own
    tokenizer_to_gguf_fields, as a real llama.cpp conversion would carry it."""
    if tokenizer_json is not None:
        from helexa.engine.text.tokenizer import tokenizer_to_gguf_fields

        tokenizer_fields = tokenizer_to_gguf_fields(tokenizer_json)
    return write_gguf(
        path,
        config=model.config.to_dict(),
        tensors=model.state_dict(),
        quant=quant,
        tokenizer_fields=tokenizer_fields,
        chat_template=chat_template,
    )


def write_tiny_moe_gguf(path: Path, *, seed: int, **overrides: Any) -> Path:
    """The tiny random Qwen3-MoE (TINY_MOE_SHAPE, ``overrides`` on top) as a Q8_0 GGUF
    with the tiny tokenizer and Qwen3's chat template: the quantized MoE a load serves
    (its experts as 3-D blocks)."""
    from helexa.engine.text.chat_template import QWEN3_TEMPLATE
    from helexa.engine.text.tokenizer import Tokenizer
    from tests.engine.tiny_tokenizer import make_tiny_tokenizer_json

    tokenizer_json = make_tiny_tokenizer_json()
    vocab = Tokenizer.from_hf(tokenizer_json).vocab_size
    hf = make_tiny_moe_hf_model(vocab, seed=seed, **overrides)
    return write_model_gguf(
        path, hf, quant="Q8_0", tokenizer_json=tokenizer_json, chat_template=QWEN3_TEMPLATE
    )


def write_foreign_gguf(path: Path, architecture: str) -> Path:
    """A GGUF of another architecture, whose tensor names and types load_gguf could not
    map either: loading it must fail on the architecture before looking at tensors."""
    writer = GGUFWriter(path, architecture)
    writer.add_block_count(1)
    writer.add_embedding_length(256)
    writer.add_head_count(4)
    raw = np.zeros((8, 66), dtype=np.uint8)  # 8 rows of one IQ2_XXS block, a type we don't read
    writer.add_tensor("blk.0.ffn_gate_exps.weight", raw, raw_dtype=GGMLQuantizationType.IQ2_XXS)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
