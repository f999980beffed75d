"""The neuron HTTP API (server.py) and its client (remote.py), over real loopback HTTP.

The scripted neuron is served by ``make_neuron_app`` and reached through ``RemoteNeuron``,
so each test checks both halves: what the client reports must be what the neuron did.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from helexa.config import Settings
from helexa.neuron.interface import LoadRequest, Neuron, NeuronError
from helexa.neuron.remote import RemoteNeuron
from helexa.neuron.server import is_loopback, make_neuron_app, node_name, run_neuron
from helexa.wire.sse import SSEDecoder, sse
from tests.support.scripted_neuron import Reply, ScriptedNeuron, ToolCallScript, word_count
from tests.support.servers import fetch, serving

MODEL = "test-model"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "say hello to me"}]}


@pytest.fixture
def neuron() -> ScriptedNeuron:
    return ScriptedNeuron("node-a", models={MODEL: "loaded", "cold": "unloaded"})


@pytest.fixture
async def url(neuron: ScriptedNeuron) -> AsyncIterator[str]:
    async with serving(make_neuron_app(neuron)) as base:
        yield base


@pytest.fixture
async def remote(url: str) -> AsyncIterator[RemoteNeuron]:
    client = RemoteNeuron("node-a", url)
    yield client
    await client.close()


async def collect(stream: AsyncIterator[dict]) -> list[dict]:
    return [chunk async for chunk in stream]


def test_remote_neuron_implements_the_protocol() -> None:
    assert isinstance(RemoteNeuron("x", "http://127.0.0.1:1"), Neuron)


async def test_node_facts_round_trip(remote: RemoteNeuron, neuron: ScriptedNeuron) -> None:
    assert await remote.discovery() == await neuron.discovery()
    assert await remote.health() == await neuron.health()
    assert await remote.models() == await neuron.models()


async def test_load_and_unload(remote: RemoteNeuron, neuron: ScriptedNeuron) -> None:
    state = await remote.load(LoadRequest(model_id="cold", devices=[0]))
    assert state.id == "cold" and state.status == "loaded"
    assert neuron.loads == [LoadRequest(model_id="cold", devices=[0])]
    await remote.unload("cold")
    assert neuron.unloads == ["cold"]
    assert {m.id: m.status for m in await remote.models()}["cold"] == "unloaded"


async def test_load_errors_keep_status_code_and_structured_fields(
    remote: RemoteNeuron, neuron: ScriptedNeuron
) -> None:
    neuron.load_errors["cold"] = NeuronError(
        "needs 9000 MB, 4000 MB free",
        status=507,
        type="preflight",
        code="insufficient_vram",
        extra={"needed_mb": 9000, "free_mb": 4000},
    )
    with pytest.raises(NeuronError) as info:
        await remote.load(LoadRequest(model_id="cold"))
    err = info.value
    assert (err.status, err.type, err.code) == (507, "preflight", "insufficient_vram")
    assert err.extra == {"needed_mb": 9000, "free_mb": 4000}
    assert err.message == "needs 9000 MB, 4000 MB free"

    with pytest.raises(NeuronError) as missing:
        await remote.load(LoadRequest(model_id="nowhere"))
    assert (missing.value.status, missing.value.code) == (404, "model_not_available")


async def test_chat_stream_relays_every_chunk(remote: RemoteNeuron, neuron: ScriptedNeuron) -> None:
    neuron.script = Reply(
        reasoning=["think"],
        text=["Hel", "lo"],
        tool_calls=[ToolCallScript("call_1", "f", ['{"a":', "1}"])],
    )
    chunks = await collect(remote.chat(CHAT))
    assert chunks == neuron.script.chat_chunks(MODEL, "chatcmpl-node-a-1")
    assert neuron.requests[0]["messages"] == CHAT["messages"]


async def test_completion_stream(remote: RemoteNeuron, neuron: ScriptedNeuron) -> None:
    neuron.script = Reply(text=["a", "b"], finish_reason="length")
    chunks = await collect(remote.complete({"model": MODEL, "prompt": "x"}))
    assert chunks == neuron.script.completion_chunks(MODEL, "chatcmpl-node-a-1")


async def test_error_before_first_chunk_is_the_neurons_error(remote: RemoteNeuron) -> None:
    with pytest.raises(NeuronError) as info:
        await collect(remote.chat({**CHAT, "model": "cold"}))
    assert (info.value.status, info.value.code) == (409, "model_not_loaded")


async def test_error_mid_stream_arrives_after_the_chunks_before_it(
    remote: RemoteNeuron, neuron: ScriptedNeuron
) -> None:
    neuron.script = Reply(text=["a", "b", "c"], fail_after=2)
    seen: list[dict] = []
    with pytest.raises(NeuronError) as info:
        async for chunk in remote.chat(CHAT):
            seen.append(chunk)
    assert len(seen) == 2
    assert (info.value.code, info.value.message) == ("generation_failed", "scripted failure")


async def test_closing_the_stream_cancels_generation(
    remote: RemoteNeuron, neuron: ScriptedNeuron
) -> None:
    neuron.script = Reply(text=["a", "b", "c"], block_after=2)
    stream = remote.chat(CHAT)
    await anext(stream)
    await anext(stream)
    assert not neuron.cancelled.is_set()
    await stream.aclose()
    await asyncio.wait_for(neuron.cancelled.wait(), timeout=5)


async def test_complete_stream_without_done_ends_normally() -> None:
    """A whole HTTP response that lacks [DONE] is still the whole answer (issue 2)."""

    async def truncated(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(sse({"id": "x", "choices": []}))
        await response.write_eof()  # no [DONE], but the response is complete
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", truncated)
    async with serving(app) as base:
        client = RemoteNeuron("cut", base)
        seen = await collect(client.chat(CHAT))
        await client.close()
    assert seen == [{"id": "x", "choices": []}]


async def test_connection_dropped_mid_stream_is_interrupted() -> None:
    async def dropped(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(sse({"id": "x", "choices": []}))
        assert request.transport is not None
        request.transport.close()  # chunked body never terminated: a node that died
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", dropped)
    async with serving(app) as base:
        client = RemoteNeuron("cut", base)
        seen: list[dict] = []
        with pytest.raises(NeuronError) as info:
            async for chunk in client.chat(CHAT):
                seen.append(chunk)
        await client.close()
    assert seen == [{"id": "x", "choices": []}]
    err = info.value
    assert (err.status, err.type, err.code) == (502, "upstream_error", "stream_interrupted")


async def test_undecodable_event_is_malformed_not_a_dead_node() -> None:
    async def garbage(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(sse("not json"))
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", garbage)
    async with serving(app) as base:
        client = RemoteNeuron("odd", base)
        with pytest.raises(NeuronError) as info:
            await collect(client.chat(CHAT))
        await client.close()
    assert (info.value.status, info.value.code) == (502, "stream_malformed")


async def test_unreachable_neuron_is_a_502() -> None:
    async with serving(web.Application()) as base:
        pass  # the port is closed again now
    client = RemoteNeuron("gone", base)
    for call in (client.health(), collect(client.chat(CHAT))):
        with pytest.raises(NeuronError) as info:
            await call
        assert (info.value.status, info.value.code) == (502, "neuron_unreachable")
    await client.close()


async def test_count_tokens_uses_the_neuron(remote: RemoteNeuron, neuron: ScriptedNeuron) -> None:
    assert await remote.count_tokens(CHAT) == word_count(CHAT)
    assert neuron.count_requests == [CHAT]


# -- raw HTTP ------------------------------------------------------------------------------


async def test_non_streaming_chat_is_one_completion(url: str, neuron: ScriptedNeuron) -> None:
    neuron.script = Reply(text=["Hel", "lo"], reasoning=["hm"])
    response = await fetch("POST", f"{url}/v1/chat/completions", json_body=CHAT)
    assert response.status == 200
    body = response.json()
    message = body["choices"][0]["message"]
    assert (message["content"], message["reasoning_content"]) == ("Hello", "hm")
    assert body["usage"] == neuron.script.usage()


async def test_streaming_chat_is_sse_ending_in_done(url: str, neuron: ScriptedNeuron) -> None:
    response = await fetch("POST", f"{url}/v1/chat/completions", json_body={**CHAT, "stream": True})
    assert response.headers["Content-Type"].startswith("text/event-stream")
    events = SSEDecoder().feed(response.body)
    assert events[-1].data == "[DONE]"
    chunks = [e.json() for e in events[:-1]]
    assert chunks == neuron.script.chat_chunks(MODEL, "chatcmpl-node-a-1")


@pytest.mark.parametrize(
    ("path", "payload", "needle"),
    [
        ("/models/load", b"{not json", "not valid JSON"),
        ("/models/load", b"{}", "model_id"),
        ("/v1/chat/completions", b'{"model": "m", "messages": []}', "messages"),
        ("/tokenize", b"[1, 2]", "JSON object"),
        pytest.param("/v1/chat/completions", b"[" * 100_000, "nests deeper", id="unclosed"),
        pytest.param("/v1/completions", b"[" * 200 + b"]" * 200, "nests deeper", id="closed"),
        ("/models/load", b'{"model_id": "m\\udfff"}', "lone surrogate"),
    ],
)
async def test_bad_input_is_a_400_in_the_error_shape(
    url: str, path: str, payload: bytes, needle: str
) -> None:
    response = await fetch("POST", url + path, data=payload)
    assert response.status == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert needle in error["message"]


async def test_unknown_route_is_a_json_404(url: str) -> None:
    response = await fetch("GET", f"{url}/nope")
    assert response.status == 404
    assert "message" in response.json()["error"]


# -- token auth ----------------------------------------------------------------------------


async def test_token_is_required_when_set(neuron: ScriptedNeuron) -> None:
    async with serving(make_neuron_app(neuron, token="s3cret")) as base:
        response = await fetch("GET", f"{base}/models")
        assert response.status == 401
        assert response.headers["WWW-Authenticate"] == "Bearer"
        assert response.json()["error"]["type"] == "authentication_error"
        for token in (None, "wrong", "s3cret-but-longer"):
            client = RemoteNeuron("a", base, token)
            with pytest.raises(NeuronError) as info:
                await client.models()
            assert info.value.status == 401
            with pytest.raises(NeuronError):
                await collect(client.chat(CHAT))
            await client.close()
        client = RemoteNeuron("a", base, "s3cret")
        assert [m.id for m in await client.models()] == [MODEL, "cold"]
        assert len(await collect(client.chat(CHAT))) == len(neuron.script.chat_chunks(MODEL, ""))
        await client.close()


# -- `helexa neuron` ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("::1", True), ("localhost", True), ("0.0.0.0", False), ("", False)]
    + [("10.0.0.5", False), ("gpu-box.internal", False)],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_run_neuron_refuses_an_open_port_without_a_token(
    capsys: pytest.CaptureFixture[str],
) -> None:
    settings = Settings.model_validate({"neuron": {"listen": "0.0.0.0:0"}})
    assert run_neuron(settings) == 2
    err = capsys.readouterr().err
    assert "0.0.0.0:0" in err and "token" in err


def test_sse_payloads_are_json(neuron: ScriptedNeuron) -> None:
    """The frames the server writes decode back to the same chunk (framing sanity)."""
    chunk = neuron.script.chat_chunks(MODEL, "id")[1]
    [event] = SSEDecoder().feed(sse(chunk))
    assert json.loads(event.data) == chunk


def test_neuron_names_itself_after_its_host_unless_told() -> None:
    """A remote node called 'local' in the gateway's logs and errors says nothing."""
    assert node_name(Settings()) == socket.gethostname()
    assert node_name(Settings.model_validate({"local": {"name": "gpu-box"}})) == "gpu-box"
    assert node_name(Settings.model_validate({"local": {"name": "local"}})) == "local"
