"""bench/grid_dependency.py at CI size on the CPU: every mode loads, decodes and lands in
the table and modes.json, so a GPU call cannot fail on the script itself (the modes only
differ on a Hopper)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.grid_dependency import main
from bench.synthetic import preset_shape, write_shape


def test_the_modes_bench_runs_on_a_tiny_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    gguf = tmp_path / "tiny.gguf"
    write_shape(gguf, preset_shape("tiny"), "Q8_0", "cpu")
    args = ["--gguf", str(gguf), "--device", "cpu", "--modes", "off,launch", "--gen", "4"]
    assert main([*args, "--prompt", "4", "--repeat", "2", "--out", str(tmp_path)]) == 0

    report = json.loads((tmp_path / "modes.json").read_text())
    assert [r["mode"] for r in report["runs"]] == ["off", "launch"]
    assert report["llama"] is None
    for run in report["runs"]:
        assert len(run["rates"]) == 2 and all(rate > 0 for rate in run["rates"])
        assert run["best tok/s"] == max(run["rates"])
    table = capsys.readouterr().out
    assert "| off |" in table and "| launch |" in table and "| llama-bench tg" not in table
