"""qwen3next / qwen35 / qwen35moe GGUFs: the layout llama.cpp's converter writes (names from
gguf-py's tables for each architecture, the ne llama.cpp's loaders create, the converter's
value transforms recomputed here from the HF weights, its metadata keys), and logits from
the GGUF equal to those from the safetensors of the same random weights."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGUFReader, Keys
from gguf.constants import MODEL_ARCH, MODEL_ARCH_NAMES, MODEL_TENSORS, TENSOR_NAMES
from transformers import PreTrainedModel

from helexa.engine.checkpoint.gguf import (
    gguf_tensor_name,
    hf_tensor_name,
    load_gguf,
    read_gguf_info,
)
from helexa.engine.checkpoint.safetensors import load_safetensors_dir
from helexa.engine.models.architectures import model_class
from helexa.engine.models.qwen3_next import Qwen3Next
from helexa.engine.quant.tensor import QuantizedTensor
from tests.engine.factories import HYBRID_KINDS, make_tiny_hybrid_hf_model, save_model_dir
from tests.engine.gguf_factories import write_model_gguf

ARCHS = {
    "qwen3_next": MODEL_ARCH.QWEN3NEXT,
    "qwen3_5": MODEL_ARCH.QWEN35,
    "qwen3_5_moe": MODEL_ARCH.QWEN35MOE,
}
# The tiny shape (tests.engine.factories.TINY_HYBRID_SHAPE).
N_EMBD, N_K, N_V, D_K, D_V, KERNEL, HEADS, HEAD_DIM = 64, 2, 4, 16, 8, 4, 4, 16
CONV = 2 * N_K * D_K + N_V * D_V


def field(reader: GGUFReader, key: str) -> object:
    f = reader.get_field(key)
    return None if f is None else f.contents()


def array(reader: GGUFReader, name: str) -> np.ndarray:
    """A float tensor of the file in torch orientation (ggml's ne reversed)."""
    t = next(t for t in reader.tensors if t.name == name)
    return np.asarray(t.data).reshape([int(d) for d in reversed(t.shape)])


@pytest.fixture(params=HYBRID_KINDS, scope="module")
def written(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, PreTrainedModel, Path]:
    hf = make_tiny_hybrid_hf_model(request.param, seed=21)
    return request.param, hf, write_model_gguf(tmp_path_factory.mktemp("g") / "m.gguf", hf)


def test_names_are_gguf_pys_for_the_architecture(
    written: tuple[str, PreTrainedModel, Path],
) -> None:
    """Every tensor is one of MODEL_TENSORS[arch], under the name gguf-py's TensorNameMap
    gives the HF tensor it came from (the converter's own lookup); the ones it renames
    on the way (dt_bias -> dt_proj.bias, in_proj_qkvz split) under its chosen names."""
    kind, hf, path = written
    arch = ARCHS[kind]
    reader = GGUFReader(path)
    assert field(reader, Keys.General.ARCHITECTURE) == MODEL_ARCH_NAMES[arch]
    allowed = {TENSOR_NAMES[t].format(bid=i) for t in MODEL_TENSORS[arch] for i in range(4)}
    names = {t.name for t in reader.tensors}
    assert {n.removesuffix(".weight").removesuffix(".bias") for n in names} <= allowed
    table = gguf.get_tensor_name_map(arch, 4)
    expected = set()
    for hf_name in hf.state_dict():  # transformers 5's: experts fused, gate_up_proj
        if hf_name.endswith(".in_proj_qkvz.weight"):  # the converter's split
            i = hf_name.split(".")[2]
            expected |= {f"blk.{i}.attn_qkv.weight", f"blk.{i}.attn_gate.weight"}
            continue
        if hf_name.endswith("experts.gate_up_proj"):
            i = hf_name.split(".")[2]
            expected |= {f"blk.{i}.ffn_gate_exps.weight", f"blk.{i}.ffn_up_exps.weight"}
            continue
        if hf_name.endswith("experts.down_proj"):
            expected.add(f"blk.{hf_name.split('.')[2]}.ffn_down_exps.weight")
            continue
        if hf_name.endswith(".dt_bias"):
            hf_name = hf_name.replace(".dt_bias", ".dt_proj.bias")
        mapped = table.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        assert mapped is not None, hf_name
        expected.add(mapped)
    assert names == expected
    # Older qwen3next conversions kept in_proj_qkvz whole, as ssm_in: still readable.
    if kind == "qwen3_next":
        fused = "model.layers.0.linear_attn.in_proj_qkvz.weight"
        assert hf_tensor_name("blk.0.ssm_in.weight", "qwen3next") == fused
    # And our own name table agrees with gguf-py's for every tensor it maps one to one.
    for hf_name in hf.state_dict():
        if ".experts." in hf_name or "in_proj_qkvz" in hf_name or "A_log" in hf_name:
            continue
        mapped = table.get_name(hf_name.replace(".dt_bias", ".dt_proj.bias"), (".weight", ".bias"))
        assert gguf_tensor_name(hf_name, MODEL_ARCH_NAMES[arch]) == mapped


def test_shapes_are_the_ones_llama_cpp_creates(
    written: tuple[str, PreTrainedModel, Path],
) -> None:
    """ne (ggml order) as llama.cpp's qwen3next / qwen35 load_arch_tensors create them."""
    kind, _, path = written
    tensors = {t.name: [int(d) for d in t.shape] for t in GGUFReader(path).tensors}
    linear = {
        "attn_qkv.weight": [N_EMBD, CONV],
        "attn_gate.weight": [N_EMBD, N_V * D_V],
        "ssm_conv1d.weight": [KERNEL, CONV],
        "ssm_dt.bias": [N_V],
        "ssm_a": [N_V],
        "ssm_norm.weight": [D_V],
        "ssm_out.weight": [N_V * D_V, N_EMBD],
    }
    if kind == "qwen3_next":
        linear["ssm_ba.weight"] = [N_EMBD, 2 * N_V]
    else:
        linear |= {"ssm_beta.weight": [N_EMBD, N_V], "ssm_alpha.weight": [N_EMBD, N_V]}
    for suffix, ne in linear.items():
        assert tensors[f"blk.0.{suffix}"] == ne, suffix
    attention = {
        "attn_q.weight": [N_EMBD, 2 * HEADS * HEAD_DIM],  # query and gate per head
        "attn_k.weight": [N_EMBD, 2 * HEAD_DIM],
        "attn_q_norm.weight": [HEAD_DIM],
        "attn_output.weight": [HEADS * HEAD_DIM, N_EMBD],
        "post_attention_norm.weight": [N_EMBD],
    }
    for suffix, ne in attention.items():
        assert tensors[f"blk.3.{suffix}"] == ne, suffix
    if kind != "qwen3_5":
        assert tensors["blk.0.ffn_gate_exps.weight"] == [N_EMBD, 32, 8]
        assert tensors["blk.0.ffn_gate_shexp.weight"] == [N_EMBD, 48]
        assert tensors["blk.0.ffn_gate_inp_shexp.weight"] == [N_EMBD, 1]


def tiled(t: torch.Tensor, head: int) -> torch.Tensor:
    """Rows grouped by key head (k0: v0 v1, k1: v0 v1) reordered to tiled (v0: k0 k1, v1:
    k0 k1), written out as the converter's _reorder_v_heads describes it."""
    r = N_V // N_K
    order = [k * r + v for v in range(r) for k in range(N_K)]
    return torch.cat([t[h * head : (h + 1) * head] for h in order])


def test_values_are_the_converters_transforms(
    written: tuple[str, PreTrainedModel, Path],
) -> None:
    kind, hf, path = written
    reader = GGUFReader(path)
    state = {k: v.detach() for k, v in hf.state_dict().items()}
    p = "model.layers.0."

    def check(gguf_name: str, want: torch.Tensor) -> None:
        got = torch.from_numpy(array(reader, gguf_name).copy())
        torch.testing.assert_close(got, want.reshape(got.shape), atol=0, rtol=0)

    a_log, dt = state[p + "linear_attn.A_log"], state[p + "linear_attn.dt_bias"]
    conv = state[p + "linear_attn.conv1d.weight"].squeeze(1)
    if kind == "qwen3_next":
        # [q, k, v, z] per key head -> all q, all k, all v; and z.
        per_head = state[p + "linear_attn.in_proj_qkvz.weight"].reshape(N_K, -1, N_EMBD)
        q, k, v, z = per_head.split([D_K, D_K, 2 * D_V, 2 * D_V], dim=1)
        qkv = torch.cat([x.reshape(-1, N_EMBD) for x in (q, k, v)])
        check("blk.0.attn_qkv.weight", qkv)
        check("blk.0.attn_gate.weight", z.reshape(-1, N_EMBD))
        check("blk.0.ssm_ba.weight", state[p + "linear_attn.in_proj_ba.weight"])
    else:
        qkv = state[p + "linear_attn.in_proj_qkv.weight"]
        qk = 2 * N_K * D_K
        check("blk.0.attn_qkv.weight", torch.cat([qkv[:qk], tiled(qkv[qk:], D_V)]))
        check("blk.0.attn_gate.weight", tiled(state[p + "linear_attn.in_proj_z.weight"], D_V))
        check("blk.0.ssm_beta.weight", tiled(state[p + "linear_attn.in_proj_b.weight"], 1))
        check("blk.0.ssm_alpha.weight", tiled(state[p + "linear_attn.in_proj_a.weight"], 1))
        out = state[p + "linear_attn.out_proj.weight"]
        check("blk.0.ssm_out.weight", tiled(out.T, D_V).T)
        a_log, dt = tiled(a_log, 1), tiled(dt, 1)
        conv = torch.cat([conv[:qk], tiled(conv[qk:], D_V)])
    check("blk.0.ssm_a", -torch.exp(a_log))
    check("blk.0.ssm_dt.bias", dt)
    check("blk.0.ssm_conv1d.weight", conv)
    check("blk.0.ssm_norm.weight", state[p + "linear_attn.norm.weight"])  # gated: as is
    check("blk.0.attn_norm.weight", state[p + "input_layernorm.weight"] + 1)
    check("blk.3.attn_q_norm.weight", state["model.layers.3.self_attn.q_norm.weight"] + 1)
    check("output_norm.weight", state["model.norm.weight"] + 1)
    check("blk.3.attn_q.weight", state["model.layers.3.self_attn.q_proj.weight"])


def test_keys_are_the_converters(written: tuple[str, PreTrainedModel, Path]) -> None:
    kind, hf, path = written
    reader = GGUFReader(path)
    arch = MODEL_ARCH_NAMES[ARCHS[kind]]
    keys = {
        Keys.SSM.CONV_KERNEL: KERNEL,
        Keys.SSM.STATE_SIZE: D_K,
        Keys.SSM.GROUP_COUNT: N_K,
        Keys.SSM.TIME_STEP_RANK: N_V,
        Keys.SSM.INNER_SIZE: N_V * D_V,
        Keys.LLM.FULL_ATTENTION_INTERVAL: 4,
        Keys.Rope.DIMENSION_COUNT: HEAD_DIM // 4,
        Keys.Attention.KEY_LENGTH: HEAD_DIM,
    }
    if kind != "qwen3_5":
        keys |= {Keys.LLM.EXPERT_COUNT: 8, Keys.LLM.EXPERT_SHARED_FEED_FORWARD_LENGTH: 48}
    if kind != "qwen3_next":  # M-RoPE sections padded to four, as the converter writes
        keys[Keys.Rope.DIMENSION_SECTIONS] = [1, 1, 0, 0]
    for key, value in keys.items():
        assert field(reader, key.format(arch=arch)) == value, key
    info = read_gguf_info(path)
    assert info.loadable and info.architecture == arch


def test_gguf_logits_equal_the_safetensors_ones(
    written: tuple[str, PreTrainedModel, Path], tmp_path: Path
) -> None:
    """The same random weights through the F32 GGUF and through the safetensors directory,
    prefill past one chunk and decode steps (and both as transformers)."""
    kind, hf, path = written
    models = []
    for ckpt in (load_gguf(path), load_safetensors_dir(save_model_dir(tmp_path / "d", hf))):
        model = model_class(ckpt.config).from_checkpoint(ckpt)
        assert isinstance(model, Qwen3Next)
        model.setup_cache(1, 256)
        models.append(model)
    assert models[0].config.linear_value_heads_tiled is (kind != "qwen3_next")
    tokens = torch.randint(0, 128, (1, 100), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = hf(tokens).logits
    for start, stop in ((0, 97), (97, 98), (98, 99), (99, 100)):
        pos = torch.arange(start, stop)
        got, want = (m.forward(tokens[:, start:stop], pos) for m in models)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        torch.testing.assert_close(got, expected[:, start:stop], atol=1e-4, rtol=0)


def test_a_quantized_gguf_runs_as_its_dequantized_weights(
    written: tuple[str, PreTrainedModel, Path], tmp_path: Path
) -> None:
    """Q8_0 blocks stay blocks in the model (the fused ssm_ba of Qwen3-Next split from
    them) and give the logits of the same file with every tensor dequantized first.
    (Against the float weights a random tiny MoE's routing flips on Q8_0's rounding.)"""
    kind, hf, _ = written
    path = write_model_gguf(tmp_path / "q.gguf", hf, quant="Q8_0")
    quantized, dequantized = load_gguf(path), load_gguf(path)
    blocks = [k for k, v in quantized.tensors.items() if isinstance(v, QuantizedTensor)]
    assert "model.layers.0.linear_attn.in_proj_qkv.weight" in blocks
    dequantized.tensors = {
        k: v.dequantize(torch.float32) if isinstance(v, QuantizedTensor) else v
        for k, v in dequantized.tensors.items()
    }
    tokens = torch.randint(0, 128, (1, 80), generator=torch.Generator().manual_seed(5))
    logits = []
    for ckpt in (quantized, dequantized):
        model = model_class(ckpt.config).from_checkpoint(ckpt)
        model.setup_cache(1, 128)
        logits.append(model.forward(tokens, torch.arange(80)))
    torch.testing.assert_close(logits[0], logits[1], atol=1e-5, rtol=0)


def test_raw_top_k_weights_survive_the_file(tmp_path: Path) -> None:
    """A Qwen3-Next with norm_topk_prob false says so (expert_weights_norm, which llama.cpp's
    MoE reads) and loads as such; Qwen3.5-MoE, which has no such option, is renormalising."""
    hf = make_tiny_hybrid_hf_model("qwen3_next", seed=22, norm_topk_prob=False)
    path = write_model_gguf(tmp_path / "raw.gguf", hf)
    assert field(GGUFReader(path), "qwen3next.expert_weights_norm") is False
    ckpt = load_gguf(path)
    model = model_class(ckpt.config).from_checkpoint(ckpt)
    assert isinstance(model, Qwen3Next) and model.config.norm_topk_prob is False
    model.setup_cache(1, 128)
    tokens = torch.randint(0, 128, (1, 70), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        expected = hf(tokens).logits
    torch.testing.assert_close(model.forward(tokens, torch.arange(70)), expected, atol=1e-4, rtol=0)
    moe = write_model_gguf(tmp_path / "moe.gguf", make_tiny_hybrid_hf_model("qwen3_5_moe"))
    assert field(GGUFReader(moe), "qwen35moe.expert_weights_norm") is None
    assert load_gguf(moe).config["norm_topk_prob"] is True
