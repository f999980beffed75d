"""The graph-capturable decode step: same logits as Qwen3.forward (CPU, in CI), and graph
replay identical to the same step run eagerly (CUDA)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from helexa.engine.checkpoint.safetensors import load_checkpoint
from helexa.engine.models.cuda_graph import GraphDecoder, decode_step, kv_bucket, masked_attention
from helexa.engine.models.qwen3 import Qwen3
from tests.engine.gguf_factories import make_kquant_hf_model, write_model_gguf


def test_kv_bucket_rounds_up_to_powers_of_two_within_the_cache() -> None:
    assert kv_bucket(0, 4096) == 256
    assert kv_bucket(255, 4096) == 256
    assert kv_bucket(256, 4096) == 512
    assert kv_bucket(3000, 4096) == 4096
    assert kv_bucket(5, 100, minimum=4) == 8
    assert kv_bucket(90, 100, minimum=4) == 100
    with pytest.raises(ValueError, match="position 100 is outside the KV cache"):
        kv_bucket(100, 100)


@pytest.mark.parametrize("visible_len", [1, 5, 12])
def test_masked_attention_matches_sdpa_on_the_visible_prefix(visible_len: int) -> None:
    gen = torch.Generator().manual_seed(visible_len)
    q = torch.randn(2, 8, 1, 16, generator=gen)
    k = torch.randn(2, 2, 12, 16, generator=gen)
    v = torch.randn(2, 2, 12, 16, generator=gen)
    visible = torch.arange(12) < visible_len
    got = masked_attention(q, k, v, visible)
    expected = F.scaled_dot_product_attention(
        q, k[:, :, :visible_len], v[:, :, :visible_len], enable_gqa=True
    )
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def q4_k_m_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("graph") / "m.gguf"
    return write_model_gguf(path, make_kquant_hf_model(tie=False, seed=5), quant="Q4_K_M")


def load(path: Path, device: str, dtype: torch.dtype, max_seq: int) -> Qwen3:
    model = Qwen3.from_checkpoint(load_checkpoint(path, device), device, dtype)
    model.setup_cache(2, max_seq)
    return model


def prefill(model: Qwen3, tokens: torch.Tensor) -> torch.Tensor:
    positions = torch.arange(tokens.shape[1], device=model.device)
    return model.forward(tokens.to(model.device), positions, last_only=True)


def test_decode_step_matches_forward_on_cpu(q4_k_m_gguf: Path) -> None:
    """Across several kv_len buckets (min 4, cache 24), batch 2, quantized weights."""
    eager = load(q4_k_m_gguf, "cpu", torch.float32, 24)
    stepped = load(q4_k_m_gguf, "cpu", torch.float32, 24)
    decoder = GraphDecoder(stepped, min_kv_len=4)
    assert not decoder.enabled
    prompt = torch.randint(0, 128, (2, 3), generator=torch.Generator().manual_seed(1))
    token = prefill(eager, prompt)[:, -1].argmax(-1, keepdim=True)
    prefill(stepped, prompt)
    for pos in range(3, 24):
        expected = eager.forward(token, torch.tensor([pos]), last_only=True)
        got = decoder(token, pos)
        assert got.shape == expected.shape == (2, 1, 128)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        token = expected[:, -1].argmax(-1, keepdim=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_graph_replay_equals_eager_step_on_cuda(q4_k_m_gguf: Path, dtype: torch.dtype) -> None:
    graphed = load(q4_k_m_gguf, "cuda", dtype, 64)
    eager = load(q4_k_m_gguf, "cuda", dtype, 64)
    reference = load(q4_k_m_gguf, "cuda", dtype, 64)
    decoder = GraphDecoder(graphed, min_kv_len=8)
    assert decoder.enabled
    prompt = torch.randint(0, 128, (1, 5), generator=torch.Generator().manual_seed(2))
    for model in (graphed, eager, reference):
        token = prefill(model, prompt)[:, -1].argmax(-1, keepdim=True)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    for pos in range(5, 40):  # kv_len buckets 8, 16, 32, 64 unless attention reads the live length
        got = decoder(token, pos)
        step = torch.tensor([pos], device="cuda")
        kv_len = 64 if decoder.live else kv_bucket(pos, 64, 8)
        expected = decode_step(eager, token, step, kv_len)
        assert torch.equal(got, expected), f"graph and eager step differ at {pos}"
        forward = reference.forward(token, step, last_only=True)
        torch.testing.assert_close(got, forward, atol=tol * forward.abs().max().item(), rtol=0)
        token = got[:, -1].argmax(-1, keepdim=True)
    assert sorted(kv for _, kv in decoder._graphs) == ([64] if decoder.live else [8, 16, 32, 64])

    # A new cache (new addresses) must not replay graphs that write into the old one.
    graphed.setup_cache(2, 64)
    eager.setup_cache(2, 64)
    for model in (graphed, eager):
        prefill(model, prompt)
    step = torch.tensor([5], device="cuda")
    assert torch.equal(
        decoder(token, 5), decode_step(eager, token, step, 64 if decoder.live else 8)
    )
