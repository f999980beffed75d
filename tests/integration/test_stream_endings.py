"""How a stream ends when something fails after its 200 went out, over real loopback HTTP.

Once a response is prepared its status line is gone, so every failure from then on must
be an event in the client's dialect and the stream must end as a well-formed chunked body:
a JSON error body written into the open stream reads as broken chunking to curl and
leaves SDK clients hanging. The failures here are the gateway's own (its stream writer
raising), a neuron's bug after its first chunk, and (in later sections) a node that goes
quiet or down, and a gateway that stops.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from helexa.config import Settings
from helexa.cortex.app import make_app
from helexa.cortex.fleet import Fleet
from helexa.cortex.relay import FLIGHTS
from helexa.cortex.service import Service
from helexa.neuron.remote import RemoteNeuron
from helexa.neuron.server import make_neuron_app
from helexa.wire.anthropic.stream import AnthropicStream
from helexa.wire.openai.stream import OpenAIStream
from helexa.wire.responses.stream import ResponsesStream
from helexa.wire.sse import SSEDecoder, SSEEvent
from tests.conftest import MODEL
from tests.support.scripted_neuron import Reply, ScriptedNeuron
from tests.support.servers import (
    Gateway,
    NeuronProcess,
    fetch,
    gateway_over,
    gateway_settings,
    headless_gateway,
    neuron_process,
    serving,
)
from tests.support.streams import read_all, read_events

USER = [{"role": "user", "content": "hi"}]
STREAMED = {
    "/v1/chat/completions": {"model": MODEL, "messages": USER, "stream": True},
    "/v1/messages": {"model": MODEL, "max_tokens": 8, "messages": USER, "stream": True},
    "/v1/responses": {"model": MODEL, "input": "hi", "stream": True},
}


async def read_stream(url: str, body: Any) -> tuple[int, list[SSEEvent]]:
    """POST ``body`` and read the whole answer; a broken chunked body raises here."""
    async with (
        asyncio.timeout(10),
        aiohttp.ClientSession() as http,
        http.post(url, json=body) as response,
    ):
        return response.status, await read_all(response, SSEDecoder())


def terminal_error(path: str, events: list[SSEEvent]) -> str:
    """The message of the dialect's terminal error event (asserting the stream ends on it)."""
    last = events[-1]
    if path == "/v1/messages":
        assert (last.event, last.json()["type"]) == ("error", "error")
        return str(last.json()["error"]["message"])
    if path == "/v1/responses":
        assert last.event == "response.failed"
        assert events[-2].event == "error"
        return str(last.json()["response"]["error"]["message"])
    assert all(e.data != "[DONE]" for e in events)
    return str(last.json()["error"]["message"])


def broken(*_: Any) -> bytes:
    raise RuntimeError("cannot encode this")


@pytest.mark.parametrize(
    ("path", "writer"),
    [
        ("/v1/chat/completions", OpenAIStream),
        ("/v1/messages", AnthropicStream),
        ("/v1/responses", ResponsesStream),
    ],
)
async def test_a_writer_failing_after_the_200_ends_the_stream_in_its_dialect(
    gateway: Gateway, monkeypatch: pytest.MonkeyPatch, path: str, writer: type
) -> None:
    """The dialect's writer fails on the first chunk and again when asked to write the
    failure (a payload it cannot encode does both): the stream still ends with the
    dialect's error event, as a complete chunked body."""
    monkeypatch.setattr(writer, "feed", broken)
    monkeypatch.setattr(writer, "fail", broken)
    status, events = await read_stream(gateway.url + path, STREAMED[path])
    assert status == 200
    assert "RuntimeError: cannot encode this" in terminal_error(path, events)
    assert gateway.fleet.nodes["node-a"].up  # our own failure says nothing about the node


async def test_a_lone_surrogate_in_a_streamed_responses_request_never_breaks_the_stream(
    gateway: Gateway,
) -> None:
    """``"user": "\\ud800"`` once broke the chunked stream (the Responses envelope echoes
    it and could not be encoded). Refused up front or ended cleanly, never broken."""
    body = json.dumps({"model": MODEL, "input": "hi", "stream": True, "user": "\ud800"})
    async with (
        asyncio.timeout(10),
        aiohttp.ClientSession() as http,
        http.post(
            f"{gateway.url}/v1/responses",
            data=body,
            headers={"Content-Type": "application/json"},
        ) as response,
    ):
        raw = await response.read()  # a broken chunked body raises here
    if response.status != 200:
        assert response.status == 400 and b"error" in raw
        return
    events = SSEDecoder().feed(raw)
    assert events[-1].event in ("response.completed", "response.failed")


async def test_the_openai_sdk_sees_a_failed_responses_stream_end(
    gateway: Gateway, monkeypatch: pytest.MonkeyPatch, openai_client: openai.AsyncOpenAI
) -> None:
    """The SDK's iteration over a Responses stream that fails after its 200 finishes (on
    ``response.failed``) instead of hanging."""
    monkeypatch.setattr(ResponsesStream, "feed", broken)
    monkeypatch.setattr(ResponsesStream, "fail", broken)
    async with asyncio.timeout(10):
        stream = await openai_client.responses.create(model=MODEL, input="hi", stream=True)
        types = [event.type async for event in stream]
    assert types[-2:] == ["error", "response.failed"]


@pytest.mark.parametrize("path", list(STREAMED))
async def test_a_neuron_bug_after_its_first_chunk_is_an_error_event_not_a_dead_node(
    gateway: Gateway, scripted: ScriptedNeuron, path: str
) -> None:
    """A neuron whose generation raises something that is no NeuronError mid-stream ends
    its own stream with an error frame (not a 500 status line inside it), so the gateway
    passes the message on in the client's dialect and keeps the node up."""
    scripted.script = Reply(text=["a", "b"], fail_after=2, error=RuntimeError("boom"))
    status, events = await read_stream(gateway.url + path, STREAMED[path])
    assert status == 200
    assert "RuntimeError: boom" in terminal_error(path, events)
    assert gateway.fleet.nodes["node-a"].up


# -- a node that goes quiet or down -------------------------------------------------------


@pytest.mark.parametrize("path", list(STREAMED))
async def test_a_stream_its_node_stops_feeding_ends_after_the_idle_timeout(
    scripted: ScriptedNeuron, path: str
) -> None:
    """Two chunks, then nothing: after ``stream_idle_timeout_s`` the client gets a
    terminal error in its dialect and the neuron's stream is closed (generation stops)."""
    scripted.script = Reply(text=["a", "b", "c"], block_after=2)
    async with gateway_over(scripted, gateway_settings(stream_idle_timeout_s=0.3)) as gw:
        status, events = await read_stream(gw.url + path, STREAMED[path])
        assert status == 200
        assert "sent nothing for 0.3 s" in terminal_error(path, events)
        await asyncio.wait_for(scripted.cancelled.wait(), timeout=5)
        assert gw.fleet.nodes["node-a"].up  # quiet is not down: the poller decides that


async def test_the_idle_timeout_does_not_cut_a_stream_that_keeps_coming(
    scripted: ScriptedNeuron,
) -> None:
    """The clock restarts with every chunk, and a non-streamed answer is bounded the same way."""
    scripted.script = Reply(text=["a"] * 50)
    async with gateway_over(scripted, gateway_settings(stream_idle_timeout_s=5)) as gw:
        path = "/v1/chat/completions"
        status, events = await read_stream(gw.url + path, STREAMED[path])
        assert (status, events[-1].data) == (200, "[DONE]")
        scripted.script = Reply(text=["a"], block_after=1)
        settings = gateway_settings(stream_idle_timeout_s=0.3)
    async with gateway_over(scripted, settings) as gw:
        body = {"model": MODEL, "messages": USER}
        response = await fetch("POST", f"{gw.url}/v1/chat/completions", json_body=body)
        assert response.status == 504
        assert response.json()["error"]["code"] == "stream_idle_timeout"


@asynccontextmanager
async def gateway_over_processes(
    *nodes: NeuronProcess, **gateway: object
) -> AsyncIterator[tuple[str, Fleet]]:
    """A gateway over ``helexa neuron``-style processes, polled once; no poller runs, so a
    test decides when the fleet looks (``fleet.refresh``)."""
    fleet = Fleet([RemoteNeuron(f"n{i}", n.url) for i, n in enumerate(nodes)])
    await fleet.refresh()
    try:
        async with serving(make_app(fleet, gateway_settings(**gateway))) as url:
            yield url, fleet
    finally:
        await fleet.close()


@pytest.mark.parametrize("path", list(STREAMED))
async def test_a_frozen_node_is_marked_down_and_its_open_streams_end(path: str) -> None:
    """SIGSTOP mid-stream: the connection stays open and silent. The idle timeout is far
    off, but the first poll that finds the node gone ends the stream in its dialect."""
    async with (
        neuron_process("frozen", "--block-after", "2") as node,
        gateway_over_processes(node, stream_idle_timeout_s=600) as (url, fleet),
        asyncio.timeout(20),
        aiohttp.ClientSession() as http,
        http.post(url + path, json=STREAMED[path]) as response,
    ):
        assert response.status == 200
        decoder = SSEDecoder()
        events = await read_events(response, decoder)
        node.freeze()
        await fleet.refresh(timeout_s=0.5)
        assert not fleet.nodes["n0"].up
        events += await read_all(response, decoder)
        message = terminal_error(path, events)
        assert "'n0' went down while answering" in message


async def test_a_request_waiting_on_a_frozen_node_is_rerouted_when_it_is_marked_down() -> None:
    """Frozen before its first chunk (the kernel accepted the connection, nobody reads
    it): once the node is marked down the request goes to the other node."""
    async with (
        neuron_process("frozen") as frozen,
        neuron_process("healthy") as healthy,
        gateway_over_processes(frozen, healthy) as (url, fleet),
        asyncio.timeout(20),
    ):
        frozen.freeze()  # n0: placement takes it first (equally busy, named first)
        body = {"model": MODEL, "messages": USER}
        answer = asyncio.create_task(fetch("POST", f"{url}/v1/chat/completions", json_body=body))
        while not fleet.use[("n0", MODEL)].in_flight:  # routed to the frozen node
            await asyncio.sleep(0)
        await fleet.refresh(timeout_s=0.5)
        response = await answer
        assert response.status == 200
        assert response.json()["choices"][0]["message"]["content"] == "Hello world"


# -- a gateway that stops -----------------------------------------------------------------


def service_settings(drain_s: float) -> Settings:
    return gateway_settings(listen="127.0.0.1:0", metrics_listen="127.0.0.1:0", drain_s=drain_s)


async def test_stopping_lets_a_stream_in_flight_finish(scripted: ScriptedNeuron) -> None:
    """Stop begins with a stream mid-answer: the listener closes at once (no new client),
    the stream runs to its end, and stop returns then, long before ``drain_s``."""
    resume = asyncio.Event()
    scripted.script = Reply(text=["a", "b", "c"], block_after=2, resume=resume)
    service = Service(service_settings(drain_s=60), [scripted])
    await service.start()
    path = "/v1/chat/completions"
    try:
        async with (
            asyncio.timeout(20),
            aiohttp.ClientSession() as http,
            http.post(service.url + path, json=STREAMED[path]) as response,
        ):
            decoder = SSEDecoder()
            events = await read_events(response, decoder)
            stopping = asyncio.create_task(service.stop())
            await service.app[FLIGHTS].draining.wait()
            with pytest.raises(aiohttp.ClientConnectionError):
                await fetch("GET", f"{service.url}/health")
            resume.set()
            events += await read_all(response, decoder)
            await stopping
        assert events[-1].data == "[DONE]"
        text = "".join(
            e.json()["choices"][0]["delta"].get("content") or ""
            for e in events[:-1]
            if e.json()["choices"]
        )
        assert text == "abc"
    finally:
        await service.stop()


async def test_at_the_drain_bound_streams_get_an_error_event_and_waiting_requests_a_503(
    scripted: ScriptedNeuron,
) -> None:
    """What is still running when ``drain_s`` is up is ended in its own dialect: an
    Anthropic stream with its ``error`` event, an OpenAI request still waiting for its
    first token with a 503 body."""

    def script(request: dict[str, Any]) -> Reply:
        if request["messages"][-1]["content"] == "queued":
            return Reply(block_after=0)  # nothing yet: the gateway still holds the status
        return Reply(text=["a", "b"], block_after=1)

    scripted.script = script
    service = Service(service_settings(drain_s=0.2), [scripted])
    await service.start()
    queued = {"model": MODEL, "messages": [{"role": "user", "content": "queued"}]}
    try:
        async with (
            asyncio.timeout(20),
            aiohttp.ClientSession() as http,
            http.post(service.url + "/v1/messages", json=STREAMED["/v1/messages"]) as stream,
        ):
            decoder = SSEDecoder()
            events = await read_events(stream, decoder)
            waiting = asyncio.create_task(
                fetch("POST", f"{service.url}/v1/chat/completions", json_body=queued)
            )
            while len(scripted.requests) < 2:  # both reached the neuron
                await asyncio.sleep(0)
            await service.stop()
            events += await read_all(stream, decoder)
            refused = await waiting
        last = events[-1].json()
        assert (events[-1].event, last["error"]["type"]) == ("error", "overloaded_error")
        assert "shutting down" in last["error"]["message"]
        assert refused.status == 503
        assert refused.json()["error"]["code"] == "shutting_down"
    finally:
        await service.stop()


async def test_sigterm_gives_a_stream_in_flight_its_last_event(tmp_path: Path) -> None:
    """``helexa --serve`` taking SIGTERM mid-stream: the stream ends with the dialect's
    error event once the drain is up, and the process exits 0."""
    neuron = ScriptedNeuron("n1", script=Reply(text=["a", "b"], block_after=1))
    path = "/v1/responses"
    async with serving(make_neuron_app(neuron)) as neuron_url:
        config = tmp_path / "helexa.toml"
        config.write_text(f'[[neurons]]\nname = "n1"\nendpoint = "{neuron_url}"\n')
        async with (
            headless_gateway(tmp_path, config, HELEXA_GATEWAY__DRAIN_S="0.2") as served,
            asyncio.timeout(30),
            aiohttp.ClientSession() as http,
            http.post(served.url + path, json=STREAMED[path]) as response,
        ):
            decoder = SSEDecoder()
            events = await read_events(response, decoder)
            terminated = asyncio.create_task(served.terminate())
            events += await read_all(response, decoder)
            returncode, _ = await terminated
        assert "shutting down" in terminal_error(path, events)
        assert returncode == 0
