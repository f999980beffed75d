"""The tools against a real directory, with the harness Editor as the ACP client."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest
from acp.schema import AgentPlanUpdate

from helexa.acp.providers.base import Cancelled, ToolCall
from helexa.acp.tools import TOOL_SPECS, ClientCaps, ToolError, ToolHost, ToolResult, Workspace
from tests.acp.harness import Editor


def host(root: Path, editor: Editor | None = None, **caps: bool) -> ToolHost:
    return ToolHost(editor or Editor(), "s", Workspace(root), ClientCaps(**caps), set())


async def call(
    tools: ToolHost, name: str, cancel: asyncio.Event | None = None, **args: Any
) -> ToolResult:
    async def progress(content: Any) -> None:
        pass

    return await tools.run(
        ToolCall("c", name, json.dumps(args)), cancel or asyncio.Event(), progress
    )


def test_workspace_confinement(tmp_path: Path, workspace: Path) -> None:
    (tmp_path / "outside.txt").write_text("x")
    (workspace / "inside.txt").write_text("y")
    (workspace / "out_link").symlink_to(tmp_path / "outside.txt")
    (workspace / "in_link").symlink_to(workspace / "inside.txt")
    (workspace / "dir_link").symlink_to(tmp_path)
    ws = Workspace(workspace)
    assert ws.resolve("inside.txt") == workspace / "inside.txt"
    assert ws.resolve(str(workspace / "sub" / "new.txt")) == workspace / "sub" / "new.txt"
    assert ws.resolve("in_link") == workspace / "inside.txt"
    assert ws.resolve("a/../inside.txt") == workspace / "inside.txt"
    for bad in [
        "../outside.txt",
        str(tmp_path / "outside.txt"),
        "out_link",
        "dir_link/outside.txt",
        "/etc/passwd",
    ]:
        with pytest.raises(ToolError, match="outside the workspace"):
            ws.resolve(bad)
    with pytest.raises(ToolError, match="non-empty"):
        ws.resolve("")


def test_tool_schemas_are_plain_json_schema() -> None:
    specs = {s.name: s for s in TOOL_SPECS}
    assert set(specs) == {
        "read_file",
        "write_file",
        "edit_file",
        "list_files",
        "search_files",
        "run_command",
        "update_plan",
    }
    edit = specs["edit_file"].parameters
    assert edit["type"] == "object" and edit["required"] == ["path", "old_string", "new_string"]
    assert "title" not in json.dumps(edit)
    plan = specs["update_plan"].parameters
    assert "$ref" not in json.dumps(plan) and "$defs" not in plan  # self-contained
    entry = plan["properties"]["entries"]["items"]
    assert entry["required"] == ["content"]
    assert entry["properties"]["status"]["enum"] == ["pending", "in_progress", "completed"]
    assert entry["properties"]["priority"]["enum"] == ["high", "medium", "low"]


async def test_update_plan_sends_the_whole_plan_and_confirms(workspace: Path) -> None:
    editor = Editor()
    tools = host(workspace, editor)
    entries = [
        {"content": "Read the code", "status": "completed", "priority": "high"},
        {"content": "Fix the bug", "status": "in_progress"},
        {"content": "Run the tests", "priority": "low"},
    ]
    result = await call(tools, "update_plan", entries=entries)
    assert result.ok
    assert result.text == "Plan updated: 3 steps (1 completed, 1 in progress, 1 pending)."
    [update] = editor.updates
    assert isinstance(update, AgentPlanUpdate) and update.session_update == "plan"
    assert [(e.content, e.priority, e.status) for e in update.entries] == [
        ("Read the code", "high", "completed"),
        ("Fix the bug", "medium", "in_progress"),
        ("Run the tests", "low", "pending"),
    ]
    assert editor.permission_requests == []
    cleared = await call(tools, "update_plan", entries=[])
    assert cleared.text == "Plan cleared." and editor.updates[-1].entries == []
    bad = await call(tools, "update_plan", entries=[{"content": "x", "status": "done"}])
    assert not bad.ok and "update_plan: entries.0.status" in bad.text
    assert len(editor.updates) == 2  # a plan that does not parse is never shown


async def test_read_locally_with_offset_and_limit(workspace: Path) -> None:
    (workspace / "f.txt").write_text("one\ntwo\nthree\nfour\n")
    tools = host(workspace)
    assert (await call(tools, "read_file", path="f.txt", offset=2, limit=2)).text == "two\nthree\n"
    missing = await call(tools, "read_file", path="nope.txt")
    assert not missing.ok and "no such file" in missing.text


async def test_bad_calls_fail_with_a_reason(workspace: Path) -> None:
    tools = host(workspace)
    unknown = await tools.run(ToolCall("c", "rm_rf", "{}"), asyncio.Event(), _noop)
    assert not unknown.ok and "unknown tool 'rm_rf'" in unknown.text
    broken = await tools.run(ToolCall("c", "read_file", '{"path": "a'), asyncio.Event(), _noop)
    assert not broken.ok and "not valid JSON" in broken.text
    missing = await call(tools, "write_file", path="a.txt")
    assert not missing.ok and "write_file: content: Field required" in missing.text


async def _noop(content: Any) -> None:
    pass


async def test_edit_file_requires_a_unique_match(workspace: Path) -> None:
    target = workspace / "code.py"
    target.write_text("a = 1\nb = 1\n")
    editor = Editor()
    tools = host(workspace, editor, read=True, write=True)
    twice = await call(tools, "edit_file", path="code.py", old_string="= 1", new_string="= 2")
    assert not twice.ok and "appears 2 times" in twice.text
    absent = await call(tools, "edit_file", path="code.py", old_string="c = 1", new_string="")
    assert not absent.ok and "not found" in absent.text
    assert editor.permission_requests == []  # nothing asked for edits that cannot apply
    once = await call(tools, "edit_file", path="code.py", old_string="b = 1", new_string="b = 2")
    assert once.ok and target.read_text() == "a = 1\nb = 2\n"
    every = await call(
        tools, "edit_file", path="code.py", old_string="= ", new_string="== ", replace_all=True
    )
    assert every.ok and target.read_text() == "a == 1\nb == 2\n"
    assert editor.writes == [str(target), str(target)]


async def test_allow_always_is_remembered_for_the_tool(workspace: Path) -> None:
    editor = Editor(permission="allow_always")
    tools = host(workspace, editor)
    assert (await call(tools, "write_file", path="a.txt", content="1")).ok
    editor.permission = "reject_once"  # would refuse, but is not asked again
    assert (await call(tools, "write_file", path="b.txt", content="2")).ok
    assert len(editor.permission_requests) == 1
    assert (workspace / "b.txt").read_text() == "2"


async def test_cancelled_permission_denies(workspace: Path) -> None:
    result = await call(
        host(workspace, Editor(permission="cancelled")), "write_file", path="a.txt", content="1"
    )
    assert not result.ok and not (workspace / "a.txt").exists()


async def test_list_and_search(tmp_path: Path, workspace: Path) -> None:
    (workspace / "src").mkdir()
    (workspace / "src" / "app.py").write_text("def main():\n    return 42\n")
    (workspace / "README.md").write_text("main entry point\n")
    (workspace / ".git").mkdir()
    (workspace / ".git" / "config").write_text("main = yes\n")
    (workspace / "blob.bin").write_bytes(b"main\0\1\2")
    (tmp_path / "secret.txt").write_text("main secret\n")
    (workspace / "leak.txt").symlink_to(tmp_path / "secret.txt")
    tools = host(workspace)

    top = (await call(tools, "list_files")).text.splitlines()
    assert top == ["README.md", "blob.bin", "leak.txt", "src/"]
    deep = (await call(tools, "list_files", path=".", recursive=True)).text.splitlines()
    assert "src/app.py" in deep and not any(".git" in line for line in deep)

    found = (await call(tools, "search_files", query="main")).text.splitlines()
    assert found == ["README.md:1: main entry point", "src/app.py:1: def main():"]
    regex = await call(tools, "search_files", query=r"return \d+", regex=True, path="src")
    assert regex.text == "src/app.py:2: return 42"
    invalid = await call(tools, "search_files", query="(", regex=True)
    assert not invalid.ok and "invalid regular expression" in invalid.text


async def test_run_command_timeout_and_cancel(workspace: Path) -> None:
    tools = host(workspace)
    started = time.monotonic()
    result = await call(tools, "run_command", command="echo before; sleep 30", timeout_s=0.5)
    assert not result.ok and "timed out after 0.5s" in result.text and "before" in result.text
    tools.always_allowed.add("run_command")  # so the cancel hits the running process
    cancel = asyncio.Event()
    cancel.set()
    with pytest.raises(Cancelled):
        await call(tools, "run_command", cancel, command="sleep 30")
    assert time.monotonic() - started < 20  # neither waited for its sleep
