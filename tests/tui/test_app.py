"""The dashboard driven by Textual's pilot over a real Service whose neurons are doubles.

Each test presses the keys an operator would and then checks the fleet itself (and the
doubles' records), not the screen alone: the TUI must change the gateway's state.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import openai
import pytest
from aiohttp import web
from textual.pilot import Pilot
from textual.widgets import Input, OptionList

from helexa.config import GatewaySettings, LocalSettings, ModelProfile, Settings
from helexa.neuron.interface import NeuronError
from helexa.neuron.server import make_neuron_app
from tests.support.scripted_neuron import Reply, ScriptedNeuron
from tests.support.servers import serving
from tui.app import HelexaApp, build_app
from tui.widgets.attach_dialog import AttachDialog
from tui.widgets.confirm import ConfirmDialog
from tui.widgets.details import ModelDetail, RequestDetail
from tui.widgets.events_log import EventsLog
from tui.widgets.key_help import KeyHelp
from tui.widgets.model_picker import ModelPicker
from tui.widgets.models import ModelsTable
from tui.widgets.requests import RequestsPane
from tui.widgets.throughput import ThroughputPanel

SIZE = (150, 42)


def settings() -> Settings:
    return Settings(
        gateway=GatewaySettings(listen="127.0.0.1:0"),
        local=LocalSettings(enabled=False),
        models=[ModelProfile(id="small", vram_mb=512), ModelProfile(id="big", vram_mb=2048)],
    )


@asynccontextmanager
async def dashboard(*neurons: ScriptedNeuron) -> AsyncIterator[tuple[HelexaApp, Pilot[int]]]:
    app = build_app(settings(), list(neurons), refresh_s=60)  # tests refresh explicitly
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)  # the service's start worker
        yield app, pilot


async def settle(app: HelexaApp, pilot: Pilot[int]) -> None:
    """Wait for every worker (service start, admin ops), then render what they changed."""
    await app.workers.wait_for_complete()
    app.refresh_view()
    await pilot.pause()


def select(app: HelexaApp, key: str) -> None:
    table = app.query_one(ModelsTable)
    table.move_cursor(row=table.get_row_index(key))
    assert table.selected is not None and table.selected.key == key


def status(app: HelexaApp, node: str, model: str) -> str:
    (row,) = [
        m for m in app.service.fleet.snapshot()["models"] if m["node"] == node and m["id"] == model
    ]
    return str(row["status"])


def gpu() -> ScriptedNeuron:
    return ScriptedNeuron("gpu", models={"small": "loaded", "big": "unloaded"})


async def test_main_screen_shows_the_fleet() -> None:
    """A live service's screen carries every panel, the fleet's facts and the real URL.

    Not a snapshot: the URL's port is free and the fleet unscripted. The stored pictures,
    compared cell for cell and colour for colour, are test_snapshots.py's."""
    discovery = await gpu().discovery()
    expected = [
        "Devices",
        "Throughput",
        "Models",
        "Requests",
        "gpu",
        discovery.devices[0].name,
        "small",
        "big",
        "loaded",
        "unloaded",
        "all models",
        "TTFT",
        "Load",
        "Unload",
        "Pin",
        "Evict",
        "Attach",
        "Keys",
        "Quit",
        "Events",
    ]
    async with dashboard(gpu()) as (app, pilot):
        table = app.query_one(ModelsTable)
        keys = [m["node"] + "/" + m["id"] for m in app.service.fleet.snapshot()["models"]]
        assert sorted(table.by_key) == sorted(keys) and table.row_count == len(keys)
        expected.append(app.service.url.removeprefix("http://"))
        missing = await missing_from_screen(app, pilot, expected)
    assert not missing, f"not on the main screen: {missing}"


async def missing_from_screen(app: HelexaApp, pilot: Pilot[int], texts: list[str]) -> list[str]:
    """Which of ``texts`` the screen still lacks once it has drawn them all, or after 10 s.

    The footer draws its keys only after the screen publishes its bindings, some frames
    after mount, so the screen is read again (one frame apart) until everything is on it.
    """
    missing = texts
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(10):
            while True:
                # SVG text escapes spaces as &#160;: compare on the unescaped text.
                text = app.export_screenshot().replace("&#160;", " ")
                missing = [t for t in texts if t not in text]
                if not missing:
                    break
                await pilot.pause()
    return missing


async def test_unload_key_unloads_the_selected_model() -> None:
    neuron = gpu()
    async with dashboard(neuron) as (app, pilot):
        select(app, "gpu/small")
        await pilot.press("u")
        await settle(app, pilot)
        assert neuron.unloads == ["small"]
        assert status(app, "gpu", "small") == "unloaded"
        # the table follows the fleet: the row's data and the cell on screen
        table = app.query_one(ModelsTable)
        assert table.by_key["gpu/small"].row.status == "unloaded"
        assert str(table.get_cell("gpu/small", column_key(table, "Status"))) == "unloaded"


async def test_pin_key_toggles_the_pin_in_the_fleet() -> None:
    async with dashboard(gpu()) as (app, pilot):
        catalogue = app.service.fleet.catalogue
        select(app, "gpu/small")
        await pilot.press("p")
        await settle(app, pilot)
        assert catalogue.is_pinned("small", "gpu")
        assert app.query_one(ModelsTable).by_key["gpu/small"].row.pinned
        await pilot.press("p")
        await settle(app, pilot)
        assert not catalogue.is_pinned("small", "gpu")


async def test_evict_key_asks_before_evicting_a_pinned_model() -> None:
    """A pin means "never evict": the key asks first; n keeps it, y evicts it (the pin
    stays for its next load)."""
    neuron = gpu()
    async with dashboard(neuron) as (app, pilot):
        app.service.fleet.pin("small", "gpu")
        select(app, "gpu/small")
        await pilot.press("e")
        assert isinstance(app.screen, ConfirmDialog)
        assert "pinned on gpu" in str(app.screen.query_one("#confirm-question").render())
        await pilot.press("n")
        await settle(app, pilot)
        assert neuron.unloads == [] and status(app, "gpu", "small") == "loaded"
        await pilot.press("e")
        await pilot.press("y")
        await settle(app, pilot)
        assert neuron.unloads == ["small"]
        assert status(app, "gpu", "small") == "unloaded"
        assert app.service.fleet.catalogue.is_pinned("small", "gpu")
        assert "evicted small from gpu" in events_text(app)


async def test_evict_key_on_an_unloaded_model_says_there_is_nothing_to_evict() -> None:
    neuron = gpu()
    async with dashboard(neuron) as (app, pilot):
        select(app, "gpu/big")
        await pilot.press("e")
        await settle(app, pilot)
        assert not isinstance(app.screen, ConfirmDialog)
        assert neuron.unloads == []
        assert toasts(app) == ["big is not loaded anywhere: nothing to evict"]


def column_key(table: ModelsTable, label: str) -> Any:
    """The key of the column shown under ``label`` (columns come and go with the width)."""
    (column,) = [c for c in table.ordered_columns if str(c.label) == label]
    return column.key


def toasts(app: HelexaApp) -> list[str]:
    return [n.message for n in app._notifications]


def events_text(app: HelexaApp) -> str:
    return "\n".join(e.text for e in app.events_log.kept)


async def test_load_key_opens_the_picker_and_loads_the_choice() -> None:
    neuron = gpu()
    async with dashboard(neuron) as (app, pilot):
        await pilot.press("l")
        assert isinstance(app.screen, ModelPicker)
        options = app.screen.query_one(OptionList)
        ids = [options.get_option_at_index(i).id for i in range(options.option_count)]
        assert {"small", "big"} <= set(ids)
        options.highlighted = ids.index("big")
        await pilot.press("enter")
        await settle(app, pilot)
        assert not isinstance(app.screen, ModelPicker)
        assert [r.model_id for r in neuron.loads] == ["big"]
        assert status(app, "gpu", "big") == "loaded"


async def test_escape_leaves_the_picker_without_loading() -> None:
    neuron = gpu()
    async with dashboard(neuron) as (app, pilot):
        await pilot.press("l")
        app.refresh_view()  # the interval keeps refreshing the dashboard under the dialog
        await pilot.press("u")  # dashboard keys do not reach through the dialog
        await pilot.press("escape")
        await settle(app, pilot)
        assert not isinstance(app.screen, ModelPicker)
        assert neuron.loads == [] and neuron.unloads == []


async def test_attach_adds_a_remote_neuron_by_url() -> None:
    remote = ScriptedNeuron("far", models={"remote-model": "loaded"})
    async with serving(make_neuron_app(remote)) as url, dashboard(gpu()) as (app, pilot):
        await pilot.press("a")
        assert isinstance(app.screen, AttachDialog)
        await pilot.press("x", "enter")
        assert isinstance(app.screen, AttachDialog), "a bad URL keeps the dialog open"
        assert "http" in str(app.screen.query_one("#attach-error").render())
        app.screen.query_one("#attach-url", Input).value = url
        app.screen.query_one("#attach-name", Input).value = "far"
        await pilot.press("enter")
        await settle(app, pilot)
        node = app.service.fleet.nodes["far"]
        assert node.up
        assert "far/remote-model" in app.query_one(ModelsTable).by_key


async def test_attach_refuses_a_url_nothing_answers_on() -> None:
    async with serving(make_neuron_app(gpu())) as url:
        pass  # the port is closed again
    async with dashboard(gpu()) as (app, pilot):
        await pilot.press("a")
        app.screen.query_one("#attach-url", Input).value = url
        await pilot.press("enter")
        await settle(app, pilot)
        assert set(app.service.fleet.nodes) == {"gpu"}


async def test_copy_url_puts_the_openai_base_url_on_the_clipboard() -> None:
    async with dashboard(gpu()) as (app, pilot):
        await pilot.press("c")
        assert app.clipboard == f"{app.service.url}/v1"


async def test_requests_show_up_in_throughput_and_log() -> None:
    neuron = ScriptedNeuron("gpu", script=Reply(text=["a", "b", "c", "d"]))
    async with dashboard(neuron) as (app, pilot):
        async with openai.AsyncOpenAI(
            base_url=f"{app.service.url}/v1", api_key="-", max_retries=0
        ) as client:
            for _ in range(2):
                await client.chat.completions.create(
                    model="test-model", messages=[{"role": "user", "content": "hi"}]
                )
        app.refresh_view()
        await pilot.pause()
        panel = app.query_one(ThroughputPanel)
        assert list(panel.per_model) == ["test-model"]
        assert sum(panel.per_model["test-model"].spark.data or []) == 8
        pane = app.query_one(RequestsPane)
        assert [line.record.model for line in pane.table.items] == ["test-model"] * 2
        assert {line.record.node for line in pane.table.items} == {"gpu"}
        assert all(line.record.status == "ok" for line in pane.table.items)


async def test_quit_stops_the_service_and_ends_streams() -> None:
    """With a stream in flight, quitting asks first; once confirmed, with nothing to drain
    for (``drain_s`` 0), the stream is ended at once, its client told why by the
    dialect's error frame."""
    neuron = ScriptedNeuron("gpu", script=Reply(text=["a", "b", "c"], block_after=2))
    undrained = settings()
    undrained.gateway.drain_s = 0
    app = build_app(undrained, [neuron], refresh_s=60)
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        client = openai.AsyncOpenAI(base_url=f"{app.service.url}/v1", api_key="-", max_retries=0)
        stream = await client.chat.completions.create(
            model="test-model", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        reading = asyncio.ensure_future(consume(stream))
        await asyncio.wait_for(neuron.started.wait(), 5)
        await pilot.press("ctrl+c")
        assert isinstance(app.screen, ConfirmDialog)
        assert "1 request(s) in flight" in str(app.screen.query_one("#confirm-question").render())
        await pilot.press("ctrl+c")  # again, while asked: yes
        await asyncio.wait_for(neuron.cancelled.wait(), 5)
        await app.workers.wait_for_complete()
        assert neuron.closed
        [ended] = await asyncio.wait_for(asyncio.gather(reading, return_exceptions=True), 5)
        await client.close()
    assert isinstance(ended, openai.APIError) and "shutting down" in ended.message
    assert app.return_code == 0


async def consume(stream: Any) -> None:
    async for _ in stream:
        pass


async def test_leaving_the_app_any_way_stops_the_service() -> None:
    neuron = gpu()
    async with dashboard(neuron) as (app, pilot):
        app.exit()
        await pilot.pause()
    assert neuron.closed


async def test_a_gateway_that_cannot_listen_ends_the_app_with_an_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = settings().model_copy(
            update={"gateway": GatewaySettings(listen=f"127.0.0.1:{port}")}
        )
        app = build_app(busy, [gpu()], refresh_s=60)
        async with app.run_test(size=SIZE):
            await app.workers.wait_for_complete()
    assert app.return_code == 1


def attach_error(app: HelexaApp) -> str:
    return str(app.screen.query_one("#attach-error").render())


async def test_attach_to_a_web_page_keeps_the_dialog_open_with_one_line() -> None:
    """A URL that answers with a web page: the dialog stays open (the URL still typed,
    to fix in place) and says in one line what answered, never the page itself."""
    page = "<html><body>" + "<p>welcome to my blog</p>\n" * 200 + "</body></html>"

    async def html(request: web.Request) -> web.Response:
        return web.Response(text=page, content_type="text/html")

    site = web.Application()
    site.router.add_get("/{path:.*}", html)
    async with serving(site) as url, dashboard(gpu()) as (app, pilot):
        await pilot.press("a")
        app.screen.query_one("#attach-url", Input).value = url
        await pilot.press("enter")
        await settle(app, pilot)
        assert isinstance(app.screen, AttachDialog)
        error = attach_error(app)
        assert error == (
            f"cannot attach: {url} is not a helexa neuron: GET /discovery answered "
            "HTTP 200 (text/html)"
        )
        assert app.screen.query_one("#attach-url", Input).value == url
        assert set(app.service.fleet.nodes) == {"gpu"}


@contextlib.asynccontextmanager
async def attaching_to_a_slow_page() -> AsyncIterator[
    tuple[HelexaApp, Pilot[int], AttachDialog, str, asyncio.Event]
]:
    """The attach dialog sent to a server that is no neuron and holds its answer until
    the yielded event is set: (app, pilot, dialog, url, answer), once the server is asked."""
    asked, answer = asyncio.Event(), asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        asked.set()
        await answer.wait()
        return web.json_response({"detail": "Not Found"}, status=404)

    site = web.Application()
    site.router.add_get("/{path:.*}", slow)
    async with serving(site) as url, dashboard(gpu()) as (app, pilot):
        await pilot.press("a")
        dialog = app.screen
        assert isinstance(dialog, AttachDialog)
        dialog.query_one("#attach-url", Input).value = url
        await pilot.press("enter")
        await asyncio.wait_for(asked.wait(), 5)
        yield app, pilot, dialog, url, answer


async def test_attach_says_what_it_waits_on_while_it_connects() -> None:
    """Until the node answers, the dialog says where it is connecting and for how long at
    most, and the form is locked; an answer that is no neuron's unlocks it again."""
    async with attaching_to_a_slow_page() as (app, pilot, dialog, url, answer):
        await pilot.pause()
        timeout = app.service.settings.poller.timeout_s
        assert dialog.connecting == f"connecting to {url} (up to {timeout:g} s)…"
        assert dialog.query_one("#attach-progress").display
        assert all(field.disabled for field in dialog.query(Input))
        answer.set()
        await settle(app, pilot)
        assert app.screen is dialog and dialog.connecting == ""
        assert not any(field.disabled for field in dialog.query(Input))
        assert "GET /discovery answered HTTP 404 without an error body" in attach_error(app)


async def test_closing_the_attach_dialog_while_it_connects_only_tells_the_outcome() -> None:
    """Escape while the dialog waits: the attempt's end later must not pop a screen that
    is not the dialog (the app would exit), it says how it ended instead."""
    async with attaching_to_a_slow_page() as (app, pilot, dialog, url, answer):
        await pilot.press("escape")
        await pilot.pause()
        main = app.screen
        assert main is not dialog
        answer.set()
        await settle(app, pilot)
        assert app.is_running and app.screen is main
        assert f"{url}: cannot attach" in events_text(app)
        assert set(app.service.fleet.nodes) == {"gpu"}


async def test_unload_key_on_a_busy_model_asks_then_waits_for_its_requests() -> None:
    resume = asyncio.Event()
    neuron = ScriptedNeuron("gpu", script=Reply(text=["a", "b"], block_after=1, resume=resume))
    async with dashboard(neuron) as (app, pilot):
        client = openai.AsyncOpenAI(base_url=f"{app.service.url}/v1", api_key="-", max_retries=0)
        stream = await client.chat.completions.create(
            model="test-model", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        reading = asyncio.ensure_future(consume(stream))
        await asyncio.wait_for(neuron.started.wait(), 5)
        app.refresh_view()
        await pilot.pause()
        select(app, "gpu/test-model")
        await pilot.press("u")
        assert isinstance(app.screen, ConfirmDialog)
        assert "serving 1 request(s)" in str(app.screen.query_one("#confirm-question").render())
        await pilot.press("y")
        await pilot.pause()
        assert app.pending["gpu/test-model"].startswith("waiting for its requests")
        assert neuron.unloads == []  # not while the stream runs
        resume.set()
        await asyncio.wait_for(reading, 5)
        await settle(app, pilot)
        await client.close()
        assert neuron.unloads == ["test-model"]
        assert "unloaded test-model from gpu" in events_text(app)


async def test_unload_and_load_say_when_there_is_nothing_to_do() -> None:
    neuron = gpu()
    async with dashboard(neuron) as (app, pilot):
        select(app, "gpu/big")
        await pilot.press("u")
        await pilot.press("l")
        options = app.screen.query_one(OptionList)
        ids = [options.get_option_at_index(i).id for i in range(options.option_count)]
        options.highlighted = ids.index("small")
        await pilot.press("enter")
        await settle(app, pilot)
        assert neuron.unloads == [] and neuron.loads == []
        assert toasts(app) == [
            "big is unloaded on gpu: nothing to unload",
            "small is already loaded on gpu",
        ]


async def test_a_failed_load_stays_on_its_row_and_in_the_events() -> None:
    """The toast goes, the node lists the model as unloaded again (a path that failed to
    load is not listed as failed): the row still says it failed and why, and so do the
    events pane and the model's details."""
    neuron = gpu()
    neuron.load_errors["big"] = NeuronError(
        "not enough memory on device 0: needs 2048 MiB, 1024 MiB free", status=507
    )
    async with dashboard(neuron) as (app, pilot):
        await pilot.press("l")
        options = app.screen.query_one(OptionList)
        ids = [options.get_option_at_index(i).id for i in range(options.option_count)]
        options.highlighted = ids.index("big")
        await pilot.press("enter")
        await settle(app, pilot)
        neuron.states["big"] = "unloaded"
        await app.service.fleet.refresh()
        await settle(app, pilot)
        cell = app.query_one(ModelsTable).get_cell(
            "gpu/big", column_key(app.query_one(ModelsTable), "Status")
        )
        assert str(cell).startswith("failed not enough memory on device 0")
        pane = app.query_one(EventsLog)
        shown = " ".join(" ".join(line.text.split()) for line in pane.lines)  # wrapped lines
        assert "loading big on gpu failed: not enough memory on device 0" in shown
        select(app, "gpu/big")
        app.query_one(ModelsTable).focus()
        await pilot.press("enter")
        assert isinstance(app.screen, ModelDetail)
        facts = dict(app.screen.facts)
        assert facts["last failure"].startswith("not enough memory on device 0")
        assert facts["catalogue"] == "yes"
        assert facts["size (catalogue)"] == "2.0 GiB"


async def test_model_details_count_down_to_idle_eviction() -> None:
    neuron = gpu()
    ttl = settings()
    ttl.eviction.idle_ttl_s = 600
    app = build_app(ttl, [neuron], refresh_s=60)
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        select(app, "gpu/small")
        app.query_one(ModelsTable).focus()
        await pilot.press("enter")
        assert isinstance(app.screen, ModelDetail)
        await settle(app, pilot)  # the files fact is found off the event loop
        facts = dict(app.screen.facts)
        assert facts["idle eviction"].startswith("in ") and "of 600 s" in facts["idle eviction"]
        assert facts["fits"] == "loaded on gpu"
        assert facts["files"] == "on gpu's disk (it lists the model)"
        await pilot.press("escape")
        assert not isinstance(app.screen, ModelDetail)
        app.service.fleet.pin("small", "gpu")
        select(app, "gpu/small")
        await pilot.press("enter")
        app.refresh_view()
        assert dict(app.screen.facts)["idle eviction"] == "never: pinned"


async def test_enter_on_a_request_opens_it_and_slash_filters() -> None:
    neuron = ScriptedNeuron("gpu", script=Reply(text=["a", "b", "c"]))
    async with dashboard(neuron) as (app, pilot):
        async with openai.AsyncOpenAI(
            base_url=f"{app.service.url}/v1", api_key="-", max_retries=0
        ) as client:
            await client.chat.completions.create(
                model="test-model", messages=[{"role": "user", "content": "hi"}], max_tokens=9
            )
            with contextlib.suppress(openai.NotFoundError):
                await client.chat.completions.create(
                    model="no-such-model", messages=[{"role": "user", "content": "hi"}]
                )
        app.refresh_view()
        await pilot.pause()
        pane = app.query_one(RequestsPane)
        assert [line.record.model for line in pane.table.items] == ["no-such-model", "test-model"]
        await pilot.press("slash")
        await pilot.press(*"test")
        await pilot.pause()
        assert [line.record.model for line in pane.table.items] == ["test-model"]
        await pilot.press("enter")  # leaves the filter for the table
        await pilot.press("enter")  # opens the row under the cursor
        assert isinstance(app.screen, RequestDetail)
        facts = dict(app.screen.facts)
        assert facts["client"] == "127.0.0.1" and "OpenAI" in facts["user agent"]
        assert '"max_tokens": 9' in facts["parameters"] and '"messages": 1' in facts["parameters"]
        assert facts["tokens"] == "11 prompt → 3 generated"
        await pilot.press("escape")
        await pilot.press("escape")  # clears the filter
        assert len(pane.table.items) == 2
        pane.table.move_cursor(row=0)
        await pilot.press("enter")
        assert isinstance(app.screen, RequestDetail)
        assert dict(app.screen.facts)["error (failed)"].startswith("404 ")


async def test_question_mark_lists_every_key() -> None:
    async with dashboard(gpu()) as (app, pilot):
        await pilot.press("question_mark")
        assert isinstance(app.screen, KeyHelp)
        text = app.export_screenshot().replace("&#160;", " ")
        for key in ("l", "u", "e", "p", "a", "v", "c", "r", "q", "enter", "/"):
            assert key in [k for k, _ in app.screen.keys]
        assert "evict the selected model" in text
        await pilot.press("escape")
        assert not isinstance(app.screen, KeyHelp)


async def test_quitting_says_what_stays_loaded_on_remote_neurons() -> None:
    async with dashboard(gpu()) as (app, pilot):
        await pilot.press("q")
        await app.workers.wait_for_complete()
    assert "quitting: local models are unloaded; stays loaded on its neuron: small@gpu" in (
        events_text(app)
    )


@pytest.mark.parametrize(
    ("size", "visible", "columns"),
    [
        ((80, 24), ["Quit", "Keys", "Requests"], ["#", "Model", "Status", "Tokens", "tok/s"]),
        ((100, 30), ["Quit", "Requests"], ["Model", "Status", "Tokens", "tok/s", "Time"]),
        ((60, 18), ["Quit", "Requests", "Models"], ["#", "Model", "Status"]),
    ],
)
async def test_small_terminals_keep_what_matters(
    size: tuple[int, int], visible: list[str], columns: list[str]
) -> None:
    """Quit in the footer, every pane at least a few rows high, and in the requests table
    the columns that matter most (the rest give way first)."""
    neuron = ScriptedNeuron("gpu", script=Reply(text=["a", "b", "c"]))
    app = build_app(settings(), [neuron], refresh_s=60)
    async with app.run_test(size=size) as pilot:
        await settle(app, pilot)
        async with openai.AsyncOpenAI(
            base_url=f"{app.service.url}/v1", api_key="-", max_retries=0
        ) as client:
            await client.chat.completions.create(
                model="test-model", messages=[{"role": "user", "content": "hi"}]
            )
        await settle(app, pilot)
        missing = await missing_from_screen(app, pilot, visible)
        assert not missing, missing
        table = app.query_one(RequestsPane).table
        assert table.region.height >= 3  # the header and a row at least
        shown = [str(c.label) for c in table.ordered_columns]
        assert all(c in shown for c in columns), shown


async def test_the_palette_screenshot_lands_where_a_folder_exists(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No ~/Downloads (a server, a container): the screenshot goes to the working dir."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_DOWNLOAD_DIR", str(tmp_path / "home" / "Downloads"))
    monkeypatch.chdir(tmp_path)
    async with dashboard(gpu()) as (app, pilot):
        app.deliver_screenshot("shot.svg")
        async with asyncio.timeout(10):  # said once Textual's save thread is done with it
            while not any(t.startswith("Saved screenshot") for t in toasts(app)):
                await pilot.pause()
        assert str(tmp_path / "shot.svg") in toasts(app)[-1]
    assert (tmp_path / "shot.svg").read_text().startswith("<svg")


async def test_refresh_key_polls_the_nodes_now() -> None:
    neuron = gpu()
    async with dashboard(neuron) as (app, pilot):
        neuron.states["big"] = "loaded"  # loaded behind the gateway's back
        assert status(app, "gpu", "big") == "unloaded"  # not polled yet
        await pilot.press("r")
        await settle(app, pilot)
        assert status(app, "gpu", "big") == "loaded"
        assert app.query_one(ModelsTable).by_key["gpu/big"].row.status == "loaded"


async def test_v_switches_requests_and_events_on_a_narrow_terminal() -> None:
    app = build_app(settings(), [gpu()], refresh_s=60)
    async with app.run_test(size=(90, 30)) as pilot:
        await settle(app, pilot)
        requests, events = app.query_one(RequestsPane), app.query_one(EventsLog)
        assert requests.display and not events.display
        await pilot.press("v")
        assert events.display and not requests.display
        await pilot.press("slash")  # the filter brings the requests back
        assert requests.display and not events.display


async def test_a_long_failure_is_cut_to_the_tables_width() -> None:
    """At 80 columns the reason of a failed load fits beside the model instead of pushing
    the table into scrolling sideways; Enter still has all of it."""
    huge = "Qwen/Qwen3-235B-A22B-GGUF:Q4_K_M"
    app = build_app(settings(), [ScriptedNeuron("gpu", models={huge: "unloaded"})], refresh_s=60)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(app, pilot)
        app.events_log.load_failed(huge, "needs 138.7 GiB on one device, " * 4)
        await settle(app, pilot)
        table = app.query_one(ModelsTable)
        status_cell = str(table.get_cell(f"gpu/{huge}", column_key(table, "Status")))
        assert status_cell.startswith("failed needs 138.7 GiB") and status_cell.endswith("…")
        assert table.virtual_size.width <= table.size.width
