"""One ``session/prompt`` turn: call the model, run the tools it called, feed the results
back, and repeat until it answers without calling a tool.

Text and thoughts go to the editor as they stream; each tool call is a ``tool_call`` that
moves pending → in_progress → completed/failed. Every await races the session's cancel
event, so ``session/cancel`` closes the upstream response at once and the turn ends
``cancelled``, with every call it started given a result (the next request would be
malformed without one). The history is saved after every model call and tool round.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from acp import (
    RequestError,
    start_tool_call,
    update_agent_message_text,
    update_agent_thought_text,
    update_tool_call,
)
from acp.interfaces import Client
from acp.schema import StopReason

from helexa.acp.config import AcpSettings, Endpoint, Selection
from helexa.acp.providers import build_provider
from helexa.acp.providers.base import (
    Cancelled,
    HttpProvider,
    Message,
    ProviderRequest,
    ToolCall,
    race_cancel,
)
from helexa.acp.providers.events import (
    Finish,
    FinishReason,
    ProviderError,
    ProviderEvent,
    ReasoningDelta,
    TextDelta,
    ToolCallComplete,
    ToolCallStart,
    Unreachable,
    Usage,
)
from helexa.acp.session import LiveSession, SessionStore, compact, estimate_tokens, request_budget
from helexa.acp.tools import TOOL_SPECS, TOOLS, ToolContent, ToolHost, is_shown

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

_STOP: dict[FinishReason, StopReason] = {
    "stop": "end_turn",
    "tool_calls": "end_turn",
    "length": "max_tokens",
    "refusal": "refusal",
}


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


@dataclass(eq=False)  # a live object, not a value: compared by identity
class Turn:
    """One prompt of ``live``, already in its history as the last user message."""

    live: LiveSession
    settings: AcpSettings
    client: Client
    http: aiohttp.ClientSession
    store: SessionStore
    host: ToolHost
    cancel: asyncio.Event

    async def run(self) -> StopReason:
        live, cancel = self.live, self.cancel
        provider = build_provider(live.selection.endpoint, self.http)
        model = await self._model(provider)
        try:
            learned = await race_cancel(learn_window(live, provider), cancel)
        except Cancelled:
            return "cancelled"
        endpoint = live.selection.endpoint.sized(learned)
        if endpoint is not live.selection.endpoint:
            provider = build_provider(endpoint, self.http)
        for _ in range(self.settings.max_iterations):
            request = self._request(endpoint, model)
            reply = _Reply()
            try:
                await self._stream(provider.stream(request, cancel), reply)
            except ProviderError as exc:
                await self._fail_announced(reply.announced)
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
                await self._fail_announced(reply.announced)
                if reply.text:
                    live.record.messages.append(Message("assistant", "".join(reply.text)))
                return "cancelled"
            live.record.messages.append(reply.message())
            self.store.save(live.record)
            if not reply.calls:
                return _STOP[reply.finish or "stop"]
            if not await self._run_tools(reply.calls):
                return "cancelled"
            self.store.save(live.record)
        return "max_turn_requests"

    async def _send(self, update: Any) -> None:
        await self.client.session_update(session_id=self.live.id, update=update)

    async def _model(self, provider: HttpProvider) -> str:
        live = self.live
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

    def _request(self, endpoint: Endpoint, model: str) -> ProviderRequest:
        live = self.live
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

    async def _stream(self, events: AsyncIterator[ProviderEvent], reply: _Reply) -> None:
        async for event in events:
            if isinstance(event, TextDelta):
                reply.text.append(event.text)
                await self._send(update_agent_message_text(event.text))
            elif isinstance(event, ReasoningDelta):
                reply.reasoning.append(event.text)
                await self._send(update_agent_thought_text(event.text))
            elif isinstance(event, ToolCallStart):
                if not is_shown(event.name):
                    continue
                tool = TOOLS.get(event.name)
                reply.announced.append(event.id)
                await self._send(
                    start_tool_call(
                        event.id, event.name, kind=tool.kind if tool else "other", status="pending"
                    ),
                )
            elif isinstance(event, ToolCallComplete):
                reply.calls.append(ToolCall(event.id, event.name, event.arguments))
                if not is_shown(event.name):
                    continue
                info = self.host.describe(event.name, event.arguments)
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
                await self._send(update)
            elif isinstance(event, Usage):
                reply.usage = event
            elif isinstance(event, Finish):
                reply.finish = event.reason

    async def _run_tools(self, calls: list[ToolCall]) -> bool:
        """Run the calls in order, recording each result; False if cancelled midway."""
        for i, call in enumerate(calls):
            if self.cancel.is_set():
                await self._cancel_calls(calls[i:])
                return False
            shown = is_shown(call.name)
            if shown:
                await self._send(update_tool_call(call.id, status="in_progress"))

            async def progress(content: list[ToolContent], call_id: str = call.id) -> None:
                await self._send(update_tool_call(call_id, content=content))

            try:
                result = await self.host.run(call, self.cancel, progress)
            except Cancelled:
                await self._cancel_calls(calls[i:])
                return False
            # Recorded even if a cancel raced in: the call did take effect.
            self.live.record.messages.append(
                Message("tool", result.text, tool_call_id=call.id, is_error=not result.ok)
            )
            if not shown:
                continue
            await self._send(
                update_tool_call(
                    call.id,
                    status="completed" if result.ok else "failed",
                    content=result.editor_content(),
                    raw_output=result.text if len(result.text) < 4_000 else None,
                ),
            )
        return not self.cancel.is_set()

    async def _cancel_calls(self, calls: list[ToolCall]) -> None:
        """Every call needs a result in the history, or the next request is malformed."""
        for call in calls:
            self.live.record.messages.append(
                Message("tool", "cancelled by the user", tool_call_id=call.id, is_error=True)
            )
        await self._fail_announced([c.id for c in calls if is_shown(c.name)])

    async def _fail_announced(self, ids: list[str]) -> None:
        for call_id in ids:
            with contextlib.suppress(Exception):
                await self._send(update_tool_call(call_id, status="failed"))


async def learn_window(live: LiveSession, provider: HttpProvider) -> int | None:
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
        log.info("session %s: %s reports no context window for %s", live.id, endpoint.name, model)
        live.learned = (live.selection, None, now + ASK_AGAIN_S)
        return None
    log.info("session %s: %s has a %d-token context window", live.id, model, window)
    live.learned = (live.selection, window, math.inf)
    return window
