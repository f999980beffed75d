"""OpenAI chat and completions envelopes, checked against the SDK's own types."""

from __future__ import annotations

from typing import Any

import openai.types as ot
import pytest
import torch

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


CHAT_MIN: dict[str, Any] = {"model": "m", "messages": [user("x")]}


@pytest.mark.parametrize(
    ("change", "path", "needle"),
    [
        ({"seed": 2**64}, "seed", "less than or equal to 18446744073709551615"),
        ({"seed": -(2**63) - 1}, "seed", "greater than or equal to"),
        (
            {"response_format": {"type": "json_schema", "json_schema": "{}"}},
            "response_format.json_schema",
            "an object",
        ),
        ({"response_format": "json_object"}, "response_format", "an object"),
        ({"response_format": {"type": "xml"}}, "response_format.type", "'xml' is not one of"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
            "response_format.json_schema.schema",
            "Field required",
        ),
        ({"min_p": 10**400}, "min_p", "valid number"),
        ({"repetition_penalty": float("inf")}, "repetition_penalty", "finite"),
        ({"repetition_penalty": 0}, "repetition_penalty", "greater than 0"),
        ({"top_k": -2}, "top_k", "greater than or equal to -1"),
        ({"chat_template_kwargs": "enable_thinking"}, "chat_template_kwargs", "an object"),
        ({"stream_options": True}, "stream_options", "an object"),
    ],
)
def test_values_the_engine_cannot_take_are_refused_naming_the_field(
    change: dict[str, Any], path: str, needle: str
) -> None:
    """A 400 before routing; the engine failed on several of these with a 500 (seed,
    min_p, a json_schema or chat_template_kwargs that is not an object)."""
    err = wire_error(parse_chat_request, {**CHAT_MIN, **change})
    assert err.param == path
    assert err.message.startswith(f"{path}: ") and needle in err.message


@pytest.mark.parametrize("seed", [2**64 - 1, -(2**63), 0])
def test_seeds_in_range_are_what_torch_takes(seed: int) -> None:
    assert parse_chat_request({**CHAT_MIN, "seed": seed}).seed == seed
    assert parse_completion_request({"model": "m", "prompt": "p", "seed": seed}).seed == seed
    torch.Generator().manual_seed(seed)  # the engine seeds its sampler so


def test_json_schema_formats_parse_in_chat_shape() -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}
    req = parse_chat_request({**CHAT_MIN, "response_format": fmt})
    assert req.model_dump(by_alias=True, exclude_unset=True)["response_format"] == fmt


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


@pytest.mark.parametrize("prompt", ["hi", "", ["hi"], [100, 200, 300], [7], [[100, 200]]])
def test_one_prompt_as_text_or_token_ids_is_kept_as_sent(prompt: Any) -> None:
    assert parse_completion_request({"model": "m", "prompt": prompt}).prompt == prompt


@pytest.mark.parametrize("prompt", [["a", "b"], [[1], [2, 3]]])
def test_several_prompts_are_refused(prompt: Any) -> None:
    err = wire_error(parse_completion_request, {"model": "m", "prompt": prompt})
    assert (err.param, err.code) == ("prompt", "unsupported_parameter")
    assert err.message == "prompt: only one prompt per request is supported, not a list of 2"


@pytest.mark.parametrize(
    "prompt", [[], [[]], [1, "a"], [True], [1.0], [-1], [2**31], {"text": "x"}, 5]
)
def test_prompts_of_no_shape_say_which_shapes_fit(prompt: Any) -> None:
    err = wire_error(parse_completion_request, {"model": "m", "prompt": prompt})
    assert err.param == "prompt"
    assert err.message == "prompt: must hold a prompt" or err.message.startswith(
        "prompt: must be a string, a list of token ids"
    )


@pytest.mark.parametrize(
    ("change", "path", "needle"),
    [
        ({"echo": True}, "echo", "only false"),
        ({"suffix": "}"}, "suffix", "only an empty string"),
        ({"best_of": 3}, "best_of", "only 1"),
        ({"logit_bias": {"50256": -100}}, "logit_bias", "only an empty object"),
    ],
)
def test_completion_params_helexa_would_ignore_are_refused(
    change: dict[str, Any], path: str, needle: str
) -> None:
    err = wire_error(parse_completion_request, {"model": "m", "prompt": "p", **change})
    assert err.param == path and err.code == "unsupported_parameter"
    assert (
        err.message == f"{path}: not supported; {needle}"
        or err.message == f"{path}: {needle} is supported"
    )


def test_no_op_values_of_those_params_are_accepted() -> None:
    body = {
        "model": "m",
        "prompt": "p",
        "echo": False,
        "suffix": "",
        "best_of": 1,
        "logit_bias": {},
    }
    assert parse_completion_request(body).best_of == 1
    assert parse_chat_request({**CHAT_MIN, "logit_bias": {}}).logit_bias == {}


def test_chat_logit_bias_is_refused() -> None:
    err = wire_error(parse_chat_request, {**CHAT_MIN, "logit_bias": {"1": 5}})
    assert err.param == "logit_bias" and err.code == "unsupported_parameter"


TOOLS = [{"type": "function", "function": {"name": "weather"}}]


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"tool_choice": "required"}, "'required' needs tools to call, and the request has none"),
        ({"tool_choice": "required", "tools": []}, "'required' needs tools"),
        (
            {"tool_choice": {"type": "function", "function": {"name": "weather"}}},
            "names 'weather', which is not among the request's tools",
        ),
        (
            {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "x"}}},
            "names 'x'",
        ),
    ],
)
def test_tool_choice_must_have_a_tool_to_call(change: dict[str, Any], needle: str) -> None:
    err = wire_error(parse_chat_request, {**CHAT_MIN, **change})
    assert err.param == "tool_choice"
    assert err.message.startswith("tool_choice: ") and needle in err.message


@pytest.mark.parametrize("choice", ["none", "auto", "required"])
def test_tool_choice_with_tools_is_accepted(choice: str) -> None:
    assert parse_chat_request({**CHAT_MIN, "tools": TOOLS, "tool_choice": choice}).tool_choice
    if choice != "required":
        assert parse_chat_request({**CHAT_MIN, "tool_choice": choice}).tool_choice == choice


FUNCTIONS = [{"name": "weather", "parameters": {"type": "object"}}]


def test_legacy_function_calling_parses() -> None:
    messages = [
        user("weather?"),
        {"role": "assistant", "content": None, "function_call": {"name": "weather"}},
        {"role": "function", "name": "weather", "content": "sunny"},
    ]
    body = {"model": "m", "messages": messages, "functions": FUNCTIONS, "function_call": "auto"}
    req = parse_chat_request(body)
    assert req.uses_functions and req.function_call == "auto"
    assert not parse_chat_request(CHAT_MIN).uses_functions


@pytest.mark.parametrize(
    ("change", "path", "needle"),
    [
        ({"functions": FUNCTIONS, "tools": TOOLS}, "functions", "tools or functions, not both"),
        (
            {"functions": FUNCTIONS, "function_call": "auto", "tool_choice": "auto"},
            "function_call",
            "tool_choice or function_call, not both",
        ),
        ({"functions": FUNCTIONS, "function_call": {"name": "x"}}, "function_call", "names 'x'"),
        ({"function_call": {"name": "weather"}}, "function_call", "names 'weather'"),
        ({"function_call": "required"}, "function_call", "'none' or 'auto'"),
        ({"functions": [{"description": "no name"}]}, "functions.0.name", "Field required"),
    ],
)
def test_legacy_function_calling_errors(change: dict[str, Any], path: str, needle: str) -> None:
    err = wire_error(parse_chat_request, {**CHAT_MIN, **change})
    assert err.param == path
    assert needle in err.message


def test_model_list_matches_openai_types() -> None:
    listing = ModelList(data=[Model(id="qwen3-8b", created=1)]).model_dump()
    for entry in listing["data"]:
        assert ot.Model.model_validate(entry).id == "qwen3-8b"
    assert listing["object"] == "list"
