"""``linear`` and ``embedding`` over weights that may be quantized: the one place that
picks how a quantized matmul runs.

On CUDA a block type with a Triton kernel goes straight to it; everywhere else the weight
is expanded by the torch reference (helexa.engine.quant.reference) a slice of rows at a
time and never kept dense, so a quantized model costs about its file size in memory. The
kernels are imported on first use, so this module imports on machines without Triton: a
failed import means "use torch". The model code calls these, so the kernels slot in
without changing callers. A MoE prefill's expert stacks go to one grouped GEMM launch
that reads their blocks in place (helexa.engine.quant.expert_gemm, see expert_linear).

Triton compiles each kernel variant on its first launch and the matvec autotunes per
shape: seconds per model that a restart would pay again. Both are kept on disk, under
helexa's cache dir (``<user cache>/helexa/triton``) unless ``TRITON_CACHE_DIR`` says
where, so a warm restart loads them instead.
"""

from __future__ import annotations

import importlib.util
import os
from types import ModuleType
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from helexa.engine.quant.expert_rows import Counts, rows_per_expert
from helexa.engine.quant.reference import dequantize
from helexa.engine.quant.tensor import Int8Rows, QuantizedTensor

if TYPE_CHECKING:
    from gguf import GGMLQuantizationType

    from helexa.engine.checkpoint.types import Weight

# Weights expanded per step of ``linear``: 4M float32 = 16 MiB of scratch, big enough
# for efficient matmuls, small enough not to matter next to the weights themselves.
CHUNK_ELEMENTS = 1 << 22

_kernels: ModuleType | None = None
_available = importlib.util.find_spec("triton") is not None


def triton_cache_dir() -> str:
    """Where Triton keeps compiled kernels and autotune results: ``TRITON_CACHE_DIR`` as
    the user set it, else helexa's cache dir, set for Triton (it reads the variable when
    it compiles, so setting it before the first compile is enough)."""
    if not os.environ.get("TRITON_CACHE_DIR"):
        from helexa.config import cache_dir

        os.environ["TRITON_CACHE_DIR"] = str(cache_dir() / "triton")
    return os.environ["TRITON_CACHE_DIR"]


def kernels() -> ModuleType | None:
    """helexa.engine.quant.triton_kernels, or None where Triton cannot be imported."""
    global _kernels, _available
    if _kernels is None and _available:
        triton_cache_dir()
        try:
            from helexa.engine.quant import triton_kernels
        except ImportError:
            _available = False
        else:
            _kernels = triton_kernels
    return _kernels


def cuda_linear(
    x: torch.Tensor,
    weight: QuantizedTensor,
    bias: torch.Tensor | None,
    quantized: Int8Rows | None = None,
) -> torch.Tensor | None:
    """``x @ W.T + bias`` through a Triton kernel, or None when none applies (not on
    CUDA, no Triton, or a block type without a kernel)."""
    if not weight.data.is_cuda:
        return None
    k = kernels()
    if k is None or weight.qtype not in k.SUPPORTED:
        return None
    return k.linear(x, weight, bias, quantized)


def linear(
    x: torch.Tensor,
    weight: torch.Tensor | QuantizedTensor,
    bias: torch.Tensor | None = None,
    *,
    chunk_rows: int | None = None,
    quantized: Int8Rows | None = None,
) -> torch.Tensor:
    """``x @ weight.T + bias`` where ``weight`` (out, in) may be quantized.

    A quantized weight is expanded ``chunk_rows`` output rows at a time (default: about
    :data:`CHUNK_ELEMENTS` weights) in ``x.dtype`` and discarded after use. On CUDA with
    Triton the blocks go straight to a kernel instead (:func:`cuda_linear`), which takes
    x's int8 activations as ``quantized`` where the decode step's glue made them.
    """
    if isinstance(weight, torch.Tensor):
        return F.linear(x, weight, bias)
    if len(weight.shape) != 2:
        raise ValueError(f"linear needs one (out, in) weight, got a stack {weight.shape}")
    fast = cuda_linear(x, weight, bias, quantized)
    if fast is not None:
        return fast
    out_features, in_features = weight.shape
    if x.shape[-1] != in_features:
        raise ValueError(f"linear: input has {x.shape[-1]} features, weight expects {in_features}")
    step = chunk_rows or max(1, CHUNK_ELEMENTS // in_features)
    out = x.new_empty(*x.shape[:-1], out_features)
    for start in range(0, out_features, step):
        rows = weight.data[start : start + step]
        w = dequantize(rows, weight.qtype, (rows.shape[0], in_features), dtype=x.dtype)
        out[..., start : start + rows.shape[0]] = x @ w.T
    if bias is not None:
        out += bias
    return out


def linears(
    x: torch.Tensor,
    weights: tuple[torch.Tensor | QuantizedTensor, ...],
    quantized: Int8Rows | None = None,
) -> list[torch.Tensor]:
    """``[linear(x, w) for w in weights]``, for weights that share an input (a fused q/k/v
    split by block type): on CUDA the kernels quantize x once for all of them."""
    k = (
        kernels()
        if all(isinstance(w, QuantizedTensor) and w.data.is_cuda for w in weights)
        else None
    )
    if k is None or not weights or any(w.qtype not in k.SUPPORTED for w in weights):  # type: ignore[union-attr]
        return [linear(x, w) for w in weights]
    return k.linears(x, weights, quantized)


def has_kernel(weight: torch.Tensor | QuantizedTensor) -> bool:
    """Whether the Triton matvecs read ``weight``'s blocks (quantized, a type they have a
    kernel for), wherever it is: on CUDA, or on the CPU under Triton's interpreter (which
    is how the kernels are tested without a GPU)."""
    if not isinstance(weight, QuantizedTensor):
        return False
    k = kernels()
    return k is not None and weight.qtype in k.SUPPORTED


def has_grouped_kernel(experts: torch.Tensor | QuantizedTensor) -> bool:
    """Whether :func:`grouped_linear` runs ``experts`` as one grouped matvec launch that
    reads the picked experts in place (quantized, on CUDA, a type Triton has a kernel
    for); elsewhere it gathers or expands the picked experts, a copy per row."""
    return isinstance(experts, QuantizedTensor) and experts.data.is_cuda and has_kernel(experts)


def grouped_linear(
    x: torch.Tensor, experts: torch.Tensor | QuantizedTensor, index: torch.Tensor
) -> torch.Tensor:
    """Row ``r`` of ``x`` (R, in) times expert ``index[r]`` of the stack ``experts``
    (E, out, in): (R, out). A MoE decode step's every (token, routed expert) pair.

    Routing stays on the device (no host sync, no branch on which experts were picked),
    so a step calling this is CUDA-graph capturable. On CUDA with Triton, quantized
    experts go to one grouped matvec launch that reads only the picked experts' blocks
    in place; on the CPU (the reference) each picked expert is expanded once for its
    rows; on CUDA without a kernel the picked experts are gathered and expanded row by
    row, still with no sync.
    """
    if isinstance(experts, torch.Tensor):
        picked = experts.index_select(0, index)  # (R, out, in)
        return torch.bmm(x[:, None, :], picked.transpose(1, 2)).squeeze(1)
    if len(experts.shape) != 3:
        raise ValueError(f"grouped_linear needs an (E, out, in) stack, got {experts.shape}")
    if has_grouped_kernel(experts):
        x2 = x if x.stride(-1) == 1 else x.contiguous()
        return kernels().grouped_matvec(x2, experts, index)  # type: ignore[union-attr]
    if not experts.data.is_cuda:  # each picked expert expanded once; a sync costs nothing here
        out = x.new_empty(x.shape[0], experts.shape[1])
        for e in index.unique().tolist():
            rows = (index == e).nonzero().squeeze(1)
            out[rows] = linear(x.index_select(0, rows), experts[e])
        return out
    # CUDA without a kernel for this block type: gathered on the device, no host sync.
    picked_q = experts.index_select(index)
    return torch.cat([linear(x[j : j + 1], picked_q[j]) for j in range(index.shape[0])])


def expert_linear(
    x: torch.Tensor, experts: torch.Tensor | QuantizedTensor, counts: Counts
) -> torch.Tensor:
    """Rows of ``x`` (R, in) sorted by expert, ``counts[e]`` of them for expert ``e`` of
    the stack ``experts`` (E, out, in): each run of rows times its expert, (R, out). A MoE
    prefill's (token, expert) pairs.

    On CUDA, quantized experts of a type with a kernel go to one grouped GEMM launch that
    reads their blocks in place (quant.expert_gemm), unless torch's grouped GEMM applies
    and the experts have many rows each (:func:`prefer_expert_gemm`). Where torch has a
    grouped GEMM for ``x``'s dtype and device (``torch._grouped_mm``: CUTLASS on Hopper in
    bfloat16, a loop on the CPU), it runs once per chunk of experts whose dense weights
    fit the scratch budget, each expert of the chunk expanded once; nothing depends on how
    many rows an expert has, so no shape a request brings is new to a kernel (a
    per-expert matmul would tune or compile per row count). Elsewhere one ``linear`` per
    expert with rows. Counts on the device go to the kernel as they are (no host sync);
    the other paths read them.
    """
    n_experts, out_features, in_features = experts.shape
    gemm = _expert_gemm(x, experts, counts)
    if gemm is not None:
        return gemm.expert_gemm(x if x.stride(-1) == 1 else x.contiguous(), experts, counts)  # type: ignore[no-any-return]
    counts = _host_counts(counts)
    if x.shape != (sum(counts), in_features) or len(counts) != n_experts:
        raise ValueError(
            f"expert_linear: x {tuple(x.shape)} and {len(counts)} counts do not fit "
            f"experts {tuple(experts.shape)}"
        )
    out = x.new_empty(x.shape[0], out_features)
    per_chunk = max(1, _scratch_elements(x) // (out_features * in_features))
    starts = [0]
    for c in counts:
        starts.append(starts[-1] + c)
    for e0 in range(0, n_experts, per_chunk):
        e1 = min(n_experts, e0 + per_chunk)
        while e0 < e1 and counts[e0] == 0:  # experts no token chose cost nothing
            e0 += 1
        while e1 > e0 and counts[e1 - 1] == 0:
            e1 -= 1
        if e0 == e1:
            continue
        rows = slice(starts[e0], starts[e1])
        if _grouped_mm_ok(x):
            w = dequantize_experts(experts, e0, e1, x.dtype)  # (chunk, out, in)
            offs = torch.tensor(starts[e0 + 1 : e1 + 1], dtype=torch.int32) - starts[e0]
            try:
                out[rows] = torch._grouped_mm(x[rows], w.transpose(-2, -1), offs=offs.to(x.device))
                continue
            except RuntimeError:  # this build, dtype or GPU has no grouped GEMM after all
                _no_grouped_mm.add((x.device.type, x.dtype))
        for e in range(e0, e1):
            if counts[e]:
                part = slice(starts[e], starts[e + 1])
                out[part] = linear(x[part], experts[e])
    return out


def expert_swiglu(
    x: torch.Tensor,
    gate: torch.Tensor | QuantizedTensor,
    up: torch.Tensor | QuantizedTensor,
    counts: Counts,
    fused: torch.Tensor | QuantizedTensor | None = None,
) -> torch.Tensor:
    """``silu(x @ gate_e.T) * (x @ up_e.T)`` for each run of rows, as :func:`expert_linear`
    runs them: a MoE prefill's SwiGLU experts up to down_proj. ``fused``: gate and up as
    one [gate | up] stack (E, 2 * ffn, in), as the loader fuses them where their block
    types agree; where the grouped GEMM kernel takes it, one launch computes both from
    one read of x and applies SiLU·mul in float32 before rounding, else gate and up run
    one after the other."""
    gemm = _expert_gemm(x, fused, counts) if isinstance(fused, QuantizedTensor) else None
    if gemm is not None and isinstance(fused, QuantizedTensor):
        if fused.shape[1] != 2 * gate.shape[1]:
            raise ValueError(
                f"expert_swiglu: a fused stack {fused.shape} is not [gate | up] for gate "
                f"{tuple(gate.shape)}"
            )
        x2 = x if x.stride(-1) == 1 else x.contiguous()
        return gemm.expert_gemm(x2, fused, counts, glu=True)  # type: ignore[no-any-return]
    counts = _host_counts(counts)  # read once for both
    h = F.silu(expert_linear(x, gate, counts))
    h *= expert_linear(x, up, counts)
    return h


# Up to this many rows per expert (averaged over the experts with rows), expert_linear
# takes the grouped GEMM kernel even where torch's grouped GEMM runs (bfloat16 on
# Hopper); past it, dequantize + torch._grouped_mm. The kernel reads each expert's blocks
# once per tile of rows but does the arithmetic slower than CUTLASS; the other way
# expands every expert of the stack to bf16 whatever its rows (a fixed ~2.2-2.7 ms a
# 30B-A3B layer on an H200). Measured there (bench/moe_prefill.py): the kernel takes 0.81
# ms at 4 rows an expert, 1.13 at 32, 2.94 at 128 (torch 2.62), 5.20 at 256 (torch
# 2.69), so they break even near 100 rows.
EXPERT_GEMM_MAX_ROWS = 96


def expert_row_regimes() -> tuple[int, ...]:
    """Rows for one expert that reach each way :func:`expert_linear` runs a quantized
    stack on CUDA: each launch config of the grouped GEMM kernel (expert_gemm.CONFIGS,
    picked by rows per expert) and, past :data:`EXPERT_GEMM_MAX_ROWS`, dequantize +
    torch's grouped GEMM. The load's warm-up runs each once, so that no prompt compiles
    a kernel (qwen3_moe.warm_up_experts): its own prompts reach only one of them."""
    from helexa.engine.quant import expert_gemm

    bounds = [int(bound) for bound, _ in expert_gemm.CONFIGS if bound != float("inf")]
    return tuple(sorted({*bounds, max(bounds) + 1, EXPERT_GEMM_MAX_ROWS + 1}))


def prefer_expert_gemm(counts: Counts, rows: int | None = None) -> bool:
    """Whether the grouped GEMM kernel beats dequantize + torch._grouped_mm for experts
    with ``counts`` rows (see :data:`EXPERT_GEMM_MAX_ROWS` and :func:`rows_per_expert`)."""
    return rows_per_expert(counts, rows) <= EXPERT_GEMM_MAX_ROWS


def _host_counts(counts: Counts) -> list[int]:
    """``counts`` as a list: for a device tensor, a host sync."""
    return counts.tolist() if isinstance(counts, torch.Tensor) else counts


def _expert_gemm(
    x: torch.Tensor, experts: torch.Tensor | QuantizedTensor, counts: Counts
) -> ModuleType | None:
    """helexa.engine.quant.expert_gemm where it runs ``x`` by ``experts``: quantized, on
    CUDA, a block type and dtype it has, and torch's grouped GEMM either unavailable (any
    other dtype or GPU: the per-expert fallback is slower still) or not preferred for
    these counts. None elsewhere, the CPU included (its path is the reference)."""
    if not isinstance(experts, QuantizedTensor) or not experts.data.is_cuda:
        return None
    k = kernels()
    if k is None or experts.qtype not in k.SUPPORTED:
        return None
    from helexa.engine.quant import expert_gemm

    if x.dtype not in expert_gemm.DTYPES:
        return None
    prefer = prefer_expert_gemm(counts, x.shape[0])
    return expert_gemm if not _grouped_mm_ok(x) or prefer else None


# (device type, dtype) pairs torch._grouped_mm refused once: not tried again.
_no_grouped_mm: set[tuple[str, torch.dtype]] = set()


def _grouped_mm_ok(x: torch.Tensor) -> bool:
    """Whether to try torch._grouped_mm for ``x``: on CUDA it is CUTLASS's for bfloat16
    on Hopper and later (other GPUs and dtypes take the per-expert loop)."""
    if not hasattr(torch, "_grouped_mm") or (x.device.type, x.dtype) in _no_grouped_mm:
        return False
    if x.device.type != "cuda":
        return True
    return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (9, 0)


def _scratch_elements(x: torch.Tensor) -> int:
    """Dense weights expanded at once: the Triton dequant's chunk on CUDA (bigger chunks
    feed the GEMM better), :data:`CHUNK_ELEMENTS` elsewhere."""
    k = kernels() if x.is_cuda else None
    return k.DEQUANT_CHUNK_ELEMENTS if k is not None else CHUNK_ELEMENTS  # type: ignore[no-any-return]


def dequantize_experts(
    experts: torch.Tensor | QuantizedTensor, start: int, stop: int, dtype: torch.dtype
) -> torch.Tensor:
    """Experts ``start:stop`` of a stack as one dense (stop - start, out, in) tensor of
    ``dtype``: on CUDA by the Triton dequant kernel, one launch for all of them."""
    if isinstance(experts, torch.Tensor):
        return experts[start:stop].to(dtype)
    _, out_features, in_features = experts.shape
    count = stop - start
    data = experts.data[start:stop].reshape(count * out_features, -1)
    return _dense_rows(data, experts.qtype, in_features, dtype).view(count, out_features, -1)


def _dense_rows(
    data: torch.Tensor, qtype: GGMLQuantizationType, in_features: int, dtype: torch.dtype
) -> torch.Tensor:
    """Quantized rows ``data`` (rows, row_bytes) as a dense (rows, in_features) tensor: on
    CUDA by the Triton dequant kernel in one launch, elsewhere by the reference."""
    k = kernels() if data.is_cuda else None
    if k is None or qtype not in k.SUPPORTED:
        return dequantize(data, qtype, (data.shape[0], in_features), dtype=dtype)
    flat = QuantizedTensor(data, qtype, (data.shape[0], in_features))
    return k.dequantize_rows(flat, dtype=dtype)


def embedding(
    ids: torch.Tensor,
    weight: torch.Tensor | QuantizedTensor,
    *,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Rows ``ids`` of an embedding table; a quantized table expands only those rows.

    ``dtype`` defaults to the table's dtype (float32 for a quantized one).
    """
    if isinstance(weight, torch.Tensor):
        out = F.embedding(ids, weight)
        return out if dtype is None else out.to(dtype)
    rows = weight.data.index_select(0, ids.reshape(-1))
    dense = _dense_rows(rows, weight.qtype, weight.shape[1], dtype or torch.float32)
    return dense.view(*ids.shape, weight.shape[1])


def fuse_rows(weights: list[Weight]) -> tuple[Weight, list[Weight]] | None:
    """One (sum of outs, in) weight holding ``weights``' rows in order, and each weight
    again as a view of its rows in it (so the fused one costs no extra memory); None
    unless they share an encoding (one block type, or one dtype) and an input width.
    Stacks of experts (E, out, in) fuse the same way, expert by expert: (E, sum of outs,
    in), as long as they have as many experts.

    A decode step's matvec reads a weight once per launch; projections of the same input
    (q/k/v, gate/up) fused into one launch read the input once and fill the GPU better
    than three small launches, while the prefill keeps using the parts."""
    first = weights[0]

    def same_layout(w: Weight) -> bool:
        return w.shape[:-2] == first.shape[:-2] and w.shape[-1] == first.shape[-1]

    if isinstance(first, QuantizedTensor):
        if not all(
            isinstance(w, QuantizedTensor) and w.qtype == first.qtype and same_layout(w)
            for w in weights
        ):
            return None
        data = torch.cat([w.data for w in weights], dim=-2)
        shape = (*first.shape[:-2], data.shape[-2], first.shape[-1])
        fused_q = QuantizedTensor(data, first.qtype, shape)
        parts: list[Weight] = []
        start = 0
        for w in weights:
            rows = w.shape[-2]
            parts.append(QuantizedTensor(data.narrow(-2, start, rows), w.qtype, w.shape))
            start += rows
        return fused_q, parts
    if not all(
        isinstance(w, torch.Tensor) and w.dtype == first.dtype and same_layout(w) for w in weights
    ):
        return None
    fused = torch.cat(weights, dim=-2)  # type: ignore[arg-type]
    return fused, list(fused.split([w.shape[-2] for w in weights], dim=-2))
