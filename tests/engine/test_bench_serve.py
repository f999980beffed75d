"""bench/serve.py's helexa side at CI size, for the two architectures the GPU run writes at
full size (issues 14 and 15): the MoE and the hybrid preset's tiny twin, written by the
bench itself, served by a real ``helexa --serve`` child over loopback HTTP. So the GPU
call's helexa side cannot fail on the writer, the file or the server path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from gguf import GGUFReader

from bench.serve import main
from bench.synthetic import HYBRID_PRESETS, preset_shape, synthetic_config, synthetic_tensors

LENGTH, GEN = 64, 8


@pytest.mark.parametrize(
    ("preset", "arch"),
    [("qwen3-moe-tiny", "qwen3moe"), ("qwen3.5-tiny", "qwen35"), ("qwen3-next-tiny", "qwen3next")],
)
def test_serve_bench_runs_the_helexa_side(
    tmp_path: Path, preset: str, arch: str, capsys: pytest.CaptureFixture[str]
) -> None:
    gguf = tmp_path / f"{preset}.gguf"
    args = ["--gguf", str(gguf), "--preset", preset, "--lengths", str(LENGTH)]
    assert main([*args, "--gen", str(GEN), "--context", "512", "--out", str(tmp_path)]) == 0

    fields = GGUFReader(gguf).fields
    assert bytes(fields["general.architecture"].parts[-1]).decode() == arch
    report = json.loads((tmp_path / "serve.json").read_text())
    assert report["gguf"] == gguf.name and report["preset"] == preset
    helexa = report["helexa"]
    assert helexa["load s"] > 0 and helexa["first request ttft ms"] > 0
    first, second = helexa[str(LENGTH)], helexa[f"{LENGTH} turn 2"]
    # Byte tokens of the placeholder vocab: the server counts exactly what was sent.
    assert first["prompt tokens"] == LENGTH and second["prompt tokens"] == LENGTH + 200
    assert first["decode tok/s"] > 0 and first["ttft ms"] > 0
    assert second["cached tokens"] == LENGTH  # turn 2 reuses the first turn's prompt
    table = capsys.readouterr().out
    assert f"| TTFT {LENGTH} (llama-server) | " in table
    assert f"| turn 2 on the {LENGTH} prefix: TTFT ({LENGTH} cached; llama-server) |" in table


def test_the_hybrid_preset_is_qwen3_5_9b() -> None:
    """The shape of Qwen3.5-9B's config.json, and M-RoPE sections that llama.cpp accepts
    (it asserts they cover no more than the rotated pairs of a head): [11, 11, 10] for
    its 64 rotated dims, as the real config says."""
    shape = HYBRID_PRESETS["qwen3.5-9b"]
    assert (shape["hidden"], shape["layers"], shape["head_dim"], shape["v_heads"]) == (
        4096, 32, 256, 32,
    )  # fmt: skip
    rope = synthetic_config(shape)["rope_parameters"]
    assert rope["mrope_section"] == [11, 11, 10]
    for name in HYBRID_PRESETS:
        cfg = synthetic_config(HYBRID_PRESETS[name])
        if cfg["model_type"] == "qwen3_next":  # no M-RoPE
            assert "rope_parameters" not in cfg and cfg["partial_rotary_factor"] == 0.25
            continue
        pairs = int(cfg["head_dim"] * cfg["rope_parameters"]["partial_rotary_factor"]) // 2
        assert sum(cfg["rope_parameters"]["mrope_section"]) == pairs


def test_a_shape_key_of_the_other_family_is_refused() -> None:
    with pytest.raises(ValueError, match=r"qwen3-8b takes no shape keys \['v_heads'\]"):
        preset_shape("qwen3-8b", v_heads=4)
    assert preset_shape("qwen3.5-9b", layers=4, experts=None)["layers"] == 4


def test_the_hybrid_moe_preset_is_qwen3_next_80b_a3b() -> None:
    """Qwen3-Next-80B-A3B's config.json shape, and its routed experts drawn once for all
    layers (the only way 77B bfloat16 weights fit one GPU), each layer keeping its own
    router and shared expert."""
    cfg = synthetic_config(HYBRID_PRESETS["qwen3-next-80b-a3b"])
    assert cfg["architectures"] == ["Qwen3NextForCausalLM"]
    assert (cfg["num_experts"], cfg["num_experts_per_tok"], cfg["moe_intermediate_size"]) == (
        512, 10, 512,
    )  # fmt: skip
    assert cfg["shared_expert_intermediate_size"] == 512 and cfg["num_hidden_layers"] == 48

    tiny = synthetic_tensors(synthetic_config(HYBRID_PRESETS["qwen3-next-tiny"]), "cpu")
    first, last = "model.layers.0.mlp.", "model.layers.3.mlp."
    assert tiny[first + "experts.up_proj.weight"] is tiny[last + "experts.up_proj.weight"]
    assert not torch.equal(tiny[first + "gate.weight"], tiny[last + "gate.weight"])
    assert "model.layers.0.linear_attn.in_proj_qkvz.weight" in tiny
