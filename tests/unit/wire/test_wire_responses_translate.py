"""Responses to and from OpenAI chat: translated requests must be valid chat requests (our
own envelope checks them), translated answers valid SDK Responses.
"""

from __future__ import annotations

from typing import Any

import pytest
from openai.types.responses import Response

from helexa.wire.openai.envelopes import parse_chat_request
from helexa.wire.responses.envelopes import parse_responses_request
from helexa.wire.responses.translate import openai_to_responses, responses_to_openai
from tests.support.bodies import call, completion


def responses(**fields: Any) -> tuple[Any, dict[str, Any]]:
    req = parse_responses_request({"model": "m", "input": "hi", **fields})
    out = responses_to_openai(req)
    parse_chat_request(out)
    return req, out


def test_responses_items_fold_into_chat_turns() -> None:
    _, out = responses(
        instructions="be brief",
        input=[
            {"role": "developer", "content": "dev note"},
            {
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "a"},
                    {"type": "input_text", "text": "b"},
                ],
            },
            {
                "type": "reasoning",
                "summary": [],
                "content": [{"type": "reasoning_text", "text": "think"}],
            },
            {
                "type": "message",
                "role": "assistant",
                "content": [{"type": "output_text", "text": "Sure."}],
            },
            {"type": "function_call", "call_id": "c1", "name": "f", "arguments": '{"x":1}'},
            {"type": "function_call", "call_id": "c2", "name": "g", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c1", "output": "one"},
            {
                "type": "function_call_output",
                "call_id": "c2",
                "output": [{"type": "input_text", "text": "two"}],
            },
            {"type": "reasoning", "summary": [{"type": "summary_text", "text": "again"}]},
            {"type": "function_call", "call_id": "c3", "name": "f", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c3", "output": "three"},
            {"role": "assistant", "content": "Done."},
        ],
    )
    messages = out["messages"]
    roles = [m["role"] for m in messages]
    assert roles == [
        "system",
        "developer",
        "user",
        "assistant",
        "tool",
        "tool",
        "assistant",
        "tool",
        "assistant",
    ]
    assert messages[0]["content"] == "be brief"
    assert messages[2]["content"] == "a\n\nb"
    first = messages[3]
    assert first["reasoning_content"] == "think" and first["content"] == "Sure."
    assert [c["id"] for c in first["tool_calls"]] == ["c1", "c2"]
    assert messages[5] == {"role": "tool", "tool_call_id": "c2", "content": "two"}
    second = messages[6]
    assert second["reasoning_content"] == "again" and second["content"] is None
    assert second["tool_calls"][0]["id"] == "c3"
    assert messages[8] == {"role": "assistant", "content": "Done."}


def test_responses_settings_map_to_chat_fields() -> None:
    _, out = responses(
        tools=[
            {
                "type": "function",
                "name": "f",
                "description": "d",
                "parameters": {"type": "object"},
                "strict": True,
            }
        ],
        tool_choice={"type": "function", "name": "f"},
        max_output_tokens=50,
        temperature=0.5,
        top_p=0.8,
        parallel_tool_calls=False,
        reasoning={"effort": "high"},
        text={"format": {"type": "json_schema", "name": "x", "schema": {"type": "object"}}},
        stream=True,
        user="u",
    )
    assert out["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "f",
                "description": "d",
                "parameters": {"type": "object"},
                "strict": True,
            },
        }
    ]
    assert out["tool_choice"] == {"type": "function", "function": {"name": "f"}}
    assert (out["max_tokens"], out["temperature"], out["top_p"]) == (50, 0.5, 0.8)
    assert out["parallel_tool_calls"] is False
    assert out["reasoning_effort"] == "high" and out["enable_thinking"] is True
    assert out["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "x", "schema": {"type": "object"}},
    }
    assert out["stream_options"] == {"include_usage": True}
    assert out["messages"] == [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    ("effort", "enabled"), [("minimal", False), ("none", False), ("low", True)]
)
def test_reasoning_effort_switches_thinking(effort: str, enabled: bool) -> None:
    assert responses(reasoning={"effort": effort})[1]["enable_thinking"] is enabled


def test_no_reasoning_leaves_thinking_to_the_model_default() -> None:
    out = responses()[1]
    assert "enable_thinking" not in out and "reasoning_effort" not in out


def test_completion_becomes_a_valid_response() -> None:
    req, _ = responses(
        tools=[{"type": "function", "name": "f"}], instructions="sys", metadata={"k": "v"}
    )
    done = completion(
        content="Hello.",
        reasoning="thought",
        tool_calls=[call("call_1", "f", '{"x": 1}'), call("call_2", "f", "{}")],
        usage={
            "prompt_tokens": 20,
            "completion_tokens": 10,
            "total_tokens": 30,
            "prompt_tokens_details": {"cached_tokens": 5},
            "completion_tokens_details": {"reasoning_tokens": 4},
        },
    )
    out = openai_to_responses(done, req)
    response = Response.model_validate(out)
    assert response.id.startswith("resp_") and response.status == "completed"
    assert response.model == "m" and response.instructions == "sys"
    assert [i.type for i in response.output] == [
        "reasoning",
        "message",
        "function_call",
        "function_call",
    ]
    assert response.output_text == "Hello."
    reasoning_item = response.output[0]
    assert reasoning_item.type == "reasoning" and reasoning_item.content
    assert reasoning_item.content[0].text == "thought"
    calls = [i for i in response.output if i.type == "function_call"]
    assert [(c.call_id, c.arguments) for c in calls] == [("call_1", '{"x": 1}'), ("call_2", "{}")]
    assert len({i.id for i in response.output}) == 4
    assert response.usage is not None
    assert (
        response.usage.input_tokens,
        response.usage.output_tokens,
        response.usage.total_tokens,
    ) == (20, 10, 30)
    assert response.usage.input_tokens_details.cached_tokens == 5
    assert response.usage.output_tokens_details.reasoning_tokens == 4
    assert [t.name for t in response.tools if t.type == "function"] == ["f"]


@pytest.mark.parametrize(
    ("finish", "reason"), [("length", "max_output_tokens"), ("content_filter", "content_filter")]
)
def test_cut_short_completion_is_an_incomplete_response(finish: str, reason: str) -> None:
    req, _ = responses()
    response = Response.model_validate(
        openai_to_responses(completion(content="par", finish_reason=finish), req)
    )
    assert response.status == "incomplete"
    assert response.incomplete_details is not None and response.incomplete_details.reason == reason
    assert response.output[0].type == "message" and response.output[0].status == "incomplete"


def test_explicit_response_id_is_used() -> None:
    req, _ = responses()
    out = openai_to_responses(completion(content="x"), req, response_id="resp_fixed")
    assert out["id"] == "resp_fixed"
    assert all("fixed" in item["id"] for item in out["output"])
