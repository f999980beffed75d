"""Each device's recent utilization and VRAM use, for the devices panel's sparklines.

The fleet snapshot is a reading of now; a trend needs the readings before it. The
dashboard adds one reading per device per refresh and keeps the last ``keep``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from tui.fleetview import DeviceRow


@dataclass(frozen=True)
class Trend:
    """A device's readings, oldest first: utilization in percent, VRAM as a fraction."""

    utilization: tuple[float, ...] = ()
    vram: tuple[float, ...] = ()


class DeviceHistory:
    def __init__(self, keep: int = 60) -> None:
        self.keep = keep
        self._util: dict[tuple[str, int], deque[float]] = {}
        self._vram: dict[tuple[str, int], deque[float]] = {}

    def add(self, devices: Iterable[DeviceRow]) -> None:
        for d in devices:
            key = (d.node, d.index)
            util = self._util.setdefault(key, deque(maxlen=self.keep))
            util.append(d.utilization_pct or 0.0)
            self._vram.setdefault(key, deque(maxlen=self.keep)).append(d.vram_fraction)

    def trends(self) -> dict[tuple[str, int], Trend]:
        return {k: Trend(tuple(self._util[k]), tuple(self._vram[k])) for k in self._util}
