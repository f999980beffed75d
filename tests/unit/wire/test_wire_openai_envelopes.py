"""OpenAI chat and completions envelopes, checked against the SDK's own types."""

from __future__ import annotations

from typing import Any

import openai.types as ot
import pytest

from helexa.wire.openai.envelopes import (
    AssistantMessage,
    Model,
    ModelList,
    ToolMessage,
    parse_chat_request,
    parse_completion_request,
)
from tests.support.bodies import call, user, wire_error

CHAT_BODY: dict[str, Any] = {
    "model": "qwen3",
    "messages": [
        {"role": "system", "content": "be brief"},
        user([{"type": "text", "text": "weather?"}]),
        {
            "role": "assistant",
            "content": None,
            "reasoning_content": "need a tool",
            "tool_calls": [call("call_1", "weather", '{"city":"Oslo"}')],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ],
    "tools": [
        {
            "type": "function",
            "function": {"name": "weather", "parameters": {"type": "object", "properties": {}}},
        }
    ],
    "tool_choice": {"type": "function", "function": {"name": "weather"}},
    "stop": ["END"],
    "stream": True,
    "stream_options": {"include_usage": True},
    "top_k": 20,
    "chat_template_kwargs": {"enable_thinking": False},
}


def test_chat_request_parses_every_role_and_keeps_vendor_fields() -> None:
    req = parse_chat_request(CHAT_BODY)
    assert isinstance(req.messages[2], AssistantMessage)
    assert req.messages[2].tool_calls and req.messages[2].tool_calls[0].function.name == "weather"
    assert isinstance(req.messages[3], ToolMessage)
    forwarded = req.model_dump(exclude_none=True)
    assert forwarded["top_k"] == 20
    assert forwarded["chat_template_kwargs"] == {"enable_thinking": False}
    assert forwarded["messages"][3] == CHAT_BODY["messages"][3]
    assert forwarded["tool_choice"] == CHAT_BODY["tool_choice"]


@pytest.mark.parametrize(
    ("body", "path", "needle"),
    [
        (
            {"model": "m", "messages": [{"role": "bogus", "content": "x"}]},
            "messages.0.role",
            "'bogus'",
        ),
        ({"model": "m", "messages": [{"content": "x"}]}, "messages.0.role", "Field required"),
        ({"model": "m", "messages": [user(5)]}, "messages.0.content", "valid string"),
        (
            {"model": "m", "messages": [user([{"type": "text"}])]},
            "messages.0.content.0.text",
            "required",
        ),
        ({"model": "m", "messages": []}, "messages", "at least 1"),
        ({"messages": [user("x")]}, "model", "Field required"),
        ({"model": "m", "messages": [user("x")], "temperature": "hot"}, "temperature", "number"),
        ({"model": "m", "messages": [user("x")], "tool_choice": "maybe"}, "tool_choice", ""),
        (
            {"model": "m", "messages": [{"role": "tool", "content": "x"}]},
            "messages.0.tool_call_id",
            "Field required",
        ),
    ],
)
def test_chat_request_errors_name_the_field(body: dict[str, Any], path: str, needle: str) -> None:
    err = wire_error(parse_chat_request, body)
    assert err.param == path
    assert err.message.startswith(f"{path}: ")
    assert needle in err.message
    assert "\n" not in err.message
    assert "tagged-union" not in err.message and ".user." not in err.message


@pytest.mark.parametrize("body", [[], "text", None, 3])
def test_non_object_bodies_are_refused(body: Any) -> None:
    assert "JSON object" in wire_error(parse_chat_request, body).message


@pytest.mark.parametrize(
    ("part", "needle"),
    [
        ({"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}}, "images"),
        ({"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}, "audio"),
        ({"type": "file", "file": {"file_id": "f"}}, "file"),
    ],
)
def test_chat_media_parts_are_refused(part: dict[str, Any], needle: str) -> None:
    body = {"model": "m", "messages": [user([{"type": "text", "text": "look"}, part])]}
    err = wire_error(parse_chat_request, body)
    assert err.code == "unsupported_content"
    assert err.param == "messages.0.content.1"
    assert needle in err.message and "not supported" in err.message


def test_completion_request_accepts_text_prompts_only() -> None:
    assert parse_completion_request({"model": "m", "prompt": "hi", "echo": True}).echo is True
    assert parse_completion_request({"model": "m", "prompt": ["a", "b"]}).prompt == ["a", "b"]
    err = wire_error(parse_completion_request, {"model": "m", "prompt": [1, 2]})
    assert err.param is not None and err.param.startswith("prompt")


def test_model_list_matches_openai_types() -> None:
    listing = ModelList(data=[Model(id="qwen3-8b", created=1)]).model_dump()
    for entry in listing["data"]:
        assert ot.Model.model_validate(entry).id == "qwen3-8b"
    assert listing["object"] == "list"
