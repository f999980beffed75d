"""Metrics end to end: SDK clients through a real gateway, then a Prometheus-style scrape."""

from __future__ import annotations

import anthropic
import openai
import pytest
from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families

from helexa.cortex.fleet import Fleet
from helexa.cortex.metrics import GatewayMetrics, make_metrics_app
from helexa.neuron.interface import Neuron
from tests.support.scripted_neuron import Reply, ScriptedNeuron
from tests.support.servers import gateway_over


async def scrape(client: TestClient) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    response = await client.get("/metrics")
    assert response.status == 200
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(await response.text())
        for s in family.samples
    }


def sample(samples: dict, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


async def test_requests_through_the_gateway_are_measured(aiohttp_client) -> None:  # type: ignore[no-untyped-def]
    metrics = GatewayMetrics()
    neuron = ScriptedNeuron("gpu", {"m": "unloaded"}, Reply(text=["Hello", " big", " world"]))

    def fleet_with_metrics(nodes: list[Neuron]) -> Fleet:
        fleet = Fleet(nodes, metrics=metrics)
        metrics.label_models_of(fleet)
        return fleet

    async with gateway_over(neuron, observe=metrics.observe, make_fleet=fleet_with_metrics) as gw:
        client = await aiohttp_client(make_metrics_app(metrics, gw.fleet))
        oai = openai.AsyncOpenAI(base_url=f"{gw.url}/v1", api_key="unused", max_retries=0)
        stream = await oai.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        assert text == "Hello big world"
        reply = await oai.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}]
        )
        assert reply.choices[0].message.content == "Hello big world"
        claude = anthropic.AsyncAnthropic(base_url=gw.url, api_key="unused", max_retries=0)
        message = await claude.messages.create(
            model="m", max_tokens=16, messages=[{"role": "user", "content": "hi"}]
        )
        assert message.content[0].text == "Hello big world"  # type: ignore[union-attr]
        for name in ("nope", "nope2", "typo"):
            with pytest.raises(openai.NotFoundError):
                await oai.chat.completions.create(
                    model=name, messages=[{"role": "user", "content": "x"}]
                )
        await oai.close()
        await claude.close()

        samples = await scrape(client)

    on_gpu = {"model": "m", "node": "gpu"}
    assert sample(samples, "helexa_requests_total", **on_gpu, dialect="chat", status="200") == 2
    assert sample(samples, "helexa_requests_total", **on_gpu, dialect="messages", status="200") == 1
    assert sample(samples, "helexa_completion_tokens_total", **on_gpu) == 9
    assert (
        sample(samples, "helexa_prompt_tokens_total", **on_gpu) == 3 * neuron.script.prompt_tokens
    )  # type: ignore[union-attr]
    assert (
        sample(samples, "helexa_time_to_first_token_seconds_count", **on_gpu, dialect="chat") == 2
    )
    assert sample(samples, "helexa_output_tokens_per_second_count", **on_gpu) == 3
    assert sample(samples, "helexa_cold_starts_total", **on_gpu) == 1  # only the first waited
    assert sample(samples, "helexa_model_loads_total", **on_gpu, result="ok") == 1
    assert sample(samples, "helexa_model_loaded", **on_gpu) == 1
    assert sample(samples, "helexa_node_up", node="gpu") == 1
    # Names nothing serves share one label, however many a client makes up.
    unknown = {"model": "other", "node": "", "dialect": "chat"}
    assert sample(samples, "helexa_requests_total", **unknown, status="404") == 3
    assert sample(samples, "helexa_request_errors_total", **unknown, code="model_not_found") == 3
    labelled = {dict(labels).get("model") for _, labels in samples}
    assert labelled <= {"m", "other", None}
