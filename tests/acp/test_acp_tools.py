"""The tools against a real directory, with the harness Editor as the ACP client."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from acp.schema import AgentPlanUpdate

from helexa.acp.providers.base import Cancelled, ToolCall
from helexa.acp.tools import TOOL_SPECS, ClientCaps, ToolError, ToolHost, ToolResult, Workspace
from tests.acp.harness import WAIT_S, Editor


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


# -- what the OS refuses -------------------------------------------------------------------


@pytest.mark.parametrize("caps", [{}, {"read": True, "write": True}], ids=["local", "editor"])
async def test_os_errors_become_failed_calls(workspace: Path, caps: dict[str, bool]) -> None:
    (workspace / "f.txt").write_text("one\n")
    (workspace / "sub").mkdir()
    (workspace / "loop_a").symlink_to("loop_b")
    (workspace / "loop_b").symlink_to("loop_a")
    long = "n" * 300
    tools = host(workspace, Editor(), **caps)
    tools.always_allowed.update({"write_file", "edit_file"})
    cases: list[tuple[str, dict[str, Any], str]] = [
        ("read_file", {"path": long}, "file name too long (ENAMETOOLONG)"),
        ("read_file", {"path": f"sub/{long}/f.txt"}, "file name too long (ENAMETOOLONG)"),
        ("read_file", {"path": "loop_a"}, "too many levels of symbolic links (ELOOP)"),
        ("read_file", {"path": "loop_a/f.txt"}, "too many levels of symbolic links (ELOOP)"),
        ("read_file", {"path": "f.txt/x"}, "not a directory (ENOTDIR)"),
        ("write_file", {"path": long, "content": "x"}, "file name too long (ENAMETOOLONG)"),
        ("write_file", {"path": "loop_b", "content": "x"}, "symbolic links (ELOOP)"),
        ("write_file", {"path": "f.txt/new", "content": "x"}, "not a directory (ENOTDIR)"),
        ("edit_file", {"path": "loop_a", "old_string": "a", "new_string": "b"}, "(ELOOP)"),
        ("list_files", {"path": long}, "file name too long (ENAMETOOLONG)"),
        ("list_files", {"path": "loop_a"}, "too many levels of symbolic links (ELOOP)"),
        ("list_files", {"path": "f.txt"}, "f.txt is not a directory"),
        ("search_files", {"query": "x", "path": "loop_b"}, "(ELOOP)"),
        ("search_files", {"query": "x", "path": long}, "file name too long (ENAMETOOLONG)"),
    ]
    if not caps:  # the editor's own refusals are its business; these are the agent's
        os.mkfifo(workspace / "fifo")  # opened without blocking, then refused
        cases += [
            ("read_file", {"path": "sub"}, "cannot read sub: is a directory (EISDIR)"),
            ("write_file", {"path": "sub", "content": "x"}, "is a directory (EISDIR)"),
            ("read_file", {"path": "nope.txt"}, "no such file or directory (ENOENT)"),
            ("read_file", {"path": "fifo"}, "cannot read fifo: not a regular file (EINVAL)"),
            ("write_file", {"path": "fifo", "content": "x"}, "cannot write fifo: no such dev"),
        ]
    for name, args, reason in cases:
        tools.describe(name, json.dumps(args))  # the editor's card must not fail either
        result = await call(tools, name, **args)
        assert not result.ok and reason in result.text, (name, args, result.text)
    assert (workspace / "f.txt").read_text() == "one\n"
    made = ["f.txt", "loop_a", "loop_b", "sub"] + ([] if caps else ["fifo"])
    assert sorted(p.name for p in workspace.iterdir()) == sorted(made)
    # A loop (or a FIFO) among the entries is passed over, not a reason to fail them all.
    assert (await call(tools, "search_files", query="one")).text == "f.txt:1: one"
    listing = await call(tools, "list_files", recursive=True)
    assert listing.ok and "loop_a" in listing.text.splitlines()


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads and writes whatever the mode says")
async def test_permission_denied_becomes_a_failed_call(workspace: Path) -> None:
    (workspace / "locked.txt").write_text("x")
    (workspace / "locked.txt").chmod(0)
    (workspace / "shut").mkdir()
    (workspace / "shut" / "f.txt").write_text("x")
    (workspace / "shut").chmod(0)
    tools = host(workspace)
    tools.always_allowed.add("write_file")
    try:
        for name, args in [
            ("read_file", {"path": "locked.txt"}),
            ("write_file", {"path": "locked.txt", "content": "y"}),
            ("read_file", {"path": "shut/f.txt"}),
            ("list_files", {"path": "shut"}),
        ]:
            result = await call(tools, name, **args)
            assert not result.ok and "permission denied (EACCES)" in result.text, result.text
    finally:
        (workspace / "shut").chmod(0o755)


async def test_symlinks_that_stay_inside_still_work(workspace: Path) -> None:
    """Links are followed by the agent itself, one component at a time, so one that stays
    inside works wherever it sits (leaf, directory, absolute, climbing out and back)."""
    (workspace / "real").mkdir()
    (workspace / "real" / "f.txt").write_text("inside\n")
    (workspace / "rel_dir").symlink_to("real")
    (workspace / "abs_dir").symlink_to(workspace / "real")
    (workspace / "real" / "up").symlink_to("../real/f.txt")
    (workspace / "round_trip").symlink_to(f"../{workspace.name}/real/f.txt")
    ws = Workspace(workspace)
    for path in [
        "rel_dir/f.txt",
        "abs_dir/f.txt",
        "real/up",
        "round_trip",
        "rel_dir/../real/f.txt",
    ]:
        assert ws.resolve(path) == workspace / "real" / "f.txt", path
        assert ws.read_text(ws.resolve(path)) == "inside\n"
    assert ws.resolve("rel_dir/new/x.txt") == workspace / "real" / "new" / "x.txt"
    ws.write_text(ws.resolve("abs_dir/new/x.txt"), "made")
    assert (workspace / "real" / "new" / "x.txt").read_text() == "made"
    tools = host(workspace)
    found = await call(tools, "search_files", query="inside")
    assert found.text.splitlines() == [  # linked files are searched; linked dirs not entered
        "real/f.txt:1: inside",
        "real/up:1: inside",
        "round_trip:1: inside",
    ]
    assert (await call(tools, "search_files", query="inside", path="rel_dir")).ok
    listing = await call(tools, "list_files", path="abs_dir", recursive=True)
    assert listing.text.splitlines() == ["real/f.txt", "real/new/", "real/new/x.txt", "real/up"]


# -- links swapped in while a tool works -----------------------------------------------------


class Flipper:
    """A thread that turns ``path`` into a symlink to ``outside`` and back, as fast as it
    can, until stopped: the race an attacker (or a confused build script) would run between
    the agent's check of a path and its open. A file is swapped atomically (``rename`` over
    it of a fresh link, then of a hard link to the original); a directory is moved aside
    and back, so it is also missing for a moment. Each state lasts about as many system
    calls as the other, and the spares live in ``spare``, outside the workspace."""

    def __init__(self, path: Path, outside: Path, spare: Path) -> None:
        self.path = path
        self.outside = outside
        spare.mkdir(exist_ok=True)
        self.parked = spare / f"{path.name}.parked"
        self.link = spare / f"{path.name}.link"
        self.tmp = spare / f"{path.name}.tmp"
        self.is_dir = path.is_dir()
        self.flips = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        if not self.is_dir:
            os.link(path, self.parked)  # the original, to link back in

    def _flip(self) -> None:
        if self.is_dir:
            os.rename(self.path, self.parked)
            os.rename(self.link, self.path)  # now a link
            os.lstat(self.path)
            os.rename(self.path, self.link)
            os.rename(self.parked, self.path)  # the directory again
            os.lstat(self.path)
        else:
            os.symlink(self.outside, self.link)
            os.replace(self.link, self.path)  # now a link
            os.link(self.parked, self.tmp)
            os.replace(self.tmp, self.path)  # the file again

    def _run(self) -> None:
        for _ in range(10_000_000):
            if self._stop.is_set():
                return
            try:
                self._flip()
                self.flips += 1
            except OSError:  # a tool made the path while it was away (write_file's parents)
                self._restore()

    def _restore(self) -> None:
        """Put the original back, whatever state a flip or a tool left the path in."""
        with contextlib.suppress(OSError):
            if self.is_dir:
                if self.path.is_symlink():
                    os.rename(self.path, self.link)
                if self.parked.exists():
                    if self.path.is_dir():
                        shutil.rmtree(self.path)
                    os.rename(self.parked, self.path)
                if not self.link.is_symlink():
                    os.symlink(self.outside, self.link)
            elif self.path.is_symlink():
                os.link(self.parked, self.tmp)
                os.replace(self.tmp, self.path)

    def __enter__(self) -> Flipper:
        self._restore()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(WAIT_S)
        assert not self._thread.is_alive()
        self._restore()


ATTEMPTS = 2_000


@pytest.fixture
def flip(tmp_path: Path, workspace: Path) -> Callable[[str], Flipper]:
    """The workspace holds ``secret.txt`` and ``d/f.txt`` (both "inside"); outside it, the
    same names say SECRET, and ``d`` there also holds ``outside_only.txt``. ``flip(name)``
    is the Flipper for the workspace's ``name``."""
    outside = tmp_path / "outside"
    for root, text in [(workspace, "inside\n"), (outside, "SECRET\n")]:
        (root / "d").mkdir(parents=True)
        (root / "d" / "f.txt").write_text(text)
        (root / "secret.txt").write_text(text)
    (outside / "d" / "outside_only.txt").write_text("SECRET\n")
    return lambda name: Flipper(workspace / name, outside / name, tmp_path / "spare")


@pytest.mark.parametrize("path", ["secret.txt", "d/f.txt"], ids=["leaf", "directory"])
async def test_a_swapped_in_symlink_never_reads_outside(
    workspace: Path, flip: Callable[[str], Flipper], path: str
) -> None:
    tools = host(workspace)
    read = 0
    with flip(path.split("/")[0]) as flipper:
        for _ in range(ATTEMPTS):
            result = await call(tools, "read_file", path=path)
            assert "SECRET" not in result.text, (flipper.flips, result.text)
            read += result.text == "inside\n"
    assert flipper.flips > 0 and read > 0


@pytest.mark.parametrize("path", ["secret.txt", "d/f.txt"], ids=["leaf", "directory"])
async def test_a_swapped_in_symlink_never_writes_outside(
    tmp_path: Path, workspace: Path, flip: Callable[[str], Flipper], path: str
) -> None:
    tools = host(workspace)
    tools.always_allowed.add("write_file")
    written = 0
    with flip(path.split("/")[0]) as flipper:
        for n in range(ATTEMPTS):
            result = await call(tools, "write_file", path=path, content=f"WRITTEN {n}\n")
            assert (tmp_path / "outside" / path).read_text() == "SECRET\n", (flipper.flips, n)
            shown = json.dumps([c.model_dump() for c in result.content])
            assert "SECRET" not in shown  # nor is it read for the diff the editor shows
            written += result.ok
    assert flipper.flips > 0 and written > 0
    assert [p.read_text() for p in (tmp_path / "outside").rglob("*.txt")] == ["SECRET\n"] * 3


async def test_a_swapped_in_symlink_never_lists_or_searches_outside(
    workspace: Path, flip: Callable[[str], Flipper]
) -> None:
    tools = host(workspace)
    with flip("d") as dirs, flip("secret.txt") as files:
        for _ in range(ATTEMPTS // 2):
            listing = await call(tools, "list_files", recursive=True)
            assert "outside_only" not in listing.text, (dirs.flips, listing.text)
            found = await call(tools, "search_files", query="SECRET")
            assert "SECRET\n" not in found.text and ": SECRET" not in found.text, found.text
    assert dirs.flips > 0 and files.flips > 0
