"""What a prompt turn (:mod:`helexa.acp.turn`) sees of a model, whatever wire API carries it.

A turn builds a :class:`ProviderRequest` (conversation, tools, system prompt) and reads
:data:`~helexa.acp.providers.events.ProviderEvent` values back; each wire module turns the
one into a request body and the server's SSE stream into the other (through its
:class:`~helexa.acp.providers.decoder.Decoder`, which does no I/O).
:class:`HttpProvider` is the only place that touches the network.
"""

from __future__ import annotations

import asyncio
import json
import urllib.parse
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Protocol, TypeVar

import aiohttp

from helexa.acp.config import Endpoint
from helexa.acp.providers.decoder import Decoder, error_text
from helexa.acp.providers.events import ProviderError, ProviderEvent, Unreachable
from helexa.wire.sse import SSEDecoder, SSEEvent

T = TypeVar("T")
LOOKUP_TIMEOUT = aiohttp.ClientTimeout(total=10)

# -- the conversation ----------------------------------------------------------------------


@dataclass
class ToolCall:
    """One call the model made; ``arguments`` is the JSON text exactly as it streamed."""

    id: str
    name: str
    arguments: str


@dataclass
class Message:
    """One conversation entry. The system prompt is not a message: it rides the request.

    ``reasoning`` is kept for replay to the editor but never sent back upstream (servers
    either ignore it or want signed blocks we do not have). ``is_error`` marks a tool
    result that failed, so a reloaded session shows it as failed.
    """

    role: Literal["user", "assistant", "tool"]
    content: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    tool_call_id: str | None = None
    is_error: bool = False


@dataclass(frozen=True)
class ToolSpec:
    name: str
    description: str
    parameters: dict[str, Any]

    def function(self) -> dict[str, Any]:
        """The tool as OpenAI's function object, which chat nests and Responses inlines."""
        return {"name": self.name, "description": self.description, "parameters": self.parameters}


@dataclass
class ProviderRequest:
    model: str
    messages: list[Message]
    tools: list[ToolSpec] = field(default_factory=list)
    system: str | None = None
    max_tokens: int | None = None


# -- the provider --------------------------------------------------------------------------


class Cancelled(Exception):
    """The session's cancel event fired while we were waiting."""


class Provider(Protocol):
    def stream(
        self, request: ProviderRequest, cancel: asyncio.Event
    ) -> AsyncIterator[ProviderEvent]:
        """Stream one model turn; stop (closing the response) as soon as ``cancel`` is set."""
        ...

    async def list_models(self) -> list[str]: ...

    async def context_length(self, model: str) -> int | None: ...


# -- cancellation --------------------------------------------------------------------------


async def race_cancel(awaitable: Awaitable[T], cancel: asyncio.Event) -> T:
    """Await ``awaitable`` unless ``cancel`` fires first; then cancel it and raise Cancelled.

    A per-await race (rather than cancelling the whole prompt task) lets the caller finish
    its own bookkeeping and answer ``session/prompt`` with ``cancelled``.
    """
    task = asyncio.ensure_future(awaitable)
    if not cancel.is_set():
        waiter = asyncio.ensure_future(cancel.wait())
        try:
            await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            task.cancel()
            raise
        finally:
            waiter.cancel()
        if task.done():
            return task.result()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    raise Cancelled


# -- HTTP ----------------------------------------------------------------------------------


def listed_window(entry: Any) -> int | None:
    """A model entry's ``context_length`` (helexa's gateway lists one per model, null when it
    does not know), when it is a usable token count."""
    value = entry.get("context_length") if isinstance(entry, dict) else None
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    return None


def api_root(base_url: str) -> str:
    """``http://host:port`` and ``http://host:port/v1`` both mean the same API root."""
    base = base_url.rstrip("/")
    return base if base.endswith("/v1") else f"{base}/v1"


class HttpProvider:
    """One wire API over aiohttp; subclasses name the path, the encoder and the decoder."""

    path: ClassVar[str]
    decoder: ClassVar[type[Decoder]]  # one per stream: it holds that stream's state

    def __init__(self, endpoint: Endpoint, http: aiohttp.ClientSession) -> None:
        self.endpoint = endpoint
        self.http = http
        self.url = api_root(endpoint.base_url) + self.path

    def headers(self) -> dict[str, str]:
        key = self.endpoint.api_key
        return {"authorization": f"Bearer {key}"} if key else {}

    def lookup_headers(self) -> dict[str, str]:
        """Headers for :meth:`context_length`'s requests: the key, in the dialect's header."""
        return self.headers()

    def encode(self, request: ProviderRequest) -> dict[str, Any]:
        raise NotImplementedError

    async def stream(
        self, request: ProviderRequest, cancel: asyncio.Event
    ) -> AsyncIterator[ProviderEvent]:
        decoder = self.decoder()
        body = self.encode(request)
        try:
            async for event in self._sse(body, cancel):
                for out in decoder.feed(event):
                    yield out
        except Cancelled:
            return
        for out in decoder.end():
            yield out

    async def list_models(self) -> list[str]:
        """Model ids from ``GET /v1/models`` (OpenAI and Anthropic share the shape)."""
        body = await self._get("/models", self.headers())
        data = body.get("data") if isinstance(body, dict) else None
        return [m["id"] for m in data or [] if isinstance(m, dict) and isinstance(m.get("id"), str)]

    async def context_length(self, model: str) -> int | None:
        """``model``'s context window as the endpoint reports it, None when it reports none.

        The ``GET /v1/models`` entry for ``model`` first; a model the list does not name (an
        alias, a source-qualified id) is asked for as ``GET /v1/models/{model}``, which the
        gateway resolves; no such model is None, not an error. Each request gets
        :data:`LOOKUP_TIMEOUT`, so a silent server cannot hold a prompt up for long.
        """
        body = await self._get("/models", self.lookup_headers(), LOOKUP_TIMEOUT)
        data = body.get("data") if isinstance(body, dict) else None
        for entry in data if isinstance(data, list) else []:
            if isinstance(entry, dict) and entry.get("id") == model:
                return listed_window(entry)
        path = "/models/" + urllib.parse.quote(model, safe="/:")
        try:
            entry = await self._get(path, self.lookup_headers(), LOOKUP_TIMEOUT)
        except Unreachable:
            raise
        except ProviderError:  # a 404, or a server without the route
            return None
        return listed_window(entry)

    async def _get(
        self, path: str, headers: dict[str, str], timeout: aiohttp.ClientTimeout | None = None
    ) -> Any:
        url = api_root(self.endpoint.base_url) + path
        extra = {"timeout": timeout} if timeout else {}
        try:
            async with self.http.get(url, headers=headers, **extra) as resp:
                body = await resp.json(content_type=None)
                if resp.status >= 400:
                    raise ProviderError(f"{url}: HTTP {resp.status}: {error_text(body)}")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise Unreachable(
                f"cannot list models at {url}: {str(exc) or type(exc).__name__}"
            ) from None
        except ValueError as exc:
            raise ProviderError(f"cannot list models at {url}: {exc}") from None
        return body

    async def _sse(self, body: dict[str, Any], cancel: asyncio.Event) -> AsyncIterator[SSEEvent]:
        headers = {"accept": "text/event-stream", **self.headers()}
        try:
            resp = await race_cancel(self.http.post(self.url, json=body, headers=headers), cancel)
        except aiohttp.ClientError as exc:
            raise ProviderError(f"cannot reach {self.url}: {exc}") from None
        complete = False
        try:
            if resp.status >= 400:
                text = await race_cancel(resp.text(), cancel)
                try:
                    detail = error_text(json.loads(text))
                except ValueError:
                    detail = text.strip()[:500] or resp.reason or ""
                raise ProviderError(f"{self.url}: HTTP {resp.status}: {detail}")
            sse = SSEDecoder()
            while chunk := await race_cancel(resp.content.readany(), cancel):
                for event in sse.feed(chunk):
                    yield event
            complete = True
            for event in sse.end():
                yield event
        except aiohttp.ClientError as exc:
            raise ProviderError(f"stream from {self.url} broke: {exc}") from None
        finally:
            # An unfinished response must drop its connection: that is how the upstream
            # learns we stopped listening (and stops generating).
            if complete:
                resp.release()
            else:
                resp.close()
