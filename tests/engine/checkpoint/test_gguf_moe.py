"""qwen3moe GGUFs: the layout llama.cpp's converter writes (checked against gguf-py's own
tables of names, shapes and keys), 3-D expert tensors that dequantize as gguf-py does, and
logits equal to transformers' on the dequantized weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, Keys
from gguf.constants import MODEL_ARCH, MODEL_ARCH_NAMES, MODEL_TENSORS, TENSOR_NAMES
from gguf.quants import dequantize as gguf_dequantize
from transformers import Qwen3MoeForCausalLM

from helexa.engine.checkpoint.gguf import load_gguf, read_gguf_info
from helexa.engine.checkpoint.gguf_write import tensor_qtype
from helexa.engine.checkpoint.types import Checkpoint
from helexa.engine.models.qwen3_moe import Qwen3Moe, SparseMoE
from helexa.engine.quant.tensor import QuantizedTensor
from tests.engine.factories import make_tiny_moe_hf_model
from tests.engine.gguf_factories import make_kquant_moe_hf_model, write_model_gguf

Q = GGMLQuantizationType
ARCH = MODEL_ARCH_NAMES[MODEL_ARCH.QWEN3MOE]
ATOL = 1e-4


def field(reader: GGUFReader, key: str) -> object:
    f = reader.get_field(key)
    return None if f is None else f.contents()


@pytest.mark.parametrize("norm", [True, False])
def test_names_shapes_and_keys_are_llama_cpps(tmp_path: Path, norm: bool) -> None:
    """Every tensor llama.cpp's qwen3moe loader creates, under gguf-py's names for that
    architecture, with its ne (ggml order): ffn_gate_inp {n_embd, n_expert} in F32,
    ffn_{gate,up}_exps {n_embd, n_ff_exp, n_expert}, ffn_down_exps {n_ff_exp, n_embd,
    n_expert}; and the converter's expert_* keys."""
    hf = make_tiny_moe_hf_model(seed=1, norm_topk_prob=norm)
    reader = GGUFReader(write_model_gguf(tmp_path / "m.gguf", hf, quant="Q8_0"))
    assert field(reader, Keys.General.ARCHITECTURE) == ARCH == "qwen3moe"
    layers = hf.config.num_hidden_layers
    expected = {
        TENSOR_NAMES[t].format(bid=i) + ".weight"
        for t in MODEL_TENSORS[MODEL_ARCH.QWEN3MOE]
        for i in range(layers)
    }
    tensors = {t.name: t for t in reader.tensors}
    assert set(tensors) == expected  # untied: output.weight too
    n_embd, n_ff_exp, n_expert = 64, 32, 8
    for i in range(layers):
        ne = {kind: [int(d) for d in tensors[f"blk.{i}.{kind}.weight"].shape] for kind in
              ("ffn_gate_inp", "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")}  # fmt: skip
        assert ne == {
            "ffn_gate_inp": [n_embd, n_expert],
            "ffn_gate_exps": [n_embd, n_ff_exp, n_expert],
            "ffn_up_exps": [n_embd, n_ff_exp, n_expert],
            "ffn_down_exps": [n_ff_exp, n_embd, n_expert],
        }
        assert tensors[f"blk.{i}.ffn_gate_inp.weight"].tensor_type == Q.F32
        assert tensors[f"blk.{i}.ffn_gate_exps.weight"].tensor_type == Q.Q8_0
    keys = Keys.LLM
    assert field(reader, keys.EXPERT_COUNT.format(arch=ARCH)) == n_expert
    assert field(reader, keys.EXPERT_USED_COUNT.format(arch=ARCH)) == 2
    assert field(reader, keys.EXPERT_FEED_FORWARD_LENGTH.format(arch=ARCH)) == n_ff_exp
    assert field(reader, keys.FEED_FORWARD_LENGTH.format(arch=ARCH)) == 128
    # llama.cpp's qwen3moe always renormalises; only a model that does not says so.
    assert field(reader, keys.EXPERT_WEIGHTS_NORM.format(arch=ARCH)) == (None if norm else False)


def test_experts_are_stacked_in_expert_order(tmp_path: Path) -> None:
    """Slice e of each 3-D tensor is transformers' expert e (gate and up split from the
    fused gate_up_proj, gate first), as the converter's torch.stack(dim=0) lays them."""
    hf = make_tiny_moe_hf_model(seed=2)
    ckpt = load_gguf(write_model_gguf(tmp_path / "m.gguf", hf))  # F32: exact
    state = hf.state_dict()
    for i in range(hf.config.num_hidden_layers):
        p = f"model.layers.{i}.mlp."
        gate_up = state[p + "experts.gate_up_proj"]
        assert torch.equal(ckpt.tensors[p + "experts.gate_proj.weight"], gate_up[:, :32])
        assert torch.equal(ckpt.tensors[p + "experts.up_proj.weight"], gate_up[:, 32:])
        assert torch.equal(
            ckpt.tensors[p + "experts.down_proj.weight"], state[p + "experts.down_proj"]
        )
        assert torch.equal(ckpt.tensors[p + "gate.weight"], state[p + "gate.weight"])


@pytest.mark.parametrize("quant", ["Q8_0", "Q4_K_M", "Q5_K_M", "Q6_K"])
def test_expert_slices_dequantize_as_gguf_py(tmp_path: Path, quant: str) -> None:
    path = write_model_gguf(tmp_path / "m.gguf", make_kquant_moe_hf_model(seed=3), quant=quant)
    reader = {t.name: t for t in GGUFReader(path).tensors}
    ckpt = load_gguf(path)
    seen: set[str] = set()
    for name, t in reader.items():
        if not name.endswith("_exps.weight"):
            continue
        ours = ckpt.tensors[
            name.replace("blk.", "model.layers.")
            .replace("ffn_gate_exps", "mlp.experts.gate_proj")
            .replace("ffn_up_exps", "mlp.experts.up_proj")
            .replace("ffn_down_exps", "mlp.experts.down_proj")
        ]
        assert isinstance(ours, QuantizedTensor) and ours.qtype == t.tensor_type
        expected = torch.from_numpy(gguf_dequantize(np.asarray(t.data), t.tensor_type).copy())
        assert ours.shape == tuple(expected.shape) == (8, *ours.shape[1:])
        for e in range(ours.shape[0]):
            assert torch.equal(ours[e].dequantize(), expected[e]), (name, e)
        assert torch.equal(ours.dequantize(), expected)
        seen.add(t.tensor_type.name)
    want = {"Q8_0": {"Q8_0"}, "Q4_K_M": {"Q4_K", "Q6_K"}, "Q5_K_M": {"Q5_K", "Q6_K"}}
    assert seen == want.get(quant, {quant})


def test_expert_tensor_types_follow_llama_cpps_mix() -> None:
    shape = (128, 256, 256)
    assert tensor_qtype("blk.0.ffn_gate_exps.weight", shape, "Q4_K_M", has_output=True) == Q.Q4_K
    assert tensor_qtype("blk.0.ffn_down_exps.weight", shape, "Q4_K_M", has_output=True) == Q.Q6_K
    assert tensor_qtype("blk.0.ffn_gate_inp.weight", (128, 256), "Q8_0", has_output=True) == Q.F32


def dequantized_hf(hf: Qwen3MoeForCausalLM, ckpt: Checkpoint) -> Qwen3MoeForCausalLM:
    """A copy of ``hf`` holding the checkpoint's weights, dequantized: the reference for a
    quantized file (transformers runs what we run, not what was quantized)."""

    def dense(name: str) -> torch.Tensor:
        t = ckpt.tensors[name]
        return t.dequantize() if isinstance(t, QuantizedTensor) else t.float()

    state = {}
    for name in hf.state_dict():
        prefix, _, kind = name.rpartition(".experts.")
        if kind == "gate_up_proj":
            gate, up = (
                dense(f"{prefix}.experts.gate_proj.weight"),
                dense(f"{prefix}.experts.up_proj.weight"),
            )
            state[name] = torch.cat([gate, up], dim=1)
        elif kind == "down_proj":
            state[name] = dense(f"{prefix}.experts.down_proj.weight")
        else:
            state[name] = dense(name)
    copy = Qwen3MoeForCausalLM(hf.config).eval()
    copy.load_state_dict(state)
    return copy


@pytest.mark.parametrize("norm", [True, False])
def test_q8_0_experts_match_transformers_on_the_dequantized_weights(
    tmp_path: Path, norm: bool
) -> None:
    hf = make_tiny_moe_hf_model(seed=4, norm_topk_prob=norm)
    ckpt = load_gguf(write_model_gguf(tmp_path / "m.gguf", hf, quant="Q8_0"))
    assert ckpt.config["norm_topk_prob"] is norm
    reference = dequantized_hf(hf, ckpt)
    model = Qwen3Moe.from_checkpoint(ckpt)
    moe = model.layers[0].mlp
    assert isinstance(moe, SparseMoE) and isinstance(moe.gate_proj, QuantizedTensor)
    model.setup_cache(1, 32)
    tokens = torch.randint(0, 128, (1, 14), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(tokens).logits
    got = model.forward(tokens[:, :9], torch.arange(9))
    torch.testing.assert_close(got, expected[:, :9], atol=ATOL, rtol=0)
    for pos in range(9, 14):
        step = model.forward(tokens[:, pos : pos + 1], torch.tensor([pos]))
        torch.testing.assert_close(step[:, 0], expected[:, pos], atol=ATOL, rtol=0)


def test_dense_layers_of_a_moe_round_trip(tmp_path: Path) -> None:
    """A config with dense layers (mlp_only_layers) writes them as ffn_gate/up/down and
    reads back the same layout; the logits still match transformers'."""
    hf = make_tiny_moe_hf_model(seed=5, num_hidden_layers=3, mlp_only_layers=[1])
    path = write_model_gguf(tmp_path / "m.gguf", hf)
    info = read_gguf_info(path)
    assert info.loadable and info.architecture == "qwen3moe"
    assert info.config["mlp_only_layers"] == [1] and info.config["decoder_sparse_step"] == 1
    assert info.tensor_bytes == sum(p.numel() * 4 for p in hf.parameters())
    model = Qwen3Moe.from_checkpoint(load_gguf(path))
    model.setup_cache(1, 32)
    tokens = torch.randint(0, 128, (1, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(tokens).logits
    torch.testing.assert_close(model.forward(tokens, torch.arange(10)), expected, atol=ATOL, rtol=0)
