"""The poller: asks every node for discovery, health and models each interval.

A node that fails to answer within ``timeout_s`` is marked down, so requests reroute to
the others; when it answers again it rejoins with fresh discovery (its devices may have
changed while it was away). Polls run concurrently, so one hung node never delays the
picture of the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from helexa.config import Settings
from helexa.cortex.fleet import Fleet

log = logging.getLogger(__name__)


class Poller:
    def __init__(self, fleet: Fleet, interval_s: float = 5.0, timeout_s: float = 3.0) -> None:
        self.fleet = fleet
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self._task: asyncio.Task[None] | None = None
        self.polled = asyncio.Event()  # set once the first round is done (start-up readiness)

    @classmethod
    def from_settings(cls, fleet: Fleet, settings: Settings) -> Poller:
        return cls(fleet, settings.poller.interval_s, settings.poller.timeout_s)

    async def poll_once(self) -> None:
        try:
            await self.fleet.refresh(self.timeout_s)
        finally:  # even a failed round is a look: start-up must not wait forever
            self.polled.set()

    async def _run(self) -> None:
        while True:
            try:
                await self.poll_once()
            except Exception:  # a bug in one round must not stop polling for good
                log.exception("fleet poll failed")
            await asyncio.sleep(self.interval_s)

    def start(self) -> None:
        """Poll now and then every ``interval_s`` in the background (idempotent)."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="helexa-poller")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
