"""The gateway's HTTP surface: OpenAI chat/completions, Anthropic Messages and OpenAI
Responses over the fleet, plus ``/v1/models``, ``/health`` and the admin routes.

Every generation route follows one path (:func:`relay`): parse the body in the route's
dialect, take a lease on the model, stream the neuron's OpenAI chunks through that
dialect's :class:`StreamFormat` (or fold them into one answer), and release the lease
whatever happens. Chunks are written as they arrive, never collected first, and a client
that hangs up closes the neuron's stream so generation stops.

Errors are rendered in the caller's dialect: Anthropic routes (``/v1/messages*``) get
``{"type":"error","error":{...}}``, everything else OpenAI's ``{"error":{...}}``. Once a
stream has started the status line is gone, so a failure rides the stream instead (an
Anthropic ``error`` event, an OpenAI ``data: {"error":...}`` frame, a Responses
``response.failed``) and the response ends cleanly.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from aiohttp import web
from pydantic import BaseModel, ConfigDict, ValidationError

from helexa.config import Settings, split_listen
from helexa.cortex.auth import KeyPolicy
from helexa.cortex.fleet import Fleet, Lease, ModelNotFound, NoCapacity
from helexa.errors import ApiError
from helexa.neuron.interface import ModelState
from helexa.origins import BrowserPolicy, browser_guard, install_cors
from helexa.wire.anthropic.envelopes import parse_count_tokens_request, parse_messages_request
from helexa.wire.anthropic.stream import AnthropicStream
from helexa.wire.anthropic.translate import anthropic_to_openai, openai_to_anthropic
from helexa.wire.base import parse_json
from helexa.wire.errors import Dialect, WireError, error_body, validation_message
from helexa.wire.openai.envelopes import (
    Model,
    ModelList,
    parse_chat_request,
    parse_completion_request,
)
from helexa.wire.openai.stream import OpenAIStream
from helexa.wire.openai.translate import (
    ChatAccumulator,
    accumulate_completion,
    as_function_call,
    functions_as_tools,
)
from helexa.wire.responses.envelopes import parse_responses_request
from helexa.wire.responses.stream import ResponsesStream
from helexa.wire.responses.translate import openai_to_responses, responses_to_openai
from helexa.wire.sse import StreamFormat

log = logging.getLogger("helexa.gateway")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Conversations (with tool results) easily pass aiohttp's 1 MiB default.
MAX_BODY_BYTES = 64 * 1024 * 1024
CLIENT_GONE = 499  # nginx's "client closed request": for hooks, never sent


# -- failures --------------------------------------------------------------------------------


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


def dialect_of(request: web.BaseRequest) -> Dialect:
    """Anthropic for its routes, and for the shared model routes when an Anthropic client
    (``anthropic-version`` header) asks, as the model list switches shape for it."""
    path = request.path
    if path.startswith("/v1/messages"):
        return "anthropic"
    if path.startswith("/v1/models") and "anthropic-version" in request.headers:
        return "anthropic"
    return "openai"


def error_response(dialect: Dialect, error: ApiError) -> web.Response:
    return web.json_response(error_body(dialect, error), status=error.status)


# -- per-request hooks ------------------------------------------------------------------------


class RequestObserver:
    """The hook points of one generation request; this base ignores them all.

    Metrics and traffic taps subclass it and hand :func:`make_app` a factory. Every route
    reports through :func:`relay` in one order: ``routed`` (lease taken), ``chunk`` for
    every upstream chunk (the first is time-to-first-token; the last carries usage, even
    when the client did not ask to see it), then exactly one of ``finished`` or ``failed``.
    A failure before routing (bad body, unknown model) reports ``failed`` alone. A request
    whose node fails before its first chunk is rerouted: ``routed`` comes again, with the
    new lease, before any ``chunk``.
    """

    def routed(self, lease: Lease) -> None:
        pass

    def chunk(self, chunk: dict[str, Any]) -> None:
        pass

    def finished(self) -> None:
        pass

    def failed(self, failure: ApiError) -> None:
        pass


# (api: "chat" | "completions" | "messages" | "responses", requested model) -> observer
Observe = Callable[[str, str], RequestObserver]


def _ignore(api: str, model: str) -> RequestObserver:
    return RequestObserver()


class _Fanout(RequestObserver):
    def __init__(self, observers: list[RequestObserver]) -> None:
        self.observers = observers

    def routed(self, lease: Lease) -> None:
        for o in self.observers:
            o.routed(lease)

    def chunk(self, chunk: dict[str, Any]) -> None:
        for o in self.observers:
            o.chunk(chunk)

    def finished(self) -> None:
        for o in self.observers:
            o.finished()

    def failed(self, failure: ApiError) -> None:
        for o in self.observers:
            o.failed(failure)


def observe_all(*factories: Observe) -> Observe:
    """One ``observe`` factory feeding several (metrics and the TUI's traffic tap)."""

    def observe(api: str, model: str) -> RequestObserver:
        return _Fanout([factory(api, model) for factory in factories])

    return observe


@dataclass
class Job:
    """One generation request, parsed: what to send upstream and how to answer.

    ``upstream`` is the OpenAI body for the neuron; its ``model`` is replaced by the
    lease's model id, while everything the client sees keeps ``model`` as it was asked.
    ``answer`` turns the folded upstream completion into the response body.
    """

    api: str
    model: str
    upstream: dict[str, Any]
    stream: StreamFormat | None
    answer: Callable[[dict[str, Any]], dict[str, Any]]
    kind: Literal["chat", "completion"] = "chat"


# -- app state --------------------------------------------------------------------------------

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
                        lease.model or job.model, {**job.upstream, "model": lease.model_id}
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


# -- generation routes -------------------------------------------------------------------------


async def _body(request: web.Request) -> Any:
    return parse_json(await request.read())


def _with_model(model: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    return lambda completion: {**completion, "model": model}


async def chat_completions(request: web.Request) -> web.StreamResponse:
    body = await _body(request)
    req = parse_chat_request(body)
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    legacy, answer = req.uses_functions, _with_model(req.model)
    job = Job(
        api="chat",
        model=req.model,
        upstream=functions_as_tools(body),
        stream=OpenAIStream(req.model, include_usage, legacy) if req.stream else None,
        answer=(lambda c: as_function_call(answer(c))) if legacy else answer,
    )
    return await relay(request, job)


async def completions(request: web.Request) -> web.StreamResponse:
    body = await _body(request)
    req = parse_completion_request(body)
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    job = Job(
        api="completions",
        model=req.model,
        upstream=body,
        stream=OpenAIStream(req.model, include_usage) if req.stream else None,
        answer=_with_model(req.model),
        kind="completion",
    )
    return await relay(request, job)


async def messages(request: web.Request) -> web.StreamResponse:
    req = parse_messages_request(await _body(request))
    job = Job(
        api="messages",
        model=req.model,
        upstream=anthropic_to_openai(req),
        stream=AnthropicStream(req.model) if req.stream else None,
        answer=lambda completion: openai_to_anthropic(completion, req.model),
    )
    return await relay(request, job)


async def responses(request: web.Request) -> web.StreamResponse:
    req = parse_responses_request(await _body(request))
    job = Job(
        api="responses",
        model=req.model,
        upstream=responses_to_openai(req),
        stream=ResponsesStream(req) if req.stream else None,
        answer=lambda completion: openai_to_responses(completion, req),
    )
    return await relay(request, job)


async def count_tokens(request: web.Request) -> web.Response:
    """Prompt tokens for an Anthropic request, from a node with the model's tokenizer.

    A node that has the model loaded answers without a lease (counting holds no slot);
    only when none has it does the request take the ordinary route, loading it.
    """
    req = parse_count_tokens_request(await _body(request))
    fleet = request.app[FLEET]
    model_id = fleet.resolve(req.model)
    upstream = anthropic_to_openai(req)
    loaded = [
        (n, s)
        for n, s in fleet.known_models().get(model_id, [])
        if s.status == "loaded" and not fleet.evicting(n.name, model_id)
    ]
    if loaded:
        node, state = loaded[0]  # state.id: the name this node knows the model by
        count = await node.neuron.count_tokens({**upstream, "model": state.id})
    else:
        async with await fleet.acquire(model_id) as lease:
            count = await lease.neuron.count_tokens({**upstream, "model": lease.model_id})
    return web.json_response({"input_tokens": count})


# -- catalogue routes --------------------------------------------------------------------------


def _status(states: list[ModelState]) -> str:
    for status in ("loaded", "loading", "unloaded", "failed"):
        if any(s.status == status for s in states):
            return status
    return "unloaded"


def _model_entry(fleet: Fleet, model_id: str, served: list[tuple[Any, ModelState]]) -> Model:
    """One model as clients see it: the names it also answers to (catalogue aliases), and
    ``context_length`` (the smallest loaded copy's, since a request may go to any of them;
    else what the catalogue will load it with) so agents can size requests and compaction."""
    loaded = [s.context_length for _, s in served if s.context_length]
    profile = fleet.catalogue.profile(model_id)
    context = min(loaded) if loaded else profile.context_length if profile else None
    return Model(
        id=model_id,
        status=_status([s for _, s in served]),
        nodes=sorted(node.name for node, _ in served),
        aliases=list(profile.aliases) if profile else [],
        context_length=context,
    )


def _anthropic_model(model: Model) -> dict[str, Any]:
    return {
        "type": "model",
        "id": model.id,
        "display_name": model.id,
        "created_at": "1970-01-01T00:00:00Z",
    }


async def list_models(request: web.Request) -> web.Response:
    """The models some up node serves, in OpenAI's list shape (Anthropic's for its SDK)."""
    known = request.app[FLEET].known_models()
    models = [_model_entry(request.app[FLEET], m, known[m]) for m in sorted(known)]
    if "anthropic-version" in request.headers:
        data = [_anthropic_model(m) for m in models]
        return web.json_response(
            {
                "data": data,
                "has_more": False,
                "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None,
            }
        )
    return web.json_response(ModelList(data=models).model_dump())


async def get_model(request: web.Request) -> web.Response:
    fleet = request.app[FLEET]
    model_id = fleet.resolve(request.match_info["model"])
    model = _model_entry(fleet, model_id, fleet.known_models()[model_id])
    if "anthropic-version" in request.headers:
        return web.json_response(_anthropic_model(model))
    return web.json_response(model.model_dump())


async def health(request: web.Request) -> web.Response:
    nodes = request.app[FLEET].nodes.values()
    up = sum(1 for n in nodes if n.up)
    return web.json_response({"status": "ok", "nodes_up": up, "nodes": len(nodes)})


# -- admin routes ------------------------------------------------------------------------------


class AdminModelRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    node: str | None = None


class AdminPinRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    node: str  # a pin is per node: "never evict it from here"


_Admin = TypeVar("_Admin", AdminModelRequest, AdminPinRequest)


async def _admin_body(request: web.Request, shape: type[_Admin]) -> _Admin:
    body = await _body(request)
    try:
        return shape.model_validate(body)
    except ValidationError as exc:
        raise WireError(400, validation_message(exc, body)) from None


async def admin_load(request: web.Request) -> web.Response:
    req = await _admin_body(request, AdminModelRequest)
    node = await request.app[FLEET].load(req.model, req.node)
    return web.json_response({"model": req.model, "status": "loaded", "node": node})


async def admin_unload(request: web.Request) -> web.Response:
    req = await _admin_body(request, AdminModelRequest)
    nodes = await request.app[FLEET].unload(req.model, req.node)
    return web.json_response({"model": req.model, "status": "unloaded", "nodes": nodes})


async def admin_pin(request: web.Request) -> web.Response:
    req = await _admin_body(request, AdminPinRequest)
    model = request.app[FLEET].pin(req.model, req.node)
    return web.json_response({"model": model, "node": req.node, "pinned": True})


async def admin_unpin(request: web.Request) -> web.Response:
    req = await _admin_body(request, AdminPinRequest)
    model = request.app[FLEET].unpin(req.model, req.node)
    return web.json_response({"model": model, "node": req.node, "pinned": False})


async def admin_fleet(request: web.Request) -> web.Response:
    return web.json_response(request.app[FLEET].snapshot())


# -- app ---------------------------------------------------------------------------------------


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every refusal in the route's dialect, including aiohttp's own (404, 405, 413)."""
    try:
        return await handler(request)
    except ApiError as exc:
        return error_response(dialect_of(request), api_error(exc))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error_response(dialect_of(request), api_error(exc))
    except Exception as exc:
        log.exception("%s %s failed", request.method, request.path)
        return error_response(dialect_of(request), api_error(exc))


def _auth(policy: KeyPolicy) -> Callable[..., Awaitable[web.StreamResponse]]:
    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        refusal = policy.refusal(request.path, request.headers)
        if refusal is not None:
            failure = ApiError(
                refusal, status=401, code="invalid_api_key", type="authentication_error"
            )
            return error_response(dialect_of(request), failure)
        return await handler(request)

    return check


async def _cancel_streams(app: web.Application) -> None:
    """On shutdown, end generations now instead of waiting for them to finish."""
    for task in list(app[STREAMS]):
        task.cancel()


def make_app(
    fleet: Fleet, settings: Settings, *, observe: Observe | None = None
) -> web.Application:
    """The gateway app over ``fleet``; ``observe`` builds each request's hooks (metrics)."""
    gateway = settings.gateway
    browsers = BrowserPolicy.for_bind(
        split_listen(gateway.listen)[0], gateway.cors_origins, gateway.allowed_hosts
    )
    app = web.Application(
        middlewares=[_errors, browser_guard(browsers), _auth(KeyPolicy.from_settings(gateway))],
        client_max_size=MAX_BODY_BYTES,
    )
    install_cors(app, browsers)
    app[FLEET] = fleet
    app[OBSERVE] = observe or _ignore
    app[STREAMS] = set()
    app.on_shutdown.append(_cancel_streams)
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model:.+}", get_model)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/messages", messages)
    app.router.add_post("/v1/messages/count_tokens", count_tokens)
    app.router.add_post("/v1/responses", responses)
    app.router.add_post("/admin/models/load", admin_load)
    app.router.add_post("/admin/models/unload", admin_unload)
    app.router.add_post("/admin/models/pin", admin_pin)
    app.router.add_post("/admin/models/unpin", admin_unpin)
    app.router.add_get("/admin/fleet", admin_fleet)
    return app
