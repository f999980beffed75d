"""The fused Qwen3-MoE decode path against the torch reference (SparseMoE.decode without
kernels): the one-launch router, the grouped matvec's shared x and weighted sum over a
token's experts, the whole fused sparse block, the decode step that threads the norm's
int8 activations into it, and gate/up fused into one expert stack at load.

The kernel tests run on CUDA (marked ``cuda``), or on the CPU with ``TRITON_INTERPRET=1``
(float32 and float16: the interpreter garbles bfloat16 in the glue kernels); without
either they skip. The load tests need no Triton. The interpreter cannot capture a CUDA
graph: replay against eager is checked on CUDA only.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from gguf import GGMLQuantizationType

from helexa.engine.checkpoint.safetensors import load_checkpoint
from helexa.engine.models import cuda_graph
from helexa.engine.models.qwen3 import fuse_projections
from helexa.engine.models.qwen3_moe import Qwen3Moe, SparseMoE
from helexa.engine.quant.quantize import quantize
from helexa.engine.quant.tensor import QuantizedTensor
from tests.engine.gguf_factories import make_kquant_moe_hf_model, write_model_gguf
from tests.engine.kernel_device import DEVICE, HAS_TRITON, needs_kernels

Q = GGMLQuantizationType


def on_cuda(test):  # type: ignore[no-untyped-def]
    ok = torch.cuda.is_available() and HAS_TRITON
    return pytest.mark.cuda(pytest.mark.skipif(not ok, reason="needs CUDA + Triton")(test))


# Under the interpreter a program costs the same whatever its tile: wide row tiles keep the
# tests fast. Each kernel of the fixed configs, as matvec(config=...) names them.
CONFIGS = {
    "plain": {"BLOCK_N": 64, "U": 1, "DEFER": False, "num_warps": 4},
    "affine": {"BLOCK_N": 64, "U": 1, "AFFINE": True, "num_warps": 4},
    "int8": {"BLOCK_N": 64, "U": 1, "INT8": True, "num_warps": 4},
}


def random_stack(qtype: Q, e: int, n: int, k: int, gen: torch.Generator) -> QuantizedTensor:
    w = torch.randn(e, n, k, generator=gen) / k**0.5
    return QuantizedTensor(quantize(w, qtype), qtype, w.shape).to(DEVICE or "cpu")


def random_moe(
    *,
    types: tuple[Q, Q, Q] = (Q.Q4_K, Q.Q4_K, Q.Q6_K),
    dtype: torch.dtype = torch.float32,
    experts: int = 8,
    top_k: int = 2,
    norm: bool = True,
    seed: int = 0,
) -> SparseMoE:
    """A sparse block of Q4_K_M's types (hidden = moe_ffn = 256, one super-block a row),
    gate and up fused as the loader fuses them where their types agree."""
    gen = torch.Generator().manual_seed(seed)
    hidden = ffn = 256
    gate, up = (random_stack(t, experts, ffn, hidden, gen) for t in types[:2])
    down = random_stack(types[2], experts, hidden, ffn, gen)
    router = torch.randn(experts, hidden, generator=gen).to(DEVICE or "cpu", dtype)
    fused, (gate, up) = fuse_projections([gate, up])
    return SparseMoE(router, gate, up, down, top_k, norm, fused)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    assert got.shape == want.shape and not got.isnan().any()
    return float((got.double() - want.double()).norm() / want.double().norm())


@pytest.fixture
def fixed(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """The fixed-config matvec (no autotuning), its config chosen by the test."""
    from helexa.engine.quant import triton_kernels as tk

    monkeypatch.setattr(tk, "AUTOTUNE", False)
    monkeypatch.setattr(tk, "FIXED_CONFIG", CONFIGS["plain"])
    return monkeypatch


# -- routing -------------------------------------------------------------------------------


@pytest.mark.parametrize("norm", [True, False], ids=["norm", "raw"])
@pytest.mark.parametrize(
    ("tokens", "experts", "hidden", "top_k"),
    [(1, 128, 2048, 8), (5, 8, 64, 2), (3, 60, 96, 4), (2, 8, 64, 1)],
    ids=["30b-a3b", "tiny", "not-pow2", "top1"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@needs_kernels
def test_route_kernel_is_sparse_moe_route(
    norm: bool, tokens: int, experts: int, hidden: int, top_k: int, dtype: torch.dtype
) -> None:
    """One launch (router logits, softmax, top-k, renormalisation, the cast back) gives
    SparseMoE.route's experts, largest first, and its weights in x's dtype."""
    from helexa.engine.models.decode_kernels import route

    gen = torch.Generator().manual_seed(tokens * experts)
    x = torch.randn(tokens, hidden, generator=gen).to(DEVICE, dtype)
    router = (torch.randn(experts, hidden, generator=gen) / hidden**0.5).to(DEVICE, dtype)
    moe = SparseMoE(router, router, router, router, top_k, norm)  # only the router is read
    want_w, want_e = moe.route(x)
    got_w, got_e = route(x, router, top_k, norm)
    assert got_e.dtype == torch.int32 and got_w.dtype == dtype
    assert got_e.shape == got_w.shape == (tokens, top_k)
    assert torch.equal(got_e.long(), want_e)
    tol = 1e-6 if dtype == torch.float32 else 1e-3
    torch.testing.assert_close(got_w, want_w, atol=tol, rtol=tol)
    if norm:
        torch.testing.assert_close(got_w.float().sum(-1), torch.ones(tokens, device=DEVICE), atol=1e-2, rtol=0)  # fmt: skip


@pytest.mark.parametrize(("tokens", "hidden"), [(1, 2048), (3, 96)], ids=["80b-a3b", "odd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@needs_kernels
def test_shared_expert_add_is_the_gated_sum(tokens: int, hidden: int, dtype: torch.dtype) -> None:
    """Qwen3-Next's routed + sigmoid(x @ gate) * shared in one launch, against the torch
    ops (which round the product before the sum: the kernel rounds once); a gate of the
    wrong width is named."""
    from helexa.engine.models.decode_kernels import shared_expert_add

    gen = torch.Generator().manual_seed(hidden)
    x, routed, shared = (
        torch.randn(tokens, 1, hidden, generator=gen).to(DEVICE, dtype) for _ in range(3)
    )
    gate = (torch.randn(1, hidden, generator=gen) / hidden**0.5).to(DEVICE, dtype)
    want = routed + torch.sigmoid(x @ gate.T) * shared
    got = shared_expert_add(routed, shared, x, gate)
    assert got.dtype == dtype and got.shape == routed.shape
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    with pytest.raises(ValueError, match="shared_expert_add: gate"):
        shared_expert_add(routed, shared, x, gate[:, :-1].contiguous())


@needs_kernels
def test_route_kernel_breaks_ties_to_the_lower_expert() -> None:
    """Equal probabilities (duplicated router rows) come out lower id first; the routing
    of one launch leaves the next launch's tickets clean (same answer twice)."""
    from helexa.engine.models.decode_kernels import route

    gen = torch.Generator().manual_seed(1)
    router = torch.randn(8, 64, generator=gen)
    router[5] = router[2] = router[7]  # x = router[7]: the three largest logits, all equal
    x = router[7][None].repeat(2, 1).to(DEVICE)
    for _ in range(2):
        weights, experts = route(x, router.to(DEVICE), 3, False)
        assert experts.tolist() == [[2, 5, 7]] * 2
        assert torch.equal(weights[:, 0], weights[:, 2])


@needs_kernels
def test_route_kernel_refuses_mismatched_router() -> None:
    from helexa.engine.models.decode_kernels import route

    x = torch.randn(1, 64, device=DEVICE)
    with pytest.raises(ValueError, match="route: router"):
        route(x, torch.randn(8, 32, device=DEVICE), 2, True)
    with pytest.raises(ValueError, match="route: router"):
        route(x, torch.randn(8, 64, device=DEVICE, dtype=torch.float16), 2, True)
    with pytest.raises(ValueError, match="top_k 9"):
        route(x, torch.randn(8, 64, device=DEVICE), 9, True)


# -- the grouped matvec's shared x and weighted sum ----------------------------------------


@pytest.mark.parametrize("kernel", list(CONFIGS))
@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_K, Q.Q6_K], ids=lambda q: q.name)
@needs_kernels
def test_grouped_matvec_shares_x_and_sums_a_tokens_experts(kernel: str, qtype: Q) -> None:
    """``share``: each token's k pair rows read its one row of x (and one quantization of
    it), exactly as an expanded copy would; ``combine``: the weighted sum over the k rows
    in the same launch, as summing the separate rows in float64 (to float32 rounding)."""
    from helexa.engine.quant.triton_kernels import grouped_matvec, quantize_rows

    gen = torch.Generator().manual_seed(int(qtype))
    experts = random_stack(qtype, 6, 40, 512, gen)  # 40 rows: not a multiple of the tile
    tokens, k = 3, 4
    index = torch.randint(0, 6, (tokens * k,), generator=gen).to(DEVICE)
    x = (torch.randn(tokens, 512, generator=gen) / 512).to(DEVICE)
    config = CONFIGS[kernel]
    expanded = x.repeat_interleave(k, 0)
    alone = grouped_matvec(expanded, experts, index, config=config)  # (tokens * k, 40)
    shared = grouped_matvec(x, experts, index, config=config, share=k)
    assert torch.equal(shared, alone)
    if kernel == "int8":  # the quantization made by the kernel before, passed in
        given = grouped_matvec(
            x, experts, index, config=config, share=k, quantized=quantize_rows(x)
        )
        assert torch.equal(given, alone)
    weights = torch.rand(tokens, k, generator=gen).to(DEVICE)
    summed = grouped_matvec(expanded, experts, index, config=config, combine=weights)
    want = (alone.double().view(tokens, k, -1) * weights.double()[..., None]).sum(1)
    assert summed.shape == (tokens, 40)
    assert rel_err(summed, want) < 1e-5


@needs_kernels
def test_grouped_matvec_refuses_bad_share_and_combine() -> None:
    from helexa.engine.quant.triton_kernels import grouped_matvec, quantize_rows

    experts = random_stack(Q.Q8_0, 3, 4, 64, torch.Generator().manual_seed(0))
    x = torch.randn(2, 64, device=DEVICE)
    index = torch.zeros(4, dtype=torch.long, device=DEVICE)
    with pytest.raises(ValueError, match="one expert per row"):
        grouped_matvec(x, experts, index)  # 2 rows of x, 4 experts: share=2 was meant
    with pytest.raises(ValueError, match="combine"):
        grouped_matvec(x, experts, index[:2], combine=torch.ones(1, 3, device=DEVICE))
    with pytest.raises(ValueError, match="quantized"):
        grouped_matvec(x, experts, index, share=2, quantized=quantize_rows(x[:1]))


# -- the fused sparse block ------------------------------------------------------------------


@pytest.mark.parametrize("kernel", list(CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("tokens", [1, 3])
@pytest.mark.parametrize(
    "types",
    [(Q.Q4_K, Q.Q4_K, Q.Q6_K), (Q.Q4_K, Q.Q8_0, Q.Q4_K)],
    ids=["fused-gate-up", "separate-gate-up"],
)
@needs_kernels
def test_fused_decode_matches_the_reference(
    fixed: pytest.MonkeyPatch,
    kernel: str,
    dtype: torch.dtype,
    tokens: int,
    types: tuple[Q, Q, Q],
) -> None:
    """SparseMoE.fused_decode (route, gate/up on the token's one x, SiLU·mul, down with
    the weighted sum) against SparseMoE.decode's torch path, for each matvec kernel; with
    the int8 one, on the int8 activations a norm kernel would have made (half dtypes)."""
    from helexa.engine.models import decode_kernels
    from helexa.engine.quant import triton_kernels as tk

    fixed.setattr(tk, "FIXED_CONFIG", CONFIGS[kernel])
    moe = random_moe(types=types, dtype=dtype, norm=tokens == 1)
    assert bool(moe.fused) == (types[0] == types[1])
    gen = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, 1, 256, generator=gen).to(DEVICE, dtype)
    want = moe.decode(x)
    quantized = tk.quantize_rows(x.view(tokens, 256)) if dtype != torch.float32 else None
    calls: list[torch.Tensor] = []
    real = tk.quantize_rows
    fixed.setattr(tk, "quantize_rows", lambda t: calls.append(t) or real(t))
    got = moe.fused_decode(x, quantized, decode_kernels)
    if kernel == "int8" and quantized is not None:
        assert not calls  # no launch to quantize: x's int8 activations came in, SiLU·mul wrote h's
    assert got.shape == x.shape and got.dtype == dtype
    # int8 activations: ~1% per matvec; float: the sums' order (and fp16's roundings)
    tol = 3e-2 if kernel == "int8" else 1e-5 if dtype == torch.float32 else 3e-3
    assert rel_err(got, want) < tol


# -- the decode step -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def moe_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Qwen3-MoE as a Q4_K_M GGUF: Q4_K gate/up (fused on load), Q6_K down."""
    path = tmp_path_factory.mktemp("moe") / "m.gguf"
    return write_model_gguf(path, make_kquant_moe_hf_model(seed=8), quant="Q4_K_M")


def _twins(path: Path, device: str, dtype: torch.dtype, batch: int) -> list[Qwen3Moe]:
    models = []
    for _ in range(2):
        model = Qwen3Moe.from_checkpoint(load_checkpoint(path, device), device, dtype)
        model.setup_cache(batch, 64)
        models.append(model)
    return models


@pytest.mark.parametrize("kernel", ["plain", "int8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@needs_kernels
def test_fused_decode_step_matches_the_torch_step(
    moe_gguf: Path, fixed: pytest.MonkeyPatch, kernel: str, dtype: torch.dtype
) -> None:
    """cuda_graph.decode_step with the kernels (the norm's int8 activations threaded into
    the fused sparse block) against the torch step on a twin model, batch 2, several
    steps. On the CPU the interpreter stands in for CUDA: the kernels are forced on."""
    from helexa.engine.models import decode_kernels
    from helexa.engine.quant import triton_kernels as tk

    fixed.setattr(tk, "FIXED_CONFIG", CONFIGS[kernel])
    fused, plain = _twins(moe_gguf, DEVICE, dtype, 2)
    moe = fused.layers[0].mlp
    assert isinstance(moe, SparseMoE) and len(moe.fused) == 1
    prompt = torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    for model in (fused, plain):
        model.forward(prompt, torch.arange(5, device=DEVICE))
    token = torch.tensor([[3], [7]], device=DEVICE)
    tol = 1e-5 if dtype == torch.float32 and kernel == "plain" else 3e-2
    routed: list[torch.Tensor] = []
    real = decode_kernels.route
    for pos in range(5, 8):
        step = torch.tensor([pos], device=DEVICE)
        with fixed.context() as patch:
            patch.setattr(cuda_graph, "step_kernels", lambda model: decode_kernels)
            patch.setattr(decode_kernels, "route", lambda x, *a: routed.append(x) or real(x, *a))
            got = cuda_graph.decode_step(fused, token, step, 64)
        assert len(routed) == len(fused.layers) * (pos - 4)  # every sparse layer, fused
        with fixed.context() as patch:
            patch.setattr(cuda_graph, "step_kernels", lambda model: None)
            want = cuda_graph.decode_step(plain, token, step, 64)
        scale = want.abs().max().item()
        torch.testing.assert_close(got, want, atol=tol * scale, rtol=0)
        token = want[:, -1].argmax(-1, keepdim=True)


# -- gate/up fused on load (no Triton needed) ----------------------------------------------


def test_gate_and_up_are_one_stack_after_load(moe_gguf: Path) -> None:
    """A Q4_K_M file's Q4_K gate and up experts become one (E, 2F, H) stack, [gate | up]
    per expert, that gate_proj and up_proj are views of (no extra memory); the block
    computes exactly what it did with them apart, prefill and decode."""
    ckpt = load_checkpoint(moe_gguf, "cpu")
    model = Qwen3Moe.from_checkpoint(ckpt, "cpu", torch.float32)
    moe = model.layers[1].mlp
    assert isinstance(moe, SparseMoE)
    (gate_up,) = moe.fused
    assert isinstance(gate_up, QuantizedTensor) and gate_up.qtype == Q.Q4_K
    assert gate_up.shape == (8, 512, 256)
    base = gate_up.data.untyped_storage().data_ptr()
    for w in (moe.gate_proj, moe.up_proj):
        assert isinstance(w, QuantizedTensor) and w.data.untyped_storage().data_ptr() == base
    source = {n: ckpt.tensors[f"model.layers.1.mlp.experts.{n}.weight"] for n in ("gate_proj", "up_proj")}  # fmt: skip
    assert torch.equal(moe.gate_proj.dequantize(), source["gate_proj"].dequantize())
    assert torch.equal(moe.up_proj.dequantize(), source["up_proj"].dequantize())
    assert torch.equal(gate_up.data[:, 256:], source["up_proj"].data)
    apart = SparseMoE(
        moe.router, source["gate_proj"], source["up_proj"], moe.down_proj, moe.top_k, True
    )
    x = torch.randn(2, 9, 256, generator=torch.Generator().manual_seed(3))
    assert torch.equal(moe(x), apart(x))
    assert torch.equal(moe.decode(x[:, :1]), apart.decode(x[:, :1]))
    n = model.config.num_hidden_layers
    experts = sum(
        ckpt.tensors[f"model.layers.{i}.mlp.experts.{p}.weight"].nbytes
        for i in range(n)
        for p in ("gate_proj", "up_proj", "down_proj")
    )
    counted = sum(
        w.nbytes for b in model.layers for w in (b.mlp.gate_proj, b.mlp.up_proj, b.mlp.down_proj)
    )
    assert counted == experts  # the views count their rows once; the fused stack is not counted


def test_gate_and_up_of_different_types_stay_apart() -> None:
    gen = torch.Generator().manual_seed(0)
    gate, up = (
        QuantizedTensor(quantize(w, t), t, w.shape)
        for w, t in (
            (torch.randn(4, 32, 256, generator=gen), Q.Q4_K),
            (torch.randn(4, 32, 256, generator=gen), Q.Q8_0),
        )  # fmt: skip
    )
    fused, parts = fuse_projections([gate, up])
    assert fused == () and parts == [gate, up]
    assert fuse_projections([gate, gate[0]])[0] == ()  # a stack and a matrix never fuse
    dense, (g, u) = fuse_projections([torch.randn(4, 32, 64), torch.randn(4, 16, 64)])
    assert dense[0].shape == (4, 48, 64) and (g.shape, u.shape) == ((4, 32, 64), (4, 16, 64))


# -- CUDA only: graph replay ---------------------------------------------------------------


@pytest.mark.parametrize("tokens", [1, 4])
@on_cuda
def test_fused_decode_replays_in_a_cuda_graph_with_new_routing(tokens: int) -> None:
    """The fused block captured once replays to the eager result for new inputs (new
    routing, read on the device), bf16, autotuned kernels, the norm's int8 activations."""
    from helexa.engine.models import decode_kernels
    from helexa.engine.quant.triton_kernels import quantize_rows

    moe = random_moe(dtype=torch.bfloat16, experts=16, top_k=4)
    x = torch.randn(tokens, 1, 256, device="cuda").bfloat16()

    def step() -> torch.Tensor:
        return moe.fused_decode(x, quantize_rows(x.view(tokens, 256)), decode_kernels)

    step()  # compile, tune and make the tickets outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for seed in range(4):
        x.copy_(torch.randn(tokens, 1, 256, device="cuda", generator=torch.Generator("cuda").manual_seed(seed)))  # fmt: skip
        graph.replay()
        want = step()
        assert torch.equal(out, want)
        assert rel_err(want, moe.decode(x)) < 3e-2


@on_cuda
def test_fused_moe_decode_step_matches_the_torch_step_on_cuda(moe_gguf: Path) -> None:
    """bf16 on CUDA through the real dispatch (step_kernels picks the kernels, the sparse
    block its fused path): logits against the torch step of a twin, several steps."""
    fused, plain = _twins(moe_gguf, "cuda", torch.bfloat16, 1)
    assert cuda_graph.step_kernels(fused) is not None
    prompt = torch.randint(0, 128, (1, 5), device="cuda")
    for model in (fused, plain):
        model.forward(prompt, torch.arange(5, device="cuda"))
    token = prompt[:, -1:]
    for pos in range(5, 12):
        step = torch.tensor([pos], device="cuda")
        got = cuda_graph.decode_step(fused, token, step, 64)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(cuda_graph, "step_kernels", lambda model: None)
            want = cuda_graph.decode_step(plain, token, step, 64)
        torch.testing.assert_close(got, want, atol=3e-2 * want.abs().max().item(), rtol=0)
        token = want[:, -1].argmax(-1, keepdim=True)


@pytest.mark.parametrize("gated", [True, False], ids=["gated", "plain"])
@pytest.mark.parametrize("dim", [16, 64], ids=["head16", "head64"])
@needs_kernels
def test_attention_rows_are_attention_as_o_proj_reads_it(dim: int, gated: bool) -> None:
    """The decode step's attention over the live keys (split-K, o_proj's int8 activations
    in the merge), and the hybrid models' gated one (times sigmoid(gate), also in the
    merge), against SDPA on the live prefix, in float16 (the int8 path); a head of 16 is
    not whole int8 blocks, so it gets none."""
    import torch.nn.functional as F

    from helexa.engine.models.decode_kernels import attention_rows
    from helexa.engine.quant.triton_kernels import quantize_rows

    gen = torch.Generator().manual_seed(dim)
    batch, heads, kv_heads, seq, length = 2, 4, 2, 96, 70
    dtype = torch.float16

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(DEVICE, dtype)

    q, k, v = (
        rand(batch, heads, 1, dim),
        rand(batch, kv_heads, seq, dim),
        rand(batch, kv_heads, seq, dim),
    )
    q_gate = rand(batch, 1, heads * 2 * dim)
    length_t = torch.tensor([length], device=DEVICE)
    y, quant = attention_rows(q, k, v, length_t, q_gate if gated else None, quantize=True)
    live = F.scaled_dot_product_attention(
        q.float(), k[:, :, :length].float(), v[:, :, :length].float(), enable_gqa=True
    )  # [B, H, 1, D]
    gate = q_gate.view(batch, heads, 2 * dim)[..., dim:].float()
    want = (live.squeeze(2) * (torch.sigmoid(gate) if gated else 1)).reshape(batch, 1, -1)
    torch.testing.assert_close(y.float(), want, atol=5e-3, rtol=5e-3)
    if dim % 32:
        assert quant is None
    else:
        assert quant is not None
        # the merge quantizes the very rows it wrote, as quantize_rows would read them
        for got, expected in zip(quant, quantize_rows(y.reshape(batch, -1)), strict=True):
            assert torch.equal(got, expected)
