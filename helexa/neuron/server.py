"""The neuron HTTP API: any :class:`Neuron` served over HTTP for a remote gateway.

``helexa neuron`` runs this over the local engine; :class:`~helexa.neuron.remote.RemoteNeuron`
is its client, so a gateway cannot tell a remote node from an in-process one. Generation
routes speak OpenAI: the neuron's chunk dicts go out as SSE ``data:`` frames unchanged, or
folded into one completion when the caller did not ask for a stream.

Errors use the neuron API's one shape, ``{"error": {"type", "message", "code", ...}}``,
with the status the neuron chose, so a preflight refusal (507 with ``needed_mb``) reaches
the gateway intact. An error after the stream started rides the stream as a
``data: {"error": ...}`` frame with no ``[DONE]`` after it.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import signal
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from typing import Any, TypeVar

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong
from pydantic import BaseModel, ValidationError

from helexa.config import Settings, split_listen
from helexa.errors import ApiError
from helexa.neuron.interface import LoadRequest, ModelState, Neuron, NeuronError, UnloadRequest
from helexa.origins import BrowserPolicy, browser_guard
from helexa.wire.base import parse_json
from helexa.wire.errors import WireError, validation_message
from helexa.wire.openai.envelopes import parse_chat_request, parse_completion_request
from helexa.wire.openai.translate import ChatAccumulator, accumulate_completion
from helexa.wire.sse import SSE_DONE, sse

log = logging.getLogger("helexa.neuron")

NEURON = web.AppKey("neuron", Neuron)
# Chat requests carry whole conversations; aiohttp's 1 MiB default is far too small.
MAX_BODY_BYTES = 64 * 1024 * 1024

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
M = TypeVar("M", bound=BaseModel)


# -- serving helpers shared with the gateway -------------------------------------------------


class ListenError(Exception):
    """The address could not be bound (in use, not ours, no permission)."""


# A request line or one header longer than this is refused (414/431) before any route sees
# it; aiohttp's own 8190 would refuse long query strings and large bearer tokens alike.
MAX_LINE_BYTES = 64 * 1024

# How a server answers a request that never reached its routes (unreadable HTTP, or a
# failure aiohttp caught itself): the path when it is known, and the refusal.
Unreadable = Callable[[str | None, ApiError], web.Response]
UNREADABLE = web.AppKey("unreadable", Unreadable)


def _unreadable_default(path: str | None, error: ApiError) -> web.Response:
    return error_response(error)


def refusal_of(exc: HttpProcessingError) -> tuple[ApiError, str | None]:
    """What a client is told about a request aiohttp could not read, and its path when
    the part that could be read names one (a request line too long starts with it)."""
    if isinstance(exc, LineTooLong):
        line = exc.args[0] if exc.args else b""
        text = bytes(line).decode("latin-1") if isinstance(line, bytes | bytearray) else str(line)
        if text.startswith("/"):
            message = f"the request line is over {MAX_LINE_BYTES} bytes"
            path = text.partition("?")[0].removesuffix("...")
            return ApiError(message, status=414, code="uri_too_long"), path
        message = f"a request header is over {MAX_LINE_BYTES} bytes"
        return ApiError(message, status=431, code="header_too_large"), None
    message = f"the request is not valid HTTP: {exc.message or type(exc).__name__}"
    return ApiError(message, status=exc.code or 400, code="bad_request"), None


class _Protocol(web.RequestHandler):
    """aiohttp's connection handler, answering what it refuses itself through the app's
    :data:`UNREADABLE` (JSON in the app's error shape, not a text/plain page), logging an
    unreadable request in one line instead of a traceback per request."""

    __slots__ = ("unreadable",)

    def __init__(self, manager: web.Server, *, unreadable: Unreadable, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self.unreadable = unreadable

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if isinstance(exc, HttpProcessingError):
            error, path = refusal_of(exc)
            log.info("refused a request from %s: %s", request.remote, error.message)
        else:  # a handler failure no middleware caught: a bug, worth its traceback
            self.log_exception("Error handling request from %s", request.remote, exc_info=exc)
            if request.writer.output_size > 0:
                raise ConnectionError("the response had begun when the handler failed")
            error, path = ApiError("internal error", status=status, code="internal_error"), None
        response = self.unreadable(path, error)
        response.force_close()
        return response


class _Server(web.Server):
    def __init__(self, *args: Any, unreadable: Unreadable, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.unreadable = unreadable

    def __call__(self) -> web.RequestHandler:
        return _Protocol(self, loop=self._loop, unreadable=self.unreadable, **self._kwargs)


class _Runner(web.AppRunner):
    """An AppRunner whose connections are :class:`_Protocol`. aiohttp (3.14) offers no
    hook for its own error pages, so the server it makes is rebuilt around that class."""

    async def _make_server(self) -> web.Server:
        made = await super()._make_server()
        return _Server(
            made.request_handler,
            request_factory=made.request_factory,
            handler_cancellation=made.handler_cancellation,
            loop=made._loop,
            unreadable=self.app.get(UNREADABLE, _unreadable_default),
            **made._kwargs,
        )


async def start_server(app: web.Application, host: str, port: int) -> tuple[web.AppRunner, str]:
    """Serve ``app`` on ``host:port`` (0 picks a free port); return the runner and base URL.

    Handler cancellation is on: when a client hangs up, its handler is cancelled where it
    waits, which closes the neuron's stream and so stops generation mid-token-stream instead
    of at the next write. Requests that cannot be read are answered by ``app[UNREADABLE]``.
    """
    runner = _Runner(
        app,
        handler_cancellation=True,
        shutdown_timeout=5.0,
        max_line_size=MAX_LINE_BYTES,
        max_field_size=MAX_LINE_BYTES,
    )
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except BaseException as exc:
        await runner.cleanup()
        if isinstance(exc, OSError):
            raise ListenError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
        raise
    bound = runner.addresses[0][1]  # the real port when 0 was asked for
    shown = f"[{host}]" if ":" in host else host
    return runner, f"http://{shown}:{bound}"


def abandoned(request: web.BaseRequest) -> web.Response | None:
    """For an error middleware: when the response to ``request`` has already begun, an
    error body would land inside it (a chunked stream then reads as garbage, and clients
    hang on it), so its connection is closed and a stand-in returned that aiohttp fails
    to send, quietly; None while nothing has been sent."""
    if request.writer.output_size == 0:
        return None
    if request.transport is not None:
        request.transport.close()
    return web.Response(status=500)


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps the API on this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a hostname or wildcard: reachable from elsewhere


def token_ok(header: str | None, token: str) -> bool:
    """Constant-time check of an ``Authorization: Bearer`` header against ``token``."""
    scheme, _, presented = (header or "").partition(" ")
    return hmac.compare_digest(
        presented.strip().encode() if scheme.lower() == "bearer" else b"", token.encode()
    )


# -- responses -------------------------------------------------------------------------------


def internal_error(exc: BaseException) -> NeuronError:
    """A failure that is no refusal (a bug) as the 500 a caller is told about."""
    return NeuronError(
        f"internal error: {type(exc).__name__}: {exc}",
        status=500,
        type="server_error",
        code="internal_error",
    )


def error_response(exc: ApiError) -> web.Response:
    if not isinstance(exc, NeuronError):
        body = {
            "error": {
                "type": exc.type or "invalid_request_error",
                "message": exc.message,
                "code": exc.code,
                "param": exc.param,
            }
        }
        return web.json_response(body, status=exc.status)
    return web.json_response(exc.to_body(), status=exc.status)


def _dump(model: BaseModel) -> dict[str, Any]:
    return model.model_dump(mode="json")


async def _json_body(request: web.Request) -> Any:
    return parse_json(await request.read())


async def _parse(request: web.Request, model: type[M]) -> M:
    body = await _json_body(request)
    if not isinstance(body, dict):
        raise WireError(400, "request body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise WireError(400, validation_message(exc, body)) from None


async def _first(stream: AsyncIterator[dict[str, Any]]) -> dict[str, Any] | None:
    try:
        return await anext(stream)
    except StopAsyncIteration:
        return None


async def stream_sse(
    request: web.Request, stream: AsyncIterator[dict[str, Any]]
) -> web.StreamResponse:
    """Relay chunk dicts as SSE. An error before the first chunk is a plain HTTP error;
    after it, any error (a bug included) is the stream's last frame, never a status line
    written into the open stream, which the gateway would read as the node dropping."""
    first = await _first(stream)  # NeuronError here becomes the HTTP status
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    await response.prepare(request)
    try:
        tail = SSE_DONE
        try:
            if first is not None:
                await response.write(sse(first))
                async for chunk in stream:
                    await response.write(sse(chunk))
        except ConnectionResetError:
            raise
        except NeuronError as exc:
            tail = sse(exc.to_body())
        except Exception as exc:
            log.exception("stream failed after its first chunk")
            tail = sse(internal_error(exc).to_body())
        await response.write(tail)
        await response.write_eof()
    except ConnectionResetError:
        pass  # the caller hung up; the caller's aclosing stops generation
    return response


# -- handlers --------------------------------------------------------------------------------


async def discovery(request: web.Request) -> web.Response:
    return web.json_response(_dump(await request.app[NEURON].discovery()))


async def health(request: web.Request) -> web.Response:
    return web.json_response(_dump(await request.app[NEURON].health()))


async def models(request: web.Request) -> web.Response:
    return web.json_response([_dump(m) for m in await request.app[NEURON].models()])


async def load(request: web.Request) -> web.Response:
    body = await _parse(request, LoadRequest)
    return web.json_response(_dump(await request.app[NEURON].load(body)))


async def unload(request: web.Request) -> web.Response:
    body = await _parse(request, UnloadRequest)
    await request.app[NEURON].unload(body.model_id)
    return web.json_response(_dump(ModelState(id=body.model_id, status="unloaded")))


async def _generate(
    request: web.Request,
    parse: Callable[[Any], Any],
    start: Callable[[dict[str, Any]], AsyncIterator[dict[str, Any]]],
    fold: Callable[[AsyncIterator[dict[str, Any]]], Awaitable[dict[str, Any]]],
) -> web.StreamResponse:
    """A generation route: the node's chunks as SSE, or folded into one answer."""
    body = await _json_body(request)
    req = parse(body)
    async with aclosing(start(body)) as stream:
        if req.stream:
            return await stream_sse(request, stream)
        return web.json_response(await fold(stream))


async def _chat_answer(stream: AsyncIterator[dict[str, Any]]) -> dict[str, Any]:
    acc = ChatAccumulator()
    async for chunk in stream:
        acc.add(chunk)
    return acc.result()


async def _completion_answer(stream: AsyncIterator[dict[str, Any]]) -> dict[str, Any]:
    return accumulate_completion([c async for c in stream])


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, parse_chat_request, request.app[NEURON].chat, _chat_answer)


async def completions(request: web.Request) -> web.StreamResponse:
    neuron = request.app[NEURON]
    return await _generate(request, parse_completion_request, neuron.complete, _completion_answer)


async def tokenize(request: web.Request) -> web.Response:
    body = await _json_body(request)
    parse_chat_request(body)
    return web.json_response({"input_tokens": await request.app[NEURON].count_tokens(body)})


# -- app -------------------------------------------------------------------------------------


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure in the neuron API's error shape, never aiohttp's text pages (and
    never a body once a response has begun: the connection is dropped instead)."""
    try:
        return await handler(request)
    except ApiError as exc:
        failure: ApiError = exc
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        failure = NeuronError(exc.reason, status=exc.status, type="invalid_request_error")
    except Exception as exc:
        log.exception("%s %s failed", request.method, request.path)
        failure = internal_error(exc)
    return abandoned(request) or error_response(failure)


def _auth(token: str) -> Callable[..., Awaitable[web.StreamResponse]]:
    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not token_ok(request.headers.get("Authorization"), token):
            error = NeuronError(
                "missing or invalid bearer token",
                status=401,
                type="authentication_error",
                code="invalid_token",
            )
            return web.json_response(
                error.to_body(), status=401, headers={"WWW-Authenticate": "Bearer"}
            )
        return await handler(request)

    return check


def make_neuron_app(
    neuron: Neuron, *, token: str | None = None, browsers: BrowserPolicy | None = None
) -> web.Application:
    """The neuron HTTP API over ``neuron``; every route needs ``token`` when one is set.

    ``browsers`` guards it from web pages (no page is ever given CORS access to a node);
    without one, Host names are not checked (the bind is not known here)."""
    guard = browser_guard(browsers or BrowserPolicy(check_host=False))
    middlewares = [_errors, guard] + ([_auth(token)] if token else [])
    app = web.Application(middlewares=middlewares, client_max_size=MAX_BODY_BYTES)
    app[NEURON] = neuron
    app.router.add_get("/discovery", discovery)
    app.router.add_get("/health", health)
    app.router.add_get("/models", models)
    app.router.add_post("/models/load", load)
    app.router.add_post("/models/unload", unload)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/tokenize", tokenize)
    return app


# -- `helexa neuron` -------------------------------------------------------------------------


async def until_signalled() -> None:
    """Return on the first SIGINT or SIGTERM (the loop's handlers, not KeyboardInterrupt,
    so cleanup runs inside the loop)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = (signal.SIGINT, signal.SIGTERM)
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)


async def serve_until_signalled(neuron: Neuron, host: str, port: int, token: str | None) -> None:
    try:
        app = make_neuron_app(neuron, token=token, browsers=BrowserPolicy.for_bind(host))
        runner, url = await start_server(app, host, port)
    except BaseException:
        await neuron.close()
        raise
    print(f"helexa neuron {neuron.name!r} serving on {url}", flush=True)
    try:
        await until_signalled()
    finally:
        await runner.cleanup()  # stop accepting, then cancel what is still streaming
        await neuron.close()


def node_name(settings: Settings) -> str:
    """What ``helexa neuron`` calls itself in logs and errors: ``local.name`` when the user
    set one, else this host's name (the gateway's operator knows hosts, and every remote
    node calling itself 'local' would say nothing)."""
    if "name" in settings.local.model_fields_set:
        return settings.local.name
    return socket.gethostname() or settings.local.name


def run_neuron(settings: Settings) -> int:
    """``helexa neuron``: serve this host's engine until SIGINT/SIGTERM."""
    host, port = split_listen(settings.neuron.listen)
    token = settings.neuron.token
    if not token and not is_loopback(host):
        print(
            f"helexa: refusing to serve the neuron API on {settings.neuron.listen} without a "
            "token; set --token or HELEXA_NEURON__TOKEN, or bind 127.0.0.1",
            file=sys.stderr,
        )
        return 2
    from helexa.neuron.local import LocalNeuron

    try:
        neuron = LocalNeuron(settings, name=node_name(settings))
        asyncio.run(serve_until_signalled(neuron, host, port, token))
    except ListenError as exc:
        print(f"helexa: {exc}", file=sys.stderr)
        return 1
    return 0
