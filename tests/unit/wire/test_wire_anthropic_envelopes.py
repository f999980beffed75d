"""Anthropic Messages envelopes: what parses, and the errors that name the field."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel

from helexa.wire.anthropic.envelopes import (
    MessagesRequest,
    ThinkingAdaptive,
    ThinkingDisabled,
    ThinkingEnabled,
    parse_count_tokens_request,
    parse_messages_request,
)
from tests.support.bodies import user, wire_error

MESSAGES_BODY: dict[str, Any] = {
    "model": "claude-ish",
    "max_tokens": 256,
    "system": [{"type": "text", "text": "be brief", "cache_control": {"type": "ephemeral"}}],
    "messages": [
        user("weather?"),
        {
            "role": "assistant",
            "content": [
                {"type": "thinking", "thinking": "tool time", "signature": "sig"},
                {"type": "redacted_thinking", "data": "opaque"},
                {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {"city": "Oslo"}},
            ],
        },
        user(
            [
                {
                    "type": "tool_result",
                    "tool_use_id": "toolu_1",
                    "content": [{"type": "text", "text": "sunny"}],
                    "is_error": False,
                },
                {"type": "text", "text": "thanks"},
            ]
        ),
    ],
    "tools": [
        {"name": "weather", "description": "w", "input_schema": {"type": "object"}},
        {"type": "custom", "name": "clock", "input_schema": {"type": "object"}},
    ],
    "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
    "thinking": {"type": "enabled", "budget_tokens": 1024},
    "stop_sequences": ["END"],
    "top_k": 20,
    "metadata": {"user_id": "u1"},
    "stream": True,
}


def test_messages_request_parses() -> None:
    req = parse_messages_request(MESSAGES_BODY)
    assert isinstance(req.thinking, ThinkingEnabled) and req.thinking.budget_tokens == 1024
    assert req.tools is not None and [t.name for t in req.tools] == ["weather", "clock"]


@pytest.mark.parametrize(
    ("thinking", "kind"),
    [
        ({"type": "enabled", "budget_tokens": 2048}, ThinkingEnabled),
        ({"type": "disabled"}, ThinkingDisabled),
        ({"type": "adaptive"}, ThinkingAdaptive),
    ],
)
def test_thinking_configs(thinking: dict[str, Any], kind: type[BaseModel]) -> None:
    body = {"model": "m", "max_tokens": 5, "messages": [user("x")], "thinking": thinking}
    assert isinstance(parse_messages_request(body).thinking, kind)


@pytest.mark.parametrize(
    ("block", "path"),
    [
        ({"type": "image", "source": {"type": "base64", "data": "AA"}}, "messages.0.content.1"),
        (
            {
                "type": "tool_result",
                "tool_use_id": "t",
                "content": [{"type": "image", "source": {}}],
            },
            "messages.0.content.1.content.0",
        ),
    ],
)
def test_anthropic_images_are_refused(block: dict[str, Any], path: str) -> None:
    body = {
        "model": "m",
        "max_tokens": 5,
        "messages": [user([{"type": "text", "text": "x"}, block])],
    }
    err = wire_error(parse_messages_request, body)
    assert err.code == "unsupported_content"
    assert err.param == path
    assert err.message == f"{path}: images are not supported yet"


@pytest.mark.parametrize(
    ("change", "path", "needle"),
    [
        ({"max_tokens": None}, "max_tokens", "valid integer"),
        (
            {"messages": [{"role": "system", "content": "x"}]},
            "messages.0.role",
            "'user' or 'assistant'",
        ),
        (
            {"messages": [user([{"type": "text", "text": 3}])]},
            "messages.0.content.0.text",
            "string",
        ),
        (
            {"messages": [user([{"type": "tool_use", "name": "f"}])]},
            "messages.0.content.0.id",
            "required",
        ),
        ({"messages": [user([{"type": "mystery"}])]}, "messages.0.content.0.type", "'mystery'"),
        ({"tools": [{"name": "f"}]}, "tools.0.input_schema", "required"),
        (
            {"tools": [{"type": "web_search_20250305", "name": "web_search"}]},
            "tools.0",
            "server tool 'web_search_20250305' is not supported",
        ),
        ({"thinking": {"type": "enabled"}}, "thinking.budget_tokens", "required"),
        ({"tool_choice": {"type": "tool"}}, "tool_choice.name", "required"),
        ({"tool_choice": {"type": "any"}}, "tool_choice", "'any' needs tools to call"),
        (
            {"tool_choice": {"type": "tool", "name": "f"}},
            "tool_choice",
            "names 'f', which is not among the request's tools",
        ),
    ],
)
def test_messages_request_errors(change: dict[str, Any], path: str, needle: str) -> None:
    body = {"model": "m", "max_tokens": 5, "messages": [user("x")], **change}
    err = wire_error(parse_messages_request, body)
    assert err.param == path
    assert needle in err.message


def test_count_tokens_needs_no_max_tokens() -> None:
    req = parse_count_tokens_request({"model": "m", "messages": [user("x")]})
    assert not isinstance(req, MessagesRequest)
    assert req.messages[0].content == "x"
