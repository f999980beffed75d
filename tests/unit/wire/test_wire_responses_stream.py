"""The Responses stream translator: every event validated against the SDK's event union, the
whole stream read end to end by the real SDK client from a loopback server.
"""

from __future__ import annotations

from typing import Any

import openai
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from helexa.wire.responses.envelopes import ResponsesRequest, parse_responses_request
from helexa.wire.responses.stream import ResponsesStreamTranslator
from helexa.wire.responses.translate import openai_to_responses
from helexa.wire.sse import Event, sse_events
from tests.support.streams import (
    CREATED,
    REASONING,
    TEXT,
    TOOLS,
    chunk,
    folded,
    late_fragment_chunks,
    script,
    serve_frames,
)

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


async def test_openai_sdk_reads_the_responses_stream(aiohttp_server: Any) -> None:
    chunks = script(reasoning=REASONING, text=TEXT, tools=TOOLS, finish="tool_calls")
    req = make_request()
    translator = ResponsesStreamTranslator(req, "resp_s1", created_at=CREATED)
    events = [e for c in chunks for e in translator.feed(c)] + translator.finish()
    server = await serve_frames(aiohttp_server, "/v1/responses", sse_events(events))
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
