"""``helexa --serve`` must reach its listener without importing the engine's heavy stack.

Importing torch alone took seconds of a 4 s restart on an H200, before the gateway could
answer /health; none of it is needed until a model loads. The check runs in a fresh
interpreter, since this test process has long imported torch for other tests.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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

# Everything `helexa --serve` does before it listens: parse the command line and the
# settings, import the service, build it with its local neuron (what run_headless does).
SERVE_UP_TO_LISTEN = """
import json, sys
from helexa.cli import build_parser, settings_for
from helexa.cortex.service import Service
import helexa.neuron.server

args = build_parser().parse_args(sys.argv[1:])
service = Service(settings_for(args))
assert [n.name for n in service.fleet.nodes.values()] == ["local"], service.fleet.nodes
print(json.dumps(sorted(sys.modules)))
"""


def test_serve_builds_its_gateway_without_the_engines_imports(tmp_path: Path) -> None:
    config = tmp_path / "helexa.toml"
    config.write_text('[gateway]\nlisten = "127.0.0.1:0"\n')
    models = tmp_path / "models.toml"
    models.write_text(f'[[models]]\nid = "demo"\npath = "{ROOT / "assets" / "helexa-demo.gguf"}"\n')
    proc = subprocess.run(
        [sys.executable, "-c", SERVE_UP_TO_LISTEN, "--serve"]
        + ["--config", str(config), "--models", str(models)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,  # "-c" puts the cwd first on sys.path: this checkout's helexa is tested
    )
    assert proc.returncode == 0, proc.stderr
    loaded = set(json.loads(proc.stdout))
    assert "helexa.neuron.local" in loaded  # the local neuron was really built
    heavy = [name for name in HEAVY if name in loaded]
    assert not heavy, f"imported before any model is loaded: {heavy}"
