"""A Neuron test double that replays scripted answers.

It speaks the real Neuron protocol (OpenAI chunk dicts, NeuronError), so the gateway and
the neuron HTTP API run unmodified in front of it. Everything it receives is recorded for
the test to inspect, and its cancellation is observable as an event rather than a sleep.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from helexa.neuron.interface import (
    Discovery,
    Health,
    LoadRequest,
    ModelState,
    ModelStatus,
    NeuronError,
)
from tests.support import devices
from tests.support.devices import Gpu

CREATED = 1_700_000_000
GPU = Gpu("Scripted GPU", 24576, used_mb=1024)


@dataclass
class ToolCallScript:
    """One tool call the model emits, its JSON arguments split into streamed pieces."""

    id: str
    name: str
    arguments: list[str]


@dataclass
class Reply:
    """What the scripted model answers to one request.

    Order within a reply is the order a Qwen3-style model produces: reasoning, text, then
    tool calls. ``fail_after`` raises ``error`` after that many chunks (0: before the first
    one); ``block_after`` stops after that many chunks and waits until cancelled, or until
    ``resume`` is set when there is one.
    """

    text: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    tool_calls: list[ToolCallScript] = field(default_factory=list)
    finish_reason: str | None = None  # default: tool_calls if any, else stop
    stop_sequence: str | None = None
    prompt_tokens: int = 11
    completion_tokens: int | None = None  # default: one per content piece
    fail_after: int | None = None
    error: Exception = field(
        default_factory=lambda: NeuronError(
            "scripted failure", status=500, type="server_error", code="generation_failed"
        )
    )
    block_after: int | None = None
    resume: asyncio.Event | None = None

    @property
    def finish(self) -> str:
        return self.finish_reason or ("tool_calls" if self.tool_calls else "stop")

    @property
    def output_tokens(self) -> int:
        if self.completion_tokens is not None:
            return self.completion_tokens
        pieces = sum(len(c.arguments) + 1 for c in self.tool_calls)
        return len(self.text) + len(self.reasoning) + pieces

    def usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.output_tokens,
            "total_tokens": self.prompt_tokens + self.output_tokens,
        }

    def chat_chunks(self, model: str, chunk_id: str) -> list[dict[str, Any]]:
        """The ``chat.completion.chunk`` sequence for this reply, usage chunk last."""
        base = {"id": chunk_id, "object": "chat.completion.chunk", "created": CREATED}

        def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
            choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish}
            if finish and self.stop_sequence:
                choice["stop_sequence"] = self.stop_sequence
            return {**base, "model": model, "choices": [choice]}

        out = [chunk({"role": "assistant", "content": ""})]
        out += [chunk({"reasoning_content": piece}) for piece in self.reasoning]
        out += [chunk({"content": piece}) for piece in self.text]
        for n, call in enumerate(self.tool_calls):
            head = {"index": n, "id": call.id, "type": "function"}
            out.append(chunk({"tool_calls": [{**head, "function": {"name": call.name}}]}))
            for piece in call.arguments:
                out.append(chunk({"tool_calls": [{"index": n, "function": {"arguments": piece}}]}))
        out.append(chunk({}, self.finish))
        out.append({**base, "model": model, "choices": [], "usage": self.usage()})
        return out

    def completion_chunks(self, model: str, chunk_id: str) -> list[dict[str, Any]]:
        """The legacy ``text_completion`` chunk sequence, usage chunk last."""
        base = {"id": chunk_id, "object": "text_completion", "created": CREATED, "model": model}

        def chunk(text: str, finish: str | None = None) -> dict[str, Any]:
            choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
            return {**base, "choices": [choice]}

        out = [chunk(piece) for piece in self.text]
        out.append(chunk("", self.finish))
        out.append({**base, "choices": [], "usage": self.usage()})
        return out


Script = Reply | Callable[[dict[str, Any]], Reply]


def word_count(request: dict[str, Any]) -> int:
    """The double's token count: whitespace words in every message's string content."""
    total = 0
    for message in request.get("messages") or []:
        content = message.get("content")
        if isinstance(content, str):
            total += len(content.split())
    return total


class ScriptedNeuron:
    """A Neuron whose models, answers and failures are set by the test."""

    def __init__(
        self,
        name: str = "scripted",
        models: dict[str, ModelStatus] | None = None,
        script: Script | None = None,
    ) -> None:
        self.name = name
        self.states: dict[str, ModelStatus] = dict(models or {"test-model": "loaded"})
        self.script: Script = script or Reply(text=["Hello", " world"])
        self.load_errors: dict[str, NeuronError] = {}
        self.requests: list[dict[str, Any]] = []  # chat and completion bodies, in order
        self.count_requests: list[dict[str, Any]] = []
        self.loads: list[LoadRequest] = []
        self.unloads: list[str] = []
        self.started = asyncio.Event()  # a generation began
        self.cancelled = asyncio.Event()  # a generation was closed before it ended
        self.closed = False
        self._streams = 0

    # -- node facts -------------------------------------------------------------------------
    async def discovery(self) -> Discovery:
        return devices.discovery(f"{self.name}.test", [GPU], os="Linux")

    async def health(self) -> Health:
        return devices.health([GPU])

    async def models(self) -> list[ModelState]:
        return [ModelState(id=m, status=s) for m, s in self.states.items()]

    # -- lifecycle --------------------------------------------------------------------------
    async def load(self, request: LoadRequest) -> ModelState:
        self.loads.append(request)
        if request.model_id not in self.states:
            raise NeuronError(
                f"model {request.model_id!r} is not available on {self.name!r}",
                status=404,
                type="not_found_error",
                code="model_not_available",
            )
        if request.model_id in self.load_errors:
            self.states[request.model_id] = "failed"
            raise self.load_errors[request.model_id]
        self.states[request.model_id] = "loaded"
        return ModelState(id=request.model_id, status="loaded", devices=[0], vram_used_mb=512)

    async def unload(self, model_id: str) -> None:
        self.unloads.append(model_id)
        if model_id in self.states:
            self.states[model_id] = "unloaded"

    # -- generation -------------------------------------------------------------------------
    def _reply(self, request: dict[str, Any]) -> Reply:
        return self.script(request) if callable(self.script) else self.script

    def chat(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        return self._stream(request, "chat")

    def complete(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        return self._stream(request, "completion")

    async def _stream(self, request: dict[str, Any], kind: str) -> AsyncIterator[dict[str, Any]]:
        self.requests.append(request)
        model = str(request.get("model"))
        if self.states.get(model) != "loaded":
            raise NeuronError(
                f"model {model!r} is not loaded on {self.name!r}",
                status=409,
                type="invalid_request_error",
                code="model_not_loaded",
            )
        reply = self._reply(request)
        self._streams += 1
        chunk_id = f"chatcmpl-{self.name}-{self._streams}"
        if kind == "chat":
            chunks = reply.chat_chunks(model, chunk_id)
        else:
            chunks = reply.completion_chunks(model, chunk_id)
        ended = False  # ended on its own (done or scripted failure), not closed from outside
        self.started.set()
        try:
            for n, chunk in enumerate(chunks):
                if n == reply.fail_after:
                    ended = True
                    raise reply.error
                if n == reply.block_after:
                    # Only cancellation gets past this, or the test setting ``resume``.
                    await (reply.resume or asyncio.Event()).wait()
                yield chunk
            ended = True
        finally:
            if not ended:
                self.cancelled.set()

    async def count_tokens(self, request: dict[str, Any]) -> int:
        self.count_requests.append(request)
        return word_count(request)

    async def close(self) -> None:
        self.closed = True
