"""The OpenAI Responses stream: OpenAI chunks in, Responses events out, numbered by
``sequence_number``, and the bytes a gateway writes for them (:class:`ResponsesStream`).

The translator is a pure state machine: ordered ``(event, payload)`` pairs out, framed by
the caller; it buffers nothing beyond the item it is in. It assumes what every engine
does: tool calls stream one after another. A fragment for an earlier, already closed call
is still delivered (at that call's item) rather than lost.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from helexa.errors import ApiError
from helexa.wire.openai.stream import ChunkTranslator
from helexa.wire.openai.translate import id_suffix, new_id
from helexa.wire.responses.envelopes import ResponsesRequest
from helexa.wire.responses.translate import (
    function_call_item,
    message_item,
    output_text_part,
    reasoning_item,
    responses_envelope,
    responses_status,
    responses_usage,
)
from helexa.wire.sse import Event, sse_events


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


class ResponsesStreamTranslator(ChunkTranslator):
    """OpenAI chunks in, OpenAI Responses stream events out, numbered by ``sequence_number``.

    ``response.created`` → ``response.in_progress`` → per output item
    ``response.output_item.added`` → its part/delta/done events → ``response.output_item.done``
    → ``response.completed`` (or ``response.incomplete``) carrying the whole Response, built
    by the same code as the non-streaming answer.
    """

    reasoning_kind = "reasoning"
    text_kind = "message"

    def __init__(
        self,
        req: ResponsesRequest | str,
        response_id: str | None = None,
        *,
        created_at: float | None = None,
        input_tokens: int = 0,
    ) -> None:
        super().__init__()
        self.req = (
            req if isinstance(req, ResponsesRequest) else ResponsesRequest(model=req, input="")
        )
        self.response_id = response_id or f"resp_{new_id()}"
        self.created_at = created_at if created_at is not None else int(time.time())
        self.input_tokens = input_tokens
        self._suffix = id_suffix(self.response_id)
        self._sequence = 0
        self._items: list[_Item] = []
        self._output: dict[int, dict[str, Any]] = {}  # output index -> finished item
        self._open: _Item | None = None
        self._calls: dict[int, _Item] = {}  # tool call index -> its item

    def _opening(self) -> list[Event]:
        """``response.created`` and ``response.in_progress``."""
        response = self._envelope("in_progress")
        return [
            self._event("response.created", response=response),
            self._event("response.in_progress", response=response),
        ]

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


class ResponsesStream:
    """Responses events framed for the client; a failure's code rides ``response.failed``
    (``server_error`` when the refusal named none)."""

    def __init__(self, req: ResponsesRequest) -> None:
        self.translator = ResponsesStreamTranslator(req)

    def feed(self, chunk: dict[str, Any]) -> bytes:
        return sse_events(self.translator.feed(chunk))

    def finish(self) -> bytes:
        return sse_events(self.translator.finish())

    def fail(self, failure: ApiError) -> bytes:
        code = failure.code or "server_error"
        return sse_events(self.translator.fail(failure.message, code))
