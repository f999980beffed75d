"""``helexa status``: the table layout (pure) and the command against a real server."""

from __future__ import annotations

import json
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
    assert beast0.endswith("0: RTX 5090 12.5 GiB / 32.0 GiB 45% 61°C")
    assert beast1.strip() == "1: RTX 5090 0 B / 32.0 GiB"
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
    assert big.split() == ["qwen3-8b", "beast", "loaded", "6.3", "GiB", "yes", "2", "3s"]


def test_a_cpu_node_says_it_has_no_gpu() -> None:
    """A node without a GPU reports the host's RAM as its device: the table says so,
    in the same units as any VRAM (the issue saw "6 MiB" here and "0.0" in the TUI)."""
    cpu = {"index": 0, "name": "AMD EPYC", "kind": "cpu", "vram_total_mb": 65536}
    cpu["vram_used_mb"] = 6
    snapshot = {"nodes": [{"name": "local", "up": True, "devices": [cpu]}], "models": []}
    (_, row) = format_fleet_table(snapshot).split("\n\n")[0].splitlines()
    assert row.endswith("no GPU: running on CPU (AMD EPYC), RAM 6 MiB / 64.0 GiB")


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


def test_run_status_json_is_the_snapshot(
    gateway: tuple[Gateway, str], capsys: pytest.CaptureFixture[str]
) -> None:
    _, url = gateway
    assert run_status(Settings(), url=url, admin_key="admin-secret", as_json=True) == 0
    assert json.loads(capsys.readouterr().out) == SNAPSHOT


def test_run_status_watch_redraws_each_round(
    gateway: tuple[Gateway, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """Each round clears the screen, then prints a heading and the table as it is now."""
    gw, url = gateway
    clears: list[int] = []

    def clear() -> None:
        clears.append(1)
        gw.snapshot = {**SNAPSHOT, "models": SNAPSHOT["models"][:1]}  # seen by the next round

    assert (
        run_status(
            Settings(), url=url, admin_key="admin-secret", watch_s=0.01, clear=clear, rounds=2
        )
        == 0
    )
    out = capsys.readouterr().out
    assert len(clears) == 2 and out.count(f"helexa status {url}") == 2
    first, second = out.split(f"helexa status {url}")[1:]
    assert "qwen3-0.6b" in first and "qwen3-0.6b" not in second and "qwen3-8b" in second


@pytest.mark.parametrize(
    ("status", "content_type", "body"),
    [
        (200, "text/html", "<html><body>" + "<p>welcome</p>" * 100 + "</body></html>"),
        (404, "text/html", "<html><h1>Not Found</h1></html>"),
        (200, "application/json", '{"object": "list", "data": []}'),
        (404, "application/json", '{"detail": "Not Found"}'),
    ],
)
def test_run_status_on_a_server_that_is_not_helexa_says_so(
    capsys: pytest.CaptureFixture[str], status: int, content_type: str, body: str
) -> None:
    """A web server, an OpenAI server, anything but a gateway: one line that names what
    it answered, never the page it sent."""

    async def page(request: web.Request) -> web.Response:
        return web.Response(status=status, text=body, content_type=content_type)

    app = web.Application()
    app.router.add_get("/admin/fleet", page)
    with serving_in_thread(app) as url:
        assert run_status(Settings(), url=url) == 1
    err = capsys.readouterr().err
    assert err == (
        f"helexa status: {url}: HTTP {status} ({content_type}) is not a helexa gateway's "
        "answer: is this the gateway's address (helexa --serve prints it)?\n"
    )


def test_run_status_unreachable_gateway_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    assert run_status(Settings(), url=url) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"helexa status: cannot reach the gateway at {url}: ")
    assert err.count("\n") == 1
