"""The decode step's Triton kernels (CUDA): split-K attention against SDPA over the live
prefix, the fused step against the torch step; and the lower-right causal prefill after
a cached prefix through flash attention."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend

from helexa.engine.checkpoint.safetensors import load_checkpoint, load_safetensors_dir
from helexa.engine.models import cuda_graph, qwen3
from helexa.engine.models.qwen3 import Qwen3
from tests.engine.factories import make_tiny_hf_model, save_model_dir
from tests.engine.gguf_factories import make_kquant_hf_model, write_model_gguf

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
]


@pytest.mark.parametrize(
    ("batch", "heads", "kv_heads", "max_seq", "dim", "length"),
    [
        (1, 32, 8, 4096, 128, 1),  # the first step: one key
        (1, 32, 8, 4096, 128, 63),  # inside the first block
        (1, 32, 8, 4096, 128, 2049),  # slices of several blocks, one partly filled
        (1, 32, 8, 4096, 128, 4096),  # the whole cache
        (2, 16, 2, 1000, 64, 999),  # batch 2, 8 heads a group, a cache not a power of two
        (1, 4, 4, 300, 16, 150),  # no GQA, a tiny head
    ],
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_split_k_attention_matches_sdpa_on_the_live_prefix(
    batch: int, heads: int, kv_heads: int, max_seq: int, dim: int, length: int, dtype: torch.dtype
) -> None:
    from helexa.engine.models.decode_kernels import split_k_attention

    gen = torch.Generator("cuda").manual_seed(length)
    q = torch.randn(batch, heads, 1, dim, device="cuda", dtype=dtype, generator=gen)
    k = torch.randn(batch, kv_heads, max_seq, dim, device="cuda", dtype=dtype, generator=gen)
    v = torch.randn(batch, kv_heads, max_seq, dim, device="cuda", dtype=dtype, generator=gen)
    k[:, :, length:] = float("nan")  # past the live length: must never be read into a result
    v[:, :, length:] = float("nan")
    got = split_k_attention(q, k, v, torch.tensor([length], device="cuda"))
    expected = F.scaled_dot_product_attention(
        q.float(), k[:, :, :length].float(), v[:, :, :length].float(), enable_gqa=True
    )
    assert got.dtype == dtype and got.shape == q.shape
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-4
    torch.testing.assert_close(got.float(), expected, atol=tol, rtol=0)


def test_a_prompt_extending_a_cached_prefix_runs_flash_attention(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """bf16 on CUDA, GQA: the extension's lower-right causal mask runs on flash attention
    alone (any fallback to a materialized mask would raise here) and gives the one-shot
    forward's logits."""
    hf = make_tiny_hf_model(seed=4, head_dim=64, num_attention_heads=4, num_key_value_heads=2)
    path = save_model_dir(tmp_path, hf)
    model = Qwen3.from_checkpoint(load_safetensors_dir(path), "cuda", torch.bfloat16)
    model.setup_cache(1, 256)
    tokens = torch.randint(0, 128, (1, 200), device="cuda")
    whole = model.forward(tokens, torch.arange(200, device="cuda"))
    monkeypatch.setattr(qwen3, "SDPA_BACKENDS", [SDPBackend.FLASH_ATTENTION])
    model.forward(tokens[:, :120], torch.arange(120, device="cuda"))
    rest = model.forward(tokens[:, 120:], torch.arange(120, 200, device="cuda"))
    torch.testing.assert_close(rest, whole[:, 120:], atol=3e-2 * whole.abs().max().item(), rtol=0)


@pytest.fixture(scope="module")
def q4_k_m_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("kernels") / "m.gguf"
    return write_model_gguf(path, make_kquant_hf_model(tie=False, seed=5), quant="Q4_K_M")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_decode_step_matches_the_torch_step(
    q4_k_m_gguf: Path, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The step with every kernel (add+norm, q/k norm+RoPE+cache write, split-K
    attention, SiLU·mul) against the torch step on a twin model: logits and the caches."""
    fused, plain = (
        Qwen3.from_checkpoint(load_checkpoint(q4_k_m_gguf, "cuda"), "cuda", dtype) for _ in range(2)
    )
    for model in (fused, plain):
        model.setup_cache(2, 64)
    assert cuda_graph.step_kernels(fused) is not None
    prompt = torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(2)).cuda()
    for model in (fused, plain):
        model.forward(prompt, torch.arange(5, device="cuda"))
    token = torch.tensor([[3], [7]], device="cuda")
    tol = 3e-2 if dtype == torch.bfloat16 else 1e-4
    for pos in range(5, 30):
        step = torch.tensor([pos], device="cuda")
        got = cuda_graph.decode_step(fused, token, step, 64)
        with monkeypatch.context() as patch:
            patch.setattr(cuda_graph, "step_kernels", lambda model: None)
            expected = cuda_graph.decode_step(plain, token, step, 64)
        scale = expected.abs().max().item()
        torch.testing.assert_close(got, expected, atol=tol * scale, rtol=0)
        token = expected[:, -1].argmax(-1, keepdim=True)
    for a, b in zip(fused.kv_caches(), plain.kv_caches(), strict=True):
        torch.testing.assert_close(a.k[:, :, :30], b.k[:, :, :30], atol=tol * 8, rtol=tol)
        torch.testing.assert_close(a.v[:, :, :30], b.v[:, :, :30], atol=tol * 8, rtol=tol)
