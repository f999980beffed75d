"""A fixed fleet for the dashboard's snapshot tests: the same screen on every machine.

The app runs unmodified over a real Service; only what would differ between runs is
pinned down here. The neurons are scripted doubles with fixed GPU readings, the gateway's
displayed URL is fixed by the test (the real one has a free port), idle times are read on
a fleet clock frozen once the scene is set (so they cannot tick over while a loaded machine
renders), and the traffic record runs on a frozen clock fed by hand, so the sparklines,
TTFT and request log show the same numbers however fast the machine is.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from textual.pilot import Pilot

from helexa.config import (
    EvictionSettings,
    GatewaySettings,
    LocalSettings,
    ModelProfile,
    PollerSettings,
    Settings,
)
from helexa.cortex.fleet import Lease
from helexa.neuron.interface import Discovery, Health, ModelState, ModelStatus
from tests.support import devices
from tests.support.devices import Gpu
from tests.support.scripted_neuron import ScriptedNeuron
from tui.app import HelexaApp, build_app
from tui.events import Events
from tui.fleetview import DeviceRow
from tui.traffic import RequestRecord, RequestStatus, Traffic
from tui.widgets.models import ModelsTable

SIZE = (160, 45)
SMALL = (80, 24)
GATEWAY_URL = "http://127.0.0.1:8080"  # shown instead of the free port the test binds
WALL_START = 1_750_000_000.0  # 2025-06-15 15:06:40 UTC: the log's clock column, in UTC


@dataclass(frozen=True)
class Served:
    """One model as the scripted node reports it."""

    id: str
    status: ModelStatus
    device: int | None = None
    vram_mb: int = 0
    progress: float | None = None
    error: str | None = None


class RackNeuron(ScriptedNeuron):
    """A GPU node with fixed readings, whose models carry devices, VRAM and progress.

    Unloads of the models in ``slow_unloads`` wait until ``release`` is set, so a
    snapshot can catch an eviction in flight.
    """

    def __init__(self, name: str, gpus: list[Gpu], served: list[Served]) -> None:
        super().__init__(name, models={m.id: m.status for m in served})
        self.gpus = gpus
        self.served = {m.id: m for m in served}
        self.slow_unloads: set[str] = set()
        self.release = asyncio.Event()

    async def discovery(self) -> Discovery:
        return devices.discovery(f"{self.name}.lan", self.gpus, os="Linux")

    async def health(self) -> Health:
        return devices.health(self.gpus, uptime_secs=86_400.0)

    async def models(self) -> list[ModelState]:
        out = []
        for model_id, status in self.states.items():
            m = self.served[model_id]
            on = status in ("loaded", "loading") and m.device is not None
            out.append(
                ModelState(
                    id=model_id,
                    status=status,
                    devices=[m.device] if on and m.device is not None else [],
                    vram_used_mb=m.vram_mb if on else 0,
                    progress=m.progress if status == "loading" else None,
                    error=m.error if status == "failed" else None,
                )
            )
        return out

    async def unload(self, model_id: str) -> None:
        if model_id in self.slow_unloads:
            await self.release.wait()
        await super().unload(model_id)


class DownNeuron(ScriptedNeuron):
    """A node that never answers, with a fixed reason (a real one names a host and port)."""

    async def discovery(self) -> Discovery:
        raise ConnectionError("unreachable: connection refused")

    async def health(self) -> Health:
        raise ConnectionError("unreachable: connection refused")


class FrozenClock:
    """The traffic record's clock: it moves only when the scene says so."""

    def __init__(self, start: float = 1000.0) -> None:
        self.start = self.now = start

    def __call__(self) -> float:
        return self.now

    def wall(self) -> float:
        return WALL_START + (self.now - self.start)


def content_chunk(text: str = "tok") -> dict[str, Any]:
    return {"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]}


def usage_chunk(prompt: int, completion: int) -> dict[str, Any]:
    usage = {"prompt_tokens": prompt, "completion_tokens": completion}
    return {"choices": [], "usage": usage}


@dataclass(frozen=True)
class Request:
    """One finished request to replay into the traffic record."""

    model: str
    node: str
    api: str
    start_s: float  # after the clock's start
    ttft_s: float
    tokens: int
    tok_s: float
    prompt: int
    status: RequestStatus = "ok"  # "streaming": still going when the clock stops
    error: str | None = None


TRAFFIC = [
    Request("qwen3-8b", "atlas", "chat", 2.0, 0.180, 96, 48.0, 412),
    Request("qwen3-0.6b", "atlas", "completions", 6.5, 0.045, 160, 160.0, 38),
    Request("qwen3-8b", "atlas", "messages", 11.0, 0.240, 120, 48.0, 1870),
    Request("qwen3-8b", "atlas", "chat", 19.0, 0.150, 72, 48.0, 95, "cancelled"),
    Request("qwen3-0.6b", "atlas", "chat", 24.0, 0.050, 200, 160.0, 64),
    Request("qwen3-8b", "atlas", "responses", 30.0, 0.210, 144, 48.0, 760),
    Request("qwen3-32b", "", "chat", 37.0, 0.0, 0, 1.0, 0, "error", "503 no capacity"),
    Request("qwen3-0.6b", "atlas", "chat", 41.0, 0.060, 240, 160.0, 120),
    Request("qwen3-8b", "atlas", "messages", 47.0, 0.190, 96, 48.0, 2210),
    Request("qwen3-0.6b", "atlas", "chat", 50.0, 0.055, 2000, 160.0, 310, "streaming"),
]
TRAFFIC_END_S = 55.5  # where the clock stops: the last request is still streaming


def replay(traffic: Traffic, clock: FrozenClock, requests: list[Request] = TRAFFIC) -> None:
    """Feed ``requests`` through Traffic's own entry points, moving the frozen clock.

    Chunks of overlapping requests interleave in time order, as the gateway would report
    them, so the per-second buckets fill as they would in a live run.
    """
    events: list[tuple[float, int, str]] = []  # (when, which request, begin|token|end)
    for n, r in enumerate(requests):
        t0 = clock.start + r.start_s
        events.append((t0, n, "begin"))
        events += [(t0 + r.ttft_s + k / r.tok_s, n, "token") for k in range(r.tokens)]
        if r.status != "streaming":
            events.append((t0 + r.ttft_s + max(0, r.tokens - 1) / r.tok_s + 0.001, n, "end"))
    end = clock.start + TRAFFIC_END_S
    records: dict[int, RequestRecord] = {}
    for at, n, kind in sorted(e for e in events if e[0] <= end):
        clock.now = at
        r = requests[n]
        if kind == "begin":
            records[n] = traffic.begin(r.model, r.node, r.api)
        elif kind == "token":
            traffic.observe(records[n], content_chunk())
        else:
            if r.status == "ok":
                traffic.observe(records[n], usage_chunk(r.prompt, r.tokens))
            traffic.finish(records[n], r.status, r.error)
    clock.now = end


ATLAS_GPUS = [
    Gpu("NVIDIA GeForce RTX 4090", 24564, 15240, 87.0, 71.0),
    Gpu("NVIDIA GeForce RTX 4090", 24564, 21890, 34.0, 58.0),
]
ATLAS_MODELS = [
    Served("qwen3-8b", "loaded", 0, 5870),
    Served("qwen3-4b", "loaded", 0, 3020),
    Served("qwen3-0.6b", "loaded", 1, 1130),
    Served("qwen3-30b-a3b", "loading", 1, 11740, progress=0.63),
    Served("qwen3-14b", "unloaded"),
    Served("qwen3-32b", "failed", error="out of memory on device 1"),
]
CATALOGUE = [
    ModelProfile(id="qwen3-8b", vram_mb=5870, pinned_on=["atlas"]),
    ModelProfile(id="qwen3-4b", vram_mb=3020),
    ModelProfile(id="qwen3-0.6b", vram_mb=1130),
    ModelProfile(id="qwen3-30b-a3b", vram_mb=18630),
    ModelProfile(id="qwen3-14b", vram_mb=9300),
    ModelProfile(id="qwen3-32b", vram_mb=20210),
]
# Seconds since last use, each far from a unit's rounding edge (ago() rounds).
IDLE_S = {"qwen3-8b": 180.0, "qwen3-4b": 7560.0, "qwen3-0.6b": 5.8}


def scene_settings() -> Settings:
    """No background polling or idle eviction to change the fleet mid-shot."""
    return Settings(
        gateway=GatewaySettings(listen="127.0.0.1:0", metrics_listen="127.0.0.1:0"),
        local=LocalSettings(enabled=False),
        poller=PollerSettings(interval_s=3600),
        eviction=EvictionSettings(idle_ttl_s=0),
        models=CATALOGUE,
    )


@dataclass
class Scene:
    """The app over the fixed fleet, and the steps that bring it to the pictured state."""

    atlas: RackNeuron
    spare: DownNeuron
    clock: FrozenClock
    traffic: Traffic
    app: HelexaApp
    fleet_clock: FrozenClock  # the dashboard reads idle times on it
    leases: list[Lease] = field(default_factory=list)

    async def ready(self, pilot: Pilot[int]) -> None:
        """Service up, a request in flight, idle times set, traffic replayed, rendered."""
        app = self.app
        await app.workers.wait_for_complete()  # the service's start worker
        fleet = app.service.fleet
        self.leases.append(await fleet.acquire("qwen3-0.6b"))  # the streaming request
        now = self.fleet_clock.now = time.monotonic()  # the fleet's time, frozen from here
        for model, idle in IDLE_S.items():
            fleet.use[("atlas", model)].last_used = now - idle
        replay(self.traffic, self.clock)
        for t in range(HISTORY):  # the devices' last minute, for their sparklines
            app.history.add(history_reading(t))
        await self.settle(pilot)

    async def settle(self, pilot: Pilot[int]) -> None:
        self.app.refresh_view()
        await pilot.pause()  # the throughput panel mounts per-model lines
        self.app.refresh_view()
        await pilot.pause()

    async def evicting(self, pilot: Pilot[int], model: str) -> None:
        """Press the evict key on ``model`` while its unload hangs on the node."""
        self.atlas.slow_unloads.add(model)
        table = self.app.query_one(ModelsTable)
        table.move_cursor(row=table.get_row_index(f"atlas/{model}"))
        await pilot.press("e")
        await pilot.pause()
        await self.settle(pilot)


HISTORY = 40  # readings of each device before the shot


def history_reading(t: int) -> list[DeviceRow]:
    """Device readings at step ``t``: device 0 busy in waves, device 1 filling up."""
    wave = (0, 10, 35, 70, 90, 95, 80, 60)[t % 8]
    return [
        DeviceRow("atlas", 0, "", 15240, 24564, utilization_pct=float(wave)),
        DeviceRow("atlas", 1, "", 12000 + 250 * t, 24564, utilization_pct=34.0),
    ]


def make_scene() -> Scene:
    atlas = RackNeuron("atlas", ATLAS_GPUS, ATLAS_MODELS)
    spare = DownNeuron("spare")
    clock = FrozenClock()
    traffic = Traffic(window_s=60, clock=clock, wall_clock=clock.wall)
    fleet_clock = FrozenClock(time.monotonic())
    app = build_app(
        scene_settings(),
        [atlas, spare],
        refresh_s=3600,
        traffic=traffic,
        clock=fleet_clock,
        events_log=Events(wall_clock=clock.wall),
    )
    return Scene(atlas, spare, clock, traffic, app, fleet_clock)
