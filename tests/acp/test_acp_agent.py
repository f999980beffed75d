"""The agent end to end: the ACP SDK's client over real stdio pipes to ``helexa acp``,
which talks to a scripted model server on 127.0.0.1 in each wire API."""

from __future__ import annotations

import json
from pathlib import Path

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

from helexa.acp.agent import prompt_text
from tests.acp.harness import (
    Call,
    Editor,
    Turn,
    agent_process,
    env_for,
    prompt,
    prompt_once,
    system_prompt,
    tool_names,
    tool_results,
    upstream,
)

# -- tools through the editor ---------------------------------------------------------------


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
    async with upstream(turns) as server:
        response = await prompt_once(editor, env_for(xdg, server.url), workspace, "Rewrite out.txt")

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
    async with upstream([Turn(calls=calls), Turn(text=["ok"])]) as server:
        response = await prompt_once(editor, env_for(xdg, server.url), workspace, "Read the secret")

    assert response.stop_reason == "end_turn"
    assert editor.reads == [] and editor.writes == [] and editor.permission_requests == []
    assert secret.read_text() == "TOP SECRET"
    results = tool_results(server.requests[1])
    for call in calls:
        assert "outside the workspace" in results[call.id]
        assert editor.tool_statuses(call.id)[-1] == "failed"
    assert "TOP SECRET" not in json.dumps(server.requests[1].body)


@pytest.mark.parametrize("fs", [True, False], ids=["editor-fs", "local"])
async def test_os_errors_fail_one_call_and_the_turn_goes_on(
    fs: bool, workspace: Path, xdg: dict[str, str]
) -> None:
    """A name over 255 bytes, a symlink loop: the OS refuses them, and that refusal is the
    call's result for the model to read, not the end of the prompt turn."""
    (workspace / "loop_a").symlink_to("loop_b")
    (workspace / "loop_b").symlink_to("loop_a")
    (workspace / "f.txt").write_text("fine\n")
    long = "x" * 300
    calls = [
        Call("long", "read_file", {"path": long}),
        Call("loop", "read_file", {"path": "loop_a"}),
        Call("write_long", "write_file", {"path": f"sub/{long}", "content": "x"}),
        Call("write_loop", "write_file", {"path": "loop_b/new.txt", "content": "x"}),
        Call("list_loop", "list_files", {"path": "loop_a"}),
        Call("search_loop", "search_files", {"query": "x", "path": "loop_b"}),
        Call("fine", "read_file", {"path": "f.txt"}),
    ]
    editor = Editor(permission="allow_always", fs=fs)
    async with upstream([Turn(calls=calls), Turn(text=["Carried on."])]) as server:
        response = await prompt_once(editor, env_for(xdg, server.url), workspace, "Break")

    assert response.stop_reason == "end_turn"
    assert editor.message_text() == "Carried on."
    results = tool_results(server.requests[1])
    for call_id in ["long", "write_long"]:
        assert "file name too long (ENAMETOOLONG)" in results[call_id], results[call_id]
    for call_id in ["loop", "write_loop", "list_loop", "search_loop"]:
        assert "too many levels of symbolic links (ELOOP)" in results[call_id], results[call_id]
    for call in calls[:-1]:
        assert editor.tool_statuses(call.id)[-1] == "failed"
    assert results["fine"] == "fine\n" and editor.tool_statuses("fine")[-1] == "completed"
    assert editor.writes == [] and sorted(p.name for p in workspace.iterdir()) == [
        "f.txt",
        "loop_a",
        "loop_b",
    ]


@pytest.mark.parametrize("terminal", [False, True], ids=["local", "editor-terminal"])
async def test_run_command_and_local_files(
    terminal: bool, workspace: Path, xdg: dict[str, str]
) -> None:
    calls = [
        Call("write", "write_file", {"path": "sub/hello.txt", "content": "hi from a file"}),
        Call("run", "run_command", {"command": "cat sub/hello.txt; echo; exit 3"}),
    ]
    editor = Editor(fs=False, terminal=terminal)  # no fs capability: files are local
    async with upstream([Turn(calls=calls), Turn(text=["ok"])]) as server:
        env = env_for(xdg, server.url)
        response = await prompt_once(editor, env, workspace, "Write and show a file")

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
        await prompt_once(editor, env, workspace, "hello")
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
        response = await prompt_once(editor, env, workspace, "hello")
    assert response.stop_reason == "end_turn" and len(server.requests) == 1
    assert editor.message_text() == "via helexa.toml"


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
