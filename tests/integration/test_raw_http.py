"""The gateway at the byte level: error bodies per dialect, auth, admin routes, streaming
without buffering, per-request hooks, and the Service lifecycle."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from helexa.cortex.auth import KeyPolicy, matches, presented_key
from helexa.cortex.fleet import Lease
from helexa.cortex.observe import RequestObserver
from helexa.cortex.service import Service
from helexa.errors import ApiError
from helexa.neuron.server import make_neuron_app
from helexa.wire.sse import SSEDecoder
from tests.conftest import COLD_MODEL, MODEL
from tests.support.scripted_neuron import Reply, ScriptedNeuron
from tests.support.servers import (
    Fetched,
    Gateway,
    fetch,
    gateway_over,
    gateway_settings,
    headless_gateway,
    serving,
)
from tests.support.streams import read_events

USER = [{"role": "user", "content": "hi"}]
CHAT = {"model": MODEL, "messages": USER}
MESSAGES = {"model": MODEL, "max_tokens": 8, "messages": USER}
RESPONSES = {"model": MODEL, "input": "hi"}


def openai_error(body: dict[str, Any]) -> dict[str, Any]:
    assert set(body) == {"error"}
    assert {"message", "type", "code", "param"} <= set(body["error"])
    return body["error"]


def anthropic_error(body: dict[str, Any]) -> dict[str, Any]:
    assert body["type"] == "error"
    assert {"type", "message"} <= set(body["error"])
    return body["error"]


def refusal(response: Fetched, status: int, read: Any) -> dict[str, Any]:
    """The error of a refusal, once its status and its dialect's shape are checked."""
    assert response.status == status, response.body
    return read(response.json())


# -- error bodies in the route's dialect --------------------------------------------------


@pytest.mark.parametrize(
    ("path", "read"),
    [
        ("/v1/chat/completions", openai_error),
        ("/v1/completions", openai_error),
        ("/v1/responses", openai_error),
        ("/v1/messages", anthropic_error),
        ("/v1/messages/count_tokens", anthropic_error),
    ],
)
async def test_invalid_json_is_400_in_dialect(gateway: Gateway, path: str, read: Any) -> None:
    response = await fetch("POST", gateway.url + path, data=b'{"model": "x", ')
    error = refusal(response, 400, read)
    assert error["type"] == "invalid_request_error"
    assert "not valid JSON" in error["message"]


POST_ROUTES = [
    ("/v1/chat/completions", openai_error),
    ("/v1/completions", openai_error),
    ("/v1/responses", openai_error),
    ("/v1/messages", anthropic_error),
    ("/v1/messages/count_tokens", anthropic_error),
    ("/admin/models/load", openai_error),
]


@pytest.mark.parametrize(("path", "read"), POST_ROUTES)
@pytest.mark.parametrize(
    "payload", [b"[" * 100_000, b"[" * 500 + b"]" * 500], ids=["unclosed", "closed"]
)
async def test_deep_nesting_is_400_in_dialect(
    gateway: Gateway, path: str, read: Any, payload: bytes
) -> None:
    response = await fetch("POST", gateway.url + path, data=payload)
    error = refusal(response, 400, read)
    assert error["type"] == "invalid_request_error"
    assert "nests deeper than" in error["message"]


@pytest.mark.parametrize(
    ("path", "read", "body"),
    [
        ("/v1/chat/completions", openai_error, CHAT),
        ("/v1/messages", anthropic_error, MESSAGES),
        ("/v1/messages/count_tokens", anthropic_error, {"model": MODEL, "messages": USER}),
    ],
)
async def test_lone_surrogate_is_400_before_any_node_sees_it(
    gateway: Gateway, scripted: ScriptedNeuron, path: str, read: Any, body: dict[str, Any]
) -> None:
    raw = json.dumps({**body, "messages": [{"role": "user", "content": "hi \ud800"}]})
    assert "\\ud800" in raw  # json.dumps escapes it: the bytes are valid UTF-8
    response = await fetch("POST", gateway.url + path, data=raw.encode())
    error = refusal(response, 400, read)
    assert "messages.0.content: contains a lone surrogate (\\ud800)" in error["message"]
    if read is openai_error:
        assert error["param"] == "messages.0.content"
    assert scripted.requests == [] and scripted.count_requests == []


async def test_surrogate_pairs_reach_the_node_as_one_character(
    gateway: Gateway, scripted: ScriptedNeuron
) -> None:
    raw = json.dumps({**CHAT, "messages": [{"role": "user", "content": "smile \U0001f600"}]})
    assert "\\ud83d\\ude00" in raw
    response = await fetch("POST", f"{gateway.url}/v1/chat/completions", data=raw.encode())
    assert response.status == 200
    assert scripted.requests[0]["messages"][0]["content"] == "smile \U0001f600"


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/chat/completions", {**CHAT, "seed": 2**64}, "seed"),
        ("/v1/completions", {"model": MODEL, "prompt": "p", "seed": 2**64}, "seed"),
        (
            "/v1/chat/completions",
            {**CHAT, "response_format": {"type": "json_schema", "json_schema": "{}"}},
            "response_format.json_schema",
        ),
        ("/v1/responses", {**RESPONSES, "text": {"format": "json"}}, "text.format"),
        ("/v1/chat/completions", {**CHAT, "min_p": 10**400}, "min_p"),
    ],
)
async def test_values_the_engine_cannot_take_are_400_naming_the_param(
    gateway: Gateway, scripted: ScriptedNeuron, path: str, body: dict[str, Any], param: str
) -> None:
    response = await fetch("POST", gateway.url + path, json_body=body)
    assert response.status == 400
    error = openai_error(response.json())
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param and error["message"].startswith(f"{param}: ")
    assert scripted.requests == []


COMPLETION = {"model": MODEL, "prompt": "def add(a, b):"}


@pytest.mark.parametrize("prompt", [[100, 200, 300], [[100, 200, 300]]])
async def test_token_id_prompts_reach_the_node_unchanged(
    gateway: Gateway, scripted: ScriptedNeuron, prompt: Any
) -> None:
    body = {**COMPLETION, "prompt": prompt}
    response = await fetch("POST", f"{gateway.url}/v1/completions", json_body=body)
    assert response.status == 200
    assert response.json()["choices"][0]["text"] == "Hello world"
    assert scripted.requests[0]["prompt"] == prompt


@pytest.mark.parametrize("prompt", [["one", "two"], [[1, 2], [3]]])
async def test_several_prompts_are_400(
    gateway: Gateway, scripted: ScriptedNeuron, prompt: Any
) -> None:
    response = await fetch(
        "POST", f"{gateway.url}/v1/completions", json_body={**COMPLETION, "prompt": prompt}
    )
    error = refusal(response, 400, openai_error)
    assert (error["param"], error["code"]) == ("prompt", "unsupported_parameter")
    assert "only one prompt per request" in error["message"]
    assert scripted.requests == []


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({**COMPLETION, "echo": True}, "echo"),
        ({**COMPLETION, "suffix": "    return a + b"}, "suffix"),
        ({**COMPLETION, "best_of": 2}, "best_of"),
        ({**COMPLETION, "logit_bias": {"50256": -100}}, "logit_bias"),
    ],
)
async def test_completion_params_helexa_cannot_honour_are_400_not_ignored(
    gateway: Gateway, scripted: ScriptedNeuron, body: dict[str, Any], param: str
) -> None:
    response = await fetch("POST", f"{gateway.url}/v1/completions", json_body=body)
    assert response.status == 400
    error = openai_error(response.json())
    assert (error["param"], error["code"]) == (param, "unsupported_parameter")
    assert scripted.requests == []


async def test_their_no_op_values_are_served(gateway: Gateway, scripted: ScriptedNeuron) -> None:
    body = {**COMPLETION, "echo": False, "suffix": "", "best_of": 1, "logit_bias": {}}
    response = await fetch("POST", f"{gateway.url}/v1/completions", json_body=body)
    assert response.status == 200
    assert scripted.requests[0]["best_of"] == 1


@pytest.mark.parametrize(
    ("path", "body", "read", "needle"),
    [
        ("/v1/chat/completions", {**CHAT, "tool_choice": "required"}, openai_error, "'required'"),
        ("/v1/responses", {**RESPONSES, "tool_choice": "required"}, openai_error, "'required'"),
        ("/v1/messages", {**MESSAGES, "tool_choice": {"type": "any"}}, anthropic_error, "'any'"),
    ],
)
async def test_tool_choice_forcing_a_call_without_tools_is_400(
    gateway: Gateway, scripted: ScriptedNeuron, path: str, body: Any, read: Any, needle: str
) -> None:
    response = await fetch("POST", gateway.url + path, json_body=body)
    error = refusal(response, 400, read)
    assert (
        error["message"] == f"tool_choice: {needle} needs tools to call, and the request has none"
    )
    assert scripted.requests == []


@pytest.mark.parametrize(
    ("path", "body", "read"),
    [
        ("/v1/chat/completions", [1, 2], openai_error),
        ("/v1/messages", {"model": MODEL, "messages": USER}, anthropic_error),
        ("/v1/responses", {"model": MODEL}, openai_error),
    ],
)
async def test_schema_errors_name_the_field(
    gateway: Gateway, path: str, body: Any, read: Any
) -> None:
    response = await fetch("POST", gateway.url + path, json_body=body)
    message = refusal(response, 400, read)["message"]
    assert message  # one readable line, e.g. "max_tokens: Field required"
    if isinstance(body, dict):
        missing = {"/v1/messages": "max_tokens", "/v1/responses": "input"}[path]
        assert missing in message


@pytest.mark.parametrize(
    ("path", "body", "read"),
    [
        ("/v1/chat/completions", {**CHAT, "model": "nope"}, openai_error),
        ("/v1/messages", {**MESSAGES, "model": "nope"}, anthropic_error),
        ("/v1/responses", {**RESPONSES, "model": "nope"}, openai_error),
    ],
)
async def test_unknown_model_is_404_in_dialect(
    gateway: Gateway, path: str, body: Any, read: Any
) -> None:
    response = await fetch("POST", gateway.url + path, json_body=body)
    error = refusal(response, 404, read)
    assert "'nope'" in error["message"]
    if read is anthropic_error:
        assert error["type"] == "not_found_error"  # Anthropic's type for a 404
    else:  # OpenAI's answer to an unknown model
        assert (error["type"], error["code"]) == ("invalid_request_error", "model_not_found")


@pytest.mark.parametrize(
    ("headers", "read"),
    [({}, openai_error), ({"anthropic-version": "2023-06-01"}, anthropic_error)],
)
async def test_unknown_model_route_is_404_in_the_callers_dialect(
    gateway: Gateway, headers: dict[str, str], read: Any
) -> None:
    """``/v1/models/{id}`` serves both SDKs; an Anthropic one sends ``anthropic-version``."""
    response = await fetch("GET", f"{gateway.url}/v1/models/nope", headers=headers)
    assert response.status == 404
    kind = "not_found_error" if read is anthropic_error else "invalid_request_error"
    assert read(response.json())["type"] == kind


async def test_unknown_route_and_method_are_json(gateway: Gateway) -> None:
    missing = await fetch("GET", f"{gateway.url}/v1/nothing")
    assert missing.status == 404
    openai_error(missing.json())
    wrong_method = await fetch("GET", f"{gateway.url}/v1/messages")
    assert wrong_method.status == 405
    anthropic_error(wrong_method.json())


async def test_large_conversations_are_accepted(gateway: Gateway, scripted: ScriptedNeuron) -> None:
    big = "word " * 400_000  # 2 MB, past aiohttp's 1 MiB default
    response = await fetch(
        "POST",
        f"{gateway.url}/v1/chat/completions",
        json_body={"model": MODEL, "messages": [{"role": "user", "content": big}]},
    )
    assert response.status == 200
    assert scripted.requests[0]["messages"][0]["content"] == big


# -- streaming -----------------------------------------------------------------------------


async def test_stream_is_passed_through_as_it_is_generated(
    gateway: Gateway, scripted: ScriptedNeuron
) -> None:
    """Chunks reach the client while the neuron is still generating (here: blocked after
    three chunks), so nothing waits for the whole answer."""
    scripted.script = Reply(text=["one", "two", "three"], block_after=3)
    received: list[str] = []
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{gateway.url}/v1/chat/completions", json={**CHAT, "stream": True}) as r,
    ):
        assert r.status == 200
        decoder = SSEDecoder()
        while received != ["", "one", "two"]:
            for event in await asyncio.wait_for(read_events(r, decoder), timeout=5):
                received.append(event.json()["choices"][0]["delta"]["content"])
        assert not scripted.cancelled.is_set()
    await asyncio.wait_for(scripted.cancelled.wait(), timeout=5)


async def test_anthropic_stream_wire_format(gateway: Gateway, scripted: ScriptedNeuron) -> None:
    scripted.script = Reply(text=["ok"])
    response = await fetch(
        "POST", f"{gateway.url}/v1/messages", json_body={**MESSAGES, "stream": True}
    )
    assert response.headers["Content-Type"].startswith("text/event-stream")
    events = SSEDecoder().feed(response.body)
    assert all(e.event == e.json()["type"] for e in events)
    assert [e.event for e in events[:2]] == ["message_start", "ping"]  # as Anthropic sends
    assert events[-1].event == "message_stop"


async def test_openai_mid_stream_error_frame(gateway: Gateway, scripted: ScriptedNeuron) -> None:
    scripted.script = Reply(text=["a", "b"], fail_after=1)
    response = await fetch(
        "POST", f"{gateway.url}/v1/chat/completions", json_body={**CHAT, "stream": True}
    )
    assert response.status == 200
    events = SSEDecoder().feed(response.body)
    error = openai_error(events[-1].json())
    assert (error["message"], error["code"]) == ("scripted failure", "generation_failed")
    assert all(e.data != "[DONE]" for e in events)


# -- auth ----------------------------------------------------------------------------------


@pytest.fixture
async def keyed(scripted: ScriptedNeuron) -> AsyncIterator[Gateway]:
    settings = gateway_settings(api_keys=["user-key"], admin_key="admin-key")
    async with gateway_over(scripted, settings) as gw:
        yield gw


@pytest.mark.parametrize(
    ("path", "body", "read"),
    [("/v1/chat/completions", CHAT, openai_error), ("/v1/messages", MESSAGES, anthropic_error)],
)
async def test_auth_errors_in_dialect(keyed: Gateway, path: str, body: Any, read: Any) -> None:
    for headers in ({}, {"x-api-key": "bad"}, {"Authorization": "Bearer bad"}):
        response = await fetch("POST", keyed.url + path, json_body=body, headers=headers)
        assert response.status == 401
        assert read(response.json())["type"] == "authentication_error"
    for headers in ({"x-api-key": "user-key"}, {"Authorization": "Bearer user-key"}):
        response = await fetch("POST", keyed.url + path, json_body=body, headers=headers)
        assert response.status == 200


async def test_health_is_open_and_admin_needs_the_admin_key(keyed: Gateway) -> None:
    health = await fetch("GET", f"{keyed.url}/health")
    assert health.status == 200
    assert health.json()["nodes_up"] == 1
    for key in (None, "user-key", "wrong"):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        response = await fetch("GET", f"{keyed.url}/admin/fleet", headers=headers)
        assert response.status == 401
    admin = {"Authorization": "Bearer admin-key"}
    assert (await fetch("GET", f"{keyed.url}/admin/fleet", headers=admin)).status == 200


def test_presented_key() -> None:
    assert presented_key({"x-api-key": " k1 "}) == "k1"
    assert presented_key({"Authorization": "Bearer k2"}) == "k2"
    assert presented_key({"Authorization": "bearer k3"}) == "k3"
    assert presented_key({"Authorization": "Basic abc"}) is None
    assert presented_key({"Authorization": "Bearer "}) is None
    assert presented_key({}) is None


def test_matches_and_policy() -> None:
    assert matches("b", ["a", "b", "c"])
    assert not matches("d", ["a", "b"])
    assert not matches(None, ["a"])
    assert not matches("", [""])
    open_policy = KeyPolicy()
    assert open_policy.refusal("/v1/messages", {}) is None
    keyed = KeyPolicy(("api",), "adm")
    assert keyed.refusal("/health", {}) is None
    assert keyed.refusal("/v1/models", {"x-api-key": "api"}) is None
    assert keyed.refusal("/admin/fleet", {"x-api-key": "api"}) == "invalid admin key"
    assert "missing" in (keyed.refusal("/v1/models", {}) or "")
    # Without an admin key the admin routes take the API keys, never nothing.
    assert KeyPolicy(("api",)).keys_for("/admin/fleet") == ("api",)


# -- admin ---------------------------------------------------------------------------------


async def test_admin_load_unload_and_fleet(gateway: Gateway, scripted: ScriptedNeuron) -> None:
    loaded = await fetch(
        "POST", f"{gateway.url}/admin/models/load", json_body={"model": COLD_MODEL}
    )
    assert loaded.status == 200
    assert loaded.json()["status"] == "loaded"
    assert [r.model_id for r in scripted.loads] == [COLD_MODEL]

    snapshot = (await fetch("GET", f"{gateway.url}/admin/fleet")).json()
    [node] = snapshot["nodes"]
    assert (node["name"], node["up"]) == ("node-a", True)
    assert node["devices"][0]["vram_total_mb"] == 24576
    statuses = {m["id"]: m["status"] for m in snapshot["models"]}
    assert statuses == {MODEL: "loaded", COLD_MODEL: "loaded"}

    unloaded = await fetch(
        "POST", f"{gateway.url}/admin/models/unload", json_body={"model": COLD_MODEL}
    )
    assert unloaded.json() == {"model": COLD_MODEL, "status": "unloaded", "nodes": ["node-a"]}
    assert scripted.unloads == [COLD_MODEL]


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"model": "nope"}, 404),
        ({"modle": MODEL}, 400),
        ({"model": MODEL, "node": "elsewhere"}, 404),
    ],
)
async def test_admin_errors(gateway: Gateway, body: Any, status: int) -> None:
    response = await fetch("POST", f"{gateway.url}/admin/models/load", json_body=body)
    assert response.status == status
    openai_error(response.json())


async def test_admin_pin_and_unpin(gateway: Gateway) -> None:
    def pinned() -> bool:
        return gateway.fleet.catalogue.is_pinned(MODEL, "node-a")

    body = {"model": MODEL, "node": "node-a"}
    response = await fetch("POST", f"{gateway.url}/admin/models/pin", json_body=body)
    assert response.status == 200
    assert response.json() == {"model": MODEL, "node": "node-a", "pinned": True}
    snapshot = (await fetch("GET", f"{gateway.url}/admin/fleet")).json()
    assert next(m for m in snapshot["models"] if m["id"] == MODEL)["pinned"]
    assert pinned()
    response = await fetch("POST", f"{gateway.url}/admin/models/unpin", json_body=body)
    assert response.json() == {"model": MODEL, "node": "node-a", "pinned": False}
    assert not pinned()


@pytest.mark.parametrize("route", ["pin", "unpin"])
@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"model": MODEL}, 400),  # a pin is per node
        ({"model": MODEL, "node": "node-a", "extra": 1}, 400),
        ({"model": MODEL, "node": "elsewhere"}, 404),
    ],
)
async def test_admin_pin_errors(gateway: Gateway, route: str, body: Any, status: int) -> None:
    response = await fetch("POST", f"{gateway.url}/admin/models/{route}", json_body=body)
    assert response.status == status
    openai_error(response.json())


async def test_pinning_an_unknown_model_is_404(gateway: Gateway) -> None:
    body = {"model": "nope", "node": "node-a"}
    response = await fetch("POST", f"{gateway.url}/admin/models/pin", json_body=body)
    assert response.status == 404
    assert openai_error(response.json())["code"] == "model_not_found"


@pytest.mark.parametrize("route", ["pin", "unpin"])
async def test_admin_pin_routes_need_the_admin_key(keyed: Gateway, route: str) -> None:
    url, body = f"{keyed.url}/admin/models/{route}", {"model": MODEL, "node": "node-a"}
    for key in (None, "user-key", "wrong"):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        response = await fetch("POST", url, json_body=body, headers=headers)
        assert response.status == 401
        assert openai_error(response.json())["type"] == "authentication_error"
    assert not keyed.fleet.catalogue.is_pinned(MODEL, "node-a")
    admin = {"Authorization": "Bearer admin-key"}
    response = await fetch("POST", url, json_body=body, headers=admin)
    assert response.status == 200
    assert keyed.fleet.catalogue.is_pinned(MODEL, "node-a") == (route == "pin")


# -- per-request hooks ---------------------------------------------------------------------


class Recorder(RequestObserver):
    def __init__(self, log: list[tuple[str, Any]], api: str, model: str) -> None:
        self.log = log
        self.log.append(("start", (api, model)))

    def routed(self, lease: Lease) -> None:
        self.log.append(("routed", (lease.node.name, lease.served_id)))

    def chunk(self, chunk: dict[str, Any]) -> None:
        if chunk.get("usage"):
            self.log.append(("usage", chunk["usage"]))

    def finished(self) -> None:
        self.log.append(("finished", None))

    def failed(self, failure: ApiError) -> None:
        self.log.append(("failed", failure.status))


async def test_hooks_see_every_request(scripted: ScriptedNeuron) -> None:
    log: list[tuple[str, Any]] = []

    def observe(api: str, model: str) -> RequestObserver:
        return Recorder(log, api, model)

    async with gateway_over(scripted, observe=observe) as gw:
        # Streamed without include_usage: the client gets no usage, the hooks do.
        await fetch("POST", f"{gw.url}/v1/chat/completions", json_body={**CHAT, "stream": True})
        assert log == [
            ("start", ("chat", MODEL)),
            ("routed", ("node-a", MODEL)),
            ("usage", scripted.script.usage()),
            ("finished", None),
        ]
        log.clear()
        await fetch("POST", f"{gw.url}/v1/messages", json_body={**MESSAGES, "model": "nope"})
        assert log == [("start", ("messages", "nope")), ("failed", 404)]
        log.clear()
        scripted.script = Reply(text=["a", "b"], fail_after=1)
        await fetch("POST", f"{gw.url}/v1/responses", json_body={**RESPONSES, "stream": True})
        assert log[-1] == ("failed", 500)


# -- Service -------------------------------------------------------------------------------


async def test_service_serves_and_stops_gracefully(scripted: ScriptedNeuron) -> None:
    settings = gateway_settings(listen="127.0.0.1:0", metrics_listen="127.0.0.1:0", drain_s=0)
    service = Service(settings, [scripted])
    await service.start()
    try:
        assert service.url.startswith("http://127.0.0.1:") and not service.url.endswith(":0")
        models = (await fetch("GET", f"{service.url}/v1/models")).json()
        assert {m["id"] for m in models["data"]} == {MODEL, COLD_MODEL}

        await fetch("POST", f"{service.url}/v1/chat/completions", json_body=CHAT)
        scraped = (await fetch("GET", f"{service.metrics_url}/metrics")).body.decode()
        [requests] = [
            line for line in scraped.splitlines() if line.startswith("helexa_requests_total{")
        ]
        assert f'model="{MODEL}"' in requests and 'status="200"' in requests
        assert requests.endswith(" 1.0")

        scripted.script = Reply(text=["a", "b"], block_after=1)
        async with (
            aiohttp.ClientSession() as http,
            http.post(f"{service.url}/v1/chat/completions", json={**CHAT, "stream": True}) as r,
        ):
            decoder = SSEDecoder()
            await asyncio.wait_for(read_events(r, decoder), timeout=5)
            await asyncio.wait_for(service.stop(), timeout=10)  # with a stream in flight
            assert scripted.cancelled.is_set()
            assert scripted.closed
            # Not drained (drain_s = 0): ended at once, with the dialect's error frame.
            rest = decoder.feed(await r.content.read()) + decoder.end()
            assert openai_error(rest[-1].json())["code"] == "shutting_down"
    finally:
        await service.stop()
    with pytest.raises(aiohttp.ClientConnectionError):
        await fetch("GET", f"{service.url}/health")


async def test_the_metrics_port_refuses_web_pages_and_rebound_names(
    scripted: ScriptedNeuron,
) -> None:
    """The metrics name every model, node and route: no page may read them, and a name
    rebound to 127.0.0.1 is refused as on the gateway's own port."""
    settings = gateway_settings(listen="127.0.0.1:0", metrics_listen="127.0.0.1:0")
    service = Service(settings, [scripted])
    await service.start()
    try:
        url = f"{service.metrics_url}/metrics"
        assert (await fetch("GET", url)).status == 200
        page = await fetch("GET", url, headers={"Origin": "https://evil.example"})
        assert refusal(page, 403, openai_error)["code"] == "origin_not_allowed"
        rebound = await fetch("GET", url, headers={"Host": "evil.example:80"})
        assert refusal(rebound, 403, openai_error)["code"] == "host_not_allowed"
        local = await fetch("GET", url, headers={"Origin": "http://localhost:3000"})
        assert local.status == 200 and b"helexa_" in local.body
    finally:
        await service.stop()


async def test_serve_headless_until_sigterm(tmp_path: Path) -> None:
    """``helexa --serve`` prints where it listens, serves, logs fleet events and a line
    per request at INFO to stderr, says it is stopping and stopped, and exits 0 on
    SIGTERM."""
    async with serving(make_neuron_app(ScriptedNeuron("n1"))) as neuron_url:
        config = tmp_path / "helexa.toml"
        config.write_text(f'[[neurons]]\nname = "n1"\nendpoint = "{neuron_url}"\n')
        await _serve_headless(tmp_path, config)


def _secs(line: str) -> str:
    """The duration an access line ends with (what the test cannot know in advance)."""
    return line.rpartition(" ")[2]


async def _serve_headless(tmp_path: Path, config: Path) -> None:
    async with headless_gateway(tmp_path, config) as served:
        url, metrics = served.url, served.metrics_url
        assert url != metrics
        health = await fetch("GET", f"{url}/health")
        assert health.json() == {"status": "ok", "nodes_up": 1, "nodes": 1}
        assert (await fetch("GET", f"{metrics}/metrics")).status == 200
        assert (await fetch("POST", f"{url}/v1/chat/completions", json_body=CHAT)).status == 200
        refused = await fetch("POST", f"{url}/v1/chat/completions", json_body={"model": MODEL})
        returncode, stderr = await served.terminate()
        assert returncode == 0
        assert re.search(r"INFO helexa\.cortex\.fleet: node n1 is up", stderr)
        access = [line for line in stderr.splitlines() if " helexa.access: " in line]
        assert len(access) == 3, stderr  # /health, the chat, the refusal (not /metrics)
        assert access[0].endswith("helexa.access: 127.0.0.1 GET /health 200 " + _secs(access[0]))
        chat = re.search(
            r"INFO helexa\.access: 127\.0\.0\.1 POST /v1/chat/completions 200 [0-9.]+s "
            rf"model={MODEL} node=n1 tokens=(\d+)\+(\d+) ttft=[0-9.]+s$",
            access[1],
        )
        assert chat is not None, access[1]
        assert int(chat[2]) > 0
        assert f"/v1/chat/completions {refused.status} " in access[2]
        assert re.search(r"INFO helexa\.service: stopping the gateway", stderr)
        assert f"INFO helexa.service: left loaded on their remote neurons: {MODEL}@n1" in stderr
        assert stderr.rstrip().splitlines()[-1].endswith("INFO helexa.service: stopped")
