"""Logit parity of helexa's Qwen3 with transformers' Qwen3ForCausalLM on random weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch.backends.cuda import SDPAParams, can_use_efficient_attention, can_use_flash_attention
from torch.nn.attention import SDPBackend, sdpa_kernel

from helexa.engine.checkpoint.errors import UnsupportedArchitecture
from helexa.engine.checkpoint.safetensors import load_checkpoint, load_safetensors_dir
from helexa.engine.models.qwen3 import (
    LowerRight,
    Qwen3,
    Qwen3Config,
    attention,
    attention_mask,
    lower_right_attention,
    lower_right_mask,
)
from tests.engine.devices import DEVICES
from tests.engine.factories import make_tiny_hf_model, save_model_dir

ATOL = 1e-4


def reference_logits(hf_model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(tokens).logits.float()


def ours(path: Path, device: str) -> Qwen3:
    model = Qwen3.from_checkpoint(load_safetensors_dir(path), device=device, dtype=torch.float32)
    model.setup_cache(max_batch=2, max_seq=64)
    return model


def positions(start: int, stop: int, device: str) -> torch.Tensor:
    return torch.arange(start, stop, device=device)


def ours_and_reference(
    tmp_path: Path, device: str, shape: tuple[int, int], *, seed: int, tokens_seed: int, **hf: Any
) -> tuple[Qwen3, torch.Tensor, torch.Tensor]:
    """A random tiny Qwen3 (``seed``, ``hf`` overrides) as helexa loads it on ``device``,
    random token ids of ``shape``, and transformers' logits for them on the CPU."""
    hf_model = make_tiny_hf_model(seed=seed, **hf)
    model = ours(save_model_dir(tmp_path, hf_model), device)
    tokens = torch.randint(0, 128, shape, generator=torch.Generator().manual_seed(tokens_seed))
    return model, tokens, reference_logits(hf_model, tokens)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tie", [True, False])
def test_prefill_matches_transformers(tmp_path: Path, device: str, tie: bool) -> None:
    model, tokens, expected = ours_and_reference(
        tmp_path, device, (2, 12), seed=1, tokens_seed=0, tie=tie
    )
    got = model.forward(tokens.to(device), positions(0, 12, device)).cpu()
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_decode_steps_with_kv_cache_match_full_forward(tmp_path: Path, device: str) -> None:
    model, tokens, expected = ours_and_reference(tmp_path, device, (1, 14), seed=2, tokens_seed=1)

    prefill = model.forward(tokens[:, :8].to(device), positions(0, 8, device), last_only=True)
    torch.testing.assert_close(prefill.cpu()[:, 0], expected[:, 7], atol=ATOL, rtol=0)
    for pos in range(8, 14):
        step = model.forward(tokens[:, pos : pos + 1].to(device), positions(pos, pos + 1, device))
        torch.testing.assert_close(step.cpu()[:, 0], expected[:, pos], atol=ATOL, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_chunked_prefill_after_a_prefix(tmp_path: Path, device: str) -> None:
    """A multi-token step that starts past 0 takes the explicit-mask path."""
    model, tokens, expected = ours_and_reference(tmp_path, device, (1, 11), seed=3, tokens_seed=2)
    model.forward(tokens[:, :5].to(device), positions(0, 5, device))
    got = model.forward(tokens[:, 5:].to(device), positions(5, 11, device)).cpu()
    torch.testing.assert_close(got, expected[:, 5:], atol=ATOL, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("start", "steps"), [(0, 1), (0, 6), (5, 1), (5, 6), (1, 2), (9, 3)])
def test_attention_mask_is_torchs_lower_right_causal_bias(
    device: str, start: int, steps: int
) -> None:
    """helexa's mask and attention stand in for torch's CausalBias (whose module imports
    torch._dynamo): attention through them is attention through CausalBias."""
    from torch.nn.attention.bias import causal_lower_right

    end = start + steps
    mask, causal = attention_mask(start, steps, end, torch.device(device))
    if device == "cuda" and start and steps > 1:
        assert mask == LowerRight(steps, end)  # run unmaterialized, in flash attention
    gen = torch.Generator().manual_seed(start * 10 + steps)
    q = torch.randn(1, 4, steps, 16, generator=gen).to(device)
    k, v = (torch.randn(1, 2, end, 16, generator=gen).to(device) for _ in range(2))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    want = sdpa(q, k, v, attn_mask=causal_lower_right(steps, end), enable_gqa=True)
    torch.testing.assert_close(attention(q, k, v, mask, causal), want)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("steps", [1, 3, 17])
@pytest.mark.parametrize("end", [5, 64, 300])
@pytest.mark.parametrize(
    ("heads", "kv_heads", "head_dim", "backend"),
    [
        (8, 2, 128, SDPBackend.FLASH_ATTENTION),  # Qwen3's GQA
        (8, 2, 256, SDPBackend.FLASH_ATTENTION),  # Qwen3-Next's gated attention
        (4, 4, 20, SDPBackend.FLASH_ATTENTION),  # a head size flash takes padded
        (4, 4, 64, SDPBackend.EFFICIENT_ATTENTION),  # flash turned off
    ],
)
def test_lower_right_attention_matches_a_materialized_mask_on_cuda(
    steps: int, end: int, heads: int, kv_heads: int, head_dim: int, backend: SDPBackend
) -> None:
    """bf16 through the one fused kernel allowed, against SDPA in float32 with the mask
    materialized. torch must take the inputs to that kernel, as the product's are: else
    the product would quietly run the materialized mask."""
    if steps > end:
        pytest.skip("more queries than keys")
    gen = torch.Generator("cuda").manual_seed(steps * 1000 + end)
    q = torch.randn(2, heads, steps, head_dim, device="cuda", dtype=torch.bfloat16, generator=gen)
    k, v = (
        torch.randn(2, kv_heads, end, head_dim, device="cuda", dtype=torch.bfloat16, generator=gen)
        for _ in range(2)
    )
    fused = {
        SDPBackend.FLASH_ATTENTION: can_use_flash_attention,
        SDPBackend.EFFICIENT_ATTENTION: can_use_efficient_attention,
    }[backend]
    with sdpa_kernel([backend]):
        assert fused(SDPAParams(q, k, v, None, 0.0, False, True), True)
        got = lower_right_attention(q, k, v)
    mask = lower_right_mask(steps, end, q.device)
    want = torch.nn.functional.scaled_dot_product_attention(
        q.float(), k.float(), v.float(), attn_mask=mask, enable_gqa=True
    )
    assert got.shape == q.shape and got.dtype == torch.bfloat16
    # The decode kernels' bf16 atol, and torch.testing's bf16 rtol for the output's rounding.
    torch.testing.assert_close(got.float(), want, atol=1e-2, rtol=1.6e-2)


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
        {
            "rope_type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 64,
            "rope_theta": 10000.0,
        },
    ],
    ids=["linear", "yarn"],
)
def test_rope_scaling_matches_transformers(tmp_path: Path, rope: dict) -> None:
    # Compare from a prefix so positions far from 0 (where scaling matters) are checked.
    model, tokens, expected = ours_and_reference(
        tmp_path, "cpu", (1, 40), seed=4, tokens_seed=3, rope_parameters=rope
    )
    got = model.forward(tokens, positions(0, 40, "cpu"))
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_load_checkpoint_dispatches_directories(tmp_path: Path) -> None:
    hf = make_tiny_hf_model(seed=5)
    ckpt = load_checkpoint(save_model_dir(tmp_path, hf))
    assert set(ckpt.tensors) == {k for k in hf.state_dict() if k != "lm_head.weight"}
    assert ckpt.file_bytes == (tmp_path / "model.safetensors").stat().st_size


def test_weight_and_cache_bytes(tmp_path: Path) -> None:
    hf = make_tiny_hf_model(seed=6, tie=True)
    model = ours(save_model_dir(tmp_path, hf), "cpu")
    params = {id(p): p for p in hf.parameters()}  # tied: lm_head shares the embedding
    assert model.weight_bytes == sum(p.numel() * 4 for p in params.values())
    cfg = model.config
    assert (
        model.cache_bytes == 2 * cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * 64 * 16 * 4
    )


@pytest.mark.parametrize(
    "config",
    [
        {"architectures": ["LlamaForCausalLM"], "model_type": "llama"},
        {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe"},
        {"model_type": "qwen2"},
        {"architectures": ["Qwen3ForCausalLM"], "use_sliding_window": True},
        {"architectures": ["Qwen3ForCausalLM"], "rope_scaling": {"rope_type": "longrope"}},
    ],
)
def test_unsupported_config_raises(config: dict) -> None:
    with pytest.raises(UnsupportedArchitecture):
        Qwen3Config.from_hf(config)


def test_unsupported_architecture_before_reading_tensors(tmp_path: Path) -> None:
    hf = make_tiny_hf_model(seed=7)
    save_model_dir(tmp_path, hf)
    ckpt = load_safetensors_dir(tmp_path)
    ckpt.config["architectures"] = ["MistralForCausalLM"]
    ckpt.tensors.clear()  # would be a missing-tensor error if the check came later
    with pytest.raises(UnsupportedArchitecture, match="MistralForCausalLM"):
        Qwen3.from_checkpoint(ckpt)


def test_missing_tensor_names_it(tmp_path: Path) -> None:
    ckpt = load_safetensors_dir(save_model_dir(tmp_path, make_tiny_hf_model(seed=8)))
    del ckpt.tensors["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        Qwen3.from_checkpoint(ckpt)


def test_forward_past_the_cache_is_refused(tmp_path: Path) -> None:
    model = ours(save_model_dir(tmp_path, make_tiny_hf_model(seed=9)), "cpu")
    with pytest.raises(ValueError, match="past the KV cache"):
        model.forward(torch.zeros(1, 2, dtype=torch.long), positions(63, 65, "cpu"))
