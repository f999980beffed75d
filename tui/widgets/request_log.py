"""Request log pane: one line per finished generation, newest at the bottom."""

from __future__ import annotations

import time
from collections.abc import Sequence

from rich.text import Text
from textual.widgets import RichLog

from tui.traffic import RequestRecord

STATUS_STYLE = {"ok": "green", "error": "bold red", "cancelled": "yellow", "streaming": "cyan"}


def format_record(r: RequestRecord) -> Text:
    line = Text(time.strftime("%H:%M:%S ", time.localtime(r.wall_started)), style="dim")
    line.append(f"#{r.id:<4} ")
    line.append(f"{r.model}@{r.node or '-'}".ljust(40) + " ", style="bold")
    line.append(f"{r.api:<11} ", style="dim")  # "completions" fills the column: keep a gap
    line.append(f"{r.status:<9}", style=STATUS_STYLE.get(r.status, ""))
    if r.ttft_s is not None:
        line.append(f" ttft {r.ttft_s * 1000:.0f} ms")
    line.append(f"  {r.prompt_tokens}→{r.completion_tokens} tok")
    if r.tokens_per_s is not None:
        line.append(f"  {r.tokens_per_s:.1f} tok/s")
    if r.duration_s is not None:
        line.append(f"  {r.duration_s:.2f} s", style="dim")
    if r.error:
        line.append(f"  {r.error}", style="red")
    return line


class RequestLog(RichLog):
    """Appends finished records it has not shown yet, in the order they finished."""

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id, max_lines=500, wrap=False, markup=False)
        self.last_seq = 0

    def show(self, records: Sequence[RequestRecord]) -> None:
        for record in records:
            if record.done_seq > self.last_seq:
                self.write(format_record(record))
                self.last_seq = record.done_seq
