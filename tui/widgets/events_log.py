"""Events pane: loads, evictions, failures, nodes down and up, and the gateway's log
lines, kept (up to its scrollback) and scrollable, so an error is there to read later."""

from __future__ import annotations

import time

from rich.text import Text
from textual.reactive import reactive
from textual.widgets import RichLog

from tui.events import Event

LEVEL_STYLE = {"info": "", "warning": "yellow", "error": "bold red"}


def format_event(e: Event) -> Text:
    line = Text(time.strftime("%H:%M:%S ", time.localtime(e.wall)), style="dim")
    line.append(f"{e.source:<9} ", style="dim")
    line.append(e.text, style=LEVEL_STYLE[e.level])
    return line


class EventsLog(RichLog):
    """Appends the :attr:`events` it has not shown yet (they come down each refresh)."""

    events: reactive[tuple[Event, ...]] = reactive((), always_update=True, init=False)

    def __init__(self, *, id: str | None = None) -> None:
        # min_width: RichLog's default (78) would scroll a narrow pane sideways
        super().__init__(id=id, max_lines=1000, wrap=True, markup=False, min_width=20)
        self.last_seq = 0

    def watch_events(self, events: tuple[Event, ...]) -> None:
        for event in events:
            if event.seq > self.last_seq:
                self.write(format_event(event))
                self.last_seq = event.seq
