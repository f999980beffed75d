"""Folding OpenAI chunk streams back into the one completion a non-streaming client gets."""

from __future__ import annotations

from openai.types import Completion
from openai.types.chat import ChatCompletion

from helexa.wire.openai.translate import ChatAccumulator, accumulate_completion
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
