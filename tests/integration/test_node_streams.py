"""How many streams one remote node carries at once, and what a scrape says about the rest.

Over real loopback HTTP: a gateway, its ``RemoteNeuron`` client, and a neuron API over a
scripted double whose answers hold after their first chunk, so many streams stay open at
once without any of them finishing.
"""

from __future__ import annotations

import asyncio

import aiohttp

from helexa.config import NeuronEndpoint
from helexa.cortex.service import Service
from helexa.neuron.server import make_neuron_app
from tests.conftest import MODEL
from tests.support.scripted_neuron import Reply, ScriptedNeuron
from tests.support.servers import fetch, gateway_over, gateway_settings, serving

BODY = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True}


async def first_chunk(http: aiohttp.ClientSession, url: str) -> aiohttp.ClientResponse:
    """Open a stream and read until its first bytes; the response stays open."""
    response = await http.post(f"{url}/v1/chat/completions", json=BODY)
    assert response.status == 200
    assert await response.content.readany()
    return response


async def test_a_node_carries_more_than_a_hundred_streams_and_still_answers_polls(
    scripted: ScriptedNeuron,
) -> None:
    """aiohttp's pool stops at 100 connections a host: stream 101 used to wait unseen, and
    with 100 streams open a poll could not get through, so the node was marked down."""
    scripted.script = Reply(text=["a", "b"], block_after=1)
    connector = aiohttp.TCPConnector(limit=0)
    async with (
        gateway_over(scripted) as gw,
        aiohttp.ClientSession(connector=connector) as http,
        asyncio.timeout(30),
    ):
        gw.remote.poll_timeout_s = 2
        streams = await asyncio.gather(*(first_chunk(http, gw.url) for _ in range(105)))
        await gw.fleet.refresh(timeout_s=2)
        assert gw.fleet.nodes["node-a"].up
        assert gw.remote.slots.open == 105
        for response in streams:
            response.close()


async def scrape(url: str) -> dict[str, float]:
    text = (await fetch("GET", f"{url}/metrics")).body.decode()
    return {
        name: float(value)
        for line in text.splitlines()
        if line.startswith("helexa_node_streams")
        for name, value in [line.rsplit(" ", 1)]
    }


async def test_streams_past_max_streams_per_node_wait_and_the_scrape_counts_them(
    scripted: ScriptedNeuron,
) -> None:
    """Two slots, three streams: the third waits (``helexa_node_streams_waiting`` 1) and
    starts as soon as one of the first two ends."""
    resume = asyncio.Event()
    scripted.script = Reply(text=["a", "b"], block_after=1, resume=resume)
    async with serving(make_neuron_app(scripted)) as neuron_url:
        settings = gateway_settings(
            listen="127.0.0.1:0", metrics_listen="127.0.0.1:0", max_streams_per_node=2
        )
        settings.neurons = [NeuronEndpoint(name="node-a", endpoint=neuron_url)]
        service = Service(settings)
        await service.start()
        try:
            async with aiohttp.ClientSession() as http, asyncio.timeout(20):
                first = [await first_chunk(http, service.url) for _ in range(2)]
                third = asyncio.create_task(first_chunk(http, service.url))
                slots = service.fleet.nodes["node-a"].neuron.slots  # type: ignore[attr-defined]
                while not slots.waiting:
                    await asyncio.sleep(0)
                gauges = await scrape(service.metrics_url or "")
                assert gauges['helexa_node_streams{node="node-a"}'] == 2
                assert gauges['helexa_node_streams_waiting{node="node-a"}'] == 1
                assert not third.done()
                resume.set()  # every stream may finish now: the third gets its slot
                for response in first:
                    await response.read()
                (await third).close()
                assert (await scrape(service.metrics_url or ""))[
                    'helexa_node_streams_waiting{node="node-a"}'
                ] == 0
        finally:
            await service.stop()
