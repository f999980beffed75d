"""The one body decoder both servers use: what it refuses with a 400, and what it keeps."""

from __future__ import annotations

import json
from typing import Any

import pytest

from helexa.wire.base import MAX_JSON_DEPTH, parse_json
from tests.support.bodies import wire_error


def nested(depth: int, inner: str = "1") -> bytes:
    """``depth`` arrays and objects, alternating, around ``inner``."""
    text = inner
    for level in range(depth):
        text = f"[{text}]" if level % 2 else f'{{"k": {text}}}'
    return text.encode()


def test_ordinary_bodies_decode_as_json_does() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": 'héllo [{ \\"}]'}]}
    raw = json.dumps(body).encode()
    assert parse_json(raw) == json.loads(raw) == body
    assert parse_json(json.dumps(body, ensure_ascii=False).encode()) == body
    assert parse_json(b"\xef\xbb\xbf{}") == {}  # a UTF-8 byte-order mark
    assert parse_json('{"a": "x"}'.encode("utf-16")) == {"a": "x"}  # JSON may be UTF-16


@pytest.mark.parametrize("raw", [b"", b'{"model": "x", ', b"{'a': 1}", b'{"a": "\xff"}'])
def test_invalid_json_is_a_400(raw: bytes) -> None:
    assert "not valid JSON" in wire_error(parse_json, raw).message


def test_nesting_is_bounded() -> None:
    assert parse_json(nested(MAX_JSON_DEPTH)) == json.loads(nested(MAX_JSON_DEPTH))
    for raw in (nested(MAX_JSON_DEPTH + 1), nested(900), b"[" * 100_000, b"[" * 100_000 + b"]"):
        err = wire_error(parse_json, raw)
        assert err.message == f"request body nests deeper than {MAX_JSON_DEPTH} levels"


def test_brackets_inside_strings_do_not_count_as_nesting() -> None:
    body = {"s": "[" * 1000, "many": [[1]] * 1000}
    assert parse_json(json.dumps(body).encode()) == body


@pytest.mark.parametrize(
    ("raw", "param", "escape"),
    [
        (b'{"messages": [{"content": "hi \\ud800"}]}', "messages.0.content", "\\ud800"),
        (b'{"a": ["x", "\\uDC00 low"]}', "a.1", "\\udc00"),
        (b'{"tools": [{"k\\udbff": 1}]}', "tools.0.k\\udbff", "\\udbff"),
        (b'{"a": "\\ude00\\ud83d"}', "a", "\\ude00"),  # a pair the wrong way round
    ],
)
def test_lone_surrogates_are_refused_naming_the_field(raw: bytes, param: str, escape: str) -> None:
    err = wire_error(parse_json, raw)
    assert err.param == param
    assert err.message == (
        f"{param}: contains a lone surrogate ({escape}); strings must be valid Unicode"
    )


def test_a_lone_surrogate_as_utf8_bytes_is_invalid_text() -> None:
    assert "not valid JSON" in wire_error(parse_json, b'{"a": "\xed\xa0\x80"}').message


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b'{"a": "\\ud83d\\ude00"}', {"a": "\U0001f600"}),  # an emoji as json.dumps writes it
        (b'{"a": "\\\\ud800"}', {"a": "\\ud800"}),  # an escaped backslash: plain text
    ],
)
def test_surrogate_pairs_and_lookalikes_are_accepted(raw: bytes, expected: Any) -> None:
    assert parse_json(raw) == expected
