"""Anthropic Messages to and from OpenAI chat: translated requests must be valid chat
requests (our own envelope checks them), translated answers valid SDK messages.
"""

from __future__ import annotations

import json
from typing import Any

import anthropic.types as at
import pytest

from helexa.wire.anthropic.envelopes import parse_count_tokens_request, parse_messages_request
from helexa.wire.anthropic.translate import (
    anthropic_to_openai,
    map_stop_reason,
    openai_to_anthropic,
    parse_tool_arguments,
)
from helexa.wire.errors import WireError
from helexa.wire.openai.envelopes import parse_chat_request
from tests.support.bodies import call, completion, user


def anthropic(**fields: Any) -> dict[str, Any]:
    """An Anthropic request body -> the OpenAI chat request, checked to be a valid one."""
    body = {"model": "m", "max_tokens": 64, "messages": [user("hi")], **fields}
    out = anthropic_to_openai(parse_messages_request(body))
    parse_chat_request(out)
    return out


# -- Anthropic -> OpenAI -------------------------------------------------------------------

WEATHER_TOOL = {
    "name": "weather",
    "description": "Weather for a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
}


def test_anthropic_conversation_maps_to_chat_messages() -> None:
    out = anthropic(
        system=[{"type": "text", "text": "rule one"}, {"type": "text", "text": "rule two"}],
        messages=[
            user([{"type": "text", "text": "hi"}, {"type": "text", "text": "weather in Oslo?"}]),
            {
                "role": "assistant",
                "content": [
                    {"type": "thinking", "thinking": "use the tool", "signature": "s"},
                    {"type": "text", "text": "Checking."},
                    {
                        "type": "tool_use",
                        "id": "toolu_1",
                        "name": "weather",
                        "input": {"city": "Oslo"},
                    },
                    {
                        "type": "tool_use",
                        "id": "toolu_2",
                        "name": "weather",
                        "input": {"city": "Bø"},
                    },
                ],
            },
            user(
                [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"},
                    {
                        "type": "tool_result",
                        "tool_use_id": "toolu_2",
                        "content": [{"type": "text", "text": "no such city"}],
                        "is_error": True,
                    },
                    {"type": "text", "text": "and tomorrow?"},
                ]
            ),
        ],
    )
    messages = out["messages"]
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "tool", "tool", "user"]
    assert messages[0]["content"] == "rule one\n\nrule two"
    assert messages[1]["content"] == "hi\n\nweather in Oslo?"
    assistant = messages[2]
    assert assistant["content"] == "Checking."
    assert assistant["reasoning_content"] == "use the tool"
    assert [c["id"] for c in assistant["tool_calls"]] == ["toolu_1", "toolu_2"]
    assert [json.loads(c["function"]["arguments"]) for c in assistant["tool_calls"]] == [
        {"city": "Oslo"},
        {"city": "Bø"},
    ]
    assert messages[3] == {"role": "tool", "tool_call_id": "toolu_1", "content": "sunny"}
    assert messages[4]["tool_call_id"] == "toolu_2"
    assert messages[4]["content"].startswith("Error") and "no such city" in messages[4]["content"]
    assert messages[5] == {"role": "user", "content": "and tomorrow?"}
    assert "continue_final_message" not in out


def test_text_before_tool_results_keeps_its_place() -> None:
    out = anthropic(
        messages=[
            user("go"),
            {
                "role": "assistant",
                "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {}}],
            },
            user([{"type": "text", "text": "note"}, {"type": "tool_result", "tool_use_id": "t"}]),
        ]
    )
    assert [m["role"] for m in out["messages"]] == ["user", "assistant", "user", "tool"]
    assert out["messages"][1]["content"] is None
    assert out["messages"][3]["content"] == ""


def test_sampling_tools_and_streaming_fields() -> None:
    out = anthropic(
        tools=[WEATHER_TOOL],
        tool_choice={"type": "auto", "disable_parallel_tool_use": True},
        stop_sequences=["END", "STOP"],
        temperature=0.2,
        top_p=0.9,
        top_k=20,
        stream=True,
        metadata={"user_id": "u1"},
    )
    assert out["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "weather",
                "description": "Weather for a city",
                "parameters": WEATHER_TOOL["input_schema"],
            },
        }
    ]
    assert out["tool_choice"] == "auto" and out["parallel_tool_calls"] is False
    assert out["stop"] == ["END", "STOP"]
    assert (out["temperature"], out["top_p"], out["top_k"]) == (0.2, 0.9, 20)
    assert out["max_tokens"] == 64 and out["clamp_max_tokens"] is True
    assert out["stream"] is True and out["stream_options"] == {"include_usage": True}
    assert out["user"] == "u1"


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ({"type": "auto"}, "auto"),
        ({"type": "any"}, "required"),
        ({"type": "none"}, "none"),
        (
            {"type": "tool", "name": "weather"},
            {"type": "function", "function": {"name": "weather"}},
        ),
    ],
)
def test_tool_choice_mapping(choice: dict[str, Any], expected: Any) -> None:
    out = anthropic(tools=[WEATHER_TOOL], tool_choice=choice)
    assert out["tool_choice"] == expected
    assert "parallel_tool_calls" not in out


@pytest.mark.parametrize(
    ("thinking", "enabled"),
    [
        ({"type": "enabled", "budget_tokens": 1024}, True),
        ({"type": "adaptive"}, True),
        ({"type": "disabled"}, False),
        (None, False),
    ],
)
def test_thinking_switch(thinking: dict[str, Any] | None, enabled: bool) -> None:
    out = anthropic(**({"thinking": thinking} if thinking else {}))
    assert out["chat_template_kwargs"] == {"enable_thinking": enabled}
    assert out["enable_thinking"] is enabled


def test_non_streaming_request_has_no_stream_fields() -> None:
    out = anthropic()
    assert "stream" not in out and "stream_options" not in out and "stop" not in out


def test_assistant_last_is_a_prefill() -> None:
    out = anthropic(messages=[user("say hi"), {"role": "assistant", "content": "Hel"}])
    assert out["messages"][-1] == {"role": "assistant", "content": "Hel"}
    assert out["continue_final_message"] is True and out["add_generation_prompt"] is False


def test_count_tokens_request_maps_the_prompt_only() -> None:
    req = parse_count_tokens_request({"model": "m", "system": "sys", "messages": [user("hi")]})
    out = anthropic_to_openai(req)
    assert out["messages"] == [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "hi"},
    ]
    assert "max_tokens" not in out and "stream" not in out and "clamp_max_tokens" not in out


@pytest.mark.parametrize(
    ("messages", "path", "needle"),
    [
        (
            [user([{"type": "tool_result", "tool_use_id": "ghost"}])],
            "messages.0.content.0.tool_use_id",
            "'ghost'",
        ),
        (
            [user([{"type": "tool_use", "id": "t", "name": "f", "input": {}}])],
            "messages.0.content.0",
            "tool_use blocks belong in assistant messages",
        ),
        (
            [
                user("x"),
                {"role": "assistant", "content": [{"type": "tool_result", "tool_use_id": "t"}]},
            ],
            "messages.1.content.0",
            "tool_result blocks belong in user messages",
        ),
        (
            [user([{"type": "thinking", "thinking": "hm"}])],
            "messages.0.content.0",
            "thinking blocks belong in assistant messages",
        ),
    ],
)
def test_misplaced_blocks_are_client_errors(
    messages: list[dict[str, Any]], path: str, needle: str
) -> None:
    req = parse_messages_request({"model": "m", "max_tokens": 5, "messages": messages})
    with pytest.raises(WireError) as info:
        anthropic_to_openai(req)
    assert info.value.status == 400
    assert info.value.param == path
    assert needle in info.value.message


# -- OpenAI -> Anthropic -------------------------------------------------------------------


BILLING = "x-anthropic-billing-header: cc_version=2.1.37.0d9; cc_entrypoint=cli; cch=fa690;"


@pytest.mark.parametrize(
    ("system", "expected"),
    [
        # Claude Code's shape: the header is a block of its own, first
        (
            [{"type": "text", "text": BILLING}, {"type": "text", "text": "You are Claude Code."}],
            "You are Claude Code.",
        ),
        # the same line at the start of a longer first block, or of a plain string
        ([{"type": "text", "text": f"{BILLING}\nYou are Claude Code."}], "You are Claude Code."),
        (f"{BILLING}\nBe brief.\nReally.", "Be brief.\nReally."),
        # anywhere else it is the user's text, left alone
        (
            [{"type": "text", "text": "Be brief."}, {"type": "text", "text": BILLING}],
            f"Be brief.\n\n{BILLING}",
        ),
        (f"Be brief.\n{BILLING}", f"Be brief.\n{BILLING}"),
    ],
)
def test_claude_code_billing_line_is_dropped_from_the_system_prompt(
    system: Any, expected: str
) -> None:
    """Its cch= changes every request: left in, no prompt would share a prefix."""
    assert anthropic(system=system)["messages"][0] == {"role": "system", "content": expected}


def test_a_system_prompt_of_only_the_billing_line_is_no_system_prompt() -> None:
    assert anthropic(system=[{"type": "text", "text": BILLING}])["messages"] == [
        {"role": "user", "content": "hi"}
    ]
    counted = parse_count_tokens_request(
        {"model": "m", "system": BILLING, "messages": [user("hi")]}
    )
    assert anthropic_to_openai(counted)["messages"] == [{"role": "user", "content": "hi"}]


def test_completion_becomes_a_valid_anthropic_message() -> None:
    done = completion(
        content="It is sunny.",
        reasoning="check weather",
        tool_calls=[call("call_1", "weather", '{"city": "Oslo"}')],
        finish_reason="tool_calls",
        usage={
            "prompt_tokens": 100,
            "completion_tokens": 9,
            "total_tokens": 109,
            "prompt_tokens_details": {"cached_tokens": 60},
        },
    )
    out = openai_to_anthropic(done, "claude-ish")
    message = at.Message.model_validate(out)
    assert message.id.startswith("msg_") and "abc123" in message.id
    assert message.model == "claude-ish"
    assert [b.type for b in message.content] == ["thinking", "text", "tool_use"]
    thinking, text, tool = message.content
    assert isinstance(thinking, at.ThinkingBlock) and thinking.thinking == "check weather"
    assert isinstance(text, at.TextBlock) and text.text == "It is sunny."
    assert isinstance(tool, at.ToolUseBlock)
    assert (tool.id, tool.name, tool.input) == ("call_1", "weather", {"city": "Oslo"})
    assert message.stop_reason == "tool_use"
    # Anthropic counts cache reads apart from input_tokens; OpenAI counts them inside.
    assert message.usage.input_tokens == 40
    assert message.usage.cache_read_input_tokens == 60
    assert message.usage.cache_creation_input_tokens == 0
    assert message.usage.output_tokens == 9


def test_plain_completion_has_no_cache_field_and_only_text() -> None:
    message = at.Message.model_validate(openai_to_anthropic(completion(content="hi"), "m"))
    assert [b.type for b in message.content] == ["text"]
    assert message.usage.input_tokens == 11 and message.usage.cache_read_input_tokens is None
    assert message.stop_reason == "end_turn" and message.stop_sequence is None


def test_matched_stop_string_becomes_stop_sequence() -> None:
    out = openai_to_anthropic(completion(content="a", stop_sequence="END"), "m")
    message = at.Message.model_validate(out)
    assert (message.stop_reason, message.stop_sequence) == ("stop_sequence", "END")


@pytest.mark.parametrize(
    ("finish", "stop_sequence", "expected"),
    [
        ("stop", None, "end_turn"),
        (None, None, "end_turn"),
        ("length", None, "max_tokens"),
        ("tool_calls", None, "tool_use"),
        ("function_call", None, "tool_use"),
        ("content_filter", None, "refusal"),
        ("stop", "END", "stop_sequence"),
        ("length", "END", "max_tokens"),
    ],
)
def test_map_stop_reason(finish: str | None, stop_sequence: str | None, expected: str) -> None:
    assert map_stop_reason(finish, stop_sequence) == expected


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        ('{"a": 1}', {"a": 1}),
        ("", {}),
        ("  ", {}),
        (None, {}),
        ('{"a": ', {"_raw_arguments": '{"a": '}),
        ("[1, 2]", {"_raw_arguments": "[1, 2]"}),
    ],
)
def test_tool_arguments(arguments: str | None, expected: dict[str, Any]) -> None:
    assert parse_tool_arguments(arguments) == expected


def test_tool_call_round_trip_through_both_dialects() -> None:
    """A tool call the engine makes comes back, via the client, as the matching result."""
    arguments = {"city": "Oslo", "days": [1, 2], "units": {"temp": "C"}}
    answer = completion(
        content=None,
        tool_calls=[call("call_9", "weather", json.dumps(arguments))],
        finish_reason="tool_calls",
    )
    message = at.Message.model_validate(openai_to_anthropic(answer, "m"))
    tool = message.content[0]
    assert isinstance(tool, at.ToolUseBlock) and tool.input == arguments
    follow_up = anthropic(
        tools=[WEATHER_TOOL],
        messages=[
            user("weather?"),
            {
                "role": "assistant",
                "content": [b.model_dump(exclude_none=True) for b in message.content],
            },
            user([{"type": "tool_result", "tool_use_id": tool.id, "content": "sunny"}]),
        ],
    )
    assistant, result = follow_up["messages"][1:3]
    replayed = assistant["tool_calls"][0]
    assert replayed["id"] == "call_9" == result["tool_call_id"]
    assert json.loads(replayed["function"]["arguments"]) == arguments
