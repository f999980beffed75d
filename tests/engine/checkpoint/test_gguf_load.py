"""load_gguf / read_gguf_info on files written by write_gguf (and by gguf-py directly)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter

from helexa.engine.checkpoint.errors import CheckpointError, UnsupportedArchitecture
from helexa.engine.checkpoint.gguf import (
    gguf_tensor_name,
    hf_tensor_name,
    load_gguf,
    read_gguf_info,
)
from helexa.engine.quant.tensor import QuantizedTensor
from tests.engine.devices import DEVICES
from tests.engine.factories import make_tiny_hf_model
from tests.engine.gguf_factories import (
    make_kquant_hf_model,
    write_foreign_gguf,
    write_model_gguf,
)

Q = GGMLQuantizationType
TOKENIZER_FIELDS = {
    "tokenizer.ggml.model": "gpt2",
    "tokenizer.ggml.pre": "qwen2",
    "tokenizer.ggml.tokens": [f"tok{i}" for i in range(128)],
    "tokenizer.ggml.token_type": [1] * 126 + [3, 3],
    "tokenizer.ggml.merges": ["t o", "to k"],
    "tokenizer.ggml.eos_token_id": 127,
    "tokenizer.ggml.padding_token_id": 126,
    "tokenizer.ggml.add_bos_token": False,
}


def test_f32_round_trip_is_exact(tmp_path: Path) -> None:
    hf = make_tiny_hf_model(128, tie=False)
    ckpt = load_gguf(
        write_model_gguf(
            tmp_path / "m.gguf", hf, tokenizer_fields=TOKENIZER_FIELDS, chat_template="{{ m }}"
        )
    )
    state = hf.state_dict()
    assert ckpt.tensors.keys() == state.keys()
    for name, tensor in state.items():
        got = ckpt.tensors[name]
        assert isinstance(got, torch.Tensor) and got.dtype == torch.float32
        assert torch.equal(got, tensor), name
    cfg = hf.config
    for key in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "rms_norm_eps",
        "max_position_embeddings",
        "tie_word_embeddings",
        "attention_bias",
        "hidden_act",
    ):
        assert ckpt.config[key] == getattr(cfg, key), key
    assert ckpt.config["rope_theta"] == cfg.rope_parameters["rope_theta"]
    assert ckpt.config["rope_parameters"] == cfg.rope_parameters
    assert ckpt.config["architectures"] == ["Qwen3ForCausalLM"]
    assert ckpt.chat_template == "{{ m }}"
    assert ckpt.tokenizer == {**TOKENIZER_FIELDS, "eos_token": "tok127", "pad_token": "tok126"}


def test_tied_embeddings(tmp_path: Path) -> None:
    hf = make_tiny_hf_model(128, tie=True)
    ckpt = load_gguf(write_model_gguf(tmp_path / "m.gguf", hf))
    assert ckpt.config["tie_word_embeddings"] is True
    assert "lm_head.weight" not in ckpt.tensors


@pytest.mark.parametrize(("quant", "dtype"), [("F16", torch.float16), ("BF16", torch.bfloat16)])
def test_half_precision_files_load_as_that_dtype(
    tmp_path: Path, quant: str, dtype: torch.dtype
) -> None:
    hf = make_tiny_hf_model(128, tie=False)
    ckpt = load_gguf(write_model_gguf(tmp_path / "m.gguf", hf, quant=quant))
    for name, tensor in hf.state_dict().items():
        got = ckpt.tensors[name]
        assert isinstance(got, torch.Tensor)
        expected = tensor.to(dtype) if tensor.dim() == 2 else tensor  # norms stay F32
        assert got.dtype == expected.dtype and torch.equal(got, expected), name


@pytest.mark.parametrize("quant", ["Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M"])
def test_quantized_weights_stay_quantized(tmp_path: Path, quant: str) -> None:
    hf = make_kquant_hf_model(128, tie=False)
    path = write_model_gguf(tmp_path / "m.gguf", hf, quant=quant)
    ckpt = load_gguf(path)
    reader = GGUFReader(path)
    file_tensors = {hf_tensor_name(t.name): t for t in reader.tensors}
    quantized = [n for n, t in file_tensors.items() if t.tensor_type not in (Q.F32, Q.F16)]
    assert quantized  # the mix really quantized something
    for name in quantized:
        got = ckpt.tensors[name]
        assert isinstance(got, QuantizedTensor), name
        assert got.qtype == file_tensors[name].tensor_type
        assert np.array_equal(got.data.numpy().reshape(-1), file_tensors[name].data.reshape(-1))
    # memory after load is the file's weight bytes: nothing kept dequantized
    q_bytes = sum(t.nbytes for t in ckpt.tensors.values() if isinstance(t, QuantizedTensor))
    assert q_bytes == sum(int(file_tensors[n].n_bytes) for n in quantized)
    all_bytes = sum(
        t.nbytes if isinstance(t, QuantizedTensor) else t.numel() * t.element_size()
        for t in ckpt.tensors.values()
    )
    assert all_bytes == ckpt.file_bytes == sum(int(t.n_bytes) for t in reader.tensors)
    assert ckpt.file_bytes < path.stat().st_size  # the rest is metadata and padding


def test_quantized_values_are_close_to_the_originals(tmp_path: Path) -> None:
    hf = make_kquant_hf_model(128, tie=False)
    ckpt = load_gguf(write_model_gguf(tmp_path / "m.gguf", hf, quant="Q4_K_M"))
    for name, tensor in hf.state_dict().items():
        got = ckpt.tensors[name]
        if isinstance(got, QuantizedTensor):
            error = (got.dequantize() - tensor).pow(2).mean().sqrt()
            assert error < 0.1 * tensor.pow(2).mean().sqrt(), name


@pytest.mark.parametrize("device", DEVICES)
def test_loads_onto_the_requested_device(tmp_path: Path, device: str) -> None:
    hf = make_kquant_hf_model(128)
    ckpt = load_gguf(write_model_gguf(tmp_path / "m.gguf", hf, quant="Q4_K_M"), device=device)
    assert {t.device.type for t in ckpt.tensors.values()} == {device}


def test_loaded_tensors_own_their_memory(tmp_path: Path) -> None:
    """Each tensor is copied out of the memory map: rewriting the file in place (same
    inode) afterwards must not change, or fault, what was loaded."""
    hf = make_kquant_hf_model(128, seed=1)
    path = write_model_gguf(tmp_path / "m.gguf", hf, quant="Q8_0")
    ckpt = load_gguf(path)
    before = {
        n: t.dequantize() if isinstance(t, QuantizedTensor) else t.clone()
        for n, t in ckpt.tensors.items()
    }
    write_model_gguf(path, make_kquant_hf_model(128, seed=2), quant="Q8_0")
    for name, t in ckpt.tensors.items():
        now = t.dequantize() if isinstance(t, QuantizedTensor) else t
        assert torch.equal(now, before[name]), name


@pytest.mark.parametrize("device", DEVICES)
def test_the_staged_read_gives_the_mapped_bytes(
    tmp_path: Path, device: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reading the file through the two staging buffers in turn (as onto a GPU, here in
    chunks of 1000 bytes: tensors straddle chunks, chunks straddle blocks) gives every
    tensor exactly as the memory map does, types and shapes included."""
    from functools import partial

    from helexa.engine.checkpoint import gguf

    path = write_model_gguf(tmp_path / "m.gguf", make_kquant_hf_model(128, seed=3), quant="Q4_K_M")
    mapped = load_gguf(path).tensors
    monkeypatch.setattr(gguf, "STAGE_BYTES", 1000)
    monkeypatch.setattr(gguf, "_Reader", partial(gguf._Reader, staged=True))
    began = time.perf_counter()
    ckpt = load_gguf(path, device=device)
    took = time.perf_counter() - began
    staged = ckpt.tensors
    assert staged.keys() == mapped.keys()
    assert max(t.nbytes for t in mapped.values()) > 3000  # several chunks, both buffers
    for name, want in mapped.items():
        got = staged[name]
        assert type(got) is type(want) and got.device.type == device, name
        if isinstance(want, QuantizedTensor):
            assert isinstance(got, QuantizedTensor) and got.qtype == want.qtype, name
            assert got.shape == want.shape and torch.equal(got.data.cpu(), want.data), name
        else:
            assert torch.equal(got.cpu(), want), name
    # The load log's split of the read: the calling thread's parts add up to its time,
    # and the reader threads' preadv time is theirs, summed.
    seconds = dict(ckpt.read_seconds)
    threads = seconds.pop("preadv summed over 4 threads")
    waits = ["waiting on copies"] if device == "cuda" else []
    parts = ["allocating", "waiting on reads", "queueing copies", *waits, "header and views"]
    assert list(seconds) == parts
    assert all(s >= 0 for s in seconds.values()) and threads > 0
    assert sum(seconds.values()) <= took


def test_config_round_trips_rope_scaling_and_sampling(tmp_path: Path) -> None:
    from helexa.engine.checkpoint.gguf_write import write_gguf

    hf = make_tiny_hf_model(128)
    yarn = {
        "rope_type": "yarn",
        "rope_theta": 1e6,
        "factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    sampling = {"temperature": 0.6, "top_k": 20, "top_p": 0.95, "min_p": 0.0}
    path = write_gguf(
        tmp_path / "m.gguf",
        config={**hf.config.to_dict(), "rope_parameters": yarn},
        tensors=hf.state_dict(),
        generation_config=sampling,
    )
    ckpt = load_gguf(path)
    assert ckpt.config["rope_parameters"] == yarn
    assert ckpt.config["rope_scaling"] == {
        "rope_type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    assert ckpt.generation_config == sampling


def test_read_gguf_info_without_loading(tmp_path: Path) -> None:
    hf = make_kquant_hf_model(128, tie=False)
    path = write_model_gguf(tmp_path / "m.gguf", hf, quant="Q4_K_M")
    info = read_gguf_info(path)
    reader = GGUFReader(path)
    assert info.architecture == "qwen3" and info.loadable
    assert info.name == "helexa-tiny"
    assert info.config == load_gguf(path).config
    assert info.tensor_bytes == sum(int(t.n_bytes) for t in reader.tensors)
    counts: dict[str, int] = {}
    for t in reader.tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    assert info.qtype_counts == counts
    assert set(counts) == {"F32", "Q4_K", "Q6_K"}


def write_moe_gguf(path: Path) -> Path:
    writer = GGUFWriter(path, "qwen3moe")
    writer.add_block_count(1)
    writer.add_embedding_length(64)
    writer.add_head_count(4)
    writer.add_expert_count(8)
    writer.add_expert_used_count(2)
    writer.add_expert_feed_forward_length(32)
    writer.add_tensor("token_embd.weight", np.zeros((16, 64), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_qwen3_moe_metadata_become_its_hf_config(tmp_path: Path) -> None:
    path = write_moe_gguf(tmp_path / "moe.gguf")
    info = read_gguf_info(path)
    assert info.architecture == "qwen3moe" and info.loadable
    assert info.config["architectures"] == ["Qwen3MoeForCausalLM"]
    assert (info.config["num_experts"], info.config["num_experts_per_tok"]) == (8, 2)
    assert info.config["moe_intermediate_size"] == 32
    assert info.config["vocab_size"] == 16
    # llama.cpp's qwen3moe semantics where the file says nothing: renormalised top-k.
    assert info.config["norm_topk_prob"] is True


def test_foreign_architecture_is_refused_before_its_tensors(tmp_path: Path) -> None:
    # The file's tensor name and type are both unreadable to us, so any look at the
    # tensors would raise a different CheckpointError first.
    path = write_foreign_gguf(tmp_path / "llama4.gguf", "llama4")
    with pytest.raises(UnsupportedArchitecture) as exc:
        load_gguf(path)
    assert exc.value.architecture == "llama4"
    assert str(path) in str(exc.value) and "qwen3" in str(exc.value)
    assert read_gguf_info(path).qtype_counts == {"IQ2_XXS": 1}


def test_unreadable_files_get_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such GGUF file"):
        load_gguf(tmp_path / "missing.gguf")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf at all" * 10)
    with pytest.raises(CheckpointError, match="not a readable GGUF file"):
        read_gguf_info(junk)


def test_unknown_tensor_names_are_refused(tmp_path: Path) -> None:
    writer = GGUFWriter(tmp_path / "odd.gguf", "qwen3")
    writer.add_tensor("blk.0.attn_qkv.weight", np.zeros((4, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError, match="unexpected tensor 'blk.0.attn_qkv.weight'"):
        load_gguf(tmp_path / "odd.gguf")


def test_tensor_names_map_both_ways() -> None:
    state = make_tiny_hf_model(16, tie=False).state_dict()
    for name in [*state, "model.layers.3.self_attn.q_proj.bias"]:
        assert hf_tensor_name(gguf_tensor_name(name)) == name
    assert gguf_tensor_name("model.layers.11.mlp.down_proj.weight") == "blk.11.ffn_down.weight"
    assert gguf_tensor_name("lm_head.weight") == "output.weight"
    assert (
        hf_tensor_name("blk.2.ffn_gate_exps.weight")
        == "model.layers.2.mlp.experts.gate_proj.weight"
    )
    assert hf_tensor_name("blk.2.ffn_gate_inp.weight") == "model.layers.2.mlp.gate.weight"
    with pytest.raises(CheckpointError):  # llama.cpp's optional fused layout: not read (yet)
        hf_tensor_name("blk.0.ffn_gate_up_exps.weight")


def test_load_reports_progress_by_bytes(tmp_path: Path) -> None:
    from helexa.engine.checkpoint.safetensors import load_checkpoint
    from tests.engine.factories import make_tiny_model_dir

    gguf = write_model_gguf(
        tmp_path / "m.gguf", make_tiny_hf_model(128), tokenizer_fields=TOKENIZER_FIELDS
    )
    for path in (gguf, make_tiny_model_dir(tmp_path / "hf")):
        seen: list[float] = []
        ckpt = load_checkpoint(path, progress=seen.append)
        assert len(seen) == len(ckpt.tensors) > 1  # one report per tensor placed
        assert seen == sorted(seen) and 0 < seen[0] < 1
        assert seen[-1] == pytest.approx(1.0, abs=0.01)  # safetensors headers are not weights
