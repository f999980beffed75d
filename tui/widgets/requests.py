"""Requests pane: a row per request, those in flight on top with a live token counter
and rate, then the finished ones, newest first; ``/`` filters, Enter opens a request."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.reactive import reactive
from textual.widgets import Input

from tui.traffic import RequestRecord
from tui.widgets.table import Cell, Column, PriorityTable

STATUS_STYLE = {"ok": "green", "error": "bold red", "cancelled": "yellow", "streaming": "cyan"}
COLUMNS = (
    Column("#", 0),
    Column("Started", 4),
    Column("Model", 0),
    Column("Node", 3),
    Column("API", 5),
    Column("Status", 0),
    Column("TTFT", 3),
    Column("Tokens", 1),
    Column("tok/s", 1),
    Column("Time", 2),
    Column("Error", 6),
)
ERROR_CELLS = 60  # of an error in its row; Enter shows all of it


@dataclass(frozen=True)
class RequestLine:
    """A request as drawn at ``now`` (a live request's rate and time move with it)."""

    record: RequestRecord
    now: float


def matches(record: RequestRecord, needle: str) -> bool:
    """Whether ``needle`` (any case) is in what the row shows or the request came from."""
    if not needle:
        return True
    info = record.info
    hay = [record.model, record.node, record.api, record.status, record.error or "", str(record.id)]
    if info is not None:
        hay += [info.client, info.agent, info.route]
    return needle.lower() in " ".join(hay).lower()


def request_cells(line: RequestLine) -> tuple[Cell, ...]:
    r, now = line.record, line.now
    rate = r.rate_at(now)
    error = Text(r.error or "", style="red")
    error.truncate(ERROR_CELLS, overflow="ellipsis")
    status = r.status if r.status != "streaming" else "streaming" if r.first_token else "waiting"
    return (
        str(r.id),
        time.strftime("%H:%M:%S", time.localtime(r.wall_started)),
        r.model,
        r.node or "—",
        r.api,
        Text(status, style=STATUS_STYLE.get(r.status, "")),
        "—" if r.ttft_s is None else f"{r.ttft_s * 1000:.0f} ms",
        f"{r.prompt_tokens}→{r.completion_tokens}",
        "—" if rate is None else f"{rate:.1f}",
        f"{r.elapsed_at(now):.1f} s",
        error,
    )


class RequestsTable(PriorityTable[RequestLine]):
    COLUMNS = COLUMNS

    class Opened(PriorityTable.Opened):
        """Enter on a request row (``key`` is the request's number)."""

    def key(self, item: RequestLine) -> str:
        return str(item.record.id)

    def cells(self, item: RequestLine) -> tuple[Cell, ...]:
        return request_cells(item)


def ordered(records: Sequence[RequestRecord]) -> list[RequestRecord]:
    """In flight first (oldest first: the one waiting longest on top), then finished,
    the latest to finish first."""
    live = [r for r in records if r.finished is None]
    done = sorted((r for r in records if r.finished is not None), key=lambda r: -r.done_seq)
    return live + done


class RequestsPane(Vertical):
    """The table and its filter; :attr:`records` and :attr:`now` come down each refresh."""

    BINDINGS = [Binding("escape", "clear_filter", "Clear filter", show=False)]

    records: reactive[tuple[RequestRecord, ...]] = reactive((), always_update=True, init=False)
    now: reactive[float] = reactive(0.0, init=False)
    filtering: reactive[bool] = reactive(False, init=False)  # the filter field is open
    needle: reactive[str] = reactive("", init=False)

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.table = RequestsTable(id="requests-table")
        self.filter_input = Input(placeholder="filter: model, node, status, client…")
        self.filter_input.id = "request-filter"

    def compose(self) -> ComposeResult:
        yield self.filter_input
        yield self.table

    def on_mount(self) -> None:
        self.filter_input.display = False

    def _show(self) -> None:
        shown = [r for r in ordered(self.records) if matches(r, self.needle)]
        self.table.items = tuple(RequestLine(r, self.now) for r in shown)
        title = f"Requests · filter “{self.needle}”" if self.needle else "Requests"
        live = sum(r.finished is None for r in self.records)
        self.border_title = f"{title} · {live} in flight" if live else title

    def watch_records(self) -> None:
        self._show()

    def watch_needle(self) -> None:
        self._show()

    def watch_filtering(self, filtering: bool) -> None:
        self.filter_input.display = filtering
        if filtering:
            self.filter_input.focus()
        else:
            self.filter_input.value = ""
            self.needle = ""
            self.table.focus()

    @on(Input.Changed, "#request-filter")
    def _typed(self, event: Input.Changed) -> None:
        event.stop()
        self.needle = event.value.strip()

    @on(Input.Submitted, "#request-filter")
    def _done(self, event: Input.Submitted) -> None:
        event.stop()
        self.table.focus()

    def action_clear_filter(self) -> None:
        self.filtering = False
