"""OpenAI ``/v1/responses``: items in, typed events out.

Requests are stateless (``store: false``, the whole conversation in ``input``): tool calls
are ``function_call`` items and their results ``function_call_output`` items. The stream
names every event in its payload's ``type``; function call arguments are correlated by
``item_id`` (the call's ``call_id`` is what results must quote back). It ends with
``response.completed`` / ``response.incomplete`` / ``response.failed``, never ``[DONE]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from helexa.acp.providers.base import (
    Finish,
    FinishReason,
    HttpProvider,
    ProviderError,
    ProviderEvent,
    ProviderRequest,
    ReasoningDelta,
    TextDelta,
    ToolCallArgsDelta,
    ToolCallComplete,
    ToolCallStart,
    Usage,
    as_int,
    error_text,
    parse_json,
)
from helexa.wire.sse import SSEEvent


def encode(request: ProviderRequest) -> dict[str, Any]:
    items: list[dict[str, Any]] = []
    for m in request.messages:
        if m.role == "tool":
            items.append(
                {"type": "function_call_output", "call_id": m.tool_call_id, "output": m.content}
            )
            continue
        if m.content or m.role == "user":
            items.append({"type": "message", "role": m.role, "content": m.content})
        items.extend(
            {
                "type": "function_call",
                "call_id": c.id,
                "name": c.name,
                "arguments": c.arguments or "{}",
            }
            for c in m.tool_calls
        )
    body: dict[str, Any] = {"model": request.model, "input": items, "stream": True, "store": False}
    if request.system:
        body["instructions"] = request.system
    if request.tools:
        # strict defaults to true on this API, which demands schemas we do not promise.
        body["tools"] = [
            {
                "type": "function",
                "name": t.name,
                "description": t.description,
                "parameters": t.parameters,
                "strict": False,
            }
            for t in request.tools
        ]
    if request.max_tokens:
        body["max_output_tokens"] = request.max_tokens
    return body


_INCOMPLETE: dict[str, FinishReason] = {"max_output_tokens": "length", "content_filter": "refusal"}


@dataclass
class _Call:
    call_id: str
    name: str
    arguments: str = ""
    complete: bool = False


class OpenAIResponsesDecoder:
    def __init__(self) -> None:
        self._calls: dict[Any, _Call] = {}  # keyed by item id and by output index
        self._order: list[_Call] = []
        self._refused = False
        self._done = False

    def feed(self, event: SSEEvent) -> list[ProviderEvent]:
        if self._done:
            return []
        payload = parse_json(event)
        if payload is None:
            return []
        kind = payload.get("type") or event.event
        if kind == "response.output_item.added":
            return self._added(payload)
        if kind == "response.function_call_arguments.delta":
            call = self._lookup(payload)
            delta = payload.get("delta")
            if call is None or call.complete or not isinstance(delta, str) or not delta:
                return []
            call.arguments += delta
            return [ToolCallArgsDelta(call.call_id, delta)]
        if kind == "response.function_call_arguments.done":
            return self._complete(self._lookup(payload), payload.get("arguments"))
        if kind == "response.output_item.done":
            item = payload.get("item")
            if isinstance(item, dict) and item.get("type") == "function_call":
                return self._complete(self._lookup(payload), item.get("arguments"))
            return []
        if kind in ("response.output_text.delta", "response.refusal.delta"):
            self._refused |= kind == "response.refusal.delta"
            delta = payload.get("delta")
            return [TextDelta(delta)] if isinstance(delta, str) and delta else []
        if kind in ("response.reasoning_text.delta", "response.reasoning_summary_text.delta"):
            delta = payload.get("delta")
            return [ReasoningDelta(delta)] if isinstance(delta, str) and delta else []
        if kind in ("response.completed", "response.incomplete"):
            return self._finish(payload.get("response"))
        if kind == "response.failed":
            response = payload.get("response")
            error = response.get("error") if isinstance(response, dict) else None
            raise ProviderError(error_text({"error": error}) if error else "the response failed")
        if kind == "error":
            raise ProviderError(error_text(payload))
        return []

    def end(self) -> list[ProviderEvent]:
        if self._done:
            return []
        raise ProviderError("the upstream ended the stream before response.completed")

    def _added(self, payload: dict[str, Any]) -> list[ProviderEvent]:
        item = payload.get("item")
        if not isinstance(item, dict) or item.get("type") != "function_call":
            return []
        call_id = item.get("call_id") or item.get("id") or f"call_{len(self._order)}"
        call = _Call(call_id, item.get("name") or "")
        self._order.append(call)
        for key in (item.get("id"), payload.get("output_index")):
            if key is not None:
                self._calls[key] = call
        out: list[ProviderEvent] = [ToolCallStart(call.call_id, call.name)]
        if isinstance(item.get("arguments"), str) and item["arguments"]:
            call.arguments = item["arguments"]
            out.append(ToolCallArgsDelta(call.call_id, call.arguments))
        return out

    def _lookup(self, payload: dict[str, Any]) -> _Call | None:
        item = payload.get("item")
        item_id = item.get("id") if isinstance(item, dict) else None
        for key in (payload.get("item_id"), item_id, payload.get("output_index")):
            if key is not None and key in self._calls:
                return self._calls[key]
        return None

    def _complete(self, call: _Call | None, arguments: Any) -> list[ProviderEvent]:
        if call is None or call.complete:
            return []
        call.complete = True
        if isinstance(arguments, str) and arguments:
            call.arguments = arguments  # the server's final word beats our concatenation
        return [ToolCallComplete(call.call_id, call.name, call.arguments or "{}")]

    def _finish(self, response: Any) -> list[ProviderEvent]:
        self._done = True
        response = response if isinstance(response, dict) else {}
        out: list[ProviderEvent] = []
        for call in self._order:
            out += self._complete(call, None)
        usage = response.get("usage")
        if isinstance(usage, dict):
            details = usage.get("input_tokens_details")
            cached = as_int(details.get("cached_tokens")) if isinstance(details, dict) else 0
            out.append(
                Usage(as_int(usage.get("input_tokens")), as_int(usage.get("output_tokens")), cached)
            )
        reason: FinishReason = "tool_calls" if self._order else "stop"
        if response.get("status") == "incomplete":
            details = response.get("incomplete_details")
            why = details.get("reason") if isinstance(details, dict) else None
            reason = _INCOMPLETE.get(why or "", "length")
        elif self._refused:
            reason = "refusal"
        out.append(Finish(reason))
        return out


class OpenAIResponsesProvider(HttpProvider):
    path = "/responses"

    def encode(self, request: ProviderRequest) -> dict[str, Any]:
        return encode(request)

    def decoder(self) -> OpenAIResponsesDecoder:
        return OpenAIResponsesDecoder()
