"""Logit parity of helexa's hybrid models (Qwen3-Next, Qwen3.5, Qwen3.5-MoE) with
transformers on random weights, fp32: prefill past one delta-rule chunk, cached decode
steps, a prefill that continues from held state, the graph-safe step; the two delta-rule
paths against each other; config reading and memory accounting."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from helexa.engine.checkpoint.errors import CheckpointError, UnsupportedArchitecture
from helexa.engine.checkpoint.safetensors import load_safetensors_dir, read_config
from helexa.engine.models.architectures import model_class
from helexa.engine.models.cuda_graph import GraphDecoder
from helexa.engine.models.qwen3 import Qwen3Config
from helexa.engine.models.qwen3_next import (
    CHUNK,
    FULL,
    LINEAR,
    GatedAttention,
    GatedDeltaNet,
    Qwen3_5,
    Qwen3_5Moe,
    Qwen3Next,
    Qwen3NextConfig,
    SharedExpertMoE,
    chunk_delta_rule,
    decode_step,
    recurrent_delta_step,
)
from tests.engine.devices import DEVICES
from tests.engine.factories import (
    HYBRID_KINDS,
    make_tiny_hybrid_hf_model,
    make_tiny_multimodal_qwen3_5,
    save_model_dir,
)

ATOL = 1e-4
PROMPT = 150  # past two delta-rule chunks of 64
CLASSES = {"qwen3_next": Qwen3Next, "qwen3_5": Qwen3_5, "qwen3_5_moe": Qwen3_5Moe}


def ours(path: Path, device: str, max_batch: int = 2, max_seq: int = 256) -> Qwen3Next:
    ckpt = load_safetensors_dir(path)
    model = model_class(ckpt.config).from_checkpoint(ckpt, device=device, dtype=torch.float32)
    assert isinstance(model, Qwen3Next)
    model.setup_cache(max_batch=max_batch, max_seq=max_seq)
    return model


def positions(start: int, stop: int, device: str) -> torch.Tensor:
    return torch.arange(start, stop, device=device)


def random_tokens(batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(params=HYBRID_KINDS, scope="module")
def hybrid(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """(kind, hf model, its saved directory) for each of the three classes."""
    hf = make_tiny_hybrid_hf_model(request.param, seed=11)
    return request.param, hf, save_model_dir(tmp_path_factory.mktemp(request.param), hf)


def test_loads_as_its_class_with_the_layers_transformers_builds(hybrid: Any) -> None:
    kind, hf, path = hybrid
    model = ours(path, "cpu")
    assert type(model) is CLASSES[kind]
    kinds = [layer.block_type for layer in hf.model.layers]
    assert kinds == [LINEAR, LINEAR, LINEAR, FULL]
    mixers = [GatedDeltaNet if k == LINEAR else GatedAttention for k in kinds]
    assert [type(b.mixer) for b in model.layers] == mixers
    moe = [isinstance(b.mlp, SharedExpertMoE) for b in model.layers]
    assert moe == [kind != "qwen3_5"] * 4
    # One float32 encoding: each layer's input projections are one weight for decode,
    # which the parity tests below then run through.
    assert [len(b.mixer.fused) for b in model.layers] == [1, 1, 1, 1]


@pytest.mark.parametrize("device", DEVICES)
def test_prefill_matches_transformers(hybrid: Any, device: str) -> None:
    _, hf, path = hybrid
    model = ours(path, device)
    tokens = random_tokens(2, PROMPT, seed=0)
    with torch.no_grad():
        expected = hf(tokens).logits
    got = model.forward(tokens.to(device), positions(0, PROMPT, device)).cpu()
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_cached_decode_steps_match_transformers(hybrid: Any, device: str) -> None:
    _, hf, path = hybrid
    model = ours(path, device, max_batch=1)
    tokens = random_tokens(1, PROMPT, seed=1)
    with torch.no_grad():
        expected = hf(tokens).logits
    start = PROMPT - 8
    first = model.forward(tokens[:, :start].to(device), positions(0, start, device), last_only=True)
    torch.testing.assert_close(first.cpu()[:, 0], expected[:, start - 1], atol=ATOL, rtol=0)
    for pos in range(start, PROMPT):
        step = model.forward(tokens[:, pos : pos + 1].to(device), positions(pos, pos + 1, device))
        torch.testing.assert_close(step.cpu()[:, 0], expected[:, pos], atol=ATOL, rtol=0)


def test_a_prefill_continues_from_the_held_state(hybrid: Any) -> None:
    """A prompt that extends what was run prefills only the rest, from the conv history and
    delta-rule state left by the first part (what prompt reuse does), and a run from 0
    afterwards starts clean."""
    _, hf, path = hybrid
    model = ours(path, "cpu")
    tokens = random_tokens(2, PROMPT, seed=2)
    with torch.no_grad():
        expected = hf(tokens).logits
    model.forward(tokens[:, :70], positions(0, 70, "cpu"))
    rest = model.forward(tokens[:, 70:], positions(70, PROMPT, "cpu"))
    torch.testing.assert_close(rest, expected[:, 70:], atol=ATOL, rtol=0)
    again = model.forward(tokens[:, :20], positions(0, 20, "cpu"))
    torch.testing.assert_close(again, expected[:, :20], atol=ATOL, rtol=0)


def test_graph_safe_decode_step_matches_transformers(hybrid: Any) -> None:
    """qwen3_next.decode_step (what a CUDA graph would capture; eager on the CPU), through
    GraphDecoder, batch 2, across kv_len buckets."""
    _, hf, path = hybrid
    model = ours(path, "cpu")
    decoder = GraphDecoder(model, min_kv_len=4, step=decode_step)
    tokens = random_tokens(2, 80, seed=3)
    with torch.no_grad():
        expected = hf(tokens).logits
    model.forward(tokens[:, :67], positions(0, 67, "cpu"))
    for pos in range(67, 80):
        got = decoder(tokens[:, pos : pos + 1], pos)
        torch.testing.assert_close(got[:, 0], expected[:, pos], atol=ATOL, rtol=0)


@pytest.mark.parametrize("length", [1, 5, CHUNK, 2 * CHUNK + 7])
def test_chunked_and_recurrent_delta_rules_agree(length: int) -> None:
    """The prefill's chunked rule and the decode step's recurrent one give the same outputs
    and final state from the same (non-zero) initial state."""
    gen = torch.Generator().manual_seed(length)
    batch, heads, dk, dv = 2, 3, 8, 4
    q, k = (torch.randn(batch, length, heads, dk, generator=gen) for _ in range(2))
    v = torch.randn(batch, length, heads, dv, generator=gen)
    g = -torch.rand(batch, length, heads, generator=gen)
    beta = torch.rand(batch, length, heads, generator=gen)
    state = torch.randn(batch, heads, dk, dv, generator=gen)
    out, final = chunk_delta_rule(q, k, v, g, beta, state.clone())
    stepped = state.clone()
    outs = [
        recurrent_delta_step(
            q[:, t : t + 1],
            k[:, t : t + 1],
            v[:, t : t + 1],
            g[:, t : t + 1],
            beta[:, t : t + 1],
            stepped,
        )
        for t in range(length)
    ]
    torch.testing.assert_close(torch.cat(outs, dim=1), out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(stepped, final, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(final, state)


def test_memory_counts_weights_kv_of_attention_layers_and_the_states(hybrid: Any) -> None:
    kind, hf, path = hybrid
    model = ours(path, "cpu", max_batch=1, max_seq=256)
    assert model.weight_bytes == sum(p.numel() * 4 for p in hf.parameters())
    cfg = model.config
    kv = 2 * cfg.num_key_value_heads * cfg.head_dim * 256 * 4  # one attention layer
    conv = (2 * 2 * 16 + 4 * 8) * (4 - 1) * 4
    memory = 4 * 16 * 8 * 4  # value heads x k_dim x v_dim, float32
    assert len(model.kv_caches()) == 1 and len(model.recurrent_states()) == 3
    state = 2 * (conv + memory)  # the live state and its mark (a prompt's end)
    assert model.cache_bytes == kv + 3 * state
    assert cfg.recurrent_state_bytes(4) == 3 * state
    assert model.nbytes == model.weight_bytes + model.cache_bytes


def test_config_reading_and_the_architecture_table() -> None:
    hf = make_tiny_hybrid_hf_model("qwen3_next", seed=5, mlp_only_layers=[1])
    config = hf.config.to_dict()
    config["architectures"] = ["Qwen3NextForCausalLM"]
    assert model_class(config) is Qwen3Next
    cfg = Qwen3NextConfig.from_hf(config)
    assert cfg.rotary_dim == 4 and cfg.layer_types == (LINEAR, LINEAR, LINEAR, FULL)
    assert [cfg.is_sparse(i) for i in range(4)] == [True, False, True, True]
    # The released config.json files: layer types from the interval, the rope fraction
    # at the top level.
    released = {k: v for k, v in config.items() if k != "layer_types"}
    released |= {"full_attention_interval": 2, "partial_rotary_factor": 0.5}
    released["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e7}
    cfg = Qwen3NextConfig.from_hf(released)
    assert cfg.layer_types == (LINEAR, FULL, LINEAR, FULL) and cfg.rotary_dim == 8
    assert cfg.attention_layers == 2
    assert model_class({"model_type": "qwen35"}) is Qwen3_5  # a GGUF's config, no list
    assert model_class({"model_type": "qwen35moe"}) is Qwen3_5Moe
    assert model_class({"architectures": ["Qwen3_5ForCausalLM"]}) is Qwen3_5
    with pytest.raises(UnsupportedArchitecture):
        Qwen3Config.from_hf(config)  # the dense Qwen3 config reads no hybrid
    with pytest.raises(CheckpointError, match="layer_types names 3 layers"):
        Qwen3NextConfig.from_hf({**config, "layer_types": [LINEAR, LINEAR, FULL]})
    with pytest.raises(CheckpointError, match="not 'linear_attention' or 'full_attention'"):
        Qwen3NextConfig.from_hf({**config, "layer_types": [LINEAR, "sliding", LINEAR, FULL]})
    with pytest.raises(CheckpointError, match="not a multiple"):
        Qwen3NextConfig.from_hf({**config, "linear_num_value_heads": 3})
    with pytest.raises(CheckpointError, match="no full_attention layer"):
        Qwen3NextConfig.from_hf({**config, "layer_types": [LINEAR] * 4})
    with pytest.raises(UnsupportedArchitecture, match="attention_bias"):
        model_class({**config, "attention_bias": True})
    with pytest.raises(UnsupportedArchitecture, match="attn_output_gate"):
        model_class({**config, "attn_output_gate": False})


def test_a_wrongly_shaped_tensor_is_named(tmp_path: Path) -> None:
    hf = make_tiny_hybrid_hf_model("qwen3_5", seed=6)
    ckpt = load_safetensors_dir(save_model_dir(tmp_path, hf))
    name = "model.layers.1.linear_attn.in_proj_z.weight"
    ckpt.tensors[name] = ckpt.tensors[name][:7]
    with pytest.raises(CheckpointError, match=r"in_proj_z\.weight has shape \(7, 64\)"):
        Qwen3_5.from_checkpoint(ckpt)


def test_a_multimodal_qwen3_5_checkpoint_runs_its_text_model(tmp_path: Path) -> None:
    hf = make_tiny_multimodal_qwen3_5(seed=7)
    hf.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == [
        "Qwen3_5ForConditionalGeneration"
    ]
    config = read_config(tmp_path)
    assert config["architectures"] == ["Qwen3_5ForCausalLM"] and config["hidden_size"] == 64
    model = ours(tmp_path, "cpu", max_batch=1)
    assert type(model) is Qwen3_5
    tokens = random_tokens(1, 90, seed=8)
    with torch.no_grad():
        expected = hf(input_ids=tokens).logits
    got = model.forward(tokens, positions(0, 90, "cpu"))
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    # The vision tower is not loaded: every weight is the text model's.
    text_params = sum(p.numel() for n, p in hf.named_parameters() if "visual" not in n)
    assert model.weight_bytes == text_params * 4


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("kind", HYBRID_KINDS)
def test_hybrid_graph_replay_equals_eager_step_on_cuda(tmp_path: Path, kind: str) -> None:
    """The hybrid decode step is captured (conv and delta-rule states stepped in place,
    routing on the device) and replays to the eager step's logits in bfloat16, across a
    kv_len bucket boundary; the prefill before it runs the chunked rule on the GPU."""
    from helexa.engine.checkpoint.safetensors import load_checkpoint
    from tests.engine.gguf_factories import write_model_gguf

    path = write_model_gguf(tmp_path / "m.gguf", make_tiny_hybrid_hf_model(kind, seed=9))

    def load() -> Qwen3Next:
        ckpt = load_checkpoint(path, "cuda")
        model = model_class(ckpt.config).from_checkpoint(ckpt, "cuda", torch.bfloat16)
        assert isinstance(model, Qwen3Next)
        model.setup_cache(1, 64)
        return model

    graphed, eager = load(), load()
    decoder = GraphDecoder(graphed, min_kv_len=16, step=decode_step)
    assert decoder.enabled
    prompt = torch.randint(0, 128, (1, 5), device="cuda")
    for model in (graphed, eager):
        model.forward(prompt, torch.arange(5, device="cuda"))
    token = prompt[:, -1:]
    for pos in range(5, 20):
        kv_len = 16 if pos < 16 else 32
        want = decode_step(eager, token, torch.tensor([pos], device="cuda"), kv_len)
        got = decoder(token, pos)
        torch.testing.assert_close(got, want, atol=0, rtol=0)
        token = want[:, -1].argmax(-1, keepdim=True)
