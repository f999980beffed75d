"""Prometheus metrics for the gateway, served on their own port (``gateway.metrics_listen``).

Every :class:`GatewayMetrics` owns its CollectorRegistry, so two gateways in one process
(tests, the TUI) never share counters and nothing touches prometheus_client's global
registry. Per-request numbers come from a :class:`RequestTimer` the gateway drives
(start, first token, finish with usage, or error); fleet events (loads, evictions, cold
starts) are recorded by the fleet itself; device and in-flight gauges are read from the
fleet on every scrape, so they are never stale and need no background task.

Series never expire, so every label value must come from a bounded set: a request is
labelled with its model only when that model is the catalogue's or a node's, and every
other name a client sends counts under :data:`OTHER_MODEL` (a typo or a scan must not add
two dozen series per name for ever).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from functools import partial
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from helexa.cortex.observe import RequestObserver
from helexa.errors import ApiError
from helexa.neuron.remote import RemoteNeuron
from helexa.origins import BrowserPolicy
from helexa.wire.errors import error_body
from helexa.wire.openai.stream import carries_output

if TYPE_CHECKING:
    from helexa.cortex.fleet import Fleet, Lease

# Seconds: from a sub-millisecond proxy hop to a long agentic generation or a cold load.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1, 2, 5, 10, 30, 60, 120)
TOKENS_PER_S_BUCKETS = (1, 2, 5, 10, 20, 30, 40, 50, 75, 100, 150, 200, 300, 500, 1000)
LOAD_BUCKETS = (0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)
OTHER_MODEL = "other"  # the model label of requests for names nothing here serves


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._fleet: Fleet | None = None  # whose models requests are labelled with
        # Every metric in this gateway's own registry, never prometheus_client's global one.
        counter = partial(Counter, registry=self.registry)
        gauge = partial(Gauge, registry=self.registry)
        histogram = partial(Histogram, registry=self.registry)
        req = ["model", "node", "dialect"]
        per_model = ["model", "node"]
        self.requests = counter(
            "helexa_requests", "Requests by outcome (HTTP status)", [*req, "status"]
        )
        self.request_errors = counter(
            "helexa_request_errors", "Failed requests by error code", [*req, "code"]
        )
        self.request_duration = histogram(
            "helexa_request_duration_seconds",
            "Request latency, arrival to last byte",
            req,
            buckets=LATENCY_BUCKETS,
        )
        self.ttft = histogram(
            "helexa_time_to_first_token_seconds",
            "Arrival to first generated token (cold loads included)",
            req,
            buckets=TTFT_BUCKETS,
        )
        self.tokens_per_second = histogram(
            "helexa_output_tokens_per_second",
            "Decode rate per request: tokens after the first over the time after the first",
            per_model,
            buckets=TOKENS_PER_S_BUCKETS,
        )
        self.prompt_tokens = counter("helexa_prompt_tokens", "Prompt tokens processed", per_model)
        self.prompt_cached_tokens = counter(
            "helexa_prompt_cached_tokens",
            "Prompt tokens served from the prompt cache (counted in helexa_prompt_tokens too)",
            per_model,
        )
        self.completion_tokens = counter("helexa_completion_tokens", "Tokens generated", per_model)
        self.cold_starts = counter(
            "helexa_cold_starts", "Requests that waited for a model load", per_model
        )
        self.evictions = counter(
            "helexa_evictions",
            "Models unloaded by the gateway (capacity, idle, admin)",
            [*per_model, "reason"],
        )
        self.model_loads = counter(
            "helexa_model_loads", "Model loads by result", [*per_model, "result"]
        )
        self.model_load_duration = histogram(
            "helexa_model_load_duration_seconds",
            "Successful model loads, request to loaded",
            per_model,
            buckets=LOAD_BUCKETS,
        )
        device = ["node", "device"]
        self.vram_used = gauge("helexa_device_vram_used_mb", "Device memory in use", device)
        self.vram_total = gauge("helexa_device_vram_total_mb", "Device memory in total", device)
        self.utilization = gauge("helexa_device_utilization_pct", "Device utilization", device)
        self.in_flight = gauge(
            "helexa_in_flight_requests", "Requests holding a model now", per_model
        )
        self.node_up = gauge("helexa_node_up", "1 when the node answers polls", ["node"])
        self.node_streams = gauge(
            "helexa_node_streams", "Streams a remote node is carrying now", ["node"]
        )
        self.node_streams_waiting = gauge(
            "helexa_node_streams_waiting",
            "Requests waiting for a stream slot on a remote node (gateway max_streams_per_node)",
            ["node"],
        )
        self.model_loaded = gauge("helexa_model_loaded", "1 per model loaded on a node", per_model)

    # -- per request ---------------------------------------------------------------------

    def start_request(
        self, model: str, node: str, dialect: str, *, clock: Callable[[], float] = time.perf_counter
    ) -> RequestTimer:
        return RequestTimer(self, model, node, dialect, clock)

    def label_models_of(self, fleet: Fleet) -> None:
        """Label requests with ``fleet``'s models (until then, every request that fails
        before routing counts under :data:`OTHER_MODEL`)."""
        self._fleet = fleet

    def model_label(self, model: str) -> str:
        """``model`` as a label: its canonical id when the fleet serves it, else
        :data:`OTHER_MODEL`."""
        known = self._fleet.known_id(model) if self._fleet is not None else None
        return known or OTHER_MODEL

    def observe(self, api: str, model: str) -> MetricsObserver:
        """The gateway's per-request hook factory (``make_app(..., observe=metrics.observe)``)."""
        return MetricsObserver(self.start_request(self.model_label(model), "", api))

    # -- fleet events --------------------------------------------------------------------

    def cold_start(self, model: str, node: str) -> None:
        self.cold_starts.labels(model, node).inc()

    def model_load(self, model: str, node: str, result: str, seconds: float | None = None) -> None:
        self.model_loads.labels(model, node, result).inc()
        if result == "ok" and seconds is not None:
            self.model_load_duration.labels(model, node).observe(seconds)

    def eviction(self, model: str, node: str, reason: str) -> None:
        self.evictions.labels(model, node, reason).inc()

    # -- fleet state ---------------------------------------------------------------------

    def update_from_fleet(self, fleet: Fleet) -> None:
        """Set every gauge from the fleet as it is now (gone nodes and models disappear)."""
        for gauge in (
            self.vram_used,
            self.vram_total,
            self.utilization,
            self.in_flight,
            self.node_up,
            self.node_streams,
            self.node_streams_waiting,
            self.model_loaded,
        ):
            gauge.clear()
        for node in fleet.nodes.values():
            self.node_up.labels(node.name).set(1 if node.up else 0)
            if isinstance(node.neuron, RemoteNeuron):
                self.node_streams.labels(node.name).set(node.neuron.slots.open)
                self.node_streams_waiting.labels(node.name).set(node.neuron.slots.waiting)
            totals = node.vram_totals()
            for d in node.health.devices if node.health else ():
                device = str(d.index)
                self.vram_used.labels(node.name, device).set(d.vram_used_mb)
                self.vram_total.labels(node.name, device).set(totals[d.index])
                if d.utilization_pct is not None:
                    self.utilization.labels(node.name, device).set(d.utilization_pct)
            if node.up:
                for state in node.models.values():
                    if state.status == "loaded":
                        model = fleet.catalogue.canonical(state.id)
                        self.model_loaded.labels(model, node.name).set(1)
        for (node_name, model), use in fleet.use.items():
            if use.in_flight:
                self.in_flight.labels(model, node_name).set(use.in_flight)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class RequestTimer:
    """One request's clock: TTFT at the first token, rate and usage at the end.

    ``finish`` and ``error`` are each final and only the first of them counts, so a
    handler may call ``error`` from an ``except`` after a partial stream without
    double-counting.
    """

    def __init__(
        self,
        metrics: GatewayMetrics,
        model: str,
        node: str,
        dialect: str,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.metrics = metrics
        self.labels = (model, node, dialect)
        self.clock = clock
        self.started = clock()
        self.first: float | None = None
        self.done = False

    def route(self, node: str, model: str | None = None) -> None:
        """Routing happened after arrival: now the node (and the canonical model) are known."""
        self.labels = (model or self.labels[0], node, self.labels[2])

    def first_token(self) -> None:
        if self.first is None:
            self.first = self.clock()
            self.metrics.ttft.labels(*self.labels).observe(self.first - self.started)

    def finish(self, usage: Mapping[str, Any] | None = None, status: int = 200) -> None:
        if self.done:
            return
        self.done = True
        end = self.clock()
        m, (model, node, dialect) = self.metrics, self.labels
        m.requests.labels(model, node, dialect, str(status)).inc()
        m.request_duration.labels(model, node, dialect).observe(end - self.started)
        prompt = int((usage or {}).get("prompt_tokens") or 0)
        completion = int((usage or {}).get("completion_tokens") or 0)
        cached = int(((usage or {}).get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
        if prompt:
            m.prompt_tokens.labels(model, node).inc(prompt)
        if cached:
            m.prompt_cached_tokens.labels(model, node).inc(cached)
        if completion:
            m.completion_tokens.labels(model, node).inc(completion)
        if self.first is not None and completion >= 2 and end > self.first:
            m.tokens_per_second.labels(model, node).observe((completion - 1) / (end - self.first))

    def error(self, status: int, code: str | None = None) -> None:
        if self.done:
            return
        self.done = True
        m, (model, node, dialect) = self.metrics, self.labels
        m.requests.labels(model, node, dialect, str(status)).inc()
        m.request_errors.labels(model, node, dialect, code or "error").inc()
        m.request_duration.labels(model, node, dialect).observe(self.clock() - self.started)


class MetricsObserver(RequestObserver):
    """Feeds one gateway request's hooks into a :class:`RequestTimer`."""

    def __init__(self, timer: RequestTimer) -> None:
        self.timer = timer
        self.usage: Mapping[str, Any] | None = None

    def routed(self, lease: Lease) -> None:
        self.timer.route(lease.node.name, lease.canonical_id)

    def chunk(self, chunk: dict[str, Any]) -> None:
        if self.timer.first is None and carries_output(chunk):
            self.timer.first_token()
        if chunk.get("usage"):
            self.usage = chunk["usage"]

    def finished(self) -> None:
        self.timer.finish(self.usage)

    def failed(self, failure: ApiError) -> None:
        self.timer.error(failure.status, failure.code)


def make_metrics_app(
    metrics: GatewayMetrics, fleet: Fleet | None = None, *, browsers: BrowserPolicy | None = None
) -> web.Application:
    """``GET /metrics`` for the metrics port; with ``fleet``, gauges are refreshed per scrape.

    The gateway's browser rules hold here too (``browsers``; by default a loopback bind's):
    the metrics name every model, node and client route, which no web page, nor a page
    rebinding its name to 127.0.0.1, may read."""
    policy = browsers or BrowserPolicy.for_bind("127.0.0.1")

    async def scrape(request: web.Request) -> web.Response:
        refusal = policy.refusal(request.method, request.headers)
        if refusal is not None:
            return web.json_response(error_body("openai", refusal), status=refusal.status)
        if fleet is not None:
            metrics.update_from_fleet(fleet)
        return web.Response(
            body=metrics.exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    app = web.Application()
    app.router.add_get("/metrics", scrape)
    return app
