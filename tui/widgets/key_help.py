"""``?``: every key the dashboard answers to, with what it does, in one place."""

from __future__ import annotations

from collections.abc import Sequence

from rich.table import Table
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Label, Static

# Keys that are not footer bindings: a widget's own, or Textual's.
MORE_KEYS = (
    ("enter", "open the model or request under the cursor"),
    ("tab", "move between the models, requests and events panes"),
    ("/", "filter the requests (esc clears the filter)"),
    ("ctrl+p", "command palette (theme, screenshot, …)"),
)


class KeyHelp(ModalScreen[None]):
    BINDINGS = [Binding("escape,question_mark,q", "close", "Close")]

    def __init__(self, keys: Sequence[tuple[str, str]]) -> None:
        """``keys`` are (key, what it does), in the order to list them."""
        super().__init__()
        self.keys = [*keys, *MORE_KEYS]

    def compose(self) -> ComposeResult:
        grid = Table.grid(padding=(0, 2))
        grid.add_column(style="bold", no_wrap=True)
        grid.add_column()
        for key, what in self.keys:
            grid.add_row(key, what)
        with Vertical(classes="dialog"):
            yield Label("Keys  (esc: close)", classes="dialog-title")
            yield Static(grid)

    def action_close(self) -> None:
        self.dismiss(None)
