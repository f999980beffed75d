"""Shared fixtures: a scripted neuron served over the real neuron HTTP API, a gateway in
front of it on a real loopback port, and the official SDK clients pointed at that."""

from __future__ import annotations

from collections.abc import AsyncIterator

import anthropic
import openai
import pytest

from tests.support.scripted_neuron import ScriptedNeuron
from tests.support.servers import Gateway, gateway_over

MODEL = "test-model"
COLD_MODEL = "cold-model"


@pytest.fixture
def scripted() -> ScriptedNeuron:
    return ScriptedNeuron("node-a", models={MODEL: "loaded", COLD_MODEL: "unloaded"})


@pytest.fixture
async def gateway(scripted: ScriptedNeuron) -> AsyncIterator[Gateway]:
    async with gateway_over(scripted) as gw:
        yield gw


@pytest.fixture
async def openai_client(gateway: Gateway) -> AsyncIterator[openai.AsyncOpenAI]:
    client = openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0)
    async with client:
        yield client


@pytest.fixture
async def anthropic_client(gateway: Gateway) -> AsyncIterator[anthropic.AsyncAnthropic]:
    client = anthropic.AsyncAnthropic(base_url=gateway.url, api_key="unused", max_retries=0)
    async with client:
        yield client
