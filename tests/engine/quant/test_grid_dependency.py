"""quant.grid_dependency: which launches ask for programmatic dependent launch. Whether the
kernels carry the wait is checked where they compile for sm_90 (the "compiles_for_hopper"
tests); that the early launch keeps decode's tokens is the CUDA tests' part."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest
import torch

from tests.engine.kernel_device import HAS_TRITON

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="needs Triton")


def test_only_a_hopper_or_later_launches_early(monkeypatch: pytest.MonkeyPatch) -> None:
    gd = importlib.import_module("helexa.engine.quant.grid_dependency")
    assert gd.launch(torch.device("cpu")) == {"PDL": False}
    monkeypatch.setattr(gd, "MODE", "launch")
    monkeypatch.setattr(gd, "_capable", {0: True, 1: False})  # an H200 beside an Ampere card
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert gd.launch(torch.device("cuda", 0)) == {"PDL": True, "launch_pdl": True}
    assert gd.launch(torch.device("cuda", 1)) == {"PDL": False}
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the interpreter has no PTX
    assert gd.launch(torch.device("cuda", 0)) == {"PDL": False}
    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.setattr(gd, "MODE", "off")
    assert gd.launch(torch.device("cuda", 0)) == {"PDL": False}


def test_an_unknown_mode_is_refused_at_import() -> None:
    env = {**os.environ, "HELEXA_PDL": "prefetch"}
    done = subprocess.run(
        [sys.executable, "-c", "import helexa.engine.quant.grid_dependency"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode != 0
    assert "HELEXA_PDL must be one of off, launch, got 'prefetch'" in done.stderr
