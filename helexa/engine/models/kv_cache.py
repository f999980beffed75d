"""A static KV cache: one preallocated buffer per layer, written at token positions.

Static (allocated once for the whole context) so decode never reallocates or copies the
past, memory use is known at load time for preflight and ``/models``, and the decode step
keeps fixed-shape buffers (the precondition for CUDA graphs later). Positions past the
current length hold stale values; attention only ever reads ``[:end]``.
"""

from __future__ import annotations

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
