"""The agent end to end: the ACP SDK's client over real stdio pipes to ``helexa acp``,
which talks to a scripted model server on 127.0.0.1 in each wire API."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from acp import RequestError, audio_block, image_block, text_block
from acp.schema import (
    AgentMessageChunk,
    AgentPlanUpdate,
    AgentThoughtChunk,
    ConfigOptionUpdate,
    EmbeddedResourceContentBlock,
    ResourceContentBlock,
    TerminalToolCallContent,
    TextResourceContents,
    ToolCallProgress,
    UserMessageChunk,
)

from helexa.acp.agent import HelexaAgent, LiveSession, prompt_text
from helexa.acp.config import Endpoint, Selection
from helexa.acp.providers.base import ProviderError, Unreachable
from helexa.acp.session import ELIDED, SessionRecord, request_budget
from tests.acp.harness import (
    WAIT_S,
    WIRE_APIS,
    Call,
    Editor,
    Recorded,
    Turn,
    agent_process,
    env_for,
    upstream,
)

# -- reading what the agent sent upstream, per dialect --------------------------------------


def tool_results(req: Recorded) -> dict[str, str]:
    body = req.body
    if req.wire_api == "openai-chat":
        return {m["tool_call_id"]: m["content"] for m in body["messages"] if m["role"] == "tool"}
    if req.wire_api == "openai-responses":
        return {
            i["call_id"]: i["output"] for i in body["input"] if i["type"] == "function_call_output"
        }
    return {
        b["tool_use_id"]: b["content"]
        for m in body["messages"]
        if m["role"] == "user"
        for b in m["content"]
        if b["type"] == "tool_result"
    }


def tool_names(req: Recorded) -> list[str]:
    tools = req.body["tools"]
    if req.wire_api == "openai-chat":
        return [t["function"]["name"] for t in tools]
    return [t["name"] for t in tools]


def system_prompt(req: Recorded) -> str:
    if req.wire_api == "openai-chat":
        return req.body["messages"][0]["content"]
    return req.body["instructions" if req.wire_api == "openai-responses" else "system"]


async def prompt(conn: Any, session_id: str, text: str) -> Any:
    return await asyncio.wait_for(
        conn.prompt(session_id=session_id, prompt=[text_block(text)]), WAIT_S
    )


# -- tools through the editor ---------------------------------------------------------------


@pytest.mark.parametrize("wire_api", WIRE_APIS)
async def test_read_file_goes_through_the_editor_fs(
    wire_api: str, workspace: Path, xdg: dict[str, str]
) -> None:
    notes = workspace / "notes.txt"
    notes.write_text("the secret word is pineapple\n")
    turns = [
        Turn(text=["Let me look. "], calls=[Call("call_read", "read_file", {"path": "notes.txt"})]),
        Turn(reasoning=["The file names a fruit."], text=["The word is ", "pineapple."]),
    ]
    editor = Editor()
    async with (
        upstream(turns) as server,
        agent_process(editor, env_for(xdg, server.url, wire_api)) as (conn, init),
    ):
        assert init.agent_capabilities.load_session is True
        session = await conn.new_session(cwd=str(workspace))
        response = await prompt(conn, session.session_id, "Which word is in notes.txt?")

    assert response.stop_reason == "end_turn"
    assert editor.reads == [str(notes)]
    assert editor.tool_statuses("call_read") == ["pending", "in_progress", "completed"]
    final = editor.final_tool_update("call_read")
    assert "pineapple" in final.content[0].content.text
    assert editor.message_text() == "Let me look. The word is pineapple."
    thoughts = [u.content.text for u in editor.updates if isinstance(u, AgentThoughtChunk)]
    assert thoughts == ["The file names a fruit."]

    first, second = server.requests
    assert {first.wire_api, second.wire_api} == {wire_api}
    assert first.body["model"] == "scripted"
    assert {"read_file", "write_file", "edit_file", "run_command"} <= set(tool_names(first))
    assert str(workspace) in system_prompt(first)
    assert tool_results(second) == {"call_read": notes.read_text()}


@pytest.mark.parametrize("answer", ["allow_once", "reject_once"])
async def test_write_asks_permission_first(
    answer: str, workspace: Path, xdg: dict[str, str]
) -> None:
    target = workspace / "out.txt"
    target.write_text("old\n")
    call = Call("call_write", "write_file", {"path": "out.txt", "content": "new\n"})
    turns = [Turn(calls=[call]), Turn(text=["Done."])]
    editor = Editor(permission=answer)
    async with (
        upstream(turns) as server,
        agent_process(editor, env_for(xdg, server.url)) as (conn, _),
    ):
        session = await conn.new_session(cwd=str(workspace))
        response = await prompt(conn, session.session_id, "Rewrite out.txt")

    assert response.stop_reason == "end_turn"  # a refusal does not end the turn early
    [asked] = editor.permission_requests
    assert asked.tool_call_id == "call_write"
    assert asked.content[0].new_text == "new\n" and asked.content[0].old_text == "old\n"
    result = tool_results(server.requests[1])["call_write"]
    if answer == "allow_once":
        assert target.read_text() == "new\n"
        assert editor.writes == [str(target)]
        assert editor.tool_statuses("call_write")[-1] == "completed"
    else:
        assert target.read_text() == "old\n"
        assert editor.writes == []
        assert editor.tool_statuses("call_write")[-1] == "failed"
        assert "denied" in result


async def test_paths_outside_the_workspace_are_refused(
    tmp_path: Path, workspace: Path, xdg: dict[str, str]
) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP SECRET")
    (workspace / "link.txt").symlink_to(secret)
    calls = [
        Call("dotdot", "read_file", {"path": "../secret.txt"}),
        Call("symlink", "read_file", {"path": "link.txt"}),
        Call("absolute", "write_file", {"path": str(secret), "content": "pwned"}),
    ]
    editor = Editor()
    async with (
        upstream([Turn(calls=calls), Turn(text=["ok"])]) as server,
        agent_process(editor, env_for(xdg, server.url)) as (conn, _),
    ):
        session = await conn.new_session(cwd=str(workspace))
        response = await prompt(conn, session.session_id, "Read the secret")

    assert response.stop_reason == "end_turn"
    assert editor.reads == [] and editor.writes == [] and editor.permission_requests == []
    assert secret.read_text() == "TOP SECRET"
    results = tool_results(server.requests[1])
    for call in calls:
        assert "outside the workspace" in results[call.id]
        assert editor.tool_statuses(call.id)[-1] == "failed"
    assert "TOP SECRET" not in json.dumps(server.requests[1].body)


@pytest.mark.parametrize("terminal", [False, True], ids=["local", "editor-terminal"])
async def test_run_command_and_local_files(
    terminal: bool, workspace: Path, xdg: dict[str, str]
) -> None:
    calls = [
        Call("write", "write_file", {"path": "sub/hello.txt", "content": "hi from a file"}),
        Call("run", "run_command", {"command": "cat sub/hello.txt; echo; exit 3"}),
    ]
    editor = Editor(fs=False, terminal=terminal)  # no fs capability: files are local
    async with (
        upstream([Turn(calls=calls), Turn(text=["ok"])]) as server,
        agent_process(editor, env_for(xdg, server.url)) as (conn, _),
    ):
        session = await conn.new_session(cwd=str(workspace))
        response = await prompt(conn, session.session_id, "Write and show a file")

    assert response.stop_reason == "end_turn"
    assert (workspace / "sub" / "hello.txt").read_text() == "hi from a file"
    assert editor.writes == [] and len(editor.permission_requests) == 2
    result = tool_results(server.requests[1])["run"]
    assert "hi from a file" in result and "exit code 3" in result
    assert editor.tool_statuses("run")[-1] == "failed"  # a non-zero exit is a failed call
    shown = [
        c
        for u in editor.updates
        if isinstance(u, ToolCallProgress) and u.tool_call_id == "run" and u.content
        for c in u.content
    ]
    assert any(isinstance(c, TerminalToolCallContent) for c in shown) is terminal


# -- the plan ---------------------------------------------------------------------------------


def plan_call(call_id: str, *steps: tuple[str, str, str]) -> Call:
    entries = [{"content": c, "priority": p, "status": s} for c, p, s in steps]
    return Call(call_id, "update_plan", {"entries": entries})


@pytest.mark.parametrize("wire_api", WIRE_APIS)
async def test_update_plan_becomes_a_plan_session_update(
    wire_api: str, workspace: Path, xdg: dict[str, str]
) -> None:
    first = [
        ("Find the bug", "high", "in_progress"),
        ("Fix it", "medium", "pending"),
        ("Run the tests", "low", "pending"),
    ]
    done = [(c, p, "completed") for c, p, _ in first]
    turns = [
        Turn(text=["Planning. "], calls=[plan_call("plan_1", *first)]),
        Turn(calls=[plan_call("plan_2", *done), Call("ls", "list_files", {})]),
        Turn(text=["All done."]),
    ]
    editor = Editor()
    async with upstream(turns) as server:
        env = env_for(xdg, server.url, wire_api)
        async with agent_process(editor, env) as (conn, _):
            session = await conn.new_session(cwd=str(workspace))
            response = await prompt(conn, session.session_id, "Fix the bug")

        reloaded = Editor()
        async with agent_process(reloaded, env) as (conn, _):
            await conn.load_session(cwd=str(workspace), session_id=session.session_id)

    assert response.stop_reason == "end_turn"
    plans = [u for u in editor.updates if isinstance(u, AgentPlanUpdate)]
    assert [[(e.content, e.priority, e.status) for e in p.entries] for p in plans] == [first, done]
    assert editor.permission_requests == []  # a plan changes nothing: nothing to ask
    # Shown as the plan itself, not also as tool-call cards; other tools still are.
    assert editor.tool_statuses("plan_1") == [] and editor.tool_statuses("plan_2") == []
    assert editor.tool_statuses("ls") == ["pending", "in_progress", "completed"]
    assert editor.message_text() == "Planning. All done."
    assert "update_plan" in tool_names(server.requests[0])
    confirmation = tool_results(server.requests[1])["plan_1"]
    assert confirmation == "Plan updated: 3 steps (0 completed, 1 in progress, 2 pending)."
    assert tool_results(server.requests[2])["plan_2"].startswith("Plan updated: 3 steps (3 co")
    # session/load replays the plans too, so the editor ends on the latest one.
    replayed = [u for u in reloaded.updates if isinstance(u, AgentPlanUpdate)]
    assert [[e.status for e in p.entries] for p in replayed] == [
        [s for _, _, s in first],
        [s for _, _, s in done],
    ]
    assert reloaded.tool_statuses("plan_1") == [] and reloaded.tool_statuses("ls") == ["completed"]


# -- cancellation -----------------------------------------------------------------------------


@pytest.mark.parametrize("wire_api", WIRE_APIS)
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


# -- sessions ---------------------------------------------------------------------------------


async def test_session_load_after_restart(workspace: Path, xdg: dict[str, str]) -> None:
    call = Call("call_list", "list_files", {"path": "."})
    turns = [Turn(calls=[call]), Turn(text=["Hello, ", "human."]), Turn(text=["Still here."])]
    (workspace / "a.txt").write_text("a")
    async with upstream(turns) as server:
        env = env_for(xdg, server.url)
        async with agent_process(Editor(), env) as (conn, _):
            session = await conn.new_session(cwd=str(workspace))
            await prompt(conn, session.session_id, "hi")

        editor = Editor()
        async with agent_process(editor, env) as (conn, init):
            assert init.agent_capabilities.load_session is True
            with pytest.raises(RequestError, match="unknown session"):
                await conn.load_session(cwd=str(workspace), session_id="sess_missing")
            await conn.load_session(cwd=str(workspace), session_id=session.session_id)
            replayed = list(editor.updates)
            response = await prompt(conn, session.session_id, "again")

    users = [u.content.text for u in replayed if isinstance(u, UserMessageChunk)]
    assert users == ["hi"]
    assert "".join(u.content.text for u in replayed if isinstance(u, AgentMessageChunk)) == (
        "Hello, human."
    )
    assert editor.tool_statuses("call_list")[0] == "completed"
    assert response.stop_reason == "end_turn"
    sent = server.requests[2].body["messages"]
    assert [m["role"] for m in sent] == ["system", "user", "assistant", "tool", "assistant", "user"]
    assert sent[1]["content"] == "hi" and sent[-1]["content"] == "again"
    assert sent[3]["content"] == "a.txt"


async def test_model_selection_per_session(workspace: Path, xdg: dict[str, str]) -> None:
    async with upstream([Turn(text=["from claude"]), Turn(text=["from chat"])]) as server:
        config = Path(xdg["XDG_CONFIG_HOME"]) / "helexa" / "acp.toml"
        config.parent.mkdir(parents=True)
        config.write_text(
            f"""
default_endpoint = "chat"
system_prompt = 'Work in {{cwd}}; reply as JSON like {{"a": 1}}.'

[[endpoints]]
name = "chat"
base_url = "{server.url}"
default_model = "small"

[[endpoints]]
name = "claude"
base_url = "{server.url}/v1"
wire_api = "anthropic-messages"
default_model = "big"
api_key_env = "TEST_ANTHROPIC_KEY"
"""
        )
        editor = Editor()
        env = {**xdg, "TEST_ANTHROPIC_KEY": "sekrit"}
        async with agent_process(editor, env) as (conn, _):
            session = await conn.new_session(cwd=str(workspace))
            [option] = session.config_options
            assert option.id == "model" and option.current_value == "chat:small"
            assert {o.value for o in option.options} == {"chat:small", "claude:big"}

            switched = await prompt(conn, session.session_id, "/model claude:opus")
            assert switched.stop_reason == "end_turn" and server.requests == []
            await editor.wait_for(
                lambda e: any(isinstance(u, ConfigOptionUpdate) for u in e.updates)
            )
            await prompt(conn, session.session_id, "hi")

            changed = await conn.set_config_option(
                config_id="model", session_id=session.session_id, value="chat"
            )
            assert changed.config_options[0].current_value == "chat:small"
            await prompt(conn, session.session_id, "hi again")
            with pytest.raises(RequestError, match="only 'model'"):
                await conn.set_config_option(
                    config_id="temperature", session_id=session.session_id, value="hot"
                )
            with pytest.raises(RequestError, match="image prompts are not supported"):
                await conn.prompt(
                    session_id=session.session_id, prompt=[image_block("aGk=", "image/png")]
                )

    claude, chat = server.requests
    assert (claude.wire_api, claude.body["model"]) == ("anthropic-messages", "opus")
    assert claude.headers["x-api-key"] == "sekrit"
    assert claude.body["system"] == f'Work in {workspace}; reply as JSON like {{"a": 1}}.'
    assert (chat.wire_api, chat.body["model"]) == ("openai-chat", "small")
    assert "Model: claude:opus" in editor.message_text()


async def test_model_discovered_when_none_configured(workspace: Path, xdg: dict[str, str]) -> None:
    editor = Editor()
    async with upstream([Turn(text=["hi"])], models=["first-model", "second"]) as server:
        env = {**xdg, "HELEXA_ACP_BASE_URL": server.url}
        async with agent_process(editor, env) as (conn, _):
            session = await conn.new_session(cwd=str(workspace))
            await prompt(conn, session.session_id, "hello")
    assert server.requests[0].body["model"] == "first-model"


async def test_default_endpoint_is_the_gateway_helexa_toml_names(
    workspace: Path, xdg: dict[str, str]
) -> None:
    """No acp.toml, no HELEXA_ACP_BASE_URL: the agent dials helexa.toml's [gateway] listen
    (a wildcard bind reached on loopback), not a hard-coded port."""
    async with upstream([Turn(text=["via helexa.toml"])]) as server:
        port = server.url.rpartition(":")[2]
        config = Path(xdg["XDG_CONFIG_HOME"]) / "helexa" / "helexa.toml"
        config.parent.mkdir(parents=True)
        config.write_text(f'[gateway]\nlisten = "0.0.0.0:{port}"\n')
        editor = Editor()
        env = {**xdg, "HELEXA_ACP_MODEL": "scripted"}
        async with agent_process(editor, env) as (conn, _):
            session = await conn.new_session(cwd=str(workspace))
            response = await prompt(conn, session.session_id, "hello")
    assert response.stop_reason == "end_turn" and len(server.requests) == 1
    assert editor.message_text() == "via helexa.toml"


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
        async with agent_process(Editor(), xdg) as (conn, _):
            session = await conn.new_session(cwd=str(workspace))
            await prompt(conn, session.session_id, "hi")
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


def test_prompt_text_labels_embedded_context_and_refuses_media() -> None:
    resource = EmbeddedResourceContentBlock(
        type="resource", resource=TextResourceContents(uri="file:///w/a.py", text="x = 1")
    )
    link = ResourceContentBlock(type="resource_link", name="b.py", uri="file:///w/b.py")
    assert prompt_text([text_block("Fix"), resource, link]) == (
        'Fix\n\n<context uri="file:///w/a.py">\nx = 1\n</context>\n\n[b.py](file:///w/b.py)'
    )
    with pytest.raises(RequestError, match="audio prompts are not supported"):
        prompt_text([audio_block("aGk=", "audio/wav")])
    with pytest.raises(RequestError, match="empty"):
        prompt_text([text_block("  ")])


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
    from helexa.acp import agent as agent_module

    clock = [1000.0]
    monkeypatch.setattr(agent_module.time, "monotonic", lambda: clock[0])
    endpoint = Endpoint("gw", "http://127.0.0.1:1", "openai-chat", None, None, None, None)
    live = LiveSession(SessionRecord("s", "/w", "gw:m"), Selection(endpoint, "m"))
    lookups = WindowLookups(first, 4096)
    learn = HelexaAgent._learn_window
    assert await learn(None, live, lookups) is None  # type: ignore[arg-type]
    assert await learn(None, live, lookups) is None  # type: ignore[arg-type]
    assert lookups.asked == 1  # not on every prompt
    clock[0] += agent_module.ASK_AGAIN_S + 1
    expected = 4096 if retried else None
    assert await learn(None, live, lookups) == expected  # type: ignore[arg-type]
    assert lookups.asked == (2 if retried else 1)
    if retried:  # once learned, it stands
        assert await learn(None, live, lookups) == 4096  # type: ignore[arg-type]
        assert lookups.asked == 2
