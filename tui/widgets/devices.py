"""Devices panel: every node's accelerators with VRAM bars, utilization and temperature."""

from __future__ import annotations

from collections.abc import Sequence

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
        table = Table.grid(padding=(0, 1), expand=True)
        table.add_column(ratio=1, no_wrap=True)
        table.add_column(width=BAR_WIDTH)
        table.add_column(justify="right", no_wrap=True)
        table.add_column(justify="right", width=4)
        table.add_column(justify="right", width=5)
        for node in self.nodes:
            mark, style = ("●", "bold green") if node.up else ("○", "bold red")
            head = Text(f"{mark} {node.name}", style=style)
            if node.hostname and node.hostname != node.name:
                head.append(f"  {node.hostname}", style="dim")
            if not node.up:
                head.append(f"  down: {node.error or 'not answering'}", style="red")
            table.add_row(head)
            for device in node.devices:
                table.add_row(*device_cells(device))
        return table
