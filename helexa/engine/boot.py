"""A load's steps, timed, and the imports before its first weight moves.

A load on the local neuron runs, in order: importing torch and the engine (the gateway
imports neither until the first load, and on a GPU host they take seconds), reading the
host's devices (discovery, health), preflight (the GGUF header, the architecture, the
fit), opening the device (its worker thread and CUDA context), then LoadedModel.load's
own steps: the weights read, the tokenizer, the model built, the KV cache, the warm-up.
One :class:`Phases` follows the load through all of them, on the neuron's event loop, its
threads and the device's worker in turn (never two at once), so the engine's one log line
``loaded X in N s (import torch ..., ..., warm-up ...)`` accounts for the time from the
request to the model answering, and the next slow load says which step it was (a GGUF's
weights read its parts too, after the steps: ``...); weights read: waiting on reads ...``).

Nothing heavy is imported by this module: the neuron starts timing before torch exists.
"""

from __future__ import annotations

import importlib
import threading
import time
from concurrent.futures import Future

# The modules a load needs beyond torch, in the order it needs them (preflight reads the
# header and checks the architecture; the worker loads): imported as one step, so the
# log line shows what importing cost instead of spreading it over the steps that happen
# to import first.
ENGINE_MODULES = (
    "helexa.engine.checkpoint.gguf",
    "helexa.engine.checkpoint.safetensors",
    "helexa.engine.models.architectures",
    "helexa.engine.models.layer_split",
    "helexa.engine.generate",
    "helexa.engine.worker",
)

_cuda_imports: Future[None] | None = None
_cuda_lock = threading.Lock()


class Phases:
    """Seconds per step of a load, for the log line that says where a slow load went
    (importing, preflight, the device's context, reading weights, building the model, the
    KV cache, the warm-up's compiles and graph captures), so an operator can tell a cold
    cache from a slow disk. A step's time runs from the end of the one before, so the
    steps add up to the whole, and a step that waits for work done in the background
    shows only the wait."""

    def __init__(self) -> None:
        self.start = self.last = time.perf_counter()
        self.seconds: dict[str, float] = {}
        self.parts: dict[str, dict[str, float]] = {}

    def done(self, phase: str) -> None:
        now = time.perf_counter()
        self.seconds[phase] = now - self.last
        self.last = now

    def split(self, phase: str, parts: dict[str, float]) -> None:
        """Where ``phase``'s seconds went, by part (as the weights read's loader timed
        them), shown after the steps: ``N s (step N s, ...); phase: part N s, ...``, so
        the steps' list reads as before."""
        if parts:
            self.parts[phase] = parts

    def __str__(self) -> str:
        steps = ", ".join(f"{name} {s:.1f} s" for name, s in self.seconds.items())
        line = f"{self.last - self.start:.1f} s ({steps})"
        for phase, parts in self.parts.items():
            line += f"; {phase}: " + ", ".join(f"{name} {s:.2f} s" for name, s in parts.items())
        return line


def import_engine(phases: Phases) -> None:
    """Import torch, then the engine (:data:`ENGINE_MODULES`), each timed as a step;
    blocking, so the neuron runs it on a thread."""
    import torch  # noqa: F401

    phases.done("import torch")
    for name in ENGINE_MODULES:
        importlib.import_module(name)
    phases.done("import engine")


def import_for_cuda() -> Future[None]:
    """Start importing what only a CUDA load's later steps need (Triton and helexa's
    kernels, for the warm-up's first quantized matmul and decode step) on a thread of its
    own, once per process; the future is done when they are. Started as soon as a load is
    known to go to a GPU, they overlap its device context and weights read (which leave
    the interpreter free while the driver and the disk work) instead of running inside
    the warm-up; the warm-up waits for them, so nothing is imported on another thread
    while it captures CUDA graphs. Nothing imported here may import torch._dynamo: that
    is a second or more of import holding the GIL, which slowed the weights read beside
    it while this thread imported torch's CausalBias (qwen3.lower_right_attention now
    calls its kernels itself)."""
    global _cuda_imports
    with _cuda_lock:
        if _cuda_imports is None:
            _cuda_imports = Future()
            thread = threading.Thread(
                target=_import_cuda, args=(_cuda_imports,), name="helexa-imports", daemon=True
            )
            thread.start()
        return _cuda_imports


def _import_cuda(done: Future[None]) -> None:
    try:
        from helexa.engine.models.cuda_graph import triton_module
        from helexa.engine.quant.ops import kernels

        kernels()  # each None (and nothing imported) where Triton is not installed
        triton_module("decode_kernels")
    except BaseException as exc:  # the warm-up imports them again and fails as it would
        done.set_exception(exc)
    else:
        done.set_result(None)
