"""The Anthropic Messages stream: OpenAI chunks in, Anthropic's events out, in Anthropic's
order, and the bytes a gateway writes for them (:class:`AnthropicStream`).

The translator is a pure state machine: ordered ``(event, payload)`` pairs out, framed by
the caller; it buffers nothing beyond the block it is in, so a slow client back-pressures
upstream. It assumes what every engine does: tool calls stream one after another. A
fragment for an earlier, already closed call is still delivered (at that call's index)
rather than lost.
"""

from __future__ import annotations

from typing import Any

from helexa.errors import ApiError
from helexa.wire.anthropic.translate import anthropic_usage, map_stop_reason
from helexa.wire.errors import anthropic_error_type
from helexa.wire.openai.stream import ChunkTranslator, helexa_field
from helexa.wire.openai.translate import id_suffix, new_id
from helexa.wire.sse import Event, sse_events


def error_event(message: str, type: str = "api_error") -> Event:
    """A mid-stream Anthropic failure (headers are long gone, so it rides the stream)."""
    return ("error", {"type": "error", "error": {"type": type, "message": message}})


PING: Event = ("ping", {"type": "ping"})


class AnthropicStreamTranslator(ChunkTranslator):
    """OpenAI chunks in, Anthropic Messages stream events out, in Anthropic's order.

    ``message_start`` → per block ``content_block_start`` / ``content_block_delta`` /
    ``content_block_stop`` (thinking, text and each tool call its own block, a new one when
    the kind changes) → ``message_delta`` (stop reason, usage) → ``message_stop``.
    """

    reasoning_kind = "thinking"
    text_kind = "text"

    def __init__(self, model: str, message_id: str | None = None, input_tokens: int = 0) -> None:
        super().__init__()
        self.model = model
        self.message_id = message_id or f"msg_{new_id()}"
        self.input_tokens = input_tokens
        self._blocks = 0  # blocks opened so far; the next block's index
        self._open: tuple[str, int] | None = None  # (kind, block index); kind "tool:<n>"
        self._tool_blocks: dict[int, int] = {}  # tool call index -> block index

    def feed(self, chunk: dict[str, Any]) -> list[Event]:
        """As every translator does; the first chunk's prompt size (helexa's own field, from
        the engine) goes into ``message_start``, as Anthropic reports it there."""
        if not self._state.started and "prompt_tokens" in helexa_field(chunk):
            self.input_tokens = anthropic_usage(helexa_field(chunk))["input_tokens"]
        return super().feed(chunk)

    def _opening(self) -> list[Event]:
        """``message_start``."""
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


class AnthropicStream:
    """Anthropic Messages events, framed as Anthropic sends them: a ``ping`` right after
    ``message_start``."""

    def __init__(self, model: str) -> None:
        self.translator = AnthropicStreamTranslator(model)

    def _frame(self, events: list[Event]) -> bytes:
        out: list[Event] = []
        for event in events:
            out.append(event)
            if event[0] == "message_start":
                out.append(PING)
        return sse_events(out)

    def feed(self, chunk: dict[str, Any]) -> bytes:
        return self._frame(self.translator.feed(chunk))

    def finish(self) -> bytes:
        return self._frame(self.translator.finish())

    def fail(self, failure: ApiError) -> bytes:
        kind = anthropic_error_type(failure.status)
        return self._frame(self.translator.error(failure.message, kind))
