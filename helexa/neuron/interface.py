"""The Neuron protocol: the one seam between the control plane and the node plane.

cortex never knows whether a neuron is in-process (``local.py``) or across the network
(``remote.py``); both implement :class:`Neuron`. ``server.py`` serves any Neuron over the
neuron HTTP API, so a remote host runs the identical code.

Generation speaks OpenAI as the internal lingua franca: a request is an OpenAI
chat-completions (or legacy completions) body as a plain dict, and the stream is the
sequence of OpenAI chunk dicts (``chat.completion.chunk`` / ``text_completion``) that
would be sent as SSE ``data:`` payloads, the last one carrying ``usage`` (the engine's first
chat chunk also carries helexa's own ``x_helexa: {"prompt_tokens": N}``, which the gateway
uses early and never shows an OpenAI client). Keeping the
events as the wire dicts means a remote neuron's stream is forwarded without re-modelling
each chunk, and the dialect translators in ``helexa.wire`` consume exactly one shape.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Literal, Protocol, runtime_checkable

from pydantic import BaseModel, Field

from helexa.errors import ApiError

ModelStatus = Literal["loaded", "loading", "unloaded", "failed"]


class DeviceInfo(BaseModel):
    """Static facts about one accelerator (or the CPU), from ``GET /discovery``."""

    index: int
    name: str
    kind: Literal["cuda", "cpu"] = "cuda"
    vram_total_mb: int
    compute_capability: str | None = None


class Discovery(BaseModel):
    hostname: str
    os: str
    kernel: str = ""
    driver_version: str | None = None
    cuda_version: str | None = None
    devices: list[DeviceInfo] = Field(default_factory=list)


class DeviceHealth(BaseModel):
    """Live readings for one device, from ``GET /health``."""

    index: int
    vram_used_mb: int
    vram_free_mb: int
    utilization_pct: float | None = None
    temp_c: float | None = None


class Health(BaseModel):
    uptime_secs: float
    devices: list[DeviceHealth] = Field(default_factory=list)


class ModelState(BaseModel):
    """One model as a neuron sees it, from ``GET /models``."""

    id: str
    status: ModelStatus
    devices: list[int] = Field(default_factory=list)
    vram_used_mb: int = 0
    # MiB on each of ``devices``, in order, for a model split across several (empty: one).
    device_vram_mb: list[int] = Field(default_factory=list)
    prompt_cache_mb: int = 0  # host memory its prompt snapshots hold now
    context_length: int | None = None
    progress: float | None = None  # 0..1 while loading
    error: str | None = None  # why, when status == "failed"


class LoadRequest(BaseModel):
    """Body of ``POST /models/load``."""

    model_id: str
    quant: str | None = None
    devices: list[int] | None = None
    tensor_parallel: int | None = None
    context_length: int | None = None


class UnloadRequest(BaseModel):
    model_id: str


class NeuronError(ApiError):
    """A failure a neuron reports in the neuron API's error shape.

    ``status`` is the HTTP status the neuron API uses for it; ``extra`` carries structured
    fields (a preflight error's ``needed_mb``/``free_mb``) so they survive the HTTP hop and
    reach the gateway's client unchanged.
    """

    status = 500
    type = "neuron_error"

    def to_body(self) -> dict[str, Any]:
        return {
            "error": {"type": self.type, "message": self.message, "code": self.code, **self.extra}
        }

    @classmethod
    def from_body(cls, status: int, body: Any) -> NeuronError:
        err = body.get("error") if isinstance(body, dict) else None
        if not isinstance(err, dict):
            return cls(f"neuron answered HTTP {status}: {body!r}"[:500], status=status)
        extra = {k: v for k, v in err.items() if k not in ("type", "message", "code")}
        return cls(
            str(err.get("message", "")),
            status=status,
            type=str(err.get("type", "neuron_error")),
            code=err.get("code"),
            extra=extra,
        )


@runtime_checkable
class Neuron(Protocol):
    """What cortex needs from a node, local or remote."""

    name: str

    async def discovery(self) -> Discovery: ...

    async def health(self) -> Health: ...

    async def models(self) -> list[ModelState]:
        """Every model this node can serve (loaded or not), with its status."""
        ...

    async def load(self, request: LoadRequest) -> ModelState:
        """Load and return once loaded; raise NeuronError (preflight errors included)."""
        ...

    async def unload(self, model_id: str) -> None: ...

    def chat(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Stream ``chat.completion.chunk`` dicts for an OpenAI chat request.

        The stream always ends with a chunk carrying ``usage``. Closing the iterator
        (``aclose``) cancels generation. Errors before the first chunk raise NeuronError;
        errors after it raise NeuronError from the iterator.
        """
        ...

    def complete(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Stream ``text_completion`` chunk dicts for a legacy completions request."""
        ...

    async def count_tokens(self, request: dict[str, Any]) -> int:
        """Prompt tokens an OpenAI chat request renders to (chat template + tools)."""
        ...

    async def close(self) -> None: ...
