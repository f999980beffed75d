"""Each provider's request encoder and stream decoder, plus the shared HTTP plumbing.

Decoder fixtures are written in each API's documented shapes and, where the vendor SDK
models the event, validated against that SDK's own types first, so a fixture cannot drift
into a shape no real server sends. Encoded requests must pass helexa's own gateway parsers.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from anthropic.types import RawMessageStreamEvent
from openai.types.chat import ChatCompletionChunk
from openai.types.responses import ResponseStreamEvent
from pydantic import TypeAdapter

from helexa.acp.config import Endpoint
from helexa.acp.providers import build_provider
from helexa.acp.providers.anthropic_messages import AnthropicMessagesDecoder
from helexa.acp.providers.anthropic_messages import encode as encode_anthropic
from helexa.acp.providers.base import Message, ProviderRequest, ToolCall, ToolSpec, api_root
from helexa.acp.providers.events import (
    Finish,
    ProviderError,
    ProviderEvent,
    ReasoningDelta,
    TextDelta,
    ToolCallArgsDelta,
    ToolCallComplete,
    ToolCallStart,
    Unreachable,
    Usage,
)
from helexa.acp.providers.openai_chat import OpenAIChatDecoder
from helexa.acp.providers.openai_chat import encode as encode_chat
from helexa.acp.providers.openai_responses import OpenAIResponsesDecoder
from helexa.acp.providers.openai_responses import encode as encode_responses
from helexa.acp.session import request_budget
from helexa.wire.anthropic.envelopes import parse_messages_request
from helexa.wire.openai.envelopes import parse_chat_request
from helexa.wire.responses.envelopes import parse_responses_request
from helexa.wire.sse import SSEEvent, sse

TOOL = ToolSpec(
    "read_file",
    "Read a file",
    {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]},
)
CONVERSATION = ProviderRequest(
    model="m",
    system="be brief",
    tools=[TOOL],
    messages=[
        Message("user", "read a.txt and b.txt"),
        Message(
            "assistant",
            "Reading.",
            reasoning="they want files",
            tool_calls=[
                ToolCall("c1", "read_file", '{"path": "a.txt"}'),
                ToolCall("c2", "read_file", '{"path": "b'),  # truncated by max_tokens
            ],
        ),
        Message("tool", "A", tool_call_id="c1"),
        Message("tool", "invalid JSON", tool_call_id="c2", is_error=True),
        Message("user", "thanks"),
        Message("assistant", "You're welcome."),
    ],
)


def run(decoder: Any, events: list[SSEEvent], end: bool = True) -> list[ProviderEvent]:
    out: list[ProviderEvent] = []
    for event in events:
        out += decoder.feed(event)
    return out + (decoder.end() if end else [])


def one_call_answer(call_id: str, first: str, rest: str, usage: Usage) -> list[ProviderEvent]:
    """What each wire's streaming test decodes to, the same answer whatever the wire: a thought,
    a text, one read_file call whose arguments came in two pieces, the usage, the end."""
    return [
        ReasoningDelta("hmm"),
        TextDelta("Hi"),
        ToolCallStart(call_id, "read_file"),
        ToolCallArgsDelta(call_id, first),
        ToolCallArgsDelta(call_id, rest),
        ToolCallComplete(call_id, "read_file", '{"path": "a"}'),
        usage,
        Finish("tool_calls"),
    ]


# -- OpenAI chat ----------------------------------------------------------------------------


def chat_events(*chunks: dict[str, Any]) -> list[SSEEvent]:
    base = {"id": "x", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    for chunk in chunks:
        ChatCompletionChunk.model_validate({**base, **chunk})
    return [SSEEvent(None, json.dumps({**base, **c})) for c in chunks]


def delta(finish: str | None = None, **fields: Any) -> dict[str, Any]:
    return {"choices": [{"index": 0, "delta": fields, "finish_reason": finish}]}


def test_chat_encoder_shapes() -> None:
    body = encode_chat(CONVERSATION)
    parse_chat_request(body)  # helexa's gateway accepts it
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "read_file",
                "description": "Read a file",
                "parameters": TOOL.parameters,
            },
        }
    ]
    messages = body["messages"]
    assert [m["role"] for m in messages] == [
        "system", "user", "assistant", "tool", "tool", "user", "assistant",
    ]  # fmt: skip
    assert messages[0]["content"] == "be brief"
    assert messages[2]["content"] == "Reading." and "reasoning_content" not in messages[2]
    assert messages[2]["tool_calls"][0] == {
        "id": "c1",
        "type": "function",
        "function": {"name": "read_file", "arguments": '{"path": "a.txt"}'},
    }
    assert messages[3] == {"role": "tool", "tool_call_id": "c1", "content": "A"}


def test_chat_decoder_streams_text_reasoning_tools_and_usage() -> None:
    events = chat_events(
        delta(role="assistant", content=""),
        delta(reasoning_content="hmm"),
        delta(content="Hi"),
        delta(tool_calls=[{"index": 0, "id": "c1", "type": "function", "function": {"name": "read_file", "arguments": ""}}]),
        delta(tool_calls=[{"index": 0, "function": {"arguments": '{"pa'}}]),
        delta(tool_calls=[{"index": 0, "function": {"arguments": 'th": "a"}'}}]),
        delta(finish="tool_calls"),
        {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12,
                                  "prompt_tokens_details": {"cached_tokens": 3}}},
    ) + [SSEEvent(None, "[DONE]")]  # fmt: skip
    assert run(OpenAIChatDecoder(), events) == one_call_answer(
        "c1", '{"pa', 'th": "a"}', Usage(7, 5, 3)
    )


def test_chat_decoder_waits_for_a_tool_name_and_keeps_early_arguments() -> None:
    events = chat_events(
        delta(tool_calls=[{"index": 0, "id": "c9", "function": {"arguments": "{"}}]),
        delta(tool_calls=[{"index": 0, "function": {"name": "list_files", "arguments": "}"}}]),
        delta(finish="length"),
    )
    assert run(OpenAIChatDecoder(), events) == [
        ToolCallStart("c9", "list_files"),
        ToolCallArgsDelta("c9", "{"),
        ToolCallArgsDelta("c9", "}"),
        ToolCallComplete("c9", "list_files", "{}"),
        Finish("length"),
    ]


def test_chat_decoder_skips_malformed_chunks(caplog: pytest.LogCaptureFixture) -> None:
    events = [
        SSEEvent(None, '{"choices": [{"index": 0, "delta": {"content": "a"'),  # cut short
        *chat_events(delta(content="b")),
        SSEEvent(None, "[1, 2]"),
        *chat_events(delta(finish="stop")),
    ]
    with caplog.at_level(logging.WARNING, "helexa.acp.providers"):
        out = run(OpenAIChatDecoder(), events)
    assert out == [TextDelta("b"), Finish("stop")]
    assert len([r for r in caplog.records if "skipping" in r.getMessage()]) == 2


def test_chat_decoder_reports_truncation_and_errors() -> None:
    with pytest.raises(ProviderError, match="before the answer was finished"):
        run(OpenAIChatDecoder(), chat_events(delta(content="partial")))
    error = SSEEvent(
        None, json.dumps({"error": {"message": "model exploded", "type": "server_error"}})
    )
    with pytest.raises(ProviderError, match="model exploded"):
        run(OpenAIChatDecoder(), [error])


# -- OpenAI Responses ---------------------------------------------------------------------------

RESPONSE = {
    "id": "resp_1",
    "object": "response",
    "created_at": 1,
    "model": "m",
    "output": [],
    "parallel_tool_calls": True,
    "tool_choice": "auto",
    "tools": [],
}
FUNCTION_ITEM = {
    "type": "function_call",
    "id": "fc_1",
    "call_id": "call_1",
    "name": "read_file",
    "arguments": "",
    "status": "in_progress",
}


def responses_events(*payloads: dict[str, Any]) -> list[SSEEvent]:
    adapter = TypeAdapter(ResponseStreamEvent)
    out = []
    for n, payload in enumerate(payloads):
        payload = {**payload, "sequence_number": n}
        adapter.validate_python(payload)
        out.append(SSEEvent(payload["type"], json.dumps(payload)))
    return out


def text_delta(text: str) -> dict[str, Any]:
    return {
        "type": "response.output_text.delta",
        "item_id": "msg_1",
        "output_index": 0,
        "content_index": 0,
        "delta": text,
        "logprobs": [],
    }


def test_responses_encoder_shapes() -> None:
    body = encode_responses(CONVERSATION)
    parse_responses_request(body)
    assert body["instructions"] == "be brief" and body["store"] is False
    assert body["tools"] == [
        {
            "type": "function",
            "name": "read_file",
            "description": "Read a file",
            "parameters": TOOL.parameters,
            "strict": False,
        }
    ]
    kinds = [(i["type"], i.get("role")) for i in body["input"]]
    assert kinds == [
        ("message", "user"), ("message", "assistant"), ("function_call", None),
        ("function_call", None), ("function_call_output", None), ("function_call_output", None),
        ("message", "user"), ("message", "assistant"),
    ]  # fmt: skip
    assert body["input"][2] == {
        "type": "function_call",
        "call_id": "c1",
        "name": "read_file",
        "arguments": '{"path": "a.txt"}',
    }
    assert body["input"][4] == {"type": "function_call_output", "call_id": "c1", "output": "A"}


def test_responses_decoder_streams_items() -> None:
    events = responses_events(
        {"type": "response.created", "response": {**RESPONSE, "status": "in_progress"}},
        {"type": "response.reasoning_summary_text.delta", "item_id": "rs_1", "output_index": 0,
         "summary_index": 0, "delta": "hmm"},
        text_delta("Hi"),
        {"type": "response.output_item.added", "output_index": 1, "item": FUNCTION_ITEM},
        {"type": "response.function_call_arguments.delta", "item_id": "fc_1", "output_index": 1,
         "delta": '{"path":'},
        {"type": "response.function_call_arguments.delta", "item_id": "fc_1", "output_index": 1,
         "delta": ' "a"}'},
        {"type": "response.function_call_arguments.done", "item_id": "fc_1", "output_index": 1,
         "name": "read_file", "arguments": '{"path": "a"}'},
        {"type": "response.output_item.done", "output_index": 1,
         "item": {**FUNCTION_ITEM, "arguments": '{"path": "a"}', "status": "completed"}},
        {"type": "response.completed", "response": {**RESPONSE, "status": "completed",
         "usage": {"input_tokens": 9, "output_tokens": 4, "total_tokens": 13,
                   "input_tokens_details": {"cached_tokens": 2, "cache_write_tokens": 0},
                   "output_tokens_details": {"reasoning_tokens": 0}}}},
    )  # fmt: skip
    assert run(OpenAIResponsesDecoder(), events) == one_call_answer(
        "call_1", '{"path":', ' "a"}', Usage(9, 4, 2)
    )


def test_responses_decoder_incomplete_failed_and_malformed() -> None:
    incomplete = responses_events(
        text_delta("a"),
        {"type": "response.incomplete", "response": {**RESPONSE, "status": "incomplete",
         "incomplete_details": {"reason": "max_output_tokens"}}},
    )  # fmt: skip
    garbage = SSEEvent("response.output_text.delta", "{oops")
    assert run(OpenAIResponsesDecoder(), [garbage, *incomplete]) == [
        TextDelta("a"),
        Finish("length"),
    ]
    failed = responses_events(
        {"type": "response.failed", "response": {**RESPONSE, "status": "failed",
         "error": {"code": "server_error", "message": "out of memory"}}},
    )  # fmt: skip
    with pytest.raises(ProviderError, match="out of memory"):
        run(OpenAIResponsesDecoder(), failed)
    with pytest.raises(ProviderError, match="before response.completed"):
        run(OpenAIResponsesDecoder(), responses_events(text_delta("a")))


# -- Anthropic Messages ---------------------------------------------------------------------------


def anthropic_events(*payloads: dict[str, Any]) -> list[SSEEvent]:
    adapter = TypeAdapter(RawMessageStreamEvent)
    for payload in payloads:
        if payload["type"] not in ("ping", "error"):  # not in the SDK's event union
            adapter.validate_python(payload)
    return [SSEEvent(p["type"], json.dumps(p)) for p in payloads]


MESSAGE_START = {
    "type": "message_start",
    "message": {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "m",
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {"input_tokens": 20, "output_tokens": 1, "cache_read_input_tokens": 5},
    },
}


def block_delta(index: int, **fields: Any) -> dict[str, Any]:
    return {"type": "content_block_delta", "index": index, "delta": fields}


def test_anthropic_encoder_shapes() -> None:
    body = encode_anthropic(CONVERSATION)
    parse_messages_request(body)
    assert body["system"] == "be brief" and body["max_tokens"] == 8192
    assert body["tools"] == [
        {"name": "read_file", "description": "Read a file", "input_schema": TOOL.parameters}
    ]
    user, assistant, results, reply = body["messages"]
    assert user == {"role": "user", "content": [{"type": "text", "text": "read a.txt and b.txt"}]}
    assert assistant["content"] == [
        {"type": "text", "text": "Reading."},
        {"type": "tool_use", "id": "c1", "name": "read_file", "input": {"path": "a.txt"}},
        {
            "type": "tool_use",
            "id": "c2",
            "name": "read_file",
            "input": {"raw_arguments": '{"path": "b'},
        },
    ]
    # Both results and the next user text share one user message, results first.
    assert results == {
        "role": "user",
        "content": [
            {"type": "tool_result", "tool_use_id": "c1", "content": "A"},
            {
                "type": "tool_result",
                "tool_use_id": "c2",
                "content": "invalid JSON",
                "is_error": True,
            },
            {"type": "text", "text": "thanks"},
        ],
    }
    assert reply == {"role": "assistant", "content": [{"type": "text", "text": "You're welcome."}]}


@pytest.mark.parametrize(
    ("context_window", "configured", "expected"),
    [(32768, None, 8192), (200_000, None, 8192), (4096, None, 1024), (4096, 300, 300)],
)
async def test_anthropic_max_tokens_fits_the_endpoint(
    context_window: int, configured: int | None, expected: int
) -> None:
    """The API requires max_tokens; a fixed 8192 overflowed a 4096-token model (HTTP 400
    "maximum context length is 4096 tokens ... requested 9787"), so it is the endpoint's
    answer reserve: the very room compaction leaves free."""
    ep = Endpoint("t", "http://h", "anthropic-messages", "m", None, context_window, configured)
    request = ProviderRequest("m", [Message("user", "hi")], max_tokens=ep.max_tokens)
    async with aiohttp.ClientSession() as http:
        body = build_provider(ep, http).encode(request)
    parse_messages_request(body)
    assert body["max_tokens"] == expected
    assert request_budget(context_window, configured) + expected <= context_window
    assert encode_anthropic(request)["max_tokens"] == (configured or 8192)  # no endpoint


def test_anthropic_decoder_streams_blocks() -> None:
    events = anthropic_events(
        MESSAGE_START,
        {"type": "ping"},
        {"type": "content_block_start", "index": 0,
         "content_block": {"type": "thinking", "thinking": "", "signature": ""}},
        block_delta(0, type="thinking_delta", thinking="hmm"),
        block_delta(0, type="signature_delta", signature="sig"),
        {"type": "content_block_stop", "index": 0},
        {"type": "content_block_start", "index": 1, "content_block": {"type": "text", "text": ""}},
        block_delta(1, type="text_delta", text="Hi"),
        {"type": "content_block_stop", "index": 1},
        {"type": "content_block_start", "index": 2,
         "content_block": {"type": "tool_use", "id": "toolu_1", "name": "read_file", "input": {}}},
        block_delta(2, type="input_json_delta", partial_json=""),
        block_delta(2, type="input_json_delta", partial_json='{"path": '),
        block_delta(2, type="input_json_delta", partial_json='"a"}'),
        {"type": "content_block_stop", "index": 2},
        {"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": None},
         "usage": {"output_tokens": 15}},
        {"type": "message_stop"},
    )  # fmt: skip
    assert run(AnthropicMessagesDecoder(), events) == one_call_answer(
        "toolu_1", '{"path": ', '"a"}', Usage(25, 15, 5)
    )


def test_anthropic_decoder_stop_reasons_errors_and_malformed() -> None:
    events = anthropic_events(
        MESSAGE_START,
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        block_delta(0, type="text_delta", text="a"),
        {"type": "message_delta", "delta": {"stop_reason": "max_tokens", "stop_sequence": None},
         "usage": {"output_tokens": 1}},
    )  # fmt: skip
    # No message_stop: the stop reason already arrived, so end() finishes leniently.
    garbage = SSEEvent("content_block_delta", "not json")
    assert run(AnthropicMessagesDecoder(), [garbage, *events]) == [
        TextDelta("a"),
        Usage(25, 1, 5),
        Finish("length"),
    ]
    error = anthropic_events(
        {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    )
    with pytest.raises(ProviderError, match="overloaded_error: Overloaded"):
        run(AnthropicMessagesDecoder(), error)
    with pytest.raises(ProviderError, match="before message_stop"):
        run(AnthropicMessagesDecoder(), anthropic_events(MESSAGE_START))


# -- HTTP -----------------------------------------------------------------------------------------


def endpoint(url: str, wire_api: str = "openai-chat", api_key: str | None = None) -> Endpoint:
    return Endpoint("test", url, wire_api, "m", api_key, 32768, None)  # type: ignore[arg-type]


def test_api_root_accepts_either_form() -> None:
    assert api_root("http://h:1") == api_root("http://h:1/v1/") == "http://h:1/v1"


async def collect(provider: Any, cancel: asyncio.Event | None = None) -> list[ProviderEvent]:
    request = ProviderRequest("m", [Message("user", "hi")])
    return [e async for e in provider.stream(request, cancel or asyncio.Event())]


async def test_stream_survives_arbitrary_byte_splits(aiohttp_server: Any) -> None:
    body = (
        b"".join(
            sse({"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]})
            for text in ["h\u00e9", "llo \U0001f600"]
        )
        + sse({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        + b"data: [DONE]\n\n"
    )
    seen: list[dict[str, str]] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        seen.append(dict(request.headers))
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(0, len(body), 5):  # splits UTF-8 characters and frame boundaries
            await resp.write(body[i : i + 5])
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    server = await aiohttp_server(app)
    async with aiohttp.ClientSession() as http:
        provider = build_provider(endpoint(str(server.make_url("")), api_key="k"), http)
        events = await collect(provider)
    assert events == [TextDelta("h\u00e9"), TextDelta("llo \U0001f600"), Finish("stop")]
    assert seen[0]["Authorization"] == "Bearer k"


async def test_http_errors_become_provider_errors(aiohttp_server: Any) -> None:
    async def handler(request: web.Request) -> web.Response:
        error = {"type": "error", "error": {"type": "not_found_error", "message": "no model m"}}
        return web.json_response(error, status=404)

    app = web.Application()
    app.router.add_post("/v1/messages", handler)
    server = await aiohttp_server(app)
    async with aiohttp.ClientSession() as http:
        provider = build_provider(endpoint(str(server.make_url("")), "anthropic-messages"), http)
        with pytest.raises(ProviderError, match="HTTP 404: not_found_error: no model m"):
            await collect(provider)
        await server.close()
        with pytest.raises(ProviderError, match="cannot reach"):
            await collect(provider)


async def test_cancel_before_headers_stops_without_error(aiohttp_server: Any) -> None:
    arrived = asyncio.Event()

    async def handler(request: web.Request) -> web.Response:
        arrived.set()
        await asyncio.Event().wait()  # never answers
        raise AssertionError

    app = web.Application()
    app.router.add_post("/v1/responses", handler)
    server = await aiohttp_server(app)
    cancel = asyncio.Event()
    async with aiohttp.ClientSession() as http:
        provider = build_provider(endpoint(str(server.make_url("")), "openai-responses"), http)
        task = asyncio.ensure_future(collect(provider, cancel))
        await asyncio.wait_for(arrived.wait(), 10)
        cancel.set()
        assert await asyncio.wait_for(task, 10) == []


async def test_context_length_from_the_listing_then_the_model_route(aiohttp_server: Any) -> None:
    """The listing's context_length for a listed model; a name it does not list (an alias)
    through GET /v1/models/{model}; unknown, null or nonsense is None; no server at all
    is Unreachable, so the agent asks again on the next prompt."""
    listing = [
        {"id": "big", "context_length": 131072},
        {"id": "cold", "context_length": None},
        {"id": "odd", "context_length": True},
        {"id": "old"},
    ]
    seen: list[tuple[str, dict[str, str]]] = []

    async def models(request: web.Request) -> web.Response:
        seen.append((request.path, dict(request.headers)))
        return web.json_response({"object": "list", "data": listing})

    async def model(request: web.Request) -> web.Response:
        seen.append((request.path, dict(request.headers)))
        if request.match_info["model"] != "org/small:Q4":
            return web.json_response({"error": {"message": "no such model"}}, status=404)
        return web.json_response({"id": "small", "context_length": 4096})

    app = web.Application()
    app.router.add_get("/v1/models", models)
    app.router.add_get("/v1/models/{model:.+}", model)
    server = await aiohttp_server(app)
    url = str(server.make_url(""))
    async with aiohttp.ClientSession() as http:
        chat = build_provider(endpoint(url, api_key="k"), http)
        assert await chat.context_length("big") == 131072
        for unknown in ("cold", "odd", "old"):
            assert await chat.context_length(unknown) is None
        assert seen[-1][0] == "/v1/models"  # listed, so not asked for by name
        assert await chat.context_length("org/small:Q4") == 4096
        assert await chat.context_length("nowhere") is None
        assert [path for path, _ in seen[-4:]] == [
            "/v1/models", "/v1/models/org/small:Q4", "/v1/models", "/v1/models/nowhere",
        ]  # fmt: skip
        assert seen[0][1]["Authorization"] == "Bearer k"
        claude = build_provider(endpoint(url, "anthropic-messages", api_key="k"), http)
        assert await claude.context_length("big") == 131072
        assert seen[-1][1]["x-api-key"] == "k" and "anthropic-version" not in seen[-1][1]
        await server.close()
        with pytest.raises(Unreachable, match="cannot list models"):
            await chat.context_length("big")


def test_a_learned_window_sizes_only_an_unconfigured_endpoint() -> None:
    learned = Endpoint("t", "http://h", "anthropic-messages", "m", None, None, None)
    assert (learned.window, learned.answer_reserve) == (32768, 8192)
    assert learned.sized(None) is learned
    assert (learned.sized(4096).window, learned.sized(4096).answer_reserve) == (4096, 1024)
    configured = Endpoint("t", "http://h", "anthropic-messages", "m", None, 8192, None)
    assert configured.sized(4096) is configured and configured.answer_reserve == 2048
