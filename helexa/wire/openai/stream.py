"""The OpenAI chunk stream every neuron sends, and every reader of it shares.

Everyone who watches the stream asks whether a chunk carries output (metrics for the first
token, the TUI for its live rate, the translators for their output-token fallback), so the
rule lives here once (:func:`carries_output`). The Anthropic and Responses translators walk
chunks the same way (:class:`ChunkTranslator`), and OpenAI clients get the chunks back
nearly as they came (:class:`OpenAIStream`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from helexa.errors import ApiError
from helexa.wire.errors import error_body
from helexa.wire.openai.translate import as_function_call
from helexa.wire.sse import SSE_DONE, Event, sse


def delta_carries_output(delta: Mapping[str, Any]) -> bool:
    """Whether a chat delta holds generated output: text, reasoning or a tool-call fragment,
    not just the role or nothing."""
    return bool(delta.get("content") or delta.get("reasoning_content") or delta.get("tool_calls"))


def choice_carries_output(choice: Mapping[str, Any]) -> bool:
    """Whether one chunk choice holds generated output; a legacy completions choice has no
    ``delta``, its output is ``text``."""
    delta = choice.get("delta")
    if delta is None:
        return bool(choice.get("text"))
    return bool(delta) and delta_carries_output(delta)


def carries_output(chunk: Mapping[str, Any]) -> bool:
    """Whether a chunk holds generated output (not just a role or the usage): the first one
    that does marks the first token."""
    return any(choice_carries_output(choice) for choice in chunk.get("choices") or ())


@dataclass
class StreamState:
    """What both translators track across chunks."""

    started: bool = False
    finished: bool = False
    finish_reason: str | None = None
    stop_sequence: str | None = None
    usage: dict[str, Any] | None = None
    deltas: int = 0  # chunks that carried content: the output-token fallback

    def absorb(self, chunk: dict[str, Any]) -> list[dict[str, Any]]:
        """Record usage and finish; return the choice-0 entries that carry a delta."""
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        choices = [c for c in chunk.get("choices") or [] if c.get("index", 0) == 0]
        for choice in choices:
            # Translators read chat chunks only, so a legacy ``text`` choice counts for nothing.
            if delta_carries_output(choice.get("delta") or {}):
                self.deltas += 1
        return choices


class ChunkTranslator(ABC):
    """The walk over OpenAI chunks that every dialect's stream translator shares.

    Per choice-0 delta: reasoning, then text, then each tool-call fragment, and a finish
    reason closes the open block; the dialect says what each of those emits, and names its
    reasoning and text blocks (``reasoning_kind``, ``text_kind``).
    """

    reasoning_kind: ClassVar[str]
    text_kind: ClassVar[str]

    def __init__(self) -> None:
        self._state = StreamState()

    def start(self) -> list[Event]:
        """The dialect's opening events, once; call early to get headers and first bytes out."""
        if self._state.started:
            return []
        self._state.started = True
        return self._opening()

    def feed(self, chunk: dict[str, Any]) -> list[Event]:
        if self._state.finished:
            return []
        events = self.start()
        for choice in self._state.absorb(chunk):
            delta = choice.get("delta") or {}
            if delta.get("reasoning_content"):
                events += self._text(self.reasoning_kind, delta["reasoning_content"])
            if delta.get("content"):
                events += self._text(self.text_kind, delta["content"])
            for call in delta.get("tool_calls") or []:
                events += self._tool(call)
            if choice.get("finish_reason"):
                self._state.finish_reason = choice["finish_reason"]
                self._state.stop_sequence = choice.get("stop_sequence")
                events += self._close()
        return events

    @abstractmethod
    def _opening(self) -> list[Event]: ...

    @abstractmethod
    def _text(self, kind: str, text: str) -> list[Event]:
        """Append ``text`` to the open block of ``kind``, opening one if needed."""

    @abstractmethod
    def _tool(self, call: dict[str, Any]) -> list[Event]: ...

    @abstractmethod
    def _close(self) -> list[Event]:
        """Close the open block, if any."""


# helexa's own field on a neuron's chunk (the engine puts ``{"prompt_tokens": N}`` on its
# first): facts the gateway can use early, never shown to an OpenAI client.
HELEXA_FIELD = "x_helexa"


def helexa_field(chunk: Mapping[str, Any]) -> dict[str, Any]:
    """The chunk's ``x_helexa`` object, or an empty one."""
    value = chunk.get(HELEXA_FIELD)
    return value if isinstance(value, dict) else {}


class OpenAIStream:
    """OpenAI chat or completions chunks, re-serialised with the client's model name.

    The neuron always reports usage; it is forwarded only when the client asked with
    ``stream_options.include_usage``, as OpenAI does. A client that asked with the
    deprecated ``functions`` gets its call as ``function_call`` deltas (``functions``).
    helexa's own field (``x_helexa``) is dropped.
    """

    def __init__(self, model: str, include_usage: bool, functions: bool = False) -> None:
        self.model = model
        self.include_usage = include_usage
        self.functions = functions

    def feed(self, chunk: dict[str, Any]) -> bytes:
        if HELEXA_FIELD in chunk:
            chunk = {k: v for k, v in chunk.items() if k != HELEXA_FIELD}
        if "usage" in chunk and not self.include_usage:
            if not chunk.get("choices"):
                return b""
            chunk = {k: v for k, v in chunk.items() if k != "usage"}
        if self.functions:
            chunk = as_function_call(chunk)
        return sse({**chunk, "model": self.model})

    def finish(self) -> bytes:
        return SSE_DONE

    def fail(self, failure: ApiError) -> bytes:
        return sse(error_body("openai", failure))
