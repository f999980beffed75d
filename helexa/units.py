"""Sizes as people read them, one rule everywhere (the dashboard, ``helexa status``,
``helexa list``, ``helexa pull``): binary units, MiB below a GiB and GiB from there on,
always with the unit, so "0.0" and "6 MiB" can never describe the same device twice."""

from __future__ import annotations

MIB = 1 << 20
GIB = 1 << 30


def size_text(n_bytes: float) -> str:
    """``512 B``, ``40.0 KiB``, ``6 MiB``, ``5.7 GiB``: whole MiB under a GiB, one decimal
    above (the precision a VRAM budget is planned in)."""
    if n_bytes < 1024:
        return f"{n_bytes:.0f} B"
    if n_bytes < MIB:
        return f"{n_bytes / 1024:.1f} KiB"
    if n_bytes < GIB:
        return f"{n_bytes / MIB:.0f} MiB"
    return f"{n_bytes / GIB:.1f} GiB"


def mib_text(mb: float | None) -> str:
    """A size the fleet reports in MiB (VRAM, model sizes); ``-`` when unknown."""
    return "-" if mb is None else size_text(mb * MIB)


def used_of_total(used_mb: float | None, total_mb: float | None) -> str:
    """``5.7 GiB / 24.0 GiB``: both ends in the one rule, so the reader compares like with like."""
    return f"{mib_text(used_mb)} / {mib_text(total_mb)}"
