"""The one error tree: every refusal helexa sends a client is an :class:`ApiError`.

A refusal can start in the wire parsers, in the fleet, in a neuron or in the engine, and
it ends as one error body in the caller's dialect. So each carries what that body needs
(status, message, code, type, param, structured extras) itself, and whoever renders it
reads those fields instead of asking which kind of error it is::

    ApiError(status, message, code, type, param, extra)
     ├── WireError          helexa.wire.errors: a request that does not parse or map
     ├── FleetError         helexa.cortex.fleet: routing, placement, loading
     │    ├── ModelNotFound · NoCapacity · ModelBusy · LoadFailed
     └── NeuronError        helexa.neuron.interface: a node's refusal, over HTTP or not
          └── PreflightError  helexa.neuron.preflight: a load refused before it started

``type`` may be left None: each dialect then names the type after the status
(``helexa.wire.errors``). ``extra`` holds fields a client may act on (a preflight
refusal's ``needed_mb``/``free_mb``); they ride along in the error body.

This module imports nothing of helexa, so every layer can raise these.
"""

from __future__ import annotations

from typing import Any


class ApiError(Exception):
    """A refusal with the HTTP status, machine code and error type a client is sent.

    Class attributes give a subclass's defaults; constructor arguments override them.
    """

    status: int = 500
    code: str | None = None
    type: str | None = None

    def __init__(
        self,
        message: str = "",
        *,
        status: int | None = None,
        code: str | None = None,
        type: str | None = None,
        param: str | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        if code is not None:
            self.code = code
        if type is not None:
            self.type = type
        self.param = param
        self.extra: dict[str, Any] = dict(extra or {})

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.status}, {self.message!r}, code={self.code!r}, "
            f"type={self.type!r}, param={self.param!r})"
        )
