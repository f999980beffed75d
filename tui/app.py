"""The ``helexa`` dashboard: the gateway and its fleet, live, in one asyncio loop.

The app runs the same :class:`helexa.cortex.service.Service` that ``helexa --serve`` runs,
inside Textual's event loop, and reads the gateway's own state: every refresh renders
``service.fleet.snapshot()``, and every admin key calls the fleet's admin operations in a
worker, so the screen never blocks and never keeps a second copy of the truth. Token
rates and TTFT come from :mod:`tui.traffic`, fed by the gateway's per-request hooks.

Quitting (q / Ctrl-C) stops the service first: streams in flight get up to
``gateway.drain_s`` to finish (the rest end with an error event), local models are
unloaded and neurons closed before the terminal is handed back.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
from collections.abc import Awaitable, Callable

from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.widgets import Footer, Header

from helexa.config import LocalSettings, NeuronEndpoint, Settings
from helexa.cortex.service import Service, build_neurons
from helexa.neuron.interface import Neuron
from tui.fleetview import FleetView, ModelRow, fleet_view
from tui.traffic import Traffic
from tui.widgets.attach_dialog import AttachDialog
from tui.widgets.devices import DevicesPanel
from tui.widgets.model_picker import ModelPicker
from tui.widgets.models import ModelsTable
from tui.widgets.request_log import RequestLog
from tui.widgets.throughput import ThroughputPanel


class HelexaApp(App[int]):
    CSS_PATH = "helexa.tcss"
    TITLE = "helexa"
    BINDINGS = [
        Binding("l", "load", "Load"),
        Binding("u", "unload", "Unload"),
        Binding("p", "pin", "Pin/unpin"),
        Binding("e", "evict", "Evict"),
        Binding("a", "attach", "Attach neuron"),
        Binding("c", "copy_url", "Copy URL"),
        Binding("r", "refresh", "Refresh"),
        Binding("q", "quit", "Quit"),
        Binding("ctrl+c", "quit", "Quit", show=False, priority=True),
    ]

    def __init__(
        self,
        service: Service,
        traffic: Traffic,
        *,
        refresh_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``traffic`` must be the one whose ``observer`` the service's gateway calls;
        ``clock`` is the fleet's (monotonic) clock, which idle times are measured against:
        a snapshot test freezes it so "6s ago" never becomes "7s ago" on a slow machine."""
        super().__init__()
        self.service = service
        self.refresh_s = refresh_s
        self.clock = clock
        self.traffic = traffic
        self.view = FleetView()
        self.pending: dict[str, str] = {}  # model row key -> admin op in flight
        self.devices = DevicesPanel(id="devices")
        self.throughput = ThroughputPanel(id="throughput")
        self.models = ModelsTable(id="models")
        self.log_pane = RequestLog(id="log")
        self._stopped = False

    # -- layout ---------------------------------------------------------------------
    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal(id="top"):
            yield self.devices
            yield self.throughput
        yield self.models
        yield self.log_pane
        yield Footer()

    def on_mount(self) -> None:
        self.devices.border_title = "Devices"
        self.throughput.border_title = "Throughput"
        self.models.border_title = "Models"
        self.log_pane.border_title = "Requests"
        self.sub_title = "starting gateway…"
        self.run_worker(self._start_service(), group="service", exclusive=True)
        self.set_interval(self.refresh_s, self.refresh_view)

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
        await self.service.stop()

    async def action_quit(self) -> None:
        if self._stopped:
            self.exit(0)
            return
        drain = self.service.settings.gateway.drain_s
        self.sub_title = f"stopping: finishing streams (up to {drain:g} s; q again to quit now)…"
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
        """Re-read the fleet snapshot and the traffic record and push them to the widgets."""
        self.view = fleet_view(self.service.fleet.snapshot(self.clock()))
        self.devices.show(self.view.nodes)
        self.models.show(self.view.models, self.pending)
        traffic = self.traffic
        self.throughput.show(
            traffic.series(),
            {m: traffic.series(m) for m in traffic.models()},
            [r.ttft_s for r in traffic.recent_ttft(20) if r.ttft_s is not None],
        )
        self.log_pane.show(traffic.finished_since(self.log_pane.last_seq))

    def action_refresh(self) -> None:
        async def poll() -> None:
            await self.service.fleet.refresh()

        self._admin("poll every node", poll)

    # -- admin operations -----------------------------------------------------------
    def _admin(
        self,
        what: str,
        op: Callable[[], Awaitable[object] | object],
        row: ModelRow | None = None,
        doing: str | None = None,
    ) -> None:
        """Run ``op`` (``what`` it does, for the toast) as a worker; ``row`` shows ``doing``
        until it ends, so the operator sees the op in flight without blocking the screen."""

        async def work() -> None:
            if row is not None and doing:
                self.pending[row.key] = doing
                self.refresh_view()
            try:
                result = op()
                if inspect.isawaitable(result):  # pin/unpin are plain calls
                    await result
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.notify(f"{what} failed: {exc}", severity="error", timeout=8)
            else:
                self.notify(f"{what}: done")
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
            if model:
                self._admin(f"load {model}", lambda: self.service.fleet.load(model))
                self.notify(f"loading {model}…")

        self.push_screen(ModelPicker(self.load_choices()), chosen)

    def action_unload(self) -> None:
        if row := self._selected():
            self._admin(
                f"unload {row.id} from {row.node}",
                lambda: self.service.fleet.unload(row.id, row.node),
                row,
                "unloading",
            )

    def action_pin(self) -> None:
        if row := self._selected():
            fleet = self.service.fleet
            if row.pinned:
                self._admin(f"unpin {row.id}", lambda: fleet.unpin(row.id, row.node), row)
            else:
                self._admin(f"pin {row.id} on {row.node}", lambda: fleet.pin(row.id, row.node), row)

    def action_evict(self) -> None:
        if row := self._selected():
            self._admin(
                f"evict {row.id}", lambda: self.service.fleet.evict(row.id), row, "evicting"
            )

    def action_attach(self) -> None:
        def chosen(endpoint: NeuronEndpoint | None) -> None:
            if endpoint is not None:
                self._admin(
                    f"attach {endpoint.name} ({endpoint.endpoint})",
                    lambda: self.attach(endpoint),
                )

        self.push_screen(AttachDialog(), chosen)

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


def build_app(
    settings: Settings,
    neurons: list[Neuron] | None = None,
    *,
    refresh_s: float = 1.0,
    traffic: Traffic | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> HelexaApp:
    """The dashboard over a new Service whose gateway reports every request to the app.

    ``neurons`` replaces the ones the settings describe (tests, the screenshot script);
    ``clock`` the fleet's clock the idle times are read on (a test's frozen one).
    """
    traffic = traffic or Traffic()
    service = Service(settings, neurons, observe=traffic.observer)
    return HelexaApp(service, traffic, refresh_s=refresh_s, clock=clock)


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
