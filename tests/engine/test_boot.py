"""What a load imports, and when: each check in a fresh interpreter, since this test
process has long imported everything for other tests."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

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
                  "imported": [m for m in boot.CUDA_MODULES if m in sys.modules]}))
"""


def _run(code: str) -> dict[str, object]:
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


def test_a_cpu_load_and_a_cached_prefix_never_import_torch_dynamo() -> None:
    """torch's CausalBias imports torch._dynamo (a second of a CPU load); off CUDA the
    mask it would materialize is made by the model instead."""
    out = _run(CPU_TURNS)
    assert out["cached"] > 0  # the second turn did prefill after a cached prefix
    assert out["dynamo"] is False


def test_the_cuda_only_imports_run_once_in_the_background() -> None:
    out = _run(CUDA_IMPORTS)
    assert out == {"again": True, "imported": ["torch.nn.attention.bias"]}
