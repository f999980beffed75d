"""Live request traffic for the dashboard: tokens/s per model, TTFT, a recent-request log.

The fleet snapshot says what is loaded where; it does not say how fast tokens are flowing
right now. Prometheus counters only move when a request finishes, which turns a live
tokens/s sparkline into a comb. So the TUI listens on the gateway's own per-request hooks
(:class:`helexa.cortex.observe.RequestObserver`, the ones metrics use): every chunk the gateway
relays tells :class:`Traffic` when the first token arrived and how many tokens came, and
the request's end says how it went. Traffic has an injectable clock, so the arithmetic is
tested without a terminal or a server.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from helexa.cortex.fleet import Lease
from helexa.cortex.observe import CLIENT_GONE, RequestInfo, RequestObserver
from helexa.errors import ApiError
from helexa.wire.openai.stream import choice_carries_output

RequestStatus = Literal["streaming", "ok", "error", "cancelled"]


@dataclass
class RequestRecord:
    """One generation request as the dashboard sees it (times are the Traffic clock)."""

    id: int
    model: str
    node: str  # "" until routed
    api: str  # chat | completions | messages | responses
    started: float
    wall_started: float  # time.time(), for the log's clock column
    first_token: float | None = None
    finished: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0  # live chunk count until usage arrives, then usage
    status: RequestStatus = "streaming"
    error: str | None = None
    done_seq: int = 0  # order of finishing (requests finish out of start order)
    info: RequestInfo | None = None  # what was asked and by whom (None: not yet known)

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.started

    @property
    def duration_s(self) -> float | None:
        return None if self.finished is None else self.finished - self.started

    @property
    def tokens_per_s(self) -> float | None:
        """Decode rate: tokens after the first over the time after the first token."""
        return None if self.finished is None else self.rate_at(self.finished)

    def rate_at(self, now: float) -> float | None:
        """The decode rate up to ``now``: live while streaming, final once finished."""
        if self.first_token is None or self.completion_tokens < 2:
            return None
        decode_s = (self.finished or now) - self.first_token
        return (self.completion_tokens - 1) / decode_s if decode_s > 0 else None

    def elapsed_at(self, now: float) -> float:
        return (self.finished or now) - self.started


def chunk_tokens(chunk: dict[str, Any]) -> int:
    """How many generated tokens one OpenAI chunk stands for (one per non-empty choice).

    Neurons emit one chunk per decoded token, so counting token-bearing choices tracks the
    rate live; the final usage chunk then corrects the total exactly.
    """
    return sum(choice_carries_output(choice) for choice in chunk.get("choices") or ())


class Traffic:
    """Recent requests plus per-second token counts per model, over a sliding window."""

    def __init__(
        self,
        *,
        window_s: int = 60,
        keep: int = 200,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.window_s = window_s
        self.clock = clock
        self.wall_clock = wall_clock
        self.records: deque[RequestRecord] = deque(maxlen=keep)
        self.done: deque[RequestRecord] = deque(maxlen=keep)
        self._buckets: dict[str, dict[int, float]] = {}
        self._next_id = 1
        self._done_seq = 0

    # -- feeding ------------------------------------------------------------------
    def begin(self, model: str, node: str = "", api: str = "") -> RequestRecord:
        record = RequestRecord(self._next_id, model, node, api, self.clock(), self.wall_clock())
        self._next_id += 1
        self.records.append(record)
        return record

    def observer(self, api: str, model: str) -> RequestObserver:
        """The gateway's ``observe`` factory (``Service(..., observe=traffic.observer)``)."""
        return TrafficObserver(self, self.begin(model, api=api))

    def observe(self, record: RequestRecord, chunk: dict[str, Any]) -> None:
        tokens = chunk_tokens(chunk)
        if tokens:
            if record.first_token is None:
                record.first_token = self.clock()
            self._count(record, tokens)
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            record.prompt_tokens = int(usage.get("prompt_tokens") or 0)
            missing = int(usage.get("completion_tokens") or 0) - record.completion_tokens
            if missing > 0:
                self._count(record, missing)

    def finish(
        self, record: RequestRecord, status: RequestStatus = "ok", error: str | None = None
    ) -> None:
        if record.finished is not None:  # one ending per request, whoever reports it twice
            return
        record.finished = self.clock()
        record.status = status
        record.error = error
        self._done_seq += 1
        record.done_seq = self._done_seq
        self.done.append(record)

    def _count(self, record: RequestRecord, tokens: int) -> None:
        record.completion_tokens += tokens
        second = int(self.clock())
        buckets = self._buckets.setdefault(record.model, {})
        buckets[second] = buckets.get(second, 0.0) + tokens
        for old in [s for s in buckets if s <= second - self.window_s]:
            del buckets[old]

    # -- reading ------------------------------------------------------------------
    def models(self) -> list[str]:
        return sorted(self._buckets)

    def series(self, model: str | None = None) -> list[float]:
        """Tokens per second for each of the last ``window_s`` whole seconds, oldest first.

        ``model=None`` sums every model (the fleet's overall rate).
        """
        now = int(self.clock())
        seconds = range(now - self.window_s + 1, now + 1)
        sources = self._buckets.values() if model is None else [self._buckets.get(model, {})]
        return [sum(b.get(s, 0.0) for b in sources) for s in seconds]

    def recent_ttft(self, n: int = 10) -> list[RequestRecord]:
        """The last ``n`` requests that produced a first token, newest last."""
        return [r for r in self.records if r.first_token is not None][-n:]

    def in_flight(self) -> list[RequestRecord]:
        """Requests not finished yet, oldest first."""
        return [r for r in self.records if r.finished is None]

    def record(self, request_id: int) -> RequestRecord | None:
        return next((r for r in self.records if r.id == request_id), None)

    def finished_since(self, done_seq: int) -> list[RequestRecord]:
        """Requests that finished after the one numbered ``done_seq``, in finishing order."""
        return [r for r in self.done if r.done_seq > done_seq]


def recent_rate(series: Sequence[float], over_s: int = 5) -> float:
    """Mean tokens/s over the last ``over_s`` complete seconds of a ``Traffic.series``.

    The newest bucket is the second in progress, so it is left out rather than read low.
    """
    window = series[-over_s - 1 : -1]
    return sum(window) / len(window) if window else 0.0


class TrafficObserver(RequestObserver):
    """The gateway's per-request hooks, feeding one RequestRecord."""

    def __init__(self, traffic: Traffic, record: RequestRecord) -> None:
        self.traffic = traffic
        self.record = record

    def started(self, info: RequestInfo) -> None:
        self.record.info = info

    def routed(self, lease: Lease) -> None:
        self.record.node = lease.node.name
        self.record.model = lease.canonical_id  # the catalogue's name

    def chunk(self, chunk: dict[str, Any]) -> None:
        self.traffic.observe(self.record, chunk)

    def finished(self) -> None:
        self.traffic.finish(self.record)

    def failed(self, failure: ApiError) -> None:
        if failure.status == CLIENT_GONE:
            self.traffic.finish(self.record, "cancelled")
        else:
            self.traffic.finish(self.record, "error", f"{failure.status} {failure.message}")
