"""OpenAI ``/v1/responses``: items in, typed events out.

Requests are stateless (``store: false``, the whole conversation in ``input``): tool calls
are ``function_call`` items and their results ``function_call_output`` items. The stream
names every event in its payload's ``type``; function call arguments are correlated by
``item_id`` (the call's ``call_id`` is what results must quote back). It ends with
``response.completed`` / ``response.incomplete`` / ``response.failed``, never ``[DONE]``.
"""

from __future__ import annotations

from typing import Any

from helexa.acp.providers import events
from helexa.acp.providers.base import HttpProvider, ProviderRequest
from helexa.acp.providers.decoder import Decoder, PendingCall, error_text, openai_usage, text_field


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
            {"type": "function", **t.function(), "strict": False} for t in request.tools
        ]
    if request.max_tokens:
        body["max_output_tokens"] = request.max_tokens
    return body


_INCOMPLETE: dict[str, events.FinishReason] = {
    "max_output_tokens": "length",
    "content_filter": "refusal",
}


class OpenAIResponsesDecoder(Decoder):
    # Only response.completed (or .incomplete) says how the answer ended, and it ends the
    # stream too: _reason is never set early, so a stream without it was always cut short.
    truncated = "the upstream ended the stream before response.completed"

    def __init__(self) -> None:
        super().__init__()
        self._calls: dict[Any, PendingCall] = {}  # keyed by item id and by output index
        self._order: list[PendingCall] = []
        self._refused = False

    def _decode(self, payload: dict[str, Any], kind: Any) -> list[events.ProviderEvent]:
        if kind == "response.output_item.added":
            return self._added(payload)
        if kind == "response.function_call_arguments.delta":
            call = self._lookup(payload)
            return call.add_arguments(payload.get("delta")) if call else []
        if kind == "response.function_call_arguments.done":
            return self._complete(self._lookup(payload), payload.get("arguments"))
        if kind == "response.output_item.done":
            item = payload.get("item")
            if isinstance(item, dict) and item.get("type") == "function_call":
                return self._complete(self._lookup(payload), item.get("arguments"))
            return []
        if kind in ("response.output_text.delta", "response.refusal.delta"):
            self._refused |= kind == "response.refusal.delta"
            delta = text_field(payload, "delta")
            return [events.TextDelta(delta)] if delta else []
        if kind in ("response.reasoning_text.delta", "response.reasoning_summary_text.delta"):
            delta = text_field(payload, "delta")
            return [events.ReasoningDelta(delta)] if delta else []
        if kind in ("response.completed", "response.incomplete"):
            return self._response_end(payload.get("response"))
        if kind == "response.failed":
            response = payload.get("response")
            error = response.get("error") if isinstance(response, dict) else None
            raise events.ProviderError(
                error_text({"error": error}) if error else "the response failed"
            )
        if kind == "error":
            raise events.ProviderError(error_text(payload))
        return []

    def _added(self, payload: dict[str, Any]) -> list[events.ProviderEvent]:
        item = payload.get("item")
        if not isinstance(item, dict) or item.get("type") != "function_call":
            return []
        call_id = item.get("call_id") or item.get("id") or f"call_{len(self._order)}"
        call = PendingCall(call_id, item.get("name") or "")
        self._order.append(call)
        for key in (item.get("id"), payload.get("output_index")):
            if key is not None:
                self._calls[key] = call
        out: list[events.ProviderEvent] = [events.ToolCallStart(call.id, call.name)]
        if isinstance(item.get("arguments"), str) and item["arguments"]:
            call.arguments = item["arguments"]
            out.append(events.ToolCallArgsDelta(call.id, call.arguments))
        return out

    def _lookup(self, payload: dict[str, Any]) -> PendingCall | None:
        item = payload.get("item")
        item_id = item.get("id") if isinstance(item, dict) else None
        for key in (payload.get("item_id"), item_id, payload.get("output_index")):
            if key is not None and key in self._calls:
                return self._calls[key]
        return None

    def _complete(self, call: PendingCall | None, arguments: Any) -> list[events.ProviderEvent]:
        if call is None or call.complete:
            return []
        if isinstance(arguments, str) and arguments:
            call.arguments = arguments  # the server's final word beats our concatenation
        return call.completed()

    def _response_end(self, response: Any) -> list[events.ProviderEvent]:
        """``response.completed`` / ``.incomplete``: the answer, and the stream, are over."""
        self._done = True
        response = response if isinstance(response, dict) else {}
        out: list[events.ProviderEvent] = []
        for call in self._order:
            out += self._complete(call, None)
        usage = response.get("usage")
        if isinstance(usage, dict):
            out.append(openai_usage(usage, "input_tokens", "output_tokens"))
        reason: events.FinishReason = "tool_calls" if self._order else "stop"
        if response.get("status") == "incomplete":
            details = response.get("incomplete_details")
            why = details.get("reason") if isinstance(details, dict) else None
            reason = _INCOMPLETE.get(why or "", "length")
        elif self._refused:
            reason = "refusal"
        out.append(events.Finish(reason))
        return out


class OpenAIResponsesProvider(HttpProvider):
    path = "/responses"
    decoder = OpenAIResponsesDecoder

    def encode(self, request: ProviderRequest) -> dict[str, Any]:
        return encode(request)
