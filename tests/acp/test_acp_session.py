from __future__ import annotations

from pathlib import Path

from helexa.acp.providers.base import Message, ToolCall
from helexa.acp.session import (
    DROPPED,
    ELIDED,
    SessionRecord,
    SessionStore,
    compact,
    estimate_tokens,
    request_budget,
)


def conversation(turns: int, output: int = 4000) -> list[Message]:
    messages: list[Message] = []
    for n in range(turns):
        messages += [
            Message("user", f"question {n}"),
            Message("assistant", "", tool_calls=[ToolCall(f"c{n}", "read_file", "{}")]),
            Message("tool", "x" * output, tool_call_id=f"c{n}"),
            Message("assistant", f"answer {n}"),
        ]
    return messages


def test_under_budget_is_untouched() -> None:
    messages = conversation(2)
    assert compact(messages, estimate_tokens(messages)) is messages


def test_oldest_tool_outputs_go_first() -> None:
    messages = conversation(3)
    budget = estimate_tokens(messages) - 500  # one elided output (~1000 tokens) is enough
    out = compact(messages, budget)
    assert estimate_tokens(out) <= budget
    assert [m.content for m in out if m.role == "tool"] == [ELIDED, "x" * 4000, "x" * 4000]
    assert len(out) == len(messages) and messages[2].content == "x" * 4000  # input intact


def test_old_turns_are_dropped_when_eliding_is_not_enough() -> None:
    messages = conversation(3, output=100) + [Message("user", "y" * 4000)]
    out = compact(messages, 1100)
    assert out[-1] == messages[-1]  # the newest message is never touched
    assert out[0].role == "user" and out[0].content.startswith(DROPPED)
    assert len(out) < len(messages) and estimate_tokens(out) <= 1100


def test_the_last_turn_survives_even_over_budget() -> None:
    messages = [Message("user", "z" * 40_000)]
    assert compact(messages, 10) == messages


def test_budget_leaves_room_for_the_answer() -> None:
    assert request_budget(32768, None) == 32768 - 8192
    assert request_budget(4096, 512) == 4096 - 512
    assert request_budget(4096, 100_000) == 1024


def test_store_round_trip_and_hostile_ids(tmp_path: Path) -> None:
    store = SessionStore(tmp_path / "sessions")
    record = SessionRecord("sess_1", "/w", "home:m", conversation(1))
    store.save(record)
    assert store.load("sess_1") == record
    assert store.load("sess_2") is None
    assert store.load("../sessions/sess_1") is None
    (tmp_path / "sessions" / "sess_bad.json").write_text("{not json")
    assert store.load("sess_bad") is None
