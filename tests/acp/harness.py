"""Test doubles for the ACP agent's two neighbours: a scripted model server and an editor.

``Upstream`` is a real aiohttp server on 127.0.0.1 that answers each request with the next
scripted :class:`Turn`, in whichever wire API the request came in (OpenAI chat SSE, Responses
SSE, Anthropic SSE). The Responses and Anthropic streams are produced by helexa's own
gateway translators from the same OpenAI chunks, so one script drives all three dialects.

``Editor`` is the client side of ACP: it records every ``session/update``, answers
permission requests as told, and serves ``fs/*`` and ``terminal/*`` from the real disk.
``tool_results`` and its neighbours read a recorded request whatever its dialect, and
``prompt_once`` is the common test body: one agent process, one session, one prompt.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from acp import PROTOCOL_VERSION, spawn_agent_process, text_block
from acp.core import ClientSideConnection
from acp.schema import (
    AgentMessageChunk,
    AllowedOutcome,
    ClientCapabilities,
    CreateTerminalResponse,
    DeniedOutcome,
    FileSystemCapabilities,
    InitializeResponse,
    KillTerminalResponse,
    ReadTextFileResponse,
    ReleaseTerminalResponse,
    RequestPermissionResponse,
    TerminalOutputResponse,
    ToolCallProgress,
    ToolCallStart,
    WaitForTerminalExitResponse,
    WriteTextFileResponse,
)
from aiohttp import web

from helexa.wire.anthropic.stream import AnthropicStreamTranslator
from helexa.wire.responses.stream import ResponsesStreamTranslator
from helexa.wire.sse import SSE_DONE, sse, sse_events

WIRE_APIS = ["openai-chat", "openai-responses", "anthropic-messages"]
PATHS = {
    "/v1/chat/completions": "openai-chat",
    "/v1/responses": "openai-responses",
    "/v1/messages": "anthropic-messages",
}
WAIT_S = 30.0  # a ceiling for awaits that should finish at once, not a synchronisation


# -- the scripted model server -------------------------------------------------------------


@dataclass
class Call:
    id: str
    name: str
    arguments: dict[str, Any]
    pieces: int = 3  # stream the JSON in this many fragments


@dataclass
class Turn:
    """One scripted model answer. ``block`` holds the stream open after the content until
    the client goes away (that is how a test observes cancellation reaching upstream)."""

    text: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    calls: list[Call] = field(default_factory=list)
    finish_reason: str | None = None
    block: bool = False

    def chunks(self, model: str) -> list[dict[str, Any]]:
        def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
            return {
                "id": "chatcmpl-scripted",
                "object": "chat.completion.chunk",
                "created": 1_700_000_000,
                "model": model,
                "choices": [choice],
            }

        out = [chunk({"role": "assistant", "content": ""})]
        out += [chunk({"reasoning_content": r}) for r in self.reasoning]
        out += [chunk({"content": t}) for t in self.text]
        for n, call in enumerate(self.calls):
            text = json.dumps(call.arguments)
            step = max(1, -(-len(text) // call.pieces))
            first = {"index": n, "id": call.id, "type": "function"}
            out.append(chunk({"tool_calls": [{**first, "function": {"name": call.name}}]}))
            for i in range(0, len(text), step):
                piece = {"index": n, "function": {"arguments": text[i : i + step]}}
                out.append(chunk({"tool_calls": [piece]}))
        if self.block:
            return out
        finish = self.finish_reason or ("tool_calls" if self.calls else "stop")
        out.append(chunk({}, finish))
        usage = {"prompt_tokens": 10, "completion_tokens": len(out), "total_tokens": 10 + len(out)}
        out.append({**chunk({}), "choices": [], "usage": usage})
        return out


@dataclass
class Recorded:
    wire_api: str
    body: dict[str, Any]
    headers: dict[str, str]


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


class Upstream:
    """``context`` gives models a ``context_length`` in the listing (as helexa's gateway
    does); ``listing_status`` other than 200 makes ``GET /v1/models`` fail."""

    def __init__(
        self,
        turns: list[Turn] | None = None,
        models: list[str] | None = None,
        context: dict[str, int | None] | None = None,
        listing_status: int = 200,
    ) -> None:
        self.turns = list(turns or [])
        self.models = models or ["scripted"]
        self.context = context or {}
        self.listing_status = listing_status
        self.listings: list[dict[str, str]] = []  # headers of each GET /v1/models
        self.requests: list[Recorded] = []
        self.streaming = asyncio.Event()  # a blocking turn has sent its content
        self.disconnected = asyncio.Event()  # ... and its client has hung up
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def start(self) -> Upstream:
        app = web.Application()
        for path in PATHS:
            app.router.add_post(path, self._generate)
        app.router.add_get("/v1/models", self._models)
        # handler_cancellation: a client hanging up cancels the handler, which we observe.
        self._runner = web.AppRunner(app, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _models(self, request: web.Request) -> web.Response:
        self.listings.append(dict(request.headers))
        if self.listing_status != 200:
            error = {"error": {"message": "listing broke"}}
            return web.json_response(error, status=self.listing_status)
        data = [
            {"id": m, **({"context_length": self.context[m]} if m in self.context else {})}
            for m in self.models
        ]
        return web.json_response({"object": "list", "data": data})

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        wire_api = PATHS[request.path]
        body = await request.json()
        self.requests.append(Recorded(wire_api, body, dict(request.headers)))
        if not self.turns:
            return web.json_response({"error": {"message": "no scripted turn left"}}, status=500)
        turn = self.turns.pop(0)
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        for frame in _frames(wire_api, body["model"], turn):
            await resp.write(frame)
        if turn.block:
            self.streaming.set()
            try:
                await asyncio.Event().wait()  # until the client disconnects
            except asyncio.CancelledError:
                self.disconnected.set()
                raise
        await resp.write_eof()
        return resp


def _frames(wire_api: str, model: str, turn: Turn) -> list[bytes]:
    chunks = turn.chunks(model)
    if wire_api == "openai-chat":
        return [sse(c) for c in chunks] + ([] if turn.block else [SSE_DONE])
    translator = (
        ResponsesStreamTranslator(model)
        if wire_api == "openai-responses"
        else AnthropicStreamTranslator(model)
    )
    frames = [sse_events(translator.feed(c)) for c in chunks]
    return frames + ([] if turn.block else [sse_events(translator.finish())])


@asynccontextmanager
async def upstream(turns: list[Turn] | None = None, **kwargs: Any) -> AsyncIterator[Upstream]:
    server = await Upstream(turns, **kwargs).start()
    try:
        yield server
    finally:
        await server.close()


# -- the editor ----------------------------------------------------------------------------


class Editor:
    """An ACP client double with real file and process access."""

    def __init__(self, permission: str = "allow_once", fs: bool = True, terminal: bool = False):
        self.permission = permission  # option id to pick, "cancelled", or "never" (hang)
        self.fs = fs
        self.terminal = terminal
        self.updates: list[Any] = []
        self.permission_requests: list[Any] = []
        self.reads: list[str] = []
        self.writes: list[str] = []
        self._terminals: dict[str, subprocess.Popen[bytes]] = {}
        self._changed = asyncio.Condition()

    def capabilities(self) -> ClientCapabilities:
        fs = FileSystemCapabilities(read_text_file=self.fs, write_text_file=self.fs)
        return ClientCapabilities(fs=fs, terminal=self.terminal)

    async def wait_for(self, predicate: Callable[[Editor], bool]) -> None:
        async def waiting() -> None:
            async with self._changed:
                await self._changed.wait_for(lambda: predicate(self))

        await asyncio.wait_for(waiting(), WAIT_S)

    # what the updates say

    def message_text(self) -> str:
        return "".join(u.content.text for u in self.updates if isinstance(u, AgentMessageChunk))

    def tool_statuses(self, tool_call_id: str) -> list[str]:
        return [
            u.status
            for u in self.updates
            if isinstance(u, ToolCallStart | ToolCallProgress)
            and u.tool_call_id == tool_call_id
            and u.status
        ]

    def final_tool_update(self, tool_call_id: str) -> Any:
        return [
            u
            for u in self.updates
            if isinstance(u, ToolCallStart | ToolCallProgress)
            and u.tool_call_id == tool_call_id
            and u.status in ("completed", "failed")
        ][-1]

    # the Client protocol

    async def session_update(self, session_id: str, update: Any, **kwargs: Any) -> None:
        async with self._changed:
            self.updates.append(update)
            self._changed.notify_all()

    async def request_permission(
        self, session_id: str, tool_call: Any, options: list[Any], **kwargs: Any
    ) -> RequestPermissionResponse:
        async with self._changed:
            self.permission_requests.append(tool_call)
            self._changed.notify_all()
        if self.permission == "never":
            await asyncio.Event().wait()
        if self.permission == "cancelled":
            return RequestPermissionResponse(outcome=DeniedOutcome(outcome="cancelled"))
        assert self.permission in {o.option_id for o in options}, options
        outcome = AllowedOutcome(outcome="selected", option_id=self.permission)
        return RequestPermissionResponse(outcome=outcome)

    async def read_text_file(
        self,
        session_id: str,
        path: str,
        line: int | None = None,
        limit: int | None = None,
        **kwargs: Any,
    ) -> ReadTextFileResponse:
        self.reads.append(path)
        lines = Path(path).read_text().splitlines(keepends=True)
        start = (line or 1) - 1
        return ReadTextFileResponse(
            content="".join(lines[start : start + limit if limit else None])
        )

    async def write_text_file(
        self, session_id: str, path: str, content: str, **kwargs: Any
    ) -> WriteTextFileResponse:
        self.writes.append(path)
        Path(path).write_text(content)
        return WriteTextFileResponse()

    async def create_terminal(
        self,
        session_id: str,
        command: str,
        args: list[str] | None = None,
        env: Any = None,
        cwd: str | None = None,
        output_byte_limit: int | None = None,
        **kwargs: Any,
    ) -> CreateTerminalResponse:
        proc = subprocess.Popen(
            [command, *(args or [])], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        terminal_id = f"term-{len(self._terminals)}"
        self._terminals[terminal_id] = proc
        return CreateTerminalResponse(terminal_id=terminal_id)

    async def wait_for_terminal_exit(
        self, session_id: str, terminal_id: str, **kwargs: Any
    ) -> WaitForTerminalExitResponse:
        code = await asyncio.to_thread(self._terminals[terminal_id].wait)
        return WaitForTerminalExitResponse(exit_code=code)

    async def terminal_output(
        self, session_id: str, terminal_id: str, **kwargs: Any
    ) -> TerminalOutputResponse:
        proc = self._terminals[terminal_id]
        assert proc.stdout is not None
        output = proc.stdout.read().decode()
        return TerminalOutputResponse(output=output, truncated=False)

    async def kill_terminal(
        self, session_id: str, terminal_id: str, **kwargs: Any
    ) -> KillTerminalResponse:
        self._terminals[terminal_id].kill()
        return KillTerminalResponse()

    async def release_terminal(
        self, session_id: str, terminal_id: str, **kwargs: Any
    ) -> ReleaseTerminalResponse:
        proc = self._terminals.pop(terminal_id)
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        return ReleaseTerminalResponse()


# -- the agent process ---------------------------------------------------------------------


def env_for(xdg: dict[str, str], url: str, wire_api: str = "openai-chat") -> dict[str, str]:
    """The env-only configuration: one endpoint, the scripted upstream."""
    return {
        **xdg,
        "HELEXA_ACP_BASE_URL": url,
        "HELEXA_ACP_WIRE_API": wire_api,
        "HELEXA_ACP_MODEL": "scripted",
    }


@asynccontextmanager
async def agent_process(
    editor: Editor, env: dict[str, str], *args: str
) -> AsyncIterator[tuple[ClientSideConnection, InitializeResponse]]:
    """``python -m helexa.cli acp`` over real stdio pipes, initialized as ``editor``.

    stderr is inherited, so pytest shows the agent's log when a test fails.
    """
    async with spawn_agent_process(
        editor,
        sys.executable,
        "-m",
        "helexa.cli",
        "acp",
        *args,
        env=env,
        transport_kwargs={"stderr": None},
    ) as (conn, _process):
        init = await asyncio.wait_for(
            conn.initialize(
                protocol_version=PROTOCOL_VERSION, client_capabilities=editor.capabilities()
            ),
            WAIT_S,
        )
        yield conn, init


async def prompt(conn: ClientSideConnection, session_id: str, text: str) -> Any:
    return await asyncio.wait_for(
        conn.prompt(session_id=session_id, prompt=[text_block(text)]), WAIT_S
    )


async def prompt_once(editor: Editor, env: dict[str, str], cwd: Path, text: str = "hi") -> Any:
    """A fresh agent process, one new session in ``cwd``, one prompt: its response."""
    async with agent_process(editor, env) as (conn, _):
        session = await conn.new_session(cwd=str(cwd))
        return await prompt(conn, session.session_id, text)
