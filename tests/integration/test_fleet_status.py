"""``helexa status``: the table layout (pure) and the command against a real server."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest
from aiohttp import web

from helexa.config import Settings
from helexa.cortex.status import format_fleet_table, gateway_url, run_status, table
from tests.support.servers import serving_in_thread

SNAPSHOT: dict[str, Any] = {
    "nodes": [
        {
            "name": "beast",
            "up": True,
            "hostname": "beast.lan",
            "devices": [
                {
                    "index": 0,
                    "name": "RTX 5090",
                    "vram_total_mb": 32768,
                    "vram_used_mb": 12800,
                    "utilization_pct": 45.0,
                    "temp_c": 61.0,
                },
                {"index": 1, "name": "RTX 5090", "vram_total_mb": 32768, "vram_used_mb": 0},
            ],
        },
        {"name": "benjy", "up": False, "error": "neuron 'benjy' is unreachable", "devices": []},
    ],
    "models": [
        {
            "id": "qwen3-8b",
            "node": "beast",
            "status": "loaded",
            "vram_used_mb": 6500,
            "pinned": True,
            "in_flight": 2,
            "idle_s": 3.2,
        },
        {"id": "qwen3-0.6b", "node": "beast", "status": "unloaded", "idle_s": None},
    ],
}


def test_table_aligns_columns() -> None:
    assert table(["A", "BB"], [["xxx", "y"], ["z", ""]]) == "A    BB\nxxx  y\nz"


def test_format_fleet_table() -> None:
    lines = format_fleet_table(SNAPSHOT).splitlines()
    nodes_header, beast0, beast1, benjy, blank, models_header, small, big = lines
    assert nodes_header.split() == ["NODE", "STATUS", "HOST", "DEVICES", "(VRAM", "used/total)"]
    assert beast0.split()[:3] == ["beast", "up", "beast.lan"]
    assert beast0.endswith("0: RTX 5090 12.5/32.0 GiB 45% 61°C")
    assert beast1.strip() == "1: RTX 5090 0.0/32.0 GiB"
    assert beast1.index("1: RTX") == beast0.index("0: RTX")  # the device column lines up
    assert benjy.split(maxsplit=2) == ["benjy", "down", "neuron 'benjy' is unreachable"]
    assert blank == ""
    assert models_header.split() == [
        "MODEL",
        "NODE",
        "STATUS",
        "VRAM",
        "PINNED",
        "IN-FLIGHT",
        "IDLE",
    ]
    assert small.split() == ["qwen3-0.6b", "beast", "unloaded", "-", "0", "-"]
    assert big.split() == ["qwen3-8b", "beast", "loaded", "6500", "MiB", "yes", "2", "3s"]


def test_format_empty_fleet() -> None:
    assert format_fleet_table({"nodes": [], "models": []}) == "no nodes\n\nno models"


@pytest.mark.parametrize(
    ("listen", "url"),
    [
        ("127.0.0.1:31313", "http://127.0.0.1:31313"),
        ("0.0.0.0:8080", "http://127.0.0.1:8080"),
        ("[::]:9000", "http://[::1]:9000"),
        ("gw.internal:31313", "http://gw.internal:31313"),
    ],
)
def test_gateway_url(listen: str, url: str) -> None:
    assert gateway_url(Settings.model_validate({"gateway": {"listen": listen}})) == url


class Gateway:
    """A stand-in gateway serving /admin/fleet behind an admin key, in its own thread
    (run_status runs its own event loop, as the CLI does)."""

    def __init__(self, snapshot: Any, key: str) -> None:
        self.snapshot, self.key = snapshot, key

    async def fleet(self, request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != f"Bearer {self.key}":
            body = {"error": {"type": "authentication_error", "message": "invalid admin key"}}
            return web.json_response(body, status=401)
        return web.json_response(self.snapshot)


@pytest.fixture
def gateway() -> Iterator[tuple[Gateway, str]]:
    gw = Gateway(SNAPSHOT, "admin-secret")
    app = web.Application()
    app.router.add_get("/admin/fleet", gw.fleet)
    with serving_in_thread(app) as url:
        yield gw, url


def test_run_status_prints_the_table(
    gateway: tuple[Gateway, str], capsys: pytest.CaptureFixture[str]
) -> None:
    _, url = gateway
    assert run_status(Settings(), url=url, admin_key="admin-secret") == 0
    assert capsys.readouterr().out.strip() == format_fleet_table(SNAPSHOT)


def test_run_status_uses_the_configured_admin_key(
    gateway: tuple[Gateway, str], capsys: pytest.CaptureFixture[str]
) -> None:
    _, url = gateway
    settings = Settings.model_validate({"gateway": {"admin_key": "admin-secret"}})
    assert run_status(settings, url=url) == 0
    assert "qwen3-8b" in capsys.readouterr().out


def test_run_status_wrong_key_is_one_line(
    gateway: tuple[Gateway, str], capsys: pytest.CaptureFixture[str]
) -> None:
    _, url = gateway
    assert run_status(Settings(), url=url, admin_key="wrong") == 1
    err = capsys.readouterr().err
    assert err == f"helexa status: {url}: HTTP 401: invalid admin key\n"


def test_run_status_unreachable_gateway_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    assert run_status(Settings(), url=url) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"helexa status: cannot reach the gateway at {url}: ")
    assert err.count("\n") == 1
