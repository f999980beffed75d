"""The OpenAI-chat side of every translation: ids, request flags, reading a completion, and
folding a chunk stream back into one completion.

OpenAI chat is helexa's internal lingua franca, so the Anthropic and Responses translations
build their chat requests and read their chat completions with these pieces, and a
non-streaming request is served by folding the neuron's stream (:class:`ChatAccumulator`).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

# Several text blocks or parts in one message are joined with a blank line, so paragraphs
# stay paragraphs in the rendered prompt.
PARAGRAPH = "\n\n"


def new_id() -> str:
    """A fresh id body for responses that upstream gave none."""
    return uuid.uuid4().hex[:24]


def id_suffix(upstream_id: str | None) -> str:
    """The unique part of an upstream id, so translated ids stay traceable to it."""
    if not upstream_id:
        return new_id()
    for prefix in ("chatcmpl-", "cmpl-", "resp_", "msg_"):
        if upstream_id.startswith(prefix):
            return upstream_id[len(prefix) :] or new_id()
    return upstream_id


def first_choice(completion: dict[str, Any]) -> dict[str, Any]:
    """Choice 0 of a completion, or ``{}``: the Anthropic and Responses answers have one."""
    choices = completion.get("choices") or []
    return choices[0] if choices else {}


def thinking_flags(enabled: bool) -> dict[str, Any]:
    """Both spellings engines read: vLLM/SGLang ``chat_template_kwargs`` and a top-level flag."""
    return {"chat_template_kwargs": {"enable_thinking": enabled}, "enable_thinking": enabled}


def stream_flags(stream: bool | None) -> dict[str, Any]:
    """What a streamed chat request needs; usage is asked for, as both streams end with it."""
    return {"stream": True, "stream_options": {"include_usage": True}} if stream else {}


# -- deprecated function calling -----------------------------------------------------------
# OpenAI still accepts ``functions``/``function_call`` and the ``function`` role. The engine
# knows tools only, so a request is rewritten in those terms, and the answer back in the
# old ones: one call as ``message.function_call``, finish_reason "function_call".


def _legacy_call_id(index: int) -> str:
    return f"call_fn{index}"


def _tool_messages(messages: list[Any]) -> list[Any]:
    """Messages with assistant ``function_call``s as tool calls and ``function`` results as
    tool results; each result answers the latest call (legacy calls carry no id)."""
    out: list[Any] = []
    call_id = _legacy_call_id(0)
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            out.append(message)
        elif message.get("role") == "function":
            content = message.get("content") or ""
            out.append({"role": "tool", "tool_call_id": call_id, "content": content})
        elif message.get("function_call") and not message.get("tool_calls"):
            call_id = _legacy_call_id(i)
            function = {"arguments": "", **message["function_call"]}
            call = {"id": call_id, "type": "function", "function": function}
            rest = {k: v for k, v in message.items() if k != "function_call"}
            out.append({**rest, "tool_calls": [call]})
        else:
            out.append(message)
    return out


def _legacy_messages(messages: Any) -> bool:
    return isinstance(messages, list) and any(
        isinstance(m, dict) and (m.get("role") == "function" or m.get("function_call"))
        for m in messages
    )


def functions_as_tools(body: dict[str, Any]) -> dict[str, Any]:
    """A validated chat body in today's terms: ``functions`` as ``tools``, ``function_call``
    as ``tool_choice`` (one call at a time, as legacy answers hold one), and legacy turns in
    ``messages`` as tool calls and results. A body without any of them comes back as it is."""
    legacy_request = "functions" in body or "function_call" in body
    if not legacy_request and not _legacy_messages(body.get("messages")):
        return body
    out = {k: v for k, v in body.items() if k not in ("functions", "function_call")}
    out["messages"] = _tool_messages(body.get("messages") or [])
    if body.get("functions"):
        out["tools"] = [{"type": "function", "function": f} for f in body["functions"]]
        out["parallel_tool_calls"] = False
    choice = body.get("function_call")
    if isinstance(choice, dict):
        out["tool_choice"] = {"type": "function", "function": {"name": choice.get("name")}}
    elif choice is not None:
        out["tool_choice"] = choice
    return out


def _function_call_part(part: dict[str, Any]) -> dict[str, Any]:
    """A message or delta with its first tool call as ``function_call``; a delta of a later
    call has nothing to say in a legacy answer."""
    calls = part.get("tool_calls")
    if calls is None:
        return part
    out = {k: v for k, v in part.items() if k != "tool_calls"}
    if calls and calls[0].get("index", 0) == 0:
        function = calls[0].get("function") or {}
        out["function_call"] = {k: function[k] for k in ("name", "arguments") if k in function}
    return out


def as_function_call(payload: dict[str, Any]) -> dict[str, Any]:
    """A chat completion or chunk answered as OpenAI answers a ``functions`` request."""
    if not payload.get("choices"):
        return payload
    choices = []
    for choice in payload["choices"]:
        choice = dict(choice)
        for key in ("message", "delta"):
            if isinstance(choice.get(key), dict):
                choice[key] = _function_call_part(choice[key])
        if choice.get("finish_reason") == "tool_calls":
            choice["finish_reason"] = "function_call"
        choices.append(choice)
    return {**payload, "choices": choices}


# -- folding streams -----------------------------------------------------------------------


@dataclass
class _ChoiceFold:
    content: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    tool_calls: dict[int, dict[str, Any]] = field(default_factory=dict)
    finish_reason: str | None = None
    stop_sequence: str | None = None

    def add_tool_delta(self, delta: dict[str, Any]) -> None:
        index = delta.get("index")
        if index is None:  # non-conforming upstream: a new id starts a new call
            index = len(self.tool_calls) if delta.get("id") else max(self.tool_calls, default=0)
        call = self.tool_calls.setdefault(
            index, {"id": "", "type": "function", "function": {"name": "", "arguments": ""}}
        )
        function = delta.get("function") or {}
        if delta.get("id") and not call["id"]:
            call["id"] = delta["id"]
        if function.get("name") and not call["function"]["name"]:
            call["function"]["name"] = function["name"]
        call["function"]["arguments"] += function.get("arguments") or ""


class ChatAccumulator:
    """Folds ``chat.completion.chunk`` dicts into one ``chat.completion`` as they stream."""

    def __init__(self) -> None:
        self._head: dict[str, Any] = {}
        self._choices: dict[int, _ChoiceFold] = {}
        self._usage: dict[str, Any] | None = None

    def add(self, chunk: dict[str, Any]) -> None:
        for key in ("id", "created", "model", "system_fingerprint"):
            if chunk.get(key) is not None and key not in self._head:
                self._head[key] = chunk[key]
        if chunk.get("usage"):
            self._usage = chunk["usage"]
        for choice in chunk.get("choices") or []:
            fold = self._choices.setdefault(choice.get("index", 0), _ChoiceFold())
            delta = choice.get("delta") or {}
            if delta.get("content"):
                fold.content.append(delta["content"])
            if delta.get("reasoning_content"):
                fold.reasoning.append(delta["reasoning_content"])
            for call in delta.get("tool_calls") or []:
                fold.add_tool_delta(call)
            if choice.get("finish_reason"):
                fold.finish_reason = choice["finish_reason"]
            if choice.get("stop_sequence"):
                fold.stop_sequence = choice["stop_sequence"]

    def result(self) -> dict[str, Any]:
        """The completion so far; ``finish_reason`` stays None if upstream never sent one."""
        choices = []
        for index in sorted(self._choices) or [0]:
            fold = self._choices.get(index, _ChoiceFold())
            tool_calls = [fold.tool_calls[i] for i in sorted(fold.tool_calls)]
            text = "".join(fold.content)
            message: dict[str, Any] = {
                "role": "assistant",
                "content": text if text or not tool_calls else None,
            }
            if fold.reasoning:
                message["reasoning_content"] = "".join(fold.reasoning)
            if tool_calls:
                message["tool_calls"] = tool_calls
            choice: dict[str, Any] = {
                "index": index,
                "message": message,
                "finish_reason": fold.finish_reason,
                "logprobs": None,
            }
            if fold.stop_sequence is not None:
                choice["stop_sequence"] = fold.stop_sequence
            choices.append(choice)
        out: dict[str, Any] = {
            "id": self._head.get("id") or f"chatcmpl-{new_id()}",
            "object": "chat.completion",
            "created": self._head.get("created", 0),
            "model": self._head.get("model", ""),
            "choices": choices,
        }
        if "system_fingerprint" in self._head:
            out["system_fingerprint"] = self._head["system_fingerprint"]
        if self._usage is not None:
            out["usage"] = self._usage
        return out


def accumulate_completion(chunks: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """One ``text_completion`` from a stream of legacy completion chunks."""
    head: dict[str, Any] = {}
    texts: dict[int, list[str]] = {}
    finish: dict[int, str | None] = {}
    usage: dict[str, Any] | None = None
    for chunk in chunks:
        for key in ("id", "created", "model", "system_fingerprint"):
            if chunk.get(key) is not None and key not in head:
                head[key] = chunk[key]
        if chunk.get("usage"):
            usage = chunk["usage"]
        for choice in chunk.get("choices") or []:
            index = choice.get("index", 0)
            texts.setdefault(index, []).append(choice.get("text") or "")
            if choice.get("finish_reason"):
                finish[index] = choice["finish_reason"]
    out: dict[str, Any] = {
        "id": head.get("id") or f"cmpl-{new_id()}",
        "object": "text_completion",
        "created": head.get("created", 0),
        "model": head.get("model", ""),
        "choices": [
            {
                "index": i,
                "text": "".join(texts.get(i, [])),
                "finish_reason": finish.get(i),
                "logprobs": None,
            }
            for i in sorted(texts) or [0]
        ],
    }
    if "system_fingerprint" in head:
        out["system_fingerprint"] = head["system_fingerprint"]
    if usage is not None:
        out["usage"] = usage
    return out
