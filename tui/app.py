"""The ``helexa`` dashboard: the gateway and its fleet, live, in one asyncio loop.

The app runs the same :class:`helexa.cortex.service.Service` that ``helexa --serve`` runs,
inside Textual's event loop, and reads the gateway's own state: every refresh renders
``service.fleet.snapshot()``, and every admin key calls the fleet's admin operations in a
worker, so the screen never blocks and never keeps a second copy of the truth. Token
rates and TTFT come from :mod:`tui.traffic`, fed by the gateway's per-request hooks; the
events pane from :mod:`tui.events`, fed by the gateway's loggers.

Data goes down, events come up: each refresh sets the widgets' reactive attributes
(rows, rates, records, events), and a widget that wants something done (Enter on a row,
a submitted attach form) posts a message that the app answers here. No widget touches
the fleet, and none writes another widget's state.

Quitting (q / Ctrl-C) stops the service first: streams in flight get up to
``gateway.drain_s`` to finish (the rest end with an error event), local models are
unloaded and neurons closed before the terminal is handed back. Models on attached remote
neurons stay loaded there: their neuron keeps them for the next gateway (unload them
first with ``u`` to give their memory back).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from platformdirs import user_downloads_dir
from textual import events, on
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.widgets import Footer, Header

from helexa.config import LocalSettings, NeuronEndpoint, Settings
from helexa.cortex.service import Service, build_neurons
from helexa.neuron.interface import Neuron
from tui.events import Events, EventsHandler, listening, stop_listening
from tui.fleetview import FleetView, ModelRow, fleet_view
from tui.history import DeviceHistory
from tui.modelinfo import model_facts, on_disk
from tui.traffic import Traffic
from tui.widgets.attach_dialog import AttachDialog, one_line
from tui.widgets.confirm import ConfirmDialog
from tui.widgets.details import ModelDetail, RequestDetail, request_facts
from tui.widgets.devices import DevicesPanel
from tui.widgets.events_log import EventsLog
from tui.widgets.key_help import KeyHelp
from tui.widgets.model_picker import ModelPicker
from tui.widgets.models import ModelLine, ModelsTable
from tui.widgets.requests import RequestsPane, RequestsTable
from tui.widgets.throughput import Rates, ThroughputPanel

NARROW = 120  # below this many columns the events pane and the throughput give way
SHORT = 32  # below this many rows the throughput panel gives way
IDLE_POLL_S = 0.1  # how often a deferred unload looks whether its model is idle yet


def screenshot_dir() -> Path:
    """Where a screenshot goes: the Downloads folder when there is one, else here."""
    downloads = Path(user_downloads_dir())
    return downloads if downloads.is_dir() else Path.cwd()


class HelexaApp(App[int]):
    CSS_PATH = "helexa.tcss"
    TITLE = "helexa"
    # The footer draws these left to right and cuts what does not fit: help and quit first.
    BINDINGS = [
        Binding("question_mark", "keys", "Keys"),
        Binding("q", "quit", "Quit"),
        Binding("l", "load", "Load"),
        Binding("u", "unload", "Unload"),
        Binding("e", "evict", "Evict"),
        Binding("p", "pin", "Pin"),
        Binding("a", "attach", "Attach"),
        Binding("slash", "filter", "Filter"),
        Binding("v", "switch_pane", "Requests/Events"),
        Binding("c", "copy_url", "Copy URL"),
        Binding("r", "refresh", "Refresh"),
        Binding("ctrl+c", "quit", "Quit", show=False, priority=True),
    ]
    KEY_HELP = {
        "l": "load a model (catalogue models and what nodes offer)",
        "u": "unload the selected model from its node",
        "e": "evict the selected model from every node now (asks for a pinned one)",
        "p": "pin the selected model on its node (never evicted), or unpin it",
        "a": "attach a remote neuron by URL",
        "v": "on a narrow terminal: show the requests or the events pane",
        "c": "copy the OpenAI base URL for your editor",
        "r": "poll every node now",
        "?": "this help",
        "q": "quit (asks while requests are in flight; q again: at once)",
    }

    def __init__(
        self,
        service: Service,
        traffic: Traffic,
        *,
        refresh_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        events_log: Events | None = None,
    ) -> None:
        """``traffic`` must be the one whose ``observer`` the service's gateway calls;
        ``clock`` is the fleet's (monotonic) clock, which idle times are measured against:
        a snapshot test freezes it so "6s ago" never becomes "7s ago" on a slow machine;
        ``events_log`` keeps what the gateway logs (a test gives one on a frozen clock)."""
        super().__init__()
        self.service = service
        self.refresh_s = refresh_s
        self.clock = clock
        self.traffic = traffic
        self.events_log = events_log or Events()
        self.history = DeviceHistory()
        self.view = FleetView()
        self.pending: dict[str, str] = {}  # model row key -> admin op in flight
        self._model_files: dict[str, str] = {}  # model row key -> on_disk(), once per open
        self.devices = DevicesPanel(id="devices")
        self.throughput = ThroughputPanel(id="throughput")
        self.models = ModelsTable(id="models")
        self.requests = RequestsPane(id="requests")
        self.events_pane = EventsLog(id="events")
        self._handler: EventsHandler | None = None
        self._stopped = False

    # -- layout ---------------------------------------------------------------------
    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal(id="top"):
            yield self.devices
            yield self.throughput
        yield self.models
        with Horizontal(id="bottom"):
            yield self.requests
            yield self.events_pane
        yield Footer()

    def on_mount(self) -> None:
        self.devices.border_title = "Devices"
        self.devices.border_subtitle = "history: utilization · VRAM"
        self.throughput.border_title = "Throughput"
        self.models.border_title = "Models"
        self.requests.border_title = "Requests"
        self.events_pane.border_title = "Events"
        self.sub_title = "starting gateway…"
        self._handler = listening(self.events_log)
        self.run_worker(self._start_service(), group="service", exclusive=True)
        self.set_interval(self.refresh_s, self.refresh_view)

    def on_resize(self, event: events.Resize) -> None:
        """Panels give way on a small terminal (the tables drop columns by themselves)."""
        self.screen.set_class(event.size.width < NARROW, "narrow")
        self.screen.set_class(event.size.height < SHORT, "short")
        self.devices.history = event.size.height >= SHORT

    def action_switch_pane(self) -> None:
        """On a narrow terminal one of requests and events is shown: switch which."""
        self.screen.toggle_class("show-events")

    # -- service lifecycle ----------------------------------------------------------
    async def _start_service(self) -> None:
        try:
            await self.service.start()
        except Exception as exc:
            self.exit(1, 1, f"helexa: the gateway could not start: {exc}")
            return
        self.sub_title = f"gateway {self.service.url}"
        self.refresh_view()

    async def stop_service(self) -> None:
        """Stop the service once, whichever way the app ends (quit key, exit, run_tui)."""
        if self._stopped:
            return
        self._stopped = True
        cancelled = [
            *self.workers.cancel_group(self, "service"),
            *self.workers.cancel_group(self, "admin"),
        ]
        if cancelled:  # (an empty list would mean "every worker", this one included)
            await self.workers.wait_for_complete(cancelled)
        try:
            await self.service.stop()
        finally:
            if self._handler is not None:
                stop_listening(self._handler)

    def in_flight(self) -> int:
        return sum(m.in_flight for m in self.view.models)

    async def action_quit(self) -> None:
        if self._stopped:
            self.exit(0)
            return
        screen = self.screen
        if isinstance(screen, ConfirmDialog) and screen.purpose == "quit":
            screen.dismiss(True)  # Ctrl-C while asked: yes
            return
        self.refresh_view()
        busy = self.in_flight()
        if not busy:
            self._begin_quit()
            return
        drain = self.service.settings.gateway.drain_s

        def answered(yes: bool | None) -> None:
            if yes:
                self._begin_quit()

        question = (
            f"{busy} request(s) in flight. Quitting gives them up to {drain:g} s to "
            "finish; the rest end with an error event their clients can read."
        )
        self.push_screen(ConfirmDialog("Quit helexa?", question, "Quit", "quit"), answered)

    def _begin_quit(self) -> None:
        drain = self.service.settings.gateway.drain_s
        remote = self.service.remote_loaded()
        stays = f"; stays loaded on its neuron: {', '.join(remote)}" if remote else ""
        self.sub_title = f"stopping: finishing streams (up to {drain:g} s; q again: now){stays}"
        self.events_log.add(f"quitting: local models are unloaded{stays}")
        self.run_worker(self._quit(), group="shutdown", exclusive=True)

    async def _quit(self) -> None:
        try:
            await self.stop_service()
        except Exception as exc:
            self.exit(1, 1, f"helexa: stopping the gateway failed: {exc}")
            return
        self.exit(0)

    async def on_unmount(self) -> None:
        with contextlib.suppress(Exception):
            await self.stop_service()

    # -- refresh --------------------------------------------------------------------
    def refresh_view(self) -> None:
        """Re-read the fleet snapshot, the traffic and the events; set them on the widgets."""
        self.view = fleet_view(self.service.fleet.snapshot(self.clock()))
        devices = [d for node in self.view.nodes if node.up for d in node.devices]
        self.history.add(devices)
        self.devices.nodes = self.view.nodes
        self.devices.trends = self.history.trends()
        failures = self.events_log.failures
        self.models.items = tuple(
            ModelLine(m, self.pending.get(m.key), failures.get(m.id)) for m in self.view.models
        )
        traffic = self.traffic
        self.throughput.rates = Rates(
            tuple(traffic.series()),
            {m: traffic.series(m) for m in traffic.models()},
            tuple(r.ttft_s for r in traffic.recent_ttft(20) if r.ttft_s is not None),
        )
        self.requests.now = traffic.clock()
        self.requests.records = tuple(traffic.records)
        self.events_pane.events = tuple(self.events_log.since(self.events_pane.last_seq))
        self._refresh_detail()

    def _refresh_detail(self) -> None:
        screen = self.screen
        if isinstance(screen, RequestDetail):
            record = self.traffic.record(screen.request_id)
            if record is not None:
                screen.facts = request_facts(record, self.traffic.clock())
        elif isinstance(screen, ModelDetail) and (row := self.view.row(screen.key)):
            screen.facts = self._model_facts(row)

    def action_refresh(self) -> None:
        async def poll() -> None:
            await self.service.fleet.refresh()

        self._admin("poll every node", poll)

    # -- what the widgets ask for -----------------------------------------------------
    @on(ModelsTable.Opened)
    def open_model(self, message: ModelsTable.Opened) -> None:
        row = self.view.row(message.key)
        if row is None:
            return
        self._model_files.pop(row.key, None)
        self.push_screen(ModelDetail(row.key, self._model_facts(row)))
        settings = self.service.settings

        async def look() -> None:  # walks the disk: never on the loop the gateway serves
            self._model_files[row.key] = await asyncio.to_thread(on_disk, row, settings)
            self._refresh_detail()

        self.run_worker(look(), group="model-files")

    def _model_facts(self, row: ModelRow) -> list[tuple[str, str]]:
        failure = self.events_log.failures.get(row.id)
        files = self._model_files.get(row.key, "looking…")
        return model_facts(row, self.service.settings, self.service.fleet, failure, files)

    @on(RequestsTable.Opened)
    def open_request(self, message: RequestsTable.Opened) -> None:
        record = self.traffic.record(int(message.key))
        if record is not None:
            facts = request_facts(record, self.traffic.clock())
            self.push_screen(RequestDetail(record.id, facts))

    def action_filter(self) -> None:
        self.screen.remove_class("show-events")  # the filter is the requests pane's
        self.requests.filtering = True

    def action_keys(self) -> None:
        self.push_screen(KeyHelp(list(self.KEY_HELP.items())))

    # -- admin operations -----------------------------------------------------------
    def _admin(
        self,
        what: str,
        op: Callable[[], Awaitable[object] | object],
        row: ModelRow | None = None,
        doing: str | None = None,
        said: Callable[[object], str] | None = None,
    ) -> None:
        """Run ``op`` (``what`` it does, for the toast) as a worker; ``row`` shows ``doing``
        until it ends, so the operator sees the op in flight without blocking the screen.
        ``said`` words the result (what happened, not just "done"). Each outcome is also
        an event, kept in the events pane."""

        async def work() -> None:
            if row is not None and doing:
                self.pending[row.key] = doing
                self.refresh_view()
            try:
                result = op()
                if inspect.isawaitable(result):  # pin/unpin are plain calls
                    result = await result
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                reason = f"{what} failed: {one_line(str(exc) or type(exc).__name__)}"
                self.events_log.add(reason, "error")
                self.notify(reason, severity="error", timeout=8)
            else:
                text = said(result) if said is not None else f"{what}: done"
                self.events_log.add(text)
                self.notify(text)
            finally:
                if row is not None:
                    self.pending.pop(row.key, None)
                self.refresh_view()

        self.run_worker(work(), group="admin")

    def _selected(self) -> ModelRow | None:
        row = self.models.selected
        if row is None:
            self.notify("no model selected", severity="warning")
        return row

    def load_choices(self) -> list[tuple[str, str]]:
        """Catalogue models first (with their size), then anything nodes offer besides."""
        choices: dict[str, str] = {}
        loaded = {m.id: m.node for m in self.view.models if m.status == "loaded"}
        for profile in self.service.settings.models:
            size = f" · {profile.vram_mb / 1024:.1f} GiB" if profile.vram_mb else ""
            choices[profile.id] = f"catalogue{size}"
        for m in self.view.models:
            choices.setdefault(m.id, f"offered by {m.node}")
        return [
            (model, f"{hint} · loaded on {loaded[model]}" if model in loaded else hint)
            for model, hint in choices.items()
        ]

    def action_load(self) -> None:
        def chosen(model: str | None) -> None:
            if not model:
                return
            where = [m.node for m in self.view.models if m.id == model and m.status == "loaded"]
            if where:
                self.notify(f"{model} is already loaded on {', '.join(where)}")
                return
            self._admin(
                f"load {model}",
                lambda: self.service.fleet.load(model),
                said=lambda node: f"loaded {model} on {node}",
            )
            self.notify(f"loading {model}…")

        self.push_screen(ModelPicker(self.load_choices()), chosen)

    def action_unload(self) -> None:
        self.refresh_view()
        row = self._selected()
        if row is None:
            return
        if row.status != "loaded":
            self.notify(f"{row.id} is {row.status} on {row.node}: nothing to unload")
            return
        if not row.in_flight:
            self._unload(row)
            return

        def answered(yes: bool | None) -> None:
            if yes:
                self._unload(row, wait=True)

        question = (
            f"{row.id} on {row.node} is serving {row.in_flight} request(s). Unload it "
            "once they have finished?"
        )
        self.push_screen(ConfirmDialog("Unload a busy model?", question, "Unload"), answered)

    def _unload(self, row: ModelRow, *, wait: bool = False) -> None:
        fleet = self.service.fleet

        async def unload() -> list[str]:
            if wait:
                await self._until_idle(row)
            return await fleet.unload(row.id, row.node)

        self._admin(
            f"unload {row.id} from {row.node}",
            unload,
            row,
            "waiting for its requests, then unloading" if wait else "unloading",
            said=lambda _: f"unloaded {row.id} from {row.node}",
        )

    async def _until_idle(self, row: ModelRow) -> None:
        """Wait until nothing is using ``row``'s model on its node (new requests may still
        arrive meanwhile: the unload then refuses, and says so)."""
        fleet = self.service.fleet
        model_id = fleet.catalogue.canonical(row.id)
        while fleet.busy(row.node, model_id):  # leased, or waiting on its load
            await asyncio.sleep(IDLE_POLL_S)  # the fleet announces no release: look again

    def action_pin(self) -> None:
        if row := self._selected():
            fleet = self.service.fleet
            if row.pinned:
                self._admin(
                    f"unpin {row.id}",
                    lambda: fleet.unpin(row.id, row.node),
                    row,
                    said=lambda _: f"unpinned {row.id} on {row.node}",
                )
            else:
                self._admin(
                    f"pin {row.id} on {row.node}",
                    lambda: fleet.pin(row.id, row.node),
                    row,
                    said=lambda _: f"pinned {row.id} on {row.node}",
                )

    def action_evict(self) -> None:
        self.refresh_view()  # decide on the fleet as it is now, not a second ago
        row = self._selected()
        if row is None:
            return
        loaded = [m for m in self.view.models if m.id == row.id and m.status == "loaded"]
        if not loaded:
            self.notify(f"{row.id} is not loaded anywhere: nothing to evict")
            return
        pinned = [m.node for m in loaded if m.pinned]
        if not pinned:
            self._evict(row)
            return

        def answered(yes: bool | None) -> None:
            if yes:
                self._evict(row)

        question = (
            f"{row.id} is pinned on {', '.join(pinned)}: the evictor never unloads it there. "
            "Evict it from every node now anyway? (the pin stays for its next load)"
        )
        self.push_screen(ConfirmDialog("Evict a pinned model?", question, "Evict"), answered)

    def _evict(self, row: ModelRow) -> None:
        def said(result: object) -> str:
            nodes = result if isinstance(result, list) else []
            if nodes:
                return f"evicted {row.id} from {', '.join(nodes)}"
            return f"{row.id} was not evicted: it is serving requests wherever it is loaded"

        self._admin(
            f"evict {row.id}", lambda: self.service.fleet.evict(row.id), row, "evicting", said
        )

    def action_attach(self) -> None:
        self.push_screen(AttachDialog())

    @on(AttachDialog.Attach)
    def attach_requested(self, message: AttachDialog.Attach) -> None:
        dialog, endpoint = message.dialog, message.endpoint
        timeout = self.service.settings.poller.timeout_s
        dialog.connecting = f"connecting to {endpoint.endpoint} (up to {timeout:g} s)…"

        async def work() -> None:
            # The dialog may have been closed (Escape) while this waited: then only the
            # outcome is told, and no screen is popped that is not the dialog.
            try:
                await self.attach(endpoint)
            except Exception as exc:
                why = f"cannot attach: {one_line(str(exc) or type(exc).__name__)}"
                if dialog.is_attached:
                    dialog.connecting = ""
                    dialog.error = why
                else:
                    self.events_log.add(f"{endpoint.endpoint}: {why}")
                    self.notify(why, severity="error")
                return
            if dialog.is_attached and self.screen is dialog:
                dialog.dismiss(endpoint)
            text = f"attached {endpoint.name} ({endpoint.endpoint})"
            self.events_log.add(text)
            self.notify(text)
            self.refresh_view()

        self.run_worker(work(), group="admin")

    async def attach(self, endpoint: NeuronEndpoint) -> None:
        """Add a remote neuron to the running fleet; refuse one that does not answer.

        The client is built by the service's own ``build_neurons`` from a one-entry
        ``[[neurons]]`` list, so it gets the same timeouts a configured neuron gets.
        """
        only = self.service.settings.model_copy(
            update={"neurons": [endpoint], "local": LocalSettings(enabled=False)}
        )
        (neuron,) = build_neurons(only)
        await self.service.fleet.attach(neuron)

    def action_copy_url(self) -> None:
        base = self.service.url.rstrip("/")
        self.copy_to_clipboard(f"{base}/v1")
        self.notify(
            f"copied {base}/v1 (OpenAI base URL). Anthropic clients: ANTHROPIC_BASE_URL={base}",
            title="endpoint",
        )

    def deliver_screenshot(
        self, filename: str | None = None, path: str | None = None, time_format: str | None = None
    ) -> str | None:
        """The palette's screenshot, into a folder that exists (Textual's default is
        ~/Downloads, and the save fails on a host without one)."""
        folder = path or str(screenshot_dir())
        return super().deliver_screenshot(filename, folder, time_format)  # says when saved


def build_app(
    settings: Settings,
    neurons: list[Neuron] | None = None,
    *,
    refresh_s: float = 1.0,
    traffic: Traffic | None = None,
    clock: Callable[[], float] = time.monotonic,
    events_log: Events | None = None,
) -> HelexaApp:
    """The dashboard over a new Service whose gateway reports every request to the app.

    ``neurons`` replaces the ones the settings describe (tests, the screenshot script);
    ``clock`` the fleet's clock the idle times are read on (a test's frozen one).
    """
    traffic = traffic or Traffic()
    service = Service(settings, neurons, observe=traffic.observer)
    return HelexaApp(service, traffic, refresh_s=refresh_s, clock=clock, events_log=events_log)


async def _run(settings: Settings) -> int:
    app = build_app(settings)  # inside the loop: neurons may bind loop resources
    try:
        await app.run_async()
    finally:
        await app.stop_service()
    return app.return_code or 0


def run_tui(settings: Settings) -> int:
    """``helexa`` with no subcommand: the dashboard with the gateway inside."""
    return asyncio.run(_run(settings))
