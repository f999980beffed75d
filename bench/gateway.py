"""What the gateway adds to a request: the same requests sent to a neuron directly and
through the gateway in front of it, in one run, as p50 latency and cost per streamed chunk.

The neuron is the real neuron HTTP API (``make_neuron_app``) over an echo node that
answers at once with canned chunks, so what is timed is HTTP, routing and translation,
not an engine. Both servers run in a child process (as a gateway and its node do); the
client, in this one, keeps one connection alive per target::

    python bench/gateway.py                 # 400 short requests, a 2000-chunk stream, each way
    python bench/gateway.py --requests 1000 --chunks 5000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import statistics
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from helexa.config import LocalSettings, Settings  # noqa: E402
from helexa.cortex.app import make_app  # noqa: E402
from helexa.cortex.fleet import Fleet  # noqa: E402
from helexa.neuron import interface as node  # noqa: E402
from helexa.neuron.remote import RemoteNeuron  # noqa: E402
from helexa.neuron.server import make_neuron_app, start_server  # noqa: E402

MODEL = "echo"


class EchoNeuron:
    """A node that streams ``chunks`` one-token chunks (the request's ``max_tokens``) at once."""

    name = "echo"

    async def discovery(self) -> node.Discovery:
        return node.Discovery(
            hostname="bench",
            os="Linux",
            devices=[node.DeviceInfo(index=0, name="echo", vram_total_mb=1)],
        )

    async def health(self) -> node.Health:
        return node.Health(
            uptime_secs=1.0, devices=[node.DeviceHealth(index=0, vram_used_mb=0, vram_free_mb=1)]
        )

    async def models(self) -> list[node.ModelState]:
        return [node.ModelState(id=MODEL, status="loaded", devices=[0])]

    async def load(self, request: node.LoadRequest) -> node.ModelState:
        return node.ModelState(id=MODEL, status="loaded", devices=[0])

    async def unload(self, model_id: str) -> None:
        return None

    async def chat(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        n = int(request.get("max_tokens") or 1)
        base = {
            "id": "chatcmpl-echo",
            "object": "chat.completion.chunk",
            "created": 0,
            "model": MODEL,
        }
        yield {
            **base,
            "choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}],
        }
        for _ in range(n):
            yield {
                **base,
                "choices": [{"index": 0, "delta": {"content": "x"}, "finish_reason": None}],
            }
        yield {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]}
        usage = {"prompt_tokens": 1, "completion_tokens": n, "total_tokens": n + 1}
        yield {**base, "choices": [], "usage": usage}

    def complete(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        return self.chat(request)

    async def count_tokens(self, request: dict[str, Any]) -> int:
        return 1

    async def close(self) -> None:
        return None


async def _serve(ports: Any) -> None:
    node = EchoNeuron()
    neuron_runner, neuron_url = await start_server(make_neuron_app(node), "127.0.0.1", 0)
    fleet = Fleet([RemoteNeuron(node.name, neuron_url, None)])
    await fleet.refresh()
    settings = Settings.model_validate({"local": LocalSettings(enabled=False)})
    gateway_runner, gateway_url = await start_server(make_app(fleet, settings), "127.0.0.1", 0)
    ports.send((neuron_url, gateway_url))
    await asyncio.Event().wait()


def _child(ports: Any) -> None:
    asyncio.run(_serve(ports))


async def _one(http: aiohttp.ClientSession, url: str, tokens: int) -> float:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": tokens,
        "stream": True,
    }
    start = time.perf_counter()
    async with http.post(f"{url}/v1/chat/completions", json=body) as response:
        assert response.status == 200, await response.text()
        async for _ in response.content:
            pass
    return time.perf_counter() - start


async def _measure(url: str, requests: int, chunks: int) -> dict[str, float]:
    async with aiohttp.ClientSession() as http:
        for _ in range(20):  # warm the connection and both servers
            await _one(http, url, 1)
        short = [await _one(http, url, 1) for _ in range(requests)]
        long = [await _one(http, url, chunks) for _ in range(5)]
    return {
        "short p50 ms": statistics.median(short) * 1e3,
        "short p90 ms": statistics.quantiles(short, n=10)[-1] * 1e3,
        "stream us/chunk": statistics.median(long) / chunks * 1e6,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--chunks", type=int, default=2000)
    args = ap.parse_args(argv)
    parent, child = multiprocessing.Pipe()
    server = multiprocessing.get_context("spawn").Process(target=_child, args=(child,), daemon=True)
    server.start()
    neuron_url, gateway_url = parent.recv()
    try:
        direct = asyncio.run(_measure(neuron_url, args.requests, args.chunks))
        through = asyncio.run(_measure(gateway_url, args.requests, args.chunks))
    finally:
        server.kill()
    print("| metric | neuron direct | through gateway | gateway adds |")
    print("|---|---:|---:|---:|")
    for key in direct:
        print(
            f"| {key} | {direct[key]:.3f} | {through[key]:.3f} | {through[key] - direct[key]:.3f} |"
        )
    print(json.dumps({"direct": direct, "gateway": through}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
