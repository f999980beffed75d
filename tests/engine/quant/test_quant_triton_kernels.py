"""Triton matvec/dequant kernels against the torch reference on random blocks.

Run on CUDA (marked ``cuda``); with ``TRITON_INTERPRET=1`` and Triton installed they also
run on the CPU through Triton's interpreter, which is how the kernels were debugged
without a GPU. CI has neither and skips them, except the dispatch checks at the end.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType

from helexa.engine.quant.formats import block_format
from helexa.engine.quant.ops import cuda_linear, grouped_linear, linear
from helexa.engine.quant.reference import dequantize
from helexa.engine.quant.tensor import QuantizedTensor
from tests.engine.kernel_device import DEVICE, HAS_TRITON, needs_kernels
from tests.engine.quant.blocks import random_blocks

Q = GGMLQuantizationType
KERNEL_TYPES = [Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K]


def random_weight(qtype: GGMLQuantizationType, n: int, k: int, seed: int) -> QuantizedTensor:
    fmt = block_format(qtype)
    raw = torch.from_numpy(random_blocks(qtype, n * k // fmt.block_size, seed=seed))
    return QuantizedTensor(raw.reshape(n, -1).to(DEVICE or "cpu"), qtype, (n, k))


def random_stack(qtype: GGMLQuantizationType, e: int, n: int, k: int, seed: int) -> QuantizedTensor:
    """An (E, N, K) stack of experts, as the GGUF loader keeps a MoE projection."""
    fmt = block_format(qtype)
    raw = torch.from_numpy(random_blocks(qtype, e * n * k // fmt.block_size, seed=seed))
    return QuantizedTensor(raw.reshape(e, n, -1).to(DEVICE or "cpu"), qtype, (e, n, k))


def grouped_reference(
    x: torch.Tensor, experts: QuantizedTensor, index: torch.Tensor
) -> torch.Tensor:
    """float64 on the CPU, row by row: row r times the dequantized expert index[r]."""
    dense = experts.to("cpu").dequantize(torch.float64)
    return torch.stack([x[r].double() @ dense[int(e)].T for r, e in enumerate(index.tolist())])


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    assert not got.isnan().any()
    return float((got.double() - ref).norm() / ref.norm())


@pytest.mark.parametrize("qtype", KERNEL_TYPES, ids=lambda q: q.name)
@pytest.mark.parametrize("k", [256, 768])
@needs_kernels
def test_dequantize_rows_is_exact(qtype: GGMLQuantizationType, k: int) -> None:
    from helexa.engine.quant.triton_kernels import dequantize_rows

    w = random_weight(qtype, 37, k, seed=k)  # 37: not a multiple of any row tile
    expected = dequantize(w.data, qtype, w.shape)
    assert torch.equal(dequantize_rows(w, dtype=torch.float32), expected)
    assert torch.equal(dequantize_rows(w, 5, 20, dtype=torch.float32), expected[5:20])
    # bf16 output: one rounding of the exact value (2**-8 relative when to nearest; Triton's
    # interpreter truncates instead, 2**-7).
    got = dequantize_rows(w, dtype=torch.bfloat16)
    bound = 2**-7 if DEVICE == "cpu" else 2**-8
    assert got.dtype == torch.bfloat16
    assert ((got.float() - expected).abs() <= expected.abs() * bound).all()


@pytest.mark.parametrize("qtype", KERNEL_TYPES, ids=lambda q: q.name)
@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize(
    ("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 1e-2), (torch.float16, 2e-3)]
)
@needs_kernels
def test_matvec_matches_float64(
    qtype: GGMLQuantizationType, rows: int, dtype: torch.dtype, tol: float
) -> None:
    from helexa.engine.quant.triton_kernels import matvec

    n, k = 45, 1024
    w = random_weight(qtype, n, k, seed=rows)
    x = (torch.randn(rows, k, device=DEVICE) / k).to(dtype)  # k-quant weights reach ~3000
    got = matvec(x, w)
    assert got.dtype == dtype and got.shape == (rows, n)
    ref = x.double() @ w.dequantize(torch.float64).T
    assert rel_err(got, ref) < tol, rel_err(got, ref)


def variant_id(c: dict) -> str:
    kind = "affine" if c.get("AFFINE") else f"defer{c['DEFER']}"
    return "{BLOCK_N}x{U}-{kind}".format(kind=kind, **c)


VARIANTS = [
    {"BLOCK_N": 2, "U": 8, "DEFER": False, "num_warps": 4},
    {"BLOCK_N": 2, "U": 8, "DEFER": True, "num_warps": 4},
    {"BLOCK_N": 4, "U": 4, "DEFER": True, "num_warps": 8},
    {"BLOCK_N": 1, "U": 16, "DEFER": True, "num_warps": 2},
    # the scale-factored kernel
    {"BLOCK_N": 2, "U": 8, "AFFINE": True, "num_warps": 4},
    {"BLOCK_N": 1, "U": 16, "AFFINE": True, "num_warps": 2},
    {"BLOCK_N": 4, "U": 4, "AFFINE": True, "num_warps": 8},
]


@pytest.mark.parametrize("qtype", KERNEL_TYPES, ids=lambda q: q.name)
@pytest.mark.parametrize(
    "config",
    VARIANTS,
    ids=variant_id,
)
@needs_kernels
def test_every_autotuned_variant_is_correct(qtype: GGMLQuantizationType, config: dict) -> None:
    """The autotuner may pick any config on a GPU: each must give the same sums, including
    unit counts that do not divide U (k = 1280: 5 super-blocks, 40 Q8_0 blocks)."""
    from helexa.engine.quant.triton_kernels import matvec

    w = random_weight(qtype, 13, 1280, seed=5)
    x = torch.randn(2, 1280, device=DEVICE) / 1280
    ref = x.double() @ w.dequantize(torch.float64).T
    assert rel_err(matvec(x, w, config=config), ref) < 1e-5


def quantized_activations(x: torch.Tensor) -> torch.Tensor:
    """x as the int8 matvec sees it (float64): each 32-element block rounded to 127 steps
    of its largest magnitude, halves away from zero (llama.cpp's q8_1). The steps are
    taken in float32, x * (127 / amax), as the quantizer takes them: in float64 a value
    within an ulp of a half rounds the other way now and then, one step off, which is
    ~1e-4 of a 1280-long dot product."""
    blocks = x.float().cpu().reshape(x.shape[0], -1, 32)
    amax = blocks.abs().amax(-1, keepdim=True)
    q = (blocks * torch.where(amax > 0, 127.0 / amax, 0.0)).double()
    return (q.sign() * (q.abs() + 0.5).floor() * (amax / 127.0).double()).reshape(x.shape)


@needs_kernels
def test_quantize_rows_rounds_each_block_to_int8() -> None:
    from helexa.engine.quant.triton_kernels import quantize_rows

    x = torch.randn(3, 1088, device=DEVICE)  # 34 blocks: not a multiple of 32 blocks
    x[1, 64:96] = 0  # a zero block: scale 0, no division by it
    x[2, 0] = 2.5 * x[2, 1:32].abs().max()  # an outlier sets its block's scale
    q, d, s = quantize_rows(x)
    assert (q.dtype, d.dtype, s.dtype) == (torch.int8, torch.float32, torch.float32)
    assert q.shape == x.shape and d.shape == (3, 34) and s.shape == (3, 68)
    back = (q.double().reshape(3, -1, 32) * d.double()[..., None]).reshape(x.shape)
    assert torch.allclose(back.cpu(), quantized_activations(x), rtol=0, atol=1e-6)
    assert (q[1, 64:96] == 0).all() and d[1, 2] == 0
    assert q[2, 0] == 127
    sums = q.double().reshape(3, -1, 16).sum(-1) * d.double().repeat_interleave(2, 1)
    assert torch.allclose(s.double(), sums, rtol=1e-6)


@pytest.mark.parametrize("width", [1024, 1248])  # 1248: not a power of two, 39 blocks
@needs_kernels
def test_decode_glue_quantizes_exactly_what_it_writes(width: int) -> None:
    """The decode step's add-RMSNorm and SiLU·mul kernels also write the int8 activations
    of their output, so the matvec after them skips a launch: bit for bit what quantizing
    that output alone gives. (float16: the interpreter garbles bf16 in these kernels.)"""
    from helexa.engine.models import decode_kernels as dk
    from helexa.engine.quant.triton_kernels import quantize_rows

    gen = torch.Generator().manual_seed(width)
    x, delta = (torch.randn(2, 1, width, generator=gen).to(DEVICE, torch.float16) for _ in "xd")
    weight = torch.randn(width, generator=gen).to(DEVICE, torch.float16)
    _, h, quant = dk.add_rms_norm(x, delta, weight, 1e-6, quantize=True)
    assert quant is not None
    for got, want in zip(quant, quantize_rows(h.view(2, width)), strict=True):
        assert torch.equal(got, want)
    gate_up = torch.randn(2, 1, 2 * width, generator=gen).to(DEVICE, torch.float16)
    out, quant = dk.silu_mul(gate_up, quantize=True)
    assert quant is not None
    for got, want in zip(quant, quantize_rows(out.view(2, width)), strict=True):
        assert torch.equal(got, want)
    assert dk.silu_mul(gate_up)[1] is None


@needs_kernels
def test_add_rms_norm_scales_a_float32_weight_before_rounding() -> None:
    """The hybrid models' zero-centred norm keeps 1 + w in float32 and scales before it
    rounds (qwen3_next.zc_rms_norm): the glue kernel given such a weight matches it,
    residual and int8 activations included, where rounding first would not."""
    from helexa.engine.models import decode_kernels as dk
    from helexa.engine.models.qwen3_next import zc_rms_norm
    from helexa.engine.quant.triton_kernels import quantize_rows

    gen = torch.Generator().manual_seed(3)
    x, delta = (torch.randn(2, 1, 1024, generator=gen).to(DEVICE, torch.float16) for _ in "xd")
    weight = (1 + 0.1 * torch.randn(1024, generator=gen)).to(DEVICE) * 300  # float32
    out, h, quant = dk.add_rms_norm(x, delta, weight, 1e-6, quantize=True)
    assert torch.equal(out, x + delta)
    want = zc_rms_norm(x + delta, weight, 1e-6)
    torch.testing.assert_close(h, want, atol=0, rtol=2e-3)
    rounded_first = (F.rms_norm((x + delta).float(), (1024,), eps=1e-6).half() * weight).half()
    assert (h != rounded_first).any(), "the weight is large enough for the order to show"
    assert quant is not None
    for got, expected in zip(quant, quantize_rows(h.view(2, 1024)), strict=True):
        assert torch.equal(got, expected)


INT8_VARIANTS = [
    {"BLOCK_N": 1, "U": 4, "INT8": True, "num_warps": 1},
    {"BLOCK_N": 2, "U": 8, "INT8": True, "num_warps": 2},
    {"BLOCK_N": 4, "U": 8, "INT8": True, "num_warps": 8},
]


@pytest.mark.parametrize("qtype", KERNEL_TYPES, ids=lambda q: q.name)
@pytest.mark.parametrize(
    "config", INT8_VARIANTS, ids=lambda c: "{BLOCK_N}x{U}w{num_warps}".format(**c)
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@needs_kernels
def test_int8_matvec_matches_the_quantized_reference(
    qtype: GGMLQuantizationType, config: dict, dtype: torch.dtype
) -> None:
    """Integer sums are exact: against float64 over the same int8 activations the only
    error is the float32 scaling (and bf16's output rounding); against the exact product,
    the 8-bit activations' ~1%. Unit counts that do not divide U (k = 1280)."""
    from helexa.engine.quant.triton_kernels import matvec

    w = random_weight(qtype, 13, 1280, seed=9)
    x = (torch.randn(3, 1280, generator=torch.Generator().manual_seed(9)) / 1280).to(DEVICE, dtype)
    dense = w.dequantize(torch.float64)
    got = matvec(x, w, config=config)
    assert got.dtype == dtype and got.shape == (3, 13)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert rel_err(got.cpu(), quantized_activations(x) @ dense.cpu().T) < tol
    assert rel_err(got, x.double() @ dense.T) < 3e-2


@pytest.mark.parametrize("qtype", KERNEL_TYPES, ids=lambda q: q.name)
@needs_kernels
def test_int8_grouped_matvec_reads_each_rows_expert(qtype: GGMLQuantizationType) -> None:
    from helexa.engine.quant.triton_kernels import grouped_matvec

    experts = random_stack(qtype, 5, 9, 768, seed=3)
    index = torch.tensor([4, 0, 4, 2, 1, 3])
    x = torch.randn(6, 768, generator=torch.Generator().manual_seed(6)) / 768
    config = INT8_VARIANTS[1]
    got = grouped_matvec(x.to(DEVICE), experts, index.to(DEVICE), config=config)
    ref = grouped_reference(quantized_activations(x), experts, index)
    assert rel_err(got.cpu(), ref) < 1e-5


@needs_kernels
def test_matvecs_of_one_input_quantize_it_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fused q/k/v split by block type (Q4_K q/k, Q6_K v) is two matvecs of one x: with
    the int8 kernel, one quantization of x serves both, and each gives what it would alone."""
    from helexa.engine.quant import triton_kernels as tk

    qk, v = random_weight(Q.Q4_K, 24, 512, seed=1), random_weight(Q.Q6_K, 8, 512, seed=2)
    x = torch.randn(1, 512, device=DEVICE, dtype=torch.bfloat16) / 512
    alone = [tk.matvec(x, w, config=INT8_VARIANTS[0]) for w in (qk, v)]
    calls = []
    real = tk.quantize_rows
    monkeypatch.setattr(tk, "quantize_rows", lambda t: calls.append(t) or real(t))
    monkeypatch.setattr(tk, "AUTOTUNE", False)
    monkeypatch.setattr(tk, "FIXED_CONFIG", INT8_VARIANTS[0])
    together = tk.linears(x[None], (qk, v))
    assert len(calls) == 1
    assert [t.shape for t in together] == [(1, 1, 24), (1, 1, 8)]
    for got, want in zip(together, alone, strict=True):
        assert torch.equal(got[0], want)


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_K], ids=lambda q: q.name)
@needs_kernels
def test_q8_0_and_short_rows(qtype: GGMLQuantizationType) -> None:
    """Q8_0 rows of 3 blocks (unit of one block) and a single-super-block k-quant row."""
    from helexa.engine.quant.triton_kernels import matvec

    k = 96 if qtype == Q.Q8_0 else 256
    w = random_weight(qtype, 7, k, seed=7)
    x = torch.randn(2, k, device=DEVICE)
    assert rel_err(matvec(x, w), x.double() @ w.dequantize(torch.float64).T) < 1e-5


@pytest.mark.parametrize("qtype", KERNEL_TYPES, ids=lambda q: q.name)
@needs_kernels
def test_linear_prefill_path_chunks_and_bias(
    qtype: GGMLQuantizationType, monkeypatch: pytest.MonkeyPatch
) -> None:
    from helexa.engine.quant import triton_kernels

    # Chunks of 16 rows, so the 40-row weight takes three dequantize + matmul steps.
    monkeypatch.setattr(triton_kernels, "DEQUANT_CHUNK_ELEMENTS", 16 * 512)
    w = random_weight(qtype, 40, 512, seed=11)
    x = torch.randn(2, 9, 512, device=DEVICE)
    bias = torch.randn(40, device=DEVICE)
    got = triton_kernels.linear(x, w, bias)
    assert got.shape == (2, 9, 40)
    ref = x.double() @ w.dequantize(torch.float64).T + bias.double()
    assert rel_err(got, ref) < 1e-5


@pytest.mark.cuda
@pytest.mark.skipif(DEVICE != "cuda", reason="needs CUDA + Triton (too big to interpret)")
def test_matvec_row_tiles_beyond_one_grid_axis() -> None:
    """An output dim with more row tiles than a CUDA grid's y/z axis holds (65535)."""
    from helexa.engine.quant.triton_kernels import matvec

    w = random_weight(Q.Q4_K, 600_001, 256, seed=4)
    x = torch.randn(2, 256, device=DEVICE)
    assert rel_err(matvec(x, w), x.double() @ w.dequantize(torch.float64).T) < 1e-5


# (R, E, N, K): one row; rows = tokens x top-k over more experts than rows; unit counts
# that do not divide U (K = 1280); a row tile past N (N = 13); Q8_0 with 3 blocks a row.
GROUPED_SHAPES = [(1, 4, 16, 256), (8, 16, 13, 768), (6, 3, 9, 1280)]


@pytest.mark.parametrize("qtype", KERNEL_TYPES, ids=lambda q: q.name)
@pytest.mark.parametrize("shape", GROUPED_SHAPES, ids=lambda s: "R{}E{}N{}K{}".format(*s))
@needs_kernels
def test_grouped_matvec_matches_picked_experts(
    qtype: GGMLQuantizationType, shape: tuple[int, int, int, int]
) -> None:
    from helexa.engine.quant.triton_kernels import grouped_matvec

    r, e, n, k = shape
    experts = random_stack(qtype, e, n, k, seed=r + e)
    gen = torch.Generator().manual_seed(r * e)
    # Repeated experts (pigeonhole for R > E, forced for R = 8), the last one included.
    index = torch.randint(0, e, (r,), generator=gen)
    index[-1] = e - 1
    if r > 2:
        index[1] = index[0]
    x = torch.randn(r, k, generator=gen) / k
    got = grouped_matvec(x.to(DEVICE), experts, index.to(DEVICE))
    assert got.shape == (r, n) and got.dtype == torch.float32
    ref = grouped_reference(x, experts, index)
    assert rel_err(got.cpu(), ref) < 1e-5, rel_err(got.cpu(), ref)


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_K, Q.Q6_K], ids=lambda q: q.name)
@pytest.mark.parametrize("config", VARIANTS, ids=variant_id)
@needs_kernels
def test_grouped_matvec_every_variant(qtype: GGMLQuantizationType, config: dict) -> None:
    """bf16 activations (the model's), int32 index, each config the autotuner may pick."""
    from helexa.engine.quant.triton_kernels import grouped_matvec

    experts = random_stack(qtype, 5, 11, 512, seed=3)
    index = torch.tensor([4, 0, 4, 2], dtype=torch.int32)
    x = (torch.randn(4, 512, generator=torch.Generator().manual_seed(1)) / 512).bfloat16()
    got = grouped_matvec(x.to(DEVICE), experts, index.to(DEVICE), config=config)
    assert got.dtype == torch.bfloat16
    assert rel_err(got.cpu(), grouped_reference(x, experts, index)) < 1e-2


@needs_kernels
def test_grouped_matvec_refuses_bad_index_and_shapes() -> None:
    from helexa.engine.quant.triton_kernels import grouped_matvec, matvec

    experts = random_stack(Q.Q4_K, 3, 4, 256, seed=0)
    x = torch.randn(2, 256, device=DEVICE)
    with pytest.raises(ValueError, match="one expert per row"):
        grouped_matvec(x, experts, torch.zeros(3, dtype=torch.long, device=DEVICE))
    with pytest.raises(ValueError, match="one expert per row"):
        grouped_matvec(x, experts, torch.zeros(2, device=DEVICE))
    with pytest.raises(ValueError, match="stack"):
        grouped_matvec(x, experts[0], torch.zeros(2, dtype=torch.long, device=DEVICE))
    with pytest.raises(ValueError, match="grouped_matvec"):
        matvec(x, experts)


@pytest.mark.cuda
@pytest.mark.skipif(DEVICE != "cuda", reason="needs CUDA + Triton")
def test_grouped_matvec_replays_in_a_cuda_graph_with_new_routing() -> None:
    """Captured once, replayed after the index tensor is overwritten in place: the kernel
    reads the routing on the device, as a captured MoE decode step needs."""
    from helexa.engine.quant.triton_kernels import grouped_matvec

    experts = random_stack(Q.Q4_K, 8, 64, 512, seed=9)
    x = torch.randn(4, 512, device="cuda") / 512
    index = torch.tensor([0, 1, 2, 3], device="cuda")
    grouped_matvec(x, experts, index)  # compile + tune outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = grouped_matvec(x, experts, index)
    for routing in ([7, 7, 0, 5], [3, 6, 1, 1]):
        index.copy_(torch.tensor(routing))
        graph.replay()
        ref = grouped_reference(x.cpu(), experts, index.cpu())
        assert rel_err(out.cpu(), ref) < 1e-5


@pytest.mark.cuda
@pytest.mark.skipif(not (torch.cuda.is_available() and HAS_TRITON), reason="needs CUDA + Triton")
@pytest.mark.parametrize("dense", [False, True], ids=["q4_k", "bf16"])
def test_grouped_linear_on_cuda_matches_the_cpu_reference(dense: bool) -> None:
    """quant.ops.grouped_linear: the CUDA path (kernel, or bmm for a dense stack) against
    the CPU one (gather + row-by-row expansion) on the same experts."""
    experts = random_stack(Q.Q4_K, 6, 32, 512, seed=2).to("cpu")
    weight: torch.Tensor | QuantizedTensor = experts.dequantize() if dense else experts
    index = torch.tensor([5, 1, 1, 0, 5])
    x = torch.randn(5, 512) / 512
    ref = grouped_linear(x, weight, index)
    on_gpu = weight.to("cuda")
    got = grouped_linear(x.cuda(), on_gpu, index.cuda())
    assert rel_err(got.cpu(), ref.double()) < 1e-5


@needs_kernels
def test_unsupported_type_is_refused() -> None:
    from helexa.engine.quant.triton_kernels import matvec

    w = random_weight(Q.Q5_0, 4, 64, seed=0)
    with pytest.raises(ValueError, match="no Triton kernel for Q5_0"):
        matvec(torch.randn(1, 64, device=DEVICE), w)


# -- dispatch: which path ``quant.ops.linear`` takes ----------------------------------------


def test_cpu_weights_stay_on_the_torch_path() -> None:
    w = random_weight(Q.Q4_K, 4, 256, seed=1).to("cpu")
    assert cuda_linear(torch.randn(1, 256), w, None) is None


@pytest.mark.cuda
@pytest.mark.skipif(not (torch.cuda.is_available() and HAS_TRITON), reason="needs CUDA + Triton")
def test_quant_linear_routes_cuda_weights_to_triton() -> None:
    w = random_weight(Q.Q6_K, 8, 512, seed=2)
    x = torch.randn(1, 512, device="cuda")
    assert cuda_linear(x, w, None) is not None
    assert cuda_linear(x, random_weight(Q.Q5_0, 8, 64, seed=2), None) is None
    ref = x.double() @ w.dequantize(torch.float64).T
    assert rel_err(linear(x, w), ref) < 1e-5


# The matvec kernels' arguments, by name, as a launch passes them.
_MATVEC_ARGS = {"x_ptr": "*bf16", "w_ptr": "*u8", "y_ptr": "*bf16", "idx_ptr": "*i64"}
_MATVEC_ARGS["wt_ptr"] = "*bf16"  # a MoE's router weights, summing a token's experts
_MATVEC_ARGS |= dict.fromkeys(("M", "N", "stride_x", "stride_w", "stride_y", "stride_e"), "i32")
# The integer kernel takes the quantized activations instead of x (and, compiled, its dp4a
# PTX, which the interpreter never sees).
_MATVEC_ARGS |= {"xq_ptr": "*i8", "xd_ptr": "*fp32", "xs_ptr": "*fp32"}


def _compile_for_hopper(
    fn: Any, constants: dict[str, Any], num_warps: int, aligned: bool = False
) -> Any:
    """A matvec kernel built to sm_90 machine code with Triton's ahead-of-time compiler.
    ``aligned``: the pointers and strides declared divisible by 16, as the JIT specialises
    them at a real launch; without it no load is vectorised and the layout is not the one
    that runs."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kinds = {**_MATVEC_ARGS, **dict.fromkeys(constants, "constexpr")}
    signature = {name: kinds[name] for name in fn.arg_names}
    attrs: dict[tuple[int], list[list[Any]]] = {}
    if aligned:  # the pointers and the strides
        for i, name in enumerate(fn.arg_names):
            if kinds[name].startswith("*") or name.startswith("stride"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn=fn, signature=signature, constexprs=constants, attrs=attrs)
    kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})  # fmt: skip
    assert kernel.asm["cubin"], constants
    return kernel


@pytest.mark.skipif(not HAS_TRITON, reason="needs Triton (compiles ahead of time, no GPU)")
@pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") == "1", reason="the interpreter compiles nothing"
)
@pytest.mark.parametrize("qtype", KERNEL_TYPES, ids=lambda q: q.name)
def test_the_autotune_space_compiles_for_hopper(qtype: GGMLQuantizationType) -> None:
    """The interpreter accepts code the compiler may not: every config the autotuner can
    pick on an H100/H200 must build to sm_90 machine code (checked on a CPU-only host)."""
    import triton

    from helexa.engine.quant import triton_kernels as tk

    unit, unit_bytes, g = tk._unit(qtype, 4096)
    spaces = [
        (tk._matvec_kernel, tk._MATVEC_CONFIGS, {}),
        (tk._matvec_affine_kernel, tk._AFFINE_CONFIGS, {}),
        (tk._matvec_int8_kernel, tk._INT8_CONFIGS, {"ASM": True}),
    ]
    # Every config as a plain and a grouped matvec; and as the MoE decode's two grouped
    # ones (a token's 8 experts reading its one x for gate/up, and down summing their
    # outputs by router weight), where a MoE step can run it: the tuned candidates
    # (_KERNELS) and the fixed config.
    one = dict(SHARE=1, SLOTS=1, WEIGHTED=False)
    moe = [{**one, "SHARE": 8}, dict(SHARE=1, SLOTS=8, WEIGHTED=True)]
    fixed = {k: v for k, v in tk.FIXED_CONFIG.items() if k != "num_warps"}
    tuned = [tk._UNTUNED[name] for name in tk._KERNELS]
    jobs = []
    for fn, configs, extra in spaces:
        layouts = [(False, one), (True, one)] + [(True, m) for m in moe if fn in tuned]
        jobs += [(fn, c, extra, grouped, layout) for c in configs for grouped, layout in layouts]
    plain_fixed = triton.Config(fixed, num_warps=tk.FIXED_CONFIG["num_warps"])
    jobs += [(tk._matvec_kernel, plain_fixed, {}, True, m) for m in moe]
    for fn, config, extra, grouped, layout in jobs:
        # PDL: as a Hopper launches it, waiting on the kernel before (quant.grid_dependency)
        constants = dict(N_UNITS=4096 // unit, GROUPED=grouped, QTYPE=int(qtype), UNIT=unit, UNIT_BYTES=unit_bytes, G=g, **layout, **config.kwargs, **extra, PDL=True)  # fmt: skip
        ptx = _compile_for_hopper(fn, constants, config.num_warps).asm["ptx"]
        assert "griddepcontrol.wait" in ptx and "griddepcontrol.launch_dependents" in ptx


@pytest.mark.skipif(not HAS_TRITON, reason="needs Triton (compiles ahead of time, no GPU)")
@pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") == "1", reason="the interpreter compiles nothing"
)
@pytest.mark.parametrize("config", [(2, 2, 1), (4, 1, 1)], ids=str)
@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q5_K, Q.Q6_K], ids=lambda q: q.name)
def test_the_int8_matvec_shuffles_nothing_in_its_loop(
    qtype: GGMLQuantizationType, config: tuple[int, int, int]
) -> None:
    """At two or four rows a warp (one tile row of 4 weight words a thread) each thread's
    activation words must arrive beside its weight words. Loaded once for all the rows,
    Triton spread them over the lanes and shuffled them, and the weights, into place every
    step: 27 shuffles a step, on the L1 pipe the kernel is bound by (stop 30). What may
    remain is the final sum over the warp's 32 lanes, log2(32) shuffles."""
    from helexa.engine.quant import triton_kernels as tk

    bn, u, warps = config
    unit, unit_bytes, g = tk._unit(qtype, 4096)
    one = dict(GROUPED=False, SHARE=1, SLOTS=1, WEIGHTED=False, ASM=True, PDL=True)
    constants = dict(N_UNITS=4096 // unit, QTYPE=int(qtype), UNIT=unit, UNIT_BYTES=unit_bytes, G=g, BLOCK_N=bn, U=u, **one)  # fmt: skip
    kernel = _compile_for_hopper(tk._matvec_int8_kernel, constants, warps, aligned=True)
    assert kernel.asm["ptx"].count("shfl.sync") <= 5


@pytest.mark.skipif(not HAS_TRITON, reason="needs Triton (compiles ahead of time, no GPU)")
@pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") == "1", reason="the interpreter compiles nothing"
)
@pytest.mark.parametrize("norm", [True, False], ids=["norm", "raw"])
def test_the_moe_decode_glue_compiles_for_hopper(norm: bool) -> None:
    """The MoE decode's own launches beside the matvecs, as they run on a Qwen3-30B-A3B
    (128 experts, top 8, hidden 2048, experts 768 wide): the one-launch router (its
    atomic ticket and barrier only exist compiled) and SiLU·mul over separate or fused
    gate/up rows, quantizing or not, built to sm_90 machine code."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from helexa.engine.models import decode_kernels as dk

    def build(fn: Any, kinds: dict[str, str], constants: dict[str, Any]) -> str:
        signature = {name: kinds.get(name, "constexpr") for name in fn.arg_names}
        source = ASTSource(fn=fn, signature=signature, constexprs={**constants, "PDL": True})
        kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
        assert kernel.asm["cubin"], (fn, constants)
        assert "griddepcontrol.wait" in kernel.asm["ptx"]
        return kernel.asm["ptx"]

    route = {"X": "*bf16", "Router": "*bf16", "Logits": "*fp32", "Tickets": "*i32"}
    route |= {"Weights": "*bf16", "Experts": "*i32", "H": "i32", "stride_x": "i32", "stride_r": "i32"}  # fmt: skip
    blocks = 128 // dk.ROUTE_EXPERTS
    ptx = build(dk._route_kernel, route, dict(E=128, E_TILE=128, TOP_K=8, K_TILE=8, NORM=norm, BLOCK_E=dk.ROUTE_EXPERTS, BLOCK_H=dk.ROUTE_COLUMNS, BLOCKS=blocks))  # fmt: skip
    # the router's weights are read before the wait, x after it
    assert ptx.index("ld.global") < ptx.index("griddepcontrol.wait")
    glue = {"Gate": "*bf16", "Up": "*bf16", "Out": "*bf16", "Q": "*i8", "D": "*fp32", "S": "*fp32"}
    glue |= dict.fromkeys(("width", "stride_gate", "stride_up"), "i32")
    build(dk._silu_mul_kernel, glue, dict(QUANT=norm, BLOCK=1024))


@pytest.mark.skipif(not HAS_TRITON, reason="needs Triton (compiles ahead of time, no GPU)")
@pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") == "1", reason="the interpreter compiles nothing"
)
@pytest.mark.parametrize("scale_fp32", [False, True], ids=["qwen3-norm", "zero-centred-norm"])
def test_the_add_rms_norm_glue_compiles_for_hopper(scale_fp32: bool) -> None:
    """Both orders of the glue's norm (round then scale; scale a float32 1 + w, then
    round) build to sm_90 machine code, quantizing included."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from helexa.engine.models import decode_kernels as dk

    fn = dk._add_rms_norm_kernel
    kinds = dict.fromkeys(("X", "Delta", "Out", "H"), "*bf16")
    kinds |= {"W": "*fp32" if scale_fp32 else "*bf16", "Q": "*i8", "D": "*fp32", "S": "*fp32"}
    kinds |= {"width": "i32", "eps": "fp32"}
    constants = dict(HAS_DELTA=True, QUANT=True, SCALE_FP32=scale_fp32, BLOCK=4096, PDL=True)
    signature = {name: kinds.get(name, "constexpr") for name in fn.arg_names}
    source = ASTSource(fn=fn, signature=signature, constexprs=constants)
    kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    assert kernel.asm["cubin"] and "griddepcontrol.wait" in kernel.asm["ptx"]


if HAS_TRITON:
    import triton
    import triton.language as tl

    from helexa.engine.quant.triton_kernels import (
        _i32_from_words,
        _k4_affine,
        _k4_header_affine,
    )

    @triton.jit
    def _words_probe(src_ptr, out_ptr):
        """The 4 int32s at byte offsets 2i, i < 32, of a buffer, read as the kernels read
        their 2-byte aligned blocks, in their 4-D tile shape: out [32, 4]."""
        i = tl.arange(0, 32)[None, None, :, None]
        at = out_ptr + 4 * i + tl.arange(0, 4)[None, None, None, :]
        tl.store(at, _i32_from_words(src_ptr + 2 * i))

    @triton.jit
    def _header_probe(w_ptr, out_ptr, stride_w, UNIT_BYTES: tl.constexpr, U: tl.constexpr):
        """Both readings of each (row, super-block)'s scales, 4 rows: out [2, 4, R, U, 8]."""
        rows = tl.arange(0, 4)[:, None, None, None]
        units = tl.arange(0, U)[None, :, None, None]
        blk = w_ptr + rows * stride_w + units * UNIT_BYTES  # [4, U, 1, 1]
        r = tl.arange(0, 8)[None, None, :, None]
        at = out_ptr + (rows * U + units) * 8 + r  # [4, U, 8, 1]
        n = 4 * U * 8
        f0, f1, f2, f3 = _k4_affine(blk, r // 2)
        h0, h1, h2, h3 = _k4_header_affine(blk, r // 2)
        tl.store(at, f0)
        tl.store(at + n, f1)
        tl.store(at + 2 * n, f2)
        tl.store(at + 3 * n, f3)
        tl.store(at + 4 * n, h0)
        tl.store(at + 5 * n, h1)
        tl.store(at + 6 * n, h2)
        tl.store(at + 7 * n, h3)


@needs_kernels
def test_words_read_through_aligned_loads_equal_the_bytes() -> None:
    """_i32_from_words (Q8_0's and Q6_K's reading: aligned 4-byte words, shifted where the
    pointer sits 2 bytes past one) gives the little-endian int32s at every 2-byte offset,
    as torch's view of the same bytes does, on the 4-byte aligned and the misaligned
    offsets alike."""
    gen = torch.Generator().manual_seed(5)
    raw = torch.randint(0, 256, (96,), dtype=torch.uint8, generator=gen)
    out = torch.zeros(32, 4, dtype=torch.int32, device=DEVICE)
    _words_probe[(1,)](raw.to(DEVICE), out)
    want = torch.stack([raw[2 * i : 2 * i + 16].clone().view(torch.int32) for i in range(32)])
    assert torch.equal(out.cpu(), want)


@needs_kernels
@pytest.mark.parametrize("qtype", [GGMLQuantizationType.Q4_K, GGMLQuantizationType.Q5_K])
def test_the_one_load_k4_header_reads_what_the_field_loads_read(
    qtype: GGMLQuantizationType,
) -> None:
    """_k4_header_affine (the integer matvec's reading: d, dmin and the 12 scale bytes in
    one 16-byte load) gives every sub-block's d * scale and -dmin * min exactly as
    _k4_affine's field-by-field loads, on random blocks (every 6-bit packing case)."""
    units = 4
    w = random_weight(qtype, 4, 256 * units, seed=21)
    out = torch.empty(2, 4, 4, units, 8, dtype=torch.float32, device=w.data.device)
    fmt = block_format(qtype)
    _header_probe[(1,)](w.data, out, w.data.stride(0), UNIT_BYTES=fmt.type_size, U=units)
    fields, header = out[0], out[1]
    assert torch.isfinite(fields).all() and fields.abs().sum() > 0
    assert torch.equal(header, fields)
