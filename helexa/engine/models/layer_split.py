"""One model's layers split across the devices of one process (a pipeline split, batch 1).

Users have mismatched cards in one box (a 12 GB beside a 24 GB); a model that fits on
neither fits across both when consecutive layers sit on different cards. Each device
holds a run of layers and those layers' KV caches, the first also the token embedding,
the last the final norm and lm_head; the residual [B, T, hidden] is the only thing that
crosses a boundary, once per boundary per forward. Nothing overlaps: one device computes
while the others wait, so a split runs at about the speed of one card holding it all, and
exists for memory, not speed (tensor parallelism, helexa.engine.models.parallel, is the
one that adds bandwidth).

:func:`layer_counts` decides how many layers each device takes, in proportion to what it
has free once the embedding or lm_head it must hold is taken off. :class:`LayerSplit`
wraps a Qwen3 (dense or MoE) built with each tensor already on its device
(:class:`SplitWeights`), and runs each layer through the model's own ``Qwen3.block``.
Its decode step is the eager forward: the CUDA-graph step (cuda_graph.GraphDecoder) is
written for one device and is not used for a split.
"""

from __future__ import annotations

import gc
import os
import traceback
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.nn.attention import sdpa_kernel

from helexa.engine.checkpoint.types import Checkpoint, Weight
from helexa.engine.models.kv_cache import KVCache
from helexa.engine.models.qwen3 import (
    SDPA_BACKENDS,
    CheckpointWeights,
    Qwen3,
    Qwen3Config,
    attention_mask,
    rms_norm,
    rope_tables,
)
from helexa.engine.quant.ops import embedding, linear
from helexa.engine.quant.tensor import QuantizedTensor
from helexa.errors import ApiError
from helexa.units import size_text

LAYER_PREFIX = "model.layers."
EMBEDDING = "model.embed_tokens.weight"


class SplitError(ApiError):
    """A split refused before a weight is placed: devices that do not exist, a model that
    does not fit across them, or one whose architecture the split does not run."""

    status = 507
    code = "insufficient_vram"
    type = "preflight"


# -- how many layers where ------------------------------------------------------------------


def layer_counts(
    free: Sequence[int], layer_bytes: Sequence[int], first_bytes: int = 0, last_bytes: int = 0
) -> list[int]:
    """Consecutive layers per device: device ``i`` takes a share of the layers' bytes in
    proportion to its room, ``free[i]`` less what it holds besides layers (``first_bytes``
    on the first device: the embedding; ``last_bytes`` on the last: norm and lm_head).
    Every device takes at least one layer. Raises :class:`SplitError` when some device
    cannot hold its share (the message names it and the sizes)."""
    n, total_layers = len(free), len(layer_bytes)
    if n == 0:
        raise SplitError("a split needs at least one device", status=422, code="invalid_devices")
    if total_layers < n:
        raise SplitError(
            f"{total_layers} layers cannot be split over {n} devices",
            status=422,
            code="invalid_devices",
        )
    room = list(free)
    room[0] -= first_bytes
    room[-1] -= last_bytes
    cum = [0]
    for size in layer_bytes:
        cum.append(cum[-1] + size)
    total, capacity = cum[-1], sum(max(r, 0) for r in room)
    if total > capacity or min(room) <= 0:
        raise _too_big(free, total + first_bytes + last_bytes)
    counts, start = [], 0
    for i in range(n - 1):
        target = total * sum(max(r, 0) for r in room[: i + 1]) / capacity
        # The boundary nearest the target that leaves a layer for each device after it.
        last = total_layers - (n - 1 - i)
        end = min(range(start + 1, last + 1), key=lambda e: abs(cum[e] - target))
        counts.append(end - start)
        start = end
    counts.append(total_layers - start)
    bounds = [0]
    for count in counts:
        bounds.append(bounds[-1] + count)
    for i, r in enumerate(room):
        if cum[bounds[i + 1]] - cum[bounds[i]] > r:
            raise _too_big(free, total + first_bytes + last_bytes)
    return counts


def _too_big(free: Sequence[int], needed: int) -> SplitError:
    frees = ", ".join(size_text(f) for f in free)
    return SplitError(
        f"needs {size_text(needed)} across {len(free)} devices, which have {frees} free",
        extra={"needed_mb": needed >> 20, "free_mb": [f >> 20 for f in free]},
    )


def free_bytes(device: torch.device) -> int:
    """What ``device`` has free for a model: the driver's free memory on CUDA, the host's
    available memory on a CPU (every CPU entry of a split sees the same, so they share
    evenly)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_devices(devices: Sequence[torch.device | str]) -> list[torch.device]:
    """``devices`` as torch devices, refused (422, unknown_device) where one does not
    exist here or is named twice."""
    out = [torch.device(d) for d in devices]
    count = torch.cuda.device_count()
    for d in out:
        if d.type == "cuda" and (d.index is None or d.index >= count):
            raise SplitError(
                f"device {d} does not exist here ({count} CUDA devices); name each as cuda:N",
                status=422,
                code="unknown_device",
            )
        if d.type not in ("cuda", "cpu"):
            raise SplitError(f"device {d} cannot hold layers", status=422, code="unknown_device")
    cuda = [d for d in out if d.type == "cuda"]
    if len(set(cuda)) != len(cuda):
        raise SplitError(
            f"a device is named twice in {devices}", status=422, code="invalid_devices"
        )
    return out


def checkpoint_layer_bytes(
    ckpt: Checkpoint, cfg: Qwen3Config, dtype: torch.dtype, context: int
) -> tuple[list[int], int, int]:
    """(bytes of each layer: weights as placed plus its KV cache at ``context``, bytes of
    the embedding, bytes of the final norm and lm_head): what :func:`layer_counts` weighs.
    A tied lm_head is a copy of the embedding on the last device, so it counts there too."""
    layers = [0] * cfg.num_hidden_layers
    kv = 2 * cfg.num_key_value_heads * cfg.head_dim * context * dtype.itemsize
    first = last = 0
    for name, t in ckpt.tensors.items():
        size = placed_bytes(t, dtype)
        if name.startswith(LAYER_PREFIX):
            layers[int(name.split(".")[2])] += size
        elif name == EMBEDDING:
            first += size
        else:
            last += size
    if "lm_head.weight" not in ckpt.tensors or cfg.tie_word_embeddings:
        last += first
    return [size + kv for size in layers], first, last


def placed_bytes(t: Weight, dtype: torch.dtype) -> int:
    """Bytes ``t`` takes on a device: quantized blocks as they are, a float cast to ``dtype``."""
    return t.nbytes if isinstance(t, QuantizedTensor) else t.numel() * dtype.itemsize


# -- the split model --------------------------------------------------------------------------


@dataclass(frozen=True)
class Stage:
    """Layers ``start..stop-1`` and their KV caches on ``device``."""

    device: torch.device
    start: int
    stop: int


def stages(devices: Sequence[torch.device], counts: Sequence[int]) -> list[Stage]:
    out, start = [], 0
    for device, count in zip(devices, counts, strict=True):
        out.append(Stage(device, start, start + count))
        start += count
    return out


class SplitWeights(CheckpointWeights):
    """A checkpoint's tensors taken each onto its layer's device: a layer's to its stage,
    the embedding to the first device, the final norm and lm_head to the last."""

    def __init__(self, ckpt: Checkpoint, split: Sequence[Stage], dtype: torch.dtype) -> None:
        super().__init__(ckpt, split[0].device, dtype)
        self.stages = list(split)

    def device_of(self, name: str) -> torch.device:
        if name.startswith(LAYER_PREFIX):
            layer = int(name.split(".")[2])
            return next(s.device for s in self.stages if s.start <= layer < s.stop)
        return self.stages[0].device if name == EMBEDDING else self.stages[-1].device


class LayerSplit:
    """A Qwen3 (dense or MoE) whose layers run on several devices; the generation loop
    drives it as it drives a Qwen3 (generate.CausalLM). ``device`` is the last one:
    logits come out there, so the sampler runs there, and a token id is the one thing
    that goes back to the first device for the embedding."""

    def __init__(self, model: Qwen3, split: Sequence[Stage]) -> None:
        self.model = model
        self.stages = list(split)
        self.config = model.config
        self.dtype = model.dtype
        self.device = self.stages[-1].device
        # The RoPE tables, one copy per stage on its device (set by setup_cache).
        self.rope: list[tuple[torch.Tensor, torch.Tensor]] = []

    @classmethod
    def from_checkpoint(
        cls,
        ckpt: Checkpoint,
        model_class: type[Qwen3],
        devices: Sequence[torch.device],
        counts: Sequence[int],
        dtype: torch.dtype,
    ) -> LayerSplit:
        """Build ``model_class`` from ``ckpt`` with ``counts[i]`` consecutive layers on
        ``devices[i]``, each tensor moved straight to its device (the checkpoint stays
        where it was read, normally the host's mapped files)."""
        cfg = model_class.config_class.from_hf(ckpt.config, ckpt.source)
        split = stages(devices, counts)
        model = model_class.from_weights(cfg, SplitWeights(ckpt, split, dtype))
        if model.lm_head is model.embed_tokens:  # tied: the last device needs its own copy
            model.lm_head = model.embed_tokens.to(split[-1].device)
        return cls(model, split)

    # -- memory -----------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.model.vocab_size

    @property
    def max_seq(self) -> int:
        return self.model.max_seq

    @property
    def nbytes(self) -> int:
        return self.model.nbytes

    @property
    def prefill_bytes_per_token(self) -> int:
        return self.model.prefill_bytes_per_token

    def kv_caches(self) -> list[KVCache]:
        return self.model.kv_caches()

    def device_bytes(self) -> dict[str, int]:
        """Weights plus KV cache held on each device, by device name."""
        out = {str(s.device): 0 for s in self.stages}
        for w in self.model.weights():
            out[str(w.device)] = out.get(str(w.device), 0) + w.nbytes
        for cache in self.kv_caches():
            out[str(cache.k.device)] += cache.nbytes
        return out

    # -- inference --------------------------------------------------------------------------

    @torch.inference_mode()
    def setup_cache(self, max_batch: int, max_seq: int) -> None:
        """Each layer's static KV cache on its own device, and the RoPE tables on each."""
        model = self.model
        for blk in model.layers:
            blk.attn.cache = None  # free the old ones before allocating the new ones
        for stage in self.stages:
            for blk in model.layers[stage.start : stage.stop]:
                blk.attn.cache = model.new_cache(max_batch, max_seq, stage.device)
        cos, sin = rope_tables(self.config, max_seq)
        self.rope = [
            (cos.to(s.device, self.dtype), sin.to(s.device, self.dtype)) for s in self.stages
        ]

    @torch.inference_mode()
    def forward(
        self, tokens: torch.Tensor, input_pos: torch.Tensor, *, last_only: bool = False
    ) -> torch.Tensor:
        """Qwen3.forward across the stages: logits [B, T or 1, vocab] (float32) on the
        last device for ``tokens`` [B, T] at positions ``input_pos`` [T]."""
        if not self.rope:
            raise RuntimeError("call setup_cache(max_batch, max_seq) before forward")
        model = self.model
        start, steps = int(input_pos[0]), tokens.shape[1]
        end = start + steps
        if end > self.max_seq:
            raise ValueError(f"position {end - 1} is past the KV cache ({self.max_seq} tokens)")
        first = self.stages[0].device
        x = embedding(tokens.to(first), model.embed_tokens, dtype=self.dtype)  # [B, T, hidden]
        with sdpa_kernel(SDPA_BACKENDS):
            for stage, (cos, sin) in zip(self.stages, self.rope, strict=True):
                x = x.to(stage.device)  # the residual crosses to this stage's device
                pos = input_pos.to(stage.device)
                cos, sin = cos[pos], sin[pos]  # [T, head_dim]
                mask, causal = attention_mask(start, steps, end, stage.device)
                for blk in model.layers[stage.start : stage.stop]:
                    x = model.block(blk, x, cos, sin, pos, end, mask, causal)
        x = rms_norm(x, model.norm, self.config.rms_norm_eps)
        if last_only:
            x = x[:, -1:]
        return linear(x, model.lm_head).float()  # [B, T or 1, vocab]

    __call__ = forward


def load_split(
    ckpt: Checkpoint,
    model_class: type,
    devices: Sequence[torch.device],
    dtype: torch.dtype,
    context: int,
) -> LayerSplit:
    """``ckpt`` split over ``devices`` with a KV cache of ``context`` positions, each
    device's share of the layers from its free memory (:func:`layer_counts`). Refused
    with a :class:`SplitError` before a weight moves when it cannot fit; if placing fails
    anyway (out of memory), what was placed is freed before the error goes on."""
    if not (isinstance(model_class, type) and issubclass(model_class, Qwen3)):
        raise SplitError(
            f"{ckpt.source or 'this model'}: a layer split runs Qwen3 and Qwen3-MoE, "
            f"not {getattr(model_class, '__name__', model_class)}",
            status=422,
            code="unsupported_architecture",
        )
    cfg = model_class.config_class.from_hf(ckpt.config, ckpt.source)
    layers, first, last = checkpoint_layer_bytes(ckpt, cfg, dtype, context)
    counts = layer_counts([free_bytes(d) for d in devices], layers, first, last)
    split: LayerSplit | None = None
    try:
        split = LayerSplit.from_checkpoint(ckpt, model_class, devices, counts, dtype)
        split.setup_cache(1, context)
    except BaseException as exc:
        # The frames the error passed through hold what they had placed: clear them and
        # drop the split before asking the allocators to let go.
        split = None
        traceback.clear_frames(exc.__traceback__)
        gc.collect()
        if any(d.type == "cuda" for d in devices):
            torch.cuda.empty_cache()
        raise
    return split
