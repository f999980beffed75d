"""SSE framing and the per-stream translators.

The translators are pure state machines: OpenAI ``chat.completion.chunk`` dicts in, ordered
``(event, payload)`` pairs out; the gateway frames them with :func:`sse` and owns all I/O.
Each buffers nothing beyond the block it is in, so a slow client back-pressures upstream.

Both assume what every engine does: tool calls stream one after another. A fragment for an
earlier, already closed call is still delivered (at that call's index) rather than lost.
"""

from __future__ import annotations

import codecs
import json
import re
import time
from dataclasses import dataclass, field
from typing import Any

from helexa.wire.responses import ResponsesRequest
from helexa.wire.translate import (
    anthropic_usage,
    function_call_item,
    id_suffix,
    map_stop_reason,
    message_item,
    new_id,
    output_text_part,
    reasoning_item,
    responses_envelope,
    responses_status,
    responses_usage,
)

Event = tuple[str, dict[str, Any]]

# -- framing -------------------------------------------------------------------------------


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


def chat_chunk_to_sse(chunk: dict[str, Any]) -> bytes:
    """An OpenAI chunk as its ``data:`` frame (OpenAI streams carry no ``event:`` names)."""
    return sse(chunk)


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


# -- Anthropic -----------------------------------------------------------------------------


def error_event(message: str, type: str = "api_error") -> Event:
    """A mid-stream Anthropic failure (headers are long gone, so it rides the stream)."""
    return ("error", {"type": "error", "error": {"type": type, "message": message}})


PING: Event = ("ping", {"type": "ping"})


@dataclass
class _StreamState:
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
            delta = choice.get("delta") or {}
            if delta.get("content") or delta.get("reasoning_content") or delta.get("tool_calls"):
                self.deltas += 1
        return choices


class AnthropicStreamTranslator:
    """OpenAI chunks in, Anthropic Messages stream events out, in Anthropic's order.

    ``message_start`` → per block ``content_block_start`` / ``content_block_delta`` /
    ``content_block_stop`` (thinking, text and each tool call its own block, a new one when
    the kind changes) → ``message_delta`` (stop reason, usage) → ``message_stop``.
    """

    def __init__(self, model: str, message_id: str | None = None, input_tokens: int = 0) -> None:
        self.model = model
        self.message_id = message_id or f"msg_{new_id()}"
        self.input_tokens = input_tokens
        self._state = _StreamState()
        self._blocks = 0  # blocks opened so far; the next block's index
        self._open: tuple[str, int] | None = None  # (kind, block index); kind "tool:<n>"
        self._tool_blocks: dict[int, int] = {}  # tool call index -> block index

    def start(self) -> list[Event]:
        """``message_start``, once; call early to get headers and first bytes out."""
        if self._state.started:
            return []
        self._state.started = True
        message = {
            "id": self.message_id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": self.input_tokens, "output_tokens": 0},
        }
        return [("message_start", {"type": "message_start", "message": message})]

    def feed(self, chunk: dict[str, Any]) -> list[Event]:
        if self._state.finished:
            return []
        events = self.start()
        for choice in self._state.absorb(chunk):
            delta = choice.get("delta") or {}
            if delta.get("reasoning_content"):
                events += self._text("thinking", delta["reasoning_content"])
            if delta.get("content"):
                events += self._text("text", delta["content"])
            for call in delta.get("tool_calls") or []:
                events += self._tool(call)
            if choice.get("finish_reason"):
                self._state.finish_reason = choice["finish_reason"]
                self._state.stop_sequence = choice.get("stop_sequence")
                events += self._close()
        return events

    def finish(self) -> list[Event]:
        """Close whatever is open and end the message; idempotent, safe after truncation."""
        if self._state.finished:
            return []
        events = self.start() + self._close()
        self._state.finished = True
        state = self._state
        stop_reason = map_stop_reason(state.finish_reason, state.stop_sequence)
        usage = anthropic_usage(state.usage) if state.usage else {"output_tokens": state.deltas}
        delta = {
            "stop_reason": stop_reason,
            "stop_sequence": state.stop_sequence if stop_reason == "stop_sequence" else None,
        }
        events.append(("message_delta", {"type": "message_delta", "delta": delta, "usage": usage}))
        events.append(("message_stop", {"type": "message_stop"}))
        return events

    def error(self, message: str, type: str = "api_error") -> list[Event]:
        """End the stream with an error event, after closing the open content block so a
        client that tracks blocks sees each one it was shown end; later feed/finish calls
        emit nothing."""
        if self._state.finished:
            return []
        events = self._close()
        self._state.finished = True
        return events + [error_event(message, type)]

    def _begin(self, kind: str, block: dict[str, Any]) -> list[Event]:
        events = self._close()
        index = self._blocks
        self._blocks += 1
        self._open = (kind, index)
        start = {"type": "content_block_start", "index": index, "content_block": block}
        return events + [("content_block_start", start)]

    def _close(self) -> list[Event]:
        if self._open is None:
            return []
        kind, index = self._open
        self._open = None
        events: list[Event] = []
        if kind == "thinking":
            # Clients replay thinking blocks with their signature; we have none to give.
            signature = {"type": "signature_delta", "signature": ""}
            events.append(_block_delta(index, signature))
        events.append(("content_block_stop", {"type": "content_block_stop", "index": index}))
        return events

    def _text(self, kind: str, text: str) -> list[Event]:
        events: list[Event] = []
        if self._open is None or self._open[0] != kind:
            block = (
                {"type": "thinking", "thinking": "", "signature": ""}
                if kind == "thinking"
                else {"type": "text", "text": ""}
            )
            events = self._begin(kind, block)
        assert self._open is not None
        delta = (
            {"type": "thinking_delta", "thinking": text}
            if kind == "thinking"
            else {"type": "text_delta", "text": text}
        )
        return events + [_block_delta(self._open[1], delta)]

    def _tool(self, call: dict[str, Any]) -> list[Event]:
        n = call.get("index", 0)
        function = call.get("function") or {}
        events: list[Event] = []
        if n not in self._tool_blocks:
            block = {
                "type": "tool_use",
                "id": call.get("id") or f"toolu_{id_suffix(self.message_id)}_{n}",
                "name": function.get("name") or "",
                "input": {},
            }
            events = self._begin(f"tool:{n}", block)
            self._tool_blocks[n] = self._blocks - 1
        if function.get("arguments"):
            delta = {"type": "input_json_delta", "partial_json": function["arguments"]}
            events.append(_block_delta(self._tool_blocks[n], delta))
        return events


def _block_delta(index: int, delta: dict[str, Any]) -> Event:
    return ("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta})


# -- OpenAI Responses ----------------------------------------------------------------------


@dataclass
class _Item:
    """An output item being streamed: its kind, place, id and text so far."""

    kind: str  # "reasoning" | "message" | "function_call"
    output_index: int
    item_id: str
    parts: list[str] = field(default_factory=list)
    call_id: str = ""
    name: str = ""

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def done(self, status: str) -> dict[str, Any]:
        if self.kind == "reasoning":
            return reasoning_item(self.item_id, self.text, status)
        if self.kind == "message":
            return message_item(self.item_id, self.text, status)
        return function_call_item(self.item_id, self.call_id, self.name, self.text, status)


class ResponsesStreamTranslator:
    """OpenAI chunks in, OpenAI Responses stream events out, numbered by ``sequence_number``.

    ``response.created`` → ``response.in_progress`` → per output item
    ``response.output_item.added`` → its part/delta/done events → ``response.output_item.done``
    → ``response.completed`` (or ``response.incomplete``) carrying the whole Response, built
    by the same code as the non-streaming answer.
    """

    def __init__(
        self,
        req: ResponsesRequest | str,
        response_id: str | None = None,
        *,
        created_at: float | None = None,
        input_tokens: int = 0,
    ) -> None:
        self.req = (
            req if isinstance(req, ResponsesRequest) else ResponsesRequest(model=req, input="")
        )
        self.response_id = response_id or f"resp_{new_id()}"
        self.created_at = created_at if created_at is not None else int(time.time())
        self.input_tokens = input_tokens
        self._suffix = id_suffix(self.response_id)
        self._state = _StreamState()
        self._sequence = 0
        self._items: list[_Item] = []
        self._output: dict[int, dict[str, Any]] = {}  # output index -> finished item
        self._open: _Item | None = None
        self._calls: dict[int, _Item] = {}  # tool call index -> its item

    def start(self) -> list[Event]:
        """``response.created`` and ``response.in_progress``, once."""
        if self._state.started:
            return []
        self._state.started = True
        response = self._envelope("in_progress")
        return [
            self._event("response.created", response=response),
            self._event("response.in_progress", response=response),
        ]

    def feed(self, chunk: dict[str, Any]) -> list[Event]:
        if self._state.finished:
            return []
        events = self.start()
        for choice in self._state.absorb(chunk):
            delta = choice.get("delta") or {}
            if delta.get("reasoning_content"):
                events += self._text("reasoning", delta["reasoning_content"])
            if delta.get("content"):
                events += self._text("message", delta["content"])
            for call in delta.get("tool_calls") or []:
                events += self._tool(call)
            if choice.get("finish_reason"):
                self._state.finish_reason = choice["finish_reason"]
                events += self._close()
        return events

    def finish(self) -> list[Event]:
        """Close the open item and emit the final Response; idempotent."""
        if self._state.finished:
            return []
        events = self.start() + self._close()
        self._state.finished = True
        status, incomplete = responses_status(self._state.finish_reason)
        usage = responses_usage(self._state.usage) or responses_usage(
            {"prompt_tokens": self.input_tokens, "completion_tokens": self._state.deltas}
        )
        response = self._envelope(status, usage=usage, incomplete_details=incomplete)
        name = "response.completed" if status == "completed" else "response.incomplete"
        return events + [self._event(name, response=response)]

    def fail(self, message: str, code: str = "server_error") -> list[Event]:
        """End the stream on an upstream failure: an ``error`` event, then ``response.failed``."""
        if self._state.finished:
            return []
        events = self.start()
        self._state.finished = True
        error = {"code": code, "message": message}
        response = self._envelope("failed", error=error)
        return events + [
            self._event("error", code=code, message=message, param=None),
            self._event("response.failed", response=response),
        ]

    def _event(self, name: str, **fields: Any) -> Event:
        payload = {"type": name, "sequence_number": self._sequence, **fields}
        self._sequence += 1
        return (name, payload)

    def _envelope(self, status: str, **extra: Any) -> dict[str, Any]:
        output = [self._output[i] for i in sorted(self._output)]
        return responses_envelope(
            self.req,
            response_id=self.response_id,
            created_at=self.created_at,
            status=status,
            output=output,
            **extra,
        )

    def _begin(self, kind: str, **fields: Any) -> tuple[_Item, list[Event]]:
        events = self._close()
        index = len(self._items)
        prefix = {"reasoning": "rs", "message": "msg", "function_call": "fc"}[kind]
        item = _Item(kind, index, f"{prefix}_{self._suffix}_{index}", **fields)
        self._items.append(item)
        self._open = item
        added = item.done("in_progress")
        if kind != "function_call":
            added["content"] = []
        events.append(self._event("response.output_item.added", output_index=index, item=added))
        if kind == "reasoning":
            events.append(self._part("response.content_part.added", item, _reasoning_part("")))
        elif kind == "message":
            events.append(self._part("response.content_part.added", item, output_text_part("")))
        return item, events

    def _close(self) -> list[Event]:
        item = self._open
        if item is None:
            return []
        self._open = None
        status = "completed"
        if item.kind == "message" and responses_status(self._state.finish_reason)[0] != "completed":
            status = "incomplete"
        where = {"item_id": item.item_id, "output_index": item.output_index}
        events: list[Event] = []
        if item.kind == "reasoning":
            events.append(
                self._event(
                    "response.reasoning_text.done", **where, content_index=0, text=item.text
                )
            )
            events.append(
                self._part("response.content_part.done", item, _reasoning_part(item.text))
            )
        elif item.kind == "message":
            events.append(
                self._event(
                    "response.output_text.done",
                    **where,
                    content_index=0,
                    text=item.text,
                    logprobs=[],
                )
            )
            events.append(
                self._part("response.content_part.done", item, output_text_part(item.text))
            )
        else:
            events.append(
                self._event("response.function_call_arguments.done", **where, arguments=item.text)
            )
        done = item.done(status)
        self._output[item.output_index] = done
        events.append(
            self._event("response.output_item.done", output_index=item.output_index, item=done)
        )
        return events

    def _part(self, name: str, item: _Item, part: dict[str, Any]) -> Event:
        return self._event(
            name, item_id=item.item_id, output_index=item.output_index, content_index=0, part=part
        )

    def _text(self, kind: str, text: str) -> list[Event]:
        events: list[Event] = []
        item = self._open
        if item is None or item.kind != kind:
            item, events = self._begin(kind)
        item.parts.append(text)
        where = {"item_id": item.item_id, "output_index": item.output_index, "content_index": 0}
        if kind == "reasoning":
            return events + [self._event("response.reasoning_text.delta", **where, delta=text)]
        return events + [
            self._event("response.output_text.delta", **where, delta=text, logprobs=[])
        ]

    def _tool(self, call: dict[str, Any]) -> list[Event]:
        n = call.get("index", 0)
        function = call.get("function") or {}
        events: list[Event] = []
        item = self._calls.get(n)
        if item is None:
            call_id = call.get("id") or f"call_{self._suffix}_{len(self._items)}"
            item, events = self._begin(
                "function_call", call_id=call_id, name=function.get("name") or ""
            )
            self._calls[n] = item
        arguments = function.get("arguments") or ""
        if arguments:
            item.parts.append(arguments)
            if item.output_index in self._output:  # a late fragment for a closed call
                self._output[item.output_index] = item.done("completed")
            where = {"item_id": item.item_id, "output_index": item.output_index}
            events.append(
                self._event("response.function_call_arguments.delta", **where, delta=arguments)
            )
        return events


def _reasoning_part(text: str) -> dict[str, Any]:
    return {"type": "reasoning_text", "text": text}
