"""What the gateway refuses before a route runs, read as raw bytes on a loopback socket.

Requests aiohttp itself cannot read (a line over its limit, not HTTP at all) and refusals
made before or around routing (unknown paths, methods, ``Expect``, keys, browsers) must
come back as JSON in the caller's dialect, never as aiohttp's text/plain pages, and must
not log a traceback per request: anyone can send them, no key needed.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from helexa.config import GatewaySettings, ModelProfile
from helexa.cortex.app import body_limit
from helexa.cortex.catalogue import Catalogue
from helexa.cortex.fleet import Fleet
from helexa.neuron.interface import ModelState
from tests.conftest import MODEL
from tests.support.scripted_neuron import ScriptedNeuron
from tests.support.servers import Gateway, fetch, gateway_over, gateway_settings, serving

ANTHROPIC = {"anthropic-version": "2023-06-01"}


async def exchange(url: str, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send raw ``request`` bytes and read one answer: status, headers, body (by its
    Content-Length: the server may keep the connection open, waiting for a body)."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    async with asyncio.timeout(10):
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            writer.write(request)
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
            status_line, *lines = head.decode("latin-1").strip().split("\r\n")
            headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines)}
            body = await reader.readexactly(int(headers["content-length"]))
        finally:
            writer.close()
    return int(status_line.split()[1]), headers, body


def openai_shape(body: bytes) -> dict[str, Any]:
    payload = json.loads(body)
    assert set(payload) == {"error"}
    return dict(payload["error"])


def anthropic_shape(body: bytes) -> dict[str, Any]:
    payload = json.loads(body)
    assert payload["type"] == "error"
    return dict(payload["error"])


def no_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    loud = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not loud, [r.getMessage() for r in loud]


# -- requests aiohttp cannot read ----------------------------------------------------------


async def test_a_request_line_over_the_limit_is_a_json_414_in_the_paths_dialect(
    gateway: Gateway, caplog: pytest.LogCaptureFixture
) -> None:
    line = b"POST /v1/messages?pad=" + b"a" * 70_000 + b" HTTP/1.1\r\nHost: localhost\r\n\r\n"
    for _ in range(3):  # per request: no traceback each time
        status, headers, body = await exchange(gateway.url, line)
        assert status == 414
        assert headers["content-type"].startswith("application/json")
        assert "request line" in anthropic_shape(body)["message"]
    no_tracebacks(caplog)


async def test_a_header_over_the_limit_is_a_json_431(
    gateway: Gateway, caplog: pytest.LogCaptureFixture
) -> None:
    request = b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\nX-Pad: " + b"a" * 70_000 + b"\r\n\r\n"
    status, headers, body = await exchange(gateway.url, request)
    assert status == 431
    assert headers["content-type"].startswith("application/json")
    assert openai_shape(body)["code"] == "header_too_large"
    no_tracebacks(caplog)


async def test_lines_past_aiohttps_default_limit_are_served(gateway: Gateway) -> None:
    """A 20 kB query string and a 12 kB bearer token are well within what clients send."""
    request = (
        b"GET /v1/models?pad=" + b"a" * 20_000 + b" HTTP/1.1\r\nHost: localhost\r\n"
        b"Authorization: Bearer " + b"k" * 12_000 + b"\r\nConnection: close\r\n\r\n"
    )
    status, _, body = await exchange(gateway.url, request)
    assert status == 200
    assert MODEL in {m["id"] for m in json.loads(body)["data"]}


async def test_what_is_not_http_is_a_json_400(
    gateway: Gateway, caplog: pytest.LogCaptureFixture
) -> None:
    status, _, body = await exchange(gateway.url, b"BLAH / HTTP/1.1\r\n\r\n")
    assert status == 400
    assert "not valid HTTP" in openai_shape(body)["message"]
    no_tracebacks(caplog)


async def test_the_neuron_api_answers_unreadable_requests_in_its_own_json(
    scripted: ScriptedNeuron,
) -> None:
    from helexa.neuron.server import make_neuron_app

    async with serving(make_neuron_app(scripted)) as url:
        line = b"GET /health?" + b"a" * 70_000 + b" HTTP/1.1\r\nHost: localhost\r\n\r\n"
        status, _, body = await exchange(url, line)
    assert status == 414
    assert json.loads(body)["error"]["code"] == "uri_too_long"


# -- refusals around routing, for an Anthropic client -----------------------------------------


@pytest.fixture
async def keyed(scripted: ScriptedNeuron) -> AsyncIterator[Gateway]:
    async with gateway_over(scripted, gateway_settings(api_keys=["key"])) as gw:
        yield gw


@pytest.mark.parametrize(
    ("method", "path", "headers", "status"),
    [
        ("GET", "/v1/messages/batches", {}, 404),  # an Anthropic path we do not serve
        ("POST", "/v1/complete", {}, 404),  # Anthropic's legacy route
        ("GET", "/v1/nothing", {}, 404),
        ("DELETE", "/v1/messages", {}, 405),
        ("OPTIONS", "/v1/messages", {}, 405),  # not a preflight: no such method
        ("POST", "/v1/messages", {"Expect": "something-else"}, 417),
        ("POST", "/v1/messages", {"Host": "rebound.example"}, 403),  # the browser guard
        ("POST", "/v1/complete", {"x-api-key": "wrong"}, 401),  # authentication
    ],
)
async def test_an_anthropic_client_is_refused_in_anthropic_shape(
    keyed: Gateway, method: str, path: str, headers: dict[str, str], status: int
) -> None:
    headers = {"x-api-key": "key", **ANTHROPIC, **headers}
    response = await fetch(method, keyed.url + path, headers=headers, data=b"{}")
    assert response.status == status
    assert response.headers["Content-Type"].startswith("application/json")
    anthropic_shape(response.body)


async def test_an_openai_client_is_still_refused_in_openai_shape(keyed: Gateway) -> None:
    for path in ("/v1/nothing", "/v1/complete"):
        response = await fetch("POST", keyed.url + path, headers={"x-api-key": "key"})
        assert response.status == 404
        openai_shape(response.body)
    response = await fetch(
        "POST", keyed.url + "/v1/chat/completions", headers={"Expect": "x", **ANTHROPIC}
    )
    assert response.status == 417
    openai_shape(response.body)  # an OpenAI route answers in OpenAI's shape whoever asks


# -- bodies bounded by the context served ------------------------------------------------------


@asynccontextmanager
async def gateway_with_context(
    scripted: ScriptedNeuron, context_length: int, **gateway: object
) -> AsyncIterator[Gateway]:
    """A gateway whose catalogue serves ``MODEL`` with ``context_length`` tokens."""
    catalogue = Catalogue([ModelProfile(id=MODEL, context_length=context_length)])
    async with gateway_over(
        scripted,
        gateway_settings(**gateway),
        make_fleet=lambda nodes: Fleet(nodes, catalogue),
    ) as gw:
        yield gw


def chat_body(size: int) -> bytes:
    """A chat request body of about ``size`` bytes."""
    return json.dumps(
        {"model": MODEL, "messages": [{"role": "user", "content": "word " * (size // 5)}]}
    ).encode()


async def chunked(body: bytes) -> AsyncIterator[bytes]:
    """``body`` sent without a length (chunked), so only reading it can find its size."""
    for start in range(0, len(body), 65_536):
        yield body[start : start + 65_536]


async def test_a_body_past_what_the_context_can_use_is_a_413_in_dialect(
    scripted: ScriptedNeuron,
) -> None:
    """4k tokens of context: 1 MiB (the floor) is the limit, declared or chunked."""
    async with gateway_with_context(scripted, 4096) as gw:
        fits = await fetch("POST", f"{gw.url}/v1/chat/completions", data=chat_body(900_000))
        assert fits.status == 200
        too_big = chat_body(2 * 1024 * 1024)
        declared = await fetch("POST", f"{gw.url}/v1/chat/completions", data=too_big)
        assert declared.status == 413
        assert openai_shape(declared.body)["code"] == "request_too_large"
        assert "1 MiB" in openai_shape(declared.body)["message"]
        body = {**json.loads(too_big), "max_tokens": 8}
        streamed = await fetch(
            "POST", f"{gw.url}/v1/messages", data=chunked(json.dumps(body).encode())
        )
        assert streamed.status == 413
        assert anthropic_shape(streamed.body)["type"] == "request_too_large"
    assert len(scripted.requests) == 1  # only the one that fit reached the node


async def test_max_body_mb_sets_the_limit(scripted: ScriptedNeuron) -> None:
    async with gateway_with_context(scripted, 4096, max_body_mb=0.25) as gw:
        response = await fetch("POST", f"{gw.url}/v1/chat/completions", data=chat_body(300_000))
        assert response.status == 413
        assert "0.25 MiB" in openai_shape(response.body)["message"]


def test_the_limit_follows_the_longest_context_served() -> None:
    """A loaded copy's context counts as well as the catalogue's; unknown, 128k is assumed."""
    gateway = GatewaySettings()
    node = ScriptedNeuron("n")
    fleet = Fleet([node], Catalogue([ModelProfile(id="small", context_length=8192)]))
    assert body_limit(fleet, gateway) == 1024 * 1024
    fleet.nodes["n"].models["big"] = ModelState(id="big", status="loaded", context_length=262_144)
    assert body_limit(fleet, gateway) == 262_144 * 64  # 16 MiB
    assert body_limit(Fleet([node]), gateway) == 131_072 * 64  # 8 MiB


async def test_a_body_declared_too_large_is_refused_before_it_is_uploaded(
    scripted: ScriptedNeuron,
) -> None:
    """``Expect: 100-continue`` (curl sends it for large bodies): the 413 comes instead of
    the 100, so the client never uploads what would be refused."""
    async with gateway_with_context(scripted, 4096) as gw:
        head = (
            b"POST /v1/messages HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            b"Expect: 100-continue\r\nContent-Length: 5000000\r\nConnection: close\r\n\r\n"
        )
        status, _, body = await exchange(gw.url, head)  # no body follows
    assert status == 413
    assert anthropic_shape(body)["type"] == "request_too_large"
