"""A client that stops reading its stream, against the local engine behind the real neuron
HTTP API on loopback: its stream is cancelled once its buffer has waited too long, and the
device goes on serving everyone else."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import openai
import pytest
from aiohttp import web

from helexa.config import LocalSettings, ModelProfile, Settings
from helexa.engine.generate import LoadedModel
from helexa.neuron.interface import LoadRequest
from helexa.neuron.local import LocalNeuron
from helexa.neuron.server import make_neuron_app
from tests.engine.factories import make_tiny_model_dir

# Long enough that the unread answer (~200 bytes a token) overflows the socket buffers.
CONTEXT = 2048
SMALL_BUFFER = 4096  # bytes, each way: backpressure reaches the engine after kilobytes


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny"), seed=41)


@asynccontextmanager
async def serving_small_buffers(app: web.Application) -> AsyncIterator[tuple[str, int]]:
    """``app`` on a loopback socket with a small send buffer (accepted connections inherit
    it), so an unread response fills it after kilobytes instead of megabytes."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SMALL_BUFFER)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=5.0)
    await runner.setup()
    await web.SockSite(runner, sock).start()
    try:
        yield f"http://127.0.0.1:{port}", port
    finally:
        await runner.cleanup()


def open_and_stop_reading(port: int, body: dict[str, Any]) -> socket.socket:
    """Send a streaming request from a socket with a small receive buffer, then read nothing."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_BUFFER)
    sock.connect(("127.0.0.1", port))
    data = json.dumps(body).encode()
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(data), data)
    )
    return sock


def read_to_end(sock: socket.socket) -> bytes:
    sock.settimeout(30)
    parts = []
    while chunk := sock.recv(65536):
        parts.append(chunk)
    return b"".join(parts)


async def test_a_client_that_stops_reading_is_cancelled_and_the_others_go_on(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    started = threading.Event()
    runs: list[tuple[threading.Event, list[int]]] = []  # per generation: cancel, chunks made
    real_stream_chat = LoadedModel.stream_chat

    def counting(
        self: LoadedModel, request: dict[str, Any], cancel: threading.Event
    ) -> Iterator[dict[str, Any]]:
        made = [0]
        runs.append((cancel, made))
        started.set()  # on the device thread, as the generation begins
        for chunk in real_stream_chat(self, request, cancel):
            made[0] += 1
            yield chunk

    monkeypatch.setattr(LoadedModel, "stream_chat", counting)
    settings = Settings(
        local=LocalSettings(stream_buffer=8, stream_stall_s=0.5),
        models=[ModelProfile(id="tiny", path=str(model_dir), context_length=CONTEXT)],
    )
    neuron = LocalNeuron(settings)
    messages = [{"role": "user", "content": "def add(a, b):"}]
    try:
        async with serving_small_buffers(make_neuron_app(neuron)) as (url, port):
            await neuron.load(LoadRequest(model_id="tiny"))
            # No max_tokens: it would fill the context, far more than the buffers hold.
            body = {"model": "tiny", "messages": messages, "temperature": 0, "stream": True}
            stalled = await asyncio.to_thread(open_and_stop_reading, port, body)
            try:
                assert await asyncio.to_thread(started.wait, 30)
                client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0)
                # Before the fix never answered; the bound is generous for a loaded machine.
                async with client, asyncio.timeout(120):
                    reply = await client.chat.completions.create(
                        model="tiny", messages=messages, temperature=0, max_tokens=3
                    )
                assert reply.usage is not None and 1 <= reply.usage.completion_tokens <= 3
                (stalled_cancel, stalled_made), _ = runs
                # Cancelled while its client is still connected, long before the context
                # was full: by the stall timeout, not by a hang-up or the end of the answer.
                assert stalled_cancel.is_set()
                assert stalled_made[0] < CONTEXT // 2
                # Reading on, the client gets what was waiting, then why it ended.
                answer = await asyncio.to_thread(read_to_end, stalled)
            finally:
                stalled.close()
    finally:
        await neuron.close()
    assert b'"code":"stream_stalled"' in answer
    assert b"[DONE]" not in answer
