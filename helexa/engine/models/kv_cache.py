"""A static KV cache: one preallocated buffer per layer, written at token positions.

Static (allocated once for the whole context) so decode never reallocates or copies the
past, memory use is known at load time for preflight and ``/models``, and the decode step
keeps fixed-shape buffers (the precondition for CUDA graphs later). Positions past the
current length hold stale values; attention only ever reads ``[:end]``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


class KVCache:
    def __init__(
        self,
        batch: int,
        kv_heads: int,
        max_seq: int,
        head_dim: int,
        *,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        shape = (batch, kv_heads, max_seq, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    @property
    def max_seq(self) -> int:
        return self.k.shape[2]

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def update(
        self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor, end: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``k``/``v`` ([B, kv_heads, T, head_dim]) at ``input_pos`` and return the
        cache views ``[:, :, :end]`` that attention reads (the prefix up to the last new token).
        """
        batch = k.shape[0]
        self.k[:batch].index_copy_(2, input_pos, k)
        self.v[:batch].index_copy_(2, input_pos, v)
        return self.k[:batch, :, :end], self.v[:batch, :, :end]


class HostSnapshots:
    """Copies of the KV caches' first positions in host memory: the
    :class:`~helexa.engine.prefix_cache.KVStore` a model's prompt cache saves earlier
    conversations through.

    Row 0 of each cache only (a served model runs batch 1). The copies are pageable host
    memory, not pinned: the caching host allocator would keep pinned blocks (rounded up
    to powers of two) past their use, and the budget is meant to bound what is held. The
    restore writes into the existing buffers, so captured CUDA graphs stay valid.
    """

    def __init__(self, caches: Callable[[], Sequence[KVCache]]) -> None:
        self._caches = caches

    @property
    def bytes_per_token(self) -> int:
        return sum(c.nbytes // c.max_seq // c.k.shape[0] for c in self._caches())

    @torch.inference_mode()  # the caches are inference tensors (made in setup_cache)
    def save(self, length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        saved = []
        for cache in self._caches():
            pair = []
            for buffer in (cache.k, cache.v):
                part = buffer[0, :, :length]
                host = torch.empty(part.shape, dtype=part.dtype, device="cpu")
                host.copy_(part)
                pair.append(host)
            saved.append((pair[0], pair[1]))
        return saved

    @torch.inference_mode()
    def restore(self, saved: list[tuple[torch.Tensor, torch.Tensor]], start: int, end: int) -> None:
        for cache, (k, v) in zip(self._caches(), saved, strict=True):
            cache.k[0, :, start:end].copy_(k[:, start:end])
            cache.v[0, :, start:end].copy_(v[:, start:end])
