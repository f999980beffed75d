"""Detail views: a model (Enter on a model row) and a request (Enter on a request row).

Each is a modal screen that draws the facts it is given, label and value, wrapped in
full: the long error a table row cuts off is read here. The dashboard pushes new facts
down each refresh while one is open, so a live request's counters keep moving.
"""

from __future__ import annotations

import json
import time

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.reactive import reactive
from textual.screen import ModalScreen
from textual.widgets import Label, Static

from tui.traffic import RequestRecord

Facts = list[tuple[str, str]]


def facts_table(facts: Facts) -> Table:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column(overflow="fold")
    for label, value in facts:
        grid.add_row(label, Text(value, style="red" if "fail" in label else ""))
    return grid


class DetailScreen(ModalScreen[None]):
    """A title and :attr:`facts`; esc or q closes it."""

    BINDINGS = [Binding("escape,q,enter", "close", "Close")]

    facts: reactive[Facts] = reactive(list, always_update=True, init=False)

    def __init__(self, title: str, facts: Facts) -> None:
        super().__init__()
        self.heading = title
        self.body = Static(facts_table(facts), id="detail-body")
        self.set_reactive(DetailScreen.facts, facts)

    def compose(self) -> ComposeResult:
        with VerticalScroll(classes="dialog detail"):
            yield Label(f"{self.heading}  (esc: close)", classes="dialog-title")
            yield self.body

    def watch_facts(self, facts: Facts) -> None:
        self.body.update(facts_table(facts))

    def action_close(self) -> None:
        self.dismiss(None)


class ModelDetail(DetailScreen):
    def __init__(self, key: str, facts: Facts) -> None:
        super().__init__(f"Model {key}", facts)
        self.key = key


def _ms(seconds: float | None) -> str:
    return "—" if seconds is None else f"{seconds * 1000:.0f} ms"


def request_facts(r: RequestRecord, now: float) -> Facts:
    """Everything the dashboard knows about one request, its error in full."""
    info = r.info
    rate = r.rate_at(now)
    facts: Facts = [
        ("model", r.model),
        ("node", r.node or "— (not routed)"),
        ("api", r.api + (f" · {info.method} {info.route}" if info else "")),
        ("status", r.status),
    ]
    if r.error:
        facts.append(("error (failed)", r.error))
    if info is not None:
        facts += [
            ("client", info.client or "—"),
            ("user agent", info.agent or "—"),
            ("stream", "yes" if info.stream else "no"),
            ("parameters", json.dumps(info.params, sort_keys=True) if info.params else "—"),
        ]
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.wall_started))
    facts += [
        ("started", started),
        ("time to first token", _ms(r.ttft_s)),
        ("duration", f"{r.elapsed_at(now):.2f} s" + ("" if r.finished else " (so far)")),
        ("tokens", f"{r.prompt_tokens} prompt → {r.completion_tokens} generated"),
        ("decode rate", "—" if rate is None else f"{rate:.1f} tok/s"),
    ]
    return facts


class RequestDetail(DetailScreen):
    def __init__(self, request_id: int, facts: Facts) -> None:
        super().__init__(f"Request #{request_id}", facts)
        self.request_id = request_id
