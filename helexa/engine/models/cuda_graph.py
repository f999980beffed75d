"""The batch-1 (or batch-B) decode step as a replayable CUDA graph.

A decode step of an 8B model is ~500 small kernels; launched from Python each costs more
than it runs, so the step is captured once and replayed. Capture needs a step with no host
syncs and fixed shapes: the position lives in a device tensor. Where Triton runs, the
step runs the fused kernels of helexa.engine.models.decode_kernels, whose split-K attention
reads the live length from that tensor and only the keys below it: one graph per batch
size serves every position. Elsewhere the keys attended are a fixed-length prefix of the
static KV cache (``kv_len``) with positions past the current one masked out, and graphs
are kept per (batch, kv_len) with kv_len rounded up to a power of two, so attention reads
at most twice the live prefix and a long context needs ~log2(max_seq) captures.

:func:`decode_step` is that step, in plain torch where the kernels do not run (CPUs: the
reference the kernels are tested against); it reuses the model's own pieces (rms_norm,
apply_rope, linear, the fused q/k/v and gate/up weights) and differs from
``Qwen3.forward`` only in how attention sees the cache. The generation loop calls a :class:`GraphDecoder` where it
would call ``model.forward(tokens, torch.tensor([pos]), last_only=True)`` for one token.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F

from helexa.engine.models.qwen3 import (
    MLP,
    Attention,
    FeedForward,
    Qwen3,
    apply_rope,
    projections,
)
from helexa.engine.quant.ops import Int8Rows, embedding, linear, triton_cache_dir
from helexa.engine.quant.tensor import int8_activations

MIN_KV_LEN = 256
# Sums a row-parallel partial result across tensor-parallel ranks (see parallel.py).
Reduce = Callable[[torch.Tensor], torch.Tensor]
# A capturable step, (model, tokens, input_pos, kv_len, *, reduce) -> logits: decode_step,
# or a model family's own (qwen3_next.decode_step for the hybrid models).
Step = Callable[..., torch.Tensor]


def kv_bucket(pos: int, max_seq: int, minimum: int = MIN_KV_LEN) -> int:
    """Keys a step at ``pos`` attends to: the next power of two above ``pos`` (at least
    ``minimum``), capped at the cache length."""
    if not 0 <= pos < max_seq:
        raise ValueError(f"position {pos} is outside the KV cache (0..{max_seq - 1})")
    return min(max(minimum, 1 << pos.bit_length()), max_seq)


def bucket_starts(max_seq: int, minimum: int = MIN_KV_LEN) -> list[int]:
    """The first position of each kv_len bucket: a decode step at each one captures every
    graph a cache of ``max_seq`` positions will need."""
    starts, pos = [], 0
    while pos < max_seq:
        starts.append(pos)
        pos = kv_bucket(pos, max_seq, minimum)
    return starts


def masked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor
) -> torch.Tensor:
    """One query per head over a GQA cache: q [B, Hq, 1, D], k/v [B, Hkv, S, D], keys
    where ``visible`` [S] is False ignored. Scores and softmax in float32."""
    batch, heads, _, dim = q.shape
    kv_heads = k.shape[1]
    qg = q.reshape(batch, kv_heads, heads // kv_heads, dim)
    scores = (qg @ k.transpose(-1, -2)).float() * dim**-0.5
    probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
    return (probs.to(v.dtype) @ v).reshape(batch, heads, 1, dim)


@cache
def triton_module(name: str) -> ModuleType | None:
    """helexa.engine.models.``name`` (a module of Triton kernels: decode_kernels,
    delta_kernels), or None where Triton cannot be imported."""
    if importlib.util.find_spec("triton") is None:
        return None
    triton_cache_dir()
    try:
        return importlib.import_module(f"helexa.engine.models.{name}")
    except ImportError:
        return None


def step_kernels(model: Qwen3) -> ModuleType | None:
    """The fused Triton kernels when they run this model's decode step (a CUDA device,
    Triton, a power-of-two head size of at least 16), else None: the torch step."""
    dim = model.config.head_dim
    if model.device.type != "cuda" or dim < 16 or dim & (dim - 1):
        return None
    return triton_module("decode_kernels")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The model's RMSNorm (normalise in float32, round, then scale) in one fused kernel
    instead of seven: at ~140 norms a token, launches are a visible share of decode."""
    return weight * F.rms_norm(x, (x.shape[-1],), eps=eps)


def add_norm(
    x: torch.Tensor,
    delta: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    kernels: ModuleType | None,
    norm: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor] = rms_norm,
) -> tuple[torch.Tensor, torch.Tensor, Int8Rows | None]:
    """(x + delta, the RMSNorm of that, and with the kernels its int8 activations for the
    matvecs it feeds): the residual add and the next norm, one launch with the kernels.
    ``delta`` None: the first layer's norm of the embeddings. ``norm`` is the torch path's
    (a hybrid model's zero-centred one; the kernel tells them apart by the weight's dtype,
    see decode_kernels.add_rms_norm)."""
    if kernels is not None:
        return kernels.add_rms_norm(x, delta, weight, eps, quantize=int8_activations(x))
    if delta is not None:
        x = x + delta
    return x, norm(x, weight, eps), None


def _projections(
    x: torch.Tensor, attn: Attention, quantized: Int8Rows | None
) -> list[torch.Tensor]:
    """q, k, v [B, 1, H*D] for a step's rows: one matvec per fused weight (Attention.fused),
    its output cut into the projections it holds (views, no copies)."""
    if not attn.fused:
        return [
            linear(x, attn.q_proj, attn.q_bias),
            linear(x, attn.k_proj, attn.k_bias),
            linear(x, attn.v_proj, attn.v_bias),
        ]
    return projections(x, (attn.q_proj, attn.k_proj, attn.v_proj), attn.fused, quantized)


def _attention(
    model: Qwen3,
    attn: Attention,
    x: torch.Tensor,
    quantized: Int8Rows | None,
    input_pos: torch.Tensor,
    kv_len: int,
    kernels: ModuleType | None,
    live: torch.Tensor | None = None,
) -> torch.Tensor:
    """One attention layer's decode step to o_proj's output [B, 1, hidden]. ``live``
    (input_pos + 1, made once a step, not once a layer) is the key count the kernels read;
    the torch path masks the ``kv_len`` bucket instead."""
    cfg = model.config
    batch, dim, eps = x.shape[0], cfg.head_dim, cfg.rms_norm_eps
    cache = attn.cache
    assert cache is not None and model.cos is not None and model.sin is not None
    q, k, v = _projections(x, attn, quantized)  # [B, 1, H*D] each
    if kernels is not None:
        # q/k norms, RoPE at input_pos and the k/v cache writes in one launch; attention
        # reads keys 0..input_pos only, whatever kv_len says, and its merge writes
        # o_proj's int8 activations.
        q = kernels.qk_norm_rope_cache(
            q, k, v, attn.q_norm, attn.k_norm, model.cos, model.sin, input_pos,
            cache.k, cache.v, eps,
        )  # fmt: skip
        assert live is not None
        y, yq = kernels.attention_rows(
            q, cache.k[:batch], cache.v[:batch], live, quantize=int8_activations(x)
        )  # [B, 1, Hq*D]
        return linear(y, attn.o_proj, attn.o_bias, quantized=yq)
    cos, sin = model.cos[input_pos], model.sin[input_pos]
    q = rms_norm(q.view(batch, 1, -1, dim), attn.q_norm, eps).transpose(1, 2)
    k = rms_norm(k.view(batch, 1, -1, dim), attn.k_norm, eps).transpose(1, 2)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    v = v.reshape(batch, 1, -1, dim).transpose(1, 2)
    keys, values = cache.update(input_pos, k, v, kv_len)
    visible = torch.arange(kv_len, device=input_pos.device) <= input_pos
    y = masked_attention(q, keys, values, visible)  # [B, Hq, 1, D]
    return linear(y.transpose(1, 2).reshape(batch, 1, -1), attn.o_proj, attn.o_bias)


def mlp_step(
    mlp: FeedForward, x: torch.Tensor, quantized: Int8Rows | None, kernels: ModuleType | None
) -> torch.Tensor:
    """A dense MLP with fused gate/up: one matvec, SiLU·mul in one launch (which also
    quantizes down_proj's input), then down; an unfused one its reference way; any other
    feed-forward (a MoE, with or without a shared expert) decodes its own way with the
    kernels and the norm's int8 activations."""
    if not isinstance(mlp, MLP):
        return mlp.decode(x, quantized, kernels)
    if not mlp.fused:
        return mlp.decode(x)
    gate_up = linear(x, mlp.fused[0], quantized=quantized)  # [B, 1, 2F]: gate then up
    if kernels is not None:
        h, hq = kernels.silu_mul(
            gate_up, quantize=int8_activations(gate_up, mlp.down_proj.shape[-1])
        )
    else:
        gate, up = gate_up.chunk(2, dim=-1)
        h, hq = F.silu(gate) * up, None
    return linear(h, mlp.down_proj, quantized=hq)


@torch.inference_mode()
def decode_step(
    model: Qwen3,
    tokens: torch.Tensor,
    input_pos: torch.Tensor,
    kv_len: int,
    *,
    reduce: Reduce | None = None,
) -> torch.Tensor:
    """Logits [B, 1, vocab] (float32) for one token per sequence at ``input_pos`` [1]
    (a device tensor), attending to cache positions ``0..input_pos`` (out of the first
    ``kv_len`` where attention is masked). No host syncs, so it can be captured.
    ``reduce`` (tensor parallelism) sums the attention and MLP outputs of a sharded model
    across ranks."""
    if model.cos is None or model.sin is None:
        raise RuntimeError("call setup_cache(max_batch, max_seq) before decoding")
    eps = model.config.rms_norm_eps
    kernels = step_kernels(model)
    live = input_pos + 1 if kernels is not None else None  # [1]: keys 0..input_pos
    x = embedding(tokens, model.embed_tokens, dtype=model.dtype)  # [B, 1, hidden]
    delta: torch.Tensor | None = None  # what the last sublayer adds to the residual x
    for blk in model.layers:
        x, h, hq = add_norm(x, delta, blk.input_layernorm, eps, kernels)
        delta = _attention(model, blk.attn, h, hq, input_pos, kv_len, kernels, live)
        delta = delta if reduce is None else reduce(delta)
        x, h, hq = add_norm(x, delta, blk.post_attention_layernorm, eps, kernels)
        delta = mlp_step(blk.mlp, h, hq, kernels)
        delta = delta if reduce is None else reduce(delta)
    _, h, hq = add_norm(x, delta, model.norm, eps, kernels)
    return linear(h, model.lm_head, quantized=hq).float()


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    logits: torch.Tensor


@dataclass
class _Inputs:
    tokens: torch.Tensor  # [B, 1] int64
    pos: torch.Tensor  # [1] int64


class GraphDecoder:
    """``decoder(tokens [B, 1], pos) -> logits [B, 1, vocab]`` for the token at ``pos``.

    On CUDA each (B, kv_len) is captured on first use (after one eager warm-up step, which
    also compiles/tunes the Triton kernels) and replayed after (LoadedModel.warm_up makes
    that first use happen at load, see :func:`bucket_starts`); elsewhere it runs
    :func:`decode_step` eagerly. Re-allocating the cache (``setup_cache``) drops the graphs.
    ``reduce`` is decode_step's, for a tensor-parallel shard: NCCL collectives are captured
    into the graph with the rest (the warm-up step has set the communicator up by then).
    """

    def __init__(
        self,
        model: Any,
        *,
        min_kv_len: int = MIN_KV_LEN,
        reduce: Reduce | None = None,
        step: Step = decode_step,
    ) -> None:
        self.model = model
        self.step = step
        self.min_kv_len = min_kv_len
        self.reduce = reduce
        self._graphs: dict[tuple[int, int], _Captured] = {}
        self._inputs: dict[int, _Inputs] = {}
        self._pool: tuple[int, int] | None = None
        self._buffers: tuple[int, ...] = ()

    @property
    def enabled(self) -> bool:
        return self.model.device.type == "cuda"

    @property
    def live(self) -> bool:
        """Whether attention reads the live length (one graph per batch, no buckets)."""
        return self.enabled and self.step is decode_step and step_kernels(self.model) is not None

    def capture_positions(self) -> list[int]:
        """A position in each graph a cache of ``max_seq`` positions will need: a decode
        step at each captures them all (what LoadedModel.warm_up does at load)."""
        return [0] if self.live else bucket_starts(self.model.max_seq, self.min_kv_len)

    def __call__(self, tokens: torch.Tensor, pos: int) -> torch.Tensor:
        model = self.model
        kv_len = kv_bucket(pos, model.max_seq, self.min_kv_len)
        if self.live:
            kv_len = model.max_seq  # the kernel stops at pos: one graph for every position
        if not self.enabled:
            input_pos = torch.tensor([pos], device=model.device)
            return self.step(model, tokens, input_pos, kv_len, reduce=self.reduce)
        self._drop_stale()
        batch = tokens.shape[0]
        inputs = self._inputs.get(batch)
        if inputs is None:
            inputs = _Inputs(
                tokens=torch.zeros(batch, 1, dtype=torch.long, device=model.device),
                pos=torch.zeros(1, dtype=torch.long, device=model.device),
            )
            self._inputs[batch] = inputs
        inputs.tokens.copy_(tokens)
        inputs.pos.fill_(pos)
        captured = self._graphs.get((batch, kv_len))
        if captured is None:
            captured = self._capture(inputs, kv_len)
            self._graphs[(batch, kv_len)] = captured
        captured.graph.replay()
        return captured.logits.clone()

    def _drop_stale(self) -> None:
        """Graphs hold the addresses of the buffers they were captured with: a new cache
        (even one reusing some of the old addresses) needs new graphs."""
        model = self.model
        states = getattr(model, "recurrent_states", list)()  # a hybrid model's, in place
        buffers = (
            tuple(t.data_ptr() for cache in model.kv_caches() for t in (cache.k, cache.v))
            + tuple(t.data_ptr() for state in states for t in state.tensors)
            + tuple(t.data_ptr() for t in (model.cos, model.sin) if t is not None)
        )
        if buffers != self._buffers:
            self._graphs.clear()
            self._pool = None
            self._buffers = buffers

    @torch.inference_mode()  # the caches and recurrent states it restores are inference tensors
    def _capture(self, inputs: _Inputs, kv_len: int) -> _Captured:
        model = self.model
        # Warm up on a side stream, as torch.cuda.graphs asks: first-call work (Triton
        # compile + autotune, cuBLAS handles) must not happen during capture. The step is
        # the real one, so the cache entry it writes is the one the replay rewrites.
        # A hybrid model's recurrent states are stepped, not rewritten: put them back after
        # the warm-up, so the replay that follows applies this token once.
        states = [t for s in getattr(model, "recurrent_states", list)() for t in s.tensors]
        before = [t.clone() for t in states]
        side = torch.cuda.Stream(model.device)
        side.wait_stream(torch.cuda.current_stream(model.device))
        with torch.cuda.stream(side):
            self.step(model, inputs.tokens, inputs.pos, kv_len, reduce=self.reduce)
            for t, saved in zip(states, before, strict=True):
                t.copy_(saved)
        torch.cuda.current_stream(model.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = self.step(model, inputs.tokens, inputs.pos, kv_len, reduce=self.reduce)
        self._pool = graph.pool()
        return _Captured(graph, logits)
