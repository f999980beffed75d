"""The per-request state of a linear-attention (Gated DeltaNet) layer, beside the KV cache
of the full-attention layers, and its host copies for the prompt cache.

A DeltaNet layer carries two things from one token to the next: the last ``kernel - 1``
inputs of its short causal conv, and the delta-rule memory, one (k_dim, v_dim) matrix per
value head. Unlike a KV cache they do not grow with the sequence and cannot be cut back:
they describe exactly one position, the end of what has been run. Both are preallocated
once (memory is known at load, for preflight and ``/models``) and written in place, so a
captured decode step keeps pointing at the same buffers.

The delta-rule memory is float32 whatever the compute dtype, as transformers and fla keep
it: it accumulates over the whole sequence and bfloat16 would drift.

Each state also keeps one device-side copy, the *mark*, taken where a prompt's prefill
ends: the next turn of a chat usually re-sends that prompt but renders the answer after
it differently (an earlier turn's thinking dropped), so the state at the end of the
answer is of no use to it while the one at the end of the prompt is.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from helexa.engine.models.kv_cache import HostSnapshots, KVCache


class RecurrentState:
    def __init__(
        self,
        batch: int,
        conv_dim: int,
        kernel: int,
        heads: int,
        k_dim: int,
        v_dim: int,
        *,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        self.conv = torch.zeros(batch, conv_dim, kernel - 1, dtype=dtype, device=device)
        self.ssm = torch.zeros(batch, heads, k_dim, v_dim, dtype=torch.float32, device=device)
        self.marked = (torch.zeros_like(self.conv), torch.zeros_like(self.ssm))

    @property
    def nbytes(self) -> int:
        """The live state and its mark."""
        return 2 * (self.conv.nbytes + self.ssm.nbytes)

    @property
    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The live state: what a step reads and writes (a captured graph's buffers)."""
        return self.conv, self.ssm

    def mark(self) -> None:
        for live, copy in zip(self.tensors, self.marked, strict=True):
            copy.copy_(live)

    def rewind(self) -> None:
        """Back to the state :meth:`mark` copied, in place."""
        for live, copy in zip(self.tensors, self.marked, strict=True):
            live.copy_(copy)


def state_bytes(
    conv_dim: int, kernel: int, heads: int, k_dim: int, v_dim: int, dtype_bytes: int
) -> int:
    """One layer's :class:`RecurrentState` (and its mark) at batch 1, before it is
    allocated (preflight)."""
    return 2 * (conv_dim * (kernel - 1) * dtype_bytes + heads * k_dim * v_dim * 4)


@dataclass
class HybridSnapshot:
    """What :class:`HybridSnapshots` saves: the attention layers' KV up to a length, and
    the recurrent states as they were at that length (the end of the held sequence)."""

    kv: list[tuple[torch.Tensor, torch.Tensor]]
    states: list[tuple[torch.Tensor, torch.Tensor]]


class HybridSnapshots(HostSnapshots):
    """HostSnapshots for a hybrid model: the KV of its full-attention layers plus every
    linear layer's recurrent state, row 0, in host memory.

    A state describes one position only, so a snapshot is reusable at exactly its own
    length (the prompt cache, built with ``exact=True``, only ever restores it whole).
    """

    def __init__(
        self,
        caches: Callable[[], Sequence[KVCache]],
        states: Callable[[], Sequence[RecurrentState]],
    ) -> None:
        super().__init__(caches)
        self._states = states

    @property
    def state_bytes(self) -> int:
        """What one snapshot's states take: each layer's live state, row 0."""
        return sum(t[0].nbytes for s in self._states() for t in s.tensors)

    @torch.inference_mode()
    def mark(self) -> None:
        """Keep a device-side copy of every layer's state as it is now (a prompt's end)."""
        for state in self._states():
            state.mark()

    @torch.inference_mode()
    def rewind(self) -> None:
        """Every layer's state back to the last :meth:`mark`."""
        for state in self._states():
            state.rewind()

    @torch.inference_mode()
    def save(self, length: int) -> HybridSnapshot:
        states = []
        for state in self._states():
            conv, ssm = (t[0].to("cpu", copy=True) for t in state.tensors)
            states.append((conv, ssm))
        return HybridSnapshot(super().save(length), states)

    @torch.inference_mode()
    def restore(self, saved: Any, start: int, end: int) -> None:
        assert isinstance(saved, HybridSnapshot)
        super().restore(saved.kv, start, end)
        for state, (conv, ssm) in zip(self._states(), saved.states, strict=True):
            state.conv[0].copy_(conv)
            state.ssm[0].copy_(ssm)
