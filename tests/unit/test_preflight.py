"""Preflight: pure memory estimates, device choice, and refusals on real (tiny) checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from gguf import GGUFWriter
from safetensors.torch import save_file

from helexa.engine.checkpoint.gguf_write import write_gguf
from helexa.neuron.interface import DeviceHealth, DeviceInfo
from helexa.neuron.preflight import (
    MB,
    OVERHEAD_BASE_MB,
    ModelFacts,
    Plan,
    PreflightError,
    check,
    choose_device,
    estimate,
    kv_cache_mb,
    overhead_mb,
    stored_dtype_bytes,
    weights_mb,
)

# -- pure estimates --------------------------------------------------------------------------


def test_kv_cache_mb_qwen3_8b_at_32k() -> None:
    # 36 layers x 8 KV heads x 128 dims, K and V, bf16, 32768 tokens = 4.5 GiB.
    assert kv_cache_mb(36, 8, 128, 32768, 2) == 4608


def test_kv_cache_mb_rounds_up() -> None:
    assert kv_cache_mb(1, 1, 1, 1, 2) == 1


def test_weights_mb_casts_float_weights_to_compute_dtype() -> None:
    gib = 1024 * MB
    assert weights_mb(gib, stored_dtype_bytes=2, compute_dtype_bytes=4) == 2048  # bf16 -> f32
    assert weights_mb(gib, stored_dtype_bytes=4, compute_dtype_bytes=2) == 512  # f32 -> bf16
    assert weights_mb(gib, stored_dtype_bytes=None, compute_dtype_bytes=4) == 1024  # as stored


def test_stored_dtype_bytes() -> None:
    assert stored_dtype_bytes({"torch_dtype": "bfloat16"}) == 2
    assert stored_dtype_bytes({"dtype": "float32"}) == 4
    assert stored_dtype_bytes({}) is None


CONFIG_8B = {
    "num_hidden_layers": 36,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "hidden_size": 4096,
    "head_dim": 128,
    "torch_dtype": "bfloat16",
}


def test_estimate_adds_weights_kv_and_overhead() -> None:
    facts = ModelFacts("qwen3", CONFIG_8B, 5000 * MB, quantized=True)
    plan = estimate(facts, 32768, "cuda")
    assert (plan.weights_mb, plan.kv_mb) == (5000, 4608)
    assert plan.needed_mb == 5000 + 4608 + overhead_mb(5000)
    assert overhead_mb(5000) == OVERHEAD_BASE_MB + 250
    on_cpu = estimate(facts, 32768, "cpu")  # f32 KV cache, quantized weights as they are
    assert (on_cpu.weights_mb, on_cpu.kv_mb) == (5000, 2 * 4608)


def test_estimate_head_dim_defaults_to_hidden_over_heads() -> None:
    config = {k: v for k, v in CONFIG_8B.items() if k != "head_dim"}
    facts = ModelFacts("qwen3", config, MB, quantized=True)
    assert estimate(facts, 1024, "cuda").kv_mb == kv_cache_mb(36, 8, 4096 // 32, 1024, 2)


def test_estimate_refuses_config_without_shape() -> None:
    with pytest.raises(PreflightError) as err:
        estimate(ModelFacts("qwen3", {"hidden_size": 8}, MB, quantized=True), 16, "cuda")
    assert (err.value.code, err.value.status) == ("invalid_checkpoint", 422)


# -- device choice ---------------------------------------------------------------------------


def gpus(*free_mb: int, total_mb: int = 24576) -> list[tuple[DeviceInfo, DeviceHealth]]:
    return [
        (
            DeviceInfo(index=i, name=f"gpu{i}", vram_total_mb=total_mb),
            DeviceHealth(index=i, vram_used_mb=total_mb - free, vram_free_mb=free),
        )
        for i, free in enumerate(free_mb)
    ]


PLAN = {"cuda": Plan([], weights_mb=6000, kv_mb=1000, needed_mb=7500, context_length=8192)}


def test_choose_device_prefers_most_free() -> None:
    assert choose_device(gpus(8000, 20000, 12000), PLAN).devices == [1]


def test_choose_device_honours_requested_devices() -> None:
    assert choose_device(gpus(8000, 20000, 12000), PLAN, [0, 2]).devices == [2]
    assert choose_device(gpus(8000, 20000, 12000), PLAN, [0]).devices == [0]


def test_choose_device_insufficient_vram_body() -> None:
    with pytest.raises(PreflightError) as err:
        choose_device(gpus(3000, 7000), PLAN)
    body = err.value.to_body()["error"]
    assert err.value.status == 507
    assert body["type"] == "preflight" and body["code"] == "insufficient_vram"
    assert (body["needed_mb"], body["free_mb"]) == (7500, 7000)
    assert "7500" in body["message"] and "7000" in body["message"]


# 32 layers of weights and KV cache: 30000 + 2000 MiB, needing ~34 GiB on one card.
BIG = {
    "cuda": Plan([], weights_mb=30000, kv_mb=2000, needed_mb=33756, context_length=8192, layers=32)
}


def test_a_model_no_card_holds_is_split_over_cards_by_free_memory() -> None:
    plan = choose_device(gpus(12000, 26000, 4000), BIG)
    # The fewest cards that hold it (the two with the most free), in device order, each
    # taking its share of the 1000 MiB layers plus an overhead of its own.
    assert plan.devices == [0, 1]
    extra = overhead_mb(30000 // 2)
    assert plan.device_mb == (10 * 1000 + extra, 22 * 1000 + extra)
    assert plan.needed_mb == sum(plan.device_mb)
    assert all(mb <= free for mb, free in zip(plan.device_mb, (12000, 26000), strict=True))


def test_min_devices_splits_a_model_one_card_would_hold() -> None:
    whole = choose_device(gpus(40000, 40000), BIG)
    assert len(whole.devices) == 1 and whole.device_mb == ()
    plan = choose_device(gpus(40000, 40000), BIG, min_devices=2)
    assert plan.devices == [0, 1] and len(plan.device_mb) == 2
    assert plan.device_mb[0] == plan.device_mb[1]
    with pytest.raises(PreflightError) as err:
        choose_device(gpus(40000, 40000), BIG, min_devices=3)
    assert "asks for 3 devices, 2 are allowed" in err.value.message


def test_a_split_is_refused_when_the_cards_together_are_too_small() -> None:
    with pytest.raises(PreflightError) as err:
        choose_device(gpus(12000, 12000, 8000), BIG)
    assert (err.value.status, err.value.code) == (507, "insufficient_vram")
    assert "32000 MiB across 3 GPUs for a layer split" in err.value.message
    # Requested devices bound the split as they bound a single card.
    with pytest.raises(PreflightError):
        choose_device(gpus(12000, 26000, 4000), BIG, [1, 2])


def test_an_architecture_without_a_layer_split_stays_on_one_card() -> None:
    with pytest.raises(PreflightError) as err:
        choose_device(gpus(6000, 6000), PLAN)  # PLAN: layers=0, not splittable
    assert "cannot be split by layers" in err.value.message


def test_choose_device_unknown_device() -> None:
    with pytest.raises(PreflightError) as err:
        choose_device(gpus(20000), PLAN, [3])
    assert (err.value.code, err.value.status) == ("unknown_device", 422)


def test_choose_device_without_devices() -> None:
    with pytest.raises(PreflightError) as err:
        choose_device([], PLAN)
    assert err.value.extra == {"needed_mb": 7500, "free_mb": 0}


# -- real checkpoints --------------------------------------------------------------------------

TINY = {
    "model_type": "qwen3",
    "architectures": ["Qwen3ForCausalLM"],
    "vocab_size": 64,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1_000_000.0,
    "tie_word_embeddings": True,
}


def tiny_tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "model.embed_tokens.weight": torch.randn(64, 32, generator=gen),
        "model.norm.weight": torch.ones(32),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(32, 32, generator=gen),
    }


def cpu_device(free_mb: int) -> list[tuple[DeviceInfo, DeviceHealth]]:
    info = DeviceInfo(index=0, name="cpu", kind="cpu", vram_total_mb=65536)
    return [(info, DeviceHealth(index=0, vram_used_mb=65536 - free_mb, vram_free_mb=free_mb))]


@pytest.fixture
def tiny_gguf(tmp_path: Path) -> Path:
    return write_gguf(tmp_path / "tiny.gguf", config=TINY, tensors=tiny_tensors())


def test_check_gguf_plans_on_cpu(tiny_gguf: Path) -> None:
    plan = check(tiny_gguf, devices=cpu_device(4096), context_length=1024)
    # f32 tensors: 64*32 + 32 + 32*32 floats; KV: 2 layers x 2 heads x 8 dims x 1024 x K,V x f32.
    assert plan.weights_mb == 1
    assert plan.kv_mb == kv_cache_mb(2, 2, 8, 1024, 4)
    assert plan.needed_mb == plan.weights_mb + plan.kv_mb + overhead_mb(plan.weights_mb)
    assert plan.devices == [0] and plan.context_length == 1024
    assert plan.architecture == "qwen3"
    assert plan.layers == 2 and plan.device_mb == ()  # a Qwen3 could be split by layers


def test_check_gguf_default_context_is_capped(tiny_gguf: Path) -> None:
    plan = check(tiny_gguf, devices=gpus(8000), context_length=None)
    assert plan.context_length == 4096  # the model's max, under the engine's default cap


def test_check_gguf_refuses_when_it_does_not_fit(tiny_gguf: Path) -> None:
    with pytest.raises(PreflightError) as err:
        check(tiny_gguf, devices=gpus(100, 200), context_length=1024)
    assert err.value.code == "insufficient_vram" and err.value.extra["free_mb"] == 200


def test_check_foreign_gguf_is_unsupported(tmp_path: Path) -> None:
    path = tmp_path / "llama.gguf"
    writer = GGUFWriter(path, "llama")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", torch.zeros(4, 4).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(PreflightError) as err:
        check(path, devices=gpus(80000), context_length=128)
    assert (err.value.code, err.value.status) == ("unsupported_architecture", 422)
    assert err.value.to_body()["error"]["architecture"] == "llama"


def test_check_corrupt_gguf(tmp_path: Path) -> None:
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"GGUF" + b"\x00" * 7)
    with pytest.raises(PreflightError) as err:
        check(path, devices=gpus(80000), context_length=128)
    assert err.value.status == 422 and err.value.type == "preflight"


def test_check_missing_path_is_404(tmp_path: Path) -> None:
    with pytest.raises(PreflightError) as err:
        check(tmp_path / "nope.gguf", devices=gpus(80000), context_length=128)
    assert (err.value.code, err.value.status) == ("missing_files", 404)


def save_dir(path: Path, config: dict, *, weights: bool = True) -> Path:
    """An HF directory; its one weight is 2 MiB of bf16 so dtype scaling shows in MiB."""
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    if weights:
        weight = torch.zeros(1024, 1024, dtype=torch.bfloat16)
        save_file({"model.embed_tokens.weight": weight}, path / "model.safetensors")
    return path


def test_check_safetensors_dir_casts_bf16_for_cpu(tmp_path: Path) -> None:
    model = save_dir(tmp_path / "m", {**TINY, "torch_dtype": "bfloat16"})
    file_bytes = (model / "model.safetensors").stat().st_size
    on_cpu = check(model, devices=cpu_device(4096), context_length=65536)
    on_gpu = check(model, devices=gpus(4096), context_length=65536)
    assert on_cpu.weights_mb == -(-file_bytes * 2 // MB) > on_gpu.weights_mb == -(-file_bytes // MB)
    assert on_gpu.kv_mb == 2 * 2 * 2 * 8 * 65536 * 2 // MB  # bf16 on CUDA
    assert on_cpu.kv_mb == 2 * on_gpu.kv_mb  # f32 on CPU


def test_check_safetensors_dir_missing_weights(tmp_path: Path) -> None:
    model = save_dir(tmp_path / "m", TINY, weights=False)
    with pytest.raises(PreflightError) as err:
        check(model, devices=gpus(80000), context_length=128)
    assert (err.value.code, err.value.status) == ("missing_files", 422)


def test_check_safetensors_dir_missing_shard(tmp_path: Path) -> None:
    model = save_dir(tmp_path / "m", TINY)
    index = {"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(PreflightError) as err:
        check(model, devices=gpus(80000), context_length=128)
    assert err.value.code == "missing_files" and "model-00002-of-00002" in err.value.message


def test_check_dir_without_config(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(PreflightError) as err:
        check(tmp_path / "empty", devices=gpus(80000), context_length=128)
    assert (err.value.code, err.value.status) == ("missing_files", 422)


def test_check_safetensors_unsupported_architecture(tmp_path: Path) -> None:
    config = {**TINY, "model_type": "llama", "architectures": ["LlamaForCausalLM"]}
    model = save_dir(tmp_path / "m", config)
    with pytest.raises(PreflightError) as err:
        check(model, devices=gpus(80000), context_length=128)
    assert err.value.code == "unsupported_architecture"
    assert "LlamaForCausalLM" in err.value.message


# -- Qwen3-MoE: supported, and sized by every expert (all of them sit in memory) -------------

TINY_MOE = {
    **TINY,
    "model_type": "qwen3_moe",
    "architectures": ["Qwen3MoeForCausalLM"],
    "hidden_size": 1024,
    "head_dim": 256,
    "num_experts": 8,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 256,
    "torch_dtype": "bfloat16",
}


def test_check_moe_safetensors_counts_every_expert(tmp_path: Path) -> None:
    model = tmp_path / "moe"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(TINY_MOE))
    experts = {  # 8 experts x 3 projections x 512 KiB of bf16 = 12 MiB, 2 of 8 used per token
        f"model.layers.0.mlp.experts.{e}.{name}.weight": torch.zeros(
            256, 1024, dtype=torch.bfloat16
        )
        for e in range(8)
        for name in ("gate_proj", "up_proj", "down_proj")
    }
    save_file(experts, model / "model.safetensors")
    plan = check(model, devices=gpus(80000), context_length=128)
    assert plan.architecture == "Qwen3MoeForCausalLM"
    assert plan.weights_mb == -(-(model / "model.safetensors").stat().st_size // MB) == 13
    assert check(model, devices=cpu_device(80000), context_length=128).weights_mb == 25  # f32


def test_check_moe_gguf_is_supported_and_sized_by_its_tensors(tmp_path: Path) -> None:
    from gguf import GGUFReader

    from tests.engine.factories import make_tiny_moe_hf_model
    from tests.engine.gguf_factories import write_model_gguf

    path = write_model_gguf(tmp_path / "moe.gguf", make_tiny_moe_hf_model(seed=0), quant="Q8_0")
    plan = check(path, devices=gpus(80000), context_length=128)
    assert plan.architecture == "qwen3moe"
    tensor_bytes = sum(int(t.n_bytes) for t in GGUFReader(path).tensors)
    assert plan.weights_mb == -(-tensor_bytes // MB)


# -- the hybrid generation: KV for the full-attention layers only, plus the recurrent state --

# Qwen3-Next-80B-A3B's config.json (the keys the estimate reads).
CONFIG_NEXT_80B = {
    "architectures": ["Qwen3NextForCausalLM"],
    "model_type": "qwen3_next",
    "vocab_size": 151936,
    "hidden_size": 2048,
    "intermediate_size": 5120,
    "num_hidden_layers": 48,
    "num_attention_heads": 16,
    "num_key_value_heads": 2,
    "head_dim": 256,
    "full_attention_interval": 4,
    "partial_rotary_factor": 0.25,
    "rope_theta": 10_000_000,
    "linear_conv_kernel_dim": 4,
    "linear_key_head_dim": 128,
    "linear_value_head_dim": 128,
    "linear_num_key_heads": 16,
    "linear_num_value_heads": 32,
    "num_experts": 512,
    "num_experts_per_tok": 10,
    "moe_intermediate_size": 512,
    "shared_expert_intermediate_size": 512,
    "torch_dtype": "bfloat16",
}


@pytest.mark.parametrize("kind", ["cuda", "cpu"])
def test_estimate_of_a_hybrid_counts_attention_kv_and_the_recurrent_state(kind: str) -> None:
    facts = ModelFacts("qwen3next", CONFIG_NEXT_80B, 45000 * MB, quantized=True)
    plan = estimate(facts, 32768, kind)  # type: ignore[arg-type]
    dtype = 2 if kind == "cuda" else 4
    # 12 of 48 layers are full attention; the other 36 hold a conv tail (3 positions of
    # 2*16*128 + 32*128 channels) and a float32 128x128 memory per value head, twice (the
    # live state and the one marked at the end of the last prompt).
    assert plan.kv_mb == kv_cache_mb(12, 2, 256, 32768, dtype)
    state = 36 * 2 * ((2 * 16 * 128 + 32 * 128) * 3 * dtype + 32 * 128 * 128 * 4)
    assert plan.state_mb == -(-state // MB) > 0
    assert plan.needed_mb == 45000 + plan.kv_mb + plan.state_mb + overhead_mb(45000)


def test_check_hybrid_checkpoints_count_their_state(tmp_path: Path) -> None:
    """A Qwen3.5 directory and the same weights as a qwen35 GGUF: both supported, both
    sized with the recurrent state the engine will allocate for them."""
    from tests.engine.factories import make_tiny_hybrid_hf_model, save_model_dir
    from tests.engine.gguf_factories import write_model_gguf

    hf = make_tiny_hybrid_hf_model("qwen3_5", seed=0)
    directory = save_model_dir(tmp_path / "dir", hf)
    gguf = write_model_gguf(tmp_path / "m.gguf", hf)
    plans = [check(p, devices=gpus(80000), context_length=128) for p in (directory, gguf)]
    assert [p.architecture for p in plans] == ["Qwen3_5ForCausalLM", "qwen35"]
    for plan in plans:
        assert plan.kv_mb == kv_cache_mb(1, 2, 16, 128, 2)  # one attention layer of four
        assert plan.state_mb == 1  # 3 layers x 2 x (96 x 3 x 2 + 4 x 16 x 8 x 4) bytes, rounded up
        assert plan.needed_mb == plan.weights_mb + plan.kv_mb + 1 + overhead_mb(plan.weights_mb)
