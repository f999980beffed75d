"""How many of a MoE prefill's sorted rows each expert has, as the expert GEMMs take it:
a list, or the (E,) integer tensor a bincount left on the device, which only the paths
that need a list read on the host (a sync). A module of its own because quant.ops (which
path runs) and quant.expert_gemm (which launch config) both decide by it."""

from __future__ import annotations

import torch

Counts = list[int] | torch.Tensor


def rows_per_expert(counts: Counts, rows: int | None = None) -> float:
    """The average rows of the experts that have any. For counts still on the device
    (reading them would be a host sync) the estimate that as many experts as can have
    rows have them: ``rows / min(E, rows)``, ``rows`` being their sum (x's rows)."""
    if isinstance(counts, torch.Tensor):
        if rows is None:
            raise ValueError("rows_per_expert: counts on the device need their sum, rows")
        return rows / max(1, min(counts.shape[0], rows))
    used = sum(1 for c in counts if c)
    return sum(counts) / max(1, used)
