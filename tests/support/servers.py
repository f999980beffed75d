"""Real loopback servers for the integration tests: a neuron API over a test double, and
a gateway whose fleet reaches that neuron through :class:`RemoteNeuron` over HTTP."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from helexa.config import LocalSettings, Settings
from helexa.cortex.app import make_app
from helexa.cortex.fleet import Fleet
from helexa.cortex.observe import Observe
from helexa.neuron.interface import Neuron
from helexa.neuron.remote import RemoteNeuron
from helexa.neuron.server import make_neuron_app, start_server


@asynccontextmanager
async def serving(app: web.Application) -> AsyncIterator[str]:
    """Serve ``app`` on 127.0.0.1 at a free port for the block; yields its base URL."""
    runner, url = await start_server(app, "127.0.0.1", 0)
    try:
        yield url
    finally:
        await runner.cleanup()


@contextmanager
def serving_in_thread(app: web.Application) -> Iterator[str]:
    """Serve ``app`` on 127.0.0.1 from an event loop in its own thread, for a client that
    blocks the test's thread (``helexa status``, huggingface_hub); yields its base URL."""
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(app)
    loop.run_until_complete(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", 0)
    loop.run_until_complete(site.start())
    port = runner.addresses[0][1]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result()
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()


@dataclass
class NeuronProcess:
    """A ``helexa neuron``-style server in a child process (see ``neuron_process.py``)."""

    url: str
    process: asyncio.subprocess.Process

    def kill(self) -> None:
        """SIGKILL: the node dies as a crashed host does, its connections cut mid-byte."""
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGKILL)

    def freeze(self) -> None:
        """SIGSTOP: the node hangs as a wedged host does, its connections open and silent
        (the kernel still accepts new ones). ``kill`` ends it frozen or not."""
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGSTOP)


@asynccontextmanager
async def neuron_process(name: str, *args: str) -> AsyncIterator[NeuronProcess]:
    """Start ``tests.support.neuron_process NAME ARGS``; yield once it is serving."""
    root = Path(__file__).resolve().parents[2]
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.support.neuron_process",
        name,
        *args,
        cwd=root,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        async with asyncio.timeout(30):
            line = (await process.stdout.readline()).decode()
        if "serving on " not in line:
            raise RuntimeError(f"neuron process {name!r} did not start: {line!r}")
        yield NeuronProcess(line.rsplit("serving on ", 1)[1].strip(), process)
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()


@dataclass
class HeadlessGateway:
    """``helexa --serve`` in a child process, and where it listens."""

    url: str
    metrics_url: str
    process: asyncio.subprocess.Process

    async def terminate(self) -> tuple[int | None, str]:
        """SIGTERM, then wait (30 s at most) for the exit; its status and stderr."""
        self.process.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(self.process.communicate(), timeout=30)
        return self.process.returncode, stderr.decode()


@asynccontextmanager
async def headless_gateway(home: Path, config: Path, **env: str) -> AsyncIterator[HeadlessGateway]:
    """Run ``helexa --serve --no-local`` on a free port over ``config``, with ``home`` as
    its config and cache dirs and ``env`` added to its environment; yield once it serves."""
    environ = {
        **os.environ,
        "XDG_CONFIG_HOME": str(home),
        "XDG_CACHE_HOME": str(home),
        "HELEXA_CONFIG": str(config),
        "HELEXA_GATEWAY__METRICS_LISTEN": "127.0.0.1:0",
        **env,
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "helexa.cli",
        "--serve",
        "--no-local",
        "--listen",
        "127.0.0.1:0",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=environ,
    )
    try:
        assert process.stdout is not None
        line = (await asyncio.wait_for(process.stdout.readline(), timeout=60)).decode()
        found = re.findall(r"http://127\.0\.0\.1:\d+", line)
        assert len(found) >= 2, line
        # The gateway first, its metrics port last.
        yield HeadlessGateway(found[0], found[-1], process)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def neuron_app_with_chat(neuron: Neuron, chat: Handler) -> web.Application:
    """The neuron API over ``neuron``, its chat route answered by ``chat`` instead: for
    upstream behaviour the real server never shows (truncation, a connection dropped)."""

    @web.middleware
    async def replace_chat(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path == "/v1/chat/completions":
            return await chat(request)
        return await handler(request)

    app = make_neuron_app(neuron)
    app.middlewares.append(replace_chat)
    return app


@dataclass
class Gateway:
    url: str
    fleet: Fleet
    remote: RemoteNeuron


def gateway_settings(**gateway: object) -> Settings:
    """Settings for a test gateway: no local engine, gateway keys as given."""
    return Settings.model_validate({"gateway": gateway, "local": LocalSettings(enabled=False)})


@asynccontextmanager
async def gateway_over(
    neuron: Neuron,
    settings: Settings | None = None,
    *,
    neuron_token: str | None = None,
    observe: Observe | None = None,
    make_fleet: Callable[[list[Neuron]], Fleet] = Fleet,
) -> AsyncIterator[Gateway]:
    """``neuron`` behind its HTTP API, and a gateway in front of that, both on loopback."""
    async with serving(make_neuron_app(neuron, token=neuron_token)) as neuron_url:
        remote = RemoteNeuron(neuron.name, neuron_url, neuron_token)
        fleet = make_fleet([remote])
        await fleet.refresh()
        app = make_app(fleet, settings or gateway_settings(), observe=observe)
        try:
            async with serving(app) as url:
                yield Gateway(url, fleet, remote)
        finally:
            await fleet.close()


@dataclass
class Fetched:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def fetch(
    method: str,
    url: str,
    *,
    json_body: Any = None,
    data: bytes | AsyncIterator[bytes] | None = None,
    headers: dict[str, str] | None = None,
) -> Fetched:
    """One raw HTTP call with a fresh session: for checking exact bytes and status codes."""
    async with (
        aiohttp.ClientSession() as http,
        http.request(method, url, json=json_body, data=data, headers=headers) as response,
    ):
        return Fetched(response.status, dict(response.headers), await response.read())
