"""Server-sent events both ways: framing what the gateway and neuron write, and decoding
what a neuron or endpoint sends back.

Every dialect streams SSE; OpenAI frames carry only ``data:``, Anthropic and Responses
frames a named ``event:`` too. The decoder is incremental so a reader can act on each event
as it arrives. :class:`StreamFormat` is what each dialect's stream writer offers the
gateway, so one relay loop serves them all.
"""

from __future__ import annotations

import codecs
import json
import re
from dataclasses import dataclass
from typing import Any, Protocol

from helexa.errors import ApiError

# A named stream event as the dialect translators emit it: ``(event name, payload)``.
Event = tuple[str, dict[str, Any]]


def sse(data: dict[str, Any] | str, event: str | None = None) -> bytes:
    """One SSE frame; dicts as compact JSON, strings as-is (one ``data:`` line per line)."""
    payload = (
        data
        if isinstance(data, str)
        else json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    )
    lines = [f"event: {event}"] if event else []
    lines.extend(f"data: {line}" for line in payload.split("\n"))
    return ("\n".join(lines) + "\n\n").encode()


SSE_DONE = sse("[DONE]")


def sse_events(events: list[Event]) -> bytes:
    """Translator output framed as named events, ready to write."""
    return b"".join(sse(payload, name) for name, payload in events)


@dataclass(frozen=True)
class SSEEvent:
    event: str | None
    data: str
    id: str | None = None

    def json(self) -> Any:
        return json.loads(self.data)


_EOL = re.compile(r"\r\n|\r|\n")


class SSEDecoder:
    """Incremental SSE parser (WHATWG rules): feed bytes as they arrive, get whole events.

    Frames may split anywhere, even inside a UTF-8 character or between CR and LF.
    """

    def __init__(self) -> None:
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._buffer = ""
        self._event: str | None = None
        self._data: list[str] = []
        self._id: str | None = None

    def feed(self, data: bytes) -> list[SSEEvent]:
        self._buffer += self._utf8.decode(data)
        events: list[SSEEvent] = []
        start = 0
        for match in _EOL.finditer(self._buffer):
            if match.group() == "\r" and match.end() == len(self._buffer):
                break  # maybe the first half of CRLF; wait for the next byte
            event = self._line(self._buffer[start : match.start()])
            start = match.end()
            if event is not None:
                events.append(event)
        self._buffer = self._buffer[start:]
        return events

    def end(self) -> list[SSEEvent]:
        """At end of stream, deliver a last event the upstream did not terminate.

        The spec drops it; we are lenient because a truncated stream's last complete
        payload is still worth having (a partial one fails the consumer's JSON parse).
        """
        self._buffer += self._utf8.decode(b"", final=True)
        events = [e for line in _EOL.split(self._buffer) if (e := self._line(line))]
        self._buffer = ""
        last = self._line("")
        return events + ([last] if last else [])

    def _line(self, line: str) -> SSEEvent | None:
        if not line:
            if not self._data:
                self._event = None
                return None
            event = SSEEvent(self._event, "\n".join(self._data), self._id)
            self._event, self._data = None, []
            return event
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id" and "\0" not in value:
            self._id = value
        return None


class StreamFormat(Protocol):
    """How one API writes the chunk stream: bytes per chunk, at the end, or on failure.

    Implemented by ``OpenAIStream``, ``AnthropicStream`` and ``ResponsesStream`` in each
    dialect's ``stream`` module.
    """

    def feed(self, chunk: dict[str, Any]) -> bytes: ...

    def finish(self) -> bytes: ...

    def fail(self, failure: ApiError) -> bytes: ...
