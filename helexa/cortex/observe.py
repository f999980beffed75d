"""The gateway's per-request hooks: what a metrics exporter or a traffic tap is told about
each generation request, and how several of them listen at once.

The relay (:mod:`helexa.cortex.relay`) drives them; the listeners (the metrics, the TUI's
traffic record) import them from here, so a listener never depends on the HTTP routes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from helexa.cortex.fleet import Lease
from helexa.errors import ApiError

CLIENT_GONE = 499  # nginx's "client closed request": for hooks, never sent


@dataclass(frozen=True)
class RequestInfo:
    """What a generation request was, beside its model: where it came from and what it
    asked for (its parameters without the conversation, which can be megabytes)."""

    method: str
    route: str
    client: str  # the peer's address
    agent: str  # its User-Agent: which SDK or tool sent it
    stream: bool
    params: dict[str, Any] = field(default_factory=dict)


class RequestObserver:
    """The hook points of one generation request; this base ignores them all.

    Metrics and traffic taps subclass it and hand ``make_app`` a factory. Every route
    reports through the relay in one order: ``started`` (what was asked, by whom, before
    anything can fail but a bad body), ``routed`` (lease taken), ``chunk`` for
    every upstream chunk (the first is time-to-first-token; the last carries usage, even
    when the client did not ask to see it), then exactly one of ``finished`` or ``failed``.
    A failure before routing (bad body, unknown model) reports ``failed`` alone. A request
    whose node fails before its first chunk is rerouted: ``routed`` comes again, with the
    new lease, before any ``chunk``.
    """

    def started(self, info: RequestInfo) -> None:
        pass

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


def ignore(api: str, model: str) -> RequestObserver:
    """The ``observe`` factory of a gateway nobody watches."""
    return RequestObserver()


class Fanout(RequestObserver):
    """Several observers of one request, told everything in the order given."""

    def __init__(self, observers: list[RequestObserver]) -> None:
        self.observers = observers

    def started(self, info: RequestInfo) -> None:
        for o in self.observers:
            o.started(info)

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
        return Fanout([factory(api, model) for factory in factories])

    return observe
