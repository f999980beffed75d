"""The OpenAI chunk streams a scripted engine sends, a loopback server that plays framed
bytes back (shared by the wire stream tests), and the readers a test client decodes a
gateway's SSE answer with.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import aiohttp
from aiohttp import web
from openai.types.chat import ChatCompletionChunk
from pydantic import TypeAdapter

from helexa.wire.openai.translate import ChatAccumulator
from helexa.wire.sse import SSEDecoder, SSEEvent

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


def late_fragment_chunks() -> list[dict[str, Any]]:
    """Call 0 gets an argument fragment after call 1 started (no engine does this today)."""
    chunks = script(tools=[("c0", "f", ['{"a":']), ("c1", "g", ["{}"])], finish="tool_calls")
    chunks.insert(-2, chunk({"tool_calls": [{"index": 0, "function": {"arguments": " 1}"}}]}))
    return chunks


async def serve_frames(aiohttp_server: Any, path: str, frames: bytes) -> Any:
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


async def read_events(response: aiohttp.ClientResponse, decoder: SSEDecoder) -> list[SSEEvent]:
    """The next events to arrive (at least one), as the client sees them."""
    events: list[SSEEvent] = []
    while not events:
        data = await response.content.readany()
        assert data, "stream ended"
        events = decoder.feed(data)
    return events


async def read_all(response: aiohttp.ClientResponse, decoder: SSEDecoder) -> list[SSEEvent]:
    """Every event left, to the end of the body (a broken chunked body raises here)."""
    events: list[SSEEvent] = []
    async for data in response.content.iter_any():
        events += decoder.feed(data)
    return events + decoder.end()
