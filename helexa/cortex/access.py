"""The access log: one INFO line per request the gateway answers (``helexa.access``).

A middleware times every request and logs its method, route, status and duration once
the handler is done (for a stream: once it has ended). A generation request adds what
only its relay knows: the model and node, the tokens each way, the time to first token
and an error that ended a stream after its 200. The relay hands those over through an
:class:`AccessRecord`, one more request observer, kept on the request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from helexa.cortex.fleet import Lease
from helexa.cortex.observe import CLIENT_GONE, RequestObserver
from helexa.errors import ApiError
from helexa.wire.openai.stream import choice_carries_output

log = logging.getLogger("helexa.access")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class AccessRecord(RequestObserver):
    """What the relay learns about one generation, for its access line; ``model`` stays
    empty for a request that never reached the relay."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.model = ""
        self.node = ""
        self.clock = clock
        self.began = clock()
        self.first: float | None = None
        self.usage: dict[str, Any] = {}
        self.error: str | None = None

    def routed(self, lease: Lease) -> None:
        self.model, self.node = lease.canonical_id, lease.node.name

    def chunk(self, chunk: dict[str, Any]) -> None:
        if self.first is None and any(choice_carries_output(c) for c in chunk.get("choices") or ()):
            self.first = self.clock()
        if isinstance(chunk.get("usage"), dict):
            self.usage = chunk["usage"]

    def failed(self, failure: ApiError) -> None:
        self.error = failure.code or str(failure.status)

    def fields(self) -> str:
        if not self.model:
            return ""
        parts = [f"model={self.model}"]
        if self.node:
            parts.append(f"node={self.node}")
        if self.usage:
            prompt, completion = (_count(self.usage.get(k)) for k in _TOKEN_KEYS)
            parts.append(f"tokens={prompt}+{completion}")
        if self.first is not None:
            parts.append(f"ttft={self.first - self.began:.3f}s")
        if self.error:
            parts.append(f"error={self.error}")
        return " ".join(parts)


ACCESS = web.RequestKey("access", AccessRecord)
_TOKEN_KEYS = ("prompt_tokens", "completion_tokens")


def _count(value: Any) -> str:
    """A usage count as a node reported it; anything not a count is shown as ``?``
    (a node's odd usage must not cost the request its answer)."""
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else "?"


def access_line(request: web.Request, status: int, seconds: float, record: AccessRecord) -> str:
    """``127.0.0.1 POST /v1/chat/completions 200 1.234s model=m node=n tokens=12+34
    ttft=0.120s``: who, what, how it ended and how long it took, then the generation."""
    # The raw path: the decoded one may hold a newline, which would forge a second line.
    path = request.raw_path.encode("unicode_escape").decode("ascii")
    line = f"{request.remote or '-'} {request.method} {path} {status} {seconds:.3f}s"
    fields = record.fields()
    return f"{line} {fields}" if fields else line


@web.middleware
async def access_log(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Log the request once it is over, whatever ended it: an answer, a refusal the
    error middleware turned into one, or a client that went away (499, as nginx logs it)."""
    record = request[ACCESS] = AccessRecord()
    status = CLIENT_GONE
    try:
        response = await handler(request)
        status = response.status
        return response
    except asyncio.CancelledError:
        raise
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        try:
            log.info(access_line(request, status, record.clock() - record.began, record))
        except Exception:  # the log must never cost a client its answer
            log.exception("access line for %s %r not written", request.method, request.raw_path)
