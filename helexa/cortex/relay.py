"""The generation path: one :func:`relay` every generation route takes.

A route parses the body in its dialect into a :class:`Job`; the relay takes a lease on the
model, streams the neuron's OpenAI chunks through the job's :class:`StreamFormat` (or folds
them into one answer), reports to the request's observer, and releases the lease whatever
happens. Chunks are written as they arrive, never collected first, and a client that hangs
up closes the neuron's stream so generation stops. A node that fails before the first
chunk is marked down and the request routed once more; once a stream has started the
status line is gone, so a failure rides the stream instead (an Anthropic ``error`` event,
an OpenAI ``data: {"error":...}`` frame, a Responses ``response.failed``) and the response
ends cleanly.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, Literal

from aiohttp import web

from helexa.cortex.fleet import Fleet, Lease, ModelNotFound, NoCapacity
from helexa.cortex.observe import CLIENT_GONE, Observe, RequestObserver
from helexa.errors import ApiError
from helexa.wire.openai.translate import ChatAccumulator, accumulate_completion
from helexa.wire.sse import StreamFormat

log = logging.getLogger("helexa.gateway")


def api_error(exc: BaseException) -> ApiError:
    """Any exception as the refusal a client is sent: an ApiError as it is, aiohttp's own
    HTTP errors by status, anything else a 500 that names it."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, web.HTTPException):
        return ApiError(exc.reason, status=exc.status)
    return ApiError(
        f"internal error: {type(exc).__name__}: {exc}", status=500, code="internal_error"
    )


@dataclass
class Job:
    """One generation request, parsed: what to send upstream and how to answer.

    ``upstream`` is the OpenAI body for the neuron; its ``model`` is replaced by the
    lease's served id, while everything the client sees keeps ``model`` as it was asked.
    ``answer`` turns the folded upstream completion into the response body.
    """

    api: str
    model: str
    upstream: dict[str, Any]
    stream: StreamFormat | None
    answer: Callable[[dict[str, Any]], dict[str, Any]]
    kind: Literal["chat", "completion"] = "chat"


# -- app state: set by make_app, read by every request -----------------------------------------

FLEET = web.AppKey("fleet", Fleet)
OBSERVE = web.AppKey("observe", Observe)
STREAMS = web.AppKey("streams", set[asyncio.Task[Any]])


# -- the relay --------------------------------------------------------------------------------


async def _next(stream: AsyncIterator[dict[str, Any]]) -> dict[str, Any] | None:
    try:
        return await anext(stream)
    except StopAsyncIteration:
        return None


async def relay(request: web.Request, job: Job) -> web.StreamResponse:
    """Route ``job`` to a neuron and answer it; the one path every generation takes.

    When the node fails before its first chunk (refused connection, dropped stream) nothing
    has reached the client yet, so the node is marked down and the request is routed once
    more, to another node; after the first chunk a failure can only ride the stream.
    """
    observer = request.app[OBSERVE](job.api, job.model)
    fleet = request.app[FLEET]
    streams = request.app[STREAMS]
    task = asyncio.current_task()
    assert task is not None  # aiohttp runs every handler in a task
    streams.add(task)  # so a stopping gateway can cancel it
    try:
        gone: BaseException | None = None  # the first node's failure, when rerouting
        while True:
            lease = await _acquire(fleet, job, observer, gone)
            # Leaving the lease releases it, and tells the fleet when the node was unreachable.
            async with lease:
                try:
                    observer.routed(lease)
                    # The catalogue's sampling defaults go under whatever the client sent.
                    upstream = fleet.catalogue.apply_sampling(
                        lease.canonical_id, {**job.upstream, "model": lease.served_id}
                    )
                    generate = lease.neuron.chat if job.kind == "chat" else lease.neuron.complete
                    async with aclosing(generate(upstream)) as chunks:
                        try:
                            first = await _next(chunks)
                        except Exception as exc:
                            if gone is None and lease.failed(exc):
                                log.warning(
                                    "node %s failed before answering (%s); rerouting %s",
                                    lease.node.name,
                                    exc,
                                    job.model,
                                )
                                gone = exc
                                continue
                            raise
                        if job.stream is None:
                            return await _fold(first, chunks, job, observer)
                        return await _stream(request, first, chunks, job.stream, observer, lease)
                except BaseException as exc:
                    observer.failed(_failure(exc))
                    raise
    finally:
        streams.discard(task)


async def _acquire(
    fleet: Fleet, job: Job, observer: RequestObserver, gone: BaseException | None
) -> Lease:
    """A lease for ``job``; when rerouting and no other node can take it, the first node's
    failure is the reason the request fails (not "no capacity" or "not found")."""
    try:
        return await fleet.acquire(job.model)
    except BaseException as exc:
        failure: BaseException = exc
        if gone is not None and isinstance(exc, ModelNotFound | NoCapacity):
            failure = gone
        observer.failed(_failure(failure))
        if failure is exc:
            raise
        raise failure from exc


def _failure(exc: BaseException) -> ApiError:
    if isinstance(exc, asyncio.CancelledError | ConnectionResetError):
        return ApiError("client disconnected", status=CLIENT_GONE, code="client_disconnected")
    return api_error(exc)


async def _rest(
    first: dict[str, Any] | None, chunks: AsyncIterator[dict[str, Any]]
) -> AsyncIterator[dict[str, Any]]:
    """The whole stream again, its first chunk already taken."""
    if first is None:
        return
    yield first
    async for chunk in chunks:
        yield chunk


async def _fold(
    first: dict[str, Any] | None,
    chunks: AsyncIterator[dict[str, Any]],
    job: Job,
    observer: RequestObserver,
) -> web.Response:
    if job.kind == "chat":
        acc = ChatAccumulator()
        async for chunk in _rest(first, chunks):
            observer.chunk(chunk)
            acc.add(chunk)
        completion = acc.result()
    else:
        collected = []
        async for chunk in _rest(first, chunks):
            observer.chunk(chunk)
            collected.append(chunk)
        completion = accumulate_completion(collected)
    observer.finished()
    return web.json_response(job.answer(completion))


async def _stream(
    request: web.Request,
    first: dict[str, Any] | None,
    chunks: AsyncIterator[dict[str, Any]],
    fmt: StreamFormat,
    observer: RequestObserver,
    lease: Lease,
) -> web.StreamResponse:
    """Write the stream; ``first`` was awaited before the headers, so a neuron that refuses
    the request outright (context too long, model gone) is a proper HTTP error status."""
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    await response.prepare(request)
    failure: ApiError | None = None
    try:
        if first is not None:
            observer.chunk(first)
            await _write(response, fmt.feed(first))
            async for chunk in chunks:
                observer.chunk(chunk)
                await _write(response, fmt.feed(chunk))
        tail = fmt.finish()
    except ConnectionResetError as exc:
        observer.failed(_failure(exc))
        return response  # the caller's aclosing stops the neuron
    except Exception as exc:  # headers are sent: the failure has to ride the stream
        lease.failed(exc)  # a dropped stream is a node gone: the next request reroutes
        failure = api_error(exc)
        tail = fmt.fail(failure)
    try:
        await _write(response, tail)
        await response.write_eof()
    except ConnectionResetError as exc:
        failure = failure or _failure(exc)
    if failure is None:
        observer.finished()
    else:
        observer.failed(failure)
    return response


async def _write(response: web.StreamResponse, data: bytes) -> None:
    if data:
        await response.write(data)
