"""The MoE prefill's grouped GEMM over quantized expert stacks (quant.expert_gemm)
against the torch reference: each run of rows times its dequantized expert.

The kernel tests run on CUDA (marked ``cuda``), or on the CPU with ``TRITON_INTERPRET=1``
in float32 and float16 (bfloat16 only compiled on CUDA); without either they skip. The
sm_90 compile checks need Triton but no GPU (and not the interpreter, which compiles
nothing); the dispatch rule and the CPU path need neither.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType

from helexa.engine.quant import ops
from helexa.engine.quant.expert_rows import rows_per_expert
from helexa.engine.quant.formats import block_format
from helexa.engine.quant.quantize import quantize
from helexa.engine.quant.tensor import QuantizedTensor
from tests.engine.kernel_device import DEVICE, HAS_TRITON, INTERPRET, needs_kernels
from tests.engine.quant.blocks import random_blocks

Q = GGMLQuantizationType
KERNEL_TYPES = [Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K]
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
# Uneven rows: an expert with none (first, middle and last), one with a single row, one
# over two 16-row tiles and not a multiple of any tile: 63 rows in all.
COUNTS = [0, 5, 0, 17, 1, 40, 0]


def on_cuda(test):  # type: ignore[no-untyped-def]
    ok = torch.cuda.is_available() and HAS_TRITON
    return pytest.mark.cuda(pytest.mark.skipif(not ok, reason="needs CUDA + Triton")(test))


def compiles(test):  # type: ignore[no-untyped-def]
    test = pytest.mark.skipif(not HAS_TRITON, reason="needs Triton (compiles ahead of time)")(test)
    return pytest.mark.skipif(INTERPRET, reason="the interpreter compiles nothing")(test)


def random_stack(qtype: Q, e: int, n: int, k: int, seed: int) -> QuantizedTensor:
    """An (E, N, K) stack of random blocks: every bit pattern a block can hold."""
    fmt = block_format(qtype)
    raw = torch.from_numpy(random_blocks(qtype, e * n * k // fmt.block_size, seed=seed))
    return QuantizedTensor(raw.reshape(e, n, -1).to(DEVICE or "cpu"), qtype, (e, n, k))


def realistic_stack(qtype: Q, e: int, n: int, k: int, seed: int) -> QuantizedTensor:
    """Quantized weights of a model's magnitude (std 1/sqrt(k)): a SiLU·mul of random
    blocks' outputs (~1e3 each) would overflow float16."""
    w = torch.randn(e, n, k, generator=torch.Generator().manual_seed(seed)) / k**0.5
    return QuantizedTensor(quantize(w, qtype), qtype, w.shape).to(DEVICE or "cpu")


def reference(x: torch.Tensor, experts: QuantizedTensor, counts: list[int]) -> torch.Tensor:
    """float64 on the CPU: each run of rows times its dequantized expert."""
    dense = experts.to("cpu").dequantize(torch.float64)
    runs = x.cpu().double().split(counts)
    return torch.cat([run @ dense[e].T for e, run in enumerate(runs)])


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    assert got.dtype != torch.float64 and not got.isnan().any()
    return float((got.cpu().double() - ref).norm() / ref.norm())


# The bound per activation dtype: float32 products summed in float32 (the interpreter's
# dot is numpy's), or each weight rounded once to x's 16-bit dtype (2**-11 / 2**-8
# relative, about that over a sum of random signs).
BOUND = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def configs() -> list[dict[str, Any]]:
    """Every launch config the wrapper can pick (each row tile, both MMA orientations)."""
    from helexa.engine.quant import expert_gemm as eg

    return [dict(cfg) for _, cfg in eg.CONFIGS] + [
        {**eg.CONFIGS[-1][1], **eg.Q6_K_GLU}
    ]  # fmt: skip


def config_id(cfg: dict[str, Any]) -> str:
    return f"m{cfg['BLOCK_M']}n{cfg['BLOCK_N']}{'-swap' if cfg['SWAP'] else ''}"


CONFIG_INDEX = range(4) if HAS_TRITON else range(0)


@pytest.mark.parametrize("which", CONFIG_INDEX)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("qtype", KERNEL_TYPES, ids=lambda q: q.name)
@needs_kernels
def test_expert_gemm_matches_the_reference(qtype: Q, dtype: torch.dtype, which: int) -> None:
    """Uneven counts (zeros, a single row, several tiles' worth), 96 columns (a column
    tile and a half) and two super-blocks a row, under each launch config."""
    from helexa.engine.quant.expert_gemm import expert_gemm

    cfg = configs()[which]
    w = random_stack(qtype, len(COUNTS), 96, 512, seed=int(qtype))
    scale = 1.0 if dtype == torch.float32 else 0.05  # random blocks' outputs fit float16
    gen = torch.Generator().manual_seed(which)
    x = (torch.randn(sum(COUNTS), 512, generator=gen) * scale).to(DEVICE, dtype)
    got = expert_gemm(x, w, COUNTS, config=cfg)
    assert got.dtype == dtype and got.shape == (sum(COUNTS), 96)
    assert rel_err(got, reference(x, w, COUNTS)) < BOUND[dtype], config_id(cfg)


@pytest.mark.parametrize("which", CONFIG_INDEX)
@needs_kernels
def test_counts_left_on_the_device_give_the_same_rows(which: int) -> None:
    """A MoE layer's bincount handed over as it is (no host sync): the tile map made on
    the device, padded with empty tiles the kernel skips, gives exactly what the
    host-built map gives, plain and fused gate/up, under each launch config."""
    from helexa.engine.quant.expert_gemm import expert_gemm

    cfg = configs()[which]
    w = random_stack(Q.Q4_K, len(COUNTS), 96, 512, seed=which)
    gen = torch.Generator().manual_seed(which)
    x = (torch.randn(sum(COUNTS), 512, generator=gen) * 0.05).to(DEVICE)
    counts = torch.tensor(COUNTS, device=DEVICE)
    want = expert_gemm(x, w, COUNTS, config=cfg)
    assert torch.equal(expert_gemm(x, w, counts, config=cfg), want), config_id(cfg)
    glu = expert_gemm(x, w, counts, glu=True, config=cfg)
    assert torch.equal(glu, expert_gemm(x, w, COUNTS, glu=True, config=cfg))


@pytest.mark.skipif(not HAS_TRITON, reason="needs Triton")
@pytest.mark.parametrize("block_m", [1, 16, 64])
def test_the_device_tile_map_is_the_host_one_padded_with_empty_tiles(block_m: int) -> None:
    """device_tiles' first rows are expert_tiles' map; the rest, up to cdiv(rows,
    block_m) + E (the most any counts of that many rows can need), start at their end."""
    from helexa.engine.quant.expert_gemm import device_tiles, expert_tiles

    for counts in (COUNTS, [0, 0, 0], [70, 0, 1, 0], [0, 0, 33]):
        rows = sum(counts)
        want = expert_tiles(counts, block_m, torch.device("cpu")).tolist()
        got = device_tiles(torch.tensor(counts), rows, block_m)
        assert got.dtype == torch.int32
        assert got.shape == (-(-rows // block_m) + len(counts), 3)
        assert got[: len(want)].tolist() == want, counts
        assert all(start >= end for _, start, end in got[len(want) :].tolist()), counts


def test_counts_on_the_device_are_read_as_an_estimate_without_a_sync() -> None:
    """rows_per_expert reads a list exactly (the experts with rows) and estimates device
    counts from their sum alone, as if as many experts as can have rows had them; both
    give the same dispatch for the same rows spread evenly."""
    assert rows_per_expert([0, 4, 0, 8]) == 6
    assert rows_per_expert(torch.tensor([0, 4, 0, 8]), 12) == 3
    assert rows_per_expert(torch.tensor([0, 2, 0, 0]), 2) == 1
    assert rows_per_expert(torch.zeros(4, dtype=torch.int64), 0) == 0
    with pytest.raises(ValueError, match="need their sum"):
        rows_per_expert(torch.tensor([1, 2]))
    limit = ops.EXPERT_GEMM_MAX_ROWS
    even = [limit + 1] * 4
    assert ops.prefer_expert_gemm(even) is ops.prefer_expert_gemm(torch.tensor(even), 4 * limit + 4)
    assert ops.prefer_expert_gemm(torch.tensor([limit] * 4), 4 * limit)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("qtype", KERNEL_TYPES, ids=lambda q: q.name)
@needs_kernels
def test_fused_gate_up_is_silu_gate_times_up(qtype: Q, dtype: torch.dtype) -> None:
    """A [gate | up] stack fused as the loader fuses it (ops.fuse_rows), with the config
    the wrapper picks: silu(gate) * up in one launch; and its gate half, a strided view
    of the fused blocks, read in place."""
    from helexa.engine.quant.expert_gemm import expert_gemm

    e, ffn, hidden = len(COUNTS), 48, 256
    gate, up = (realistic_stack(qtype, e, ffn, hidden, seed=s) for s in (1, 2))
    fusion = ops.fuse_rows([gate, up])
    assert fusion is not None
    fused, (gate_view, _) = fusion
    assert isinstance(fused, QuantizedTensor) and isinstance(gate_view, QuantizedTensor)
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(sum(COUNTS), hidden, generator=gen).to(DEVICE, dtype)
    g, u = reference(x, gate, COUNTS), reference(x, up, COUNTS)
    got = expert_gemm(x, fused, COUNTS, glu=True)
    assert got.shape == (sum(COUNTS), ffn)
    assert rel_err(got, F.silu(g) * u) < BOUND[dtype]
    assert rel_err(expert_gemm(x, gate_view, COUNTS), g) < BOUND[dtype]


@needs_kernels
def test_a_single_row_and_no_rows() -> None:
    """One expert of many with the only row; and no rows at all (no launch)."""
    from helexa.engine.quant.expert_gemm import expert_gemm

    w = random_stack(Q.Q4_K, 4, 64, 256, seed=3)
    x = torch.randn(1, 256, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    counts = [0, 0, 1, 0]
    assert rel_err(expert_gemm(x, w, counts), reference(x, w, counts)) < BOUND[torch.float32]
    empty = expert_gemm(x[:0], w, [0, 0, 0, 0], glu=True)
    assert empty.shape == (0, 32)


@needs_kernels
def test_prefill_through_the_kernel_matches_the_cpu_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """SparseMoE's prefill with ops dispatching to the kernel (forced where it would not
    run, the CPU under the interpreter) equals the torch path: fused gate/up with SiLU·mul
    in the epilogue, then down, over 24 tokens of 8 experts top-2."""
    from helexa.engine.models.qwen3 import fuse_projections
    from helexa.engine.models.qwen3_moe import SparseMoE
    from helexa.engine.quant import expert_gemm

    e, hidden, ffn = 8, 256, 256
    gate, up = (realistic_stack(Q.Q4_K, e, ffn, hidden, seed=s) for s in (4, 5))
    down = realistic_stack(Q.Q6_K, e, hidden, ffn, seed=6)
    router = torch.randn(e, hidden, generator=torch.Generator().manual_seed(8)).to(DEVICE)
    fused, (gate, up) = fuse_projections([gate, up])
    moe = SparseMoE(router, gate, up, down, 2, True, fused)
    x = torch.randn(24, hidden, generator=torch.Generator().manual_seed(9)).to(DEVICE)
    plain = SparseMoE(router, gate, up, down, 2, True)  # gate and up apart: no fused launch
    launches: list[bool] = []

    def kernel_for(x: torch.Tensor, experts: Any, counts: list[int]) -> Any:
        launches.append(True)
        return expert_gemm

    monkeypatch.setattr(ops, "_expert_gemm", kernel_for)
    got = moe(x)
    assert len(launches) == 2  # gate/up fused, down
    monkeypatch.undo()
    monkeypatch.setattr(ops, "_expert_gemm", lambda *args: None)
    want = plain(x)
    assert rel_err(got, want.double().cpu()) < 1e-5


@needs_kernels
def test_bad_shapes_are_refused() -> None:
    from helexa.engine.quant.expert_gemm import expert_gemm

    w = random_stack(Q.Q8_0, 3, 32, 64, seed=1)
    x = torch.zeros(4, 64, device=DEVICE)
    with pytest.raises(ValueError, match="counts must be 3"):
        expert_gemm(x, w, [1, 3])
    with pytest.raises(ValueError, match="adding up to 5"):
        expert_gemm(x, w, [1, 3, 1])
    with pytest.raises(ValueError, match="non-negative"):
        expert_gemm(x, w, [5, -1, 0])
    with pytest.raises(ValueError, match=r"x must be \(rows, 64\)"):
        expert_gemm(torch.zeros(4, 32, device=DEVICE), w, [1, 3, 0])
    with pytest.raises(ValueError, match="unit stride"):
        expert_gemm(torch.zeros(64, 4, device=DEVICE).T, w, [1, 3, 0])
    with pytest.raises(ValueError, match="bfloat16, float16 or float32"):
        expert_gemm(x.to(torch.float64), w, [1, 3, 0])
    with pytest.raises(ValueError, match="expert stack"):
        expert_gemm(x, w[0], [4])
    with pytest.raises(ValueError, match="even width"):
        expert_gemm(x, random_stack(Q.Q8_0, 3, 33, 64, seed=2), [1, 3, 0], glu=True)
    with pytest.raises(ValueError, match="no Triton kernel for Q5_0"):
        expert_gemm(x, random_stack(Q.Q5_0, 3, 32, 64, seed=3), [1, 3, 0])


@pytest.mark.skipif(not HAS_TRITON, reason="needs Triton")
def test_the_tile_map_covers_each_experts_rows_in_tiles() -> None:
    """One map row per M-tile: its expert, first row, and the end of the expert's rows;
    experts with no rows have no tiles."""
    from helexa.engine.quant.expert_gemm import expert_tiles

    tiles = expert_tiles(COUNTS, 16, torch.device("cpu"))
    assert tiles.dtype == torch.int32
    want = [(1, 0, 5), (3, 5, 22), (3, 21, 22), (4, 22, 23), (5, 23, 63), (5, 39, 63), (5, 55, 63)]
    assert [tuple(t) for t in tiles.tolist()] == want
    assert expert_tiles([0, 0], 16, torch.device("cpu")).shape == (0, 3)


@pytest.mark.skipif(not HAS_TRITON, reason="needs Triton")
def test_the_config_follows_rows_per_expert() -> None:
    """Row tiles as wide as the experts' average rows (the experts with none left out),
    the weights as the MMA's wide side below 64; Q6_K's fused gate/up narrower."""
    from helexa.engine.quant.expert_gemm import config_for

    assert config_for([0, 10, 0, 14], Q.Q4_K) == dict(
        BLOCK_M=16, BLOCK_N=128, SWAP=True, num_warps=8, num_stages=2
    )
    assert config_for([32, 20, 0], Q.Q4_K)["BLOCK_M"] == 32
    assert config_for([300, 2], Q.Q8_0)["BLOCK_M"] == 64
    assert not config_for([300, 2], Q.Q8_0)["SWAP"]
    assert config_for([10], Q.Q6_K, glu=True)["BLOCK_N"] == 32
    assert config_for([10], Q.Q6_K)["BLOCK_N"] == 128


@pytest.mark.skipif(not HAS_TRITON, reason="needs Triton")
def test_the_row_regimes_reach_every_launch_config_and_the_torch_path() -> None:
    """The rows the load's warm-up runs per expert stack (qwen3_moe.warm_up_experts) pick
    each of the kernel's launch configs and, past EXPERT_GEMM_MAX_ROWS, the dequantize +
    torch._grouped_mm path: a prompt can meet no kernel variant the load did not build."""
    from helexa.engine.quant import expert_gemm
    from helexa.engine.quant.expert_gemm import config_for

    regimes = ops.expert_row_regimes()
    kernel = [r for r in regimes if ops.prefer_expert_gemm([r, 0])]
    picked = {tuple(sorted(config_for([r, 0], Q.Q4_K).items())) for r in kernel}
    assert len(picked) == len(expert_gemm.CONFIGS)
    assert any(not ops.prefer_expert_gemm([r, 0]) for r in regimes)


def test_the_dispatch_rule_and_the_cpu_path() -> None:
    """The kernel is preferred up to EXPERT_GEMM_MAX_ROWS rows per expert with rows; CPU
    stacks never take it (the torch path is the reference)."""
    limit = ops.EXPERT_GEMM_MAX_ROWS
    assert ops.prefer_expert_gemm([0, limit, 0, limit])
    assert not ops.prefer_expert_gemm([0, limit + 1, 0, limit])
    w = QuantizedTensor(quantize(torch.randn(2, 32, 256), Q.Q4_K), Q.Q4_K, (2, 32, 256))
    assert ops._expert_gemm(torch.zeros(3, 256), w, [1, 2]) is None


@on_cuda
@pytest.mark.parametrize("rows", [4, 600], ids=["few-rows", "many-rows"])
def test_expert_linear_on_cuda_takes_the_kernel_for_few_rows(
    rows: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In bfloat16 on Hopper: few rows per expert run the kernel (no expert expanded),
    many the dequantize + torch._grouped_mm path; both match the reference."""
    expanded: list[tuple[int, int]] = []
    real = ops.dequantize_experts

    def spy(experts: Any, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
        expanded.append((start, stop))
        return real(experts, start, stop, dtype)

    monkeypatch.setattr(ops, "dequantize_experts", spy)
    w = realistic_stack(Q.Q4_K, 4, 64, 256, seed=1)
    counts = [rows, 0, rows, 1]
    x = torch.randn(sum(counts), 256, device="cuda", dtype=torch.bfloat16)
    got = ops.expert_linear(x, w, counts)
    assert rel_err(got, reference(x, w, counts)) < BOUND[torch.bfloat16]
    grouped_mm = ops._grouped_mm_ok(x)
    assert bool(expanded) == (grouped_mm and not ops.prefer_expert_gemm(counts))


def aligned(signature: dict[str, str], values: dict[str, int]) -> dict[Any, Any]:
    """The specialization a launch gets: torch's allocations 16-byte aligned, and every
    integer argument that is a multiple of 16 marked so (as Triton does per call)."""
    marked = [
        i
        for i, (name, kind) in enumerate(signature.items())
        if kind.startswith("*") or (kind == "i32" and values[name] % 16 == 0)
    ]
    return {(i,): [["tt.divisibility", 16]] for i in marked}


@compiles
@pytest.mark.parametrize("qtype", KERNEL_TYPES, ids=lambda q: q.name)
def test_the_expert_gemm_compiles_for_hopper(qtype: Q) -> None:
    """The interpreter accepts code the compiler may not: every config the wrapper picks,
    plain and fused gate/up, at a Qwen3-30B-A3B layer's shapes (gate/up 2 x 768 by 2048,
    down 2048 by 768), built to sm_90 machine code in bfloat16 (and float32's exact dot
    once), with tensor-core MMAs."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from helexa.engine.quant import expert_gemm as eg

    fn = eg._expert_gemm_kernel
    fmt = block_format(qtype)
    rows = [0, 40, 300]  # averages that pick each of CONFIGS' row tiles
    jobs = []
    for glu, n, k in [(True, 768, 2048), (False, 2048, 768)]:
        for avg in rows:
            jobs.append((glu, n, k, eg.config_for([avg, 0, avg], qtype, glu), "bf16"))
    jobs.append((False, 2048, 768, eg.config_for([8], qtype), "fp32"))
    for glu, n, k, cfg, dtype in jobs:
        unit, unit_bytes, g = eg.gemm_unit(qtype, k)
        row_bytes = k // fmt.block_size * fmt.type_size
        width = 2 * n if glu else n
        values = dict(N=n, stride_x=k, stride_w=row_bytes, stride_e=width * row_bytes, stride_y=n)
        kinds = {"x_ptr": f"*{dtype}", "w_ptr": "*u8", "y_ptr": f"*{dtype}", "tiles_ptr": "*i32"}
        kinds |= dict.fromkeys(values, "i32")
        options = {"num_warps": cfg.pop("num_warps"), "num_stages": cfg.pop("num_stages")}
        constants = dict(
            N_UNITS=k // unit, QTYPE=int(qtype), UNIT=unit, UNIT_BYTES=unit_bytes, G=g,
            GLU=glu, PRECISION="ieee" if dtype == "fp32" else None, **cfg,
        )  # fmt: skip
        signature = {name: kinds.get(name, "constexpr") for name in fn.arg_names}
        source = ASTSource(
            fn=fn, signature=signature, constexprs=constants, attrs=aligned(signature, values)
        )
        kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
        assert kernel.asm["cubin"], (glu, cfg, dtype)
        if dtype != "fp32":
            assert re.search(r"wgmma\.mma_async", kernel.asm["ptx"]), (glu, cfg)
