"""Which browsers may call a helexa server: the Origin, Host and CORS rules.

A server on loopback with no keys is open to every process on the host, and so to every
web page its browser shows: a page may send a ``no-cors`` POST (``text/plain``, no
preflight) and, although it cannot read the answer, the request runs (an unload, a load,
a generation). A page may also point a hostname it controls at 127.0.0.1 (DNS rebinding)
and then read answers as same-origin. Three rules close this, as Ollama's server does:

- a request with an ``Origin`` header runs only when that origin is allowed: loopback
  pages (``http://localhost:3000``) and ``[gateway] cors_origins``;
- such a request's POST body must be JSON, which no page can send without a preflight;
- on a loopback bind, the ``Host`` must be a loopback name or address, or listed in
  ``[gateway] allowed_hosts``: a rebound name never is.

Requests without ``Origin`` (SDKs, curl, agents) are never affected by the first two.
CORS headers are sent only to ``cors_origins``, so by default no page reads an answer.

:class:`BrowserPolicy` decides over plain headers; :func:`browser_guard` applies it to an
aiohttp app (refusals are raised as :class:`~helexa.errors.ApiError` for the app's own
error middleware to render in the caller's dialect).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from aiohttp import web

from helexa.errors import ApiError

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_CORS_METHODS = "GET, POST, OPTIONS"
_CORS_MAX_AGE = "600"
_JSON_TYPES = ("application/json",)


def is_loopback_host(host: str) -> bool:
    """Whether ``host`` (no port) names this machine's loopback: ``localhost``, a
    ``*.localhost`` name (RFC 6761 keeps them on loopback) or a loopback address."""
    host = host.strip("[]").rstrip(".").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def host_name(host_header: str) -> str:
    """The name in a ``Host`` header, without its port (IPv6 literals keep no brackets)."""
    value = host_header.strip()
    if value.startswith("["):
        return value[1:].partition("]")[0]
    return value.rpartition(":")[0] if value.count(":") == 1 else value


def _normal_origin(origin: str) -> str:
    return origin.strip().rstrip("/").lower()


def is_loopback_origin(origin: str) -> bool:
    """Whether ``origin`` is a page served from this machine's loopback over http(s)."""
    parts = urlsplit(origin.strip())
    return parts.scheme in ("http", "https") and is_loopback_host(parts.hostname or "")


@dataclass(frozen=True)
class BrowserPolicy:
    """The origins and Host names one server accepts.

    ``check_host`` is on for a loopback bind: a server bound to a LAN address is reached
    by names this process cannot know, and protects itself with keys instead.
    ``cors_origins`` may hold ``"*"``: any origin, answered with CORS headers.
    """

    cors_origins: tuple[str, ...] = ()
    allowed_hosts: tuple[str, ...] = ()
    check_host: bool = True

    @classmethod
    def for_bind(
        cls, host: str, cors_origins: Iterable[str] = (), allowed_hosts: Iterable[str] = ()
    ) -> BrowserPolicy:
        return cls(
            cors_origins=tuple(_normal_origin(o) for o in cors_origins),
            allowed_hosts=tuple(h.strip().lower() for h in allowed_hosts),
            check_host=is_loopback_host(host),
        )

    def cors_allows(self, origin: str) -> bool:
        return "*" in self.cors_origins or _normal_origin(origin) in self.cors_origins

    def origin_allowed(self, origin: str) -> bool:
        return is_loopback_origin(origin) or self.cors_allows(origin)

    def host_allowed(self, host_header: str | None) -> bool:
        if not self.check_host or not host_header:  # HTTP/1.0 clients send no Host
            return True
        name = host_name(host_header).rstrip(".").lower()
        return is_loopback_host(name) or name in self.allowed_hosts

    def refusal(self, method: str, headers: Mapping[str, str]) -> ApiError | None:
        """Why a browser (or a rebound name) may not make this request, or None."""
        if not self.host_allowed(headers.get("Host")):
            return ApiError(
                f"Host {headers.get('Host')!r} is not allowed: this server answers only"
                " loopback names and [gateway] allowed_hosts (DNS rebinding protection)",
                status=403,
                code="host_not_allowed",
                type="permission_error",
            )
        origin = headers.get("Origin")
        if origin is None:
            return None
        # A preflight asks to read answers from a page: only cors_origins may.
        preflight = method == "OPTIONS" and "Access-Control-Request-Method" in headers
        if not (self.cors_allows(origin) if preflight else self.origin_allowed(origin)):
            return ApiError(
                f"origin {origin!r} is not allowed: add it to [gateway] cors_origins to let"
                " a web page call this server",
                status=403,
                code="origin_not_allowed",
                type="permission_error",
            )
        media = (headers.get("Content-Type") or "").partition(";")[0].strip().lower()
        if method == "POST" and not (media in _JSON_TYPES or media.endswith("+json")):
            return ApiError(
                f"a request from a web page must send its body as application/json,"
                f" not {media or 'no content type'!r}",
                status=415,
                code="unsupported_media_type",
            )
        return None

    def cors_headers(self, headers: Mapping[str, str], *, preflight: bool) -> dict[str, str]:
        """The CORS headers an answer to this request carries (none for other origins)."""
        origin = headers.get("Origin")
        if origin is None or not self.cors_allows(origin):
            return {}
        out = {"Access-Control-Allow-Origin": origin.strip(), "Vary": "Origin"}
        if preflight:
            out["Access-Control-Allow-Methods"] = _CORS_METHODS
            requested = headers.get("Access-Control-Request-Headers")
            if requested:
                out["Access-Control-Allow-Headers"] = requested
            out["Access-Control-Max-Age"] = _CORS_MAX_AGE
        return out


def _is_preflight(request: web.Request) -> bool:
    return request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers


def browser_guard(policy: BrowserPolicy) -> Callable[..., Awaitable[web.StreamResponse]]:
    """Middleware applying ``policy``; place it inside the error middleware and before
    authentication (a preflight carries no key)."""

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        refusal = policy.refusal(request.method, request.headers)
        if refusal is not None:
            raise refusal
        if _is_preflight(request):  # from an origin refusal() let through
            return web.Response(
                status=204, headers=policy.cors_headers(request.headers, preflight=True)
            )
        return await handler(request)

    return guard


def install_cors(app: web.Application, policy: BrowserPolicy) -> None:
    """Send ``policy``'s CORS headers on every answer of ``app``, error bodies and streams
    included (``on_response_prepare`` runs before the first byte). The guard middleware
    must be among ``app``'s middlewares as well: aiohttp fixes them at construction."""

    async def on_prepare(request: web.Request, response: web.StreamResponse) -> None:
        if _is_preflight(request):
            return
        for name, value in policy.cors_headers(request.headers, preflight=False).items():
            response.headers.setdefault(name, value)

    app.on_response_prepare.append(on_prepare)
