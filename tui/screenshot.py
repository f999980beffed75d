"""Render the dashboard under load to ``assets/screenshots/`` (SVG and PNG): the main
screen (``dashboard``), a request opened with Enter (``request``), a model opened with
Enter (``model``) and the same fleet on an 80x24 terminal (``small``).

    python -m tui.screenshot [--seconds 20] [--out assets/screenshots]

A development script, run from the checkout: it drives the real app and the real gateway
over demo neurons (:class:`DemoNeuron`, GPU nodes played without a GPU), sends streaming
requests through the gateway with the OpenAI SDK for a while (and asks for one load that
fails, so the events pane and its model row say why), and exports what the screen shows. The PNG is made with cairosvg when it is installed (``pip install
cairosvg``); Textual's SVG names the Fira Code web font, which cairo cannot fetch, so the
PNG copy asks for a local monospace font instead.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import re
import socket
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai

from helexa.config import GatewaySettings, LocalSettings, Settings
from helexa.neuron.interface import (
    DeviceHealth,
    DeviceInfo,
    Discovery,
    Health,
    LoadRequest,
    ModelState,
    ModelStatus,
    NeuronError,
)
from helexa.neuron.remote import RemoteNeuron
from tui.app import HelexaApp, build_app
from tui.traffic import Traffic

SIZE = (160, 45)


@dataclass
class DemoModel:
    id: str
    device: int
    vram_mb: int
    tok_s: float  # decode speed of one stream
    status: ModelStatus = "loaded"
    progress: float | None = None
    refusal: str | None = None  # why a load of it fails, when it does


class DemoNeuron:
    """A GPU node without the GPU: fixed-size devices whose memory and load follow the
    models on them, and chats answered with filler tokens at each model's decode speed,
    so the dashboard shows a busy fleet on any machine."""

    def __init__(
        self, name: str, gpu: str, vram_mb: int, gpus: int, models: list[DemoModel]
    ) -> None:
        self.name = name
        self.gpu, self.vram_mb, self.gpus = gpu, vram_mb, gpus
        self.demo = {m.id: m for m in models}
        self.states: dict[str, ModelStatus] = {m.id: m.status for m in models}
        self.active: dict[int, int] = {}
        self.rng = random.Random(name)
        self._streams = 0

    async def discovery(self) -> Discovery:
        return Discovery(
            hostname=f"{self.name}.lan",
            os="Linux",
            driver_version="570.86",
            cuda_version="12.8",
            devices=[
                DeviceInfo(index=i, name=self.gpu, vram_total_mb=self.vram_mb)
                for i in range(self.gpus)
            ],
        )

    async def health(self) -> Health:
        devices = []
        for i in range(self.gpus):
            used = 600 + sum(
                m.vram_mb * (m.progress or 1.0)
                for m in self.demo.values()
                if m.device == i and self.states.get(m.id) in ("loaded", "loading")
            )
            busy = self.active.get(i, 0)
            devices.append(
                DeviceHealth(
                    index=i,
                    vram_used_mb=int(used),
                    vram_free_mb=self.vram_mb - int(used),
                    utilization_pct=min(99.0, 8 + 41 * busy + self.rng.random() * 4),
                    temp_c=41 + 9 * min(busy, 3) + self.rng.random() * 2,
                )
            )
        return Health(uptime_secs=86_400.0, devices=devices)

    async def models(self) -> list[ModelState]:
        out = []
        for model_id, status in self.states.items():
            m = self.demo[model_id]
            on = status in ("loaded", "loading")
            out.append(
                ModelState(
                    id=model_id,
                    status=status,
                    devices=[m.device] if on else [],
                    vram_used_mb=int(m.vram_mb * (m.progress or 1.0)) if on else 0,
                    progress=m.progress if status == "loading" else None,
                )
            )
        return out

    async def load(self, request: LoadRequest) -> ModelState:
        m = self.demo[request.model_id]  # the gateway only loads what a node lists
        if m.refusal is not None:
            raise NeuronError(m.refusal, status=507, code="insufficient_vram")
        self.states[m.id] = "loaded"
        return ModelState(id=m.id, status="loaded", devices=[m.device], vram_used_mb=m.vram_mb)

    async def unload(self, model_id: str) -> None:
        if model_id in self.states:
            self.states[model_id] = "unloaded"

    def chat(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        return self._stream(request, "chat.completion.chunk")

    def complete(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        return self._stream(request, "text_completion")

    async def _stream(self, request: dict[str, Any], kind: str) -> AsyncIterator[dict[str, Any]]:
        """Filler tokens after a prefill pause, one per ``1 / tok_s``, then the usage (the
        gateway only routes to a model it saw loaded, so there is nothing to refuse)."""
        model_id = str(request.get("model"))
        model = self.demo[model_id]
        self._streams += 1
        base = {"id": f"demo-{self.name}-{self._streams}", "object": kind, "model": model_id}

        def chunk(text: str, finish: str | None = None) -> dict[str, Any]:
            choice: dict[str, Any] = {"index": 0, "finish_reason": finish}
            if kind == "text_completion":
                choice["text"] = text
            else:
                choice["delta"] = {"content": text} if text else {}
            return {**base, "choices": [choice]}

        self.active[model.device] = self.active.get(model.device, 0) + 1
        try:
            await asyncio.sleep(self.rng.uniform(0.04, 0.35))  # prefill
            tokens, prompt = self.rng.randint(60, 160), self.rng.randint(40, 900)
            usage = {"prompt_tokens": prompt, "completion_tokens": tokens}
            usage["total_tokens"] = prompt + tokens
            for out in [
                *(chunk("tok") for _ in range(tokens)),
                chunk("", "stop"),
                {**base, "choices": [], "usage": usage},
            ]:
                yield out
                await asyncio.sleep(1 / model.tok_s)
        finally:
            self.active[model.device] -= 1

    async def count_tokens(self, request: dict[str, Any]) -> int:
        return sum(len(str(m.get("content") or "").split()) for m in request.get("messages", []))

    async def close(self) -> None:
        pass


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


async def client_loop(base_url: str, model: str, stop: asyncio.Event, rng: random.Random) -> None:
    """One user: a streaming request, a pause to read it, again, until ``stop``."""
    async with openai.AsyncOpenAI(base_url=base_url, api_key="-", max_retries=0) as client:
        while not stop.is_set():
            with contextlib.suppress(openai.APIError):
                stream = await client.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": "hi"}], stream=True
                )
                async with stream:  # closes the response when the loop breaks off
                    async for _ in stream:
                        if stop.is_set():
                            break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), rng.uniform(0.2, 1.5))


def png_ready_svg(svg: str) -> str:
    """Point the SVG at a local monospace font so cairo lays columns out as the terminal did."""
    svg = re.sub(r"@font-face\s*\{[^}]*\}", "", svg)
    return svg.replace("Fira Code, monospace", "DejaVu Sans Mono, monospace")


async def render(seconds: float, out: Path) -> list[Path]:
    local = DemoNeuron(
        "local",
        "NVIDIA GeForce RTX 4090",
        24564,
        2,
        [
            DemoModel("Qwen/Qwen3-8B-GGUF:Q4_K_M", 0, 5870, tok_s=96),
            DemoModel("Qwen/Qwen3-0.6B-GGUF:Q8_0", 1, 1130, tok_s=220),
            DemoModel("Qwen/Qwen3-30B-A3B-GGUF:Q4_K_M", 1, 18630, 80, "loading", 0.63),
        ],
    )
    rack = DemoNeuron(
        "rack-2",
        "NVIDIA H100 80GB HBM3",
        81559,
        1,
        [
            DemoModel("Qwen/Qwen3-32B-GGUF:Q4_K_M", 0, 20210, tok_s=48),
            DemoModel("Qwen/Qwen3-14B-GGUF:Q4_K_M", 0, 9300, 70, "unloaded"),
            DemoModel(
                "Qwen/Qwen3-235B-A22B-GGUF:Q4_K_M",
                0,
                142_000,
                20,
                "unloaded",
                refusal="needs 138.7 GiB on one device, the largest has 80.0 GiB",
            ),
        ],
    )
    laptop = RemoteNeuron("laptop", closed_port_url(), poll_timeout_s=1)
    settings = Settings(
        gateway=GatewaySettings(listen="127.0.0.1:0"), local=LocalSettings(enabled=False)
    )
    app: HelexaApp = build_app(
        settings, [local, rack, laptop], refresh_s=0.5, traffic=Traffic(window_s=int(seconds))
    )
    shots: dict[str, str] = {}
    async with app.run_test(size=SIZE) as pilot:
        await app.workers.wait_for_complete()
        fleet = app.service.fleet
        fleet.pin("Qwen/Qwen3-8B-GGUF:Q4_K_M", "local")
        with contextlib.suppress(Exception):  # the failure is the point: it shows up
            await fleet.load("Qwen/Qwen3-235B-A22B-GGUF:Q4_K_M", "rack-2")
        base = f"{app.service.url}/v1"
        stop = asyncio.Event()
        rng = random.Random(7)
        users = [
            *(["Qwen/Qwen3-8B-GGUF:Q4_K_M"] * 3),
            "Qwen/Qwen3-0.6B-GGUF:Q8_0",
            *(["Qwen/Qwen3-32B-GGUF:Q4_K_M"] * 2),
        ]
        tasks = [asyncio.ensure_future(client_loop(base, m, stop, rng)) for m in users]
        await asyncio.sleep(seconds)
        app.refresh_view()
        await pilot.pause()
        shots["dashboard"] = app.export_screenshot(title="helexa")
        table = app.requests.table
        table.focus()
        table.move_cursor(row=0)  # a request in flight: its counters live
        await pilot.press("enter")
        await pilot.pause()
        shots["request"] = app.export_screenshot(title="helexa: a request")
        await pilot.press("escape")
        app.models.focus()
        app.models.move_cursor(row=app.models.get_row_index("rack-2/Qwen/Qwen3-32B-GGUF:Q4_K_M"))
        await pilot.press("enter")
        await pilot.pause()
        shots["model"] = app.export_screenshot(title="helexa: a model")
        await pilot.press("escape")
        await pilot.resize_terminal(80, 24)
        app.refresh_view()
        await pilot.pause()
        shots["small"] = app.export_screenshot(title="helexa at 80x24")
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        await app.stop_service()
    out.mkdir(parents=True, exist_ok=True)
    written = []
    try:
        import cairosvg
    except ImportError:
        cairosvg = None
        print("cairosvg is not installed: writing the SVGs only", file=sys.stderr)
    for name, svg in shots.items():
        path = out / f"{name}.svg"
        path.write_text(svg)
        written.append(path)
        if cairosvg is not None:
            png = out / f"{name}.png"
            cairosvg.svg2png(bytestring=png_ready_svg(svg).encode(), write_to=str(png))
            written.append(png)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="traffic before the shot")
    parser.add_argument("--out", type=Path, default=Path("assets/screenshots"))
    args = parser.parse_args(argv)
    for path in asyncio.run(render(args.seconds, args.out)):
        print(f"wrote {path} ({path.stat().st_size // 1024} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
