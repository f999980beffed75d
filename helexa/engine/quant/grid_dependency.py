"""Programmatic dependent launch (Hopper's grid dependency control) for the decode step's
Triton kernels.

A batch-1 decode step is a chain of ~300-600 small kernels, each waiting for the one
before: without help, a kernel's programs are scheduled only once the previous grid has
drained, and on a small model that gap between kernels is a sixth of the step. Launched
with the programmatic stream serialization attribute (Triton's ``launch_pdl``), a
kernel's programs are scheduled as soon as every program of the kernel before has passed
:func:`await_inputs`, and run up to that point (address arithmetic, loads of weights)
while the kernel before still computes.

The rule that keeps this correct: a kernel launched so reads nothing a kernel before it
writes, and writes nothing at all, until :func:`await_inputs` returns, which is when the
kernel before has finished and its writes are visible; as that kernel waited likewise for
its own predecessor, every earlier kernel has finished too. A kernel launched without the
attribute (torch's, the prefill GEMMs) waits for the one before it in full, as always.

Measured on an H200 (bench/grid_dependency.py, tg128 through ``LoadedModel.tokens``): the
0.6B 876 -> 1 032 tok/s, the 30B-A3B 334 -> 361, the 8B unchanged (its kernels are long
enough that the gaps were ~0.3 µs). Prefetching each matvec's weight rows into L2 before
the wait, and the router pulling its picks' blocks in, were tried and made decode slower
(the 8B 288 -> 275; the 30B's bulk prefetches, issued from one SM, 361 -> 136).

``HELEXA_PDL=off`` launches every kernel the ordinary way. Compute capability 9.0 and
later has the instructions; elsewhere (older cards, the CPU interpreter) the kernels
compile without them.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

MODES = ("off", "launch")
MODE = os.environ.get("HELEXA_PDL", "launch")
if MODE not in MODES:
    raise ValueError(f"HELEXA_PDL must be one of {', '.join(MODES)}, got {MODE!r}")

_capable: dict[int, bool] = {}


def enabled(device: torch.device) -> bool:
    """Whether kernels on ``device`` launch early (the mode is read at each launch, so a
    benchmark may switch it between loads)."""
    if MODE == "off" or device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _capable:
        _capable[index] = torch.cuda.get_device_capability(index) >= (9, 0)
    return _capable[index]


def launch(device: torch.device) -> dict[str, Any]:
    """The launch arguments of a kernel that calls :func:`await_inputs`: its ``PDL``
    constexpr, and Triton's ``launch_pdl`` where the device has grid dependency control."""
    if enabled(device):
        return {"PDL": True, "launch_pdl": True}
    return {"PDL": False}


@triton.jit
def await_inputs(PDL: tl.constexpr):
    """Wait for the kernel before to finish (its writes visible), then let the kernel
    after be scheduled: call before the first dependent read or any write."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
