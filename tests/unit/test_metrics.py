"""Gateway metrics, read back the way Prometheus reads them: scrape a real server, parse."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families

from helexa.cortex.fleet import Fleet
from helexa.cortex.metrics import GatewayMetrics, make_metrics_app
from helexa.neuron.interface import Discovery, Health, LoadRequest, ModelState
from tests.support import devices
from tests.support.devices import Gpu

Scrape = Callable[..., Any]


async def scrape(client: TestClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = await client.get("/metrics")
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(await response.text()):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def key(name: str, **labels: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    return (name, tuple(sorted(labels.items())))


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_request_timer_records_ttft_rate_usage_and_status(aiohttp_client: Scrape) -> None:
    metrics = GatewayMetrics()
    clock = Clock()
    timer = metrics.start_request("qwen3-8b", "", "anthropic", clock=clock)
    timer.route("beast")  # the node is known once the request is routed
    clock.now += 0.5
    timer.first_token()
    clock.now += 1.0
    timer.first_token()  # only the first counts
    clock.now += 1.0
    usage = {"prompt_tokens": 12, "completion_tokens": 21, "total_tokens": 33}
    timer.finish({**usage, "prompt_tokens_details": {"cached_tokens": 8}})
    timer.error(500, "late")  # after finish: ignored

    samples = await scrape(await aiohttp_client(make_metrics_app(metrics)))
    labels = {"model": "qwen3-8b", "node": "beast", "dialect": "anthropic"}
    per_model = {"model": "qwen3-8b", "node": "beast"}
    assert samples[key("helexa_requests_total", **labels, status="200")] == 1
    assert key("helexa_requests_total", **labels, status="500") not in samples
    assert samples[key("helexa_time_to_first_token_seconds_sum", **labels)] == 0.5
    assert samples[key("helexa_request_duration_seconds_sum", **labels)] == 2.5
    # 20 tokens after the first, over the 2 s after the first token.
    assert samples[key("helexa_output_tokens_per_second_sum", **per_model)] == 10.0
    assert samples[key("helexa_prompt_tokens_total", **per_model)] == 12
    assert samples[key("helexa_prompt_cached_tokens_total", **per_model)] == 8  # of the 12
    assert samples[key("helexa_completion_tokens_total", **per_model)] == 21


async def test_request_timer_error(aiohttp_client: Scrape) -> None:
    metrics = GatewayMetrics()
    clock = Clock()
    timer = metrics.start_request("m", "n", "openai", clock=clock)
    clock.now += 0.25
    timer.error(503, "no_capacity")
    timer.finish({"completion_tokens": 5})  # after error: ignored

    samples = await scrape(await aiohttp_client(make_metrics_app(metrics)))
    labels = {"model": "m", "node": "n", "dialect": "openai"}
    assert samples[key("helexa_requests_total", **labels, status="503")] == 1
    assert samples[key("helexa_request_errors_total", **labels, code="no_capacity")] == 1
    assert samples[key("helexa_request_duration_seconds_sum", **labels)] == 0.25
    assert key("helexa_completion_tokens_total", model="m", node="n") not in samples
    assert key("helexa_time_to_first_token_seconds_count", **labels) not in samples


async def test_registries_are_independent(aiohttp_client: Scrape) -> None:
    first, second = GatewayMetrics(), GatewayMetrics()
    first.start_request("m", "n", "openai").finish()
    samples = await scrape(await aiohttp_client(make_metrics_app(second)))
    assert (
        key("helexa_requests_total", model="m", node="n", dialect="openai", status="200")
        not in samples
    )


async def test_fleet_events(aiohttp_client: Scrape) -> None:
    metrics = GatewayMetrics()
    metrics.cold_start("m", "a")
    metrics.model_load("m", "a", "ok", 4.0)
    metrics.model_load("m", "b", "failed")
    metrics.eviction("old", "a", "idle")
    samples = await scrape(await aiohttp_client(make_metrics_app(metrics)))
    assert samples[key("helexa_cold_starts_total", model="m", node="a")] == 1
    assert samples[key("helexa_model_loads_total", model="m", node="a", result="ok")] == 1
    assert samples[key("helexa_model_loads_total", model="m", node="b", result="failed")] == 1
    assert samples[key("helexa_model_load_duration_seconds_sum", model="m", node="a")] == 4.0
    assert samples[key("helexa_evictions_total", model="old", node="a", reason="idle")] == 1


class StaticNeuron:
    """A neuron double that only reports: two GPUs, one model loaded."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.fail = False
        self.gpus = [Gpu("GPU", 24000, 10000, utilization_pct=55.0), Gpu("GPU", 24000)]

    async def discovery(self) -> Discovery:
        return devices.discovery(self.name, self.gpus)

    async def health(self) -> Health:
        if self.fail:
            raise ConnectionRefusedError("gone")
        return devices.health(self.gpus)

    async def models(self) -> list[ModelState]:
        return [
            ModelState(id="m", status="loaded", devices=[0], vram_used_mb=10000),
            ModelState(id="other", status="unloaded"),
        ]

    async def load(self, request: LoadRequest) -> ModelState:
        raise NotImplementedError

    async def unload(self, model_id: str) -> None:
        raise NotImplementedError

    def chat(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        raise NotImplementedError

    def complete(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        raise NotImplementedError

    async def count_tokens(self, request: dict[str, Any]) -> int:
        return 0

    async def close(self) -> None:
        pass


async def test_gauges_follow_the_fleet_on_every_scrape(aiohttp_client: Scrape) -> None:
    metrics = GatewayMetrics()
    neuron = StaticNeuron("a")
    fleet = Fleet([neuron], metrics=metrics)
    await fleet.refresh()
    client = await aiohttp_client(make_metrics_app(metrics, fleet))
    lease = await fleet.acquire("m")

    samples = await scrape(client)
    assert samples[key("helexa_node_up", node="a")] == 1
    assert samples[key("helexa_device_vram_used_mb", node="a", device="0")] == 10000
    assert samples[key("helexa_device_vram_total_mb", node="a", device="1")] == 24000
    assert samples[key("helexa_device_utilization_pct", node="a", device="0")] == 55.0
    assert key("helexa_device_utilization_pct", node="a", device="1") not in samples
    assert samples[key("helexa_in_flight_requests", model="m", node="a")] == 1
    assert samples[key("helexa_model_loaded", model="m", node="a")] == 1
    assert key("helexa_model_loaded", model="other", node="a") not in samples

    lease.release()
    neuron.fail = True
    await fleet.refresh()
    samples = await scrape(client)
    assert samples[key("helexa_node_up", node="a")] == 0
    assert key("helexa_in_flight_requests", model="m", node="a") not in samples
    assert key("helexa_model_loaded", model="m", node="a") not in samples


def test_grafana_dashboard_queries_only_metrics_that_exist() -> None:
    dashboard = json.loads(
        (Path(__file__).parents[2] / "assets" / "grafana-dashboard.json").read_text()
    )
    queried = {
        name
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
        for name in re.findall(r"helexa_\w+", target["expr"])
    }
    exposed = set()
    for family in GatewayMetrics().registry.collect():
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}
        exposed |= {family.name + s for s in suffixes.get(family.type, [""])}
    assert queried, "the dashboard queries helexa metrics"
    assert queried <= exposed, f"unknown metrics in the dashboard: {sorted(queried - exposed)}"
    variables = [
        v["query"]["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"
    ]
    assert {n for v in variables for n in re.findall(r"helexa_\w+", v)} <= exposed
