"""Responses envelopes: input items, and the errors that name the field."""

from __future__ import annotations

from typing import Any

import pytest

from helexa.wire.responses.envelopes import (
    FunctionCallItem,
    MessageItem,
    ReasoningItem,
    parse_responses_request,
)
from tests.support.bodies import user, wire_error


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
        ({"tool_choice": "required"}, "tool_choice", "'required' needs tools to call"),
        (
            {"tool_choice": {"type": "function", "name": "f"}},
            "tool_choice",
            "names 'f', which is not among",
        ),
        ({"text": {"format": "json"}}, "text.format", "an object"),
        ({"text": {"format": {"type": "xml"}}}, "text.format.type", "'xml' is not one of"),
        (
            {"text": {"format": {"type": "json_schema", "name": "x", "schema": "{}"}}},
            "text.format.schema",
            "an object",
        ),
        ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format.schema", ""),
    ],
)
def test_responses_request_errors(change: dict[str, Any], path: str, needle: str) -> None:
    err = wire_error(parse_responses_request, {"model": "m", "input": "hi", **change})
    assert err.param == path
    assert needle in err.message
