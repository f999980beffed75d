"""The per-shape kernel choice kept on disk beside Triton's tuning."""

from __future__ import annotations

from pathlib import Path

import pytest

from helexa.engine.quant.kernel_choices import KernelChoices

NAMES = ("affine", "int8")
KEY = (1, 4096, 4096, 12, False)


def test_a_choice_survives_a_restart_per_gpu_and_shape(tmp_path: Path) -> None:
    first = KernelChoices(str(tmp_path), names=NAMES)
    assert first.get("NVIDIA H200", KEY) is None
    first.put("NVIDIA H200", KEY, "affine")
    first.put("NVIDIA H200", (4, 4096, 4096, 12, False), "affine")
    again = KernelChoices(str(tmp_path), names=NAMES)  # a new process
    assert again.get("NVIDIA H200", KEY) == "affine"
    assert again.get("NVIDIA H200", (4, 4096, 4096, 12, False)) == "affine"
    assert again.get("NVIDIA GeForce RTX 4090", KEY) is None  # another GPU measures its own
    assert [p.name for p in tmp_path.iterdir()] == [KernelChoices.FILE]  # no temp file left


@pytest.mark.parametrize(
    "content", ["{not json", "[1, 2]", '{"NVIDIA H200|(1, 4096, 4096, 12, False)": "gone"}']
)
def test_unreadable_or_foreign_content_is_nothing_remembered(tmp_path: Path, content: str) -> None:
    (tmp_path / KernelChoices.FILE).write_text(content)
    choices = KernelChoices(str(tmp_path), names=NAMES)
    assert choices.get("NVIDIA H200", KEY) is None
    choices.put("NVIDIA H200", KEY, "affine")  # and it is replaced by what is measured
    assert KernelChoices(str(tmp_path), names=NAMES).get("NVIDIA H200", KEY) == "affine"


def test_an_unwritable_cache_dir_only_costs_a_new_measurement(tmp_path: Path) -> None:
    blocked = tmp_path / "a-file"  # where the directory should be: no write can succeed
    blocked.write_text("")
    choices = KernelChoices(str(blocked / "triton"), names=NAMES)
    choices.put("NVIDIA H200", KEY, "affine")  # no exception
    assert choices.get("NVIDIA H200", KEY) == "affine"  # kept for this process


def test_no_cache_dir_keeps_choices_in_memory_only() -> None:
    choices = KernelChoices(None, names=NAMES)
    choices.put("cpu", KEY, "affine")
    assert choices.get("cpu", KEY) == "affine"
