"""The Anthropic stream translator: every event validated against the SDK's event union, the
whole stream read end to end by the real SDK client from a loopback server.
"""

from __future__ import annotations

import json
from typing import Any

import anthropic
import anthropic.types as at
import pytest
from pydantic import TypeAdapter

from helexa.wire.anthropic.stream import PING, AnthropicStreamTranslator
from helexa.wire.anthropic.translate import openai_to_anthropic
from helexa.wire.sse import Event, sse_events
from tests.support.streams import (
    REASONING,
    TEXT,
    TOOLS,
    USAGE,
    chunk,
    folded,
    late_fragment_chunks,
    script,
    serve_frames,
)

_ANTHROPIC_EVENT = TypeAdapter(at.RawMessageStreamEvent)


def run_anthropic(chunks: list[dict[str, Any]], **kwargs: Any) -> list[Event]:
    translator = AnthropicStreamTranslator("claude-ish", **kwargs)
    events = [e for c in chunks for e in translator.feed(c)] + translator.finish()
    assert translator.finish() == []
    for name, payload in events:
        assert name == payload["type"]
        _ANTHROPIC_EVENT.validate_python(payload)
    check_anthropic_grammar(events)
    return events


def check_anthropic_grammar(events: list[Event]) -> None:
    """message_start, then blocks 0.. each start/deltas/stop, then message_delta, message_stop."""
    names = [name for name, _ in events]
    assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"]
    open_index: int | None = None
    next_index = 0
    for name, payload in events[1:-2]:
        if name == "content_block_start":
            assert open_index is None and payload["index"] == next_index
            open_index, next_index = next_index, next_index + 1
        elif name == "content_block_delta":
            assert payload["index"] == open_index
        else:
            assert name == "content_block_stop" and payload["index"] == open_index
            open_index = None
    assert open_index is None


def blocks(events: list[Event]) -> list[dict[str, Any]]:
    """Each block's start payload with its deltas folded in (a test-side oracle)."""
    out: list[dict[str, Any]] = []
    for name, payload in events:
        if name == "content_block_start":
            out.append(dict(payload["content_block"], deltas=[]))
        elif name == "content_block_delta":
            out[payload["index"]]["deltas"].append(payload["delta"])
    return out


def test_anthropic_stream_blocks_follow_the_kinds() -> None:
    events = run_anthropic(script(reasoning=REASONING, text=TEXT, tools=TOOLS, finish="tool_calls"))
    got = blocks(events)
    assert [b["type"] for b in got] == ["thinking", "text", "tool_use", "tool_use"]
    thinking, text, first, second = got
    assert [d["thinking"] for d in thinking["deltas"] if d["type"] == "thinking_delta"] == REASONING
    assert thinking["deltas"][-1]["type"] == "signature_delta"
    assert [d["text"] for d in text["deltas"]] == TEXT
    assert (first["id"], first["name"], first["input"]) == ("call_a", "weather", {})
    assert json.loads("".join(d["partial_json"] for d in first["deltas"])) == {"city": "Oslo"}
    assert (second["id"], second["name"]) == ("call_b", "clock")
    delta = events[-2][1]
    assert delta["delta"] == {"stop_reason": "tool_use", "stop_sequence": None}
    assert delta["usage"]["output_tokens"] == USAGE["completion_tokens"]
    assert delta["usage"]["input_tokens"] == USAGE["prompt_tokens"]


def test_anthropic_text_after_tool_opens_a_new_block() -> None:
    chunks = script(text=["a"], tools=[("c", "f", ["{}"])])
    chunks.insert(-2, chunk({"content": "after"}))  # before the finish and usage chunks
    got = blocks(run_anthropic(chunks))
    assert [b["type"] for b in got] == ["text", "tool_use", "text"]


def test_anthropic_late_tool_fragment_is_not_lost() -> None:
    translator = AnthropicStreamTranslator("m")
    events = [e for c in late_fragment_chunks() for e in translator.feed(c)] + translator.finish()
    fragments = [
        p["delta"]["partial_json"]
        for n, p in events
        if n == "content_block_delta" and p["index"] == 0
    ]
    assert json.loads("".join(fragments)) == {"a": 1}


@pytest.mark.parametrize(
    ("finish", "stop_sequence", "reason"),
    [("stop", None, "end_turn"), ("length", None, "max_tokens"), ("stop", "END", "stop_sequence")],
)
def test_anthropic_stop_reasons(finish: str, stop_sequence: str | None, reason: str) -> None:
    events = run_anthropic(script(text=["x"], finish=finish, stop_sequence=stop_sequence))
    assert events[-2][1]["delta"] == {"stop_reason": reason, "stop_sequence": stop_sequence}


def test_anthropic_usage_falls_back_to_counting_deltas() -> None:
    events = run_anthropic(script(reasoning=["r"], text=TEXT, usage=None), input_tokens=17)
    assert events[0][1]["message"]["usage"] == {"input_tokens": 17, "output_tokens": 0}
    assert events[-2][1]["usage"] == {"output_tokens": 1 + len(TEXT)}


def test_anthropic_message_start_has_the_prompt_size_the_engine_sent_first() -> None:
    chunks = script(text=["x"])
    chunks[0] = {**chunks[0], "x_helexa": {"prompt_tokens": USAGE["prompt_tokens"]}}
    events = run_anthropic(chunks)
    started, delta = events[0][1]["message"]["usage"], events[-2][1]["usage"]
    assert started == {"input_tokens": 30, "output_tokens": 0}
    assert started["input_tokens"] == delta["input_tokens"]


def test_anthropic_cached_usage_is_split_out() -> None:
    usage = dict(USAGE, prompt_tokens_details={"cached_tokens": 20})
    message_delta = run_anthropic(script(text=["x"], usage=usage))[-2][1]
    assert message_delta["usage"] == {
        "input_tokens": 10,
        "output_tokens": 12,
        "cache_read_input_tokens": 20,
        "cache_creation_input_tokens": 0,  # the prompt cache fills itself: nothing is "written"
    }


def test_anthropic_truncated_stream_still_closes() -> None:
    events = run_anthropic(script(reasoning=["r"], text=["cut"], finish=None, usage=None))
    assert [n for n, _ in events][-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert events[-2][1]["delta"]["stop_reason"] == "end_turn"


def test_anthropic_empty_stream_and_idempotence() -> None:
    translator = AnthropicStreamTranslator("m", message_id="msg_fixed")
    started = translator.start()
    assert started[0][1]["message"]["id"] == "msg_fixed"
    assert translator.start() == []
    names = [n for n, _ in translator.finish()]
    assert names == ["message_delta", "message_stop"]
    assert translator.finish() == [] and translator.feed(chunk({"content": "late"})) == []


def test_anthropic_error_ends_the_stream() -> None:
    translator = AnthropicStreamTranslator("m")
    translator.feed(chunk({"content": "x"}))
    closed, (name, payload) = translator.error("neuron went away", "overloaded_error")
    assert closed == ("content_block_stop", {"type": "content_block_stop", "index": 0})
    assert name == "error"
    assert TypeAdapter(at.ErrorResponse).validate_python(payload).error.type == "overloaded_error"
    assert translator.finish() == [] and translator.error("again") == []


async def test_anthropic_sdk_reads_the_stream(aiohttp_server: Any) -> None:
    chunks = script(reasoning=REASONING, text=TEXT, tools=TOOLS, finish="tool_calls")
    translator = AnthropicStreamTranslator("claude-ish", message_id="msg_s1")
    events = [e for c in chunks for e in translator.feed(c)] + translator.finish()
    server = await serve_frames(aiohttp_server, "/v1/messages", sse_events([PING, *events]))
    client = anthropic.AsyncAnthropic(base_url=str(server.make_url("")), api_key="k", max_retries=0)
    async with client.messages.stream(
        model="claude-ish", max_tokens=64, messages=[{"role": "user", "content": "hi"}]
    ) as stream:
        streamed = await stream.get_final_message()
    await client.close()
    expected = at.Message.model_validate(openai_to_anthropic(folded(chunks), "claude-ish"))
    assert streamed.model_dump(exclude={"id"}) == expected.model_dump(exclude={"id"})
