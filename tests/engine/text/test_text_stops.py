"""Stop strings and partial tags across chunk boundaries: held until decided, never shown
past a match."""

from __future__ import annotations

import pytest

from helexa.engine.text.stops import StopMatcher, partial_suffix


def test_partial_suffix() -> None:
    assert partial_suffix("abc <tool_c", "<tool_call>") == 7
    assert partial_suffix("abc <tool_call>", "<tool_call>") == 0  # a whole tag is not partial
    assert partial_suffix("abc", "<tool_call>") == 0
    assert partial_suffix("<<", "<tool_call>") == 1


def run_stops(stops: list[str], chunks: list[str]) -> tuple[str, str | None]:
    matcher = StopMatcher(stops)
    out = ""
    for chunk in chunks:
        text, matched = matcher.feed(chunk)
        out += text
        if matched is not None:
            return out, matched
    return out + matcher.flush(), None


@pytest.mark.parametrize(
    ("text", "stops", "expected"),
    [
        ("one two three four", ["three"], ("one two ", "three")),
        ("one two three four", ["four", "two t"], ("one ", "two t")),
        ("abababc", ["abc"], ("abab", "abc")),
        ("no stop here, almost: thre", ["three"], ("no stop here, almost: thre", None)),
        ("ends exactly STOP", ["STOP"], ("ends exactly ", "STOP")),
        ("émoji 🌍 stop 🌍!", ["🌍!"], ("émoji 🌍 stop ", "🌍!")),
        ("plain", [], ("plain", None)),
    ],
)
def test_stop_matcher_at_every_split(text: str, stops: list[str], expected: tuple) -> None:
    assert run_stops(stops, [text]) == expected
    assert run_stops(stops, list(text)) == expected
    for i in range(len(text) + 1):
        for j in range(i, len(text) + 1):
            assert run_stops(stops, [text[:i], text[i:j], text[j:]]) == expected, (i, j)


def test_stop_matcher_holds_only_a_possible_start() -> None:
    matcher = StopMatcher(["three", "</end>"])
    assert matcher.feed("one two thr") == ("one two ", None)
    assert matcher.feed("ee") == ("", "three")
    assert matcher.feed("more") == ("", "three")  # done once matched
    other = StopMatcher(["three"])
    assert other.feed("one tw") == ("one tw", None)
    assert other.feed("o th") == ("o ", None)
    assert other.feed("en") == ("then", None)
    assert other.flush() == ""
