"""What a load imports, and when: each check in a fresh interpreter, since this test
process has long imported everything for other tests."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HAS_TRITON = importlib.util.find_spec("triton") is not None

# A CPU load of the demo model, then a second turn that extends the first prompt (the
# prefill after a cached prefix, which attends through the lower-right causal mask).
CPU_TURNS = """
import json, sys, threading
from helexa.demo import demo_model_path
from helexa.engine.generate import LoadedModel

model = LoadedModel.load(demo_model_path())
hello = {"role": "user", "content": "hello"}
turns = [[hello], [hello, {"role": "assistant", "content": "hi"}, {"role": "user", "content": "and?"}]]
usage = [list(model.stream_chat({"messages": m, "max_tokens": 4}, threading.Event()))[-1]["usage"]
         for m in turns]
print(json.dumps({"cached": usage[1]["prompt_tokens_details"]["cached_tokens"],
                  "dynamo": "torch._dynamo" in sys.modules}))
"""

CUDA_IMPORTS = """
import json, sys
from helexa.engine import boot

started = boot.import_for_cuda()
started.result(timeout=120)
print(json.dumps({"again": boot.import_for_cuda() is started,
                  "kernels": "helexa.engine.quant.triton_kernels" in sys.modules}))
"""

# Everything a CUDA load imports, the background imports included: each module of the
# models and the quantized ops (the Triton kernels' where Triton is installed), then
# what boot imports for any load and for a CUDA one.
LOAD_IMPORTS = """
import importlib, json, pkgutil, sys
import helexa.engine.models, helexa.engine.quant
from helexa.engine import boot

names = [f"{pkg.__name__}.{m.name}" for pkg in (helexa.engine.models, helexa.engine.quant)
         for m in pkgutil.iter_modules(pkg.__path__)]
imported = []
for name in [*names, *boot.ENGINE_MODULES]:
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name != "triton":
            raise
    else:
        imported.append(name)
boot.import_for_cuda().result(timeout=120)
print(json.dumps({"imported": imported, "dynamo": "torch._dynamo" in sys.modules}))
"""


def _run(code: str) -> dict[str, object]:
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


def test_a_cpu_load_and_a_cached_prefix_never_import_torch_dynamo() -> None:
    """torch._dynamo would be a second of a CPU load; off CUDA the lower-right mask is
    made by the model."""
    out = _run(CPU_TURNS)
    assert out["cached"] > 0  # the second turn did prefill after a cached prefix
    assert out["dynamo"] is False


def test_the_cuda_only_imports_run_once_in_the_background() -> None:
    out = _run(CUDA_IMPORTS)
    assert out == {"again": True, "kernels": HAS_TRITON}


def test_what_a_cuda_load_imports_never_imports_torch_dynamo() -> None:
    """Importing torch._dynamo holds the GIL for a second or more, and the background
    imports run beside the weights read, which it slowed (torch's CausalBias imported it;
    qwen3.lower_right_attention stands in for it)."""
    out = _run(LOAD_IMPORTS)
    modules = {"qwen3", "qwen3_moe", "qwen3_next", "layer_split", "cuda_graph"}
    assert {f"helexa.engine.models.{m}" for m in modules} <= set(out["imported"])
    assert {"helexa.engine.quant.ops", "helexa.engine.generate"} <= set(out["imported"])
    assert ("helexa.engine.models.decode_kernels" in out["imported"]) == HAS_TRITON
    assert out["dynamo"] is False
