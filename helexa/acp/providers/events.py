"""What a provider hands back for a request: the events its answer streams as, or the error
that ends it, the same whichever wire API carried it.

A turn (:mod:`helexa.acp.turn`) reads these; each wire's decoder
(:mod:`helexa.acp.providers.decoder`) makes them from the server's SSE stream.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

FinishReason = Literal["stop", "length", "tool_calls", "refusal"]


@dataclass(frozen=True)
class TextDelta:
    text: str


@dataclass(frozen=True)
class ReasoningDelta:
    text: str


@dataclass(frozen=True)
class ToolCallStart:
    id: str
    name: str


@dataclass(frozen=True)
class ToolCallArgsDelta:
    id: str
    delta: str


@dataclass(frozen=True)
class ToolCallComplete:
    id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class Usage:
    input_tokens: int
    output_tokens: int
    cached_tokens: int = 0


@dataclass(frozen=True)
class Finish:
    reason: FinishReason


ProviderEvent = (
    TextDelta
    | ReasoningDelta
    | ToolCallStart
    | ToolCallArgsDelta
    | ToolCallComplete
    | Usage
    | Finish
)


class ProviderError(Exception):
    """The upstream refused, failed or broke the stream; the message is for a human."""


class Unreachable(ProviderError):
    """No answer at all (refused, dropped, timed out), as opposed to an error response."""
