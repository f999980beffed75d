"""The OpenAI chunk stream every neuron sends: the state a dialect's stream translator
keeps while reading it, and how it is written back to an OpenAI client
(:class:`OpenAIStream`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from helexa.errors import ApiError
from helexa.wire.errors import error_body
from helexa.wire.sse import SSE_DONE, sse


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


class OpenAIStream:
    """OpenAI chat or completions chunks, re-serialised with the client's model name.

    The neuron always reports usage; it is forwarded only when the client asked with
    ``stream_options.include_usage``, as OpenAI does.
    """

    def __init__(self, model: str, include_usage: bool) -> None:
        self.model = model
        self.include_usage = include_usage

    def feed(self, chunk: dict[str, Any]) -> bytes:
        if "usage" in chunk and not self.include_usage:
            if not chunk.get("choices"):
                return b""
            chunk = {k: v for k, v in chunk.items() if k != "usage"}
        return sse({**chunk, "model": self.model})

    def finish(self) -> bytes:
        return SSE_DONE

    def fail(self, failure: ApiError) -> bytes:
        return sse(error_body("openai", failure))
