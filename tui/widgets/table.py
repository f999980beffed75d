"""A data table whose columns give way by priority when the terminal is narrow.

The models and requests tables show more than fits at 80 columns. Rather than let every
column shrink into ellipses, each column has a priority: the ones the operator needs
most (the model, its status) stay, and the least needed go first (the devices, a
rate), measured on what the cells hold right now. The rows come down as one reactive
value; a refresh that changes a few cells updates those cells only, so the cursor and
scroll position survive the once-a-second refresh.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Generic, TypeVar

from rich.text import Text
from textual import events
from textual.message import Message
from textual.reactive import reactive
from textual.widgets import DataTable

Cell = str | Text
Item = TypeVar("Item")


@dataclass(frozen=True)
class Column:
    label: str
    priority: int  # 0 stays longest; higher numbers give way first


def cell_width(cell: Cell) -> int:
    return cell.cell_len if isinstance(cell, Text) else Text(cell).cell_len


def fitting(columns: Sequence[Column], rows: Sequence[Sequence[Cell]], width: int) -> list[int]:
    """Indexes of the columns that fit in ``width`` cells, dropping by priority (the
    highest number first, the rightmost among equals); the top priority always stays."""
    need = [
        max([cell_width(c.label), *(cell_width(row[i]) for row in rows)]) + 2  # cell padding
        for i, c in enumerate(columns)
    ]
    shown = list(range(len(columns)))
    by_giving_way = sorted(shown, key=lambda i: (-columns[i].priority, -i))
    for i in by_giving_way:
        if sum(need[j] for j in shown) <= width or columns[i].priority == 0:
            break
        shown.remove(i)
    return shown


class PriorityTable(DataTable[Cell], Generic[Item]):
    """Rows of ``Item`` (set :attr:`items`), one per :meth:`key`, cells by :meth:`cells`."""

    COLUMNS: ClassVar[tuple[Column, ...]] = ()

    items: reactive[tuple[Item, ...]] = reactive((), always_update=True, init=False)

    class Opened(Message):
        """Enter on a row: the app opens what the row stands for."""

        def __init__(self, key: str) -> None:
            super().__init__()
            self.key = key

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id, cursor_type="row", zebra_stripes=True)
        self.by_key: dict[str, Item] = {}
        self._rows: list[tuple[str, tuple[Cell, ...]]] = []
        self._shown: list[int] = []

    def key(self, item: Item) -> str:
        raise NotImplementedError

    def cells(self, item: Item) -> tuple[Cell, ...]:
        raise NotImplementedError

    @property
    def selected_key(self) -> str | None:
        if not self.row_count:
            return None
        return self.coordinate_to_cell_key(self.cursor_coordinate).row_key.value

    def watch_items(self, items: tuple[Item, ...]) -> None:
        self._redraw([(self.key(item), self.cells(item)) for item in items])
        self.by_key = {self.key(item): item for item in items}

    def on_resize(self, event: events.Resize) -> None:
        # Cells may depend on the width (a long reason is cut to fit): draw them again.
        self._redraw([(self.key(item), self.cells(item)) for item in self.items], force=False)

    def _redraw(self, rows: list[tuple[str, tuple[Cell, ...]]], force: bool = True) -> None:
        # Leave room for the vertical scrollbar, which appears once rows outgrow the table.
        width = (self.size.width or 200) - self.styles.scrollbar_size_vertical
        shown = fitting(self.COLUMNS, [cells for _, cells in rows], width)
        same_layout = shown == self._shown and [k for k, _ in rows] == [k for k, _ in self._rows]
        if same_layout and not force and rows == self._rows:
            return
        if same_layout:
            for (key, new), (_, old) in zip(rows, self._rows, strict=True):
                for column, i in zip(self.ordered_columns, shown, strict=True):
                    if new[i] != old[i]:
                        self.update_cell(key, column.key, new[i], update_width=True)
            self._rows = rows
            return
        # The row under the cursor stays under it while the operator is in the table; one
        # nobody is looking at stays at the top (a row followed down would scroll the view).
        keep = self.selected_key if self.has_focus else None
        self.clear(columns=shown != self._shown)
        if shown != self._shown or not self.columns:
            self.add_columns(*(self.COLUMNS[i].label for i in shown))
        self._shown, self._rows = shown, rows
        for key, cells in rows:
            self.add_row(*(cells[i] for i in shown), key=key)
        if keep is not None and any(k == keep for k, _ in rows):
            self.move_cursor(row=self.get_row_index(keep))

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        event.stop()
        if event.row_key.value is not None:
            self.post_message(self.Opened(event.row_key.value))
