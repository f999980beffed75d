"""Devices panel: every node's accelerators with VRAM bars, utilization, temperature and
their recent history as sparklines; a node without a GPU says so."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text
from textual.app import RenderResult
from textual.reactive import reactive
from textual.widget import Widget

from helexa.units import used_of_total
from tui.fleetview import DeviceRow, NodeRow
from tui.history import Trend

BAR_WIDTH = 16
SPARK_WIDTH = 12
BLOCKS = "▁▂▃▄▅▆▇█"
WIDE = 60  # below this many cells the bar halves and the temperature gives way


def fill_style(fraction: float) -> str:
    """Green while there is room, amber near the eviction line, red when full."""
    return "green" if fraction < 0.7 else "yellow" if fraction < 0.9 else "red"


def vram_bar(fraction: float, width: int = BAR_WIDTH) -> Text:
    filled = round(max(0.0, min(1.0, fraction)) * width)
    bar = Text("█" * filled, style=fill_style(fraction))
    bar.append("░" * (width - filled), style="grey37")
    return bar


def sparkline(values: Sequence[float], top: float, width: int = SPARK_WIDTH) -> Text:
    """The last ``width`` values as block characters on a fixed scale of 0..``top`` (a
    fixed scale: a flat 5% must not look like a full device)."""
    shown = list(values)[-width:]
    cells = "".join(
        BLOCKS[min(len(BLOCKS) - 1, int(max(0.0, v) / top * (len(BLOCKS) - 1) + 0.5))]
        for v in shown
    )
    return Text(cells.rjust(width), style="grey62")


def device_cells(d: DeviceRow, wide: bool = True) -> list[Text | str]:
    """A device's row: name, VRAM bar, used of total, utilization (and temperature)."""
    util = "—" if d.utilization_pct is None else f"{d.utilization_pct:.0f}%"
    if d.kind == "cpu":  # the node's heading says "no GPU: running on CPU"
        name = Text(f"  CPU {d.name}", overflow="ellipsis", no_wrap=True)
    else:
        name = Text(f"  {d.index} {d.name}", overflow="ellipsis", no_wrap=True)
    memory = ("RAM " if d.kind == "cpu" else "") + used_of_total(d.vram_used_mb, d.vram_total_mb)
    bar = vram_bar(d.vram_fraction, BAR_WIDTH if wide else BAR_WIDTH // 2)
    cells: list[Text | str] = [name, bar, memory, util]
    if wide:
        cells.append("—" if d.temp_c is None else f"{d.temp_c:.0f}°C")
    return cells


def history_cells(trend: Trend | None, wide: bool = True) -> list[Text | str]:
    """The row under a device: its utilization history under its name, its VRAM history
    under its VRAM bar (each on a fixed scale, so a flat 5% never looks busy)."""
    trend = trend or Trend()
    bar = BAR_WIDTH if wide else BAR_WIDTH // 2
    util = Text("    util ", style="dim") + sparkline(trend.utilization, 100.0, SPARK_WIDTH)
    cells: list[Text | str] = [util, sparkline(trend.vram, 1.0, bar), "", ""]
    return [*cells, ""] if wide else cells


def node_parts(
    node: NodeRow, trends: Mapping[tuple[str, int], Trend], width: int, history: bool = True
) -> list[RenderableType]:
    """A node's heading line (and why it is down), then a grid of its devices, each with
    its history under it (``history``: when there is room)."""
    mark, style = ("●", "bold green") if node.up else ("○", "bold red")
    head = Text(f"{mark} {node.name}", style=style, no_wrap=True, overflow="ellipsis")
    if node.hostname and node.hostname != node.name:
        head.append(f"  {node.hostname}", style="dim")
    parts: list[RenderableType] = [head]
    if not node.up:
        reason = f"  down: {node.error or 'not answering'}"
        parts.append(Text(reason, style="red", no_wrap=True, overflow="ellipsis"))
    if any(d.kind == "cpu" for d in node.devices):
        parts.append(Text("  no GPU: running on CPU", style="yellow", no_wrap=True))
    if node.devices:
        wide = width >= WIDE
        grid = Table.grid(padding=(0, 1), expand=True)
        grid.add_column(ratio=1, no_wrap=True, overflow="ellipsis")
        grid.add_column(width=BAR_WIDTH if wide else BAR_WIDTH // 2, no_wrap=True)
        grid.add_column(justify="right", no_wrap=True)
        grid.add_column(justify="right", width=4)
        if wide:
            grid.add_column(justify="right", width=5)
        for device in node.devices:
            grid.add_row(*device_cells(device, wide))
            if history and node.up:
                grid.add_row(*history_cells(trends.get((device.node, device.index)), wide))
        parts.append(grid)
    return parts


class DevicesPanel(Widget):
    """Renders :attr:`nodes` (and :attr:`trends`, each device's history), set each refresh."""

    nodes: reactive[tuple[NodeRow, ...]] = reactive((), layout=True)
    trends: reactive[dict[tuple[str, int], Trend]] = reactive(dict, always_update=True)
    history: reactive[bool] = reactive(True, layout=True)  # off on a short terminal

    def render(self) -> RenderResult:
        if not self.nodes:
            return Text("no nodes yet (waiting for the first poll)", style="dim")
        width = self.content_region.width or 200
        parts = (p for n in self.nodes for p in node_parts(n, self.trends, width, self.history))
        return Group(*parts)
