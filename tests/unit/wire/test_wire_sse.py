"""SSE framing and decoding: any split of the bytes decodes to the same events."""

from __future__ import annotations

import json

import pytest

from helexa.wire.anthropic.stream import PING, error_event
from helexa.wire.sse import SSE_DONE, SSEDecoder, SSEEvent, sse, sse_events
from tests.support.streams import script


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
