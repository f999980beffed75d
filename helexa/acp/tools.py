"""The agent's tools: read, write, edit, list, search files, run commands, keep a plan.

Files go through the editor when it offers ``fs/read_text_file`` / ``fs/write_text_file``
(so the model sees unsaved buffers and edits land in them) and commands through its
``terminal/*`` methods (so the user watches them run); otherwise local implementations do
the same job. Writes, edits and commands first ask ``session/request_permission``; a refusal
becomes the tool's result and the model carries on. Every path must stay inside the
session's working directory: :class:`Workspace` walks it from the root itself, following
only links that stay inside, and the local tools read and write the file that walk opened,
so a link swapped in after the check cannot redirect them. (The editor opens the checked
path by name, which is its own business.) What the OS refuses (a name too long, a link
loop, no permission) fails that one call with the reason, never the turn.

``update_plan`` touches nothing: the model sends its whole to-do list each time (as with
Codex's ``update_plan`` and Claude Code's ``TodoWrite``) and the editor gets it as a
``plan`` session update, which replaces the plan it shows.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import re
import signal
import stat
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from acp import (
    RequestError,
    plan_entry,
    text_block,
    tool_content,
    tool_diff_content,
    tool_terminal_ref,
    update_plan,
)
from acp.interfaces import Client
from acp.schema import (
    AgentPlanUpdate,
    AllowedOutcome,
    ClientCapabilities,
    ContentToolCallContent,
    FileEditToolCallContent,
    PermissionOption,
    PlanEntryPriority,
    PlanEntryStatus,
    TerminalToolCallContent,
    ToolCallLocation,
    ToolCallUpdate,
    ToolKind,
)
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from helexa.acp.providers.base import Cancelled, ToolCall, ToolSpec, race_cancel
from helexa.acp.providers.decoder import text_field

ToolContent = ContentToolCallContent | FileEditToolCallContent | TerminalToolCallContent
Progress = Callable[[list[ToolContent]], Awaitable[None]]

MAX_OUTPUT_CHARS = 60_000
MAX_LIST_ENTRIES = 1_000
MAX_MATCHES = 200
MAX_SEARCH_FILE_BYTES = 2 * 1024 * 1024
SKIP_DIRS = frozenset(
    {".git", ".hg", ".svn", "node_modules", "__pycache__", ".venv", "venv", ".mypy_cache",
     ".pytest_cache", ".ruff_cache", ".tox", "target", "dist", "build"}
)  # fmt: skip

PERMISSION_OPTIONS = [
    PermissionOption(option_id="allow_once", name="Allow", kind="allow_once"),
    PermissionOption(option_id="allow_always", name="Always allow", kind="allow_always"),
    PermissionOption(option_id="reject_once", name="Reject", kind="reject_once"),
]


class ToolError(Exception):
    """Why a tool call failed, worded for the model (it reads this and adapts)."""


# -- the workspace -------------------------------------------------------------------------

# Directories are opened one component at a time, never letting the kernel follow a link.
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: a FIFO in the tree opens at once (and is then refused) instead of hanging.
READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
WRITE = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
MAX_HOPS = 40  # symlinks followed (and races retried) in one path, as the kernel's limit


def os_reason(exc: OSError) -> str:
    """An OS refusal as the model reads it: the C library's words and the errno's name."""
    text = exc.strerror or str(exc)
    name = errno.errorcode.get(exc.errno or 0)
    return text[:1].lower() + text[1:] + (f" ({name})" if name else "")


def _os_error(code: int, path: str) -> OSError:
    return OSError(code, os.strerror(code), path)


def _fitting(name: str, dir_fd: int, path: str) -> str:
    """``name``, if the file system holding ``dir_fd`` could create it: a path's missing
    tail is refused here, before the editor is sent it or a parent is made for it."""
    try:
        limit = os.fpathconf(dir_fd, "PC_NAME_MAX")
    except OSError:
        limit = 255
    if len(os.fsencode(name)) > limit:
        raise _os_error(errno.ENAMETOOLONG, path)
    return name


def _readlink(name: str, dir_fd: int) -> str | None:
    """The link's target, or None where ``name`` is not a link (or not there)."""
    try:
        return os.readlink(name, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.ENOENT):
            return None
        raise


class Workspace:
    """The session's cwd: the only tree the tools may touch.

    A path is walked here, component by component, from a descriptor of the root: each
    directory is opened relative to its parent with ``O_NOFOLLOW`` and each symlink is read
    and followed by this code, not the kernel, so where the walk ends is inside the root by
    construction (``..`` too is taken by the walk, not the kernel). The file a tool reads or writes is the
    one the walk opened, so a link swapped in after a check changes nothing: there is no
    check apart from the open. Links that stay inside work wherever they sit.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()
        self._bases = [self.root, Path(os.path.abspath(root))]

    def resolve(self, path: str) -> Path:
        """The real path of ``path`` (relative to the root, or absolute inside it): ``..``
        collapsed and inside links followed; a missing tail (a file to create) is kept as
        written. ToolError when it leaves the workspace, OSError when the OS refuses it."""
        names, _ = self._walk(path, None)
        return self.root.joinpath(*names)

    def relative(self, path: Path) -> str:
        return str(path.relative_to(self.root)) if path != self.root else "."

    def open(self, path: str | Path, flags: int, make_parents: bool = False) -> int:
        """A descriptor of ``path`` opened with ``flags`` (READ, WRITE), by the walk."""
        _, fd = self._walk(str(path), flags, make_parents)
        assert fd is not None
        return fd

    def read_text(self, path: str | Path) -> str:
        fd = _regular(self.open(path, READ), str(path))
        with os.fdopen(fd, encoding="utf-8", errors="replace") as f:
            return f.read()

    def write_text(self, path: str | Path, content: str) -> None:
        """Writes in place (the file keeps its mode and links), making missing parents."""
        fd = _regular(self.open(path, WRITE, make_parents=True), str(path))
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(content)

    def walk(self, fd: int, names: list[str], recursive: bool) -> Iterator[Entry]:
        """Entries of the open directory ``fd`` (at ``names``) in a stable order, skipping
        VCS/build dirs and never descending through symlinks: a subdirectory is opened from
        its parent's descriptor with ``O_NOFOLLOW``, so one swapped for a link is skipped."""
        with os.scandir(fd) as it:
            entries = sorted(it, key=lambda e: e.name)
        for entry in entries:
            if entry.name in SKIP_DIRS and _is_dir(entry, follow=True):
                continue
            yield Entry([*names, entry.name], entry, fd)
            if recursive and _is_dir(entry, follow=False):
                try:
                    sub = os.open(entry.name, _DIR, dir_fd=fd)
                except OSError:
                    continue  # gone, or a link by now
                try:
                    yield from self.walk(sub, [*names, entry.name], recursive)
                finally:
                    os.close(sub)

    def _parts(self, path: str, asked: str) -> list[str]:
        """``path``'s components below the root (``..`` left for the walk to take)."""
        candidate = Path(path)
        if not candidate.is_absolute():
            return list(candidate.parts)
        for base in self._bases:
            if candidate.parts[: len(base.parts)] == base.parts:
                return list(candidate.parts[len(base.parts) :])
        # An absolute path reaching the workspace through a link elsewhere (a symlinked
        # home): where it lands only names the place; the walk from the root still opens it.
        try:
            real = Path(os.path.realpath(candidate))
        except (OSError, ValueError):
            real = candidate
        if real == self.root or self.root in real.parents:
            return list(real.relative_to(self.root).parts)
        raise ToolError(f"{asked!r} is outside the workspace {self.root}; access denied")

    def _walk(
        self, path: str, flags: int | None, make_parents: bool = False
    ) -> tuple[list[str], int | None]:
        """Walk ``path`` from the root: its real components, and with ``flags`` its leaf
        opened with them (without, a missing component and what follows stay as written,
        and the leaf is not opened). ``names[i]`` is the directory ``fds[i + 1]`` holds,
        while the walk is on disk; past a missing component it goes on lexically."""
        if not path or "\0" in path:
            raise ToolError("a non-empty path is required")
        todo = self._parts(path, path)[::-1]  # the next component last
        names: list[str] = []
        fds = [os.open(self.root, _DIR)]
        hops = 0
        try:
            while todo:
                name = todo.pop()
                on_disk = len(names) == len(fds) - 1
                if name == "..":
                    if not names:  # above the root, maybe to come back in (../ws/x)
                        hops += 1
                        rest = self.root.parent.joinpath(*reversed(todo))
                        todo = self._parts(str(rest), path)[::-1]
                    else:
                        names.pop()
                        if len(fds) > len(names) + 1:
                            os.close(fds.pop())
                    continue
                if not on_disk:
                    names.append(_fitting(name, fds[-1], path))
                    continue
                if hops > MAX_HOPS:
                    raise _os_error(errno.ELOOP, path)
                target = _readlink(name, fds[-1])
                if target is not None:
                    hops += 1
                    if os.path.isabs(target):  # from the root again
                        while len(fds) > 1:
                            os.close(fds.pop())
                        names.clear()
                    todo.extend(reversed(self._parts(target, path)))
                    continue
                leaf = not todo
                if leaf and flags is None:
                    names.append(name)
                    break
                try:
                    fd = os.open(name, flags if leaf and flags else _DIR, 0o666, dir_fd=fds[-1])
                except OSError as exc:
                    if exc.errno in (errno.ELOOP, errno.ENOTDIR) and _readlink(name, fds[-1]):
                        hops += 1  # it became a link since it was read: walk it again
                        todo.append(name)
                        continue
                    if exc.errno != errno.ENOENT or leaf:
                        raise
                    if make_parents:
                        with contextlib.suppress(FileExistsError):
                            os.mkdir(name, dir_fd=fds[-1])
                        hops += 1
                        todo.append(name)
                        continue
                    if flags is not None:
                        raise
                    names.append(_fitting(name, fds[-1], path))  # missing: the rest is a name
                    continue
                if leaf:
                    return names + [name], fd
                fds.append(fd)
                names.append(name)
            if flags is None:
                return names, None
            if flags & (os.O_WRONLY | os.O_RDWR):
                raise _os_error(errno.EISDIR, path)
            return names, os.dup(fds[-1])  # the path named a directory (".", "sub/..")
        finally:
            for held in fds:
                os.close(held)


@dataclass(frozen=True)
class Entry:
    """One entry a walk met: its components below the root, and the directory holding it."""

    names: list[str]
    dirent: os.DirEntry[str]
    dir_fd: int

    @property
    def rel(self) -> str:
        return "/".join(self.names)


def _is_dir(entry: os.DirEntry[str], follow: bool) -> bool:
    try:
        return entry.is_dir(follow_symlinks=follow)
    except OSError:
        return False  # a loop, say: not a directory to skip or enter


R = TypeVar("R")


async def _local(verb: str, rel: str, work: Callable[..., R], *args: Any) -> R:
    """``work(*args)`` on a worker thread (the walk and the I/O block), what the OS refuses
    worded as ``cannot <verb> <rel>: why``."""
    try:
        return await asyncio.to_thread(work, *args)
    except OSError as exc:
        raise ToolError(f"cannot {verb} {rel}: {os_reason(exc)}") from None


def _shown(path: str) -> str:
    """A path for a message: one of 300 bytes, say, shortened."""
    return path if len(path) <= 100 else f"{path[:60]}...{path[-30:]}"


def _small_file(fd: int) -> bytes | None:
    """The bytes of the open ``fd`` (closed here) if it is a regular file small enough to
    search, else None."""
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_SEARCH_FILE_BYTES:
        os.close(fd)
        return None
    with os.fdopen(fd, "rb") as f:
        data = f.read(MAX_SEARCH_FILE_BYTES + 1)
    return data if len(data) <= MAX_SEARCH_FILE_BYTES else None


def _regular(fd: int, path: str) -> int:
    """``fd`` if it holds a regular file; else it is closed and the OSError says why."""
    mode = os.fstat(fd).st_mode
    if stat.S_ISREG(mode):
        return fd
    os.close(fd)
    if stat.S_ISDIR(mode):
        raise _os_error(errno.EISDIR, path)
    raise OSError(errno.EINVAL, "not a regular file", path)


# -- arguments -----------------------------------------------------------------------------


class _Args(BaseModel):
    model_config = ConfigDict(extra="ignore")


PathField = Field(description="Path relative to the workspace root")


class ReadFileArgs(_Args):
    path: str = PathField
    offset: int | None = Field(None, ge=1, description="First line to read (1-based)")
    limit: int | None = Field(None, ge=1, description="Maximum number of lines to read")


class WriteFileArgs(_Args):
    path: str = PathField
    content: str = Field(description="The complete new file content")


class EditFileArgs(_Args):
    path: str = PathField
    old_string: str = Field(min_length=1, description="Exact text to replace; must be unique")
    new_string: str = Field(description="Replacement text")
    replace_all: bool = Field(False, description="Replace every occurrence")


class ListFilesArgs(_Args):
    path: str = Field(".", description="Directory relative to the workspace root")
    recursive: bool = Field(False, description="Include subdirectories")


class SearchFilesArgs(_Args):
    query: str = Field(min_length=1, description="Text (or regular expression) to find")
    path: str = Field(".", description="Directory or file to search")
    regex: bool = Field(False, description="Treat query as a Python regular expression")


class RunCommandArgs(_Args):
    command: str = Field(min_length=1, description="Shell command, run in the workspace root")
    timeout_s: float = Field(120.0, gt=0, le=3600, description="Kill it after this many seconds")


class PlanEntryArgs(_Args):
    content: str = Field(min_length=1, description="The step, in a short imperative sentence")
    priority: PlanEntryPriority = Field("medium", description="high, medium or low")
    status: PlanEntryStatus = Field("pending", description="pending, in_progress or completed")


class UpdatePlanArgs(_Args):
    entries: list[PlanEntryArgs] = Field(
        description="Every step of the plan, in order (not just the changed ones); it "
        "replaces the previous plan, and an empty list clears it"
    )


A = TypeVar("A", bound=_Args)
Run = Callable[["ToolHost", A, ToolCall, asyncio.Event, Progress], Awaitable["ToolResult"]]


# What a call's editor title names after the verb; arguments are unvalidated here.


def _path_subject(args: dict[str, Any]) -> str:
    return text_field(args, "path")


def _search_subject(args: dict[str, Any]) -> str:
    path = _path_subject(args)
    query = args.get("query")
    return f"{query!r} in {path or '.'}" if isinstance(query, str) else path


def _command_subject(args: dict[str, Any]) -> str:
    return f"`{text_field(args, 'command')}`"


@dataclass(frozen=True)
class Tool(Generic[A]):
    """One tool: what the model is told of it, how the editor shows a call, and its ``run``
    (a :class:`ToolHost` method, given the parsed ``args``).

    The editor's title is ``verb`` and the ``subject`` read from the call's arguments;
    ``located`` calls point the editor at their ``path``. ``shown`` False: the editor sees
    the call's effect (the plan) instead of a tool-call card, which for a to-do list would
    only repeat it.
    """

    name: str
    description: str
    args: type[A]
    kind: ToolKind
    verb: str
    run: Run[A]
    needs_permission: bool = False
    shown: bool = True
    subject: Callable[[dict[str, Any]], str] = _path_subject
    located: bool = True

    def title(self, args: dict[str, Any]) -> str:
        return f"{self.verb} {self.subject(args)}".strip()


def _strip_titles(schema: Any) -> Any:
    """pydantic titles every property; the model needs descriptions, not noise."""
    if isinstance(schema, dict):
        return {k: _strip_titles(v) for k, v in schema.items() if k != "title"}
    if isinstance(schema, list):
        return [_strip_titles(v) for v in schema]
    return schema


def _inline_refs(schema: Any, defs: dict[str, Any]) -> Any:
    """Nested models become ``$ref``s into ``$defs``; not every server's tool-call grammar
    follows those, so each is replaced by the definition it names."""
    if isinstance(schema, dict):
        ref = schema.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            return _inline_refs(defs[ref.removeprefix("#/$defs/")], defs)
        return {k: _inline_refs(v, defs) for k, v in schema.items() if k != "$defs"}
    if isinstance(schema, list):
        return [_inline_refs(v, defs) for v in schema]
    return schema


def tool_schema(args: type[_Args]) -> dict[str, Any]:
    """The arguments' JSON schema as a model should see it: self-contained, untitled."""
    schema = args.model_json_schema()
    return _strip_titles(_inline_refs(schema, schema.get("$defs", {})))


def parse_args(tool: Tool[A], arguments: str) -> A:
    try:
        raw = json.loads(arguments or "{}")
    except ValueError:
        raise ToolError(f"{tool.name}: arguments are not valid JSON: {arguments[:200]!r}") from None
    if not isinstance(raw, dict):
        raise ToolError(f"{tool.name}: arguments must be a JSON object")
    try:
        return tool.args.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "arguments"
        raise ToolError(f"{tool.name}: {where}: {err['msg']}") from None


def plan_from(args: UpdatePlanArgs) -> AgentPlanUpdate:
    return update_plan(
        plan_entry(e.content, priority=e.priority, status=e.status) for e in args.entries
    )


def plan_update(arguments: str) -> AgentPlanUpdate:
    """A recorded ``update_plan`` call as the ``plan`` update it sent (ToolError if its
    arguments do not parse), so a loaded session shows the plan it left off with."""
    args = parse_args(TOOLS["update_plan"], arguments)
    assert isinstance(args, UpdatePlanArgs)
    return plan_from(args)


def plan_summary(update: AgentPlanUpdate) -> str:
    """The model's confirmation: short, but enough to notice a step it lost."""
    if not update.entries:
        return "Plan cleared."
    counts = {s: sum(e.status == s for e in update.entries) for s in ("completed", "in_progress")}
    pending = len(update.entries) - sum(counts.values())
    return (
        f"Plan updated: {len(update.entries)} steps ({counts['completed']} completed, "
        f"{counts['in_progress']} in progress, {pending} pending)."
    )


def truncate(text: str, limit: int = MAX_OUTPUT_CHARS) -> str:
    if len(text) <= limit:
        return text
    return text[:limit] + f"\n[... truncated: {len(text)} characters in total]"


# -- running tools -------------------------------------------------------------------------


@dataclass(frozen=True)
class ClientCaps:
    read: bool = False
    write: bool = False
    terminal: bool = False

    @classmethod
    def from_acp(cls, caps: ClientCapabilities | None) -> ClientCaps:
        if caps is None:
            return cls()
        fs = caps.fs
        return cls(
            read=bool(fs and fs.read_text_file),
            write=bool(fs and fs.write_text_file),
            terminal=bool(caps.terminal),
        )


@dataclass
class ToolResult:
    text: str  # what the model reads
    ok: bool = True
    content: list[ToolContent] = field(default_factory=list)  # what the editor shows

    def editor_content(self) -> list[ToolContent]:
        return self.content or [tool_content(text_block(truncate(self.text, 4_000)))]


@dataclass(frozen=True)
class Description:
    title: str
    kind: ToolKind
    locations: list[ToolCallLocation]
    raw_input: Any


@dataclass(eq=False)  # a live object, not a value: compared by identity
class ToolHost:
    """One session's tools, bound to the editor connection and the session's workspace."""

    client: Client
    session_id: str
    workspace: Workspace
    caps: ClientCaps
    always_allowed: set[str]

    def describe(self, name: str, arguments: str) -> Description:
        """Title, kind and location for the editor; never fails (bad args show as raw)."""
        tool = TOOLS.get(name)
        try:
            raw = json.loads(arguments or "{}")
        except ValueError:
            raw = arguments
        if tool is None:
            return Description(name, "other", [], raw)
        args = raw if isinstance(raw, dict) else {}
        locations: list[ToolCallLocation] = []
        if tool.located and isinstance(args.get("path"), str):
            with contextlib.suppress(ToolError, OSError):
                locations = [ToolCallLocation(path=str(self.workspace.resolve(args["path"])))]
        return Description(tool.title(args), tool.kind, locations, raw)

    async def run(self, call: ToolCall, cancel: asyncio.Event, progress: Progress) -> ToolResult:
        """Run one call; a ToolError becomes a failed result, and so does whatever the OS
        refuses that a tool did not word itself; Cancelled propagates."""
        tool = TOOLS.get(call.name)
        if tool is None:
            known = ", ".join(TOOLS)
            return ToolResult(f"unknown tool {call.name!r}; available: {known}", ok=False)
        try:
            return await tool.run(self, parse_args(tool, call.arguments), call, cancel, progress)
        except ToolError as exc:
            return ToolResult(str(exc), ok=False)
        except OSError as exc:
            return ToolResult(f"{call.name} failed: {os_reason(exc)}", ok=False)

    # -- permission ------------------------------------------------------------------------

    async def _permitted(
        self, call: ToolCall, content: list[ToolContent], cancel: asyncio.Event
    ) -> bool:
        if call.name in self.always_allowed:
            return True
        info = self.describe(call.name, call.arguments)
        update = ToolCallUpdate(
            tool_call_id=call.id,
            title=info.title,
            kind=info.kind,
            status="pending",
            content=content or None,
            locations=info.locations or None,
            raw_input=info.raw_input,
        )
        response = await race_cancel(
            self.client.request_permission(
                session_id=self.session_id, tool_call=update, options=PERMISSION_OPTIONS
            ),
            cancel,
        )
        outcome = response.outcome
        if not isinstance(outcome, AllowedOutcome):
            return False
        if outcome.option_id == "allow_always":
            self.always_allowed.add(call.name)
        return outcome.option_id in ("allow_once", "allow_always")

    # -- files -----------------------------------------------------------------------------

    def _resolve(self, path: str, verb: str) -> Path:
        try:
            return self.workspace.resolve(path)
        except OSError as exc:
            raise ToolError(f"cannot {verb} {_shown(path)}: {os_reason(exc)}") from None

    async def _read_text(
        self, path: Path, cancel: asyncio.Event, line: int | None = None, limit: int | None = None
    ) -> str:
        rel = self.workspace.relative(path)
        if self.caps.read:
            try:
                response = await race_cancel(
                    self.client.read_text_file(
                        session_id=self.session_id, path=str(path), line=line, limit=limit
                    ),
                    cancel,
                )
            except RequestError as exc:
                raise ToolError(f"cannot read {rel}: {exc}") from None
            return response.content
        text = await _local("read", rel, self.workspace.read_text, path)
        if line is None and limit is None:
            return text
        lines = text.splitlines(keepends=True)
        start = (line or 1) - 1
        return "".join(lines[start : start + limit if limit else None])

    async def _existing_text(self, path: Path, cancel: asyncio.Event) -> str | None:
        if self.caps.read:
            try:
                exists = path.is_file()
            except OSError:
                exists = False
            if not exists:
                return None  # a new file: nothing to diff against
        try:
            return await self._read_text(path, cancel)
        except ToolError:
            return None

    async def _write_text(self, path: Path, content: str, cancel: asyncio.Event) -> None:
        rel = self.workspace.relative(path)
        if self.caps.write:
            try:
                await race_cancel(
                    self.client.write_text_file(
                        session_id=self.session_id, path=str(path), content=content
                    ),
                    cancel,
                )
            except RequestError as exc:
                raise ToolError(f"cannot write {rel}: {exc}") from None
            return
        await _local("write", rel, self.workspace.write_text, path, content)

    async def _read_file(
        self, args: ReadFileArgs, call: ToolCall, cancel: asyncio.Event, progress: Progress
    ) -> ToolResult:
        path = self._resolve(args.path, "read")
        text = await self._read_text(path, cancel, args.offset, args.limit)
        return ToolResult(truncate(text) if text else f"({self.workspace.relative(path)} is empty)")

    async def _write_file(
        self, args: WriteFileArgs, call: ToolCall, cancel: asyncio.Event, progress: Progress
    ) -> ToolResult:
        path = self._resolve(args.path, "write")
        rel = self.workspace.relative(path)
        old = await self._existing_text(path, cancel)
        done = f"Wrote {len(args.content)} characters to {rel}."
        return await self._change(call, path, args.content, old, cancel, done, "written")

    async def _edit_file(
        self, args: EditFileArgs, call: ToolCall, cancel: asyncio.Event, progress: Progress
    ) -> ToolResult:
        path = self._resolve(args.path, "edit")
        rel = self.workspace.relative(path)
        old = await self._read_text(path, cancel)
        count = old.count(args.old_string)
        if count == 0:
            raise ToolError(f"old_string was not found in {rel}; read the file and retry")
        if count > 1 and not args.replace_all:
            raise ToolError(
                f"old_string appears {count} times in {rel}; add context to make it unique "
                "or set replace_all"
            )
        new = old.replace(args.old_string, args.new_string, -1 if args.replace_all else 1)
        done = f"Replaced {count if args.replace_all else 1} occurrence(s) in {rel}."
        return await self._change(call, path, new, old, cancel, done, "changed")

    async def _change(
        self,
        call: ToolCall,
        path: Path,
        new: str,
        old: str | None,
        cancel: asyncio.Event,
        done: str,
        verb: str,
    ) -> ToolResult:
        """Show the change as a diff, ask, then write it: write_file and edit_file differ
        only in how they arrive at the new text. ``done`` is the model's result; ``verb``
        says what a refusal left undone to ``path``."""
        diff: list[ToolContent] = [tool_diff_content(str(path), new, old)]
        if not await self._permitted(call, diff, cancel):
            rel = self.workspace.relative(path)
            return ToolResult(f"The user denied permission; {rel} was not {verb}.", False, diff)
        await self._write_text(path, new, cancel)
        return ToolResult(done, content=diff)

    async def _list_files(
        self, args: ListFilesArgs, call: ToolCall, cancel: asyncio.Event, progress: Progress
    ) -> ToolResult:
        top = self._resolve(args.path, "list")
        rel = self.workspace.relative(top)

        def listing() -> str:
            fd = self.workspace.open(top, READ)
            try:
                if not stat.S_ISDIR(os.fstat(fd).st_mode):
                    raise ToolError(f"{rel} is not a directory")
                lines: list[str] = []
                for entry in self.workspace.walk(fd, self._names(top), args.recursive):
                    if len(lines) == MAX_LIST_ENTRIES:
                        lines.append(f"[... stopped after {MAX_LIST_ENTRIES} entries]")
                        break
                    lines.append(entry.rel + "/" if _is_dir(entry.dirent, False) else entry.rel)
                return "\n".join(lines) or "(empty directory)"
            finally:
                os.close(fd)

        return ToolResult(await _local("list", rel, listing))

    async def _search_files(
        self, args: SearchFilesArgs, call: ToolCall, cancel: asyncio.Event, progress: Progress
    ) -> ToolResult:
        top = self._resolve(args.path, "search")
        try:
            pattern = re.compile(args.query if args.regex else re.escape(args.query))
        except re.error as exc:
            raise ToolError(f"invalid regular expression: {exc}") from None

        def search() -> str:
            found: list[str] = []
            for rel, data in self._files(top):
                if b"\0" in data[:8192]:
                    continue  # binary
                for n, line in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
                    if pattern.search(line):
                        found.append(f"{rel}:{n}: {line.strip()[:300]}")
                        if len(found) == MAX_MATCHES:
                            return "\n".join([*found, f"[... stopped at {MAX_MATCHES} matches]"])
            return "\n".join(found) or f"No matches for {args.query!r}."

        return ToolResult(await _local("search", self.workspace.relative(top), search))

    def _names(self, path: Path) -> list[str]:
        return list(path.relative_to(self.workspace.root).parts)

    def _files(self, top: Path) -> Iterator[tuple[str, bytes]]:
        """The text worth searching under ``top`` (or ``top`` itself): each regular file's
        name and bytes, read from the descriptor the walk opened. Links are followed only
        to a target inside; what is gone, too big or not a file is passed over."""
        fd = self.workspace.open(top, READ)
        try:
            mode = os.fstat(fd).st_mode
            if stat.S_ISREG(mode):
                data = _small_file(os.dup(fd))
                if data is not None:
                    yield self.workspace.relative(top), data
            elif stat.S_ISDIR(mode):
                for entry in self.workspace.walk(fd, self._names(top), recursive=True):
                    try:
                        if entry.dirent.is_symlink():
                            found = self.workspace.open(entry.rel, READ)
                        elif entry.dirent.is_file(follow_symlinks=False):
                            found = os.open(entry.dirent.name, READ, dir_fd=entry.dir_fd)
                        else:
                            continue
                    except (OSError, ToolError):
                        continue
                    data = _small_file(found)
                    if data is not None:
                        yield entry.rel, data
        finally:
            os.close(fd)

    # -- the plan --------------------------------------------------------------------------

    async def _update_plan(
        self, args: UpdatePlanArgs, call: ToolCall, cancel: asyncio.Event, progress: Progress
    ) -> ToolResult:
        update = plan_from(args)
        await self.client.session_update(session_id=self.session_id, update=update)
        return ToolResult(plan_summary(update))

    # -- commands --------------------------------------------------------------------------

    async def _run_command(
        self, args: RunCommandArgs, call: ToolCall, cancel: asyncio.Event, progress: Progress
    ) -> ToolResult:
        if not await self._permitted(call, [], cancel):
            return ToolResult("The user denied permission; the command was not run.", ok=False)
        if self.caps.terminal:
            return await self._run_in_terminal(args, cancel, progress)
        return await self._run_locally(args, cancel)

    async def _run_in_terminal(
        self, args: RunCommandArgs, cancel: asyncio.Event, progress: Progress
    ) -> ToolResult:
        sid = self.session_id
        created = await race_cancel(
            self.client.create_terminal(
                session_id=sid,
                command="/bin/sh",
                args=["-c", args.command],
                cwd=str(self.workspace.root),
                output_byte_limit=MAX_OUTPUT_CHARS,
            ),
            cancel,
        )
        tid = created.terminal_id
        content: list[ToolContent] = [tool_terminal_ref(tid)]
        try:
            await progress(content)
            status = "timed out"
            try:
                exit_ = await asyncio.wait_for(
                    race_cancel(
                        self.client.wait_for_terminal_exit(session_id=sid, terminal_id=tid),
                        cancel,
                    ),
                    args.timeout_s,
                )
                status = _exit_text(exit_.exit_code, exit_.signal)
            except TimeoutError:
                await self.client.kill_terminal(session_id=sid, terminal_id=tid)
            except Cancelled:
                await self.client.kill_terminal(session_id=sid, terminal_id=tid)
                raise
            output = await self.client.terminal_output(session_id=sid, terminal_id=tid)
        finally:
            with contextlib.suppress(Exception):
                await self.client.release_terminal(session_id=sid, terminal_id=tid)
        text = f"{status}\n{output.output}" + ("\n[output truncated]" if output.truncated else "")
        return ToolResult(text, ok=status == "exit code 0", content=content)

    async def _run_locally(self, args: RunCommandArgs, cancel: asyncio.Event) -> ToolResult:
        proc = await asyncio.create_subprocess_shell(
            args.command,
            cwd=self.workspace.root,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,  # its own process group, so we can end all of it
        )
        stdout = proc.stdout
        assert stdout is not None
        output = bytearray()

        async def pump() -> None:
            while chunk := await stdout.read(65536):
                output.extend(chunk)

        reader = asyncio.ensure_future(pump())
        status = f"timed out after {args.timeout_s:g}s and was killed"
        try:
            await asyncio.wait_for(race_cancel(proc.wait(), cancel), args.timeout_s)
            status = _exit_text(proc.returncode, None)
        except TimeoutError:
            pass
        finally:
            # Also ends children it left behind holding our pipe open.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(reader, 5)
            reader.cancel()
        text = output.decode("utf-8", "replace")
        if len(text) > MAX_OUTPUT_CHARS:
            text = (
                f"[... {len(text) - MAX_OUTPUT_CHARS} characters cut]\n" + text[-MAX_OUTPUT_CHARS:]
            )
        return ToolResult(f"{status}\n{text}", ok=proc.returncode == 0)


# -- the tools -----------------------------------------------------------------------------


TOOLS: dict[str, Tool[Any]] = {
    t.name: t
    for t in [
        Tool(
            "read_file",
            "Read a text file from the workspace.",
            ReadFileArgs,
            "read",
            "Read",
            ToolHost._read_file,
        ),
        Tool(
            "write_file",
            "Create or overwrite a file with the given content.",
            WriteFileArgs,
            "edit",
            "Write",
            ToolHost._write_file,
            needs_permission=True,
        ),
        Tool(
            "edit_file",
            "Replace an exact string in a file (read it first; old_string must match once).",
            EditFileArgs,
            "edit",
            "Edit",
            ToolHost._edit_file,
            needs_permission=True,
        ),
        Tool(
            "list_files",
            "List a directory of the workspace.",
            ListFilesArgs,
            "search",
            "List",
            ToolHost._list_files,
        ),
        Tool(
            "search_files",
            "Search file contents for text or a regex; prints path:line: text.",
            SearchFilesArgs,
            "search",
            "Search",
            ToolHost._search_files,
            subject=_search_subject,
        ),
        Tool(
            "run_command",
            "Run a shell command in the workspace root and return its output and exit code.",
            RunCommandArgs,
            "execute",
            "Run",
            ToolHost._run_command,
            needs_permission=True,
            subject=_command_subject,
            located=False,
        ),
        Tool(
            "update_plan",
            "Show the user your plan for a task of several steps, and keep it current: send "
            "the whole list each time, with one step in_progress while you work on it and "
            "each step completed once it is done.",
            UpdatePlanArgs,
            "think",
            "Update plan",
            ToolHost._update_plan,
            shown=False,
            located=False,
        ),
    ]
}
TOOL_SPECS = [ToolSpec(t.name, t.description, tool_schema(t.args)) for t in TOOLS.values()]


def is_shown(name: str) -> bool:
    """Whether the editor sees this call as a tool call (unknown tools are, as failures)."""
    tool = TOOLS.get(name)
    return tool is None or tool.shown


def _exit_text(code: int | None, sig: str | None) -> str:
    if code is not None and code >= 0:
        return f"exit code {code}"
    if code is not None:
        return f"killed by signal {-code}"
    return f"killed by signal {sig}" if sig else "exited"
