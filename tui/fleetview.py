"""The dashboard's reading of ``Fleet.snapshot()``: small frozen rows the widgets render.

The snapshot is the JSON-ready fleet table the gateway also serves at ``/admin/fleet``
and ``helexa status`` prints, so the TUI shows exactly what the gateway routes on. This
module is the one place that knows the snapshot's keys; widgets take the rows below and
never look inside the dict, so a change in the snapshot is one edit here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class DeviceRow:
    node: str
    index: int
    name: str
    vram_used_mb: int
    vram_total_mb: int
    utilization_pct: float | None = None
    temp_c: float | None = None
    kind: str = "cuda"  # "cpu": no GPU, and "VRAM" is the host's RAM

    @property
    def vram_fraction(self) -> float:
        return min(1.0, self.vram_used_mb / self.vram_total_mb) if self.vram_total_mb else 0.0


@dataclass(frozen=True)
class NodeRow:
    name: str
    up: bool
    hostname: str = ""
    error: str | None = None
    devices: tuple[DeviceRow, ...] = ()


@dataclass(frozen=True)
class ModelRow:
    id: str
    node: str
    status: str  # loaded | loading | evicting | unloaded | failed | down ...
    devices: tuple[int, ...] = ()
    progress: float | None = None  # 0..1 while loading
    vram_mb: int = 0
    pinned: bool = False
    idle_s: float | None = None  # seconds since last use; None = never used
    in_flight: int = 0
    error: str | None = None

    @property
    def key(self) -> str:
        """Stable row identity: a model may be served by several nodes."""
        return f"{self.node}/{self.id}"


@dataclass(frozen=True)
class FleetView:
    nodes: tuple[NodeRow, ...] = ()
    models: tuple[ModelRow, ...] = ()

    def row(self, key: str) -> ModelRow | None:
        return next((m for m in self.models if m.key == key), None)


def _opt_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _device(node: str, d: Mapping[str, Any]) -> DeviceRow:
    total = int(d.get("vram_total_mb") or 0)
    used = d.get("vram_used_mb")
    if used is None and d.get("vram_free_mb") is not None:
        used = total - int(d["vram_free_mb"])
    return DeviceRow(
        node=node,
        index=int(d.get("index", 0)),
        name=str(d.get("name", "")),
        vram_used_mb=int(used or 0),
        vram_total_mb=total,
        utilization_pct=_opt_float(d.get("utilization_pct")),
        temp_c=_opt_float(d.get("temp_c")),
        kind=str(d.get("kind") or "cuda"),
    )


def _node(n: Mapping[str, Any]) -> NodeRow:
    name = str(n.get("name", ""))
    return NodeRow(
        name=name,
        up=bool(n.get("up", False)),
        hostname=str(n.get("hostname") or ""),
        error=n.get("error"),
        devices=tuple(_device(name, d) for d in n.get("devices") or ()),
    )


def _model(m: Mapping[str, Any]) -> ModelRow:
    return ModelRow(
        id=str(m["id"]),
        node=str(m.get("node") or ""),
        status=str(m.get("status", "unloaded")),
        devices=tuple(int(i) for i in m.get("devices") or ()),
        progress=_opt_float(m.get("progress")),
        vram_mb=int(m.get("vram_used_mb") or m.get("vram_mb") or 0),
        pinned=bool(m.get("pinned", False)),
        idle_s=_opt_float(m.get("idle_s")),
        in_flight=int(m.get("in_flight") or 0),
        error=m.get("error"),
    )


def fleet_view(snapshot: Mapping[str, Any]) -> FleetView:
    """Read a ``Fleet.snapshot()`` dict into rows (missing optional keys get defaults)."""
    return FleetView(
        nodes=tuple(_node(n) for n in snapshot.get("nodes") or ()),
        models=tuple(_model(m) for m in snapshot.get("models") or ()),
    )
