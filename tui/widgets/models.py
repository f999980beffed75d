"""Models table: one row per model per node; the row under the cursor is what the admin
keys (unload, pin, evict) act on, and Enter opens the model's details."""

from __future__ import annotations

from dataclasses import dataclass

from rich.text import Text

from helexa.units import mib_text
from tui.fleetview import ModelRow
from tui.widgets.table import Cell, Column, PriorityTable

COLUMNS = (
    Column("Model", 0),
    Column("Node", 1),
    Column("Devices", 5),
    Column("Status", 0),
    Column("VRAM", 2),
    Column("Pinned", 3),
    Column("Last used", 4),
    Column("In-flight", 2),
)
STATUS_STYLE = {
    "loaded": "green",
    "loading": "cyan",
    "evicting": "bold medium_purple1",  # being unloaded (evictor or operator): going away
    "failed": "bold red",
    "down": "red",  # listed by a node that stopped answering: not servable until it returns
    "unloaded": "dim",
}
REASON_CELLS = 48  # of a failure in its row at most; Enter shows all of it


@dataclass(frozen=True)
class ModelLine:
    """A row as the table draws it: the fleet's row, an admin op the dashboard has in
    flight for it, and why its last load failed (kept until it loads)."""

    row: ModelRow
    pending: str | None = None
    failure: str | None = None


def ago(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    if seconds < 60:
        return f"{seconds:.0f}s ago"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.1f}h ago"


def status_cell(
    row: ModelRow,
    pending: str | None = None,
    failure: str | None = None,
    cells: int = REASON_CELLS,
) -> Text:
    """Status text; an admin op the TUI has in flight for the row overrides it, and a
    load that failed says so (with why) until the model loads."""
    if pending is not None:
        return Text(f"{pending}…", style="yellow")
    if row.status == "loading" and row.progress is not None:
        pct = max(0.0, min(1.0, row.progress))
        filled = round(pct * 8)
        text = Text(f"loading {pct:4.0%} ", style="cyan")
        text.append("▰" * filled + "▱" * (8 - filled), style="cyan")
        return text
    reason = row.error if row.status == "failed" else None
    if failure and row.status in ("unloaded", "failed"):
        reason = failure
    if reason:
        text = Text("failed", style=STATUS_STYLE["failed"])
        text.append(f" {reason}", style="red")
        text.truncate(cells, overflow="ellipsis")
        return text
    return Text(row.status, style=STATUS_STYLE.get(row.status, "yellow"))


def row_cells(line: ModelLine, reason_cells: int = REASON_CELLS) -> tuple[Cell, ...]:
    row = line.row
    return (
        row.id,
        row.node,
        ",".join(str(d) for d in row.devices) or "—",
        status_cell(row, line.pending, line.failure, reason_cells),
        mib_text(row.vram_mb) if row.vram_mb else "—",
        Text("pinned", style="bold magenta") if row.pinned else Text("—", style="dim"),
        ago(row.idle_s),
        Text(str(row.in_flight), style="bold" if row.in_flight else "dim"),
    )


class ModelsTable(PriorityTable[ModelLine]):
    """Shows :attr:`items` (ModelLines); Enter posts :class:`ModelsTable.Opened`."""

    COLUMNS = COLUMNS

    class Opened(PriorityTable.Opened):
        """Enter on a model row (``key`` is the row's ``node/id``)."""

    def key(self, item: ModelLine) -> str:
        return item.row.key

    def cells(self, item: ModelLine) -> tuple[Cell, ...]:
        """A failure's reason is cut to what the table's width leaves it, so that on a
        small terminal it does not push the table into scrolling sideways."""
        width = (self.size.width or 200) - self.styles.scrollbar_size_vertical
        model_cells = max((len(i.row.id) for i in self.items), default=0) + 2  # padding
        room = width - model_cells - 2  # the status column's own padding
        return row_cells(item, max(16, min(REASON_CELLS, room)))

    @property
    def selected(self) -> ModelRow | None:
        line = self.by_key.get(self.selected_key or "")
        return None if line is None else line.row
