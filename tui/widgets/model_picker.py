"""Model picker: a modal list of catalogue models to load; dismisses with the chosen id."""

from __future__ import annotations

from collections.abc import Sequence

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Label, OptionList
from textual.widgets.option_list import Option


class ModelPicker(ModalScreen[str | None]):
    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, choices: Sequence[tuple[str, str]]) -> None:
        """``choices`` are (model id, hint such as "loaded on local" or "catalogue")."""
        super().__init__()
        self.choices = list(choices)

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label("Load a model  (enter: load · esc: cancel)", classes="dialog-title")
            if self.choices:
                options = [
                    Option(Text.assemble((model, "bold"), "  ", (hint, "dim")), id=model)
                    for model, hint in self.choices
                ]
                yield OptionList(*options, id="picker-options")
            else:
                yield Label("The catalogue is empty: add [[models]] to models.toml.")

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(event.option.id)

    def action_cancel(self) -> None:
        self.dismiss(None)
