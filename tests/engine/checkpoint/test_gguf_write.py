"""write_gguf output as gguf-py's own reader sees it: metadata, names, types, bytes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, LlamaFileType

from helexa.engine.checkpoint.errors import UnsupportedArchitecture
from helexa.engine.checkpoint.gguf import gguf_tensor_name
from helexa.engine.checkpoint.gguf_write import tensor_qtype, write_gguf
from helexa.engine.quant.quantize import quantize
from tests.engine.factories import make_tiny_hf_model
from tests.engine.gguf_factories import make_kquant_hf_model, write_model_gguf

Q = GGMLQuantizationType


def field(reader: GGUFReader, key: str) -> object:
    f = reader.get_field(key)
    assert f is not None, f"missing {key}"
    return f.contents()


@pytest.mark.parametrize(
    ("name", "shape", "quant", "has_output", "expected"),
    [
        ("blk.0.attn_norm.weight", (256,), "Q4_K_M", True, Q.F32),
        ("blk.0.attn_q.weight", (256, 256), "Q4_K_M", True, Q.Q4_K),
        ("blk.0.attn_v.weight", (128, 256), "Q4_K_M", True, Q.Q6_K),
        ("blk.1.ffn_down.weight", (256, 512), "Q4_K_M", True, Q.Q6_K),
        ("output.weight", (100, 256), "Q4_K_M", True, Q.Q6_K),
        ("token_embd.weight", (100, 256), "Q4_K_M", True, Q.Q4_K),
        ("token_embd.weight", (100, 256), "Q4_K_M", False, Q.Q6_K),  # tied: it is the output
        ("blk.0.ffn_up.weight", (512, 256), "Q5_K_M", True, Q.Q5_K),
        ("blk.0.attn_v.weight", (128, 256), "Q5_K_M", True, Q.Q6_K),
        ("blk.0.ffn_up.weight", (512, 256), "Q6_K", True, Q.Q6_K),
        ("blk.0.ffn_up.weight", (512, 256), "Q8_0", True, Q.Q8_0),
        ("blk.0.ffn_up.weight", (512, 256), "BF16", True, Q.BF16),
        # rows narrower than a super-block fall back like llama.cpp
        ("blk.0.attn_q.weight", (64, 64), "Q4_K_M", True, Q.Q5_0),
        ("blk.0.ffn_up.weight", (128, 64), "Q5_K_M", True, Q.Q5_1),
        ("blk.0.attn_v.weight", (32, 64), "Q4_K_M", True, Q.Q8_0),
        ("blk.0.attn_q.weight", (8, 48), "Q8_0", True, Q.F16),
    ],
)
def test_tensor_type_mix(
    name: str, shape: tuple[int, ...], quant: str, has_output: bool, expected: Q
) -> None:
    assert tensor_qtype(name, shape, quant, has_output=has_output) == expected


@pytest.mark.parametrize("quant", ["F32", "Q4_K_M"])
def test_gguf_reader_sees_what_was_written(tmp_path: Path, quant: str) -> None:
    hf = make_kquant_hf_model(96, tie=False)
    fields = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.tokens": [f"t{i}" for i in range(96)],
        "tokenizer.ggml.token_type": [1] * 95 + [3],
        "tokenizer.ggml.eos_token_id": 95,
    }
    path = write_model_gguf(
        tmp_path / "m.gguf", hf, quant=quant, tokenizer_fields=fields, chat_template="{{ x }}"
    )
    reader = GGUFReader(path)
    cfg = hf.config
    assert field(reader, "general.architecture") == "qwen3"
    file_type = {"F32": LlamaFileType.ALL_F32, "Q4_K_M": LlamaFileType.MOSTLY_Q4_K_M}[quant]
    assert field(reader, "general.file_type") == file_type
    expected_metadata = {
        "qwen3.block_count": cfg.num_hidden_layers,
        "qwen3.context_length": cfg.max_position_embeddings,
        "qwen3.embedding_length": cfg.hidden_size,
        "qwen3.feed_forward_length": cfg.intermediate_size,
        "qwen3.attention.head_count": cfg.num_attention_heads,
        "qwen3.attention.head_count_kv": cfg.num_key_value_heads,
        "qwen3.attention.key_length": cfg.head_dim,
        "qwen3.attention.value_length": cfg.head_dim,
    }
    for key, value in expected_metadata.items():
        assert field(reader, key) == value, key
    assert field(reader, "qwen3.rope.freq_base") == pytest.approx(1e6)
    assert field(reader, "qwen3.attention.layer_norm_rms_epsilon") == pytest.approx(1e-6)
    for key, value in fields.items():
        assert field(reader, key) == value
    assert field(reader, "tokenizer.chat_template") == "{{ x }}"

    state = hf.state_dict()
    assert {t.name for t in reader.tensors} == {gguf_tensor_name(n) for n in state}
    by_name = {t.name: t for t in reader.tensors}
    for hf_name, tensor in state.items():
        t = by_name[gguf_tensor_name(hf_name)]
        assert tuple(reversed(t.shape.tolist())) == tuple(tensor.shape)  # ne[0] innermost
        expected = tensor_qtype(t.name, tuple(tensor.shape), quant, has_output=True)
        assert t.tensor_type == expected
        encoded = quantize(tensor, expected).numpy()
        raw = np.ascontiguousarray(t.data).view(np.uint8).reshape(encoded.shape)
        assert np.array_equal(raw, encoded), hf_name
    if quant == "F32":
        embd = by_name["token_embd.weight"].data
        assert np.array_equal(embd, state["model.embed_tokens.weight"].numpy())


def test_tied_model_has_no_output_tensor(tmp_path: Path) -> None:
    hf = make_tiny_hf_model(64, tie=True)
    reader = GGUFReader(write_model_gguf(tmp_path / "m.gguf", hf))
    names = {t.name for t in reader.tensors}
    assert "token_embd.weight" in names and "output.weight" not in names


def test_yarn_and_sampling_metadata(tmp_path: Path) -> None:
    hf = make_tiny_hf_model(64)
    config = hf.config.to_dict()
    config["rope_parameters"] = {
        "rope_type": "yarn",
        "rope_theta": 5e5,
        "factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    path = write_gguf(
        tmp_path / "m.gguf",
        config=config,
        tensors=hf.state_dict(),
        generation_config={"temperature": 0.6, "top_k": 20, "top_p": 0.95},
    )
    reader = GGUFReader(path)
    assert field(reader, "qwen3.rope.scaling.type") == "yarn"
    assert field(reader, "qwen3.rope.scaling.factor") == 4.0
    assert field(reader, "qwen3.rope.scaling.original_context_length") == 64
    assert field(reader, "qwen3.rope.freq_base") == 5e5
    assert field(reader, "general.sampling.top_k") == 20
    assert field(reader, "general.sampling.temp") == pytest.approx(0.6)


def test_refuses_what_it_cannot_write(tmp_path: Path) -> None:
    hf = make_tiny_hf_model(64)
    config, state = hf.config.to_dict(), hf.state_dict()
    with pytest.raises(ValueError, match="unknown quant 'Q3_K_S'; choose one of F32"):
        write_gguf(tmp_path / "a.gguf", config=config, tensors=state, quant="Q3_K_S")
    with pytest.raises(UnsupportedArchitecture, match="llama"):
        llama = {**config, "model_type": "llama", "architectures": ["LlamaForCausalLM"]}
        write_gguf(tmp_path / "b.gguf", config=llama, tensors=state)
    with pytest.raises(ValueError, match="no GGUF name for tensor 'model.vision.weight'"):
        extra = {**state, "model.vision.weight": torch.zeros(2, 2)}
        write_gguf(tmp_path / "c.gguf", config=config, tensors=extra)
