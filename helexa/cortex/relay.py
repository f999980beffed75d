"""The generation path: one :func:`relay` every generation route takes.

A route parses the body in its dialect into a :class:`Job`; the relay takes a lease on the
model, streams the neuron's OpenAI chunks through the job's :class:`StreamFormat` (or folds
them into one answer), reports to the request's observer, and releases the lease whatever
happens. Chunks are written as they arrive, never collected first, and a client that hangs
up closes the neuron's stream so generation stops. A node that fails before the first
chunk is marked down and the request routed once more; once a stream has started the
status line is gone, so every failure from then on rides the stream instead (an Anthropic
``error`` event, an OpenAI ``data: {"error":...}`` frame, a Responses ``response.failed``)
and the response ends cleanly: nothing after ``prepare()`` may become a JSON body.

Each request in flight is a :class:`Flight`, which may be cut short wherever it waits: by
its node failing a poll (a frozen host keeps its connections open and silent), by its node
going quiet for ``gateway.stream_idle_timeout_s`` once output has started, or by the
gateway stopping (:class:`Flights` drains them, then ends the rest).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import aclosing, asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any, Literal

from aiohttp import web

from helexa.config import GatewaySettings
from helexa.cortex.access import ACCESS
from helexa.cortex.fleet import Fleet, Lease, ModelNotFound, NoCapacity
from helexa.cortex.observe import CLIENT_GONE, Fanout, Observe, RequestInfo, RequestObserver
from helexa.errors import ApiError
from helexa.wire.errors import anthropic_error_type, openai_error_body, openai_error_type
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


def shutting_down() -> ApiError:
    return ApiError(
        "the gateway is shutting down; retry the request", status=503, code="shutting_down"
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


# -- requests in flight -----------------------------------------------------------------------


class Flight:
    """One relayed request, and the clock that may cut it short where it waits.

    Inside :meth:`guard` the request is cut (the block raises the reason, an ApiError)
    when :meth:`stop` is called (the gateway stopping: every later guard is cut too), when
    :meth:`cut` is called (its node failed a poll: this wait only), or when :meth:`next`
    waits longer than ``idle_s`` for a chunk. Cutting is asyncio's own timeout, so a
    client hanging up (a plain cancellation) is never mistaken for one.
    """

    def __init__(self, idle_s: float = 0.0) -> None:
        self.idle_s = idle_s
        self.stopped: ApiError | None = None
        self._cut: ApiError | None = None
        self._clock: asyncio.Timeout | None = None
        self._node = ""  # the node being waited on, for the idle message

    def stop(self, reason: ApiError) -> None:
        """End the request with ``reason``: now, or at its next wait."""
        self.stopped = self.stopped or reason
        self._fire()

    def cut(self, reason: ApiError) -> None:
        """End the current wait with ``reason`` (its node is gone); ignored between waits,
        when the request is already handling its own failure."""
        if self._clock is not None:
            self._cut = self._cut or reason
            self._fire()

    def _fire(self) -> None:
        clock = self._clock
        if clock is not None and not clock.expired():
            clock.reschedule(asyncio.get_running_loop().time())

    @asynccontextmanager
    async def guard(self, node: str = "") -> AsyncIterator[None]:
        """A block the flight may be cut in; raises the reason when it is."""
        self._node = node
        try:
            async with asyncio.timeout_at(None) as clock:
                self._clock = clock
                if self.stopped is not None:
                    self._fire()
                yield
        except TimeoutError:
            if not clock.expired():
                raise  # someone else's timeout, raised inside the block
            reason, self._cut = self.stopped or self._cut or self._idle(), None
            raise reason from None
        finally:
            self._clock = None

    def _idle(self) -> ApiError:
        return ApiError(
            f"node {self._node!r} sent nothing for {self.idle_s:g} s (gateway "
            "stream_idle_timeout_s); the answer was ended",
            status=504,
            code="stream_idle_timeout",
        )

    async def next(self, chunks: AsyncIterator[dict[str, Any]]) -> dict[str, Any] | None:
        """The next chunk, or None at the end; inside :meth:`guard`, and cut after
        ``idle_s`` (when set) without one."""
        clock = self._clock
        assert clock is not None, "Flight.next outside Flight.guard"
        loop = asyncio.get_running_loop()

        def quiet() -> bool:  # no cut pending: the idle clock is ours to set
            return not clock.expired() and self.stopped is None and self._cut is None

        if self.idle_s and quiet():
            clock.reschedule(loop.time() + self.idle_s)
        try:
            return await _next(chunks)
        finally:
            if quiet():
                clock.reschedule(None)


class Flights:
    """Every relayed request in flight, so that a stopping gateway can let them finish
    (up to ``drain_s``) and then end the rest, each in its own dialect."""

    def __init__(self) -> None:
        self._flights: set[Flight] = set()
        self._empty = asyncio.Event()
        self._empty.set()
        self.draining = asyncio.Event()  # set once the gateway has begun to stop

    @contextmanager
    def track(self, flight: Flight) -> Iterator[Flight]:
        """Count ``flight`` in for the block; a draining gateway starts nothing new."""
        if self.draining.is_set():
            flight.stop(shutting_down())
        self._flights.add(flight)
        self._empty.clear()
        try:
            yield flight
        finally:
            self._flights.discard(flight)
            if not self._flights:
                self._empty.set()

    async def drain(self, drain_s: float, grace_s: float = 5.0) -> None:
        """Refuse new requests, wait up to ``drain_s`` for those in flight, then stop the
        rest (a stream gets its dialect's error event, a request still waiting a 503) and
        give them up to ``grace_s`` to write it."""
        self.draining.set()
        if self._flights:
            log.info("draining %d request(s) for up to %g s", len(self._flights), drain_s)
        if not await self._wait_empty(drain_s):
            log.warning("ending %d request(s) still in flight", len(self._flights))
            for flight in list(self._flights):
                flight.stop(shutting_down())
            await self._wait_empty(grace_s)

    async def _wait_empty(self, seconds: float) -> bool:
        try:
            async with asyncio.timeout(seconds):
                await self._empty.wait()
        except TimeoutError:
            return False
        return True


# -- app state: set by make_app, read by every request -----------------------------------------

FLEET = web.AppKey("fleet", Fleet)
OBSERVE = web.AppKey("observe", Observe)
FLIGHTS = web.AppKey("flights", Flights)
GATEWAY = web.AppKey("gateway", GatewaySettings)


# -- the relay --------------------------------------------------------------------------------


async def _next(stream: AsyncIterator[dict[str, Any]]) -> dict[str, Any] | None:
    try:
        return await anext(stream)
    except StopAsyncIteration:
        return None


# The upstream body's fields a request view shows as they are; the conversation and the
# tool list are shown by their length (they can be megabytes).
_COUNTED = ("messages", "prompt", "tools")
_SKIPPED = ("model", "stream", "stream_options")


def request_info(request: web.Request, job: Job) -> RequestInfo:
    params: dict[str, Any] = {}
    for key, value in job.upstream.items():
        if key in _COUNTED:
            params[key] = len(value) if isinstance(value, list | str) else 1
        elif key not in _SKIPPED:
            params[key] = value
    return RequestInfo(
        method=request.method,
        route=request.path,
        client=request.remote or "",
        agent=request.headers.get("User-Agent", ""),
        stream=job.stream is not None,
        params=params,
    )


async def relay(request: web.Request, job: Job) -> web.StreamResponse:
    """Route ``job`` to a neuron and answer it; the one path every generation takes.

    Every outcome is reported to the observer exactly once: the stream writer reports its
    own, anything raised before is reported here.
    """
    observer = request.app[OBSERVE](job.api, job.model)
    record = request.get(ACCESS)
    if record is not None:  # the access log's middleware is on
        record.model = job.model
        observer = Fanout([record, observer])
    observer.started(request_info(request, job))
    flight = Flight(request.app[GATEWAY].stream_idle_timeout_s)
    with request.app[FLIGHTS].track(flight):
        try:
            return await _route(request, job, observer, flight)
        except BaseException as exc:
            observer.failed(_failure(exc))
            raise


async def _route(
    request: web.Request, job: Job, observer: RequestObserver, flight: Flight
) -> web.StreamResponse:
    """When the node fails before its first chunk (refused connection, dropped stream,
    failing a poll meanwhile) nothing has reached the client yet, so the node is marked down
    and the request is routed once more, to another node; after the first chunk a failure
    can only ride the stream."""
    fleet = request.app[FLEET]
    gone: BaseException | None = None  # the first node's failure, when rerouting
    while True:
        async with flight.guard():
            lease = await _acquire(fleet, job, gone)
        # Leaving the lease releases it, and tells the fleet when the node was unreachable.
        async with lease:
            lease.on_down = flight.cut
            observer.routed(lease)
            # The catalogue's sampling defaults go under whatever the client sent.
            upstream = fleet.catalogue.apply_sampling(
                lease.canonical_id, {**job.upstream, "model": lease.served_id}
            )
            generate = lease.neuron.chat if job.kind == "chat" else lease.neuron.complete
            async with aclosing(generate(upstream)) as chunks:
                try:
                    async with flight.guard(lease.node.name):
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
                    return await _fold(first, chunks, job, observer, flight, lease)
                return await _stream(request, first, chunks, job, observer, flight, lease)


async def _acquire(fleet: Fleet, job: Job, gone: BaseException | None) -> Lease:
    """A lease for ``job``; when rerouting and no other node can take it, the first node's
    failure is the reason the request fails (not "no capacity" or "not found")."""
    try:
        return await fleet.acquire(job.model)
    except (ModelNotFound, NoCapacity) as exc:
        if gone is None:
            raise
        raise gone from exc


def _failure(exc: BaseException) -> ApiError:
    if isinstance(exc, asyncio.CancelledError | ConnectionResetError):
        return ApiError("client disconnected", status=CLIENT_GONE, code="client_disconnected")
    return api_error(exc)


async def _fold(
    first: dict[str, Any] | None,
    chunks: AsyncIterator[dict[str, Any]],
    job: Job,
    observer: RequestObserver,
    flight: Flight,
    lease: Lease,
) -> web.Response:
    collected: list[dict[str, Any]] = []
    acc = ChatAccumulator()
    async with flight.guard(lease.node.name):
        chunk = first
        while chunk is not None:
            observer.chunk(chunk)
            if job.kind == "chat":
                acc.add(chunk)
            else:
                collected.append(chunk)
            chunk = await flight.next(chunks)
    completion = acc.result() if job.kind == "chat" else accumulate_completion(collected)
    body = job.answer(completion)
    observer.finished()
    return web.json_response(body)


async def _stream(
    request: web.Request,
    first: dict[str, Any] | None,
    chunks: AsyncIterator[dict[str, Any]],
    job: Job,
    observer: RequestObserver,
    flight: Flight,
    lease: Lease,
) -> web.StreamResponse:
    """Write the stream; ``first`` was awaited before the headers, so a neuron that refuses
    the request outright (context too long, model gone) is a proper HTTP error status.

    From ``prepare()`` on this never raises, except a cancellation (the client hung up):
    every failure, the dialect's own writer failing included, ends the stream with an
    error event, and the outcome is reported here.
    """
    assert job.stream is not None
    fmt = job.stream
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    failure: ApiError | None = None
    try:
        async with flight.guard(lease.node.name):
            await response.prepare(request)
            chunk = first
            while chunk is not None:
                observer.chunk(chunk)
                await _write(response, fmt.feed(chunk))
                chunk = await flight.next(chunks)
            tail = fmt.finish()
    except ConnectionResetError as exc:
        observer.failed(_failure(exc))
        return response  # the caller's aclosing stops the neuron
    except Exception as exc:  # headers are sent: the failure has to ride the stream
        if not response.prepared:
            raise  # cut before the first byte: a status line can still say it
        lease.failed(exc)  # a dropped stream is a node gone: the next request reroutes
        failure = api_error(exc)
        tail = _failure_frames(fmt, failure, job.api)
    try:  # not cut: a stopping gateway waits for this last word (up to its grace)
        await _write(response, tail)
        await response.write_eof()
    except ConnectionResetError as exc:
        failure = failure or _failure(exc)
    if failure is None:
        observer.finished()
    else:
        observer.failed(failure)
    return response


def _failure_frames(fmt: StreamFormat, failure: ApiError, api: str) -> bytes:
    """The dialect's terminal error frames for ``failure``; should its writer fail too (a
    payload it cannot encode), frames built from the failure alone, in ASCII JSON."""
    try:
        return fmt.fail(failure)
    except Exception:
        log.exception("the %s stream writer failed to end a failed stream", api)
    code = failure.code or "server_error"
    if api == "messages":
        kind = anthropic_error_type(failure.status)
        frames = [("error", {"type": "error", "error": {"type": kind, "message": failure.message}})]
    elif api == "responses":
        error = {"code": code, "message": failure.message}
        response = {"object": "response", "status": "failed", "error": error}
        frames = [
            ("error", {"type": "error", **error, "param": None}),
            ("response.failed", {"type": "response.failed", "response": response}),
        ]
    else:
        kind = failure.type or openai_error_type(failure.status)
        body = openai_error_body(failure.message, type=kind, code=code)
        return f"data: {json.dumps(body)}\n\n".encode()
    return b"".join(f"event: {n}\ndata: {json.dumps(p)}\n\n".encode() for n, p in frames)


async def _write(response: web.StreamResponse, data: bytes) -> None:
    if data:
        await response.write(data)
