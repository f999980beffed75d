"""Decoders: each wire's SSE stream as :data:`~helexa.acp.providers.events.ProviderEvent`
values, one :class:`~helexa.wire.sse.SSEEvent` at a time.

They are pure state machines, so every shape a server sends is testable without I/O; the
helpers here read the JSON the OpenAI and Anthropic wires share.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any, ClassVar

from helexa.acp.providers.events import (
    FinishReason,
    ProviderError,
    ProviderEvent,
    ToolCallArgsDelta,
    ToolCallComplete,
    Usage,
)
from helexa.wire.sse import SSEEvent

log = logging.getLogger("helexa.acp.providers")

# -- helpers shared by the decoders --------------------------------------------------------


def parse_json(event: SSEEvent) -> dict[str, Any] | None:
    """The event's JSON object, or None (logged) when a server sent something malformed.

    One bad chunk must not kill a turn that is otherwise fine, so decoders skip it.
    """
    try:
        value = json.loads(event.data)
    except ValueError:
        log.warning("skipping malformed SSE payload: %.200r", event.data)
        return None
    if not isinstance(value, dict):
        log.warning("skipping non-object SSE payload: %.200r", event.data)
        return None
    return value


def error_text(body: Any) -> str:
    """The human part of an OpenAI/Anthropic error body, whatever its exact nesting."""
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict):
            message = err.get("message") or err.get("detail")
            kind = err.get("type") or err.get("code")
            if message:
                return f"{kind}: {message}" if isinstance(kind, str) else str(message)
        elif isinstance(err, str):
            return err
    return json.dumps(body)[:500]


def as_int(value: Any) -> int:
    return value if isinstance(value, int) else 0


def text_field(obj: dict[str, Any], key: str) -> str:
    """``obj[key]`` when it is a string, else "": servers send nulls where text would go."""
    value = obj.get(key)
    return value if isinstance(value, str) else ""


def openai_usage(usage: dict[str, Any], input_key: str, output_key: str) -> Usage:
    """OpenAI's usage object under either API's names (chat: ``prompt_tokens`` /
    ``completion_tokens``, Responses: ``input_tokens`` / ``output_tokens``); both put the
    cached count in ``<input_key>_details``."""
    details = usage.get(f"{input_key}_details")
    cached = as_int(details.get("cached_tokens")) if isinstance(details, dict) else 0
    return Usage(as_int(usage.get(input_key)), as_int(usage.get(output_key)), cached)


# -- decoders ------------------------------------------------------------------------------


@dataclass
class PendingCall:
    """A tool call still streaming: its arguments gather until the server says it is whole."""

    id: str
    name: str = ""
    arguments: str = ""
    complete: bool = False

    def add_arguments(self, part: Any) -> list[ProviderEvent]:
        """A piece of the arguments as it streamed: its :class:`ToolCallArgsDelta`, or nothing
        for an empty or non-text piece, or once the call is whole."""
        if self.complete or not isinstance(part, str) or not part:
            return []
        self.arguments += part
        return [ToolCallArgsDelta(self.id, part)]

    def completed(self) -> list[ProviderEvent]:
        """Its :class:`ToolCallComplete`, the first time only: a server may end a call twice
        (its own done event, then the end of the answer)."""
        if self.complete:
            return []
        self.complete = True
        return [ToolCallComplete(self.id, self.name, self.arguments or "{}")]


class Decoder:
    """One wire's SSE stream as :data:`ProviderEvent` values, one event at a time.

    A subclass reads each JSON payload in :meth:`_decode` and sets ``_reason`` once the server
    says how the answer ended; after :meth:`_finish` (``_done``) further events are ignored,
    and a stream that stops with no reason yet was cut short.
    """

    truncated: ClassVar[str]  # the error for a stream that stopped before its end

    def __init__(self) -> None:
        self._reason: FinishReason | None = None
        self._done = False

    def feed(self, event: SSEEvent) -> list[ProviderEvent]:
        if self._done:
            return []
        payload = parse_json(event)
        if payload is None:
            return []
        return self._decode(payload, payload.get("type") or event.event)

    def end(self) -> list[ProviderEvent]:
        """The byte stream ended: flush what is pending, or raise if it was cut short."""
        if self._done:
            return []
        if self._reason is None:
            raise ProviderError(self.truncated)
        return self._finish()

    def _decode(self, payload: dict[str, Any], kind: Any) -> list[ProviderEvent]:
        """One payload; ``kind`` is its ``type``, else the SSE event name."""
        raise NotImplementedError

    def _finish(self) -> list[ProviderEvent]:
        """The answer is over: complete what is pending and say why it ended."""
        raise NotImplementedError
