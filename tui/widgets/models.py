"""Models table: one row per model per node, the row under the cursor is what the
admin keys (unload, pin, evict) act on."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from rich.text import Text
from textual.widgets import DataTable

from tui.fleetview import ModelRow

COLUMNS = ("Model", "Node", "Devices", "Status", "VRAM", "Pinned", "Last used", "In-flight")
STATUS_STYLE = {
    "loaded": "green",
    "loading": "cyan",
    "evicting": "bold medium_purple1",  # being unloaded (evictor or operator): going away
    "failed": "bold red",
    "down": "red",  # listed by a node that stopped answering: not servable until it returns
    "unloaded": "dim",
}


def ago(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    if seconds < 60:
        return f"{seconds:.0f}s ago"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.1f}h ago"


def status_cell(row: ModelRow, pending: str | None = None) -> Text:
    """Status text; an admin op the TUI has in flight for the row overrides it."""
    if pending is not None:
        return Text(f"{pending}…", style="yellow")
    if row.status == "loading" and row.progress is not None:
        pct = max(0.0, min(1.0, row.progress))
        filled = round(pct * 8)
        text = Text(f"loading {pct:4.0%} ", style="cyan")
        text.append("▰" * filled + "▱" * (8 - filled), style="cyan")
        return text
    text = Text(row.status, style=STATUS_STYLE.get(row.status, "yellow"))
    if row.status == "failed" and row.error:
        text.append(f" {row.error}", style="red")
    return text


def row_cells(row: ModelRow, pending: str | None = None) -> tuple[str | Text, ...]:
    return (
        row.id,
        row.node,
        ",".join(str(d) for d in row.devices) or "—",
        status_cell(row, pending),
        f"{row.vram_mb / 1024:.1f} GiB" if row.vram_mb else "—",
        Text("pinned", style="bold magenta") if row.pinned else Text("—", style="dim"),
        ago(row.idle_s),
        Text(str(row.in_flight), style="bold" if row.in_flight else "dim"),
    )


class ModelsTable(DataTable[str | Text]):
    """Shows the rows it is given, keeping the cursor on the same model across refreshes."""

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id, cursor_type="row", zebra_stripes=True)
        self.rows_by_key: dict[str, ModelRow] = {}
        self._shown: tuple[tuple[ModelRow, str | None], ...] = ()

    def on_mount(self) -> None:
        self.add_columns(*COLUMNS)

    @property
    def selected(self) -> ModelRow | None:
        if not self.row_count:
            return None
        key = self.coordinate_to_cell_key(self.cursor_coordinate).row_key.value
        return self.rows_by_key.get(key or "")

    def show(self, models: Sequence[ModelRow], pending: Mapping[str, str] | None = None) -> None:
        """Update changed cells in place; rebuild only when rows come, go or move (so the
        cursor and scroll position survive the once-a-second refresh)."""
        pending = pending or {}
        shown = tuple((m, pending.get(m.key)) for m in models)
        if shown == self._shown:
            return
        before = {m.key: row_cells(m, op) for m, op in self._shown}
        same_rows = [m.key for m, _ in self._shown] == [m.key for m in models]
        self._shown = shown
        self.rows_by_key = {m.key: m for m in models}
        if same_rows:
            for model, op in shown:
                for column, (old, new) in enumerate(
                    zip(before[model.key], row_cells(model, op), strict=True)
                ):
                    if old != new:
                        self.update_cell(model.key, self.ordered_columns[column].key, new)
            return
        keep = (
            self.coordinate_to_cell_key(self.cursor_coordinate).row_key.value
            if self.row_count
            else None
        )
        self.clear()
        for model, op in shown:
            self.add_row(*row_cells(model, op), key=model.key)
        if keep in self.rows_by_key:
            self.move_cursor(row=self.get_row_index(keep))
