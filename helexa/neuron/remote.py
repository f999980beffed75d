"""A neuron on another host, reached over the neuron HTTP API (``server.py``).

It implements the same :class:`Neuron` protocol as the in-process one, so cortex treats
both alike. Failures come back as :class:`NeuronError`: the remote's own error body when it
answered, or a 502 ``upstream_error`` when it could not be reached (``neuron_unreachable``)
or its connection broke mid-stream (``stream_interrupted``), both of which the fleet takes
as the node being down, so it can tell a sick node from a refused request. A stream that
sends nonsense is ``stream_malformed``: the node answered, so it is not down.

A stream whose HTTP response ends completely but without ``[DONE]`` ends normally: what
arrived is the whole answer, and the gateway closes the client's event sequence (a
truncated payload or dropped connection is what aiohttp reports as an error).

Streams hold a :class:`StreamSlots` slot each, not a place in aiohttp's connection pool:
the pool has no limit, so a poll never queues behind streams (a node carrying many would
otherwise be marked down for not answering), and a stream waiting for a slot is counted.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager
from typing import Any, TypeVar

import aiohttp
from pydantic import BaseModel, ValidationError

from helexa.neuron.interface import (
    Discovery,
    Health,
    LoadRequest,
    ModelState,
    NeuronError,
    UnloadRequest,
)
from helexa.wire.sse import SSEDecoder, SSEEvent

_Shape = TypeVar("_Shape", bound=BaseModel)


class UpstreamError(NeuronError):
    """The node could not be reached, or its stream broke or made no sense: a 502 for the
    client (the gateway's upstream failed), and its code tells the fleet which."""

    status = 502
    type = "upstream_error"


def unreachable(name: str, exc: BaseException) -> NeuronError:
    detail = str(exc) or type(exc).__name__
    return UpstreamError(f"neuron {name!r} is unreachable: {detail}", code="neuron_unreachable")


def interrupted(name: str, detail: str) -> NeuronError:
    message = f"stream from neuron {name!r} was interrupted: {detail}"
    return UpstreamError(message, code="stream_interrupted")


def malformed(name: str, detail: str) -> NeuronError:
    return UpstreamError(
        f"stream from neuron {name!r} is malformed: {detail}", code="stream_malformed"
    )


def not_a_neuron(endpoint: str, call: str, what: str) -> NeuronError:
    """A server answered, but not as the neuron API does (a web page, another API): said
    in one line, by what it sent, never by quoting it."""
    return UpstreamError(
        f"{endpoint} is not a helexa neuron: {call} answered {what}", code="not_a_neuron"
    )


class StreamSlots:
    """How many streams one node carries at once (``limit``; 0 for any number), and how
    many requests wait for a slot: the queue a metrics scrape shows."""

    def __init__(self, limit: int = 0) -> None:
        self.limit = limit
        self.open = 0
        self.waiting = 0
        self._free = asyncio.Semaphore(limit) if limit else None

    @asynccontextmanager
    async def hold(self) -> AsyncIterator[None]:
        """One slot for the block, waiting (counted) while none is free."""
        if self._free is not None:
            self.waiting += 1
            try:
                await self._free.acquire()
            finally:
                self.waiting -= 1
        self.open += 1
        try:
            yield
        finally:
            self.open -= 1
            if self._free is not None:
                self._free.release()


class RemoteNeuron:
    """Client of one ``helexa neuron``; one aiohttp session, created in the running loop.

    ``timeout_s`` bounds loads (which may download and copy gigabytes) and the wait for
    each piece of a stream; ``poll_timeout_s`` bounds the quick calls the poller makes, so a
    hung node is marked down promptly. ``max_streams`` streams run at once (0: any number).
    """

    def __init__(
        self,
        name: str,
        endpoint: str,
        token: str | None = None,
        *,
        timeout_s: float = 600,
        poll_timeout_s: float = 10,
        max_streams: int = 0,
    ) -> None:
        self.name = name
        self.endpoint = endpoint.rstrip("/")
        self.token = token
        self.timeout_s = timeout_s
        self.poll_timeout_s = poll_timeout_s
        self.slots = StreamSlots(max_streams)
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
            # No pool limit (aiohttp's is 100): streams are bounded by ``slots`` instead.
            connector = aiohttp.TCPConnector(limit=0)
            self._session = aiohttp.ClientSession(headers=headers, connector=connector)
        return self._session

    async def _call(
        self, method: str, path: str, body: dict[str, Any] | None = None, *, timeout_s: float
    ) -> Any:
        """One request/response call; the decoded JSON body or a NeuronError."""
        timeout = aiohttp.ClientTimeout(total=timeout_s)
        try:
            async with self._client().request(
                method, self.endpoint + path, json=body, timeout=timeout
            ) as response:
                text = await response.text()
                status = response.status
                kind = response.content_type
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise unreachable(self.name, exc) from exc
        try:
            payload = json.loads(text) if text else None
        except ValueError:
            raise not_a_neuron(
                self.endpoint, f"{method} {path}", f"HTTP {status} ({kind})"
            ) from None
        if status >= 400:
            if not (isinstance(payload, dict) and isinstance(payload.get("error"), dict)):
                raise not_a_neuron(
                    self.endpoint, f"{method} {path}", f"HTTP {status} without an error body"
                )
            raise NeuronError.from_body(status, payload)
        return payload

    def _read(self, path: str, payload: Any, shape: type[_Shape]) -> _Shape:
        try:
            return shape.model_validate(payload)
        except ValidationError:
            raise not_a_neuron(
                self.endpoint, path, f"JSON that is not a {shape.__name__}"
            ) from None

    async def discovery(self) -> Discovery:
        payload = await self._call("GET", "/discovery", timeout_s=self.poll_timeout_s)
        return self._read("/discovery", payload, Discovery)

    async def health(self) -> Health:
        payload = await self._call("GET", "/health", timeout_s=self.poll_timeout_s)
        return self._read("/health", payload, Health)

    async def models(self) -> list[ModelState]:
        payload = await self._call("GET", "/models", timeout_s=self.poll_timeout_s)
        if not isinstance(payload, list | None):
            raise not_a_neuron(self.endpoint, "GET /models", "JSON that is not a list of models")
        return [self._read("/models", m, ModelState) for m in payload or []]

    async def load(self, request: LoadRequest) -> ModelState:
        body = request.model_dump(exclude_none=True)
        return ModelState.model_validate(
            await self._call("POST", "/models/load", body, timeout_s=self.timeout_s)
        )

    async def unload(self, model_id: str) -> None:
        body = UnloadRequest(model_id=model_id).model_dump()
        await self._call("POST", "/models/unload", body, timeout_s=self.timeout_s)

    async def count_tokens(self, request: dict[str, Any]) -> int:
        payload = await self._call("POST", "/tokenize", request, timeout_s=self.timeout_s)
        return int(payload["input_tokens"])

    def chat(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        return self._stream("/v1/chat/completions", request)

    def complete(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        return self._stream("/v1/completions", request)

    async def _stream(self, path: str, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Chunk dicts as the remote sends them, once a slot is free; closing this closes
        the HTTP response, which the remote sees as a hang-up and answers by cancelling
        generation."""
        async with self.slots.hold(), aclosing(self._slotted(path, request)) as chunks:
            async for chunk in chunks:
                yield chunk

    async def _slotted(self, path: str, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        body = {**request, "stream": True, "stream_options": {"include_usage": True}}
        # No total limit (a long answer is fine); a stall of timeout_s between bytes is not.
        timeout = aiohttp.ClientTimeout(total=None, sock_read=self.timeout_s)
        try:
            response = await self._client().post(self.endpoint + path, json=body, timeout=timeout)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise unreachable(self.name, exc) from exc
        done = False  # [DONE] seen
        complete = False  # read to the end of a whole response: the connection is reusable
        try:
            if response.status >= 400:
                text = await response.text()
                try:
                    payload: Any = json.loads(text)
                except ValueError:
                    payload = text
                raise NeuronError.from_body(response.status, payload)
            try:
                async for event in _events(response):  # to EOF, so the connection is reusable
                    if event.data == "[DONE]":
                        done = True
                    elif not done:
                        yield self._chunk(event)
            except (aiohttp.ClientError, TimeoutError) as exc:
                if not done:
                    # A payload cut short, a reset, a stall: the node went away mid-answer.
                    raise interrupted(self.name, str(exc) or type(exc).__name__) from exc
                # After [DONE] the answer is whole: a connection lost then is no failure
                # (nor evidence of a dead node); it just is not reused.
            else:
                complete = True  # with or without [DONE]: the response ended as sent
        finally:
            # A finished stream leaves the connection to the pool; anything else drops it,
            # which is what tells the remote to stop generating.
            if complete:
                response.release()
            else:
                response.close()

    def _chunk(self, event: SSEEvent) -> dict[str, Any]:
        try:
            payload = event.json()
        except ValueError as exc:
            raise malformed(self.name, f"undecodable event {event.data[:200]!r}") from exc
        if isinstance(payload, dict) and "error" in payload:
            raise NeuronError.from_body(500, payload)
        if not isinstance(payload, dict):
            raise malformed(self.name, f"unexpected event {event.data[:200]!r}")
        return payload

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None and not session.closed:
            await session.close()


async def _events(response: aiohttp.ClientResponse) -> AsyncIterator[SSEEvent]:
    decoder = SSEDecoder()
    async for data in response.content.iter_any():
        for event in decoder.feed(data):
            yield event
    for event in decoder.end():
        yield event
