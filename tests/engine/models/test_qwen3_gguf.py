"""Qwen3 from GGUF files: F32 matches transformers on the original weights; quantized files
match transformers given the same (dequantized) weights, while the model keeps them quantized."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from helexa.engine.checkpoint.safetensors import load_checkpoint
from helexa.engine.models.qwen3 import Qwen3
from helexa.engine.quant.tensor import QuantizedTensor
from tests.engine.devices import DEVICES
from tests.engine.factories import make_tiny_hf_model
from tests.engine.gguf_factories import make_kquant_hf_model, write_model_gguf

ATOL = 1e-4


def logits(model: Qwen3, tokens: torch.Tensor) -> torch.Tensor:
    model.setup_cache(1, 32)
    positions = torch.arange(tokens.shape[1], device=model.device)
    return model.forward(tokens.to(model.device), positions).cpu()


def dequantized_reference(hf: torch.nn.Module, tensors: dict) -> torch.nn.Module:
    """``hf`` with each weight replaced by what the GGUF actually stores."""
    ref = copy.deepcopy(hf)
    state = ref.state_dict()
    with torch.no_grad():
        for name, t in tensors.items():
            dense = t.dequantize() if isinstance(t, QuantizedTensor) else t
            state[name].copy_(dense.float())
    return ref


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tie", [True, False])
def test_f32_gguf_matches_transformers(tmp_path: Path, device: str, tie: bool) -> None:
    hf = make_tiny_hf_model(tie=tie, seed=11)
    ckpt = load_checkpoint(write_model_gguf(tmp_path / "m.gguf", hf, quant="F32"))
    tokens = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hf(tokens).logits
    got = logits(Qwen3.from_checkpoint(ckpt, device), tokens)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("quant", "factory", "qtypes"),
    [
        ("Q8_0", make_tiny_hf_model, {"Q8_0"}),
        ("Q4_K_M", make_kquant_hf_model, {"Q4_K", "Q6_K"}),
    ],
)
def test_quantized_gguf_matches_dequantized_reference(
    tmp_path: Path, device: str, quant: str, factory, qtypes: set[str]
) -> None:
    hf = factory(seed=12)
    path = write_model_gguf(tmp_path / "m.gguf", hf, quant=quant)
    ckpt = load_checkpoint(path)
    reference = dequantized_reference(hf, ckpt.tensors)
    model = Qwen3.from_checkpoint(ckpt, device)

    quantized = [w for w in model.weights() if isinstance(w, QuantizedTensor)]
    assert {w.qtype.name for w in quantized} >= qtypes
    assert all(w.device.type == torch.device(device).type for w in quantized)
    # Kept quantized: the model is about as big as the file, well under float32.
    dense_bytes = sum(p.numel() * 4 for p in {id(p): p for p in hf.parameters()}.values())
    assert model.weight_bytes < 0.5 * dense_bytes
    assert model.weight_bytes <= path.stat().st_size

    tokens = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(tokens).logits
        original = hf(tokens).logits
    got = logits(model, tokens)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    # ... and the quantization really changed the weights (the comparison above is not trivial).
    assert (original - expected).abs().max() > 10 * ATOL
