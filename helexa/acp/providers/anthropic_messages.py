"""Anthropic ``/v1/messages``: Claude directly, or helexa's gateway through its translator.

The system prompt is a top-level field, tool calls are ``tool_use`` content blocks with
parsed ``input``, and results go back as ``tool_result`` blocks inside a *user* message
(there is no tool role); consecutive same-role entries merge into one message. The stream
is named events: ``message_start`` → per block ``content_block_start`` / ``_delta`` /
``_stop`` → ``message_delta`` (stop reason, output tokens) → ``message_stop``.
"""

from __future__ import annotations

import json
from typing import Any

from helexa.acp.config import DEFAULT_CONTEXT_WINDOW, answer_reserve
from helexa.acp.providers import events
from helexa.acp.providers.base import HttpProvider, ProviderRequest
from helexa.acp.providers.decoder import Decoder, PendingCall, as_int, error_text, text_field

ANTHROPIC_VERSION = "2023-06-01"
# The API requires max_tokens; without an endpoint to size it by, assume the default window.
DEFAULT_MAX_TOKENS = answer_reserve(DEFAULT_CONTEXT_WINDOW, None)


def _tool_input(arguments: str) -> dict[str, Any]:
    """The call's arguments as the object Anthropic requires.

    Malformed JSON (a truncated call) is kept as text inside an object so the body still
    validates upstream; the model already got a tool error for that call.
    """
    try:
        value = json.loads(arguments or "{}")
    except ValueError:
        return {"raw_arguments": arguments}
    return value if isinstance(value, dict) else {"value": value}


def encode(
    request: ProviderRequest, default_max_tokens: int = DEFAULT_MAX_TOKENS
) -> dict[str, Any]:
    """The Messages body; ``default_max_tokens`` applies when the request sets no limit.

    The provider passes its endpoint's answer reserve there, so a 4096-token model is not
    asked for an 8192-token answer (which a server rejects as over its context length).
    """
    messages: list[dict[str, Any]] = []

    def push(role: str, blocks: list[dict[str, Any]]) -> None:
        if not blocks:
            return
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"].extend(blocks)
        else:
            messages.append({"role": role, "content": blocks})

    for m in request.messages:
        text = [{"type": "text", "text": m.content}] if m.content else []
        if m.role == "user":
            push("user", text)
        elif m.role == "tool":
            result = {"type": "tool_result", "tool_use_id": m.tool_call_id, "content": m.content}
            if m.is_error:
                result["is_error"] = True
            push("user", [result])
        else:
            calls = [
                {"type": "tool_use", "id": c.id, "name": c.name, "input": _tool_input(c.arguments)}
                for c in m.tool_calls
            ]
            push("assistant", text + calls)
    body: dict[str, Any] = {
        "model": request.model,
        "max_tokens": request.max_tokens or default_max_tokens,
        "messages": messages,
        "stream": True,
    }
    if request.system:
        body["system"] = request.system
    if request.tools:
        body["tools"] = [
            {"name": t.name, "description": t.description, "input_schema": t.parameters}
            for t in request.tools
        ]
    return body


_STOP: dict[str, events.FinishReason] = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "refusal",
}


def _text(obj: dict[str, Any], kind: Any, suffix: str) -> list[events.ProviderEvent]:
    """Text or thinking in a content block (``suffix`` "") or in a delta to one ("_delta"):
    both carry it under the same key, ``text`` or ``thinking``."""
    if kind == f"text{suffix}" and (text := text_field(obj, "text")):
        return [events.TextDelta(text)]
    if kind == f"thinking{suffix}" and (thinking := text_field(obj, "thinking")):
        return [events.ReasoningDelta(thinking)]
    return []


class AnthropicMessagesDecoder(Decoder):
    truncated = "the upstream ended the stream before message_stop"

    def __init__(self) -> None:
        super().__init__()
        self._calls: dict[int, PendingCall] = {}  # tool_use blocks by content block index
        self._input_tokens = 0
        self._cached_tokens = 0

    def _decode(self, payload: dict[str, Any], kind: Any) -> list[events.ProviderEvent]:
        if kind == "message_start":
            message = payload.get("message")
            usage = message.get("usage") if isinstance(message, dict) else None
            if isinstance(usage, dict):
                self._usage_in(usage)
            return []
        if kind == "content_block_start":
            return self._block_start(payload)
        if kind == "content_block_delta":
            return self._block_delta(payload)
        if kind == "content_block_stop":
            call = self._call_at(payload)
            return call.completed() if call is not None else []
        if kind == "message_delta":
            delta = payload.get("delta")
            reason = delta.get("stop_reason") if isinstance(delta, dict) else None
            if isinstance(reason, str):
                self._reason = _STOP.get(reason, "stop")
            usage = payload.get("usage")
            if not isinstance(usage, dict):
                return []
            self._usage_in(usage)
            output = as_int(usage.get("output_tokens"))
            return [events.Usage(self._input_tokens, output, self._cached_tokens)]
        if kind == "message_stop":
            return self._finish()
        if kind == "error":
            raise events.ProviderError(error_text(payload))
        return []  # ping, and whatever Anthropic adds next

    def _usage_in(self, usage: dict[str, Any]) -> None:
        if "input_tokens" not in usage:
            return
        cached = as_int(usage.get("cache_read_input_tokens"))
        written = as_int(usage.get("cache_creation_input_tokens"))
        self._input_tokens = as_int(usage.get("input_tokens")) + cached + written
        self._cached_tokens = cached

    def _block_start(self, payload: dict[str, Any]) -> list[events.ProviderEvent]:
        block = payload.get("content_block")
        if not isinstance(block, dict):
            return []
        kind = block.get("type")
        if kind != "tool_use" or not isinstance(payload.get("index"), int):
            return _text(block, kind, "")
        call = PendingCall(block.get("id") or f"toolu_{payload['index']}", block.get("name") or "")
        self._calls[payload["index"]] = call
        out: list[events.ProviderEvent] = [events.ToolCallStart(call.id, call.name)]
        if isinstance(block.get("input"), dict) and block["input"]:
            call.arguments = json.dumps(block["input"])
            out.append(events.ToolCallArgsDelta(call.id, call.arguments))
        return out

    def _block_delta(self, payload: dict[str, Any]) -> list[events.ProviderEvent]:
        delta = payload.get("delta")
        if not isinstance(delta, dict):
            return []
        kind = delta.get("type")
        if kind != "input_json_delta":
            return _text(delta, kind, "_delta")
        call = self._call_at(payload)
        return call.add_arguments(delta.get("partial_json")) if call else []

    def _call_at(self, payload: dict[str, Any]) -> PendingCall | None:
        index = payload.get("index")
        return self._calls.get(index) if isinstance(index, int) else None

    def _finish(self) -> list[events.ProviderEvent]:
        self._done = True
        out: list[events.ProviderEvent] = []
        for call in self._calls.values():
            out += call.completed()
        reason = self._reason or ("tool_calls" if self._calls else "stop")
        return [*out, events.Finish(reason)]


class AnthropicMessagesProvider(HttpProvider):
    path = "/messages"
    decoder = AnthropicMessagesDecoder

    def headers(self) -> dict[str, str]:
        headers = {"anthropic-version": ANTHROPIC_VERSION}
        if self.endpoint.api_key:
            headers["x-api-key"] = self.endpoint.api_key
        return headers

    def lookup_headers(self) -> dict[str, str]:
        # No anthropic-version: helexa's gateway answers /v1/models in Anthropic's shape
        # for that header, and Anthropic's shape has no context_length.
        return {"x-api-key": self.endpoint.api_key} if self.endpoint.api_key else {}

    def encode(self, request: ProviderRequest) -> dict[str, Any]:
        return encode(request, self.endpoint.answer_reserve)
