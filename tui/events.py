"""What happened in the fleet, kept: loads, evictions, failures, nodes going down and
coming back, and every line the gateway logs, for the dashboard's events pane.

A toast is gone in seconds; an operator who looks away misses why a model failed to
load. The gateway already says all of it on its loggers (what ``--serve`` prints), so
:class:`EventsHandler` is a logging handler that keeps those records in :class:`Events`
(the access log is left out: the request view shows every request). A load failure's
log record carries the model and the reason as fields, so the models table can say why
a row failed for as long as it has not loaded since.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

Level = Literal["info", "warning", "error"]


@dataclass(frozen=True)
class Event:
    seq: int
    wall: float  # time.time()
    level: Level
    source: str  # the logger's last part: fleet, gateway, service, dashboard ...
    text: str


class Events:
    """The last ``keep`` events, numbered in order, and the last load failure per model."""

    def __init__(self, keep: int = 1000, wall_clock: Callable[[], float] = time.time) -> None:
        self.kept: deque[Event] = deque(maxlen=keep)
        self.wall_clock = wall_clock
        self.failures: dict[str, str] = {}  # model id -> why its last load failed
        self._seq = 0

    def add(self, text: str, level: Level = "info", source: str = "dashboard") -> Event:
        self._seq += 1
        event = Event(self._seq, self.wall_clock(), level, source, text)
        self.kept.append(event)
        return event

    def since(self, seq: int) -> list[Event]:
        return [e for e in self.kept if e.seq > seq]

    def load_failed(self, model: str, why: str) -> None:
        self.failures[model] = why

    def loaded(self, model: str) -> None:
        self.failures.pop(model, None)


def _level(record: logging.LogRecord) -> Level:
    if record.levelno >= logging.ERROR:
        return "error"
    return "warning" if record.levelno >= logging.WARNING else "info"


class EventsHandler(logging.Handler):
    """Keeps ``helexa.*`` log records (not the access log) as events."""

    def __init__(self, events: Events) -> None:
        super().__init__(logging.INFO)
        self.events = events
        self.level_before = logging.NOTSET  # the helexa logger's own, given back at the end

    def emit(self, record: logging.LogRecord) -> None:
        if record.name == "helexa.access":
            return
        try:
            text = record.getMessage()
        except Exception:  # a bad format string must not take the dashboard down
            text = str(record.msg)
        model = getattr(record, "model", None)
        if isinstance(model, str):
            if failure := getattr(record, "failure", None):
                self.events.load_failed(model, str(failure))
            elif getattr(record, "loaded", False):
                self.events.loaded(model)
        self.events.add(text, _level(record), record.name.rpartition(".")[2])


def listening(events: Events) -> EventsHandler:
    """Attach a handler for ``events`` to the ``helexa`` logger (at INFO while it is on:
    the dashboard configures no logging of its own, so nothing is printed over it)."""
    handler = EventsHandler(events)
    logger = logging.getLogger("helexa")
    logger.addHandler(handler)
    handler.level_before = logger.level
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    return handler


def stop_listening(handler: EventsHandler) -> None:
    logger = logging.getLogger("helexa")
    logger.removeHandler(handler)
    logger.setLevel(handler.level_before)
