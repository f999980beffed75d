"""The gateway's HTTP surface: OpenAI chat/completions, Anthropic Messages and OpenAI
Responses over the fleet, plus ``/v1/models``, ``/health`` and the admin routes.

Each generation route only parses its body into a :class:`~helexa.cortex.relay.Job` in
its dialect (what to send upstream, how to stream or fold the answer) and hands it to
:func:`~helexa.cortex.relay.relay`, the one path every generation takes.

Errors are rendered in the caller's dialect: Anthropic routes (``/v1/messages*``) get
``{"type":"error","error":{...}}``, OpenAI's ``{"error":{...}}``, and every other path the
asking client's (see :func:`dialect_for`), whichever layer refuses: a route, aiohttp's
404/405/413/417, the browser guard, authentication, or a request aiohttp cannot read.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from functools import partial
from typing import Any, Literal, TypeVar

from aiohttp import HttpVersion11, hdrs, web
from pydantic import BaseModel, ConfigDict, ValidationError

from helexa.config import GatewaySettings, Settings, split_listen
from helexa.cortex.access import access_log
from helexa.cortex.auth import KeyPolicy
from helexa.cortex.fleet import Fleet
from helexa.cortex.observe import Observe, ignore
from helexa.cortex.relay import FLEET, FLIGHTS, GATEWAY, OBSERVE, Flights, Job, api_error, relay
from helexa.errors import ApiError
from helexa.neuron.interface import ModelState
from helexa.neuron.server import UNREADABLE, abandoned
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
    as_function_call,
    functions_as_tools,
)
from helexa.wire.responses.envelopes import parse_responses_request
from helexa.wire.responses.stream import ResponsesStream
from helexa.wire.responses.translate import openai_to_responses, responses_to_openai

log = logging.getLogger("helexa.gateway")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

MIB = 1024 * 1024
# A token of context is a few bytes of text; JSON escapes, tool schemas and the message
# structure around it rarely take it past 16. 64 leaves room for all of that and more.
BODY_BYTES_PER_TOKEN = 64
BODY_FLOOR_BYTES = MIB
ASSUMED_CONTEXT = 131_072  # while no context length is known: a long modern one


# -- errors ----------------------------------------------------------------------------------


_OPENAI_ONLY = ("/v1/chat/", "/v1/completions", "/v1/responses")


def dialect_for(path: str, headers: Mapping[str, str] | None = None) -> Dialect:
    """Anthropic for its routes (``/v1/messages`` and anything under it); OpenAI for its
    own; for every other path (the model routes, a mistyped one, ``/v1/complete``), the
    shape of the client asking: Anthropic's SDK sends ``anthropic-version`` on every call."""
    if path.startswith("/v1/messages"):
        return "anthropic"
    if path.startswith(_OPENAI_ONLY) or headers is None:
        return "openai"
    return "anthropic" if "anthropic-version" in headers else "openai"


def dialect_of(request: web.BaseRequest) -> Dialect:
    return dialect_for(request.path, request.headers)


def error_response(dialect: Dialect, error: ApiError) -> web.Response:
    return web.json_response(error_body(dialect, error), status=error.status)


def _unreadable(path: str | None, error: ApiError) -> web.Response:
    """A request aiohttp could not read (a line over the limit, not HTTP): in the dialect
    its path names, when the part read names one; else OpenAI's shape."""
    return error_response(dialect_for(path or ""), error)


async def _expect(request: web.Request) -> web.StreamResponse | None:
    """aiohttp's ``Expect`` handling (``100-continue`` answered, so curl sends its body),
    but refusing any other expectation in the caller's dialect: aiohttp's own refusal is
    raised before any middleware could render it. A body declared over the limit is
    refused here, before the client uploads it."""
    expect = request.headers.get(hdrs.EXPECT, "")
    if request.version != HttpVersion11:
        return None
    if expect.lower() == "100-continue":
        limit = body_limit(request.app[FLEET], request.app[GATEWAY])
        if request.content_length is not None and request.content_length > limit:
            return error_response(dialect_of(request), _too_large(limit))
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the response proper has not begun
        return None
    failure = ApiError(f"unsupported Expect: {expect!r}", status=417, code="expectation_failed")
    return error_response(dialect_of(request), failure)


# -- generation routes -------------------------------------------------------------------------


async def _body(request: web.Request) -> Any:
    return parse_json(await request.read())


def _with_model(model: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    return lambda completion: {**completion, "model": model}


async def _openai(
    request: web.Request, api: str, kind: Literal["chat", "completion"]
) -> web.StreamResponse:
    """Chat and legacy completions: the body goes upstream as the client sent it (OpenAI's
    deprecated functions put in today's terms), and the answer comes back under the model
    name it asked for (and in the deprecated terms when it asked in them)."""
    body = await _body(request)
    req = parse_chat_request(body) if kind == "chat" else parse_completion_request(body)
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    legacy = kind == "chat" and req.uses_functions  # OpenAI's deprecated functions
    answer = _with_model(req.model)
    job = Job(
        api=api,
        model=req.model,
        upstream=functions_as_tools(body) if kind == "chat" else body,
        stream=OpenAIStream(req.model, include_usage, legacy) if req.stream else None,
        answer=(lambda c: as_function_call(answer(c))) if legacy else answer,
        kind=kind,
    )
    return await relay(request, job)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _openai(request, "chat", "chat")


async def completions(request: web.Request) -> web.StreamResponse:
    return await _openai(request, "completions", "completion")


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
            count = await lease.neuron.count_tokens({**upstream, "model": lease.served_id})
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
    """Every refusal in the route's dialect, including aiohttp's own (404, 405, 413).

    Never after the response has begun: a body written then would land inside the open
    stream (a chunked one reads as garbage, and SDKs hang on it). The relay ends its own
    streams in their dialects; anything that still escapes one drops the connection, so
    the client at least sees the answer cut off.
    """
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        failure = exc
    except Exception as exc:
        if not isinstance(exc, ApiError):
            log.exception("%s %s failed", request.method, request.path)
        failure = exc
    return abandoned(request) or error_response(dialect_of(request), api_error(failure))


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


def body_limit(fleet: Fleet, gateway: GatewaySettings) -> int:
    """The largest request body accepted now, in bytes: ``gateway.max_body_mb`` when set,
    else what the longest context served can use (:data:`BODY_BYTES_PER_TOKEN` a token,
    at least :data:`BODY_FLOOR_BYTES`). A body past it cannot be a prompt any model here
    would take, and reading and parsing it costs the gateway many times its size."""
    if gateway.max_body_mb is not None:
        return int(gateway.max_body_mb * MIB)
    context = fleet.largest_context() or ASSUMED_CONTEXT
    return max(BODY_FLOOR_BYTES, context * BODY_BYTES_PER_TOKEN)


def _too_large(limit: int) -> ApiError:
    return ApiError(
        f"request body is over the gateway's limit of {limit / MIB:.3g} MiB (what the "
        "longest context served can use; [gateway] max_body_mb sets it)",
        status=413,
        code="request_too_large",
    )


def _body_limit(
    fleet: Fleet, gateway: GatewaySettings
) -> Callable[..., Awaitable[web.StreamResponse]]:
    """Bound every request body by :func:`body_limit` as it is now (models load and
    unload, so it moves): a declared length over it is refused before a byte is read, a
    chunked body once it passes it."""

    @web.middleware
    async def bound(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not request.body_exists:
            return await handler(request)
        limit = body_limit(fleet, gateway)
        if request.content_length is not None and request.content_length > limit:
            raise _too_large(limit)
        try:
            return await handler(request.clone(client_max_size=limit))
        except web.HTTPRequestEntityTooLarge:
            raise _too_large(limit) from None

    return bound


async def _drain(app: web.Application) -> None:
    """On shutdown (the listener already closed): let generations in flight finish, up
    to ``gateway.drain_s``, then end the rest, each in its own dialect."""
    await app[FLIGHTS].drain(app[GATEWAY].drain_s)


def make_app(
    fleet: Fleet, settings: Settings, *, observe: Observe | None = None
) -> web.Application:
    """The gateway app over ``fleet``; ``observe`` builds each request's hooks (metrics)."""
    gateway = settings.gateway
    browsers = BrowserPolicy.for_bind(
        split_listen(gateway.listen)[0], gateway.cors_origins, gateway.allowed_hosts
    )
    middlewares = [
        _errors,
        browser_guard(browsers),
        _auth(KeyPolicy.from_settings(gateway)),
        _body_limit(fleet, gateway),
    ]
    if gateway.access_log:  # outermost: it sees the status every refusal ends up with
        middlewares.insert(0, access_log)
    app = web.Application(middlewares=middlewares)
    install_cors(app, browsers)
    app[FLEET] = fleet
    app[OBSERVE] = observe or ignore
    app[GATEWAY] = gateway
    app[FLIGHTS] = Flights()
    app.on_shutdown.append(_drain)
    app[UNREADABLE] = _unreadable
    get, post = partial(web.get, expect_handler=_expect), partial(web.post, expect_handler=_expect)
    app.add_routes(
        [
            get("/health", health),
            get("/v1/models", list_models),
            get("/v1/models/{model:.+}", get_model),
            post("/v1/chat/completions", chat_completions),
            post("/v1/completions", completions),
            post("/v1/messages", messages),
            post("/v1/messages/count_tokens", count_tokens),
            post("/v1/responses", responses),
            post("/admin/models/load", admin_load),
            post("/admin/models/unload", admin_unload),
            post("/admin/models/pin", admin_pin),
            post("/admin/models/unpin", admin_unpin),
            get("/admin/fleet", admin_fleet),
        ]
    )
    return app
