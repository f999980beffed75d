"""The devices a test node reports: one :class:`Gpu` per device, turned into the
discovery and health answers a neuron gives, so every double states its GPUs once."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from helexa.neuron.interface import DeviceHealth, DeviceInfo, Discovery, Health


@dataclass(frozen=True)
class Gpu:
    """One device: its name and size, and what a health poll reads on it."""

    name: str
    total_mb: int
    used_mb: int = 0
    utilization_pct: float | None = None
    temp_c: float | None = None


def discovery(hostname: str, gpus: Sequence[Gpu], os: str = "test") -> Discovery:
    """``gpus`` as ``GET /discovery`` lists them, indexed in order."""
    devices = [
        DeviceInfo(index=i, name=g.name, vram_total_mb=g.total_mb) for i, g in enumerate(gpus)
    ]
    return Discovery(hostname=hostname, os=os, devices=devices)


def health(gpus: Sequence[Gpu], uptime_secs: float = 1.0) -> Health:
    """``gpus`` as ``GET /health`` reads them: free is whatever is not used."""
    devices = [
        DeviceHealth(
            index=i,
            vram_used_mb=g.used_mb,
            vram_free_mb=g.total_mb - g.used_mb,
            utilization_pct=g.utilization_pct,
            temp_c=g.temp_c,
        )
        for i, g in enumerate(gpus)
    ]
    return Health(uptime_secs=uptime_secs, devices=devices)
