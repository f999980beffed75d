"""The one rule for whether a chunk carries output, as metrics, the TUI and the translators
read it."""

from __future__ import annotations

from typing import Any

import pytest

from helexa.wire.openai.stream import (
    OpenAIStream,
    StreamState,
    carries_output,
    choice_carries_output,
)
from tests.support.streams import USAGE, chunk


@pytest.mark.parametrize(
    ("choice", "carries"),
    [
        ({"index": 0, "delta": {"content": "hi"}}, True),
        ({"index": 0, "delta": {"reasoning_content": "hm"}}, True),
        ({"index": 0, "delta": {"tool_calls": [{"index": 0}]}}, True),
        ({"index": 0, "delta": {"role": "assistant", "content": ""}}, False),
        ({"index": 0, "delta": {}}, False),
        ({"index": 0, "text": "x"}, True),  # legacy completions: no delta
        ({"index": 0, "text": ""}, False),
    ],
)
def test_choice_carries_output(choice: dict[str, Any], carries: bool) -> None:
    assert choice_carries_output(choice) is carries
    assert carries_output({"choices": [choice]}) is carries


def test_usage_and_empty_chunks_carry_nothing() -> None:
    assert not carries_output(chunk(usage=USAGE))
    assert not carries_output({"choices": None})
    assert carries_output({"choices": [{"delta": {}}, {"index": 1, "delta": {"content": "x"}}]})


def test_translators_count_chat_deltas_of_choice_zero_only() -> None:
    state = StreamState()
    state.absorb(chunk({"content": "a"}))
    state.absorb(chunk({"content": "b"}, index=1))
    state.absorb({"choices": [{"index": 0, "text": "legacy"}]})
    assert state.deltas == 1


def test_openai_clients_never_see_helexas_own_field() -> None:
    first = {**chunk({"role": "assistant", "content": ""}), "x_helexa": {"prompt_tokens": 9}}
    for include_usage in (False, True):
        framed = OpenAIStream("m", include_usage).feed(first)
        assert b"x_helexa" not in framed and b'"role":"assistant"' in framed
