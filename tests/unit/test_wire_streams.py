"""SSE framing, stream folding and the per-stream translators.

Every emitted event is validated against the SDKs' own event unions, and each dialect's
stream is also read end to end by the real SDK client from a loopback aiohttp server.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import anthropic
import anthropic.types as at
import openai
import pytest
from aiohttp import web
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from helexa.wire.anthropic.stream import PING, AnthropicStreamTranslator, error_event
from helexa.wire.anthropic.translate import openai_to_anthropic
from helexa.wire.openai.translate import ChatAccumulator, accumulate_completion
from helexa.wire.responses.envelopes import ResponsesRequest, parse_responses_request
from helexa.wire.responses.stream import ResponsesStreamTranslator
from helexa.wire.responses.translate import openai_to_responses
from helexa.wire.sse import (
    SSE_DONE,
    Event,
    SSEDecoder,
    SSEEvent,
    sse,
    sse_events,
)

CREATED = 1_700_000_000
USAGE = {"prompt_tokens": 30, "completion_tokens": 12, "total_tokens": 42}
_CHUNK = TypeAdapter(ChatCompletionChunk)


def chunk(
    delta: dict[str, Any] | None = None,
    *,
    finish: str | None = None,
    stop_sequence: str | None = None,
    usage: dict[str, Any] | None = None,
    index: int = 0,
) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": index, "delta": delta or {}, "finish_reason": finish}
    if stop_sequence is not None:
        choice["stop_sequence"] = stop_sequence
    out: dict[str, Any] = {
        "id": "chatcmpl-s1",
        "object": "chat.completion.chunk",
        "created": CREATED,
        "model": "qwen3",
        "choices": [] if usage is not None and delta is None else [choice],
    }
    if usage is not None:
        out["usage"] = usage
    _CHUNK.validate_python(out)  # fixtures are real OpenAI chunks
    return out


def script(
    *,
    reasoning: Iterable[str] = (),
    text: Iterable[str] = (),
    tools: Iterable[tuple[str, str, list[str]]] = (),
    finish: str | None = "stop",
    stop_sequence: str | None = None,
    usage: dict[str, Any] | None = USAGE,
) -> list[dict[str, Any]]:
    """The chunks an engine streams: role, reasoning, text, tool calls, finish, usage."""
    chunks = [chunk({"role": "assistant", "content": ""})]
    chunks += [chunk({"reasoning_content": piece}) for piece in reasoning]
    chunks += [chunk({"content": piece}) for piece in text]
    for n, (call_id, name, pieces) in enumerate(tools):
        head = {
            "index": n,
            "id": call_id,
            "type": "function",
            "function": {"name": name, "arguments": ""},
        }
        chunks.append(chunk({"tool_calls": [head]}))
        chunks += [
            chunk({"tool_calls": [{"index": n, "function": {"arguments": p}}]}) for p in pieces
        ]
    if finish is not None:
        chunks.append(chunk(finish=finish, stop_sequence=stop_sequence))
    if usage is not None:
        chunks.append(chunk(usage=usage))
    return chunks


def folded(chunks: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """The completion the gateway answers with for a whole stream of chunks."""
    acc = ChatAccumulator()
    for c in chunks:
        acc.add(c)
    return acc.result()


REASONING = ["Let me ", "think."]
TEXT = ["Hello", ", wörld", "!"]
TOOLS = [("call_a", "weather", ['{"city":', ' "Oslo"}']), ("call_b", "clock", ["{}"])]


# -- SSE framing ---------------------------------------------------------------------------


def decode_all(data: bytes, step: int) -> list[SSEEvent]:
    decoder = SSEDecoder()
    events: list[SSEEvent] = []
    for i in range(0, len(data), step):
        events += decoder.feed(data[i : i + step])
    return events + decoder.end()


SSE_WIRE = (
    b": keep-alive comment\n"
    b'event: message_start\ndata: {"a":1}\n\n'
    b"data: line one\r\ndata: line two\r\n\r\n"
    b"id: 7\rdata:no-space \xc3\xa9\xe2\x82\xac\r\r"
    b"event: ignored-without-data\n\n"
    b"data: [DONE]\n\n"
)
SSE_EXPECTED = [
    SSEEvent("message_start", '{"a":1}'),
    SSEEvent(None, "line one\nline two"),
    SSEEvent(None, "no-space é€", "7"),
    SSEEvent(None, "[DONE]", "7"),
]


@pytest.mark.parametrize("step", [1, 2, 3, 5, 7, len(SSE_WIRE)])
def test_decoder_handles_any_split(step: int) -> None:
    assert decode_all(SSE_WIRE, step) == SSE_EXPECTED


def test_decoder_every_two_way_split() -> None:
    for cut in range(len(SSE_WIRE) + 1):
        decoder = SSEDecoder()
        events = decoder.feed(SSE_WIRE[:cut]) + decoder.feed(SSE_WIRE[cut:])
        assert events == SSE_EXPECTED, cut


def test_decoder_end_delivers_an_unterminated_last_event() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b'data: {"x": 1}\n\ndata: {"y": 2}') == [SSEEvent(None, '{"x": 1}')]
    assert [e.json() for e in decoder.end()] == [{"y": 2}]
    assert decoder.end() == []


def test_sse_frames_round_trip() -> None:
    payload = {"type": "x", "text": "multi\nline ünïcode"}
    frame = sse(payload, "x")
    assert frame.startswith(b"event: x\ndata: {") and frame.endswith(b"\n\n")
    assert b" " not in frame.split(b"data: ", 1)[1].split(b'"text"')[0]  # compact JSON
    assert decode_all(frame, 1) == [
        SSEEvent("x", json.dumps(payload, separators=(",", ":"), ensure_ascii=False))
    ]
    assert decode_all(sse("a\nb"), 1) == [SSEEvent(None, "a\nb")]
    assert decode_all(SSE_DONE, 1) == [SSEEvent(None, "[DONE]")]
    first = script(text=["hi"])[1]
    assert [e.json() for e in decode_all(sse(first), 4)] == [first]
    framed = sse_events([PING, error_event("boom")])
    assert [(e.event, e.json()["type"]) for e in decode_all(framed, 3)] == [
        ("ping", "ping"),
        ("error", "error"),
    ]


# -- folding chunks ------------------------------------------------------------------------


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


# -- Anthropic translator ------------------------------------------------------------------

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


def late_fragment_chunks() -> list[dict[str, Any]]:
    """Call 0 gets an argument fragment after call 1 started (no engine does this today)."""
    chunks = script(tools=[("c0", "f", ['{"a":']), ("c1", "g", ["{}"])], finish="tool_calls")
    chunks.insert(-2, chunk({"tool_calls": [{"index": 0, "function": {"arguments": " 1}"}}]}))
    return chunks


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


def test_anthropic_cached_usage_is_split_out() -> None:
    usage = dict(USAGE, prompt_tokens_details={"cached_tokens": 20})
    message_delta = run_anthropic(script(text=["x"], usage=usage))[-2][1]
    assert message_delta["usage"] == {
        "input_tokens": 10,
        "output_tokens": 12,
        "cache_read_input_tokens": 20,
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


# -- Responses translator ------------------------------------------------------------------

_RESPONSES_EVENT = TypeAdapter(ResponseStreamEvent)


def make_request(**fields: Any) -> ResponsesRequest:
    return parse_responses_request({"model": "m", "input": "hi", **fields})


def run_responses(
    chunks: list[dict[str, Any]], req: ResponsesRequest | None = None, **kw: Any
) -> list[Event]:
    translator = ResponsesStreamTranslator(
        req or make_request(), "resp_s1", created_at=CREATED, **kw
    )
    events = [e for c in chunks for e in translator.feed(c)] + translator.finish()
    assert translator.finish() == []
    for name, payload in events:
        assert name == payload["type"]
        _RESPONSES_EVENT.validate_python(payload)
    assert [p["sequence_number"] for _, p in events] == list(range(len(events)))
    return events


def test_responses_stream_items_and_final_object() -> None:
    req = make_request(tools=[{"type": "function", "name": "weather"}])
    chunks = script(reasoning=REASONING, text=TEXT, tools=TOOLS, finish="tool_calls")
    events = run_responses(chunks, req)
    names = [n for n, _ in events]
    assert names[:2] == ["response.created", "response.in_progress"]
    assert names[-1] == "response.completed"
    added = [p["item"]["type"] for n, p in events if n == "response.output_item.added"]
    assert added == ["reasoning", "message", "function_call", "function_call"]
    assert [p["delta"] for n, p in events if n == "response.reasoning_text.delta"] == REASONING
    assert [p["delta"] for n, p in events if n == "response.output_text.delta"] == TEXT
    args_done = [p["arguments"] for n, p in events if n == "response.function_call_arguments.done"]
    assert args_done == ["".join(pieces) for _, _, pieces in TOOLS]
    final = Response.model_validate(events[-1][1]["response"])
    assert final.output_text == "".join(TEXT)
    done_items = [p["item"] for n, p in events if n == "response.output_item.done"]
    assert events[-1][1]["response"]["output"] == done_items
    # Streaming and non-streaming answers are the same object.
    assert events[-1][1]["response"] == openai_to_responses(
        folded(chunks), req, response_id="resp_s1"
    )


def test_responses_length_finish_is_incomplete() -> None:
    events = run_responses(script(text=["par"], finish="length"))
    name, payload = events[-1]
    assert name == "response.incomplete"
    response = Response.model_validate(payload["response"])
    assert response.status == "incomplete"
    assert (
        response.incomplete_details is not None
        and response.incomplete_details.reason == "max_output_tokens"
    )
    assert response.output[0].status == "incomplete"


def test_responses_truncated_stream_closes_open_item_and_counts_usage() -> None:
    events = run_responses(script(text=TEXT, finish=None, usage=None), input_tokens=9)
    names = [n for n, _ in events]
    assert names[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    usage = events[-1][1]["response"]["usage"]
    assert (usage["input_tokens"], usage["output_tokens"]) == (9, len(TEXT))


def test_responses_late_tool_fragment_reaches_the_final_object() -> None:
    chunks = late_fragment_chunks()
    events = run_responses(chunks)
    calls = [i for i in events[-1][1]["response"]["output"] if i["type"] == "function_call"]
    assert [c["arguments"] for c in calls] == ['{"a": 1}', "{}"]


def test_responses_failure_events() -> None:
    translator = ResponsesStreamTranslator("m")
    translator.feed(chunk({"content": "x"}))
    events = translator.fail("neuron went away")
    assert [n for n, _ in events] == ["error", "response.failed"]
    for _, payload in events:
        _RESPONSES_EVENT.validate_python(payload)
    assert events[1][1]["response"]["error"]["message"] == "neuron went away"
    assert translator.finish() == [] and translator.fail("again") == []


# -- the real SDK clients read our streams -------------------------------------------------


async def serve(aiohttp_server: Any, path: str, frames: bytes) -> Any:
    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for i in range(0, len(frames), 7):  # awkward writes: frames split mid-line
            await response.write(frames[i : i + 7])
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post(path, handler)
    return await aiohttp_server(app, host="127.0.0.1")


async def test_anthropic_sdk_reads_the_stream(aiohttp_server: Any) -> None:
    chunks = script(reasoning=REASONING, text=TEXT, tools=TOOLS, finish="tool_calls")
    translator = AnthropicStreamTranslator("claude-ish", message_id="msg_s1")
    events = [e for c in chunks for e in translator.feed(c)] + translator.finish()
    server = await serve(aiohttp_server, "/v1/messages", sse_events([PING, *events]))
    client = anthropic.AsyncAnthropic(base_url=str(server.make_url("")), api_key="k", max_retries=0)
    async with client.messages.stream(
        model="claude-ish", max_tokens=64, messages=[{"role": "user", "content": "hi"}]
    ) as stream:
        streamed = await stream.get_final_message()
    await client.close()
    expected = at.Message.model_validate(openai_to_anthropic(folded(chunks), "claude-ish"))
    assert streamed.model_dump(exclude={"id"}) == expected.model_dump(exclude={"id"})


async def test_openai_sdk_reads_the_responses_stream(aiohttp_server: Any) -> None:
    chunks = script(reasoning=REASONING, text=TEXT, tools=TOOLS, finish="tool_calls")
    req = make_request()
    translator = ResponsesStreamTranslator(req, "resp_s1", created_at=CREATED)
    events = [e for c in chunks for e in translator.feed(c)] + translator.finish()
    server = await serve(aiohttp_server, "/v1/responses", sse_events(events))
    client = openai.AsyncOpenAI(base_url=str(server.make_url("/v1")), api_key="k", max_retries=0)
    async with client.responses.stream(model="m", input="hi") as stream:
        seen = [event.type async for event in stream]
        final = await stream.get_final_response()
    await client.close()
    assert seen == [name for name, _ in events]
    assert final.output_text == "".join(TEXT)
    calls = [i for i in final.output if i.type == "function_call"]
    assert [(c.call_id, c.name, c.arguments) for c in calls] == [
        (i, n, "".join(p)) for i, n, p in TOOLS
    ]
