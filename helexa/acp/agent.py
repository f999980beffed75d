"""``helexa acp``: an Agent Client Protocol agent over stdio, for Zed and other editors.

Each ``session/prompt`` runs the agent loop: stream the model (text and thoughts go to the
editor as they arrive), run the tool calls it made (each one a ``tool_call`` that moves
pending → in_progress → completed/failed), feed the results back, and repeat until the
model answers without calling a tool. ``session/cancel`` sets the session's cancel event,
which every await in the loop races, so the upstream response is closed at once and the
prompt answers ``cancelled``. Sessions persist as JSON, so ``session/load`` survives
restarts; the model is chosen per session through the ``model`` config option or the
``/model endpoint:model`` command. ``update_plan`` calls are not shown as tool calls:
the editor gets the ``plan`` update they stand for instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
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
    update_tool_call,
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
    StopReason,
    TextContentBlock,
    TextResourceContents,
    UnstructuredCommandInput,
)

from helexa import __version__
from helexa.acp.config import (
    AcpSettings,
    Endpoint,
    Selection,
    SelectorError,
    default_selection,
    load_acp_config,
    resolve_selector,
)
from helexa.acp.providers import build_provider
from helexa.acp.providers.base import (
    Cancelled,
    Finish,
    FinishReason,
    HttpProvider,
    Message,
    ProviderError,
    ProviderEvent,
    ProviderRequest,
    ReasoningDelta,
    TextDelta,
    ToolCall,
    ToolCallComplete,
    ToolCallStart,
    Unreachable,
    Usage,
    race_cancel,
)
from helexa.acp.session import (
    SessionRecord,
    SessionStore,
    compact,
    estimate_tokens,
    new_session_id,
    request_budget,
)
from helexa.acp.tools import (
    TOOL_SPECS,
    TOOLS,
    ClientCaps,
    ToolContent,
    ToolError,
    ToolHost,
    Workspace,
    plan_update,
)
from helexa.config import ConfigError, data_dir

log = logging.getLogger("helexa.acp")

# A context window the endpoint did not report (a cold model, a server that did not
# answer) is asked for again after this long, not on every prompt.
ASK_AGAIN_S = 60.0
SYSTEM_PROMPT = """\
You are helexa, a coding agent working inside the user's project at {cwd}.
Use the tools to read, search and change files and to run commands; paths are relative to
the project root and cannot leave it. Read a file before editing it, and give edit_file an
old_string that occurs exactly once. For a task of several steps, show your plan with
update_plan and keep it current. If the user denies a tool, respect that and continue
without it. Answer concisely."""

PromptBlock = (
    TextContentBlock
    | ImageContentBlock
    | AudioContentBlock
    | ResourceContentBlock
    | EmbeddedResourceContentBlock
)

_STOP: dict[FinishReason, StopReason] = {
    "stop": "end_turn",
    "tool_calls": "end_turn",
    "length": "max_tokens",
    "refusal": "refusal",
}

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


@dataclass
class LiveSession:
    record: SessionRecord
    selection: Selection
    always_allowed: set[str] = field(default_factory=set)
    cancel: asyncio.Event | None = None  # set while a prompt runs
    # What the endpoint said of the model's window: the selection it is for, the window
    # (None: it gave none), and until when (monotonic) a None stands before asking again.
    learned: tuple[Selection, int | None, float] | None = None

    @property
    def id(self) -> str:
        return self.record.id


@dataclass
class _Reply:
    """One model call's output, gathered while it streams to the editor."""

    text: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    calls: list[ToolCall] = field(default_factory=list)
    announced: list[str] = field(default_factory=list)  # tool_call ids the editor knows
    finish: FinishReason | None = None
    usage: Usage | None = None

    def message(self) -> Message:
        return Message("assistant", "".join(self.text), "".join(self.reasoning), list(self.calls))


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
                    if not _shown(call.name):
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

    # -- the prompt turn -------------------------------------------------------------------

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
            return PromptResponse(stop_reason=await self._loop(live, cancel))
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

    async def _loop(self, live: LiveSession, cancel: asyncio.Event) -> StopReason:
        provider = build_provider(live.selection.endpoint, self.http())
        model = await self._model(live, provider)
        try:
            learned = await race_cancel(self._learn_window(live, provider), cancel)
        except Cancelled:
            return "cancelled"
        endpoint = live.selection.endpoint.sized(learned)
        if endpoint is not live.selection.endpoint:
            provider = build_provider(endpoint, self.http())
        host = self._tools(live)
        for _ in range(self.settings.max_iterations):
            request = self._request(live, endpoint, model)
            reply = _Reply()
            try:
                await self._stream(live, provider.stream(request, cancel), host, reply)
            except ProviderError as exc:
                await self._fail_announced(live, reply.announced)
                raise RequestError(
                    -32603, f"{endpoint.name} ({endpoint.wire_api}): {exc}"
                ) from None
            if reply.usage:
                log.info(
                    "session %s: %d input (%d cached), %d output tokens",
                    live.id,
                    reply.usage.input_tokens,
                    reply.usage.cached_tokens,
                    reply.usage.output_tokens,
                )
            if cancel.is_set():
                await self._fail_announced(live, reply.announced)
                if reply.text:
                    live.record.messages.append(Message("assistant", "".join(reply.text)))
                return "cancelled"
            live.record.messages.append(reply.message())
            self.store.save(live.record)
            if not reply.calls:
                return _STOP[reply.finish or "stop"]
            if not await self._run_tools(live, host, reply.calls, cancel):
                return "cancelled"
            self.store.save(live.record)
        return "max_turn_requests"

    async def _model(self, live: LiveSession, provider: HttpProvider) -> str:
        if live.selection.model:
            return live.selection.model
        try:
            models = await provider.list_models()
        except ProviderError as exc:
            raise RequestError(-32603, f"no model configured and {exc}") from None
        if not models:
            raise RequestError(-32603, f"no model configured and {provider.url} lists none")
        live.selection = Selection(live.selection.endpoint, models[0])
        live.record.selector = live.selection.selector
        return models[0]

    async def _learn_window(self, live: LiveSession, provider: HttpProvider) -> int | None:
        """The selected model's context window as its endpoint reports it, when no window
        is configured; None leaves the configured (or default) one.

        Asked once per session and selection: a window once learned is kept until the
        model changes, and so is a refusal (an endpoint without the route). No answer yet
        (a cold model the gateway knows no window for, a server that did not answer) is
        asked again after :data:`ASK_AGAIN_S`, not on every prompt; it never fails one.
        """
        endpoint, model = live.selection.endpoint, live.selection.model
        if endpoint.context_window is not None or model is None:
            return None
        now = time.monotonic()
        if live.learned is not None and live.learned[0] == live.selection:
            _, known, until = live.learned
            if known is not None or now < until:
                return known
        try:
            window = await provider.context_length(model)
        except ProviderError as exc:
            unreachable = isinstance(exc, Unreachable)
            level = logging.WARNING if unreachable else logging.INFO
            log.log(level, "session %s: no context window for %s: %s", live.id, model, exc)
            live.learned = (live.selection, None, now + ASK_AGAIN_S if unreachable else math.inf)
            return None
        if window is None:
            log.info(
                "session %s: %s reports no context window for %s", live.id, endpoint.name, model
            )
            live.learned = (live.selection, None, now + ASK_AGAIN_S)
            return None
        log.info("session %s: %s has a %d-token context window", live.id, model, window)
        live.learned = (live.selection, window, math.inf)
        return window

    def _request(self, live: LiveSession, endpoint: Endpoint, model: str) -> ProviderRequest:
        # replace, not format: a user's prompt may well contain braces.
        system = (self.settings.system_prompt or SYSTEM_PROMPT).replace("{cwd}", live.record.cwd)
        overhead = (len(system) + len(json.dumps([t.parameters for t in TOOL_SPECS]))) // 4
        budget = request_budget(endpoint.window, endpoint.max_tokens) - overhead
        messages = compact(live.record.messages, budget)
        if messages is not live.record.messages:
            log.info(
                "session %s: compacted %d -> %d estimated tokens",
                live.id,
                estimate_tokens(live.record.messages),
                estimate_tokens(messages),
            )
        return ProviderRequest(model, messages, TOOL_SPECS, system, endpoint.max_tokens)

    async def _stream(
        self,
        live: LiveSession,
        events: AsyncIterator[ProviderEvent],
        host: ToolHost,
        reply: _Reply,
    ) -> None:
        async for event in events:
            if isinstance(event, TextDelta):
                reply.text.append(event.text)
                await self._send(live.id, update_agent_message_text(event.text))
            elif isinstance(event, ReasoningDelta):
                reply.reasoning.append(event.text)
                await self._send(live.id, update_agent_thought_text(event.text))
            elif isinstance(event, ToolCallStart):
                if not _shown(event.name):
                    continue
                tool = TOOLS.get(event.name)
                reply.announced.append(event.id)
                await self._send(
                    live.id,
                    start_tool_call(
                        event.id, event.name, kind=tool.kind if tool else "other", status="pending"
                    ),
                )
            elif isinstance(event, ToolCallComplete):
                reply.calls.append(ToolCall(event.id, event.name, event.arguments))
                if not _shown(event.name):
                    continue
                info = host.describe(event.name, event.arguments)
                details = {
                    "kind": info.kind,
                    "locations": info.locations or None,
                    "raw_input": info.raw_input,
                }
                if event.id in reply.announced:
                    update = update_tool_call(event.id, title=info.title, **details)
                else:
                    reply.announced.append(event.id)
                    update = start_tool_call(event.id, info.title, status="pending", **details)
                await self._send(live.id, update)
            elif isinstance(event, Usage):
                reply.usage = event
            elif isinstance(event, Finish):
                reply.finish = event.reason

    async def _run_tools(
        self, live: LiveSession, host: ToolHost, calls: list[ToolCall], cancel: asyncio.Event
    ) -> bool:
        """Run the calls in order, recording each result; False if cancelled midway."""
        for i, call in enumerate(calls):
            if cancel.is_set():
                await self._cancel_calls(live, calls[i:])
                return False
            shown = _shown(call.name)
            if shown:
                await self._send(live.id, update_tool_call(call.id, status="in_progress"))

            async def progress(content: list[ToolContent], call_id: str = call.id) -> None:
                await self._send(live.id, update_tool_call(call_id, content=content))

            try:
                result = await host.run(call, cancel, progress)
            except Cancelled:
                await self._cancel_calls(live, calls[i:])
                return False
            # Recorded even if a cancel raced in: the call did take effect.
            live.record.messages.append(
                Message("tool", result.text, tool_call_id=call.id, is_error=not result.ok)
            )
            if not shown:
                continue
            await self._send(
                live.id,
                update_tool_call(
                    call.id,
                    status="completed" if result.ok else "failed",
                    content=result.editor_content(),
                    raw_output=result.text if len(result.text) < 4_000 else None,
                ),
            )
        return not cancel.is_set()

    async def _cancel_calls(self, live: LiveSession, calls: list[ToolCall]) -> None:
        """Every call needs a result in the history, or the next request is malformed."""
        for call in calls:
            live.record.messages.append(
                Message("tool", "cancelled by the user", tool_call_id=call.id, is_error=True)
            )
        await self._fail_announced(live, [c.id for c in calls if _shown(c.name)])

    async def _fail_announced(self, live: LiveSession, ids: list[str]) -> None:
        for call_id in ids:
            with contextlib.suppress(Exception):
                await self._send(live.id, update_tool_call(call_id, status="failed"))

    def _tools(self, live: LiveSession) -> ToolHost:
        return ToolHost(
            self.client, live.id, Workspace(live.record.cwd), self._caps, live.always_allowed
        )


def _shown(name: str) -> bool:
    """Whether the editor sees this call as a tool call (unknown tools are, as failures)."""
    tool = TOOLS.get(name)
    return tool is None or tool.shown


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


def main(acp_config: str | None = None) -> int:
    """Run the agent on stdin/stdout; stdout carries only protocol frames, logs go to stderr."""
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
    store = SessionStore(data_dir() / "acp" / "sessions")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(settings, store))
    return 0
