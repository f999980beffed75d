"""The gateway as one object: neurons, fleet, HTTP app, listeners, poller and evictor.

``helexa --serve`` runs it headless; the TUI runs the same object in its own loop and
reads ``service.fleet``. Tests and the TUI may pass their own neurons instead of the ones
the settings describe, and an ``observe`` hook factory that runs beside the metrics.
"""

from __future__ import annotations

import asyncio
import logging
import sys

from aiohttp import web

from helexa.config import Settings, http_url, split_listen
from helexa.cortex.app import make_app
from helexa.cortex.background import Evictor, Poller
from helexa.cortex.fleet import Fleet
from helexa.cortex.metrics import GatewayMetrics, make_metrics_app
from helexa.cortex.observe import Observe, observe_all
from helexa.neuron.interface import Neuron
from helexa.neuron.remote import RemoteNeuron
from helexa.neuron.server import ListenError, is_loopback, start_server, until_signalled
from helexa.origins import BrowserPolicy

log = logging.getLogger("helexa.service")


def build_neurons(settings: Settings) -> list[Neuron]:
    """The local engine (when enabled) plus one client per configured remote neuron."""
    neurons: list[Neuron] = []
    if settings.local.enabled:
        from helexa.neuron.local import LocalNeuron  # the engine itself: on its first load

        neurons.append(LocalNeuron(settings))
    for endpoint in settings.neurons:
        neurons.append(
            RemoteNeuron(
                endpoint.name,
                endpoint.endpoint,
                endpoint.token,
                timeout_s=settings.gateway.request_timeout_s,
                poll_timeout_s=settings.poller.timeout_s,
                max_streams=settings.gateway.max_streams_per_node,
            )
        )
    return neurons


class Service:
    def __init__(
        self,
        settings: Settings,
        neurons: list[Neuron] | None = None,
        *,
        observe: Observe | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = GatewayMetrics()
        nodes = build_neurons(settings) if neurons is None else neurons
        self.fleet = Fleet.from_settings(nodes, settings, self.metrics)
        self.metrics.label_models_of(self.fleet)
        hooks = (
            self.metrics.observe if observe is None else observe_all(self.metrics.observe, observe)
        )
        self.app: web.Application = make_app(self.fleet, settings, observe=hooks)
        self.poller = Poller.from_settings(self.fleet, settings)
        self.evictor = Evictor(self.fleet, settings)
        self.metrics_url: str | None = None  # None until bound (or when it could not be)
        self._runners: list[web.AppRunner] = []
        self._url: str | None = None

    @property
    def url(self) -> str:
        """The gateway's base URL: the bound one once started (port 0 resolved)."""
        return self._url or http_url(*split_listen(self.settings.gateway.listen))

    async def start(self) -> None:
        """Listen, wait for a first look at every node, then keep polling and evicting.

        The metrics listener is best-effort: a taken metrics port is logged, not fatal,
        because serving requests matters more than exporting numbers about them.
        """
        runner, self._url = await start_server(
            self.app, *split_listen(self.settings.gateway.listen)
        )
        self._runners.append(runner)
        try:
            gateway = self.settings.gateway
            listen = split_listen(gateway.metrics_listen)
            browsers = BrowserPolicy.for_bind(
                listen[0], gateway.cors_origins, gateway.allowed_hosts
            )
            metrics_app = make_metrics_app(self.metrics, self.fleet, browsers=browsers)
            metrics_runner, self.metrics_url = await start_server(metrics_app, *listen)
            self._runners.append(metrics_runner)
        except ListenError as exc:
            log.warning("metrics are not exported: %s", exc)
        self.poller.start()
        await self.poller.polled.wait()
        self.evictor.start()

    async def stop(self) -> None:
        """Stop accepting, drain the requests in flight, unload local models, close neurons.

        Draining gives streams up to ``gateway.drain_s`` to finish and then ends each with
        an error event in its dialect (a request not yet answered gets a 503), so no client
        is left without a last word. The poller runs until then: a node found down while
        draining still ends what waits on it. Safe to call more than once, and after a
        failed start.
        """
        runners, self._runners = self._runners, []
        if runners:
            log.info("stopping the gateway: no new requests; those in flight may finish")
        await self.evictor.stop()
        for runner in runners:
            await runner.cleanup()  # the gateway's shutdown hook drains the relay
        await self.poller.stop()
        if runners and (remote := self.remote_loaded()):
            log.info("left loaded on their remote neurons: %s", ", ".join(remote))
        await self.fleet.close()  # LocalNeuron.close unloads its models
        if runners:
            log.info("stopped")

    def remote_loaded(self) -> list[str]:
        """``model@node`` for each model loaded on a remote neuron: stopping the gateway
        leaves them loaded there (their neuron serves the next gateway), unlike the
        local node's, which go with this process."""
        local = self.settings.local
        return sorted(
            f"{self.fleet.catalogue.canonical(state.id)}@{node.name}"
            for node in self.fleet.nodes.values()
            if node.up and not (local.enabled and node.name == local.name)
            for state in node.models.values()
            if state.status == "loaded"
        )


async def _headless(settings: Settings) -> None:
    service = Service(settings)
    try:
        await service.start()
        host, _ = split_listen(settings.gateway.listen)
        if not is_loopback(host) and not settings.gateway.api_keys:
            print(
                f"helexa: warning: gateway on {settings.gateway.listen} has no api_keys; "
                "anyone who can reach it can use it",
                file=sys.stderr,
            )
        metrics = f", metrics {service.metrics_url}/metrics" if service.metrics_url else ""
        print(
            f"helexa gateway on {service.url} (OpenAI base URL {service.url}/v1, "
            f"Anthropic base URL {service.url}{metrics})",
            flush=True,
        )
        await until_signalled()
    finally:
        await service.stop()


def configure_logging() -> None:
    """INFO to stderr for ``helexa --serve``: loads, evictions, nodes going down and back
    up are what an operator watching a headless gateway needs, and a line per request
    from helexa's own access log (helexa.access), which knows the model, tokens and TTFT;
    aiohttp's access log, which knows none of them, stays quiet."""
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def run_headless(settings: Settings) -> int:
    """``helexa --serve``: the gateway without the TUI, until SIGINT/SIGTERM."""
    configure_logging()
    try:
        asyncio.run(_headless(settings))
    except ListenError as exc:
        print(f"helexa: {exc}", file=sys.stderr)
        return 1
    return 0
