"""Nodes that die or misbehave under a gateway, over real loopback HTTP.

A node killed mid-stream is a real ``helexa neuron``-style server process (the scripted
neuron in ``tests/support/neuron_process.py``) taking SIGKILL; upstream truncation and dropped
connections come from a neuron API whose chat route is replaced by a raw handler. The
client side is read as bytes and SSE-decoded, so the assertions are about the wire.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from helexa.config import ModelProfile
from helexa.cortex.app import make_app
from helexa.cortex.catalogue import Catalogue
from helexa.cortex.fleet import Fleet
from helexa.neuron.remote import RemoteNeuron
from helexa.neuron.server import make_neuron_app, start_server
from helexa.wire.sse import SSEDecoder, SSEEvent, sse
from tests.support.scripted_neuron import ScriptedNeuron
from tests.support.servers import (
    Handler,
    fetch,
    gateway_settings,
    neuron_app_with_chat,
    neuron_process,
    serving,
)
from tests.support.streams import read_all

MODEL = "test-model"
USER = [{"role": "user", "content": "hi"}]
BODIES = {
    "/v1/chat/completions": {"model": MODEL, "messages": USER, "stream": True},
    "/v1/messages": {"model": MODEL, "max_tokens": 8, "messages": USER, "stream": True},
    "/v1/responses": {"model": MODEL, "input": "hi", "stream": True},
}


@asynccontextmanager
async def gateway(urls: dict[str, str]) -> AsyncIterator[tuple[str, Fleet]]:
    """A gateway over the neuron APIs at ``urls`` (name -> base URL), all polled once."""
    fleet = Fleet([RemoteNeuron(name, url, poll_timeout_s=2) for name, url in urls.items()])
    await fleet.refresh()
    try:
        async with serving(make_app(fleet, gateway_settings())) as url:
            yield url, fleet
    finally:
        await fleet.close()


def names(events: list[SSEEvent]) -> list[str | None]:
    return [e.event for e in events]


# -- a node killed mid-stream -----------------------------------------------------------------


def saw_text(path: str, event: SSEEvent) -> bool:
    """Whether ``event`` carries the first piece of text (the node is mid-answer then)."""
    if path == "/v1/messages":
        return event.event == "content_block_delta"
    return event.data != "[DONE]" and any(
        c.get("delta", {}).get("content") for c in event.json().get("choices", [])
    )


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/messages"])
async def test_node_killed_mid_stream_is_an_error_event_and_the_next_request_reroutes(
    path: str,
) -> None:
    b = ScriptedNeuron("b")
    async with (
        neuron_process("a", "--block-after", "2") as a,  # "Hello", then hangs until killed
        serving(make_neuron_app(b)) as b_url,
        gateway({"a": a.url, "b": b_url}) as (url, fleet),
        aiohttp.ClientSession() as http,
    ):
        decoder = SSEDecoder()
        async with http.post(url + path, json=BODIES[path]) as response:
            assert response.status == 200
            before: list[SSEEvent] = []
            while not any(saw_text(path, e) for e in before):
                before += decoder.feed(await response.content.readany())
            a.kill()
            events = before + await read_all(response, decoder)

        assert not fleet.nodes["a"].up  # the broken stream was evidence enough
        if path == "/v1/messages":
            assert names(events) == [
                "message_start",
                "ping",
                "content_block_start",
                "content_block_delta",
                "content_block_stop",  # closed before the error, not left open
                "error",
            ]
            error = events[-1].json()
            assert error["type"] == "error" and error["error"]["type"] == "api_error"
            assert "interrupted" in error["error"]["message"]
        else:
            error = events[-1].json()["error"]
            assert error["code"] == "stream_interrupted" and error["type"] == "upstream_error"
            assert all(e.data != "[DONE]" for e in events)

        again = await fetch("POST", url + path, json_body={**BODIES[path], "stream": False})
        assert again.status == 200, again.body
        assert len(b.requests) == 1  # the next request went to b, not to the dead node


# -- a node gone before the first byte ---------------------------------------------------------


@pytest.mark.parametrize("stream", [True, False])
async def test_a_node_gone_before_the_first_byte_is_marked_down_and_rerouted(
    stream: bool,
) -> None:
    a, b = ScriptedNeuron("a"), ScriptedNeuron("b")
    a_runner, a_url = await start_server(make_neuron_app(a), "127.0.0.1", 0)
    try:
        async with (
            serving(make_neuron_app(b)) as b_url,
            gateway({"a": a_url, "b": b_url}) as (
                url,
                fleet,
            ),
        ):
            await a_runner.cleanup()  # a dies after the fleet's last look: still "up" to it
            assert fleet.nodes["a"].up
            body = {**BODIES["/v1/chat/completions"], "stream": stream}
            response = await fetch("POST", url + "/v1/chat/completions", json_body=body)
            assert response.status == 200, response.body
            assert not fleet.nodes["a"].up and "unreachable" in (fleet.nodes["a"].error or "")
            assert len(b.requests) == 1 and a.requests == []
    finally:
        await a_runner.cleanup()


# -- upstream truncation ----------------------------------------------------------------------


def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    choice = {"index": 0, "delta": delta, "finish_reason": finish}
    return {"id": "c1", "object": "chat.completion.chunk", "created": 0, "choices": [choice]}


def raw_chat(dropped: bool, done: bool = False) -> Handler:
    """A chat route that sends two text chunks, and [DONE] only when ``done``: ending the
    response completely (``dropped=False``) or cutting the connection (``dropped=True``)."""

    async def chat(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(sse(chunk({"role": "assistant", "content": ""})))
        await response.write(sse(chunk({"content": "Hel"})))
        await response.write(sse(chunk({"content": "lo"})))
        if done:
            await response.write(b"data: [DONE]\n\n")
        if dropped:
            assert request.transport is not None
            request.transport.close()  # the chunked body never ends: a node that died
        else:
            await response.write_eof()
        return response

    return chat


@asynccontextmanager
async def raw_gateway(dropped: bool, done: bool = False) -> AsyncIterator[tuple[str, Fleet]]:
    app = neuron_app_with_chat(ScriptedNeuron("a"), raw_chat(dropped, done))
    async with serving(app) as a_url, gateway({"a": a_url}) as gw:
        yield gw


async def stream(url: str, path: str) -> list[SSEEvent]:
    response = await fetch("POST", url + path, json_body=BODIES[path])
    assert response.status == 200, response.body
    decoder = SSEDecoder()
    return decoder.feed(response.body) + decoder.end()


Check = Callable[[list[SSEEvent]], None]


# The Anthropic events of the two-chunk answer, up to its text block's end.
ANSWERED = [
    "message_start",
    "ping",
    "content_block_start",
    "content_block_delta",
    "content_block_delta",
    "content_block_stop",
]


def anthropic_closed(events: list[SSEEvent]) -> None:
    assert names(events) == [*ANSWERED, "message_delta", "message_stop"]


def openai_done(events: list[SSEEvent]) -> None:
    assert events[-1].data == "[DONE]"
    text = "".join(
        c["delta"].get("content") or "" for e in events[:-1] for c in e.json()["choices"]
    )
    assert text == "Hello"


def responses_completed(events: list[SSEEvent]) -> None:
    assert events[-1].event == "response.completed"
    assert events[-1].json()["response"]["output"][0]["content"][0]["text"] == "Hello"


@pytest.mark.parametrize(
    ("path", "check"),
    [
        ("/v1/messages", anthropic_closed),
        ("/v1/chat/completions", openai_done),
        ("/v1/responses", responses_completed),
    ],
)
async def test_complete_upstream_without_done_ends_the_stream_normally(
    path: str, check: Check
) -> None:
    async with raw_gateway(dropped=False) as (url, fleet):
        check(await stream(url, path))
        assert fleet.nodes["a"].up  # a short answer is no sign of a dead node


async def test_a_connection_lost_after_done_is_a_whole_answer() -> None:
    async with raw_gateway(dropped=True, done=True) as (url, fleet):
        anthropic_closed(await stream(url, "/v1/messages"))
        openai_done(await stream(url, "/v1/chat/completions"))
        assert fleet.nodes["a"].up  # the answer was whole: no sign of a dead node


async def test_dropped_upstream_is_an_error_after_closing_the_open_block() -> None:
    async with raw_gateway(dropped=True) as (url, fleet):
        events = await stream(url, "/v1/messages")
        assert names(events) == [*ANSWERED, "error"]
        assert events[-1].json()["error"]["type"] == "api_error"
        assert not fleet.nodes["a"].up


async def test_dropped_upstream_is_an_openai_error_frame() -> None:
    async with raw_gateway(dropped=True) as (url, _):
        events = await stream(url, "/v1/chat/completions")
        assert events[-1].json()["error"]["code"] == "stream_interrupted"
        assert all(e.data != "[DONE]" for e in events)


async def test_dropped_upstream_fails_the_responses_stream() -> None:
    async with raw_gateway(dropped=True) as (url, _):
        events = await stream(url, "/v1/responses")
        assert names(events)[-2:] == ["error", "response.failed"]


# -- no node to serve at all -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", {"model": "demo", "messages": USER}),
        ("/v1/messages", {"model": "demo", "max_tokens": 8, "messages": USER}),
    ],
)
async def test_with_no_nodes_the_refusal_says_so(path: str, body: dict[str, Any]) -> None:
    """A catalogue model and nothing to run it on: not "no room even after eviction"."""
    fleet = Fleet([], Catalogue([ModelProfile(id="demo")]))
    async with serving(make_app(fleet, gateway_settings())) as url:
        response = await fetch("POST", url + path, json_body=body)
    assert response.status == 503
    assert "the gateway has no nodes" in response.json()["error"]["message"]


async def test_with_every_node_down_the_refusal_says_so_and_why() -> None:
    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    node = RemoteNeuron("gone", f"http://127.0.0.1:{port}", poll_timeout_s=2)
    fleet = Fleet([node], Catalogue([ModelProfile(id="demo")]))
    await fleet.refresh()
    try:
        async with serving(make_app(fleet, gateway_settings())) as url:
            body = {"model": "demo", "messages": USER}
            response = await fetch("POST", f"{url}/v1/chat/completions", json_body=body)
            unknown = await fetch(
                "POST", f"{url}/v1/chat/completions", json_body={**body, "model": "nope"}
            )
    finally:
        await fleet.close()
    assert response.status == 503
    message = response.json()["error"]["message"]
    assert "every node is down (gone: neuron 'gone' is unreachable" in message
    assert unknown.status == 404
    assert "every node is down" in unknown.json()["error"]["message"]
