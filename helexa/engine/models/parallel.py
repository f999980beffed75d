"""Spreading one Qwen3 over several GPUs: tensor parallel (Megatron) and a layer split.

Tensor parallel, one process per GPU: each rank holds 1/world of every attention head group
and of the MLP. q/k/v and gate/up are split by output rows (column parallel: whole heads,
whole MLP channels), o_proj and down_proj by input columns (row parallel), so each layer
needs exactly two all-reduces, after o_proj and after down_proj. Quantized weights split
along block boundaries and stay quantized. Embedding, norms and lm_head are replicated.
:func:`helexa.engine.models.cuda_graph.decode_step` runs a sharded model given ``reduce``.

A collective whose peer died or hung waits forever; :class:`StepWatchdog` turns that into
a clear error and an exit, so the worker's supervisor sees a dead process, not a hang.

Layer split, for GPUs of unequal free memory: :func:`plan_layer_split` gives each device a
contiguous run of layers in proportion to its budget.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.distributed as dist

from helexa.engine.checkpoint.types import Weight
from helexa.engine.models.qwen3 import MLP, Attention, Block, Qwen3, fuse_projections
from helexa.engine.quant.formats import block_format
from helexa.engine.quant.tensor import QuantizedTensor

EXIT_WEDGED = 70  # EX_SOFTWARE: the step watchdog gave up on a collective


def split_rows(w: Weight, rank: int, world: int) -> Weight:
    """Output rows ``rank``/``world`` of an (out, in) weight (or a bias): column parallel."""
    n = w.shape[0]
    if n % world:
        raise ValueError(f"cannot split {n} output rows over {world} ranks")
    rows = slice(rank * n // world, (rank + 1) * n // world)
    if isinstance(w, QuantizedTensor):
        return QuantizedTensor(w.data[rows].contiguous(), w.qtype, (n // world, w.shape[1]))
    return w[rows].contiguous()


def split_cols(w: Weight, rank: int, world: int) -> Weight:
    """Input columns ``rank``/``world`` of an (out, in) weight: row parallel. A quantized
    weight splits on block boundaries, so each part is still whole blocks."""
    n, k = w.shape
    if k % world:
        raise ValueError(f"cannot split {k} input columns over {world} ranks")
    part = k // world
    if isinstance(w, QuantizedTensor):
        fmt = block_format(w.qtype)
        if part % fmt.block_size:
            raise ValueError(
                f"{w.qtype.name} blocks hold {fmt.block_size} weights: {k} columns do not "
                f"split into {world} whole-block parts"
            )
        width = fmt.row_bytes(part)
        data = w.data[:, rank * width : (rank + 1) * width].contiguous()
        return QuantizedTensor(data, w.qtype, (n, part))
    return w[:, rank * part : (rank + 1) * part].contiguous()


def shard_qwen3(model: Qwen3, rank: int, world: int) -> Qwen3:
    """This rank's share of ``model`` (heads and MLP channels split ``world`` ways), as a
    Qwen3 whose config counts its own heads. Call ``setup_cache`` on the result."""
    cfg = model.config
    if cfg.num_key_value_heads % world or cfg.num_attention_heads % world:
        raise ValueError(
            f"{cfg.num_attention_heads} query / {cfg.num_key_value_heads} KV heads do not "
            f"split over {world} ranks"
        )

    def maybe(w: torch.Tensor | None) -> torch.Tensor | None:
        return None if w is None else split_rows(w, rank, world)  # type: ignore[return-value]

    layers = []
    for blk in model.layers:
        a = blk.attn
        attn = Attention(
            q_proj=split_rows(a.q_proj, rank, world),
            k_proj=split_rows(a.k_proj, rank, world),
            v_proj=split_rows(a.v_proj, rank, world),
            o_proj=split_cols(a.o_proj, rank, world),
            q_norm=a.q_norm,
            k_norm=a.k_norm,
            q_bias=maybe(a.q_bias),
            k_bias=maybe(a.k_bias),
            v_bias=maybe(a.v_bias),
            o_bias=a.o_bias if rank == 0 else None,  # added once, before the sum
        )
        if attn.q_bias is None and attn.k_bias is None and attn.v_bias is None:
            # The shard's own q/k/v, fused for its decode step as the whole model's were.
            attn.fused, qkv = fuse_projections([attn.q_proj, attn.k_proj, attn.v_proj])
            attn.q_proj, attn.k_proj, attn.v_proj = qkv
        mlp = blk.mlp
        if not isinstance(mlp, MLP):
            raise ValueError(f"tensor parallelism splits dense MLPs only, not {type(mlp).__name__}")
        gate_up, (gate, up) = fuse_projections(
            [split_rows(mlp.gate_proj, rank, world), split_rows(mlp.up_proj, rank, world)]
        )
        layers.append(
            Block(
                attn=attn,
                input_layernorm=blk.input_layernorm,
                post_attention_layernorm=blk.post_attention_layernorm,
                mlp=MLP(gate, up, split_cols(mlp.down_proj, rank, world), gate_up),
            )
        )
    shard_cfg = dataclasses.replace(
        cfg,
        num_attention_heads=cfg.num_attention_heads // world,
        num_key_value_heads=cfg.num_key_value_heads // world,
        intermediate_size=cfg.intermediate_size // world,
    )
    return Qwen3(
        shard_cfg,
        embed_tokens=model.embed_tokens,
        layers=layers,
        norm=model.norm,
        lm_head=model.lm_head,
        device=model.device,
        dtype=model.dtype,
    )


def all_reduce(group: dist.ProcessGroup | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """The ``reduce`` for decode_step: an in-place sum over ``group``."""

    def reduce(t: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(t, group=group)
        return t

    return reduce


def _exit_wedged(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
    os._exit(EXIT_WEDGED)


class StepWatchdog:
    """Gives each step ``timeout_s`` to finish; past that, reports which step on which
    rank wedged and calls ``on_timeout`` (default: print it and exit with EXIT_WEDGED,
    the only reliable way out of a collective whose peer is gone)."""

    def __init__(
        self,
        timeout_s: float,
        *,
        rank: int = 0,
        world: int = 1,
        on_timeout: Callable[[str], None] = _exit_wedged,
    ) -> None:
        self.timeout_s = timeout_s
        self.rank, self.world = rank, world
        self.on_timeout = on_timeout

    @contextmanager
    def step(self, what: str) -> Iterator[None]:
        message = (
            f"helexa: tensor-parallel {what} on rank {self.rank} of {self.world} did not "
            f"finish in {self.timeout_s:g} s (a peer died or hung in a collective); aborting"
        )
        timer = threading.Timer(self.timeout_s, self.on_timeout, args=(message,))
        timer.daemon = True
        timer.start()
        try:
            yield
        finally:
            timer.cancel()


def plan_layer_split(layer_bytes: Sequence[int], budgets: Sequence[int]) -> list[range]:
    """Contiguous layer ranges, one per device, sized in proportion to ``budgets`` (free
    bytes each device can give to weights); raises when the layers do not fit."""
    if not budgets or any(b < 0 for b in budgets):
        raise ValueError("need at least one device budget, none negative")
    total, capacity = sum(layer_bytes), sum(budgets)
    if total > capacity:
        raise ValueError(f"layers need {total} bytes, devices offer {capacity}")
    plan, start, used, share = [], 0, 0, 0
    for i, budget in enumerate(budgets):
        share += budget
        last = i == len(budgets) - 1
        stop = start
        # Take layers while this device's cumulative share of the model stays in budget.
        while stop < len(layer_bytes) and (
            last or used + layer_bytes[stop] <= total * share / capacity
        ):
            used += layer_bytes[stop]
            stop += 1
        if sum(layer_bytes[start:stop]) > budget:
            raise ValueError(f"device {i} would need more than its {budget} bytes")
        plan.append(range(start, stop))
        start = stop
    return plan
