"""The fleet in front of real neuron HTTP servers on loopback.

Each node is ``make_neuron_app`` (the ``helexa neuron`` API) serving :class:`BudgetNeuron`,
a test double with one GPU of a fixed size that really accounts for what is loaded on it,
and the fleet reaches it through :class:`RemoteNeuron`, as a gateway reaches remote hosts.
Concurrency is made deterministic with events (a load is held open until the test
releases it), never with sleeps.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

import pytest
from aiohttp import web

from helexa.config import ModelProfile, Settings
from helexa.cortex.background import Evictor, Poller
from helexa.cortex.catalogue import Catalogue
from helexa.cortex.fleet import (
    Fleet,
    FleetError,
    LoadFailed,
    ModelBusy,
    ModelNotFound,
    NoCapacity,
)
from helexa.cortex.metrics import GatewayMetrics
from helexa.neuron.interface import Discovery, Health, LoadRequest, ModelState, NeuronError
from helexa.neuron.remote import RemoteNeuron
from helexa.neuron.server import make_neuron_app, start_server
from tests.support import devices
from tests.support.devices import Gpu


class BudgetNeuron:
    """One GPU of ``total_mb``; a load takes its model's size or is refused like preflight."""

    def __init__(self, name: str, total_mb: int, sizes: dict[str, int]) -> None:
        self.name = name
        self.total_mb = total_mb
        self.sizes = sizes  # what each model id takes when loaded; also what it offers
        self.loaded: dict[str, int] = {}
        self.loads: list[str] = []
        self.unloads: list[str] = []
        self.load_started = asyncio.Event()
        self.release_loads: asyncio.Event | None = None  # set: loads wait for it
        self.unload_started = asyncio.Event()
        self.release_unloads: asyncio.Event | None = None  # set: unloads wait for it

    @property
    def free_mb(self) -> int:
        return self.total_mb - sum(self.loaded.values())

    def gpu(self) -> Gpu:
        return Gpu("Budget GPU", self.total_mb, used_mb=self.total_mb - self.free_mb)

    async def discovery(self) -> Discovery:
        return devices.discovery(f"{self.name}.test", [self.gpu()])

    async def health(self) -> Health:
        return devices.health([self.gpu()])

    def _state(self, model_id: str) -> ModelState:
        if model_id in self.loaded:
            return ModelState(
                id=model_id, status="loaded", devices=[0], vram_used_mb=self.loaded[model_id]
            )
        return ModelState(id=model_id, status="unloaded")

    async def models(self) -> list[ModelState]:
        return [self._state(m) for m in self.sizes]

    async def load(self, request: LoadRequest) -> ModelState:
        model = request.model_id
        self.loads.append(model)
        self.load_started.set()
        if model not in self.sizes:
            raise NeuronError(f"{model} is not here", status=404, code="model_not_available")
        if self.release_loads is not None:
            await self.release_loads.wait()
        if model not in self.loaded and self.sizes[model] > self.free_mb:
            raise NeuronError(
                f"needs {self.sizes[model]} MiB, {self.free_mb} free",
                status=507,
                type="preflight",
                code="insufficient_vram",
                extra={"needed_mb": self.sizes[model], "free_mb": self.free_mb},
            )
        self.loaded[model] = self.sizes[model]
        return self._state(model)

    async def unload(self, model_id: str) -> None:
        self.unload_started.set()
        if self.release_unloads is not None:
            await self.release_unloads.wait()
        self.unloads.append(model_id)
        self.loaded.pop(model_id, None)

    async def _reply(self, request: dict[str, Any], obj: str) -> AsyncIterator[dict[str, Any]]:
        model = request.get("model")
        if model not in self.loaded:
            raise NeuronError(f"{model} is not loaded", status=409, code="model_not_loaded")
        delta = {"role": "assistant", "content": f"hello from {self.name}"}
        yield {
            "id": "c1",
            "object": obj,
            "created": 0,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": "stop"}],
        }
        yield {
            "id": "c1",
            "object": obj,
            "created": 0,
            "model": model,
            "choices": [],
            "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7},
        }

    def chat(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        return self._reply(request, "chat.completion.chunk")

    def complete(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        return self._reply(request, "text_completion")

    async def count_tokens(self, request: dict[str, Any]) -> int:
        return 3

    async def close(self) -> None:
        pass


class Node:
    """A BudgetNeuron behind the real neuron HTTP API; can be killed and brought back."""

    def __init__(self, neuron: BudgetNeuron) -> None:
        self.neuron = neuron
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def start(self) -> None:
        self.runner, url = await start_server(make_neuron_app(self.neuron), "127.0.0.1", self.port)
        self.port = int(url.rsplit(":", 1)[1])

    async def kill(self) -> None:
        assert self.runner is not None
        await self.runner.cleanup()
        self.runner = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


SIZES = {"small": 4000, "m1": 10000, "m2": 10000, "m3": 10000, "big": 16000}


def catalogue(**pins: list[str]) -> Catalogue:
    return Catalogue(
        [ModelProfile(id=m, vram_mb=mb, pinned_on=pins.get(m, [])) for m, mb in SIZES.items()]
    )


@pytest.fixture
async def cluster() -> AsyncIterator[Any]:
    """``make(name=total_mb, ...)`` starts one node per name and a fleet in front of them."""
    nodes: list[Node] = []
    fleets: list[Fleet] = []

    async def make(
        cat: Catalogue | None = None, metrics: GatewayMetrics | None = None, **totals: int
    ) -> tuple[Fleet, dict[str, Node]]:
        started = {}
        for name, total in totals.items():
            node = Node(BudgetNeuron(name, total, dict(SIZES)))
            await node.start()
            nodes.append(node)
            started[name] = node
        remotes = [RemoteNeuron(n, node.url, poll_timeout_s=2) for n, node in started.items()]
        fleet = Fleet(remotes, cat or catalogue(), metrics=metrics)
        fleets.append(fleet)
        await fleet.refresh()
        return fleet, started

    yield make
    for fleet in fleets:
        await fleet.close()
    for node in nodes:
        if node.runner is not None:
            await node.kill()


async def chat(lease: Any) -> str:
    """One request through the lease, as the gateway forwards it."""
    request = {"model": lease.served_id, "messages": [{"role": "user", "content": "hi"}]}
    text = ""
    async with aclosing(lease.neuron.chat(request)) as stream:
        async for chunk in stream:
            for choice in chunk["choices"]:
                text += choice["delta"].get("content") or ""
    return text


async def use(fleet: Fleet, model: str) -> str:
    async with await fleet.acquire(model) as lease:
        await chat(lease)
        return lease.node.name


# -- placement and loading ---------------------------------------------------------------------


async def test_cold_load_goes_to_the_node_with_room(cluster: Any) -> None:
    fleet, nodes = await cluster(a=12000, b=24000)
    nodes["b"].neuron.loaded["small"] = 4000  # b: 20000 free, still the roomiest
    await fleet.refresh()
    async with await fleet.acquire("big") as lease:
        assert (lease.node.name, lease.served_id, lease.canonical_id, lease.cold) == (
            "b",
            "big",
            "big",
            True,
        )
        assert await chat(lease) == "hello from b"
    assert nodes["b"].neuron.loads == ["big"] and nodes["a"].neuron.loads == []
    async with await fleet.acquire("big") as again:  # warm now: no second load
        assert (again.node.name, again.cold) == ("b", False)
    assert nodes["b"].neuron.loads == ["big"]


async def test_concurrent_requests_for_a_cold_model_load_it_once(cluster: Any) -> None:
    fleet, nodes = await cluster(a=24000)
    neuron = nodes["a"].neuron
    neuron.release_loads = asyncio.Event()
    tasks = [asyncio.create_task(fleet.acquire("m1")) for _ in range(8)]
    async with asyncio.timeout(10):  # the load is at the node; every acquire waits on it
        await neuron.load_started.wait()
    neuron.release_loads.set()
    leases = await asyncio.gather(*tasks)
    assert neuron.loads == ["m1"]
    assert all(lease.cold and lease.node.name == "a" for lease in leases)
    assert fleet.use[("a", "m1")].in_flight == 8
    for lease in leases:
        lease.release()
    assert fleet.use[("a", "m1")].in_flight == 0


async def test_two_cold_models_do_not_share_the_same_room(cluster: Any) -> None:
    # a has room for one of them, b for the other: reservations keep them apart.
    fleet, nodes = await cluster(a=12000, b=12000)
    for node in nodes.values():
        node.neuron.release_loads = asyncio.Event()
    tasks = [asyncio.create_task(fleet.acquire(m)) for m in ("m1", "m2")]
    async with asyncio.timeout(10):  # without reservations both would go to a: b never loads
        await asyncio.gather(*(n.neuron.load_started.wait() for n in nodes.values()))
    for node in nodes.values():
        node.neuron.release_loads.set()  # type: ignore[union-attr]
    leases = await asyncio.gather(*tasks)
    assert sorted(lease.node.name for lease in leases) == ["a", "b"]
    for lease in leases:
        lease.release()


async def test_eviction_under_a_vram_budget_evicts_lru(cluster: Any) -> None:
    fleet, nodes = await cluster(a=24000)
    for model in ("m1", "m2", "m1"):  # m2 is now the least recently used
        await use(fleet, model)
    assert await use(fleet, "m3") == "a"
    neuron = nodes["a"].neuron
    assert neuron.unloads == ["m2"]
    assert set(neuron.loaded) == {"m1", "m3"}


async def test_pinned_model_survives_eviction(cluster: Any) -> None:
    fleet, nodes = await cluster(cat=catalogue(m1=["a"]), a=24000)
    for model in ("m1", "m2"):  # m1 is LRU but pinned on a
        await use(fleet, model)
    await use(fleet, "m3")
    assert nodes["a"].neuron.unloads == ["m2"]
    assert "m1" in nodes["a"].neuron.loaded


async def test_a_model_in_use_is_never_evicted(cluster: Any) -> None:
    fleet, nodes = await cluster(a=24000)
    await use(fleet, "m1")
    await use(fleet, "m2")
    async with await fleet.acquire("m1") as held:  # m1 busy; m2 is the one that can go
        await use(fleet, "m3")
        assert nodes["a"].neuron.unloads == ["m2"] and held.node.name == "a"
    async with await fleet.acquire("m1"), await fleet.acquire("m3"):
        with pytest.raises(NoCapacity):  # both residents busy: no room without breaking one
            await fleet.acquire("m2")


def statuses(fleet: Fleet, node: str) -> dict[str, str]:
    return {m["id"]: m["status"] for m in fleet.snapshot()["models"] if m["node"] == node}


async def test_a_capacity_victim_is_not_leased_while_an_earlier_one_unloads(
    cluster: Any,
) -> None:
    """big needs m1 and m2 gone; while m1 unloads, m2 is already off limits (audit, issue 4)."""
    fleet, nodes = await cluster(a=24000)
    neuron = nodes["a"].neuron
    await use(fleet, "m1")
    await use(fleet, "m2")  # 4000 free: big (16000) needs both evicted
    neuron.release_unloads = asyncio.Event()
    big = asyncio.create_task(fleet.acquire("big"))
    async with asyncio.timeout(10):
        await neuron.unload_started.wait()  # m1 is unloading now
    assert statuses(fleet, "a")["m1"] == statuses(fleet, "a")["m2"] == "evicting"
    m2 = asyncio.create_task(fleet.acquire("m2"))  # must not get a lease on m2 at a
    neuron.release_unloads.set()
    async with asyncio.timeout(10):
        lease = await big
        with pytest.raises(NoCapacity):  # m2's room went to big; nothing else can go
            await m2
    assert neuron.unloads == ["m1", "m2"] and set(neuron.loaded) == {"big"}
    assert (lease.node.name, lease.canonical_id) == ("a", "big")
    lease.release()
    assert "evicting" not in statuses(fleet, "a").values()


async def test_an_idle_victim_is_not_leased_while_another_unloads(cluster: Any) -> None:
    """A request for a model the idle round is unloading waits, then loads it again."""
    fleet, nodes = await cluster(a=24000)
    neuron = nodes["a"].neuron
    await use(fleet, "m1")
    await use(fleet, "m2")
    neuron.release_unloads = asyncio.Event()
    now = fleet.use[("a", "m2")].last_used + 120
    idle = asyncio.create_task(fleet.evict_idle(60, now))
    async with asyncio.timeout(10):
        await neuron.unload_started.wait()  # m1 (least recently used) is unloading now
    assert statuses(fleet, "a")["m2"] == "evicting"
    m2 = asyncio.create_task(fleet.acquire("m2"))
    neuron.release_unloads.set()
    async with asyncio.timeout(10):
        assert await idle == [("a", "m1"), ("a", "m2")]
        lease = await m2
    assert lease.cold and neuron.loads == ["m1", "m2", "m2"]  # unloaded, then loaded again
    assert neuron.loaded == {"m2": 10000}  # not unloaded under the lease
    lease.release()


async def test_unload_refuses_a_model_in_use_whatever_the_path(cluster: Any) -> None:
    fleet, nodes = await cluster(a=24000)
    await use(fleet, "m1")
    async with await fleet.acquire("m1"):
        assert await fleet.evict_idle(60, fleet.use[("a", "m1")].last_used + 120) == []
        assert await fleet.evict("m1") == []
        with pytest.raises(ModelBusy):
            await fleet.unload("m1")
    assert nodes["a"].neuron.unloads == []


async def test_refusal_on_one_node_tries_the_next(cluster: Any) -> None:
    fleet, nodes = await cluster(a=24000, b=12000)
    nodes["a"].neuron.sizes.pop("m1")  # a does not have the files; b does
    assert await use(fleet, "m1") == "b"
    assert nodes["a"].neuron.loads == ["m1"] and nodes["b"].neuron.loads == ["m1"]


async def test_refusal_everywhere_reports_the_neurons_error(cluster: Any) -> None:
    fleet, nodes = await cluster(a=24000)
    nodes["a"].neuron.sizes["big"] = 30000  # the catalogue underestimates: preflight refuses
    with pytest.raises(LoadFailed) as err:
        await fleet.acquire("big")
    assert (err.value.status, err.value.code, err.value.type) == (
        507,
        "insufficient_vram",
        "preflight",
    )
    assert err.value.extra == {"needed_mb": 30000, "free_mb": 24000}


async def test_unknown_model_is_not_found(cluster: Any) -> None:
    fleet, _ = await cluster(a=24000)
    with pytest.raises(ModelNotFound) as err:
        await fleet.acquire("no/such-model")
    assert err.value.status == 404


async def test_aliases_and_qualified_ids_reach_the_neuron_as_it_knows_them(cluster: Any) -> None:
    cat = Catalogue(
        [
            ModelProfile(id="org/m", source="mirror", aliases=["nick"], vram_mb=1000),
            *catalogue(),
        ]
    )
    fleet, nodes = await cluster(cat=cat, a=24000)
    nodes["a"].neuron.sizes["mirror:org/m"] = 1000
    await fleet.refresh()
    async with await fleet.acquire("nick") as lease:
        assert (lease.canonical_id, lease.served_id) == ("org/m", "mirror:org/m")
        assert await chat(lease) == "hello from a"
    assert nodes["a"].neuron.loads == ["mirror:org/m"]
    assert "org/m" in fleet.known_models() and "mirror:org/m" not in fleet.known_models()


# -- nodes going away and coming back ----------------------------------------------------------


async def test_dead_node_is_marked_down_and_requests_reroute(cluster: Any) -> None:
    fleet, nodes = await cluster(a=24000, b=20000)
    assert await use(fleet, "m1") == "a"
    await nodes["a"].kill()
    with pytest.raises(NeuronError):  # the gateway learns it from the failed request...
        async with await fleet.acquire("m1") as lease:
            await chat(lease)
    assert not fleet.nodes["a"].up and "unreachable" in (fleet.nodes["a"].error or "")
    async with await fleet.acquire("m1") as lease:  # ...and the next one goes to b
        assert (lease.node.name, lease.cold) == ("b", True)
        assert await chat(lease) == "hello from b"


async def test_poller_marks_a_dead_node_down_and_it_rejoins(cluster: Any) -> None:
    fleet, nodes = await cluster(a=24000, b=24000)
    poller = Poller(fleet, interval_s=60, timeout_s=2)
    await nodes["a"].kill()
    await poller.poll_once()
    assert not fleet.nodes["a"].up and fleet.nodes["b"].up
    assert await use(fleet, "small") == "b"
    assert all(node.name == "b" for node, _ in fleet.known_models()["small"])
    await nodes["a"].start()  # same port
    await poller.poll_once()
    assert fleet.nodes["a"].up and fleet.nodes["a"].error is None
    assert {node.name for node, _ in fleet.known_models()["small"]} == {"a", "b"}
    assert await use(fleet, "big") == "a"  # a is back and the roomiest


async def test_a_down_nodes_models_do_not_show_as_loaded(cluster: Any) -> None:
    fleet, nodes = await cluster(a=24000)
    await use(fleet, "m1")
    await nodes["a"].kill()
    await fleet.refresh()
    assert statuses(fleet, "a")["m1"] == "down"  # what it said last is not servable now
    assert statuses(fleet, "a")["m2"] == "unloaded"


async def test_poller_task_starts_and_stops(cluster: Any) -> None:
    fleet, nodes = await cluster(a=24000)
    nodes["a"].neuron.loaded["m1"] = 10000  # loaded behind the gateway's back
    poller = Poller(fleet, interval_s=60)
    poller.start()
    async with asyncio.timeout(10):
        await poller.polled.wait()  # the first round runs at once
    await poller.stop()
    assert fleet.nodes["a"].models["m1"].status == "loaded"
    assert poller.polled.is_set()


# -- idle eviction and admin operations --------------------------------------------------------


async def test_evictor_unloads_idle_models_but_not_pinned_ones(cluster: Any) -> None:
    fleet, nodes = await cluster(cat=catalogue(small=["a"]), a=24000)
    for model in ("small", "m1"):
        await use(fleet, model)
    settings = Settings.model_validate({"eviction": {"idle_ttl_s": 60}})
    evictor = Evictor(fleet, settings)
    now = fleet.use[("a", "m1")].last_used
    assert await evictor.run_once(now + 30) == []  # not idle long enough
    assert await evictor.run_once(now + 61) == [("a", "m1")]
    assert nodes["a"].neuron.unloads == ["m1"] and "small" in nodes["a"].neuron.loaded


async def test_admin_load_unload_pin_evict(cluster: Any) -> None:
    fleet, nodes = await cluster(a=24000, b=24000)
    assert await fleet.load("m1", "b") == "b"
    assert nodes["b"].neuron.loaded == {"m1": 10000}
    with pytest.raises(FleetError) as err:
        await fleet.load("m1", "nowhere")
    assert err.value.status == 404

    fleet.pin("m1", "b")
    row = next(m for m in fleet.snapshot()["models"] if m["id"] == "m1" and m["node"] == "b")
    assert row["pinned"] and row["status"] == "loaded"
    fleet.unpin("m1", "b")

    async with await fleet.acquire("m1"):
        with pytest.raises(FleetError) as busy:
            await fleet.unload("m1", "b")
        assert (busy.value.status, busy.value.code) == (409, "model_busy")
    assert await fleet.unload("m1") == ["b"]
    assert nodes["b"].neuron.loaded == {}
    with pytest.raises(ModelNotFound):
        await fleet.unload("m1")

    await fleet.load("small", "a")
    await fleet.load("small", "b")
    assert sorted(await fleet.evict("small")) == ["a", "b"]


async def test_snapshot_is_json_and_reads_as_the_dashboard_expects(cluster: Any) -> None:
    from tui.fleetview import fleet_view

    fleet, nodes = await cluster(a=24000, b=12000)
    await use(fleet, "m1")
    await nodes["b"].kill()
    await fleet.refresh()
    snapshot = json.loads(json.dumps(fleet.snapshot()))
    view = fleet_view(snapshot)
    a, b = view.nodes
    assert (a.name, a.up, a.hostname, b.name, b.up) == ("a", True, "a.test", "b", False)
    assert a.devices[0].vram_total_mb == 24000 and a.devices[0].vram_used_mb == 10000
    m1 = view.row("a/m1")
    assert m1 is not None and (m1.status, m1.vram_mb, m1.in_flight) == ("loaded", 10000, 0)
    assert m1.idle_s is not None and m1.idle_s >= 0


# -- metrics from fleet events -----------------------------------------------------------------


async def test_fleet_records_loads_cold_starts_and_evictions(cluster: Any) -> None:
    metrics = GatewayMetrics()
    fleet, _ = await cluster(metrics=metrics, a=24000)
    for model in ("m1", "m2", "m3"):
        await use(fleet, model)

    def value(name: str, **labels: str) -> float:
        return metrics.registry.get_sample_value(name, labels) or 0.0

    assert value("helexa_model_loads_total", model="m3", node="a", result="ok") == 1
    assert value("helexa_cold_starts_total", model="m2", node="a") == 1
    assert value("helexa_evictions_total", model="m1", node="a", reason="capacity") == 1
    assert value("helexa_model_load_duration_seconds_count", model="m1", node="a") == 1
