"""Devices panel: every node's accelerators with VRAM bars, utilization and temperature."""

from __future__ import annotations

from collections.abc import Sequence

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text
from textual.app import RenderResult
from textual.widget import Widget

from tui.fleetview import DeviceRow, NodeRow

BAR_WIDTH = 16


def fill_style(fraction: float) -> str:
    """Green while there is room, amber near the eviction line, red when full."""
    return "green" if fraction < 0.7 else "yellow" if fraction < 0.9 else "red"


def vram_bar(fraction: float, width: int = BAR_WIDTH) -> Text:
    filled = round(max(0.0, min(1.0, fraction)) * width)
    bar = Text("█" * filled, style=fill_style(fraction))
    bar.append("░" * (width - filled), style="grey37")
    return bar


def gib(mb: int) -> str:
    return f"{mb / 1024:.1f}"


def device_cells(d: DeviceRow) -> tuple[Text, Text, str, str, str]:
    util = "—" if d.utilization_pct is None else f"{d.utilization_pct:.0f}%"
    temp = "—" if d.temp_c is None else f"{d.temp_c:.0f}°C"
    return (
        Text(f"  {d.index} {d.name}", overflow="ellipsis", no_wrap=True),
        vram_bar(d.vram_fraction),
        f"{gib(d.vram_used_mb)}/{gib(d.vram_total_mb)} GiB",
        util,
        temp,
    )


def node_parts(node: NodeRow) -> list[RenderableType]:
    """A node's heading line (and why it is down), then a grid of its devices."""
    mark, style = ("●", "bold green") if node.up else ("○", "bold red")
    head = Text(f"{mark} {node.name}", style=style, no_wrap=True, overflow="ellipsis")
    if node.hostname and node.hostname != node.name:
        head.append(f"  {node.hostname}", style="dim")
    parts: list[RenderableType] = [head]
    if not node.up:
        reason = f"  down: {node.error or 'not answering'}"
        parts.append(Text(reason, style="red", no_wrap=True, overflow="ellipsis"))
    if node.devices:
        grid = Table.grid(padding=(0, 1), expand=True)
        grid.add_column(ratio=1, no_wrap=True)
        grid.add_column(width=BAR_WIDTH)
        grid.add_column(justify="right", no_wrap=True)
        grid.add_column(justify="right", width=4)
        grid.add_column(justify="right", width=5)
        for device in node.devices:
            grid.add_row(*device_cells(device))
        parts.append(grid)
    return parts


class DevicesPanel(Widget):
    """Renders the nodes it was last shown; the app pushes new rows on each refresh."""

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.nodes: tuple[NodeRow, ...] = ()

    def show(self, nodes: Sequence[NodeRow]) -> None:
        nodes = tuple(nodes)
        if nodes != self.nodes:
            self.nodes = nodes
            self.refresh(layout=True)

    def render(self) -> RenderResult:
        if not self.nodes:
            return Text("no nodes yet (waiting for the first poll)", style="dim")
        return Group(*(part for node in self.nodes for part in node_parts(node)))
