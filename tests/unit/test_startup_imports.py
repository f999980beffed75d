"""``helexa --serve`` must listen, and answer /health and /v1/models, without importing the
engine's heavy stack.

Importing torch alone took seconds of a 4 s restart on an H200, before the gateway could
answer /health; none of it is needed until a model loads. The checks run in a fresh
interpreter, since this test process has long imported torch for other tests.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from helexa.neuron import discovery

ROOT = Path(__file__).resolve().parents[2]

# What only a model load (or the TUI, for textual) needs: each costs from tens of
# milliseconds to seconds to import.
HEAVY = (
    "torch",
    "triton",
    "numpy",
    "safetensors",
    "tokenizers",
    "gguf",
    "llguidance",
    "jinja2",
    "jsonschema",
    "transformers",
    "huggingface_hub",
    "textual",
    "helexa.engine.generate",
    "helexa.engine.models",
)

# What `helexa --serve` does (cli.main, then run_headless), in two steps: everything before
# it listens (the command line, the settings, the service with its local neuron), then
# starting it (listen, first poll of every node), asking it what a client asks first, and
# stopping it.
SERVE = """
import asyncio, json, sys
import aiohttp
from helexa.cli import build_parser, settings_for
from helexa.cortex.service import Service

async def main():
    service = Service(settings_for(build_parser().parse_args(sys.argv[1:])))
    built = sorted(sys.modules)
    try:
        await service.start()
        async with aiohttp.ClientSession() as client:
            health = await (await client.get(f"{service.url}/health")).json()
            models = await (await client.get(f"{service.url}/v1/models")).json()
    finally:
        await service.stop()
    served = sorted(sys.modules)
    print(json.dumps({"built": built, "served": served, "health": health, "models": models}))

asyncio.run(main())
"""


@pytest.fixture(scope="module")
def serve_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("serve")
    config = tmp / "helexa.toml"
    config.write_text('[gateway]\nlisten = "127.0.0.1:0"\nmetrics_listen = "127.0.0.1:0"\n')
    models = tmp / "models.toml"
    models.write_text(f'[[models]]\nid = "demo"\npath = "{ROOT / "assets" / "helexa-demo.gguf"}"\n')
    proc = subprocess.run(
        [sys.executable, "-c", SERVE, "--serve", "--config", str(config), "--models", str(models)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,  # "-c" puts the cwd first on sys.path: this checkout's helexa is tested
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _heavy(modules: list[str]) -> list[str]:
    return [name for name in HEAVY if name in modules]


def test_serve_builds_its_gateway_without_the_engines_imports(serve_run: dict[str, Any]) -> None:
    assert "helexa.neuron.local" in serve_run["built"]  # the local neuron was really built
    assert not _heavy(serve_run["built"]), "imported before the gateway listens"


@pytest.mark.skipif(
    discovery._nvml() is None and discovery._installed_gpu_build() is not False,
    reason="without NVML, a CUDA or ROCm torch is how this host's devices are discovered",
)
def test_serve_answers_health_and_lists_models_without_the_engines_imports(
    serve_run: dict[str, Any],
) -> None:
    assert serve_run["health"] == {"status": "ok", "nodes_up": 1, "nodes": 1}
    assert [m["id"] for m in serve_run["models"]["data"]] == ["demo"]
    assert not _heavy(serve_run["served"]), "imported before any model is loaded"
