"""Request envelopes and error bodies of every dialect, checked against the SDKs' own types."""

from __future__ import annotations

from typing import Any

import anthropic.types as at
import openai.types as ot
import pytest
from pydantic import BaseModel, TypeAdapter, ValidationError

from helexa.errors import ApiError
from helexa.wire.anthropic.envelopes import (
    MessagesRequest,
    ThinkingAdaptive,
    ThinkingDisabled,
    ThinkingEnabled,
    parse_count_tokens_request,
    parse_messages_request,
)
from helexa.wire.errors import (
    WireError,
    anthropic_error_body,
    error_body,
    openai_error_body,
    validation_message,
)
from helexa.wire.openai.envelopes import (
    AssistantMessage,
    Model,
    ModelList,
    ToolMessage,
    parse_chat_request,
    parse_completion_request,
)
from helexa.wire.responses.envelopes import (
    FunctionCallItem,
    MessageItem,
    ReasoningItem,
    parse_responses_request,
)


def user(content: Any) -> dict[str, Any]:
    return {"role": "user", "content": content}


def wire_error(parse: Any, body: Any) -> WireError:
    with pytest.raises(WireError) as info:
        parse(body)
    assert info.value.status == 400
    return info.value


# -- OpenAI chat ---------------------------------------------------------------------------

CHAT_BODY: dict[str, Any] = {
    "model": "qwen3",
    "messages": [
        {"role": "system", "content": "be brief"},
        user([{"type": "text", "text": "weather?"}]),
        {
            "role": "assistant",
            "content": None,
            "reasoning_content": "need a tool",
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "weather", "arguments": '{"city":"Oslo"}'},
                }
            ],
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


# -- Anthropic -----------------------------------------------------------------------------

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


# -- Responses -----------------------------------------------------------------------------


def test_responses_request_items() -> None:
    req = parse_responses_request(
        {
            "model": "m",
            "instructions": "be brief",
            "input": [
                {"role": "user", "content": "weather?"},
                {
                    "type": "reasoning",
                    "id": "rs_1",
                    "summary": [{"type": "summary_text", "text": "s"}],
                },
                {"type": "function_call", "call_id": "c1", "name": "weather", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
                {
                    "type": "message",
                    "role": "assistant",
                    "content": [{"type": "output_text", "text": "ok"}],
                },
            ],
            "tools": [{"type": "function", "name": "weather", "parameters": {"type": "object"}}],
            "reasoning": {"effort": "high"},
            "store": False,
            "include": ["reasoning.encrypted_content"],
        }
    )
    assert isinstance(req.input, list)
    kinds = [type(i) for i in req.input]
    assert kinds[:3] == [MessageItem, ReasoningItem, FunctionCallItem]
    assert isinstance(req.input[1], ReasoningItem) and req.input[1].text() == "s"


@pytest.mark.parametrize(
    ("change", "path", "needle"),
    [
        ({"previous_response_id": "resp_1"}, "previous_response_id", "stateless"),
        ({"conversation": "conv_1"}, "conversation", "stateless"),
        ({"input": [{"type": "item_reference", "id": "x"}]}, "input.0", "stateless"),
        ({"input": [{"type": "computer_call"}]}, "input.0", "must be one of"),
        (
            {"input": [user([{"type": "input_image", "image_url": "data:,"}])]},
            "input.0.content.0",
            "images are not supported yet",
        ),
        ({"tools": [{"type": "web_search"}]}, "tools.0", "'web_search' is not supported"),
        ({"tools": [{"type": "function"}]}, "tools.0.name", "required"),
        ({"input": [{"role": "user"}]}, "input.0.content", "required"),
        ({"input": []}, "input", "at least 1"),
    ],
)
def test_responses_request_errors(change: dict[str, Any], path: str, needle: str) -> None:
    err = wire_error(parse_responses_request, {"model": "m", "input": "hi", **change})
    assert err.param == path
    assert needle in err.message


# -- error bodies --------------------------------------------------------------------------

_ERRORS = TypeAdapter(at.ErrorResponse)


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (400, "invalid_request_error"),
        (401, "authentication_error"),
        (403, "permission_error"),
        (404, "not_found_error"),
        (413, "request_too_large"),
        (418, "invalid_request_error"),
        (429, "rate_limit_error"),
        (500, "api_error"),
        (503, "overloaded_error"),
        (504, "timeout_error"),
        (507, "api_error"),
        (529, "overloaded_error"),
    ],
)
def test_anthropic_error_types_follow_status(status: int, kind: str) -> None:
    body = anthropic_error_body(status, "nope")
    assert body == {"type": "error", "error": {"type": kind, "message": "nope"}}
    if kind != "request_too_large":  # the SDK's union lacks this documented type
        assert _ERRORS.validate_python(body).error.type == kind


def test_anthropic_error_type_can_be_forced() -> None:
    assert anthropic_error_body(500, "m", "overloaded_error")["error"]["type"] == "overloaded_error"


def test_wire_error_renders_in_both_dialects() -> None:
    err = WireError(404, "no such model", code="model_not_found", param="model")
    assert error_body("openai", err) == openai_error_body(
        "no such model", type="not_found_error", code="model_not_found", param="model"
    )
    assert set(error_body("openai", err)["error"]) == {"message", "type", "param", "code"}
    assert _ERRORS.validate_python(error_body("anthropic", err)).error.type == "not_found_error"
    assert error_body("openai", WireError(502, "x"))["error"]["type"] == "server_error"


def test_any_api_error_renders_with_its_type_and_extras() -> None:
    err = ApiError("too big", status=507, code="insufficient_vram", extra={"needed_mb": 9})
    assert error_body("openai", err)["error"] == {
        "message": "too big",
        "type": "server_error",
        "param": None,
        "code": "insufficient_vram",
        "needed_mb": 9,
    }
    forced = ApiError("x", status=503, type="overloaded_error")
    assert error_body("openai", forced)["error"]["type"] == "overloaded_error"
    # Anthropic clients know a fixed set of types: the status chooses, not ours.
    assert error_body("anthropic", err)["error"]["type"] == "api_error"


def test_validation_message_without_body_drops_type_labels() -> None:
    class Probe(BaseModel):
        content: str | list[int]

    with pytest.raises(ValidationError) as info:
        Probe.model_validate({"content": ["a"]})
    message = validation_message(info.value)
    assert message.startswith("content.0: ")
    assert "list[" not in message
