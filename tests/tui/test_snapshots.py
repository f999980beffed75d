"""Snapshot tests: the dashboard and its dialogs, rendered and compared to stored SVGs.

pytest-textual-snapshot runs the app headless at a fixed size and compares the exported
screen with ``__snapshots__/test_snapshots/<test>.svg``. After a deliberate change to the
look, regenerate with ``python3 -m pytest tests/tui/test_snapshots.py --snapshot-update``
and review the new SVGs (a failing run writes ``snapshot_report.html`` with both images).

Everything on screen comes from :mod:`tests.tui.scene`, whose fleet, clock and traffic are
fixed; this module only pins what the process would otherwise vary (time zone, the port).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from textual.app import App, ComposeResult
from textual.pilot import Pilot
from textual.widgets import Input

import tui
from helexa.cortex.service import Service
from tests.tui.scene import GATEWAY_URL, SIZE, SMALL, Scene, make_scene
from tui.fleetview import ModelRow
from tui.widgets.attach_dialog import AttachDialog
from tui.widgets.confirm import ConfirmDialog
from tui.widgets.details import ModelDetail, RequestDetail
from tui.widgets.model_picker import ModelPicker
from tui.widgets.models import ModelLine, ModelsTable
from tui.widgets.requests import RequestsTable

SnapCompare = Callable[..., bool]


@pytest.fixture(autouse=True)
def fixed_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """UTC for the log's clock column; colour even where NO_COLOR is set; a fixed gateway
    URL in the header (the service still listens on a free port: only the URL it reports
    is fixed)."""
    monkeypatch.setenv("TZ", "UTC")
    monkeypatch.delenv("NO_COLOR", raising=False)
    time.tzset()
    monkeypatch.setattr(Service, "url", property(lambda self: GATEWAY_URL))
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.fixture
def scene() -> Scene:
    return make_scene()


def test_main_screen(snap_compare: SnapCompare, scene: Scene) -> None:
    """Both nodes (GPU bars; the down one with its reason), every model state (loaded,
    pinned, loading with progress, unloaded, failed, an eviction in flight, one request
    in flight), replayed traffic in the sparklines, TTFT line and request log."""

    async def run_before(pilot: Pilot[Any]) -> None:
        await scene.ready(pilot)
        await scene.evicting(pilot, "qwen3-4b")

    assert snap_compare(scene.app, terminal_size=SIZE, run_before=run_before)


def test_main_screen_at_80x24(snap_compare: SnapCompare, scene: Scene) -> None:
    """The same fleet on a small terminal: the throughput and events panes give way,
    the tables keep their most needed columns, the footer keeps help and quit."""
    assert snap_compare(scene.app, terminal_size=SMALL, run_before=scene.ready)


def test_events_pane_at_80x24(snap_compare: SnapCompare, scene: Scene) -> None:
    """``v`` on a small terminal: the events pane in place of the requests."""

    async def run_before(pilot: Pilot[Any]) -> None:
        await scene.ready(pilot)
        await pilot.press("v")

    assert snap_compare(scene.app, terminal_size=SMALL, run_before=run_before)


def test_key_help(snap_compare: SnapCompare, scene: Scene) -> None:
    async def run_before(pilot: Pilot[Any]) -> None:
        await scene.ready(pilot)
        await pilot.press("question_mark")

    assert snap_compare(scene.app, terminal_size=SIZE, run_before=run_before)


def test_request_detail(snap_compare: SnapCompare, scene: Scene) -> None:
    """Enter on the failed request: its full error and its timings."""

    async def run_before(pilot: Pilot[Any]) -> None:
        await scene.ready(pilot)
        table = pilot.app.query_one(RequestsTable)
        table.focus()
        table.move_cursor(row=table.get_row_index("7"))
        await pilot.press("enter")
        assert isinstance(pilot.app.screen, RequestDetail)

    assert snap_compare(scene.app, terminal_size=SIZE, run_before=run_before)


def test_model_detail(snap_compare: SnapCompare, scene: Scene) -> None:
    """Enter on a loaded model: where it is, whether it fits, its catalogue entry."""

    async def run_before(pilot: Pilot[Any]) -> None:
        await scene.ready(pilot)
        table = pilot.app.query_one(ModelsTable)
        table.focus()
        table.move_cursor(row=table.get_row_index("atlas/qwen3-4b"))
        await pilot.press("enter")
        assert isinstance(pilot.app.screen, ModelDetail)
        await pilot.app.workers.wait_for_complete()  # the files fact, found off the loop
        await pilot.pause()

    assert snap_compare(scene.app, terminal_size=SIZE, run_before=run_before)


def test_evicting_a_pinned_model_asks(snap_compare: SnapCompare, scene: Scene) -> None:
    async def run_before(pilot: Pilot[Any]) -> None:
        await scene.ready(pilot)
        await pilot.press("e")  # the cursor starts on qwen3-8b, pinned on atlas
        assert isinstance(pilot.app.screen, ConfirmDialog)

    assert snap_compare(scene.app, terminal_size=SIZE, run_before=run_before)


def test_model_picker(snap_compare: SnapCompare, scene: Scene) -> None:
    """``l`` over the dashboard: catalogue models with sizes and where they are loaded."""

    async def run_before(pilot: Pilot[Any]) -> None:
        await scene.ready(pilot)
        await pilot.press("l")
        assert isinstance(pilot.app.screen, ModelPicker)

    assert snap_compare(scene.app, terminal_size=SIZE, run_before=run_before)


def test_attach_dialog_refusing_a_bad_url(snap_compare: SnapCompare, scene: Scene) -> None:
    """``a``, a URL without a scheme, enter: the dialog stays open and says why."""

    async def run_before(pilot: Pilot[Any]) -> None:
        await scene.ready(pilot)
        await pilot.press("a")
        dialog = pilot.app.screen
        assert isinstance(dialog, AttachDialog)
        dialog.query_one("#attach-url", Input).value = "gpu-box:13131"
        await pilot.press("enter")
        assert isinstance(pilot.app.screen, AttachDialog)
        for field in dialog.query(Input):  # a blinking cursor is caught on or off by chance
            field.cursor_blink = False

    assert snap_compare(scene.app, terminal_size=SIZE, run_before=run_before)


class ModelsOnly(App[None]):
    """The models table alone, fed rows directly: statuses no scripted node reports."""

    CSS_PATH = str(Path(tui.__file__).parent / "helexa.tcss")
    CSS = "#models { max-height: 100%; }"  # the dashboard caps it at half the screen
    TITLE = "helexa models table"

    def compose(self) -> ComposeResult:
        yield ModelsTable(id="models")

    def on_mount(self) -> None:
        table = self.query_one(ModelsTable)
        table.border_title = "Models"
        pending = {"gpu/qwen3-1.7b": "unloading"}
        table.items = tuple(ModelLine(row, pending.get(row.key)) for row in STATUS_ROWS)


STATUS_ROWS = [
    ModelRow("qwen3-8b", "gpu", "loaded", (0,), vram_mb=5870, pinned=True, idle_s=42.0),
    ModelRow("qwen3-4b", "gpu", "evicting", (0,), vram_mb=3020, idle_s=5400.0),
    ModelRow("qwen3-30b-a3b", "gpu", "loading", (1,), progress=0.25, vram_mb=4650),
    ModelRow("qwen3-1.7b", "gpu", "loaded", (1,), vram_mb=1900, in_flight=0, idle_s=900.0),
    ModelRow("qwen3-0.6b", "gpu", "loaded", (1,), vram_mb=1130, in_flight=3, idle_s=0.0),
    ModelRow("qwen3-14b", "gpu", "unloaded"),
    ModelRow("qwen3-32b", "gpu", "failed", error="out of memory"),
    ModelRow("qwen3-8b", "spare", "down", (0,), vram_mb=5870, idle_s=600.0),
]


def test_models_table_statuses(snap_compare: SnapCompare) -> None:
    """Each status its own look: evicting (from the fleet) apart from an op the TUI has in
    flight (unloading…), loading with its bar, failed with the reason, down (its node is)."""
    assert snap_compare(ModelsOnly(), terminal_size=(110, 11))
