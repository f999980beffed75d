"""Folding OpenAI chunk streams back into the one completion a non-streaming client gets."""

from __future__ import annotations

from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from helexa.wire.openai.translate import (
    ChatAccumulator,
    accumulate_completion,
    as_function_call,
    functions_as_tools,
)
from tests.support.streams import CREATED, REASONING, TEXT, TOOLS, USAGE, chunk, folded, script


def test_accumulator_rebuilds_the_completion() -> None:
    chunks = script(reasoning=REASONING, text=TEXT, tools=TOOLS, finish="tool_calls")
    done = folded(chunks)
    parsed = ChatCompletion.model_validate(done)
    message = parsed.choices[0].message
    assert message.content == "".join(TEXT)
    assert done["choices"][0]["message"]["reasoning_content"] == "".join(REASONING)
    assert message.tool_calls is not None
    assert [(c.id, c.function.name, c.function.arguments) for c in message.tool_calls] == [
        (call_id, name, "".join(pieces)) for call_id, name, pieces in TOOLS
    ]
    assert parsed.choices[0].finish_reason == "tool_calls"
    assert parsed.usage is not None and parsed.usage.completion_tokens == USAGE["completion_tokens"]
    assert (parsed.id, parsed.created, parsed.model) == ("chatcmpl-s1", CREATED, "qwen3")


def test_accumulator_folds_incrementally_and_keeps_stop_sequence() -> None:
    acc = ChatAccumulator()
    chunks = script(text=["a", "b"], finish="stop", stop_sequence="END")
    for c in chunks[:2]:
        acc.add(c)
    partial = acc.result()
    assert partial["choices"][0]["message"]["content"] == "a"
    assert partial["choices"][0]["finish_reason"] is None and "usage" not in partial
    for c in chunks[2:]:
        acc.add(c)
    final = acc.result()
    assert final["choices"][0]["message"]["content"] == "ab"
    assert final["choices"][0]["stop_sequence"] == "END"
    assert final["usage"] == USAGE


def test_interleaved_tool_call_fragments_merge_by_index() -> None:
    chunks = [
        chunk(
            {
                "tool_calls": [
                    {
                        "index": 0,
                        "id": "c0",
                        "type": "function",
                        "function": {"name": "f", "arguments": "{"},
                    }
                ]
            }
        ),
        chunk(
            {
                "tool_calls": [
                    {
                        "index": 1,
                        "id": "c1",
                        "type": "function",
                        "function": {"name": "g", "arguments": "["},
                    }
                ]
            }
        ),
        chunk(
            {
                "tool_calls": [
                    {"index": 0, "function": {"arguments": "}"}},
                    {"index": 1, "function": {"arguments": "]"}},
                ]
            }
        ),
        chunk(finish="tool_calls"),
    ]
    calls = folded(chunks)["choices"][0]["message"]["tool_calls"]
    assert [(c["id"], c["function"]["name"], c["function"]["arguments"]) for c in calls] == [
        ("c0", "f", "{}"),
        ("c1", "g", "[]"),
    ]


def test_accumulate_completion() -> None:
    chunks = [
        {
            "id": "cmpl-1",
            "object": "text_completion",
            "created": CREATED,
            "model": "m",
            "choices": [{"index": 0, "text": piece, "finish_reason": None, "logprobs": None}],
        }
        for piece in ["Once", " upon"]
    ]
    chunks.append(
        {
            "id": "cmpl-1",
            "object": "text_completion",
            "created": CREATED,
            "model": "m",
            "choices": [{"index": 0, "text": "", "finish_reason": "length", "logprobs": None}],
            "usage": USAGE,
        }
    )
    done = Completion.model_validate(accumulate_completion(chunks))
    assert done.choices[0].text == "Once upon" and done.choices[0].finish_reason == "length"
    assert done.usage is not None and done.usage.total_tokens == USAGE["total_tokens"]


# -- deprecated function calling -----------------------------------------------------------

WEATHER = {"name": "weather", "parameters": {"type": "object"}}


def test_bodies_without_legacy_function_calling_are_passed_as_they_are() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": []}
    assert functions_as_tools(body) is body


def test_functions_become_tools_and_function_call_a_tool_choice() -> None:
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": "x"}],
        "functions": [WEATHER],
        "function_call": {"name": "weather"},
        "temperature": 0,
    }
    assert functions_as_tools(body) == {
        "model": "m",
        "messages": [{"role": "user", "content": "x"}],
        "tools": [{"type": "function", "function": WEATHER}],
        "tool_choice": {"type": "function", "function": {"name": "weather"}},
        "parallel_tool_calls": False,
        "temperature": 0,
    }
    for word in ("none", "auto"):
        assert functions_as_tools({**body, "function_call": word})["tool_choice"] == word


def test_legacy_turns_become_tool_calls_and_results() -> None:
    messages = [
        {"role": "user", "content": "weather in Oslo and Bergen?"},
        {"role": "assistant", "content": None, "function_call": {"name": "weather"}},
        {"role": "function", "name": "weather", "content": "sunny"},
        {"role": "assistant", "function_call": {"name": "weather", "arguments": "{}"}},
        {"role": "function", "name": "weather", "content": None},
    ]
    out = functions_as_tools({"model": "m", "messages": messages})["messages"]
    first, second = out[1]["tool_calls"][0], out[3]["tool_calls"][0]
    assert first["function"] == {"name": "weather", "arguments": ""}
    assert second["function"] == {"name": "weather", "arguments": "{}"}
    assert first["id"] != second["id"] and "function_call" not in out[1]
    assert out[2] == {"role": "tool", "tool_call_id": first["id"], "content": "sunny"}
    assert out[4] == {"role": "tool", "tool_call_id": second["id"], "content": ""}
    assert out[0] == messages[0]


def test_a_tool_call_answer_becomes_a_function_call() -> None:
    chunks = script(tools=TOOLS, finish="tool_calls")
    done = as_function_call(folded(chunks))
    parsed = ChatCompletion.model_validate(done)
    choice = parsed.choices[0]
    assert choice.finish_reason == "function_call" and choice.message.tool_calls is None
    call_id, name, pieces = TOOLS[0]  # a legacy answer holds one call: the first
    assert choice.message.function_call is not None
    assert (choice.message.function_call.name, choice.message.function_call.arguments) == (
        name,
        "".join(pieces),
    )


def test_tool_call_deltas_become_function_call_deltas() -> None:
    chunks = [as_function_call(c) for c in script(tools=TOOLS, finish="tool_calls")]
    for c in chunks:
        ChatCompletionChunk.model_validate(c)
        assert all("tool_calls" not in choice["delta"] for choice in c["choices"])
    deltas = [
        ch["delta"]["function_call"]
        for c in chunks
        for ch in c["choices"]
        if "function_call" in ch["delta"]
    ]
    call_id, name, pieces = TOOLS[0]
    assert deltas[0] == {"name": name, "arguments": ""}
    assert [d["arguments"] for d in deltas[1:]] == pieces  # the second call's are dropped
    assert chunks[-2]["choices"][0]["finish_reason"] == "function_call"
    assert as_function_call(chunks[-1]) == chunks[-1]  # the usage chunk has no choices
