"""The dashboard reads the real ``Fleet.snapshot()``: rows come out of a live fleet."""

from __future__ import annotations

import socket

from helexa.config import ModelProfile, Settings
from helexa.cortex.fleet import Fleet
from helexa.neuron.remote import RemoteNeuron
from tests.support.scripted_neuron import ScriptedNeuron
from tui.fleetview import fleet_view


def unused_endpoint() -> str:
    """A loopback URL nothing listens on: bind port 0, note it, close it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


async def test_rows_from_a_real_fleet_snapshot() -> None:
    gpu = ScriptedNeuron("gpu", models={"small": "loaded", "big": "unloaded"})
    dead = RemoteNeuron("dead", unused_endpoint())
    settings = Settings(models=[ModelProfile(id="small", pinned_on=["gpu"])])
    fleet = Fleet.from_settings([gpu, dead], settings)
    await fleet.refresh()
    async with await fleet.acquire("small"):
        view = fleet_view(fleet.snapshot())
    await fleet.close()

    by_name = {n.name: n for n in view.nodes}
    assert by_name["gpu"].up and not by_name["dead"].up
    assert "unreachable" in (by_name["dead"].error or "")
    health = (await gpu.health()).devices[0]
    (device,) = by_name["gpu"].devices
    assert (device.vram_used_mb, device.vram_total_mb) == (
        health.vram_used_mb,
        health.vram_used_mb + health.vram_free_mb,
    )
    assert 0 < device.vram_fraction < 1

    small = view.row("gpu/small")
    assert small is not None
    assert (small.status, small.pinned, small.in_flight) == ("loaded", True, 1)
    assert small.idle_s is not None
    big = view.row("gpu/big")
    assert big is not None and big.status == "unloaded" and not big.pinned
    assert view.row("dead/small") is None


def test_missing_optional_keys_get_defaults() -> None:
    view = fleet_view(
        {
            "nodes": [{"name": "n", "up": True, "devices": [{"index": 0, "vram_total_mb": 100}]}],
            "models": [{"id": "m", "node": "n", "status": "loading"}],
        }
    )
    assert view.nodes[0].devices[0].vram_used_mb == 0
    row = view.models[0]
    assert (row.key, row.progress, row.idle_s, row.in_flight) == ("n/m", None, None, 0)
