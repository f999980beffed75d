"""``helexa acp``: an Agent Client Protocol agent over stdio, for Zed and other editors.

This is the protocol surface, kept apart from the prompt loop (:mod:`helexa.acp.turn`) so
each ACP method reads as what the editor may ask: ``initialize``, ``session/new``,
``session/load`` (which replays the stored conversation, since the editor shows only what
it is sent), the ``model`` config option and the ``/model endpoint:model`` command,
``session/prompt`` (handed to a :class:`~helexa.acp.turn.Turn`) and ``session/cancel``,
which sets the session's cancel event the running turn races at every await. Sessions
persist as JSON, so ``session/load`` survives restarts. ``update_plan`` calls replay as the
``plan`` update they stood for, not as tool calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import stat
import sys
from pathlib import Path
from typing import Any

import aiohttp
from acp import (
    PROTOCOL_VERSION,
    RequestError,
    run_agent,
    start_tool_call,
    text_block,
    tool_content,
    update_agent_message_text,
    update_agent_thought_text,
    update_user_message_text,
)
from acp.interfaces import Client
from acp.schema import (
    AgentCapabilities,
    AudioContentBlock,
    AvailableCommand,
    AvailableCommandInput,
    AvailableCommandsUpdate,
    ClientCapabilities,
    ConfigOptionUpdate,
    EmbeddedResourceContentBlock,
    ImageContentBlock,
    Implementation,
    InitializeResponse,
    LoadSessionResponse,
    NewSessionResponse,
    PromptCapabilities,
    PromptResponse,
    ResourceContentBlock,
    SessionConfigOptionSelect,
    SessionConfigSelectOption,
    SetSessionConfigOptionResponse,
    TextContentBlock,
    TextResourceContents,
    UnstructuredCommandInput,
)

from helexa import __version__
from helexa.acp.config import (
    AcpSettings,
    Selection,
    SelectorError,
    default_selection,
    load_acp_config,
    resolve_selector,
)
from helexa.acp.providers.base import Message
from helexa.acp.session import LiveSession, SessionRecord, SessionStore, new_session_id
from helexa.acp.tools import (
    ClientCaps,
    ToolContent,
    ToolError,
    ToolHost,
    Workspace,
    is_shown,
    plan_update,
)
from helexa.acp.turn import Turn
from helexa.config import ConfigError, data_dir

PromptBlock = (
    TextContentBlock
    | ImageContentBlock
    | AudioContentBlock
    | ResourceContentBlock
    | EmbeddedResourceContentBlock
)

COMMANDS = [
    AvailableCommand(
        name="model",
        description="Show or switch this session's model: /model endpoint:model",
        input=AvailableCommandInput(root=UnstructuredCommandInput(hint="endpoint:model")),
    )
]


def invalid_params(message: str) -> RequestError:
    return RequestError(-32602, message)


def prompt_text(blocks: list[PromptBlock]) -> str:
    """The prompt as one user message; context the editor embedded is wrapped and labelled."""
    parts: list[str] = []
    for block in blocks:
        if isinstance(block, TextContentBlock):
            parts.append(block.text)
        elif isinstance(block, ResourceContentBlock):
            parts.append(f"[{block.name}]({block.uri})")
        elif isinstance(block, EmbeddedResourceContentBlock):
            resource = block.resource
            if not isinstance(resource, TextResourceContents):
                raise invalid_params("binary embedded resources are not supported; send text")
            parts.append(f'<context uri="{resource.uri}">\n{resource.text}\n</context>')
        else:
            raise invalid_params(f"{block.type} prompts are not supported; send text")
    text = "\n\n".join(p for p in parts if p)
    if not text.strip():
        raise invalid_params("the prompt is empty")
    return text


class HelexaAgent:
    """The ACP Agent; one per stdio connection, serving any number of sessions."""

    def __init__(self, settings: AcpSettings, store: SessionStore) -> None:
        self.settings = settings
        self.store = store
        self._client: Client | None = None
        self._caps = ClientCaps()
        self._sessions: dict[str, LiveSession] = {}
        self._http: aiohttp.ClientSession | None = None
        self._background: set[asyncio.Task[None]] = set()

    # -- connection ------------------------------------------------------------------------

    def on_connect(self, conn: Client) -> None:
        self._client = conn

    @property
    def client(self) -> Client:
        assert self._client is not None, "on_connect not called"
        return self._client

    def http(self) -> aiohttp.ClientSession:
        if self._http is None or self._http.closed:
            # No total timeout: a cold model load or a long answer is not a failure.
            timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=900)
            self._http = aiohttp.ClientSession(timeout=timeout)
        return self._http

    async def aclose(self) -> None:
        for task in list(self._background):
            task.cancel()
        if self._http is not None:
            await self._http.close()

    async def _send(self, session_id: str, update: Any) -> None:
        await self.client.session_update(session_id=session_id, update=update)

    def _later(self, coro: Any) -> None:
        """Send after the current response: the client must know the session first."""
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- lifecycle -------------------------------------------------------------------------

    async def initialize(
        self,
        protocol_version: int,
        client_capabilities: ClientCapabilities | None = None,
        client_info: Implementation | None = None,
        **kwargs: Any,
    ) -> InitializeResponse:
        self._caps = ClientCaps.from_acp(client_capabilities)
        return InitializeResponse(
            protocol_version=min(protocol_version, PROTOCOL_VERSION),
            agent_capabilities=AgentCapabilities(
                load_session=True,
                prompt_capabilities=PromptCapabilities(
                    image=False, audio=False, embedded_context=True
                ),
            ),
            agent_info=Implementation(name="helexa", title="helexa", version=__version__),
        )

    async def new_session(
        self, cwd: str, mcp_servers: list[Any] | None = None, **kwargs: Any
    ) -> NewSessionResponse:
        selection = default_selection(self.settings)
        record = SessionRecord(new_session_id(), _check_cwd(cwd), selection.selector)
        live = LiveSession(record, selection)
        self._sessions[record.id] = live
        self.store.save(record)
        self._later(self._send(record.id, _commands_update()))
        return NewSessionResponse(session_id=record.id, config_options=self._options(live))

    async def load_session(
        self, cwd: str, session_id: str, mcp_servers: list[Any] | None = None, **kwargs: Any
    ) -> LoadSessionResponse:
        record = self.store.load(session_id)
        if record is None:
            raise invalid_params(f"unknown session {session_id!r}")
        record.cwd = _check_cwd(cwd)
        live = LiveSession(record, self._selection_for(record))
        self._sessions[record.id] = live
        await self._replay(live)
        self._later(self._send(record.id, _commands_update()))
        return LoadSessionResponse(config_options=self._options(live))

    async def set_config_option(
        self, config_id: str, session_id: str, value: str | bool, **kwargs: Any
    ) -> SetSessionConfigOptionResponse:
        live = self._session(session_id)
        if config_id != "model" or not isinstance(value, str):
            raise invalid_params(f"unknown config option {config_id!r}; only 'model' exists")
        self._select(live, value)
        return SetSessionConfigOptionResponse(config_options=self._options(live))

    async def cancel(self, session_id: str, **kwargs: Any) -> None:
        live = self._sessions.get(session_id)
        if live is not None and live.cancel is not None:
            live.cancel.set()

    # -- model selection -------------------------------------------------------------------

    def _selection_for(self, record: SessionRecord) -> Selection:
        """The stored selector, unless its endpoint has since left the config."""
        if record.selector.partition(":")[0] not in self.settings.endpoints:
            return default_selection(self.settings)
        return resolve_selector(self.settings, record.selector)

    def _select(self, live: LiveSession, selector: str) -> None:
        try:
            live.selection = resolve_selector(self.settings, selector)
        except SelectorError as exc:
            raise invalid_params(str(exc)) from None
        live.record.selector = live.selection.selector
        self.store.save(live.record)

    def _options(self, live: LiveSession) -> list[SessionConfigOptionSelect]:
        values = [
            Selection(ep, ep.default_model).selector for ep in self.settings.endpoints.values()
        ]
        current = live.selection.selector
        if current not in values:
            values.insert(0, current)
        option = SessionConfigOptionSelect(
            id="model",
            name="Model",
            category="model",
            type="select",
            current_value=current,
            options=[SessionConfigSelectOption(value=v, name=v) for v in values],
        )
        return [option]

    def _session(self, session_id: str) -> LiveSession:
        live = self._sessions.get(session_id)
        if live is None:
            raise invalid_params(f"unknown session {session_id!r}; create or load it first")
        return live

    # -- replay ----------------------------------------------------------------------------

    async def _replay(self, live: LiveSession) -> None:
        """Stream the stored conversation back, as ``session/load`` requires."""
        results = {m.tool_call_id: m for m in live.record.messages if m.role == "tool"}
        host = self._tools(live)
        for m in live.record.messages:
            if m.role == "user":
                await self._send(live.id, update_user_message_text(m.content))
            elif m.role == "assistant":
                if m.reasoning:
                    await self._send(live.id, update_agent_thought_text(m.reasoning))
                if m.content:
                    await self._send(live.id, update_agent_message_text(m.content))
                for call in m.tool_calls:
                    result = results.get(call.id)
                    failed = result is None or result.is_error
                    if not is_shown(call.name):
                        if not failed:
                            with contextlib.suppress(ToolError):
                                await self._send(live.id, plan_update(call.arguments))
                        continue
                    info = host.describe(call.name, call.arguments)
                    content = [_text_content(result.content)] if result else None
                    await self._send(
                        live.id,
                        start_tool_call(
                            call.id,
                            info.title,
                            kind=info.kind,
                            status="failed" if failed else "completed",
                            content=content,
                            locations=info.locations or None,
                            raw_input=info.raw_input,
                        ),
                    )

    # -- prompts ---------------------------------------------------------------------------

    async def prompt(
        self, session_id: str, prompt: list[PromptBlock], **kwargs: Any
    ) -> PromptResponse:
        live = self._session(session_id)
        if live.cancel is not None:
            raise RequestError(-32600, "a prompt is already running in this session")
        text = prompt_text(prompt)
        command, _, argument = text.partition(" ")
        if command.strip() == "/model":
            await self._model_command(live, argument.strip())
            return PromptResponse(stop_reason="end_turn")
        cancel = live.cancel = asyncio.Event()
        try:
            live.record.messages.append(Message("user", text))
            turn = Turn(
                live, self.settings, self.client, self.http(), self.store, self._tools(live), cancel
            )
            return PromptResponse(stop_reason=await turn.run())
        finally:
            live.cancel = None
            self.store.save(live.record)

    async def _model_command(self, live: LiveSession, selector: str) -> None:
        if selector:
            self._select(live, selector)
            await self._send(
                live.id,
                ConfigOptionUpdate(
                    session_update="config_option_update", config_options=self._options(live)
                ),
            )
            reply = f"Model: {live.selection.selector}"
        else:
            known = ", ".join(
                Selection(e, e.default_model).selector for e in self.settings.endpoints.values()
            )
            reply = f"Model: {live.selection.selector}\nEndpoints: {known}"
        await self._send(live.id, update_agent_message_text(reply))

    def _tools(self, live: LiveSession) -> ToolHost:
        return ToolHost(
            self.client, live.id, Workspace(live.record.cwd), self._caps, live.always_allowed
        )


def _check_cwd(cwd: str) -> str:
    path = Path(cwd)
    if not path.is_absolute() or not path.is_dir():
        raise invalid_params(f"cwd must be an absolute path to a directory, got {cwd!r}")
    return str(path)


def _text_content(text: str) -> ToolContent:
    return tool_content(text_block(text[:4_000]))


def _commands_update() -> AvailableCommandsUpdate:
    return AvailableCommandsUpdate(
        session_update="available_commands_update", available_commands=COMMANDS
    )


# -- entry point ---------------------------------------------------------------------------


async def serve(settings: AcpSettings, store: SessionStore) -> None:
    agent = HelexaAgent(settings, store)
    try:
        await run_agent(agent)
    finally:
        await agent.aclose()


ON_A_TERMINAL = (
    "helexa acp: this is an Agent Client Protocol agent for editors: the editor starts it "
    "and speaks JSON-RPC on its stdin/stdout, so there is nothing to type here. For Zed, "
    'add to settings.json: "agent_servers": {"helexa": {"type": "custom", '
    '"command": "helexa", "args": ["acp"]}} (see helexa/acp/README.md)'
)
_KINDS = [
    (stat.S_ISREG, "a regular file"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISBLK, "a block device"),
]


def stdio_problem() -> str | None:
    """Why this process's stdin/stdout cannot carry the protocol, as the one line to print,
    or None when they can.

    A person at a terminal gets what this is and where it goes. Anything but a pipe or a
    socket (a file, ``/dev/null``) is refused too: the agent asks the editor questions
    mid-turn (permission, files, terminals) that a file cannot answer, and asyncio's pipe
    transports take neither a regular file nor ``/dev/null``, so running on would only
    end in a traceback.
    """
    if sys.stdin is not None and sys.stdin.isatty():
        return ON_A_TERMINAL
    for name, stream in [("stdin", sys.stdin), ("stdout", sys.stdout)]:
        try:
            mode = os.fstat(stream.fileno()).st_mode if stream is not None else None
        except (OSError, ValueError):
            mode = None
        if mode is None:
            kind = "closed"
        elif stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or (name == "stdout" and stream.isatty()):
            continue
        else:
            kind = next((k for test, k in _KINDS if test(mode)), "not a pipe")
        return (
            f"helexa acp: {name} is {kind}; the agent speaks JSON-RPC with the editor that "
            "starts it, over pipes (or sockets) for stdin and stdout"
        )
    return None


def main(acp_config: str | None = None) -> int:
    """Run the agent on stdin/stdout; stdout carries only protocol frames, logs go to stderr.

    A config error, or stdio that cannot be the editor's (a terminal, a file), is one line
    on stderr and exit status 2: the agent was started wrongly and did nothing, which is
    what 2 says for a command-line mistake (0 would tell a script it had run).
    """
    level = logging.getLevelNamesMapping().get(
        os.environ.get("HELEXA_ACP_LOG", "").upper(), logging.WARNING
    )
    logging.basicConfig(
        stream=sys.stderr, level=level, format="helexa-acp %(levelname)s %(name)s: %(message)s"
    )
    try:
        settings = load_acp_config(acp_config)
    except ConfigError as exc:
        print(f"helexa acp: config error: {exc}", file=sys.stderr)
        return 2
    problem = stdio_problem()
    if problem is not None:
        print(problem, file=sys.stderr)
        return 2
    store = SessionStore(data_dir() / "acp" / "sessions")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(settings, store))
    return 0
