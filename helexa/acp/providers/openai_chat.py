"""OpenAI ``/v1/chat/completions``: helexa's own gateway, llama.cpp, vLLM, Ollama, OpenAI.

The stream is ``data:`` chunks with deltas on ``choices[0]``; tool calls arrive as fragments
keyed by ``index`` (id and name in the first, arguments spread over the rest), usage rides
a last chunk with no choices, and ``data: [DONE]`` ends it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from helexa.acp.providers import events
from helexa.acp.providers.base import HttpProvider, ProviderRequest
from helexa.acp.providers.decoder import Decoder, PendingCall, error_text, openai_usage, text_field
from helexa.wire.sse import SSEEvent


def encode(request: ProviderRequest) -> dict[str, Any]:
    messages: list[dict[str, Any]] = []
    if request.system:
        messages.append({"role": "system", "content": request.system})
    for m in request.messages:
        if m.role == "user":
            messages.append({"role": "user", "content": m.content})
        elif m.role == "tool":
            messages.append({"role": "tool", "tool_call_id": m.tool_call_id, "content": m.content})
        else:
            out: dict[str, Any] = {"role": "assistant", "content": m.content or None}
            if m.tool_calls:
                out["tool_calls"] = [
                    {
                        "id": c.id,
                        "type": "function",
                        "function": {"name": c.name, "arguments": c.arguments or "{}"},
                    }
                    for c in m.tool_calls
                ]
            elif out["content"] is None:
                out["content"] = ""
            messages.append(out)
    body: dict[str, Any] = {
        "model": request.model,
        "messages": messages,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if request.tools:
        body["tools"] = [{"type": "function", "function": t.function()} for t in request.tools]
    if request.max_tokens:
        body["max_tokens"] = request.max_tokens
    return body


_FINISH: dict[str, events.FinishReason] = {
    "stop": "stop",
    "length": "length",
    "tool_calls": "tool_calls",
    "function_call": "tool_calls",
    "content_filter": "refusal",
}


@dataclass
class _Call(PendingCall):
    started: bool = False  # announced: its name is known


class OpenAIChatDecoder(Decoder):
    truncated = "the upstream ended the stream before the answer was finished"

    def __init__(self) -> None:
        super().__init__()
        self._calls: dict[Any, _Call] = {}

    def feed(self, event: SSEEvent) -> list[events.ProviderEvent]:
        if not self._done and event.data.strip() == "[DONE]":
            return self._finish()
        return super().feed(event)

    def _decode(self, chunk: dict[str, Any], kind: Any) -> list[events.ProviderEvent]:
        if chunk.get("error"):
            raise events.ProviderError(error_text(chunk))
        out: list[events.ProviderEvent] = []
        for choice in chunk.get("choices") or []:
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta")
            delta = delta if isinstance(delta, dict) else {}
            reasoning = delta.get("reasoning_content") or delta.get("reasoning")
            if isinstance(reasoning, str) and reasoning:
                out.append(events.ReasoningDelta(reasoning))
            for key in ("content", "refusal"):
                if text := text_field(delta, key):
                    out.append(events.TextDelta(text))
            for call in delta.get("tool_calls") or []:
                if isinstance(call, dict):
                    out += self._tool(call)
            reason = choice.get("finish_reason")
            if isinstance(reason, str) and reason:
                self._reason = _FINISH.get(reason, "stop")
                out += self._complete()
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            out.append(openai_usage(usage, "prompt_tokens", "completion_tokens"))
        return out

    def _tool(self, fragment: dict[str, Any]) -> list[events.ProviderEvent]:
        key = fragment.get("index")
        if not isinstance(key, int):  # servers that send whole calls without an index
            key = fragment.get("id") or len(self._calls)
        function = fragment.get("function")
        function = function if isinstance(function, dict) else {}
        call = self._calls.get(key)
        if call is None:
            call = self._calls[key] = _Call(fragment.get("id") or f"call_{len(self._calls)}")
        if not call.name and isinstance(function.get("name"), str):
            call.name = function["name"]  # some servers repeat it in every fragment
        args = function.get("arguments")
        args = args if isinstance(args, str) else ""
        out: list[events.ProviderEvent] = []
        if not call.started and call.name:
            # Announce once the name is known; arguments that raced ahead go out with it.
            call.started = True
            out.append(events.ToolCallStart(call.id, call.name))
            if call.arguments:
                out.append(events.ToolCallArgsDelta(call.id, call.arguments))
        call.arguments += args
        if call.started and args:
            out.append(events.ToolCallArgsDelta(call.id, args))
        return out

    def _complete(self) -> list[events.ProviderEvent]:
        out = [event for c in self._calls.values() if c.name for event in c.completed()]
        self._calls.clear()
        return out

    def _finish(self) -> list[events.ProviderEvent]:
        self._done = True
        had_calls = any(c.name for c in self._calls.values())
        out = self._complete()
        reason = self._reason or ("tool_calls" if had_calls else "stop")
        return [*out, events.Finish(reason)]


class OpenAIChatProvider(HttpProvider):
    path = "/chat/completions"
    decoder = OpenAIChatDecoder

    def encode(self, request: ProviderRequest) -> dict[str, Any]:
        return encode(request)
