"""Fleet state: every node the gateway knows, what it reported last, and the leases that
route requests to models on it.

This is the single source of truth for the gateway's handlers, the poller, the evictor,
``/v1/models``, ``helexa status`` and the TUI. Handlers only ever call
:meth:`Fleet.acquire` and use the returned :class:`Lease`; where and whether to load is
decided behind it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field

from helexa.neuron.interface import (
    Discovery,
    Health,
    LoadRequest,
    ModelState,
    Neuron,
    NeuronError,
)


class FleetError(Exception):
    """A routing failure with the HTTP status and machine code the gateway reports."""

    status = 503
    code = "fleet_error"
    type = "api_error"


class ModelNotFound(FleetError):
    status = 404
    code = "model_not_found"
    type = "not_found_error"


class NoCapacity(FleetError):
    status = 503
    code = "no_capacity"
    type = "overloaded_error"


@dataclass
class NodeState:
    """What the gateway last heard from one neuron."""

    name: str
    neuron: Neuron
    up: bool = False
    discovery: Discovery | None = None
    health: Health | None = None
    models: dict[str, ModelState] = field(default_factory=dict)
    last_seen: float = 0.0
    error: str | None = None


@dataclass
class ModelUse:
    """Gateway-side bookkeeping for one model on one node (LRU, in-flight)."""

    in_flight: int = 0
    last_used: float = 0.0
    requests: int = 0


@dataclass
class Lease:
    """A routed request's hold on a model: in-flight while held, so it is never evicted."""

    node: NodeState
    model_id: str
    cold: bool
    _fleet: Fleet
    _released: bool = False

    @property
    def neuron(self) -> Neuron:
        return self.node.neuron

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._fleet._release(self)

    async def __aenter__(self) -> Lease:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release()


class Fleet:
    def __init__(self, nodes: list[Neuron]) -> None:
        self.nodes: dict[str, NodeState] = {n.name: NodeState(n.name, n) for n in nodes}
        self.use: dict[tuple[str, str], ModelUse] = {}
        self._loading: dict[str, asyncio.Task[tuple[NodeState, bool]]] = {}

    # -- polling ---------------------------------------------------------------------
    async def refresh_node(self, node: NodeState) -> None:
        try:
            if node.discovery is None or not node.up:
                node.discovery = await node.neuron.discovery()
            node.health = await node.neuron.health()
            node.models = {m.id: m for m in await node.neuron.models()}
        except Exception as exc:  # any failure means the node is unusable right now
            node.up = False
            node.error = str(exc) or type(exc).__name__
            return
        node.up, node.error, node.last_seen = True, None, time.monotonic()

    async def refresh(self) -> None:
        await asyncio.gather(*(self.refresh_node(n) for n in self.nodes.values()))

    # -- routing ---------------------------------------------------------------------
    def known_models(self) -> dict[str, list[tuple[NodeState, ModelState]]]:
        out: dict[str, list[tuple[NodeState, ModelState]]] = {}
        for node in self.nodes.values():
            if not node.up:
                continue
            for state in node.models.values():
                out.setdefault(state.id, []).append((node, state))
        return out

    def resolve(self, model: str) -> str:
        if model in self.known_models():
            return model
        raise ModelNotFound(f"model {model!r} is not served by any node")

    async def acquire(self, model: str) -> Lease:
        """Route to a node with ``model`` loaded, loading it (once) when it is cold."""
        model_id = self.resolve(model)
        loaded = [n for n, s in self.known_models()[model_id] if s.status == "loaded"]
        if loaded:
            node = min(loaded, key=lambda n: self._usage(n.name, model_id).in_flight)
            return self._lease(node, model_id, cold=False)
        task = self._loading.get(model_id)
        if task is None:
            task = asyncio.ensure_future(self._load(model_id))
            self._loading[model_id] = task
            task.add_done_callback(lambda _t: self._loading.pop(model_id, None))
        node, _ = await asyncio.shield(task)
        return self._lease(node, model_id, cold=True)

    async def _load(self, model_id: str) -> tuple[NodeState, bool]:
        candidates = [n for n, _ in self.known_models().get(model_id, [])]
        if not candidates:
            raise ModelNotFound(f"model {model_id!r} is not served by any node")
        last: Exception | None = None
        for node in candidates:
            try:
                state = await node.neuron.load(LoadRequest(model_id=model_id))
            except NeuronError as exc:
                last = exc
                continue
            node.models[model_id] = state
            return node, True
        raise NoCapacity(f"no node could load {model_id!r}: {last}")

    def _usage(self, node: str, model_id: str) -> ModelUse:
        return self.use.setdefault((node, model_id), ModelUse())

    def _lease(self, node: NodeState, model_id: str, *, cold: bool) -> Lease:
        use = self._usage(node.name, model_id)
        use.in_flight += 1
        use.requests += 1
        use.last_used = time.monotonic()
        return Lease(node, model_id, cold, self)

    def _release(self, lease: Lease) -> None:
        use = self._usage(lease.node.name, lease.model_id)
        use.in_flight = max(0, use.in_flight - 1)
        use.last_used = time.monotonic()

    async def close(self) -> None:
        for task in list(self._loading.values()):
            task.cancel()
        for node in self.nodes.values():
            with contextlib.suppress(Exception):
                await node.neuron.close()

    # -- admin operations (added by the gateway for /admin/*, `helexa status`, the TUI) --
    async def load(self, model: str, node: str | None = None) -> ModelState:
        """Load ``model`` now, on ``node`` if named, else on the first node serving it."""
        model_id = self.resolve(model)
        nodes = [n for n, _ in self.known_models()[model_id] if node in (None, n.name)]
        if not nodes:
            raise ModelNotFound(f"model {model_id!r} is not served by node {node!r}")
        state = await nodes[0].neuron.load(LoadRequest(model_id=model_id))
        nodes[0].models[model_id] = state
        return state

    async def unload(self, model: str, node: str | None = None) -> list[str]:
        """Unload ``model`` wherever it is loaded (or only on ``node``); the nodes it left."""
        model_id = self.resolve(model)
        left: list[str] = []
        for n, state in self.known_models()[model_id]:
            if node in (None, n.name) and state.status in ("loaded", "loading"):
                await n.neuron.unload(model_id)
                n.models[model_id] = ModelState(id=model_id, status="unloaded")
                left.append(n.name)
        return left

    def snapshot(self) -> dict[str, object]:
        """The fleet table as JSON-ready data: nodes with their devices, models per node."""
        now = time.monotonic()
        nodes: list[dict[str, object]] = []
        models: list[dict[str, object]] = []
        for node in self.nodes.values():
            readings = {d.index: d for d in (node.health.devices if node.health else [])}
            devices = []
            for d in node.discovery.devices if node.discovery else []:
                health = readings.get(d.index)
                devices.append({**d.model_dump(), **(health.model_dump() if health else {})})
            hostname = node.discovery.hostname if node.discovery else ""
            nodes.append(
                {
                    "name": node.name,
                    "up": node.up,
                    "hostname": hostname,
                    "error": node.error,
                    "devices": devices,
                }
            )
            for state in node.models.values():
                use = self.use.get((node.name, state.id))
                idle = now - use.last_used if use and use.last_used else None
                in_flight = use.in_flight if use else 0
                models.append(
                    state.model_dump() | {"node": node.name, "in_flight": in_flight, "idle_s": idle}
                )
        return {"nodes": nodes, "models": models}
