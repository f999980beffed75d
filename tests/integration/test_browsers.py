"""What a web page can make a loopback gateway or neuron do: refused unless allowed.

Raw HTTP on loopback, with the headers a browser sends: a cross-origin ``no-cors`` POST
(``text/plain``, no preflight), a rebound Host name, a CORS preflight."""

from __future__ import annotations

import json
from typing import Any

import pytest

from helexa.config import ConfigError, Settings
from helexa.neuron.server import make_neuron_app
from helexa.origins import BrowserPolicy, host_name, is_loopback_host, is_loopback_origin
from tests.conftest import MODEL
from tests.support.scripted_neuron import ScriptedNeuron
from tests.support.servers import Fetched, Gateway, fetch, gateway_over, gateway_settings, serving

EVIL = "https://evil.example"
NO_CORS = {"Origin": EVIL, "Content-Type": "text/plain"}
UNLOAD = {"model": MODEL}


async def preflight(url: str, origin: str) -> Fetched:
    """The OPTIONS a browser sends before a cross-origin JSON POST."""
    headers = {"Origin": origin, "Access-Control-Request-Method": "POST"}
    return await fetch("OPTIONS", url, headers=headers)


async def test_a_cross_origin_no_cors_post_does_not_unload(
    gateway: Gateway, scripted: ScriptedNeuron
) -> None:
    response = await fetch(
        "POST",
        f"{gateway.url}/admin/models/unload",
        data=json.dumps(UNLOAD).encode(),
        headers=NO_CORS,
    )
    assert response.status == 403
    assert response.json()["error"]["code"] == "origin_not_allowed"
    assert scripted.unloads == [] and scripted.states[MODEL] == "loaded"
    assert "Access-Control-Allow-Origin" not in response.headers


@pytest.mark.parametrize(
    ("path", "body", "dialect"),
    [
        ("/v1/chat/completions", {"model": MODEL, "messages": []}, "openai"),
        ("/v1/messages", {"model": MODEL, "max_tokens": 1, "messages": []}, "anthropic"),
        ("/admin/models/load", UNLOAD, "openai"),
        ("/admin/models/pin", {"model": MODEL, "node": "node-a"}, "openai"),
    ],
)
async def test_foreign_origins_are_refused_in_the_route_dialect(
    gateway: Gateway, path: str, body: Any, dialect: str
) -> None:
    response = await fetch("POST", gateway.url + path, json_body=body, headers={"Origin": EVIL})
    assert response.status == 403
    payload = response.json()
    if dialect == "anthropic":
        assert payload["type"] == "error"
        assert payload["error"]["type"] == "permission_error"
    else:
        assert payload["error"]["type"] == "permission_error"
        assert payload["error"]["code"] == "origin_not_allowed"


async def test_a_loopback_page_must_send_json(gateway: Gateway, scripted: ScriptedNeuron) -> None:
    page = "http://localhost:5173"
    text = await fetch(
        "POST",
        f"{gateway.url}/admin/models/unload",
        data=b'{"model": "x"}',
        headers={"Origin": page, "Content-Type": "text/plain;charset=UTF-8"},
    )
    assert text.status == 415
    assert scripted.unloads == []
    listed = await fetch("GET", f"{gateway.url}/v1/models", headers={"Origin": page})
    assert listed.status == 200
    assert "Access-Control-Allow-Origin" not in listed.headers  # the page cannot read it


async def test_clients_without_origin_are_not_affected(gateway: Gateway) -> None:
    response = await fetch(
        "POST",
        f"{gateway.url}/v1/chat/completions",
        data=b'{"model": "%s", "messages": [{"role": "user", "content": "hi"}]}' % MODEL.encode(),
        headers={"Content-Type": "text/plain"},
    )
    assert response.status == 200


@pytest.mark.parametrize("host", ["rebind.attacker.example", "rebind.attacker.example:31313"])
async def test_a_rebound_host_name_is_refused_on_loopback(gateway: Gateway, host: str) -> None:
    response = await fetch("GET", f"{gateway.url}/v1/models", headers={"Host": host})
    assert response.status == 403
    assert response.json()["error"]["code"] == "host_not_allowed"


@pytest.mark.parametrize("host", ["localhost:31313", "127.0.0.1", "[::1]:8080", "app.localhost"])
async def test_loopback_host_names_are_accepted(gateway: Gateway, host: str) -> None:
    response = await fetch("GET", f"{gateway.url}/v1/models", headers={"Host": host})
    assert response.status == 200


async def test_allowed_hosts_and_cors_origins_are_configurable(scripted: ScriptedNeuron) -> None:
    settings = gateway_settings(
        allowed_hosts=["helexa.lan"], cors_origins=["http://localhost:3000"]
    )
    async with gateway_over(scripted, settings) as gw:
        named = await fetch("GET", f"{gw.url}/v1/models", headers={"Host": "helexa.lan:31313"})
        assert named.status == 200
        asked = await fetch(
            "OPTIONS",
            f"{gw.url}/v1/chat/completions",
            headers={
                "Origin": "http://localhost:3000",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type",
            },
        )
        assert asked.status == 204
        assert asked.headers["Access-Control-Allow-Origin"] == "http://localhost:3000"
        assert "POST" in asked.headers["Access-Control-Allow-Methods"]
        assert asked.headers["Access-Control-Allow-Headers"] == "authorization, content-type"
        chat = await fetch(
            "POST",
            f"{gw.url}/v1/chat/completions",
            json_body={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
            headers={"Origin": "http://localhost:3000"},
        )
        assert chat.status == 200
        assert chat.headers["Access-Control-Allow-Origin"] == "http://localhost:3000"
        refused = await preflight(f"{gw.url}/v1/chat/completions", "http://localhost:4000")
        assert refused.status == 403
        assert "Access-Control-Allow-Origin" not in refused.headers
        error = await fetch(
            "POST",
            f"{gw.url}/v1/chat/completions",
            json_body={"model": "nope", "messages": []},
            headers={"Origin": "http://localhost:3000"},
        )
        assert error.status >= 400  # the page can read why
        assert error.headers["Access-Control-Allow-Origin"] == "http://localhost:3000"


async def test_a_preflight_needs_no_key(scripted: ScriptedNeuron) -> None:
    settings = gateway_settings(api_keys=["k"], cors_origins=["*"])
    async with gateway_over(scripted, settings) as gw:
        allowed = await preflight(f"{gw.url}/v1/messages", EVIL)
        assert allowed.status == 204
        assert allowed.headers["Access-Control-Allow-Origin"] == EVIL
        unkeyed = await fetch(
            "POST",
            f"{gw.url}/v1/messages",
            json_body={"model": MODEL, "max_tokens": 1, "messages": []},
            headers={"Origin": EVIL},
        )
        assert unkeyed.status == 401


async def test_without_cors_origins_a_preflight_is_refused(gateway: Gateway) -> None:
    response = await preflight(f"{gateway.url}/v1/chat/completions", "http://localhost:3000")
    assert response.status == 403
    assert "Access-Control-Allow-Origin" not in response.headers


async def test_the_neuron_api_refuses_web_pages() -> None:
    neuron = ScriptedNeuron("n1", models={MODEL: "loaded"})
    app = make_neuron_app(neuron, browsers=BrowserPolicy.for_bind("127.0.0.1"))
    async with serving(app) as url:
        unload = await fetch(
            "POST",
            f"{url}/models/unload",
            data=b'{"model_id": "%s"}' % MODEL.encode(),
            headers=NO_CORS,
        )
        assert unload.status == 403
        assert unload.json()["error"]["code"] == "origin_not_allowed"
        assert neuron.unloads == []
        rebound = await fetch("GET", f"{url}/models", headers={"Host": "rebind.example"})
        assert rebound.status == 403
        assert (await fetch("GET", f"{url}/models")).status == 200


def test_the_policy_rules() -> None:
    assert is_loopback_host("127.0.0.2") and is_loopback_host("::1")
    assert is_loopback_host("LOCALHOST.") and is_loopback_host("ui.localhost")
    assert not is_loopback_host("localhost.evil.example") and not is_loopback_host("10.0.0.1")
    assert (
        host_name("[::1]:80") == "::1" and host_name("a.b:1") == "a.b" and host_name("::1") == "::1"
    )
    assert is_loopback_origin("http://127.0.0.1:8080") and not is_loopback_origin("file://")
    assert not is_loopback_origin("null")
    lan = BrowserPolicy.for_bind("0.0.0.0")
    assert lan.refusal("GET", {"Host": "anything.example"}) is None
    assert BrowserPolicy.for_bind("127.0.0.1").refusal("GET", {"Host": "x.example"}) is not None
    json_page = {"Origin": "http://localhost", "Content-Type": "application/json; charset=utf-8"}
    assert BrowserPolicy().refusal("POST", json_page) is None


@pytest.mark.parametrize("origin", ["localhost:3000", "http://a.example/path", "ftp://x"])
def test_bad_cors_origins_are_config_errors(origin: str) -> None:
    with pytest.raises((ConfigError, ValueError)):
        Settings.model_validate({"gateway": {"cors_origins": [origin]}})
