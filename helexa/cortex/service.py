"""The gateway as one object: neurons, fleet, HTTP app, listener and poller.

``helexa --serve`` runs it headless; the TUI runs the same object in its own loop and
reads ``service.fleet``. Tests and the TUI may pass their own neurons instead of the ones
the settings describe.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys

from aiohttp import web

from helexa.config import Settings, split_listen
from helexa.cortex.app import Observe, make_app
from helexa.cortex.fleet import Fleet
from helexa.neuron.interface import Neuron
from helexa.neuron.remote import RemoteNeuron
from helexa.neuron.server import ListenError, is_loopback, start_server, until_signalled

log = logging.getLogger("helexa.service")


def build_neurons(settings: Settings) -> list[Neuron]:
    """The local engine (when enabled) plus one client per configured remote neuron."""
    neurons: list[Neuron] = []
    if settings.local.enabled:
        from helexa.neuron.local import LocalNeuron  # imports torch: only when wanted

        neurons.append(LocalNeuron(settings))
    for endpoint in settings.neurons:
        neurons.append(
            RemoteNeuron(
                endpoint.name,
                endpoint.endpoint,
                endpoint.token,
                timeout_s=settings.gateway.request_timeout_s,
                poll_timeout_s=settings.poller.timeout_s,
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
        self.fleet = Fleet(build_neurons(settings) if neurons is None else neurons)
        self.app: web.Application = make_app(self.fleet, settings, observe=observe)
        self._runner: web.AppRunner | None = None
        self._poller: asyncio.Task[None] | None = None
        self._url: str | None = None

    @property
    def url(self) -> str:
        """The gateway's base URL: the bound one once started (port 0 resolved)."""
        if self._url is not None:
            return self._url
        host, port = split_listen(self.settings.gateway.listen)
        return f"http://{f'[{host}]' if ':' in host else host}:{port}"

    async def start(self) -> None:
        """Listen, take a first look at every node, then keep looking every interval."""
        host, port = split_listen(self.settings.gateway.listen)
        self._runner, self._url = await start_server(self.app, host, port)
        await self.fleet.refresh()
        self._poller = asyncio.create_task(self._poll(), name="helexa-poller")

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.settings.poller.interval_s)
            try:
                await self.fleet.refresh()
            except Exception:  # the poller must outlive any one bad round
                log.exception("fleet refresh failed")

    async def stop(self) -> None:
        """Stop accepting, cancel streams in flight, unload local models, close neurons.

        Safe to call more than once, and after a failed start.
        """
        poller, self._poller = self._poller, None
        if poller is not None:
            poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await poller
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()  # its shutdown hook cancels the streaming handlers
        await self.fleet.close()  # LocalNeuron.close unloads its models


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
        print(
            f"helexa gateway on {service.url} (OpenAI base URL {service.url}/v1, "
            f"Anthropic base URL {service.url})",
            flush=True,
        )
        await until_signalled()
    finally:
        await service.stop()


def run_headless(settings: Settings) -> int:
    """``helexa --serve``: the gateway without the TUI, until SIGINT/SIGTERM."""
    try:
        asyncio.run(_headless(settings))
    except ListenError as exc:
        print(f"helexa: {exc}", file=sys.stderr)
        return 1
    return 0
