"""Request bodies, chat completions and the 400 check the wire tests build on."""

from __future__ import annotations

from typing import Any

import pytest

from helexa.wire.errors import WireError


def user(content: Any) -> dict[str, Any]:
    return {"role": "user", "content": content}


def wire_error(parse: Any, body: Any) -> WireError:
    with pytest.raises(WireError) as info:
        parse(body)
    assert info.value.status == 400
    return info.value


def completion(
    *,
    content: str | None = "",
    reasoning: str | None = None,
    tool_calls: list[dict[str, Any]] | None = None,
    finish_reason: str | None = "stop",
    usage: dict[str, Any] | None = None,
    stop_sequence: str | None = None,
) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if reasoning is not None:
        message["reasoning_content"] = reasoning
    if tool_calls:
        message["tool_calls"] = tool_calls
    choice: dict[str, Any] = {"index": 0, "message": message, "finish_reason": finish_reason}
    if stop_sequence is not None:
        choice["stop_sequence"] = stop_sequence
    return {
        "id": "chatcmpl-abc123",
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": "qwen3",
        "choices": [choice],
        "usage": usage or {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18},
    }


def call(call_id: str, name: str, arguments: str) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}
