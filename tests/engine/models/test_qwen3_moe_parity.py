"""Logit parity of helexa's Qwen3-MoE with transformers' Qwen3MoeForCausalLM on random
weights, the sparse block's two paths against each other, and the architecture table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

from helexa.engine.checkpoint.errors import CheckpointError, UnsupportedArchitecture
from helexa.engine.checkpoint.safetensors import load_safetensors_dir, stack_experts
from helexa.engine.models.architectures import model_class
from helexa.engine.models.cuda_graph import GraphDecoder, decode_step
from helexa.engine.models.qwen3 import MLP, Qwen3, Qwen3Config
from helexa.engine.models.qwen3_moe import Qwen3Moe, Qwen3MoeConfig, SparseMoE
from helexa.engine.quant.formats import Q
from helexa.engine.quant.quantize import quantize
from helexa.engine.quant.tensor import QuantizedTensor
from tests.engine.devices import DEVICES
from tests.engine.factories import make_tiny_moe_hf_model, save_model_dir

ATOL = 1e-4
# (transformers config overrides): every layer sparse with renormalised top-k weights;
# and sparse every second layer, one of those made dense by mlp_only_layers, raw top-k.
LAYOUTS: dict[str, dict[str, Any]] = {
    "all-sparse-norm": dict(norm_topk_prob=True),
    "step2-mlp-only-raw": dict(
        norm_topk_prob=False, num_hidden_layers=6, decoder_sparse_step=2, mlp_only_layers=[3]
    ),
}


def ours(path: Path, device: str, max_batch: int = 2) -> Qwen3Moe:
    ckpt = load_safetensors_dir(path)
    model = model_class(ckpt.config).from_checkpoint(ckpt, device=device, dtype=torch.float32)
    assert isinstance(model, Qwen3Moe)
    model.setup_cache(max_batch=max_batch, max_seq=64)
    return model


def positions(start: int, stop: int, device: str) -> torch.Tensor:
    return torch.arange(start, stop, device=device)


@pytest.fixture(params=list(LAYOUTS), scope="module")
def layout(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """(hf model, its saved directory) for each layout."""
    hf = make_tiny_moe_hf_model(seed=11, **LAYOUTS[request.param])
    return hf, save_model_dir(tmp_path_factory.mktemp(request.param), hf)


def test_sparse_layers_are_the_ones_transformers_makes_sparse(layout: Any) -> None:
    hf, path = layout
    model = ours(path, "cpu")
    sparse = [isinstance(layer.mlp, Qwen3MoeSparseMoeBlock) for layer in hf.model.layers]
    assert [isinstance(b.mlp, SparseMoE) for b in model.layers] == sparse
    assert [isinstance(b.mlp, MLP) for b in model.layers] == [not s for s in sparse]
    assert any(sparse)


@pytest.mark.parametrize("device", DEVICES)
def test_prefill_matches_transformers(layout: Any, device: str) -> None:
    hf, path = layout
    model = ours(path, device)
    tokens = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hf(tokens).logits
    got = model.forward(tokens.to(device), positions(0, 12, device)).cpu()
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_cached_decode_steps_match_transformers(layout: Any, device: str) -> None:
    hf, path = layout
    model = ours(path, device, max_batch=1)
    tokens = torch.randint(0, 128, (1, 14), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(tokens).logits
    prefill = model.forward(tokens[:, :8].to(device), positions(0, 8, device), last_only=True)
    torch.testing.assert_close(prefill.cpu()[:, 0], expected[:, 7], atol=ATOL, rtol=0)
    for pos in range(8, 14):
        step = model.forward(tokens[:, pos : pos + 1].to(device), positions(pos, pos + 1, device))
        torch.testing.assert_close(step.cpu()[:, 0], expected[:, pos], atol=ATOL, rtol=0)


def test_graph_safe_decode_step_matches_transformers(layout: Any) -> None:
    """cuda_graph.decode_step (what a CUDA graph captures; eager on the CPU) routes on
    the device and gives the same logits, batch 2, across kv_len buckets."""
    hf, path = layout
    model = ours(path, "cpu")
    decoder = GraphDecoder(model, min_kv_len=4)
    tokens = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = hf(tokens).logits
    model.forward(tokens[:, :3], positions(0, 3, "cpu"))
    for pos in range(3, 12):
        got = decoder(tokens[:, pos : pos + 1], pos)
        torch.testing.assert_close(got[:, 0], expected[:, pos], atol=ATOL, rtol=0)


def random_moe(quant: Q | None, *, seed: int = 0, norm: bool = True) -> SparseMoE:
    gen = torch.Generator().manual_seed(seed)
    experts, hidden, ffn = 8, 64, 32

    def stack(*shape: int) -> torch.Tensor | QuantizedTensor:
        w = torch.randn(*shape, generator=gen) / shape[-1] ** 0.5
        return w if quant is None else QuantizedTensor(quantize(w, quant), quant, w.shape)

    router = torch.randn(experts, hidden, generator=gen)
    return SparseMoE(
        router,
        stack(experts, ffn, hidden),
        stack(experts, ffn, hidden),
        stack(experts, hidden, ffn),
        top_k=2,
        norm_topk_prob=norm,
    )


@pytest.mark.parametrize("quant", [None, Q.Q8_0, Q.Q4_0], ids=["f32", "q8_0", "q4_0"])
@pytest.mark.parametrize("norm", [True, False])
def test_grouped_prefill_equals_the_gathered_decode_path(quant: Q | None, norm: bool) -> None:
    moe = random_moe(quant, norm=norm)
    x = torch.randn(3, 7, 64, generator=torch.Generator().manual_seed(5))
    grouped = moe(x)  # 21 tokens x 2 experts > 8 experts: sorted by expert
    torch.testing.assert_close(grouped, moe.decode(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(moe(x[:, :1]), moe.decode(x[:, :1]))  # few tokens: decode path


@pytest.mark.parametrize("quant", [None, Q.Q8_0], ids=["f32", "q8_0"])
@pytest.mark.parametrize("grouped_mm", [True, False], ids=["grouped-mm", "per-expert"])
@pytest.mark.parametrize("chunk", [1 << 22, 32 * 64 * 3], ids=["one-chunk", "3-expert-chunks"])
def test_grouped_prefill_equals_a_per_token_loop(
    quant: Q | None, grouped_mm: bool, chunk: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The grouped prefill (every expert's tokens in one grouped GEMM per chunk of
    experts, or one matmul per expert where torch has no grouped GEMM) against a per-token
    loop over the dequantized experts, with experts that no token chose, one token, many."""
    from helexa.engine.quant import ops

    monkeypatch.setattr(ops, "CHUNK_ELEMENTS", chunk)
    if not grouped_mm:
        monkeypatch.setattr(ops, "_grouped_mm_ok", lambda x: False)
    else:

        def no_loop(*args: object, **kwargs: object) -> torch.Tensor:
            raise AssertionError("the grouped GEMM path ran a matmul per expert")

        monkeypatch.setattr(ops, "linear", no_loop)
    moe = random_moe(quant, seed=3)
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(4))
    weights, experts = moe.route(x)
    counts = torch.bincount(experts.reshape(-1), minlength=8)
    assert (counts == 0).any() and (counts == 1).any() and (counts > 3).any()
    dense = [
        w if isinstance(w, torch.Tensor) else w.dequantize()
        for w in (moe.gate_proj, moe.up_proj, moe.down_proj)
    ]
    want = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for w, e in zip(weights[t].tolist(), experts[t].tolist(), strict=True):
            h = torch.nn.functional.silu(dense[0][e] @ x[t]) * (dense[1][e] @ x[t])
            want[t] += w * (dense[2][e] @ h)
    torch.testing.assert_close(moe(x), want, atol=1e-5, rtol=1e-5)


def test_expert_linear_skips_unchosen_experts_and_checks_shapes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An expert with no rows is never expanded; counts that do not add up to x's rows
    are refused rather than read past."""
    from helexa.engine.quant import ops

    moe = random_moe(Q.Q8_0, seed=4)
    seen: list[tuple[int, int]] = []
    real = ops.dequantize_experts

    def spy(experts: object, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
        seen.append((start, stop))
        return real(experts, start, stop, dtype)  # type: ignore[arg-type]

    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(2))
    counts = [0, 0, 3, 0, 2, 0, 0, 0]
    monkeypatch.setattr(ops, "dequantize_experts", spy)
    got = ops.expert_linear(x, moe.gate_proj, counts)
    assert seen == [(2, 5)]
    dense = moe.gate_proj.dequantize()
    torch.testing.assert_close(got[:3], x[:3] @ dense[2].T, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[3:], x[3:] @ dense[4].T, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="do not fit"):
        ops.expert_linear(x, moe.gate_proj, [1, 1, 1, 1, 1, 1, 1, 1])


def test_routing_is_transformers_router() -> None:
    moe = random_moe(None, norm=True)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(6))
    weights, experts = moe.route(x)
    probs = torch.softmax(x @ moe.router.T, dim=-1)
    top, index = probs.topk(2, dim=-1)
    torch.testing.assert_close(weights, top / top.sum(-1, keepdim=True))
    assert torch.equal(experts, index)


def test_weight_bytes_count_every_expert(tmp_path: Path) -> None:
    hf = make_tiny_moe_hf_model(seed=3)
    model = ours(save_model_dir(tmp_path, hf), "cpu")
    assert model.weight_bytes == sum(p.numel() * 4 for p in hf.parameters())
    moe = model.layers[0].mlp
    assert isinstance(moe, SparseMoE) and moe.gate_proj.shape == (8, 32, 64)


def test_stack_experts_reads_per_expert_and_fused_layouts() -> None:
    """save_pretrained's per-expert tensors and transformers 5's fused state_dict stack to
    the same (n_experts, out, in) tensors."""
    hf = make_tiny_moe_hf_model(seed=4, num_hidden_layers=1)
    fused = {k: v.clone() for k, v in hf.state_dict().items()}
    assert "model.layers.0.mlp.experts.gate_up_proj" in fused
    gate_up = fused["model.layers.0.mlp.experts.gate_up_proj"]
    down = fused["model.layers.0.mlp.experts.down_proj"]
    per_expert = {k: v for k, v in fused.items() if ".experts." not in k}
    for e in range(8):
        p = f"model.layers.0.mlp.experts.{e}."
        per_expert[p + "gate_proj.weight"] = gate_up[e, :32]
        per_expert[p + "up_proj.weight"] = gate_up[e, 32:]
        per_expert[p + "down_proj.weight"] = down[e]
    gap = {
        k: v for k, v in per_expert.items() if k != "model.layers.0.mlp.experts.3.up_proj.weight"
    }
    a, b = stack_experts(fused), stack_experts(per_expert)  # in place: popped as stacked
    assert a is fused and "model.layers.0.mlp.experts.0.up_proj.weight" not in b
    assert a.keys() == b.keys()
    assert not [k for k in a if ".experts." in k and not k.endswith("_proj.weight")]
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert a["model.layers.0.mlp.experts.up_proj.weight"].shape == (8, 32, 64)
    with pytest.raises(CheckpointError, match="not 0..n-1"):
        stack_experts(gap)


def test_architecture_table_and_config() -> None:
    hf = make_tiny_moe_hf_model(seed=5, decoder_sparse_step=2, mlp_only_layers=[1])
    config = hf.config.to_dict()
    assert "num_experts" not in config and config["num_local_experts"] == 8  # transformers 5
    assert model_class(config) is Qwen3Moe
    cfg = Qwen3MoeConfig.from_hf(config)
    assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size) == (8, 2, 32)
    assert [cfg.is_sparse(i) for i in range(2)] == [False, False]
    assert model_class({"model_type": "qwen3moe"}) is Qwen3Moe  # a GGUF's config, no list
    assert model_class({"architectures": ["Qwen3ForCausalLM"]}) is Qwen3
    with pytest.raises(UnsupportedArchitecture, match="Qwen3MoeForCausalLM"):
        model_class({"architectures": ["LlamaForCausalLM"]})
    with pytest.raises(UnsupportedArchitecture):
        Qwen3Config.from_hf(config)  # the dense config reads no MoE
    with pytest.raises(UnsupportedArchitecture, match="use_sliding_window"):
        model_class({**config, "use_sliding_window": True})
    with pytest.raises(CheckpointError, match="num_experts_per_tok 9"):
        Qwen3MoeConfig.from_hf({**config, "num_experts_per_tok": 9})
    with pytest.raises(CheckpointError, match="intermediate_size"):
        Qwen3MoeConfig.from_hf({**config, "intermediate_size": None})
    # Every layer sparse: no intermediate_size needed (llama.cpp-converted configs).
    sparse = {"decoder_sparse_step": 1, "mlp_only_layers": []}
    assert Qwen3MoeConfig.from_hf({**config, **sparse, "intermediate_size": None}).is_sparse(1)


def test_a_wrongly_shaped_expert_stack_is_named(tmp_path: Path) -> None:
    ckpt = load_safetensors_dir(save_model_dir(tmp_path, make_tiny_moe_hf_model(seed=6)))
    name = "model.layers.1.mlp.experts.down_proj.weight"
    ckpt.tensors[name] = ckpt.tensors[name][:7]
    with pytest.raises(
        CheckpointError, match=r"experts\.down_proj\.weight has shape \(7, 64, 32\)"
    ):
        Qwen3Moe.from_checkpoint(ckpt)


def test_tensor_parallel_refuses_a_moe_rather_than_splitting_it_wrong(tmp_path: Path) -> None:
    from helexa.engine.models.parallel import shard_qwen3

    model = ours(save_model_dir(tmp_path, make_tiny_moe_hf_model(seed=7)), "cpu")
    with pytest.raises(ValueError, match="dense MLPs only"):
        shard_qwen3(model, 0, 2)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("quant", [None, "Q8_0", "Q4_K_M"])
def test_moe_graph_replay_equals_eager_step_on_cuda(tmp_path: Path, quant: str | None) -> None:
    """The MoE decode step is captured (routing, expert gathers and all) and replays to
    the eager step's logits, float and quantized experts."""
    from helexa.engine.checkpoint.safetensors import load_checkpoint
    from tests.engine.gguf_factories import make_kquant_moe_hf_model, write_model_gguf

    hf = make_kquant_moe_hf_model(seed=8)
    if quant is None:
        path = save_model_dir(tmp_path / "m", hf)
    else:
        path = write_model_gguf(tmp_path / "m.gguf", hf, quant=quant)

    def load() -> Qwen3:
        ckpt = load_checkpoint(path, "cuda")
        model = Qwen3Moe.from_checkpoint(ckpt, "cuda", torch.bfloat16)
        model.setup_cache(1, 64)
        return model

    graphed, eager = load(), load()
    decoder = GraphDecoder(graphed, min_kv_len=16)
    assert decoder.enabled
    prompt = torch.randint(0, 128, (1, 5), device="cuda")
    for model in (graphed, eager):
        model.forward(prompt, torch.arange(5, device="cuda"))
    token = prompt[:, -1:]
    for pos in range(5, 20):
        want = decode_step(eager, token, torch.tensor([pos], device="cuda"), 16 if pos < 16 else 32)
        got = decoder(token, pos)
        torch.testing.assert_close(got, want, atol=0, rtol=0)
        token = want[:, -1].argmax(-1, keepdim=True)
