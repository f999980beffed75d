"""Where the Triton kernel tests run: on CUDA when there is a GPU, else on the CPU through
Triton's interpreter (``TRITON_INTERPRET=1``), else nowhere (they skip). One place, so the
kernel test files agree on what a CPU-only CI machine runs."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from typing import Any

import pytest
import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if HAS_TRITON and torch.cuda.is_available():
    DEVICE = "cuda"
elif HAS_TRITON and INTERPRET:
    DEVICE = "cpu"
else:
    DEVICE = ""


def needs_kernels(test: Callable[..., Any]) -> Callable[..., Any]:
    """Marks a kernel test ``cuda`` and skips it where the kernels cannot run."""
    skip = pytest.mark.skipif(not DEVICE, reason="needs CUDA + Triton (or TRITON_INTERPRET=1)")
    return pytest.mark.cuda(skip(test))
