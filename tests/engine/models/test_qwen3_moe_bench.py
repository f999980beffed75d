"""bench's qwen3-30b-a3b preset at CI size: the GGUF the GPU bench writes (a qwen3moe
Q4_K_M of random weights) is one helexa loads as a Qwen3-MoE and runs, so the GPU run's
first step cannot fail on the file."""

from __future__ import annotations

from pathlib import Path

import torch
from gguf import GGMLQuantizationType, GGUFReader

from bench.synthetic import PRESETS, write_model
from helexa.engine.checkpoint.safetensors import load_checkpoint
from helexa.engine.models.architectures import model_class
from helexa.engine.models.qwen3_moe import Qwen3Moe, SparseMoE
from helexa.engine.quant.tensor import QuantizedTensor

Q = GGMLQuantizationType


def test_the_moe_preset_is_the_real_shape() -> None:
    shape = PRESETS["qwen3-30b-a3b"]
    assert (shape["hidden"], shape["layers"], shape["experts"], shape["moe_ffn"]) == (
        2048, 48, 128, 768,
    )  # fmt: skip
    assert set(PRESETS["qwen3-moe-tiny"]) == set(shape)  # the CI size has every MoE key


def test_a_tiny_moe_preset_gguf_loads_and_runs(tmp_path: Path) -> None:
    path = tmp_path / "moe.gguf"
    assert write_model(path, "qwen3-moe-tiny", "Q4_K_M", device="cpu") > 0

    fields = GGUFReader(path).fields
    assert bytes(fields["general.architecture"].parts[-1]).decode() == "qwen3moe"
    assert int(fields["qwen3moe.expert_count"].parts[-1][0]) == 8
    assert int(fields["qwen3moe.expert_used_count"].parts[-1][0]) == 2

    ckpt = load_checkpoint(path, "cpu")
    cls = model_class(ckpt.config, ckpt.source)
    assert cls is Qwen3Moe
    model = cls.from_checkpoint(ckpt, torch.device("cpu"), torch.float32)
    moe = model.layers[1].mlp
    assert isinstance(moe, SparseMoE) and moe.top_k == 2 and moe.norm_topk_prob
    assert isinstance(moe.gate_proj, QuantizedTensor) and moe.gate_proj.shape == (8, 256, 256)
    assert moe.gate_proj.qtype == Q.Q4_K and moe.down_proj.qtype == Q.Q6_K  # Q4_K_M's mix

    # Prefill (experts grouped by token) and token-by-token decode (a grouped matvec per
    # projection) must give the same last logits on the loaded file.
    tokens = torch.randint(0, 512, (1, 9), generator=torch.Generator().manual_seed(0))
    model.setup_cache(1, 16)
    whole = model.forward(tokens, torch.arange(9), last_only=True)
    model.setup_cache(1, 16)
    for pos in range(9):
        step = model.forward(tokens[:, pos : pos + 1], torch.tensor([pos]), last_only=True)
    assert whole.isfinite().all()
    torch.testing.assert_close(step, whole, rtol=1e-4, atol=1e-4)
