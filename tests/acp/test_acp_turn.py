"""The prompt turn: a cancel that reaches the upstream and leaves every call with a result,
and the context window a turn learns, sizes its requests by and asks for again. End to
end through ``helexa acp`` like the agent tests, and :func:`learn_window` on its own."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from acp import text_block
from acp.schema import AgentMessageChunk

from helexa.acp import turn as turn_module
from helexa.acp.config import Endpoint, Selection
from helexa.acp.providers.events import ProviderError, Unreachable
from helexa.acp.session import ELIDED, LiveSession, SessionRecord, request_budget
from helexa.acp.turn import learn_window
from tests.acp.harness import (
    WAIT_S,
    Call,
    Editor,
    Recorded,
    Turn,
    agent_process,
    env_for,
    prompt,
    prompt_once,
    tool_results,
    upstream,
)

# -- cancellation -----------------------------------------------------------------------------


async def test_cancel_mid_stream_closes_the_upstream(
    wire_api: str, workspace: Path, xdg: dict[str, str]
) -> None:
    editor = Editor()
    async with (
        upstream([Turn(text=["Working on it"], block=True), Turn(text=["fresh"])]) as server,
        agent_process(editor, env_for(xdg, server.url, wire_api)) as (conn, _),
    ):
        session = await conn.new_session(cwd=str(workspace))
        pending = asyncio.ensure_future(
            conn.prompt(session_id=session.session_id, prompt=[text_block("Go")])
        )
        await editor.wait_for(lambda e: any(isinstance(u, AgentMessageChunk) for u in e.updates))
        assert not pending.done()
        await conn.cancel(session_id=session.session_id)
        response = await asyncio.wait_for(pending, WAIT_S)
        await asyncio.wait_for(server.disconnected.wait(), WAIT_S)
        # The session is usable again, and remembers what was said before the cancel.
        again = await prompt(conn, session.session_id, "Try again")

    assert response.stop_reason == "cancelled"
    assert again.stop_reason == "end_turn"
    assert "Working on it" in json.dumps(server.requests[1].body)


async def test_cancel_while_asking_permission(workspace: Path, xdg: dict[str, str]) -> None:
    calls = [
        Call("w", "write_file", {"path": "a.txt", "content": "1"}),
        Call("r", "read_file", {"path": "a.txt"}),
    ]
    editor = Editor(permission="never")
    async with (
        upstream([Turn(calls=calls), Turn(text=["ok"])]) as server,
        agent_process(editor, env_for(xdg, server.url)) as (conn, _),
    ):
        session = await conn.new_session(cwd=str(workspace))
        pending = asyncio.ensure_future(
            conn.prompt(session_id=session.session_id, prompt=[text_block("Go")])
        )
        await editor.wait_for(lambda e: bool(e.permission_requests))
        await conn.cancel(session_id=session.session_id)
        response = await asyncio.wait_for(pending, WAIT_S)
        await prompt(conn, session.session_id, "Never mind")

    assert response.stop_reason == "cancelled"
    assert not (workspace / "a.txt").exists() and editor.reads == []
    assert editor.tool_statuses("w")[-1] == "failed" and editor.tool_statuses("r")[-1] == "failed"
    # Both calls still have results, so the next request is well formed.
    assert tool_results(server.requests[1]) == {
        "w": "cancelled by the user",
        "r": "cancelled by the user",
    }


# -- the context window ---------------------------------------------------------------------


def message_chars(req: Recorded) -> int:
    """What the conversation itself took in an Anthropic body, in characters."""
    total = 0
    for message in req.body["messages"]:
        for block in message["content"]:
            total += len(block.get("text") or block.get("content") or json.dumps(block))
    return total


async def test_context_window_learned_from_the_model_listing(
    workspace: Path, xdg: dict[str, str]
) -> None:
    """No context_window configured: the model's context_length in GET /v1/models (4096)
    sizes the Anthropic answer reserve and compaction alike, asked once per selection and
    without anthropic-version (helexa's gateway lists no context_length in that shape)."""
    (workspace / "big.txt").write_text("x" * 12_000 + "\n")  # ~3000 tokens: over a 4096 budget
    turns = [
        Turn(calls=[Call("c1", "read_file", {"path": "big.txt"})]),
        Turn(text=["Read it."]),
        Turn(text=["Done."]),
    ]
    editor = Editor()
    async with upstream(turns, context={"scripted": 4096}) as server:
        env = {**env_for(xdg, server.url, "anthropic-messages"), "HELEXA_ACP_API_KEY": "k"}
        async with agent_process(editor, env) as (conn, _):
            session = await conn.new_session(cwd=str(workspace))
            await prompt(conn, session.session_id, "read big.txt")
            await prompt(conn, session.session_id, "and now?")

    assert [r.body["max_tokens"] for r in server.requests] == [1024, 1024, 1024]
    [listing] = server.listings
    assert listing["x-api-key"] == "k" and "anthropic-version" not in listing
    first_turn, later = server.requests[1], server.requests[2]
    assert tool_results(first_turn) == {"c1": "x" * 12_000 + "\n"}  # the last turn is whole
    assert tool_results(later) == {"c1": ELIDED}  # a 32768 window would have kept it
    assert message_chars(later) // 4 <= request_budget(4096, None)


async def test_a_configured_context_window_wins(workspace: Path, xdg: dict[str, str]) -> None:
    async with upstream([Turn(text=["ok"])], context={"scripted": 4096}) as server:
        config = Path(xdg["XDG_CONFIG_HOME"]) / "helexa" / "acp.toml"
        config.parent.mkdir(parents=True)
        config.write_text(
            f"""
[[endpoints]]
name = "local"
base_url = "{server.url}"
wire_api = "anthropic-messages"
default_model = "scripted"
context_window = 8192
"""
        )
        await prompt_once(Editor(), xdg, workspace, "hi")
    assert server.requests[0].body["max_tokens"] == 2048
    assert server.listings == []  # nothing to learn


@pytest.mark.parametrize(
    "listing",
    [{"listing_status": 500}, {"context": {"scripted": None}}, {"models": ["another-model"]}],
    ids=["listing-fails", "context-null", "model-unlisted"],
)
async def test_no_listed_window_falls_back_and_is_not_asked_every_prompt(
    listing: dict[str, Any], workspace: Path, xdg: dict[str, str]
) -> None:
    """A listing that fails, a null context_length (a cold model the gateway knows no window
    for yet) or a model it does not list: the default window, the prompt unharmed, and
    the next prompt does not ask again (a refusal stands; no answer is retried only after
    ASK_AGAIN_S), so a slow or silent /models costs one lookup, not one per prompt."""
    editor = Editor()
    async with upstream([Turn(text=["one"]), Turn(text=["two"])], **listing) as server:
        env = env_for(xdg, server.url, "anthropic-messages")
        async with agent_process(editor, env) as (conn, _):
            session = await conn.new_session(cwd=str(workspace))
            first = await prompt(conn, session.session_id, "hi")
            await prompt(conn, session.session_id, "hi again")
    assert first.stop_reason == "end_turn" and editor.message_text() == "onetwo"
    assert [r.body["max_tokens"] for r in server.requests] == [8192, 8192]
    assert len(server.listings) == 1


class WindowLookups:
    """A provider double answering context_length lookups from a list, counting them."""

    def __init__(self, *answers: int | None | Exception) -> None:
        self.answers = list(answers)
        self.asked = 0

    async def context_length(self, model: str) -> int | None:
        self.asked += 1
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


@pytest.mark.parametrize(
    ("first", "retried"),
    [(None, True), (Unreachable("timed out"), True), (ProviderError("HTTP 400"), False)],
    ids=["no window yet", "no answer", "refused"],
)
async def test_a_missing_window_is_asked_again_only_after_a_while(
    first: int | None | Exception, retried: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = [1000.0]
    monkeypatch.setattr(turn_module.time, "monotonic", lambda: clock[0])
    endpoint = Endpoint("gw", "http://127.0.0.1:1", "openai-chat", None, None, None, None)
    live = LiveSession(SessionRecord("s", "/w", "gw:m"), Selection(endpoint, "m"))
    lookups = WindowLookups(first, 4096)
    assert await learn_window(live, lookups) is None  # type: ignore[arg-type]
    assert await learn_window(live, lookups) is None  # type: ignore[arg-type]
    assert lookups.asked == 1  # not on every prompt
    clock[0] += turn_module.ASK_AGAIN_S + 1
    expected = 4096 if retried else None
    assert await learn_window(live, lookups) == expected  # type: ignore[arg-type]
    assert lookups.asked == (2 if retried else 1)
    if retried:  # once learned, it stands
        assert await learn_window(live, lookups) == 4096  # type: ignore[arg-type]
        assert lookups.asked == 2
