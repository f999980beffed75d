"""Request options the generation loop honours or refuses, driven by a scripted model:
tool_choice (required / a named function), parallel_tool_calls, Anthropic prefill
(continue_final_message), reasoning_effort, the developer role, the clamped budget the
Anthropic route asks for, and the options this engine refuses instead of ignoring."""

from __future__ import annotations

import json
from typing import Any

import pytest

from helexa.engine.request import RequestError
from helexa.engine.text.tokenizer import Tokenizer
from tests.engine.test_generate_scripted import (
    WEATHER_TOOL,
    chat,
    finish,
    joined,
    scripted,
)

TIME_TOOL = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}
TWO_CALLS = (
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>\n'
    '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
)


def calls(chunks: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """(name, arguments) of each streamed tool call, reassembled from its deltas."""
    found: dict[int, dict[str, str]] = {}
    for c in chunks:
        for d in (c["choices"][0]["delta"].get("tool_calls") or []) if c["choices"] else []:
            entry = found.setdefault(d["index"], {"name": "", "arguments": ""})
            entry["name"] += d.get("function", {}).get("name") or ""
            entry["arguments"] += d.get("function", {}).get("arguments") or ""
    return [(e["name"], json.loads(e["arguments"])) for _, e in sorted(found.items())]


def test_a_named_tool_choice_forces_that_call(tokenizer: Tokenizer) -> None:
    # The prompt already holds '<tool_call>\n{"name": "get_weather", "arguments": ': the
    # model writes only the arguments and the closing tag.
    model = scripted(tokenizer, '{"city": "Paris"}}\n</tool_call>\nand then more text')
    choice = {"type": "function", "function": {"name": "get_weather"}}
    prompt = model.render(
        {
            "messages": [{"role": "user", "content": "hi"}],
            "tools": [WEATHER_TOOL],
            "tool_choice": choice,
        }
    )
    assert prompt.endswith('<tool_call>\n{"name": "get_weather", "arguments": ')
    assert "<think>\n\n</think>" in prompt  # no thinking before a forced call
    chunks = chat(model, tools=[WEATHER_TOOL, TIME_TOOL], tool_choice=choice)
    assert calls(chunks) == [("get_weather", {"city": "Paris"})]
    assert joined(chunks, "content") == ""
    assert finish(chunks)["finish_reason"] == "tool_calls"
    # It stopped once the call closed: the trailing text was never generated.
    assert chunks[-1]["usage"]["completion_tokens"] < len(model.model.script)


def test_required_tool_choice_opens_a_call(tokenizer: Tokenizer) -> None:
    model = scripted(tokenizer, '{"name": "get_time", "arguments": {}}\n</tool_call>')
    chunks = chat(model, tools=[WEATHER_TOOL, TIME_TOOL], tool_choice="required")
    assert calls(chunks) == [("get_time", {})]
    assert finish(chunks)["finish_reason"] == "tool_calls"


def test_parallel_tool_calls_false_keeps_the_first_call(tokenizer: Tokenizer) -> None:
    both = chat(scripted(tokenizer, TWO_CALLS), tools=[WEATHER_TOOL, TIME_TOOL])
    assert [name for name, _ in calls(both)] == ["get_weather", "get_time"]
    model = scripted(tokenizer, TWO_CALLS)
    one = chat(model, tools=[WEATHER_TOOL, TIME_TOOL], parallel_tool_calls=False)
    assert calls(one) == [("get_weather", {"city": "Oslo"})]
    assert finish(one)["finish_reason"] == "tool_calls"
    assert one[-1]["usage"]["completion_tokens"] < both[-1]["usage"]["completion_tokens"]


def test_a_named_tool_must_be_offered(tokenizer: Tokenizer) -> None:
    model = scripted(tokenizer, "x")
    with pytest.raises(RequestError, match="'get_time', which is not among") as err:
        chat(
            model,
            tools=[WEATHER_TOOL],
            tool_choice={"type": "function", "function": {"name": "get_time"}},
        )
    assert err.value.code == "invalid_value"
    assert model.model.calls == []


def test_prefill_continues_the_assistant_message(tokenizer: Tokenizer) -> None:
    model = scripted(tokenizer, " a tiny model.")
    body = {
        "messages": [
            {"role": "user", "content": "Who are you?"},
            {"role": "assistant", "content": "Hello! I am"},
        ],
        "continue_final_message": True,
        "add_generation_prompt": False,
    }
    prompt = model.render(body)
    assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\nHello! I am")
    chunks = chat(model, **body)
    assert joined(chunks, "content") == " a tiny model."  # the continuation only


@pytest.mark.parametrize(
    ("effort", "thinks"), [("none", False), ("minimal", False), ("high", True)]
)
def test_reasoning_effort_switches_thinking(
    tokenizer: Tokenizer, effort: str, thinks: bool
) -> None:
    model = scripted(tokenizer, "x")
    prompt = model.render(
        {"messages": [{"role": "user", "content": "hi"}], "reasoning_effort": effort}
    )
    assert prompt.endswith("<think>\n\n</think>\n\n") is not thinks


def test_the_developer_role_reaches_the_prompt(tokenizer: Tokenizer) -> None:
    model = scripted(tokenizer, "x")
    prompt = model.render(
        {
            "messages": [
                {"role": "developer", "content": "Answer in French."},
                {"role": "user", "content": "hi"},
            ]
        }
    )
    assert prompt.startswith("<|im_start|>system\nAnswer in French.<|im_end|>")


def test_a_clamped_budget_stops_at_the_context(tokenizer: Tokenizer) -> None:
    text = "a b c d e f g h i j k l m n o p q r s t u v w x y z"
    with pytest.raises(RequestError, match="maximum context length is 24"):
        chat(scripted(tokenizer, text, eos=False, max_seq=24), max_tokens=500)
    chunks = chat(
        scripted(tokenizer, text, eos=False, max_seq=24), max_tokens=500, clamp_max_tokens=True
    )
    assert chunks[-1]["usage"]["total_tokens"] == 24
    assert finish(chunks)["finish_reason"] == "length"


@pytest.mark.parametrize(
    "body", [{"logprobs": True}, {"top_logprobs": 3}], ids=["logprobs", "top_logprobs"]
)
def test_unsupported_options_are_refused_not_ignored(tokenizer: Tokenizer, body: dict) -> None:
    model = scripted(tokenizer, "x")
    with pytest.raises(RequestError) as err:
        chat(model, **body)
    assert err.value.code == "unsupported_parameter"
    assert model.model.calls == []


def test_neutral_values_of_those_options_are_accepted(tokenizer: Tokenizer) -> None:
    chunks = chat(scripted(tokenizer, "ok"), response_format={"type": "text"}, logprobs=False)
    assert joined(chunks, "content") == "ok"


# -- JSON mode ------------------------------------------------------------------------------

SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}


def test_json_mode_ends_with_the_value(tokenizer: Tokenizer) -> None:
    model = scripted(tokenizer, '{"city": "Oslo", "n": [1, 2.5e3]} and some chatter after it')
    chunks = chat(model, response_format={"type": "json_object"})
    assert json.loads(joined(chunks, "content")) == {"city": "Oslo", "n": [1, 2500.0]}
    assert finish(chunks)["finish_reason"] == "stop"
    assert chunks[-1]["usage"]["completion_tokens"] < len(model.model.script)


def test_json_schema_is_given_to_the_model_and_thinking_is_off(tokenizer: Tokenizer) -> None:
    model = scripted(tokenizer, "x")
    fmt = {"type": "json_schema", "json_schema": {"name": "place", "schema": SCHEMA}}
    prompt = model.render(
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "hi"},
            ],
            "response_format": fmt,
        }
    )
    system = prompt.split("<|im_end|>")[0]
    assert system.startswith("<|im_start|>system\nBe brief.\n\nAnswer with a single JSON value")
    assert json.dumps(SCHEMA) in system and "(place)" in system
    assert prompt.endswith("<think>\n\n</think>\n\n")


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"response_format": {"type": "xml"}}, "invalid_value"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
            "invalid_request",
        ),
    ],
    ids=["unknown type", "no schema"],
)
def test_json_mode_refusals(tokenizer: Tokenizer, body: dict, code: str) -> None:
    model = scripted(tokenizer, "x")
    with pytest.raises(RequestError) as err:
        chat(model, **body)
    assert err.value.code == code
    assert model.model.calls == []


def test_json_with_tools_is_an_instruction_not_a_constraint(tokenizer: Tokenizer) -> None:
    """Codex (--output-schema) and agent SDKs send a schema with their tools: the model
    may still call a tool, so only the instruction goes in; decoding stays free."""
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    model = scripted(tokenizer, call, max_seq=2048)  # room for the tools' system prompt
    fmt = {"type": "json_schema", "json_schema": {"name": "place", "schema": SCHEMA}}
    chunks = chat(model, tools=[WEATHER_TOOL], response_format=fmt)
    assert calls(chunks) == [("get_weather", {"city": "Oslo"})]
    request = {"messages": [{"role": "user", "content": "hi"}], "tools": [WEATHER_TOOL]}
    prompt = model.render({**request, "response_format": fmt})
    assert "When you answer rather than call a tool, answer with a single JSON value" in prompt
    assert not prompt.endswith("<think>\n\n</think>\n\n")  # thinking as the model likes


# -- calls under the call grammar -----------------------------------------------------------

CITY = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 8}},
    "required": ["city"],
    "additionalProperties": False,
}
STRICT_WEATHER = {
    "type": "function",
    "function": {"name": "get_weather", "parameters": CITY, "strict": True},
}
BAD_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": 5, "x": 1}}\n</tool_call>'


def test_a_strict_tools_call_amid_free_text_is_held_to_its_schema(tokenizer: Tokenizer) -> None:
    """The model writes text, then a call with arguments its schema forbids: the text is
    left as written, the call's arguments are decoded to the schema, and after the call
    decoding is free again (this script's leftover tokens come out as text)."""
    model = scripted(tokenizer, f"Sure, let me look. {BAD_CALL}", max_seq=2048)
    chunks = chat(model, tools=[STRICT_WEATHER])
    assert joined(chunks, "content").startswith("Sure, let me look.")
    ((name, arguments),) = calls(chunks)
    assert name == "get_weather"
    assert set(arguments) == {"city"} and isinstance(arguments["city"], str)
    assert len(arguments["city"]) <= 8
    # Not strict: nothing holds the call, whose arguments stay as the model wrote them.
    loose = {"type": "function", "function": {"name": "get_weather", "parameters": CITY}}
    free = chat(scripted(tokenizer, BAD_CALL, max_seq=2048), tools=[loose])
    assert calls(free) == [("get_weather", {"city": 5, "x": 1})]


def test_required_calls_may_be_parallel_as_the_template_writes_them(tokenizer: Tokenizer) -> None:
    model = scripted(tokenizer, TWO_CALLS.split("<tool_call>\n", 1)[1], max_seq=2048)
    chunks = chat(model, tools=[WEATHER_TOOL, TIME_TOOL], tool_choice="required")
    assert calls(chunks) == [("get_weather", {"city": "Oslo"}), ("get_time", {})]
    assert finish(chunks)["finish_reason"] == "tool_calls"


def test_a_required_call_to_no_given_tool_becomes_one(tokenizer: Tokenizer) -> None:
    """The model names a tool it was not given: the grammar lets it name only the tools."""
    model = scripted(tokenizer, BAD_CALL.replace("get_weather", "get_wether"), max_seq=2048)
    strict_time = {
        "type": "function",
        "function": {"name": "get_time", "parameters": {**CITY, "required": []}},
    }
    chunks = chat(
        model,
        tools=[STRICT_WEATHER, strict_time],
        tool_choice="required",
        parallel_tool_calls=False,
    )
    ((name, arguments),) = calls(chunks)
    assert name in ("get_weather", "get_time") and set(arguments) <= {"city"}
