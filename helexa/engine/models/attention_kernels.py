"""Split-K ("flash-decoding") attention for a decode step, in Triton.

One query token per sequence attends to the live prefix of a static KV cache. Read as one
matmul per head, that is a few long dot products: a handful of SMs would do all the work
while the rest idle, so the keys are cut into ``SPLITS`` slices, every (sequence, KV head,
slice) is a program that runs an online softmax over its slice for all the query heads
sharing that KV head (GQA), and a second kernel merges the slices by their log-sum-exp.

The live length is read from device memory (the step's position + 1), never from the
host: the grid is fixed by the cache's shape, so one CUDA graph serves every position,
and each program stops at the live length, so a step reads the keys it attends to and no
padding. Scores, softmax and the accumulator are float32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_N = 64
# Query rows of one program's tile: tl.dot needs at least 16; GQA groups are 1-16 heads.
MIN_GROUP_TILE = 16


@triton.jit
def _split_kernel(
    Q,  # [B, Hq, D]
    K,  # [B, Hkv, S, D], last dim contiguous
    V,
    Length,  # [1] int64: keys 0..Length-1 are live
    Part,  # [B, Hq, SPLITS, D] float32
    Lse,  # [B, Hq, SPLITS] float32
    stride_qb,
    stride_qh,
    stride_kb,
    stride_kh,
    stride_ks,
    stride_vb,
    stride_vh,
    stride_vs,
    kv_heads,
    scale,
    GROUP: tl.constexpr,
    GROUP_TILE: tl.constexpr,
    D: tl.constexpr,
    BLOCK: tl.constexpr,
    SPLITS: tl.constexpr,
    PRECISION: tl.constexpr,
):
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // kv_heads
    h = bh % kv_heads
    length = tl.load(Length).to(tl.int32)
    per_split = tl.cdiv(tl.cdiv(length, SPLITS), BLOCK) * BLOCK
    start = split * per_split
    end = tl.minimum(start + per_split, length)

    g = tl.arange(0, GROUP_TILE)
    d = tl.arange(0, D)
    heads = h * GROUP + g  # the query heads of KV head h
    live = g < GROUP
    q = tl.load(
        Q + b * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=live[:, None], other=0.0
    )

    m = tl.full([GROUP_TILE], float("-inf"), tl.float32)
    denom = tl.zeros([GROUP_TILE], tl.float32)
    acc = tl.zeros([GROUP_TILE, D], tl.float32)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    for n in range(start, end, BLOCK):
        keys = n + tl.arange(0, BLOCK)
        visible = keys < end
        k = tl.load(
            k_base + keys[None, :] * stride_ks + d[:, None], mask=visible[None, :], other=0.0
        )
        s = tl.dot(q, k, input_precision=PRECISION) * scale  # [GROUP_TILE, BLOCK] float32
        s = tl.where(visible[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m - m_new)
        denom = denom * alpha + tl.sum(p, 1)
        v = tl.load(
            v_base + keys[:, None] * stride_vs + d[None, :], mask=visible[:, None], other=0.0
        )
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m = m_new

    empty = denom == 0.0  # a slice past the live length
    out = acc / tl.where(empty, 1.0, denom)[:, None]
    lse = tl.where(empty, float("-inf"), m + tl.log(tl.where(empty, 1.0, denom)))
    rows = (b * kv_heads * GROUP + heads) * SPLITS + split  # [B, Hq, SPLITS] flattened
    tl.store(Part + rows[:, None] * D + d[None, :], out, mask=live[:, None])
    tl.store(Lse + rows, lse, mask=live)


@triton.jit
def _merge_kernel(Part, Lse, Out, D: tl.constexpr, SPLITS: tl.constexpr):
    row = tl.program_id(0)  # one (sequence, query head)
    s = tl.arange(0, SPLITS)
    d = tl.arange(0, D)
    lse = tl.load(Lse + row * SPLITS + s)
    weight = tl.exp(lse - tl.max(lse, 0))  # an empty slice weighs 0
    part = tl.load(Part + (row * SPLITS + s[:, None]) * D + d[None, :])
    out = tl.sum(part * weight[:, None], 0) / tl.sum(weight, 0)
    tl.store(Out + row * D + d, out.to(Out.dtype.element_ty))


def splits_for(programs: int, max_seq: int, sms: int) -> int:
    """Slices per (sequence, KV head): enough programs to fill every SM about twice, no
    more slices than blocks of keys the cache holds, a power of two (the merge's tile)."""
    want = max(1, (2 * sms + programs - 1) // programs)
    cap = max(1, triton.cdiv(max_seq, BLOCK_N))
    return min(triton.next_power_of_2(want), triton.next_power_of_2(cap))


def split_k_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, length: torch.Tensor
) -> torch.Tensor:
    """Attention of one query per head over the first ``length`` keys of a cache.

    q [B, Hq, 1, D]; k, v [B, Hkv, S, D] (views of the cache, last dim contiguous);
    ``length`` [1] int64 on the device. Returns [B, Hq, 1, D] in q's dtype."""
    batch, heads, _, dim = q.shape
    kv_heads, max_seq = k.shape[1], k.shape[2]
    group = heads // kv_heads
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 8
    splits = splits_for(batch * kv_heads, max_seq, sms)
    q3 = q.reshape(batch, heads, dim)
    part = torch.empty(batch, heads, splits, dim, dtype=torch.float32, device=q.device)
    lse = torch.empty(batch, heads, splits, dtype=torch.float32, device=q.device)
    _split_kernel[(batch * kv_heads, splits)](
        q3,
        k,
        v,
        length,
        part,
        lse,
        q3.stride(0),
        q3.stride(1),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        v.stride(0),
        v.stride(1),
        v.stride(2),
        kv_heads,
        dim**-0.5,
        GROUP=group,
        GROUP_TILE=max(MIN_GROUP_TILE, triton.next_power_of_2(group)),
        D=dim,
        BLOCK=BLOCK_N,
        SPLITS=splits,
        # float32 caches (tests, CPU-exact models) get float32 products, not TF32's 10 bits
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )
    out = torch.empty(batch, heads, 1, dim, dtype=q.dtype, device=q.device)
    _merge_kernel[(batch * heads,)](part, lse, out, D=dim, SPLITS=splits)
    return out
