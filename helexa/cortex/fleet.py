"""Fleet state: every node the gateway knows, what it reported last, and the leases that
route requests to models on it.

This is the single source of truth for the gateway's handlers, the poller, the evictor,
``/v1/models``, ``helexa status`` and the TUI. Handlers only ever call
:meth:`Fleet.acquire` and use the returned :class:`Lease`; where and whether to load is
decided behind it: :func:`helexa.cortex.placement.place` picks the node (and what to evict
there), and the fleet carries that out, loading each cold model once however many
requests are waiting for it.

Names: the catalogue's canonical id is the model's name everywhere in the gateway
(``ModelUse`` keys, metrics labels, ``known_models``); a neuron may know the model by
another (the source-qualified id for a catalogue model with a ``source``), and that is
what the forwarded request must name. A :class:`Lease` carries both.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiohttp

from helexa.config import Settings
from helexa.cortex.catalogue import Catalogue
from helexa.cortex.placement import (
    DeviceView,
    ModelView,
    NodeView,
    Placement,
    Strategy,
    candidates,
    idle_victims,
    place,
)
from helexa.errors import ApiError
from helexa.neuron.interface import (
    Discovery,
    Health,
    LoadRequest,
    ModelState,
    Neuron,
    NeuronError,
)

log = logging.getLogger(__name__)

# NeuronError codes that mean "the node did not answer" (or stopped answering mid-stream),
# not "the node refused": evidence the node is down until the poller hears from it again.
UNREACHABLE_CODES = frozenset({"neuron_unreachable", "stream_interrupted"})


class FleetError(ApiError):
    """A routing failure with the HTTP status and machine code the gateway reports.

    ``extra`` carries structured fields from a neuron's refusal (a preflight error's
    ``needed_mb``/``free_mb``) for the error body.
    """

    status = 503
    code = "fleet_error"
    type = "api_error"


class ModelNotFound(FleetError):
    status = 404
    code = "model_not_found"
    type = "invalid_request_error"  # as OpenAI types it; Anthropic types by status


class NoCapacity(FleetError):
    status = 503
    code = "no_capacity"
    type = "overloaded_error"


class ModelBusy(FleetError):
    """An unload refused because the model is serving requests (never unloaded under one)."""

    status = 409
    code = "model_busy"
    type = "invalid_request_error"


class LoadFailed(FleetError):
    """Every node that could take the model refused it; carries the last refusal as is."""

    @classmethod
    def from_neuron(cls, model: str, node: str, exc: NeuronError) -> LoadFailed:
        return cls(
            f"loading {model!r} on {node!r} failed: {exc.message}",
            status=exc.status,
            code=exc.code or "load_failed",
            type=exc.type,
            extra=exc.extra,
        )


def is_unreachable(exc: BaseException) -> bool:
    """Whether a neuron call failed because the node is gone rather than because it refused."""
    if isinstance(exc, NeuronError):
        return exc.code in UNREACHABLE_CODES
    return isinstance(exc, OSError | TimeoutError | aiohttp.ClientConnectionError)


class FleetEvents(Protocol):
    """What the fleet reports as it happens (loads, cold starts, evictions); the gateway's
    metrics implement it, so the fleet records them without depending on Prometheus."""

    def cold_start(self, model: str, node: str) -> None: ...

    def model_load(
        self, model: str, node: str, result: str, seconds: float | None = None
    ) -> None: ...

    def eviction(self, model: str, node: str, reason: str) -> None: ...


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

    def vram_totals(self) -> dict[int, int]:
        """Each device's memory in total: as discovery reported it, or, for a device only
        health knows, its used plus free (placement and the metrics must agree on this)."""
        totals = (
            {d.index: d.vram_total_mb for d in self.discovery.devices} if self.discovery else {}
        )
        for d in self.health.devices if self.health else ():
            totals.setdefault(d.index, d.vram_used_mb + d.vram_free_mb)
        return totals


@dataclass
class ModelUse:
    """Gateway-side bookkeeping for one model on one node (LRU, in-flight)."""

    in_flight: int = 0
    last_used: float = 0.0
    requests: int = 0


@dataclass(eq=False)  # a hold is itself, not its fields: the fleet keeps a set of them
class Lease:
    """A routed request's hold on a model: in-flight while held, so it is never evicted.

    Leaving ``async with lease:`` by an unreachable-node error marks the node down, so
    the next request reroutes without waiting for the poller. Its holder may set
    ``on_down``: called (with the error to end on) when the node fails a poll while the
    lease is held, so a request waiting on a frozen node does not wait for ever.
    """

    node: NodeState
    canonical_id: str  # the catalogue's id: usage keys, metrics labels, logs, /v1/models
    served_id: str  # the id the serving neuron knows it by: the forwarded request names it
    cold: bool
    _fleet: Fleet
    _released: bool = False
    on_down: Callable[[NeuronError], None] | None = None

    @property
    def neuron(self) -> Neuron:
        return self.node.neuron

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._fleet._release(self)

    async def __aenter__(self) -> Lease:
        return self

    async def __aexit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        if exc is not None:
            self.failed(exc)
        self.release()

    def failed(self, exc: BaseException) -> bool:
        """Report a failure of the request (one the caller handled itself, such as a stream
        broken after its headers went out): marks the node down when it says the node is
        gone. Returns whether it did."""
        return self._fleet.node_failed(self.node, exc)


@dataclass
class _Load:
    """One cold load in progress and how many acquirers wait on it."""

    task: asyncio.Task[NodeState] | None = None
    waiters: int = 0


@dataclass(frozen=True)
class _Reservation:
    model: str
    devices: tuple[int, ...]
    vram_mb: int


def _shown_status(node: NodeState, status: str) -> str:
    """A model's status as the fleet table shows it: on a down node, what it last said is
    loaded cannot be served, so it reads ``down`` (unloaded and failed stay as they are)."""
    if not node.up and status in ("loaded", "loading", "evicting"):
        return "down"
    return status


class Fleet:
    def __init__(
        self,
        nodes: list[Neuron],
        catalogue: Catalogue | None = None,
        *,
        strategy: Strategy = "lru",
        metrics: FleetEvents | None = None,
    ) -> None:
        self.nodes: dict[str, NodeState] = {n.name: NodeState(n.name, n) for n in nodes}
        self.catalogue = catalogue if catalogue is not None else Catalogue([])
        self.strategy: Strategy = strategy
        self.metrics = metrics
        self.use: dict[tuple[str, str], ModelUse] = {}
        self._held: set[Lease] = set()  # leases not yet released
        self._loads: dict[str, _Load] = {}
        # Memory promised to loads in flight, so two cold loads never count the same room.
        self._reserved: dict[str, list[_Reservation]] = {}
        # Waiters of a finished load not yet holding their lease: in-flight for eviction.
        self._arriving: dict[tuple[str, str], int] = {}
        # (node, model) being unloaded, or chosen to be: shown as "evicting", never routed
        # to; the event is set when that unload is over (done, failed or called off).
        self._evicting: dict[tuple[str, str], asyncio.Event] = {}

    @classmethod
    def from_settings(
        cls, nodes: list[Neuron], settings: Settings, metrics: FleetEvents | None = None
    ) -> Fleet:
        return cls(
            nodes,
            Catalogue.from_settings(settings),
            strategy=settings.eviction.strategy,
            metrics=metrics,
        )

    # -- polling ---------------------------------------------------------------------

    async def refresh_node(self, node: NodeState, timeout_s: float | None = None) -> None:
        """Poll one node; any failure marks it down, an answer brings it (back) up."""
        try:
            async with asyncio.timeout(timeout_s):
                if node.discovery is None or not node.up:
                    node.discovery = await node.neuron.discovery()
                node.health = await node.neuron.health()
                models = await node.neuron.models()
        except Exception as exc:  # any failure means the node is unusable right now
            self.mark_down(node, exc)
            self._end_waiting_on(node)
            return
        node.models = {m.id: m for m in models}
        if not node.up:
            log.info("node %s is up", node.name)
        node.up, node.error, node.last_seen = True, None, time.monotonic()
        for state in models:  # idle time of a model loaded elsewhere starts when we see it
            if state.status == "loaded":
                use = self._usage(node.name, self.catalogue.canonical(state.id))
                use.last_used = use.last_used or node.last_seen

    async def refresh(self, timeout_s: float | None = None) -> None:
        await asyncio.gather(*(self.refresh_node(n, timeout_s) for n in list(self.nodes.values())))

    def mark_down(self, node: NodeState, exc: BaseException | str) -> None:
        reason = exc if isinstance(exc, str) else str(exc) or type(exc).__name__
        if node.up:
            log.warning("node %s is down: %s", node.name, reason)
        node.up, node.error = False, reason

    def _end_waiting_on(self, node: NodeState) -> None:
        """End every request waiting on ``node``, which failed a poll: a node that does not
        answer a health check will not finish the answers it owes either (a frozen host
        keeps its connections open and silent). Only a poll decides this: one request's
        failure (a queue wait that timed out) marks the node down but ends no other."""
        for lease in [held for held in self._held if held.node is node]:
            if lease.on_down is not None:
                lease.on_down(
                    NeuronError(
                        f"node {node.name!r} went down while answering: {node.error}",
                        status=502,
                        type="upstream_error",
                        code="stream_interrupted",
                    )
                )

    async def attach(self, neuron: Neuron) -> NodeState:
        """Add a node to the running fleet, once it has answered a poll.

        One that does not answer (or whose name is taken) is closed and refused, so a
        mistyped address never leaves a dead node in the table.
        """
        if neuron.name in self.nodes:
            await neuron.close()
            raise ValueError(f"a node named {neuron.name!r} is already in the fleet")
        node = NodeState(neuron.name, neuron)
        await self.refresh_node(node)
        if not node.up:
            await neuron.close()
            raise ConnectionError(node.error or "it did not answer")
        self.nodes[neuron.name] = node
        return node

    def node_failed(self, node: NodeState, exc: BaseException) -> bool:
        """Mark ``node`` down when ``exc`` says it is unreachable; returns whether it did."""
        if is_unreachable(exc):
            self.mark_down(node, exc)
            return True
        return False

    # -- views -----------------------------------------------------------------------

    def view(self, node: NodeState) -> NodeView:
        """The frozen picture placement and eviction reason about."""
        totals = node.vram_totals()
        free = {d.index: d.vram_free_mb for d in node.health.devices} if node.health else {}
        reserved = self._reserved.get(node.name, [])
        for r in reserved:
            for index in r.devices or tuple(free)[:1]:
                if index in free:
                    free[index] -= r.vram_mb // max(1, len(r.devices))
        devices = tuple(DeviceView(i, totals[i], max(0, free.get(i, 0))) for i in sorted(totals))
        models: dict[str, ModelView] = {}
        for state in node.models.values():
            model = self.catalogue.canonical(state.id)
            use = self.use.get((node.name, model), ModelUse())
            vram = state.vram_used_mb or (
                self.catalogue.requirements(model).vram_mb if state.status == "loaded" else 0
            )
            status = state.status
            if status == "loaded" and (node.name, model) in self._evicting:
                status = "evicting"  # placement neither routes to it nor picks it again
            models[model] = ModelView(
                model,
                status,
                tuple(state.devices),
                vram,
                self.busy(node.name, model),
                use.last_used,
                tuple(state.device_vram_mb),
            )
        for r in reserved:
            models[r.model] = ModelView(r.model, "loading", r.devices, r.vram_mb)
        return NodeView(node.name, node.up, devices, tuple(models.values()))

    def views(self) -> list[NodeView]:
        return [self.view(n) for n in self.nodes.values()]

    # -- routing ---------------------------------------------------------------------

    def known_models(self) -> dict[str, list[tuple[NodeState, ModelState]]]:
        """Every model an up node lists or could load (catalogue models it can hold),
        by canonical id, with the state each node reports (``unloaded`` if unlisted)."""
        out: dict[str, list[tuple[NodeState, ModelState]]] = {}
        for node in self.nodes.values():
            if not node.up:
                continue
            for state in node.models.values():
                out.setdefault(self.catalogue.canonical(state.id), []).append((node, state))
        views = self.views()
        for profile in self.catalogue:
            if profile.id in out:
                continue
            for view in candidates(profile.id, views, self.catalogue):
                state = ModelState(id=self.catalogue.qualified_id(profile.id), status="unloaded")
                out.setdefault(profile.id, []).append((self.nodes[view.name], state))
        return out

    def known_id(self, model: str) -> str | None:
        """The canonical id ``model`` names when the catalogue has it or some node (up or
        down) lists it; None for a name nothing here serves."""
        canonical = self.catalogue.canonical(model)
        if canonical in self.catalogue:
            return canonical
        for node in self.nodes.values():
            if any(self.catalogue.canonical(s.id) == canonical for s in node.models.values()):
                return canonical
        return None

    def largest_context(self) -> int | None:
        """The longest context any model here is served with (a loaded copy's, on any
        node, or the catalogue's), in tokens; None while none is known."""
        lengths = [p.context_length for p in self.catalogue if p.context_length]
        lengths += [
            s.context_length
            for n in self.nodes.values()
            for s in n.models.values()
            if s.context_length
        ]
        return max(lengths, default=None)

    def resolve(self, model: str) -> str:
        """The canonical id for a client's model name (id, alias or qualified id)."""
        canonical = self.catalogue.canonical(model)
        if canonical in self.catalogue or canonical in self.known_models():
            return canonical
        why = self._no_node_up()
        raise ModelNotFound(
            f"model {model!r} is not served by any node{f' ({why})' if why else ''}"
        )

    def _no_node_up(self) -> str | None:
        """Why no node can serve anything, when that is so: there are none, or all are down."""
        if not self.nodes:
            return (
                "the gateway has no nodes: configure [[neurons]] in helexa.toml or enable "
                "the local node"
            )
        if any(n.up for n in self.nodes.values()):
            return None
        reasons = "; ".join(f"{n.name}: {n.error or 'not polled yet'}" for n in self.nodes.values())
        return f"every node is down ({reasons})"

    def _nowhere(self, model_id: str) -> str:
        """Why ``model_id`` could not be placed anywhere."""
        why = self._no_node_up()
        if why is not None:
            return f"cannot serve {model_id!r}: {why}"
        return f"no up node has room for {model_id!r}, even after eviction"

    async def acquire(self, model: str) -> Lease:
        """Route to a node with ``model`` loaded, loading it (once) when it is cold."""
        model_id = self.resolve(model)
        placement = place(model_id, self.views(), self.catalogue, self.strategy)
        if placement is not None and placement.loaded:
            return self._lease(self.nodes[placement.node], model_id, cold=False)
        node = await self._ensure_loaded(model_id)
        if self.metrics is not None:
            self.metrics.cold_start(model_id, node.name)
        return self._lease(node, model_id, cold=True)

    async def _ensure_loaded(self, model_id: str) -> NodeState:
        """Join the load of ``model_id`` in progress, or start it: one load per model."""
        load = self._loads.get(model_id)
        if load is None:
            load = self._loads[model_id] = _Load()
            load.task = asyncio.create_task(self._load(model_id, load))
        task = load.task
        assert task is not None
        load.waiters += 1
        try:
            node = await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.done() and not task.cancelled() and task.exception() is None:
                self._arrived(task.result().name, model_id)  # it counted us: uncount
            else:
                load.waiters -= 1
            raise
        self._arrived(node.name, model_id)  # the caller leases before anything else runs
        return node

    async def _load(self, model_id: str, load: _Load) -> NodeState:
        """Place, evict, load; on an unreachable or refusing node, the next placement."""
        try:
            node = await self._place_and_load(model_id)
        finally:
            self._loads.pop(model_id, None)
        # Synchronously with completion: the waiters are in flight before anyone can evict.
        key = (node.name, model_id)
        self._arriving[key] = self._arriving.get(key, 0) + load.waiters
        return node

    async def _place_and_load(self, model_id: str) -> NodeState:
        exclude: set[str] = set()
        refused: tuple[str, NeuronError] | None = None
        while True:
            placement = place(model_id, self.views(), self.catalogue, self.strategy, exclude)
            if placement is None:
                if await self._wait_for_eviction(model_id):
                    continue  # it is unloaded now: its room may be free to load it again
                break
            node = self.nodes[placement.node]
            if placement.loaded:  # a poll saw it loaded meanwhile
                return node
            try:
                await self._load_on(node, model_id, placement)
            except ModelBusy:  # a victim took a request after all: plan again around it
                await self.refresh_node(node)
                continue
            except NeuronError as exc:
                if not self.node_failed(node, exc):
                    refused = (node.name, exc)
                exclude.add(node.name)
                continue
            except Exception as exc:
                if not self.node_failed(node, exc):
                    raise
                exclude.add(node.name)
                continue
            return node
        if refused is not None:
            raise LoadFailed.from_neuron(model_id, refused[0], refused[1])
        raise NoCapacity(self._nowhere(model_id))

    async def _wait_for_eviction(self, model_id: str) -> bool:
        """Wait for an unload of ``model_id`` in progress anywhere; whether there was one.

        A request for a model being evicted cannot use it, but once it is gone its room may
        take it again (an idle unload), so the request waits rather than failing at once.
        """
        pending = [(n, event) for (n, m), event in self._evicting.items() if m == model_id]
        if not pending:
            return False
        name, event = pending[0]
        await event.wait()
        await self.refresh_node(self.nodes[name])  # the memory it freed, for placement
        return True

    async def _load_on(self, node: NodeState, model_id: str, placement: Placement) -> None:
        need = self.catalogue.requirements(model_id)
        reservation = _Reservation(model_id, placement.devices, need.vram_mb)
        self._reserved.setdefault(node.name, []).append(reservation)
        # Before the first await: no request may lease a victim while an earlier one unloads.
        held = self._hold_for_eviction(node.name, placement.evict)
        try:
            for victim in placement.evict:
                await self._unload_on(node, victim, reason="capacity")
            if placement.loading:  # the neuron single-flights: this waits for its load
                log.info("joining load of %s on %s", model_id, node.name)
            state = await self._timed_load(node, model_id, placement)
            node.models[state.id] = state
            self._usage(node.name, model_id).last_used = time.monotonic()
            await self.refresh_node(node)  # fresh free memory before the reservation goes
        finally:
            self._end_eviction(node.name, held)
            self._reserved[node.name].remove(reservation)

    async def _timed_load(self, node: NodeState, model_id: str, placement: Placement) -> ModelState:
        profile = self.catalogue.profile(model_id)
        request = LoadRequest(
            model_id=self.catalogue.qualified_id(model_id),
            quant=profile.quant if profile else None,
            # Evictions made room on particular devices: load there, not where preflight likes.
            devices=list(placement.devices) if placement.evict else None,
            context_length=profile.context_length if profile else None,
        )
        log.info("loading %s on node %s", model_id, node.name)
        started = time.monotonic()
        try:
            state = await node.neuron.load(request)
        except Exception as exc:
            # extra: what a listener (the dashboard's events) keeps about the failure
            failure = {"model": model_id, "node": node.name, "failure": str(exc)}
            log.warning("loading %s on %s failed: %s", model_id, node.name, exc, extra=failure)
            if self.metrics is not None:
                self.metrics.model_load(model_id, node.name, "failed")
            raise
        seconds = time.monotonic() - started
        loaded = {"model": model_id, "node": node.name, "loaded": True}
        log.info("loaded %s on %s in %.1f s", model_id, node.name, seconds, extra=loaded)
        if self.metrics is not None:
            self.metrics.model_load(model_id, node.name, "ok", seconds)
        return state

    def busy(self, node: str, model_id: str) -> int:
        """Requests using ``model_id`` on ``node``, leased or about to be (load waiters)."""
        key = (node, model_id)
        return self.use.get(key, ModelUse()).in_flight + self._arriving.get(key, 0)

    def evicting(self, node: str, model_id: str) -> bool:
        """Whether ``model_id`` on ``node`` is being (or about to be) unloaded."""
        return (node, model_id) in self._evicting

    def _hold_for_eviction(self, node: str, models: Iterable[str]) -> list[str]:
        """Mark ``models`` evicting now, before any await, so that while the first of them
        unloads no request leases the next; returns the ones this call marked."""
        held = [m for m in dict.fromkeys(models) if (node, m) not in self._evicting]
        for model_id in held:
            self._evicting[(node, model_id)] = asyncio.Event()
        return held

    def _end_eviction(self, node: str, models: Iterable[str]) -> None:
        """Unmark ``models`` (unloaded, failed or spared) and wake requests waiting on them."""
        for model_id in models:
            event = self._evicting.pop((node, model_id), None)
            if event is not None:
                event.set()

    async def _unload_on(self, node: NodeState, model_id: str, *, reason: str | None) -> None:
        """Unload a canonical id from ``node``; ``reason`` records an eviction.

        The one place models are unloaded, so the rule lives here: a model with a request
        in flight is never unloaded (:class:`ModelBusy`), and one being unloaded is marked
        evicting for the duration, so nothing is routed to it meanwhile.
        """
        states = [s for s in node.models.values() if self.catalogue.canonical(s.id) == model_id]
        if not states:
            self._end_eviction(node.name, [model_id])
            return
        busy = self.busy(node.name, model_id)
        if busy:
            self._end_eviction(node.name, [model_id])
            raise ModelBusy(f"{model_id!r} on {node.name!r} is serving {busy} request(s)")
        self._hold_for_eviction(node.name, [model_id])
        try:
            for state in states:
                await node.neuron.unload(state.id)
        except Exception as exc:
            self.node_failed(node, exc)
            raise
        finally:
            self._end_eviction(node.name, [model_id])
        for state in states:
            node.models[state.id] = state.model_copy(
                update={"status": "unloaded", "devices": [], "vram_used_mb": 0}
            )
        log.info("unloaded %s from %s (%s)", model_id, node.name, reason or "admin")
        if reason is not None and self.metrics is not None:
            self.metrics.eviction(model_id, node.name, reason)

    def _usage(self, node: str, model_id: str) -> ModelUse:
        return self.use.setdefault((node, model_id), ModelUse())

    def _arrived(self, node: str, model_id: str) -> None:
        key = (node, model_id)
        left = self._arriving.get(key, 0) - 1
        if left > 0:
            self._arriving[key] = left
        else:
            self._arriving.pop(key, None)

    def _lease(self, node: NodeState, model_id: str, *, cold: bool) -> Lease:
        use = self._usage(node.name, model_id)
        use.in_flight += 1
        use.requests += 1
        use.last_used = time.monotonic()
        served = next(
            (s.id for s in node.models.values() if self.catalogue.canonical(s.id) == model_id),
            self.catalogue.qualified_id(model_id),
        )
        lease = Lease(node, canonical_id=model_id, served_id=served, cold=cold, _fleet=self)
        self._held.add(lease)
        return lease

    def _release(self, lease: Lease) -> None:
        self._held.discard(lease)
        use = self._usage(lease.node.name, lease.canonical_id)
        use.in_flight = max(0, use.in_flight - 1)
        use.last_used = time.monotonic()

    # -- admin -----------------------------------------------------------------------

    def _node(self, name: str) -> NodeState:
        if name not in self.nodes:
            raise FleetError(f"no node named {name!r}", status=404, code="node_not_found")
        return self.nodes[name]

    async def load(self, model: str, node: str | None = None) -> str:
        """Load ``model`` (on ``node``, or wherever placement says); returns the node name."""
        model_id = self.resolve(model)
        if node is None:
            return (await self._ensure_loaded(model_id)).name
        target = self._node(node)
        if not target.up:
            raise NoCapacity(f"node {node!r} is down: {target.error}")
        view = self.view(target)
        placement = place(model_id, [view], self.catalogue, self.strategy)
        if placement is None:
            raise NoCapacity(f"{model_id!r} does not fit on {node!r}, even after eviction")
        if not placement.loaded:
            try:
                await self._load_on(target, model_id, placement)
            except NeuronError as exc:
                if self.node_failed(target, exc):
                    raise NoCapacity(f"node {node!r} is unreachable: {exc.message}") from exc
                raise LoadFailed.from_neuron(model_id, node, exc) from exc
        return node

    async def unload(self, model: str, node: str | None = None) -> list[str]:
        """Unload ``model`` from ``node`` (or every node); refuses while requests use it."""
        model_id = self.catalogue.canonical(model)
        targets = [self._node(node)] if node else [n for n in self.nodes.values() if n.up]
        done = []
        for target in targets:
            view = self.view(target).model(model_id)
            if view is None or view.status != "loaded":
                continue
            await self._unload_on(target, model_id, reason=None)  # ModelBusy while in use
            done.append(target.name)
            await self.refresh_node(target)
        if not done:
            where = f"on {node!r}" if node else "anywhere"
            raise ModelNotFound(f"{model_id!r} is not loaded {where}")
        return done

    async def evict(self, model: str) -> list[str]:
        """Unload ``model`` from every node where nothing is using it (pins included:
        an operator's explicit eviction overrides a pin)."""
        model_id = self.catalogue.canonical(model)
        done = []
        for target in [n for n in self.nodes.values() if n.up]:
            view = self.view(target).model(model_id)
            if view is None or view.status != "loaded" or view.in_flight:
                continue
            await self._unload_on(target, model_id, reason="admin")
            done.append(target.name)
            await self.refresh_node(target)
        return done

    def pin(self, model: str, node: str) -> str:
        """Never evict ``model`` from ``node`` (until unpinned); returns the canonical id.

        The model must be one the fleet knows (the catalogue's, or listed by some node, down
        ones included: a pin may be set for when a node comes back).
        """
        self._node(node)
        model_id = self.catalogue.canonical(model)
        listed = any(
            self.catalogue.canonical(s.id) == model_id
            for n in self.nodes.values()
            for s in n.models.values()
        )
        if model_id not in self.catalogue and not listed:
            raise ModelNotFound(f"model {model!r} is not served by any node")
        self.catalogue.pin(model_id, node)
        return model_id

    def unpin(self, model: str, node: str) -> str:
        """Lift a pin (run-time or models.toml); any name, so a stale pin can always go."""
        self._node(node)
        model_id = self.catalogue.canonical(model)
        self.catalogue.unpin(model_id, node)
        return model_id

    async def evict_idle(self, ttl_s: float, now: float) -> list[tuple[str, str]]:
        """Unload models idle for ``ttl_s`` (the Evictor's round); returns (node, model)."""
        done = []
        for target in [n for n in self.nodes.values() if n.up]:
            victims = idle_victims(self.view(target), ttl_s, self.catalogue, now)
            # All of them before the first await: none is leased while another unloads.
            held = self._hold_for_eviction(target.name, victims)
            try:
                for model_id in victims:
                    try:
                        await self._unload_on(target, model_id, reason="idle")
                    except ModelBusy:
                        continue  # it took a request after all: not idle any more
                    except Exception as exc:
                        log.warning(
                            "idle unload of %s on %s failed: %s", model_id, target.name, exc
                        )
                        break
                    done.append((target.name, model_id))
            finally:
                self._end_eviction(target.name, held)
            if victims:
                await self.refresh_node(target)
        return done

    # -- reporting -------------------------------------------------------------------

    def snapshot(self, now: float | None = None) -> dict[str, Any]:
        """The JSON-ready fleet table (``/admin/fleet``, ``helexa status``, the TUI)."""
        now = time.monotonic() if now is None else now
        nodes = []
        models = []
        for node in self.nodes.values():
            view = self.view(node)
            readings = {d.index: d for d in node.health.devices} if node.health else {}
            names = {d.index: d.name for d in node.discovery.devices} if node.discovery else {}
            kinds = {d.index: d.kind for d in node.discovery.devices} if node.discovery else {}
            devices = []
            for d in view.devices:
                reading = readings.get(d.index)
                devices.append(
                    {
                        "index": d.index,
                        "name": names.get(d.index, ""),
                        "kind": kinds.get(d.index, "cuda"),
                        "vram_total_mb": d.total_mb,
                        "vram_used_mb": reading.vram_used_mb if reading else None,
                        "vram_free_mb": reading.vram_free_mb if reading else None,
                        "utilization_pct": reading.utilization_pct if reading else None,
                        "temp_c": reading.temp_c if reading else None,
                    }
                )
            nodes.append(
                {
                    "name": node.name,
                    "up": node.up,
                    "error": node.error,
                    "hostname": node.discovery.hostname if node.discovery else None,
                    "last_seen_s": round(now - node.last_seen, 1) if node.last_seen else None,
                    "devices": devices,
                }
            )
            served = {self.catalogue.canonical(s.id): s for s in node.models.values()}
            for m in view.models:  # the view also shows loads the neuron has not listed yet
                state = served.get(m.id)
                use = self.use.get((node.name, m.id), ModelUse())
                models.append(
                    {
                        "id": m.id,
                        "served_as": state.id if state else self.catalogue.qualified_id(m.id),
                        "node": node.name,
                        "status": _shown_status(node, m.status),
                        "devices": list(m.devices),
                        "vram_used_mb": state.vram_used_mb if state else 0,
                        "progress": state.progress if state else None,
                        "error": state.error if state else None,
                        "pinned": self.catalogue.is_pinned(m.id, node.name),
                        "in_flight": use.in_flight,
                        "requests": use.requests,
                        "idle_s": round(now - use.last_used, 1) if use.last_used else None,
                    }
                )
        loading = sorted(self._loads)
        return {"nodes": nodes, "models": models, "loading": loading}

    async def close(self) -> None:
        for load in list(self._loads.values()):
            if load.task is not None:
                load.task.cancel()
        for node in self.nodes.values():
            with contextlib.suppress(Exception):
                await node.neuron.close()
